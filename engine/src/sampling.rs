//! Token sampling from logits: greedy, temperature, top-k, top-p, seeded per request.

/// Per-request sampling settings (already validated by `api`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0.0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or negative = disabled.
    pub top_k: i32,
    pub seed: Option<u64>,
    /// Generation stops at these token ids (EOS is added by `api` unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Stop strings are matched by `api` on the detokenized text; the core stops on token ids only.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}
