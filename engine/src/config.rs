//! Model hyper-parameters (from GGUF metadata or a Hugging Face config.json).

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config.json: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported architecture `{0}` (supported: llama, qwen2, phi3)")]
    UnsupportedArchitecture(String),
    #[error("invalid model config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// Decoder families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama, Mistral-style, SmolLM2, CodeLlama.
    Llama,
    /// Llama plus Q/K/V biases.
    Qwen2,
    /// Llama with fused qkv_proj and gate_up_proj weights.
    Phi3,
}

impl Architecture {
    /// From a HF `model_type` / GGUF `general.architecture` string.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "phi3" => Ok(Self::Phi3),
            _ => Err(ConfigError::UnsupportedArchitecture(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Phi3 => "phi3",
        }
    }
}

/// Everything the model, KV cache and scheduler need to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Q/K/V projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Sliding attention window, when the model declares one (informational; attention is full).
    pub sliding_window: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` (llama, qwen2, phi3).
    pub fn from_hf_config_json(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let arch_name = match (&hf.model_type, hf.architectures.first()) {
            (Some(t), _) => t.clone(),
            (None, Some(a)) => a
                .trim_end_matches("ForCausalLM")
                .to_ascii_lowercase()
                .to_string(),
            (None, None) => return Err(ConfigError::Invalid("no model_type".into())),
        };
        let architecture = Architecture::parse(&arch_name)?;
        let heads = hf.num_attention_heads;
        let sliding_window = match hf.use_sliding_window {
            Some(false) => None,
            _ => hf.sliding_window,
        };
        let cfg = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_ids: match hf.eos_token_id {
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
                None => vec![],
            },
            attention_bias: hf
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            sliding_window,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read the hyper-parameters from GGUF metadata (`general.architecture` = llama | qwen2 | phi3).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = g.get_str("general.architecture")?.to_string();
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt_u = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64());
        let hidden_size = g.get_u64(&key("embedding_length"))? as usize;
        let heads = g.get_u64(&key("attention.head_count"))? as usize;
        let vocab_size = match opt_u("vocab_size") {
            Some(v) => v as usize,
            None => match g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(tokens) => tokens.len(),
                None => g
                    .tensors
                    .get("token_embd.weight")
                    .map(|t| t.shape[0])
                    .ok_or_else(|| ConfigError::Invalid("cannot tell the vocab size".into()))?,
            },
        };
        let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let mut eos_token_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos_token_ids.contains(&eot) {
                eos_token_ids.push(eot);
            }
        }
        let cfg = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: g.get_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: g.get_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: opt_u("attention.head_count_kv").map_or(heads, |v| v as usize),
            head_dim: opt_u("attention.key_length")
                .map_or(hidden_size / heads.max(1), |v| v as usize),
            rms_norm_eps: g
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_theta: g
                .get(&key("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0),
            max_position_embeddings: opt_u("context_length").map_or(4096, |v| v as usize),
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids,
            attention_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || self.head_dim == 0
        {
            return bad(format!("zero dimension in {self:?}"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// KV-cache bytes one token takes over all layers: 2 (K and V) * layers * kv_heads * head_dim
    /// * element size.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_hidden_layers
            * self.num_key_value_heads
            * self.head_dim
            * dtype.size_in_bytes()
    }

    /// Parameter count of the weights this config describes (tied embeddings counted once).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size as u64;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers as u64 * layer + h + lm_head
    }

    /// Query heads per KV head.
    pub fn num_queries_per_kv(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> ModelConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        ModelConfig::from_hf_config_json(&p).unwrap()
    }

    #[test]
    fn shipped_configs_match_their_public_sizes() {
        let q = shipped("qwen2.5-1.5b-instruct.json");
        assert_eq!(q.architecture, Architecture::Qwen2);
        assert_eq!((q.head_dim, q.num_key_value_heads), (128, 2));
        assert!(q.attention_bias && q.tie_word_embeddings);
        assert_eq!(q.sliding_window, None);
        assert_eq!(q.eos_token_ids, vec![151645]);
        assert_eq!(q.kv_bytes_per_token(DType::BF16), 28_672);
        assert_eq!(q.num_parameters() / 10_000_000, 154);

        let p = shipped("phi-3-mini-4k-instruct.json");
        assert_eq!(p.architecture, Architecture::Phi3);
        assert_eq!(p.head_dim, 96);
        assert!(!p.attention_bias && !p.tie_word_embeddings);
        assert_eq!(p.sliding_window, Some(2047));
        assert_eq!(p.kv_bytes_per_token(DType::BF16), 393_216);
        assert_eq!(p.num_parameters() / 10_000_000, 382);

        let c = shipped("codellama-34b.json");
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.num_queries_per_kv(), 8);
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.kv_bytes_per_token(DType::BF16), 196_608);
        assert_eq!(c.num_parameters() / 100_000_000, 337);
    }

    #[test]
    fn bad_configs_are_errors() {
        let dir = std::env::temp_dir().join(format!("cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(&p, r#"{"model_type":"gpt2","vocab_size":1,"hidden_size":1,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":1}"#).unwrap();
        assert!(matches!(
            ModelConfig::from_hf_config_json(&p),
            Err(ConfigError::UnsupportedArchitecture(_))
        ));
        std::fs::write(&p, r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#).unwrap();
        assert!(matches!(
            ModelConfig::from_hf_config_json(&p),
            Err(ConfigError::Invalid(_))
        ));
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            ModelConfig::from_hf_config_json(&p),
            Err(ConfigError::Json { .. })
        ));
        assert!(ModelConfig::from_hf_config_json(&dir.join("missing.json")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
