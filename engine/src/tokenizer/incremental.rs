//! Streaming detokenization: text deltas per generated token, never splitting a UTF-8 character.

use super::Tokenizer;

/// Turns a stream of token ids into text deltas. The concatenation of every `push` result plus
/// `flush` equals `decode(all ids)`.
///
/// Same scheme as vLLM's detokenizer: decode a short window before the new tokens (so tokenizers
/// that treat the first token specially agree with a full decode) and emit what the window gained,
/// holding back while the tail is an incomplete character (U+FFFD).
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the ids whose text was already emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Text of the window up to `end`. Ids outside the vocabulary (a model's padded logits
    /// rows) decode to nothing, as in a full decode by the underlying tokenizer.
    fn window_text(&self, end: usize) -> String {
        self.tokenizer
            .inner
            .decode(&self.ids[self.prefix_offset..end], self.skip_special_tokens)
            .unwrap_or_default()
    }

    /// Add one token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let prefix = self.window_text(self.read_offset);
        let full = self.window_text(self.ids.len());
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
            && full.starts_with(&prefix)
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Some(delta);
        }
        None
    }

    /// Text still held back (an incomplete character at the end), decoded as a full decode would.
    pub fn flush(&mut self) -> Option<String> {
        if self.read_offset == self.ids.len() {
            return None;
        }
        let prefix = self.window_text(self.read_offset);
        let full = self.window_text(self.ids.len());
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        let delta = match full.strip_prefix(&prefix) {
            Some(d) => d.to_string(),
            None => full,
        };
        (!delta.is_empty()).then_some(delta)
    }
}
