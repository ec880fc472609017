//! Turns untrusted request fields into checked sampling params, prompts and stop strings.

use super::error::ApiError;
use super::protocol::{ChatMessageIn, CommonParams, StopSpec};
use crate::sampling::SamplingParams;
use serde_json::Value;

/// What a validated request asks of the engine besides the prompt tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParams {
    pub sampling: SamplingParams,
    /// Stop strings, matched on detokenized text by the API.
    pub stop: Vec<String>,
    pub priority: i32,
    pub stream: bool,
    pub include_usage: bool,
}

/// Which endpoint a request came from (defaults and messages differ slightly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// The model name a request asked for must be the served one (omitted = the served one).
pub fn check_model(requested: Option<&str>, served: &str) -> Result<(), ApiError> {
    match requested {
        None => Ok(()),
        Some(m) if m == served => Ok(()),
        Some(m) => Err(ApiError::model_not_found(m, served)),
    }
}

/// A completion prompt: text to tokenize, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// Read `prompt`: a string, a token-id array, or a one-element batch of either.
pub fn parse_prompt(prompt: Option<&Value>, vocab_size: usize) -> Result<PromptInput, ApiError> {
    let bad = |m: &str| ApiError::bad_request(m, Some("prompt"));
    let p = prompt.ok_or_else(|| bad("`prompt` is required"))?;
    let p = match p {
        Value::Array(items)
            if items.len() == 1 && (items[0].is_string() || items[0].is_array()) =>
        {
            &items[0]
        }
        Value::Array(items) if items.len() > 1 && items.iter().all(|i| !i.is_number()) => {
            return Err(bad(
                "only one prompt per request is supported (n=1, no batches)",
            ));
        }
        other => other,
    };
    match p {
        Value::String(s) if s.is_empty() => Err(bad("`prompt` must not be empty")),
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.is_empty() => Err(bad("`prompt` must not be empty")),
        Value::Array(items) => {
            let mut ids = Vec::with_capacity(items.len());
            for it in items {
                let id = it
                    .as_u64()
                    .filter(|&v| (v as usize) < vocab_size)
                    .ok_or_else(|| {
                        bad(&format!(
                            "`prompt` token ids must be integers in [0, {vocab_size}), got {it}"
                        ))
                    })?;
                ids.push(id as u32);
            }
            Ok(PromptInput::Tokens(ids))
        }
        other => Err(bad(&format!(
            "`prompt` must be a string or an array of token ids, got {}",
            json_kind(other)
        ))),
    }
}

/// Chat messages as (role, text): content strings or text parts, joined.
pub fn parse_messages(messages: &[ChatMessageIn]) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |m: String| ApiError::bad_request(m, Some("messages"));
    if messages.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(bad(format!(
                "messages[{i}].role `{}` is not one of system, user, assistant, developer, tool",
                m.role
            )));
        }
        let text = match &m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] must be {{\"type\":\"text\",\"text\":...}} (only text is supported)"
                            )))
                        }
                    }
                }
                text
            }
            Some(other) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list of text parts, got {}",
                    json_kind(other)
                )))
            }
        };
        out.push((m.role.clone(), text));
    }
    Ok(out)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Check sampling values and the context limit for a prompt of `prompt_len` tokens.
pub fn validate_params(
    p: &CommonParams,
    endpoint: Endpoint,
    prompt_len: usize,
    max_model_len: usize,
    eos_token_ids: &[u32],
) -> Result<ValidParams, ApiError> {
    let bad = |m: String, param: &str| ApiError::bad_request(m, Some(param));
    if prompt_len == 0 {
        return Err(bad("the prompt has no tokens".into(), "prompt"));
    }
    if let Some(n) = p.n {
        if n != 1 {
            return Err(bad(
                format!("n must be 1 (got {n}): one choice per request"),
                "n",
            ));
        }
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(bad(
            format!("temperature must be >= 0, got {temperature}"),
            "temperature",
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("top_p must be in (0, 1], got {top_p}"),
            "top_p",
        ));
    }
    let top_k = p.top_k.unwrap_or(-1);
    if top_k < -1 || top_k > i32::MAX as i64 {
        return Err(bad(
            format!("top_k must be -1 (disabled) or >= 0, got {top_k}"),
            "top_k",
        ));
    }
    let (max_tokens, param) = match (p.max_completion_tokens, p.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, v) => (v, "max_tokens"),
    };
    let what = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if prompt_len >= max_model_len && max_tokens.is_none() {
        return Err(bad(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input {what}."
            ),
            what,
        )
        .with_code("context_length_exceeded"));
    }
    let max_tokens = match max_tokens {
        Some(v) if v < 1 => return Err(bad(format!("{param} must be at least 1, got {v}"), param)),
        Some(v) => v as u64,
        None => match endpoint {
            Endpoint::Completions => 16.min((max_model_len - prompt_len) as u64),
            Endpoint::Chat => (max_model_len - prompt_len) as u64,
        },
    };
    let requested = prompt_len as u64 + max_tokens;
    if requested > max_model_len as u64 {
        return Err(bad(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {requested} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or completion."
            ),
            what,
        )
        .with_code("context_length_exceeded"));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let mut stop_token_ids = p.stop_token_ids.clone().unwrap_or_default();
    if !p.ignore_eos {
        for &e in eos_token_ids {
            if !stop_token_ids.contains(&e) {
                stop_token_ids.push(e);
            }
        }
    }
    Ok(ValidParams {
        sampling: SamplingParams {
            max_tokens: max_tokens as usize,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k as i32,
            seed: p.seed.map(|s| s as u64),
            stop_token_ids,
            ignore_eos: p.ignore_eos,
        },
        stop,
        priority: p.priority.unwrap_or(0),
        stream: p.stream,
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What `StopMatcher::push` lets out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutput {
    /// Text safe to send now.
    pub text: String,
    /// The stop string that matched (generation must end, text after it is dropped).
    pub stopped_on: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> StopOutput {
        if self.stops.is_empty() {
            return StopOutput {
                text: delta.to_owned(),
                stopped_on: None,
            };
        }
        self.pending.push_str(delta);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|pos| (pos, s)))
            .min_by_key(|(pos, _)| *pos);
        if let Some((pos, s)) = earliest {
            let text = self.pending[..pos].to_owned();
            let stopped_on = Some(s.clone());
            self.pending.clear();
            return StopOutput { text, stopped_on };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let text = self.pending[..hold_from].to_owned();
        self.pending.drain(..hold_from);
        StopOutput {
            text,
            stopped_on: None,
        }
    }

    /// Generation ended without a stop string: release what was held back.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> CommonParams {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn prompt_forms() {
        assert_eq!(
            parse_prompt(Some(&json!("hi")), 10).unwrap(),
            PromptInput::Text("hi".into())
        );
        assert_eq!(
            parse_prompt(Some(&json!([1, 2])), 10).unwrap(),
            PromptInput::Tokens(vec![1, 2])
        );
        assert_eq!(
            parse_prompt(Some(&json!([[3]])), 10).unwrap(),
            PromptInput::Tokens(vec![3])
        );
        assert_eq!(
            parse_prompt(Some(&json!(["x"])), 10).unwrap(),
            PromptInput::Text("x".into())
        );
        for bad in [
            json!(""),
            json!([]),
            json!([1, -2]),
            json!([10]),
            json!(5),
            json!(["a", "b"]),
        ] {
            let e = parse_prompt(Some(&bad), 10).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert_eq!(e.param.as_deref(), Some("prompt"));
        }
        assert!(parse_prompt(None, 10)
            .unwrap_err()
            .message
            .contains("required"));
    }

    #[test]
    fn messages_forms() {
        let m: Vec<ChatMessageIn> = serde_json::from_value(json!([
            {"role":"system","content":"s"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}
        ]))
        .unwrap();
        assert_eq!(
            parse_messages(&m).unwrap(),
            vec![("system".into(), "s".into()), ("user".into(), "ab".into())]
        );
        assert!(parse_messages(&[]).is_err());
        let bad: Vec<ChatMessageIn> =
            serde_json::from_value(json!([{"role":"wizard","content":"x"}])).unwrap();
        assert!(parse_messages(&bad).unwrap_err().message.contains("wizard"));
        let img: Vec<ChatMessageIn> =
            serde_json::from_value(json!([{"role":"user","content":[{"type":"image_url"}]}]))
                .unwrap();
        assert!(parse_messages(&img).is_err());
    }

    #[test]
    fn defaults_and_eos() {
        let v = validate_params(&params(json!({})), Endpoint::Completions, 5, 100, &[2]).unwrap();
        assert_eq!(v.sampling.max_tokens, 16);
        assert_eq!(v.sampling.temperature, 1.0);
        assert_eq!(v.sampling.stop_token_ids, vec![2]);
        let c = validate_params(&params(json!({})), Endpoint::Chat, 5, 100, &[2]).unwrap();
        assert_eq!(c.sampling.max_tokens, 95);
        let i = validate_params(
            &params(json!({"ignore_eos":true,"max_completion_tokens":7,"max_tokens":9,"stop":"x"})),
            Endpoint::Chat,
            5,
            100,
            &[2],
        )
        .unwrap();
        assert!(i.sampling.stop_token_ids.is_empty());
        assert_eq!(i.sampling.max_tokens, 7);
        assert_eq!(i.stop, vec!["x".to_string()]);
    }

    #[test]
    fn bad_sampling_values() {
        for (body, param) in [
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"n": 2}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"top_k": -5}), "top_k"),
        ] {
            let e = validate_params(&params(body.clone()), Endpoint::Completions, 3, 100, &[])
                .unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn context_limit_message_names_the_numbers() {
        let e = validate_params(
            &params(json!({"max_tokens": 100})),
            Endpoint::Chat,
            2000,
            2048,
            &[],
        )
        .unwrap_err();
        assert_eq!(e.message, "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (2000 in the messages, 100 in the completion). Please reduce the length of the messages or completion.");
        assert_eq!(e.code, Some("context_length_exceeded"));
        let e = validate_params(&params(json!({})), Endpoint::Completions, 2048, 2048, &[])
            .unwrap_err();
        assert!(e.message.contains("maximum context length is 2048 tokens"));
        // Exactly at the limit is fine.
        validate_params(
            &params(json!({"max_tokens": 48})),
            Endpoint::Chat,
            2000,
            2048,
            &[],
        )
        .unwrap();
    }

    #[test]
    fn stop_matcher_trims_and_holds_back() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("Hello").text, "Hello");
        let o = m.push(" wor\n");
        assert_eq!(o.text, " wor");
        assert_eq!(o.stopped_on, None);
        let o = m.push("ld E");
        assert_eq!(o.text, "\nld ");
        let o = m.push("NDtail");
        assert_eq!(o.text, "");
        assert_eq!(o.stopped_on.as_deref(), Some("END"));

        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa").text, "x");
        assert_eq!(m.flush(), "a");

        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caféé").text, "café");
        let o = m.push("!x");
        assert_eq!((o.text.as_str(), o.stopped_on.as_deref()), ("", Some("é!")));

        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("abc").text, "abc");
    }
}
