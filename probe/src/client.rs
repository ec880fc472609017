//! Streaming OpenAI-compatible client: sends one request, timestamps every SSE chunk on the run
//! clock and turns the outcome (success or failure) into exactly one `RequestRecord`.
//!
//! One `Client` wraps one shared `reqwest::Client` (connection pool), so it is cheap to clone and
//! meant to be shared by every concurrent request of a run.

use std::borrow::Cow;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::record::{ErrorKind, RequestError, RequestRecord};

/// Which OpenAI endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `/v1/chat/completions` (the prompt becomes one user message).
    #[default]
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

/// The prompt of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    /// Token ids (completions API only; vLLM and our engine accept them as `prompt`).
    Tokens(Vec<u32>),
}

/// What to ask the server for. `extra` is merged into the JSON body last (e.g. `ignore_eos`,
/// `min_tokens`, `seed`), so it can add or override any field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenRequest {
    pub api: Api,
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: u32,
    pub temperature: f32,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl GenRequest {
    /// A greedy request with no extra fields.
    pub fn greedy(api: Api, model: &str, prompt: &str, max_tokens: u32) -> Self {
        Self {
            api,
            model: model.to_string(),
            prompt: Prompt::Text(prompt.to_string()),
            max_tokens,
            temperature: 0.0,
            extra: serde_json::Map::new(),
        }
    }

    /// The streamed JSON body, with `stream_options.include_usage` on.
    pub fn body(&self) -> Result<Vec<u8>, ClientError> {
        let mut body = serde_json::Map::new();
        body.insert("model".into(), self.model.clone().into());
        match (self.api, &self.prompt) {
            (Api::Chat, Prompt::Text(t)) => {
                body.insert(
                    "messages".into(),
                    serde_json::json!([{ "role": "user", "content": t }]),
                );
            }
            (Api::Chat, Prompt::Tokens(_)) => return Err(ClientError::TokensNeedCompletions),
            (Api::Completions, Prompt::Text(t)) => {
                body.insert("prompt".into(), t.clone().into());
            }
            (Api::Completions, Prompt::Tokens(ids)) => {
                body.insert("prompt".into(), serde_json::json!(ids));
            }
        }
        body.insert("max_tokens".into(), self.max_tokens.into());
        body.insert("temperature".into(), f64::from(self.temperature).into());
        body.insert("stream".into(), true.into());
        body.insert(
            "stream_options".into(),
            serde_json::json!({ "include_usage": true }),
        );
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&body).map_err(|e| ClientError::Body(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("could not build the HTTP client: {0}")]
    Build(String),
    #[error("token-id prompts need the completions API")]
    TokensNeedCompletions,
    #[error("could not encode the request body: {0}")]
    Body(String),
}

/// Connection settings of a `Client`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Whole-request limit (connect to `[DONE]`); None = no limit.
    pub request_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
    /// Idle connections kept per host (raise for high-concurrency benchmarks).
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Some(Duration::from_secs(600)),
            connect_timeout: Duration::from_secs(10),
            api_key: None,
            pool_max_idle_per_host: 1024,
        }
    }
}

/// A shared streaming client bound to one server and one run clock.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    clock: Clock,
    opts: ClientOptions,
}

impl Client {
    /// `base_url` is the server root (`http://host:port`); a trailing `/v1` or `/` is accepted.
    pub fn new(base_url: &str, clock: Clock, opts: ClientOptions) -> Result<Self, ClientError> {
        let trimmed = base_url.trim_end_matches('/');
        let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let parsed = reqwest::Url::parse(&trimmed).map_err(|e| ClientError::BadUrl {
            url: base_url.to_string(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ClientError::BadUrl {
                url: base_url.to_string(),
                reason: "scheme must be http or https".into(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .pool_max_idle_per_host(opts.pool_max_idle_per_host)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            http,
            base_url: trimmed,
            clock,
            opts,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The underlying HTTP client, for plain GETs/POSTs (health, metrics, admin routes).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Sends `req` now and streams it to the end. Never fails: errors land in `record.error`.
    pub async fn stream(
        &self,
        req: &GenRequest,
        index: usize,
        label: &str,
        scheduled_s: f64,
    ) -> RequestRecord {
        match req.body() {
            Ok(body) => {
                self.stream_body(req.api, body, index, label, scheduled_s)
                    .await
            }
            Err(e) => {
                let now = self.clock.now_s();
                RequestRecord {
                    index,
                    label: label.to_string(),
                    scheduled_s,
                    sent_s: now,
                    end_s: now,
                    error: Some(RequestError {
                        kind: ErrorKind::Protocol,
                        message: e.to_string(),
                        status: None,
                    }),
                    ..Default::default()
                }
            }
        }
    }

    /// Like `stream`, with a body already encoded (see `GenRequest::body`); lets a load generator
    /// encode all bodies before the timed run.
    pub async fn stream_body(
        &self,
        api: Api,
        body: Vec<u8>,
        index: usize,
        label: &str,
        scheduled_s: f64,
    ) -> RequestRecord {
        let mut rec = RequestRecord {
            index,
            label: label.to_string(),
            scheduled_s,
            ..Default::default()
        };
        rec.sent_s = self.clock.now_s();
        let run = self.run(api, body, &mut rec);
        let outcome = match self.opts.request_timeout {
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(r) => r,
                Err(_) => Err(RequestError {
                    kind: ErrorKind::Timeout,
                    message: format!("no [DONE] within {:.3} s", limit.as_secs_f64()),
                    status: None,
                }),
            },
            None => run.await,
        };
        rec.end_s = self.clock.now_s();
        rec.error = outcome.err();
        rec
    }

    async fn run(
        &self,
        api: Api,
        body: Vec<u8>,
        rec: &mut RequestRecord,
    ) -> Result<(), RequestError> {
        let mut builder = self
            .http
            .post(self.url(api.path()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .body(body);
        if let Some(key) = &self.opts.api_key {
            builder = builder.bearer_auth(key);
        }
        let resp = builder.send().await.map_err(request_error)?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(RequestError {
                kind: ErrorKind::HttpStatus,
                message: error_message(&text),
                status: Some(status.as_u16()),
            });
        }
        let mut parser = SseParser::default();
        let mut stream = resp.bytes_stream();
        while let Some(item) = stream.next().await {
            let bytes = item.map_err(|e| RequestError {
                kind: ErrorKind::Protocol,
                message: format!("stream broke before [DONE]: {}", error_chain(&e)),
                status: None,
            })?;
            let at = self.clock.now_s();
            let mut failure = None;
            let done = parser.feed(&bytes, |data| {
                if failure.is_none() {
                    if let Err(e) = apply_event(data, at, api, rec) {
                        failure = Some(e);
                    }
                }
            });
            if let Some(e) = failure {
                return Err(e);
            }
            if done {
                return Ok(());
            }
        }
        Err(RequestError {
            kind: ErrorKind::Protocol,
            message: "stream ended without [DONE]".into(),
            status: None,
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn request_error(e: reqwest::Error) -> RequestError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connect
    };
    RequestError {
        kind,
        message: error_chain(&e),
        status: None,
    }
}

/// The human message of an error body: OpenAI `{"error":{"message"}}`, vLLM `{"message"}`, or
/// the raw text (truncated).
pub fn error_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let msg = v
            .pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .and_then(|m| m.as_str());
        if let Some(m) = msg {
            return m.to_string();
        }
    }
    let t = body.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

#[derive(Deserialize)]
struct ChunkWire<'a> {
    #[serde(borrow, default)]
    choices: Vec<ChoiceWire<'a>>,
    #[serde(default)]
    usage: Option<UsageWire>,
    /// llama-server puts its timings at the top level of the last chunk.
    #[serde(default)]
    timings: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChoiceWire<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<DeltaWire<'a>>,
}

#[derive(Deserialize)]
struct DeltaWire<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UsageWire {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetailsWire>,
    timings: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PromptDetailsWire {
    cached_tokens: Option<u64>,
}

/// Applies one SSE `data:` payload (not `[DONE]`) to the record.
fn apply_event(
    data: &[u8],
    at: f64,
    api: Api,
    rec: &mut RequestRecord,
) -> Result<(), RequestError> {
    let chunk: ChunkWire = serde_json::from_slice(data).map_err(|e| RequestError {
        kind: ErrorKind::Protocol,
        message: format!(
            "malformed SSE data ({e}): {}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        ),
        status: None,
    })?;
    if let Some(err) = chunk.error {
        let text = err.to_string();
        return Err(RequestError {
            kind: ErrorKind::Protocol,
            message: format!("server error in stream: {}", error_message(&text)),
            status: None,
        });
    }
    let mut got_text = false;
    if let Some(choice) = chunk.choices.first() {
        let piece = match api {
            Api::Completions => choice.text.as_deref(),
            Api::Chat => choice
                .delta
                .as_ref()
                .and_then(|d| d.content.as_deref().or(d.reasoning_content.as_deref())),
        };
        if let Some(p) = piece.filter(|p| !p.is_empty()) {
            rec.text.push_str(p);
            got_text = true;
        }
    }
    if got_text {
        rec.chunk_times_s.push(at);
    }
    if let Some(u) = chunk.usage {
        rec.prompt_tokens = u.prompt_tokens.or(rec.prompt_tokens);
        rec.completion_tokens = u.completion_tokens.or(rec.completion_tokens);
        if let Some(c) = u.prompt_tokens_details.and_then(|d| d.cached_tokens) {
            rec.cached_tokens = Some(c);
        }
        if u.timings.is_some() {
            rec.server_timings = u.timings;
        }
    }
    if chunk.timings.is_some() && rec.server_timings.is_none() {
        rec.server_timings = chunk.timings;
    }
    Ok(())
}

/// Incremental Server-Sent-Events parser: feed it bytes as they arrive, in any split.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, incomplete line.
    line: Vec<u8>,
    /// `data:` lines of the current event, joined by '\n'.
    data: Vec<u8>,
    has_data: bool,
    done: bool,
}

impl SseParser {
    /// Feeds bytes; calls `on_data` with each complete event's data (except `[DONE]`).
    /// Returns true once `[DONE]` was seen (later bytes are ignored).
    pub fn feed(&mut self, mut bytes: &[u8], mut on_data: impl FnMut(&[u8])) -> bool {
        while !self.done && !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let (head, rest) = bytes.split_at(nl);
                    bytes = &rest[1..];
                    if self.line.is_empty() {
                        self.line_done(head, &mut on_data);
                    } else {
                        self.line.extend_from_slice(head);
                        let line = std::mem::take(&mut self.line);
                        self.line_done(&line, &mut on_data);
                        self.line = line;
                        self.line.clear();
                    }
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
        }
        self.done
    }

    pub fn done(&self) -> bool {
        self.done
    }

    fn line_done(&mut self, line: &[u8], on_data: &mut impl FnMut(&[u8])) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                if self.data == b"[DONE]" {
                    self.done = true;
                } else {
                    on_data(&self.data);
                }
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

/// The first model id the server lists at `GET /v1/models` (what to send when none was given).
pub async fn served_model(http: &reqwest::Client, base_url: &str) -> Option<String> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let r = http
        .get(url)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v.pointer("/data/0/id")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(parts: &[&[u8]]) -> (Vec<String>, bool) {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut done = false;
        for part in parts {
            done = p.feed(part, |d| out.push(String::from_utf8_lossy(d).into_owned()));
        }
        (out, done)
    }

    #[test]
    fn sse_events_split_anywhere_parse_the_same() {
        let whole = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        let (ev, done) = collect(&[whole]);
        assert_eq!(ev, vec!["{\"a\":1}", "{\"b\":2}"]);
        assert!(done);
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(collect(&[a, b]), (ev.clone(), true), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(collect(&bytes), (ev, true));
    }

    #[test]
    fn sse_multiline_data_and_missing_done() {
        let (ev, done) = collect(&[b"event: x\ndata: a\ndata: b\n\ndata: c"]);
        assert_eq!(ev, vec!["a\nb"]);
        assert!(!done, "no [DONE] and an unfinished event");
    }

    #[test]
    fn chunk_application_records_text_usage_and_timings() {
        let mut rec = RequestRecord::default();
        apply_event(
            br#"{"choices":[{"delta":{"role":"assistant"}}]}"#,
            1.0,
            Api::Chat,
            &mut rec,
        )
        .unwrap();
        apply_event(
            br#"{"choices":[{"delta":{"content":"Hi"}}]}"#,
            1.5,
            Api::Chat,
            &mut rec,
        )
        .unwrap();
        apply_event(
            br#"{"choices":[{"delta":{"content":" \"x\""}}]}"#,
            2.0,
            Api::Chat,
            &mut rec,
        )
        .unwrap();
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,
            "prompt_tokens_details":{"cached_tokens":4},"timings":{"prefill_s":0.01}}}"#;
        apply_event(usage, 2.1, Api::Chat, &mut rec).unwrap();
        assert_eq!(rec.text, "Hi \"x\"");
        assert_eq!(rec.chunk_times_s, vec![1.5, 2.0]);
        assert_eq!(rec.prompt_tokens, Some(7));
        assert_eq!(rec.completion_tokens, Some(2));
        assert_eq!(rec.cached_tokens, Some(4));
        assert_eq!(rec.server_timings.unwrap()["prefill_s"], 0.01);
        let mut c = RequestRecord::default();
        apply_event(
            br#"{"choices":[{"text":"ok"}]}"#,
            3.0,
            Api::Completions,
            &mut c,
        )
        .unwrap();
        assert_eq!((c.text.as_str(), c.chunk_times_s.len()), ("ok", 1));
        let e = apply_event(b"{not json", 1.0, Api::Chat, &mut c).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(r#"{"error":{"message":"too long","type":"x"}}"#),
            "too long"
        );
        assert_eq!(
            error_message(r#"{"object":"error","message":"bad"}"#),
            "bad"
        );
        assert_eq!(error_message("plain failure\n"), "plain failure");
    }

    #[test]
    fn bodies_follow_the_api() {
        let chat = GenRequest::greedy(Api::Chat, "m", "hi", 4);
        let v: serde_json::Value = serde_json::from_slice(&chat.body().unwrap()).unwrap();
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["stream_options"]["include_usage"], true);
        let mut comp = GenRequest::greedy(Api::Completions, "m", "hi", 4);
        comp.extra.insert("ignore_eos".into(), true.into());
        let v: serde_json::Value = serde_json::from_slice(&comp.body().unwrap()).unwrap();
        assert_eq!(
            (v["prompt"].as_str(), v["ignore_eos"].as_bool()),
            (Some("hi"), Some(true))
        );
        comp.prompt = Prompt::Tokens(vec![1, 2]);
        comp.api = Api::Chat;
        assert!(comp.body().is_err());
        assert!(Client::new("ftp://x", Clock::start(), ClientOptions::default()).is_err());
        let c = Client::new("http://h:1/v1/", Clock::start(), ClientOptions::default()).unwrap();
        assert_eq!(c.url("/health"), "http://h:1/health");
    }
}
