//! Text <-> token ids for a served model: GGUF vocabularies or tokenizer.json, chat templates,
//! and streaming detokenization.

mod chat;
mod gguf_vocab;
mod incremental;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use chat::{ChatMessage, ChatTemplate};
pub use incremental::IncrementalDecoder;

use crate::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("no tokenizer found at {0} (expected a .gguf file, tokenizer.json, or a directory with one)")]
    NotFound(PathBuf),
    #[error("unsupported GGUF tokenizer model `{0}` (supported: gpt2)")]
    UnsupportedModel(String),
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("token id {id} out of the vocabulary ({vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
}

impl TokenizerError {
    fn tk(e: tokenizers::Error) -> Self {
        Self::Tokenizers(e.to_string())
    }
}

/// A model's tokenizer plus its special tokens and chat template. Cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    /// Prepend BOS when encoding with special tokens (GGUF `add_bos_token`); tokenizer.json
    /// files do this through their own post-processor instead.
    add_bos: bool,
    chat_template: ChatTemplate,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl Tokenizer {
    /// From a GGUF file's vocabulary, a tokenizer.json file, or a directory holding tokenizer.json.
    pub fn from_model_path(p: &Path) -> Result<Self, TokenizerError> {
        if p.is_dir() {
            let json = p.join("tokenizer.json");
            if json.is_file() {
                return Self::from_tokenizer_json(&json);
            }
            return Err(TokenizerError::NotFound(p.to_path_buf()));
        }
        if !p.exists() {
            return Err(TokenizerError::NotFound(p.to_path_buf()));
        }
        if p.extension().is_some_and(|e| e == "gguf") {
            return Self::from_gguf(&GgufFile::open(p)?);
        }
        if p.extension().is_some_and(|e| e == "json") {
            return Self::from_tokenizer_json(p);
        }
        Err(TokenizerError::NotFound(p.to_path_buf()))
    }

    /// From the vocabulary, merges and chat template stored in GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let built = gguf_vocab::build(g)?;
        let chat_template = match g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => ChatTemplate::new(src)?,
            None => ChatTemplate::chatml(),
        };
        let inner = Arc::new(built.tokenizer);
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let chat_template = chat_template.with_special_tokens(
            name(built.bos_token_id),
            name(built.eos_token_ids.first().copied()),
        );
        Ok(Self {
            inner,
            bos_token_id: built.bos_token_id,
            eos_token_ids: built.eos_token_ids,
            add_bos: built.add_bos,
            chat_template,
        })
    }

    /// From a Hugging Face tokenizer.json; special tokens and the chat template come from the
    /// tokenizer_config.json next to it when present.
    pub fn from_tokenizer_json(p: &Path) -> Result<Self, TokenizerError> {
        if !p.is_file() {
            return Err(TokenizerError::NotFound(p.to_path_buf()));
        }
        let inner = tokenizers::Tokenizer::from_file(p).map_err(TokenizerError::tk)?;
        let config_path = p.with_file_name("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|source| TokenizerError::Io {
                    path: config_path.clone(),
                    source,
                })?;
            serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Invalid(format!("{}: {e}", config_path.display())))?
        } else {
            serde_json::Value::Null
        };
        let token_name = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos_name = token_name("bos_token");
        let eos_name = token_name("eos_token");
        let bos_token_id = bos_name.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_token_ids: Vec<u32> = eos_name
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        let template_src = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default" or the first.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match template_src {
            Some(src) => ChatTemplate::new(&src)?,
            None => ChatTemplate::chatml(),
        }
        .with_special_tokens(bos_name, eos_name);
        Ok(Self {
            inner: Arc::new(inner),
            bos_token_id,
            eos_token_ids,
            add_bos: false,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(TokenizerError::tk)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|i| **i as usize >= vocab_size) {
            return Err(TokenizerError::UnknownId { id, vocab_size });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::tk)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Render the model's chat template (Hugging Face conventions).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.chat_template.render(messages, add_generation_prompt)
    }

    /// A streaming detokenizer (skips special tokens, as responses do).
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), true)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

#[cfg(test)]
mod tests;
