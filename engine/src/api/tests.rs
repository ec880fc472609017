//! Route tests against a real HTTP server on 127.0.0.1:0 with a scripted engine and a byte codec.

use super::generate::{EngineClient, IncrementalDecode, TextCodec};
use super::server::{router, ApiState, Served};
use crate::core::{EngineRequest, FinishReason, RequestEvent, RequestTimings};
use crate::launch::{StartupPhases, StartupReport};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

const EOS: u32 = 3;

/// Replies with `reply` one byte-token per `delay`, then EOS (unless ignore_eos) or length.
struct ScriptedEngine {
    reply: &'static str,
    delay: Duration,
    aborted: Mutex<Vec<String>>,
    running: Arc<AtomicUsize>,
    last_request: Mutex<Option<EngineRequest>>,
}

impl EngineClient for ScriptedEngine {
    fn add_request(&self, request: EngineRequest) -> mpsc::UnboundedReceiver<RequestEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tokens: Vec<u32> = self.reply.bytes().map(u32::from).collect();
        tokens.push(EOS);
        let delay = self.delay;
        let running = self.running.clone();
        running.fetch_add(1, Ordering::SeqCst);
        let prompt_tokens = request.prompt_token_ids.len();
        let max_tokens = request.sampling.max_tokens;
        let stop_ids = request.sampling.stop_token_ids.clone();
        *self.last_request.lock().unwrap() = Some(request);
        tokio::spawn(async move {
            let mut n = 0;
            let mut reason = FinishReason::Length;
            for t in tokens {
                tokio::time::sleep(delay).await;
                if tx.is_closed() {
                    running.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                n += 1;
                let _ = tx.send(RequestEvent::Tokens { token_ids: vec![t] });
                if stop_ids.contains(&t) {
                    reason = FinishReason::Stop;
                    break;
                }
                if n == max_tokens {
                    break;
                }
            }
            let _ = tx.send(RequestEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens: n,
                cached_tokens: 0,
                timings: RequestTimings {
                    queued_s: 0.001,
                    ..Default::default()
                },
            });
            running.fetch_sub(1, Ordering::SeqCst);
        });
        rx
    }

    fn abort(&self, request_id: &str) {
        self.aborted.lock().unwrap().push(request_id.to_owned());
    }

    fn render_metrics(&self) -> String {
        format!(
            "vllm:num_requests_running {}\n",
            self.running.load(Ordering::SeqCst)
        )
    }
}

struct ByteCodec;
struct ByteDecoder;

impl IncrementalDecode for ByteDecoder {
    fn push(&mut self, token_id: u32) -> Option<String> {
        char::from_u32(token_id).map(String::from)
    }
}

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        let text: String = messages
            .iter()
            .map(|(r, c)| format!("{r}: {c}\n"))
            .collect();
        self.encode(&text)
    }
    fn decoder(&self) -> Box<dyn IncrementalDecode> {
        Box::new(ByteDecoder)
    }
    fn vocab_size(&self) -> usize {
        256
    }
}

struct Harness {
    base: String,
    engine: Arc<ScriptedEngine>,
    state: Arc<ApiState>,
    client: reqwest::Client,
}

async fn serve(api_key: Option<&str>, ready: bool, delay_ms: u64) -> Harness {
    let engine = Arc::new(ScriptedEngine {
        reply: "Hello world",
        delay: Duration::from_millis(delay_ms),
        aborted: Mutex::default(),
        running: Arc::default(),
        last_request: Mutex::default(),
    });
    let state = ApiState::new("tiny".into(), api_key.map(str::to_owned));
    if ready {
        state.set_ready(served(engine.clone()));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Harness {
        base,
        engine,
        state,
        client: reqwest::Client::new(),
    }
}

fn served(engine: Arc<ScriptedEngine>) -> Served {
    Served {
        engine,
        codec: Arc::new(ByteCodec),
        max_model_len: 64,
        eos_token_ids: vec![EOS],
        startup: StartupReport {
            model: "tiny-model".into(),
            served_model_name: "tiny".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            tensor_parallel_size: 1,
            load_format: "dummy".into(),
            phases: StartupPhases::default(),
            weights_bytes: 1,
            kv_cache_bytes: 2,
            kv_cache_tokens: 64,
            num_gpu_blocks: 4,
            block_size: 16,
            max_model_len: 64,
            max_concurrency: 1.0,
        },
    }
}

impl Harness {
    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POST a streaming request and split the body into `data:` payloads.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let text = r.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
        text.split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| f.strip_prefix("data: ").expect(f).to_owned())
            .collect()
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_in_message: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"));
    assert!(
        msg.contains(want_in_message),
        "{msg:?} lacks {want_in_message:?}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn completion_non_stream_returns_text_and_usage() {
    let h = serve(None, true, 0).await;
    let (s, v) = h
        .post(
            "/v1/completions",
            r#"{"model":"tiny","prompt":"abc","max_tokens":50}"#,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], 15);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["usage"]["timings"]["queued_s"], 0.001);
    let (s, v) = h
        .post("/v1/completions", r#"{"prompt":[104,105],"max_tokens":5}"#)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn chat_stream_frames_role_content_finish_usage_done() {
    let h = serve(None, true, 1).await;
    let frames = h
        .stream(
            "/v1/chat/completions",
            json!({"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":true,
                   "stream_options":{"include_usage":true}}),
        )
        .await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello world");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert_eq!(usage["usage"]["prompt_tokens"], "user: hi\n".len());
}

#[tokio::test]
async fn completion_stream_without_usage_has_no_usage_chunk() {
    let h = serve(None, true, 0).await;
    let frames = h
        .stream(
            "/v1/completions",
            json!({"prompt":"x","stream":true,"max_tokens":3}),
        )
        .await;
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "Hel");
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none() && c["choices"].as_array().unwrap().len() == 1));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn stop_string_is_trimmed_and_aborts() {
    let h = serve(None, true, 0).await;
    let (s, v) = h
        .post(
            "/v1/completions",
            r#"{"prompt":"abc","max_tokens":50,"stop":[" wor","zzz"]}"#,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], " wor");
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(h.engine.aborted.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn sampling_fields_reach_the_engine() {
    let h = serve(None, true, 0).await;
    let (s, _) = h
        .post(
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"q"}],"temperature":0,"top_p":0.5,"top_k":4,"seed":9,"priority":2,"ignore_eos":true,"max_completion_tokens":4}"#,
        )
        .await;
    assert_eq!(s, 200);
    let r = h.engine.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(r.sampling.temperature, 0.0);
    assert_eq!(r.sampling.top_p, 0.5);
    assert_eq!(r.sampling.top_k, 4);
    assert_eq!(r.sampling.seed, Some(9));
    assert_eq!(r.sampling.max_tokens, 4);
    assert!(r.sampling.ignore_eos && r.sampling.stop_token_ids.is_empty());
    assert_eq!(r.priority, 2);
}

#[tokio::test]
async fn bad_inputs_get_openai_errors_and_server_keeps_answering() {
    let h = serve(None, true, 0).await;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/completions", "{not json", 400, "invalid request body"),
        ("/v1/chat/completions", r#"{"model":"tiny"}"#, 400, "messages"),
        ("/v1/completions", r#"{"model":"tiny"}"#, 400, "`prompt` is required"),
        ("/v1/completions", r#"{"model":"gpt-4","prompt":"a"}"#, 404, "gpt-4"),
        ("/v1/completions", r#"{"prompt":""}"#, 400, "must not be empty"),
        ("/v1/completions", r#"{"prompt":"a","temperature":-1}"#, 400, "temperature"),
        ("/v1/completions", r#"{"prompt":"a","top_p":1.5}"#, 400, "top_p"),
        ("/v1/completions", r#"{"prompt":"a","n":2}"#, 400, "n must be 1"),
        ("/v1/completions", r#"{"prompt":"a","max_tokens":0}"#, 400, "max_tokens"),
        ("/v1/completions", r#"{"prompt":"a","max_tokens":"many"}"#, 400, "invalid"),
        ("/v1/completions", r#"{"prompt":"abcd","max_tokens":61}"#, 400,
         "maximum context length is 64 tokens. However, you requested 65 tokens (4 in the prompt, 61 in the completion)"),
        ("/v1/chat/completions", r#"{"messages":[]}"#, 400, "must not be empty"),
        ("/v1/nothing", "{}", 404, "No route"),
    ];
    for (path, body, status, msg) in cases {
        let (s, v) = h.post(path, body).await;
        assert_error(s, &v, *status, msg);
    }
    let (s, v) = h
        .post("/v1/completions", r#"{"model":"nope","prompt":"a"}"#)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let r = h
        .client
        .get(format!("{}/v1/completions", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let (s, _) = h
        .post("/v1/completions", r#"{"prompt":"ok","max_tokens":2}"#)
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let h = serve(Some("sekret"), true, 0).await;
    let (s, v) = h.post("/v1/completions", r#"{"prompt":"a"}"#).await;
    assert_error(s, &v, 401, "API key");
    let ok = h
        .client
        .get(format!("{}/v1/models", h.base))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["max_model_len"], 64);
    let health = h
        .client
        .get(format!("{}/health", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn health_turns_200_only_when_ready() {
    let h = serve(None, false, 0).await;
    let get = |p: &'static str| h.client.get(format!("{}{p}", h.base)).send();
    assert_eq!(get("/health").await.unwrap().status(), 503);
    let (s, v) = h.post("/v1/completions", r#"{"prompt":"a"}"#).await;
    assert_error(s, &v, 503, "starting");
    h.state.set_ready(served(h.engine.clone()));
    assert_eq!(get("/health").await.unwrap().status(), 200);
    let m = get("/metrics").await.unwrap();
    assert_eq!(
        m.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = m.text().await.unwrap();
    assert!(text.contains("vllm:num_requests_running 0"), "{text}");
    let st: Value = get("/v1/engine/startup")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["kv_cache_tokens"], 64);
    assert!(st["phases"]["weights_load"].is_number());
}

#[tokio::test]
async fn dropped_stream_aborts_the_request() {
    use futures::StreamExt;
    let h = serve(None, true, 20).await;
    let r = h
        .client
        .post(format!("{}/v1/completions", h.base))
        .json(&json!({"prompt":"a","stream":true,"max_tokens":12}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    for _ in 0..100 {
        if h.engine.running.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.engine.running.load(Ordering::SeqCst), 0);
    assert_eq!(h.engine.aborted.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn tokenize_counts_prompt_tokens_and_rejects_bad_bodies() {
    let h = serve(None, true, 0).await;
    let (s, v) = h
        .post("/tokenize", r#"{"model":"tiny","prompt":"abcd"}"#)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["count"], 4);
    assert_eq!(v["tokens"], serde_json::json!([97, 98, 99, 100]));
    assert!(v["max_model_len"].as_u64().unwrap() > 0);
    let (s, v) = h.post("/tokenize", r#"{"content":"xy"}"#).await;
    assert_eq!(
        (s, v["count"].as_u64()),
        (200, Some(2)),
        "llama-server's field"
    );
    let (s, v) = h.post("/tokenize", r#"{"prompt":17}"#).await;
    assert_error(s, &v, 400, "`prompt`");
    let (s, v) = h.post("/tokenize", "{not json").await;
    assert_eq!(s, 400, "{v}");
}
