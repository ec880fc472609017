//! KV-cache capacity prediction: the model's KV geometry (from the engine's startup report, an HF
//! `config.json` or GGUF metadata) and the arithmetic from a memory budget to blocks, tokens and
//! concurrent requests.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is not a GGUF file (magic {magic:?})")]
    NotGguf { path: String, magic: [u8; 4] },
    #[error("{path}: GGUF metadata is malformed: {message}")]
    BadGguf { path: String, message: String },
    #[error("{source_name} lacks {field}, needed for the KV size per token")]
    Missing { source_name: String, field: String },
}

/// What the KV cache of one token depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvGeometry {
    pub num_hidden_layers: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    /// Where the numbers came from (said in the report).
    pub source: String,
}

impl KvGeometry {
    /// 2 (K and V) x layers x kv_heads x head_dim x element bytes.
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
    }

    /// From `/v1/engine/startup` when it carries the geometry, at top level or under
    /// `model_config` / `config`.
    pub fn from_startup_json(v: &serde_json::Value) -> Option<Self> {
        let obj = ["model_config", "config"]
            .iter()
            .find_map(|k| v.get(*k).filter(|o| o.is_object()))
            .unwrap_or(v);
        let num = |k: &str| obj.get(k).and_then(|x| x.as_u64());
        let layers = num("num_hidden_layers")?;
        let heads = num("num_attention_heads");
        let kv_heads = num("num_key_value_heads").or(heads)?;
        let head_dim = num("head_dim").or_else(|| Some(num("hidden_size")? / heads?))?;
        Some(Self {
            num_hidden_layers: layers,
            num_key_value_heads: kv_heads,
            head_dim,
            source: "engine /v1/engine/startup".into(),
        })
    }

    /// From a Hugging Face `config.json` (kv heads default to attention heads, head_dim to
    /// hidden_size / heads, as transformers does).
    pub fn from_hf_config(path: &Path) -> Result<Self, PredictError> {
        let text = std::fs::read_to_string(path).map_err(|e| PredictError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| PredictError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let src = format!("config.json {}", path.display());
        // Multimodal configs nest the language model under `text_config`.
        let obj = v.get("text_config").filter(|o| o.is_object()).unwrap_or(&v);
        let num = |k: &str| obj.get(k).and_then(|x| x.as_u64());
        let missing = |f: &str| PredictError::Missing {
            source_name: src.clone(),
            field: f.into(),
        };
        let layers = num("num_hidden_layers").ok_or_else(|| missing("num_hidden_layers"))?;
        let heads = num("num_attention_heads");
        let kv_heads = num("num_key_value_heads")
            .or(heads)
            .ok_or_else(|| missing("num_key_value_heads"))?;
        let head_dim = match num("head_dim") {
            Some(d) => d,
            None => match (num("hidden_size"), heads) {
                (Some(h), Some(n)) if n > 0 => h / n,
                _ => return Err(missing("head_dim (or hidden_size and num_attention_heads)")),
            },
        };
        Ok(Self {
            num_hidden_layers: layers,
            num_key_value_heads: kv_heads,
            head_dim,
            source: src,
        })
    }

    /// From GGUF metadata (`<arch>.block_count`, `<arch>.attention.head_count[_kv]`,
    /// `<arch>.attention.key_length` or `<arch>.embedding_length / head_count`).
    pub fn from_gguf(path: &Path) -> Result<Self, PredictError> {
        let meta = read_gguf_metadata(path)?;
        let src = format!("GGUF metadata {}", path.display());
        let missing = |f: &str| PredictError::Missing {
            source_name: src.clone(),
            field: f.into(),
        };
        let arch = match meta.get("general.architecture") {
            Some(GgufValue::Str(s)) => s.clone(),
            _ => return Err(missing("general.architecture")),
        };
        let num = |k: &str| match meta.get(&format!("{arch}.{k}")) {
            Some(GgufValue::Num(n)) => Some(*n),
            _ => None,
        };
        let layers = num("block_count").ok_or_else(|| missing(&format!("{arch}.block_count")))?;
        let heads = num("attention.head_count");
        let kv_heads = num("attention.head_count_kv")
            .or(heads)
            .ok_or_else(|| missing(&format!("{arch}.attention.head_count_kv")))?;
        let head_dim = match num("attention.key_length") {
            Some(d) => d,
            None => match (num("embedding_length"), heads) {
                (Some(h), Some(n)) if n > 0 => h / n,
                _ => return Err(missing(&format!("{arch}.attention.key_length"))),
            },
        };
        Ok(Self {
            num_hidden_layers: layers,
            num_key_value_heads: kv_heads,
            head_dim,
            source: src,
        })
    }
}

/// Bytes per element of a dtype name as servers print it (`float32`, `bfloat16`, `fp8`...).
pub fn dtype_bytes(name: &str) -> Option<u64> {
    match name
        .trim()
        .to_ascii_lowercase()
        .trim_start_matches("torch.")
    {
        "float32" | "f32" | "fp32" | "float" => Some(4),
        "bfloat16" | "bf16" | "float16" | "f16" | "fp16" | "half" => Some(2),
        "fp8" | "fp8_e4m3" | "fp8_e5m2" | "float8_e4m3fn" | "int8" => Some(1),
        _ => None,
    }
}

/// The predicted cache for one setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub kv_bytes_per_token: u64,
    pub block_size: u64,
    pub budget_bytes: u64,
    pub num_blocks: u64,
    pub kv_tokens: u64,
    /// One request of `max_model_len` fits (the server should start).
    pub fits: bool,
    /// vLLM's "Maximum concurrency for N tokens per request": kv_tokens / max_model_len.
    pub max_concurrency: f64,
    /// Prompt + output tokens of one load request.
    pub tokens_per_request: u64,
    /// Load requests whose blocks fit at once: blocks / ceil(tokens_per_request / block_size).
    pub max_concurrent_requests: u64,
}

/// Budget -> whole blocks -> tokens, and how many requests fit. Zero sizes predict nothing fits.
pub fn predict(
    budget_bytes: u64,
    kv_bytes_per_token: u64,
    block_size: u64,
    max_model_len: u64,
    tokens_per_request: u64,
) -> Prediction {
    let bytes_per_block = kv_bytes_per_token.saturating_mul(block_size);
    let num_blocks = budget_bytes.checked_div(bytes_per_block).unwrap_or(0);
    let kv_tokens = num_blocks * block_size;
    let blocks_for = |tokens: u64| tokens.div_ceil(block_size.max(1));
    let per_request = blocks_for(tokens_per_request).max(1);
    Prediction {
        kv_bytes_per_token,
        block_size,
        budget_bytes,
        num_blocks,
        kv_tokens,
        fits: block_size > 0 && max_model_len > 0 && num_blocks >= blocks_for(max_model_len),
        max_concurrency: if max_model_len > 0 {
            kv_tokens as f64 / max_model_len as f64
        } else {
            0.0
        },
        tokens_per_request,
        max_concurrent_requests: num_blocks / per_request,
    }
}

/// GPU KV budget before the server starts: total x utilization - memory others already use -
/// weights - activation peak (0 when unknown, which makes the prediction an upper bound).
pub fn gpu_budget(
    total: u64,
    utilization: f64,
    used_before: u64,
    weights: u64,
    activations: u64,
) -> u64 {
    let limit = (total as f64 * utilization) as u64;
    limit
        .saturating_sub(used_before)
        .saturating_sub(weights)
        .saturating_sub(activations)
}

/// `2k` -> 2048, `512` -> 512, `1.5k` -> 1536, `1m` -> 1048576.
pub fn parse_len(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.strip_suffix('k') {
        Some(n) => (n, 1024.0),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 1024.0 * 1024.0),
            None => (t.as_str(), 1.0),
        },
    };
    let v: f64 = num.trim().parse().ok()?;
    let n = v * mult;
    (n.is_finite() && n >= 1.0 && n.fract() == 0.0).then_some(n as u64)
}

/// `20MiB`, `1GiB`, `1.5G`, `500MB`, `1048576` -> bytes (K/M/G and *iB binary, KB/MB/GB decimal).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let v: f64 = t[..split].parse().ok()?;
    let mult: f64 = match t[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let n = v * mult;
    (n.is_finite() && n >= 0.0).then_some(n as u64)
}

/// A GGUF metadata value the prediction may use (arrays are skipped).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Num(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array,
}

/// Reads the key/value metadata at the head of a GGUF file (v2/v3), skipping tensor data.
pub fn read_gguf_metadata(path: &Path) -> Result<BTreeMap<String, GgufValue>, PredictError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| PredictError::Read {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let mut r = GgufReader {
        r: BufReader::new(file),
        path: p.clone(),
    };
    let mut magic = [0u8; 4];
    r.r.read_exact(&mut magic).map_err(|e| r.bad(e))?;
    if &magic != b"GGUF" {
        return Err(PredictError::NotGguf { path: p, magic });
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.bad(format!("unsupported GGUF version {version}")));
    }
    let _tensors = r.u64()?;
    let n_kv = r.u64()?;
    let mut out = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = r.value(ty)?;
        out.insert(key, v);
    }
    Ok(out)
}

struct GgufReader {
    r: BufReader<std::fs::File>,
    path: String,
}

impl GgufReader {
    fn bad(&self, e: impl std::fmt::Display) -> PredictError {
        PredictError::BadGguf {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], PredictError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| self.bad(e))?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, PredictError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, PredictError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, PredictError> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(self.bad(format!("string of {n} bytes")));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|e| self.bad(e))?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip(&mut self, n: u64) -> Result<(), PredictError> {
        let n = i64::try_from(n).map_err(|_| self.bad("skip too large"))?;
        self.r.seek_relative(n).map_err(|e| self.bad(e))
    }
    /// Size of a fixed-width scalar type, None for strings and arrays.
    fn width(&self, ty: u32) -> Result<Option<u64>, PredictError> {
        Ok(match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            8 | 9 => None,
            _ => return Err(self.bad(format!("unknown value type {ty}"))),
        })
    }
    fn value(&mut self, ty: u32) -> Result<GgufValue, PredictError> {
        Ok(match ty {
            0 => GgufValue::Num(self.bytes::<1>()?[0] as u64),
            1 => GgufValue::Num(self.bytes::<1>()?[0] as i8 as u64),
            2 => GgufValue::Num(u16::from_le_bytes(self.bytes()?) as u64),
            3 => GgufValue::Num(i16::from_le_bytes(self.bytes()?) as u64),
            4 => GgufValue::Num(self.u32()? as u64),
            5 => GgufValue::Num(i32::from_le_bytes(self.bytes()?) as u64),
            6 => GgufValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                match self.width(elem)? {
                    Some(w) => self.skip(
                        w.checked_mul(n)
                            .ok_or_else(|| self.bad("array too large"))?,
                    )?,
                    None if elem == 8 => {
                        for _ in 0..n {
                            let len = self.u64()?;
                            self.skip(len)?;
                        }
                    }
                    None => {
                        for _ in 0..n {
                            self.value(elem)?;
                        }
                    }
                }
                GgufValue::Array
            }
            10 => GgufValue::Num(self.u64()?),
            11 => GgufValue::Num(i64::from_le_bytes(self.bytes()?) as u64),
            12 => GgufValue::Float(f64::from_le_bytes(self.bytes()?)),
            _ => return Err(self.bad(format!("unknown value type {ty}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> KvGeometry {
        KvGeometry {
            num_hidden_layers: 30,
            num_key_value_heads: 3,
            head_dim: 64,
            source: "t".into(),
        }
    }

    #[test]
    fn bytes_per_token_is_2_layers_heads_dim_dtype() {
        // SmolLM2-135M float32: 2 * 30 * 3 * 64 * 4.
        assert_eq!(smollm2().kv_bytes_per_token(4), 46_080);
        // Qwen2.5-1.5B bf16: 2 * 28 * 2 * 128 * 2 (the engine's own unit test says 28,672).
        let q = KvGeometry {
            num_hidden_layers: 28,
            num_key_value_heads: 2,
            head_dim: 128,
            source: "t".into(),
        };
        assert_eq!(q.kv_bytes_per_token(2), 28_672);
    }

    #[test]
    fn prediction_rounds_down_to_whole_blocks() {
        // 20 MiB / (46,080 * 16) = 28.4 -> 28 blocks = 448 tokens.
        let p = predict(20 << 20, 46_080, 16, 256, 160);
        assert_eq!((p.num_blocks, p.kv_tokens, p.fits), (28, 448, true));
        assert!((p.max_concurrency - 1.75).abs() < 1e-12);
        // 160 tokens = 10 blocks per request -> 2 requests at once.
        assert_eq!(p.max_concurrent_requests, 2);
        // 512 needs 32 blocks: does not fit.
        assert!(!predict(20 << 20, 46_080, 16, 512, 100).fits);
        // A partial last block still takes a whole block.
        assert!(!predict(28 * 16 * 46_080, 46_080, 16, 449, 1).fits);
        assert!(predict(28 * 16 * 46_080, 46_080, 16, 448, 1).fits);
        // Degenerate inputs predict nothing instead of dividing by zero.
        let z = predict(1 << 20, 0, 16, 256, 10);
        assert_eq!((z.num_blocks, z.fits), (0, false));
        assert!(!predict(1 << 20, 10, 16, 0, 10).fits);
    }

    #[test]
    fn gpu_budget_subtracts_what_is_in_use() {
        let g = 1u64 << 30;
        assert_eq!(gpu_budget(80 * g, 0.9, 2 * g, 3 * g, g), 66 * g);
        assert_eq!(gpu_budget(8 * g, 0.5, 2 * g, 3 * g, g), 0);
    }

    #[test]
    fn lengths_and_sizes_parse() {
        assert_eq!(parse_len("2k"), Some(2048));
        assert_eq!(parse_len("8K"), Some(8192));
        assert_eq!(parse_len("1.5k"), Some(1536));
        assert_eq!(parse_len("512"), Some(512));
        assert_eq!(parse_len("0"), None);
        assert_eq!(parse_len("abc"), None);
        assert_eq!(parse_len("1.3"), None);
        assert_eq!(parse_bytes("20MiB"), Some(20 << 20));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("500MB"), Some(500_000_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("3 parsecs"), None);
    }

    #[test]
    fn dtype_names() {
        assert_eq!(dtype_bytes("float32"), Some(4));
        assert_eq!(dtype_bytes("torch.bfloat16"), Some(2));
        assert_eq!(dtype_bytes("fp8_e4m3"), Some(1));
        assert_eq!(dtype_bytes("auto"), None);
    }

    #[test]
    fn geometry_from_startup_json_and_hf_config() {
        let v = serde_json::json!({"model_config": {"num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "hidden_size": 576}});
        let g = KvGeometry::from_startup_json(&v).unwrap();
        assert_eq!(
            (g.num_hidden_layers, g.num_key_value_heads, g.head_dim),
            (30, 3, 64)
        );
        // Today's engine report has no geometry: None, not a guess.
        assert!(
            KvGeometry::from_startup_json(&serde_json::json!({"kv_cache_tokens": 10})).is_none()
        );

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let q = KvGeometry::from_hf_config(&root.join("qwen2.5-1.5b-instruct.json")).unwrap();
        assert_eq!(q.kv_bytes_per_token(2), 28_672);
        let dir = std::env::temp_dir().join(format!("kvs-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(&f, r#"{"num_hidden_layers": 2, "hidden_size": 64}"#).unwrap();
        let e = KvGeometry::from_hf_config(&f).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A hand-built GGUF header: scalar, string and array values of several types.
    #[test]
    fn gguf_metadata_is_read_and_arrays_skipped() {
        fn s(b: &mut Vec<u8>, t: &str) {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(6u64.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "<s>");
        s(&mut b, "hello");
        s(&mut b, "tokenizer.ggml.scores");
        b.extend(9u32.to_le_bytes());
        b.extend(6u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend([0u8; 8]);
        s(&mut b, "llama.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(30u32.to_le_bytes());
        s(&mut b, "llama.attention.head_count");
        b.extend(10u32.to_le_bytes());
        b.extend(9u64.to_le_bytes());
        s(&mut b, "llama.embedding_length");
        b.extend(5u32.to_le_bytes());
        b.extend(576i32.to_le_bytes());
        let dir = std::env::temp_dir().join(format!("kvs-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.gguf");
        std::fs::write(&f, &b).unwrap();
        let m = read_gguf_metadata(&f).unwrap();
        assert_eq!(m.get("tokenizer.ggml.tokens"), Some(&GgufValue::Array));
        let g = KvGeometry::from_gguf(&f).unwrap();
        // No head_count_kv: falls back to head_count; head_dim = 576 / 9.
        assert_eq!(
            (g.num_hidden_layers, g.num_key_value_heads, g.head_dim),
            (30, 9, 64)
        );
        std::fs::write(&f, &b[..b.len() - 3]).unwrap();
        assert!(matches!(
            read_gguf_metadata(&f),
            Err(PredictError::BadGguf { .. })
        ));
        std::fs::write(&f, b"NOPE....").unwrap();
        assert!(matches!(
            read_gguf_metadata(&f),
            Err(PredictError::NotGguf { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn real_smollm2_gguf_geometry() {
        let p = std::env::var_os("SMOLLM2_GGUF")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        if !p.is_file() {
            eprintln!(
                "SKIPPED real_smollm2_gguf_geometry: {} not found (set SMOLLM2_GGUF)",
                p.display()
            );
            return;
        }
        let g = KvGeometry::from_gguf(&p).unwrap();
        assert_eq!(g.kv_bytes_per_token(4), 46_080, "{g:?}");
    }
}
