//! Model loading: GGUF files, Hugging Face safetensors directories, or random (dummy) weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ConfigError, ModelConfig};
use crate::gguf::{GgufError, GgufFile};
use crate::model::tp::{Collective, SingleRank};
use crate::model::CausalLM;

/// Where the weights come from (vLLM's `--load-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadFormat {
    /// GGUF for a `.gguf` file, safetensors for a directory.
    Auto,
    Gguf,
    Safetensors,
    /// Random weights of the configured shape, generated on the device.
    Dummy,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("weight `{0}` missing")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("weight `{name}` has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    #[error("{0}")]
    Layout(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Tensors by Hugging Face name, delivered in the compute dtype on the device.
pub trait WeightSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError>;
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<(), LoadError> {
    if found != expected {
        return Err(LoadError::Shape {
            name: name.into(),
            found: found.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Reads llama.cpp tensor names and layouts and presents them under HF names.
pub struct GgufSource<'a> {
    gguf: &'a GgufFile,
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
}

impl<'a> GgufSource<'a> {
    pub fn new(gguf: &'a GgufFile, cfg: &ModelConfig, dtype: DType, device: &Device) -> Self {
        Self {
            gguf,
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
        }
    }

    /// llama.cpp tensor name for a HF name, and the head count its rows are permuted by (if any).
    fn gguf_name(&self, name: &str) -> Option<(String, Option<usize>)> {
        // llama.cpp's convert script interleaves the two rotary halves of each Q/K head for llama.
        let permuted = self.cfg.architecture == Architecture::Llama;
        let top = match name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(t) = top {
            return Some((t.to_string(), None));
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let (gname, perm) = match suffix {
            "input_layernorm.weight" => ("attn_norm.weight", None),
            "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
            "self_attn.q_proj.weight" => ("attn_q.weight", Some(self.cfg.num_attention_heads)),
            "self_attn.k_proj.weight" => ("attn_k.weight", Some(self.cfg.num_key_value_heads)),
            "self_attn.v_proj.weight" => ("attn_v.weight", None),
            "self_attn.o_proj.weight" => ("attn_output.weight", None),
            "self_attn.q_proj.bias" => ("attn_q.bias", None),
            "self_attn.k_proj.bias" => ("attn_k.bias", None),
            "self_attn.v_proj.bias" => ("attn_v.bias", None),
            "self_attn.qkv_proj.weight" => ("attn_qkv.weight", None),
            "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
            "mlp.up_proj.weight" => ("ffn_up.weight", None),
            "mlp.down_proj.weight" => ("ffn_down.weight", None),
            "mlp.gate_up_proj.weight" => ("ffn_up.weight", None),
            _ => return None,
        };
        Some((format!("blk.{layer}.{gname}"), perm.filter(|_| permuted)))
    }
}

/// Undo llama.cpp's Q/K row permutation: per head, rows were reordered from
/// `[2, hd/2]` (HF halves) to `[hd/2, 2]` (interleaved pairs).
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

impl WeightSource for GgufSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let (gname, perm) = self
            .gguf_name(name)
            .ok_or_else(|| LoadError::MissingWeight(name.into()))?;
        let (found, data) = self.gguf.tensor_f32(&gname).map_err(|e| match e {
            GgufError::MissingTensor(_) => LoadError::MissingWeight(format!("{name} ({gname})")),
            e => e.into(),
        })?;
        check_shape(name, &found, shape)?;
        let mut t = Tensor::from_vec(data, found, &Device::Cpu)?;
        if let Some(n_head) = perm {
            if !shape[0].is_multiple_of(2 * n_head) {
                return Err(LoadError::Layout(format!(
                    "{name}: rows not divisible by 2*{n_head}"
                )));
            }
            t = unpermute_rows(&t, n_head)?;
        }
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// Tensors of a HF directory's `*.safetensors` files (memory-mapped).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, usize>,
    dtype: DType,
    device: Device,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, LoadError> {
        let io = |path: &Path, source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(LoadError::Layout(format!(
                "{}: no *.safetensors files",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            // SAFETY: read-only mapping of a file that is only read.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(&path, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                LoadError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for n in st.names() {
                index.insert(n.clone(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Self {
            files,
            index,
            dtype,
            device: device.clone(),
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingWeight(name.into()))?;
        let (path, mmap) = &self.files[i];
        let st =
            safetensors::SafeTensors::deserialize(mmap).map_err(|e| LoadError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let view = st.tensor(name).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        check_shape(name, view.shape(), shape)?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(LoadError::Dtype {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// Random weights generated on the device: N(0, 0.02) matrices, ones for norms, zero biases.
pub struct DummySource {
    dtype: DType,
    device: Device,
    rng: rand::rngs::StdRng,
}

impl DummySource {
    pub fn new(dtype: DType, device: &Device, seed: u64) -> Result<Self, LoadError> {
        use rand::SeedableRng;
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        Ok(Self {
            dtype,
            device: device.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        })
    }
}

impl WeightSource for DummySource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        if name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, self.dtype, &self.device)?);
        }
        if name.ends_with(".bias") {
            return Ok(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        let t = if self.device.is_cpu() {
            // The CPU device has no seedable generator: draw from our own seeded one.
            use rand::Rng;
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    // Box-Muller: one normal sample from two uniforms.
                    let u1: f32 = self.rng.gen_range(f32::EPSILON..1.0);
                    let u2: f32 = self.rng.gen();
                    0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect();
            Tensor::from_vec(data, shape, &self.device)?
        } else {
            // curand draws f32 only; each tensor is converted right after it is drawn.
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The config.json describing `model`: the file itself, or `config.json` inside a directory.
fn hf_config_path(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    }
}

/// Read only the model's config (no weights): GGUF metadata or config.json.
pub fn load_config(model: &Path, format: LoadFormat) -> Result<ModelConfig, LoadError> {
    std::fs::metadata(model).map_err(|e| io_err(model, e))?;
    let gguf = model.is_file() && model.extension().is_some_and(|e| e == "gguf");
    match resolve_format(model, format) {
        LoadFormat::Gguf => Ok(ModelConfig::from_gguf(&GgufFile::open(model)?)?),
        LoadFormat::Dummy | LoadFormat::Auto if gguf => {
            Ok(ModelConfig::from_gguf(&GgufFile::open(model)?)?)
        }
        _ => Ok(ModelConfig::from_hf_config_json(&hf_config_path(model))?),
    }
}

fn resolve_format(model: &Path, format: LoadFormat) -> LoadFormat {
    match format {
        LoadFormat::Auto if model.is_file() && model.extension().is_some_and(|e| e == "gguf") => {
            LoadFormat::Gguf
        }
        LoadFormat::Auto if model.is_file() => LoadFormat::Dummy,
        LoadFormat::Auto => LoadFormat::Safetensors,
        f => f,
    }
}

/// Load a model: a GGUF file, a HF directory (config.json + *.safetensors), or for `Dummy` a
/// config.json (file or directory holding one) with random weights drawn from `seed`.
pub fn load_model(
    model: &Path,
    format: LoadFormat,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn CausalLM>, LoadError> {
    load_model_rank(model, format, dtype, device, seed, Arc::new(SingleRank))
}

/// [`load_model`] for one tensor-parallel rank (`tp.rank()` of `tp.world_size()`): the rank's
/// shard of every weight (see `model::tp`); world size 1 is exactly `load_model`.
pub fn load_model_rank(
    model: &Path,
    format: LoadFormat,
    dtype: DType,
    device: &Device,
    seed: u64,
    tp: Arc<dyn Collective>,
) -> Result<Box<dyn CausalLM>, LoadError> {
    std::fs::metadata(model).map_err(|e| io_err(model, e))?;
    let build = |cfg: &ModelConfig, src: &mut dyn WeightSource| {
        crate::model::tp::load_rank(cfg, src, dtype, device, tp.clone())
    };
    let m = match resolve_format(model, format) {
        LoadFormat::Gguf => {
            let gguf = GgufFile::open(model)?;
            let cfg = ModelConfig::from_gguf(&gguf)?;
            build(&cfg, &mut GgufSource::new(&gguf, &cfg, dtype, device))?
        }
        LoadFormat::Safetensors => {
            if !model.is_dir() {
                return Err(LoadError::Layout(format!(
                    "{}: safetensors loading needs a directory with config.json",
                    model.display()
                )));
            }
            let cfg = ModelConfig::from_hf_config_json(&model.join("config.json"))?;
            build(&cfg, &mut SafetensorsSource::open(model, dtype, device)?)?
        }
        LoadFormat::Dummy | LoadFormat::Auto => build(
            &load_config(model, format)?,
            &mut DummySource::new(dtype, device, seed)?,
        )?,
    };
    Ok(Box::new(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_restores_hf_halves() {
        // One head, head_dim 4, one column: HF rows [a0 a1 | b0 b1] are stored by llama.cpp as
        // interleaved pairs [a0 b0 a1 b1].
        let stored = Tensor::new(&[[0f32], [2.0], [1.0], [3.0]], &Device::Cpu).unwrap();
        let hf = unpermute_rows(&stored, 1).unwrap();
        assert_eq!(
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 2.0, 3.0]
        );
        // Two heads stay separate.
        let stored = Tensor::new(
            &[[0f32], [2.0], [1.0], [3.0], [4.0], [6.0], [5.0], [7.0]],
            &Device::Cpu,
        )
        .unwrap();
        let hf = unpermute_rows(&stored, 2).unwrap();
        assert_eq!(
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn dummy_weights_have_the_configured_shapes_and_scale() {
        let dir = std::env::temp_dir().join(format!("dummy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, r#"{"model_type":"qwen2","vocab_size":64,"hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":true,"max_position_embeddings":128}"#).unwrap();
        let m = load_model(&dir, LoadFormat::Dummy, DType::F32, &Device::Cpu, 1).unwrap();
        assert_eq!(m.config().num_parameters(), {
            let h = 32u64;
            let layer = h * 32 + 2 * h * 16 + 32 * h + (32 + 32) + 3 * h * 48 + 2 * h;
            64 * h + 2 * layer + h
        });
        let logits = m.forward_full(&[1, 2, 3]).unwrap();
        assert_eq!(logits.dims(), &[3, 64]);
        let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|x| *x != 0.0));
        // Same seed, same weights.
        let m2 = load_model(&cfg, LoadFormat::Dummy, DType::F32, &Device::Cpu, 1).unwrap();
        let v2: Vec<f32> = m2
            .forward_full(&[1, 2, 3])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, v2);
        assert!(m.forward_full(&[64]).is_err());
        assert!(load_model(
            &dir.join("nope"),
            LoadFormat::Auto,
            DType::F32,
            &Device::Cpu,
            1
        )
        .is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
