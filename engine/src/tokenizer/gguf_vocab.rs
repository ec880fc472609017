//! Builds a byte-level BPE `tokenizers::Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::TokenizerError;
use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Pre-tokenizer split of Qwen2 (llama.cpp pre type "qwen2").
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(super) struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos: bool,
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let arr = g
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| TokenizerError::Invalid(format!("GGUF has no `{key}` array")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| TokenizerError::Invalid(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn id(g: &GgufFile, key: &str) -> Option<u32> {
    g.get(key).and_then(GgufValue::as_u64).map(|v| v as u32)
}

pub(super) fn build(g: &GgufFile) -> Result<Built, TokenizerError> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.to_string()));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Invalid(format!("merge `{m}` is not a pair")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(TokenizerError::Invalid(
            "duplicate tokens in the vocabulary".into(),
        ));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(TokenizerError::tk)?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre: PreTokenizerWrapper = match g.get("tokenizer.ggml.pre").and_then(GgufValue::as_str) {
        // SmolLM: each digit on its own, then GPT-2's split.
        Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        Some("qwen2") => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::tk)?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into()
        }
        _ => byte_level.into(),
    };
    tk.with_pre_tokenizer(Some(pre));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    // Control and user-defined tokens match as whole units before BPE runs.
    let types: Vec<u64> = match g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![],
    };
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let Some(content) = tokens.get(i) else { break };
        match *t {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(content.to_string(), true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(content.to_string(), false)),
            _ => {}
        }
    }
    tk.add_special_tokens(&special);
    tk.add_tokens(&user);

    let bos_token_id = id(g, "tokenizer.ggml.bos_token_id");
    let mut eos_token_ids: Vec<u32> = id(g, "tokenizer.ggml.eos_token_id").into_iter().collect();
    if let Some(eot) = id(g, "tokenizer.ggml.eot_token_id") {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    let add_bos = matches!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(GgufValue::Bool(true))
    );
    Ok(Built {
        tokenizer: tk,
        bos_token_id,
        eos_token_ids,
        add_bos,
    })
}
