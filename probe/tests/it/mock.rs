//! A scripted, in-process OpenAI-compatible SSE server for tests (axum on 127.0.0.1:0).
//!
//! Usage: `let m = MockServer::start(MockConfig::default()).await;` then point the probe at
//! `m.url`. Each completions/chat request takes the next `Script` from the queue
//! (`m.push(script)`), or `MockConfig::default_script` when the queue is empty. A script fixes
//! the delay before the first chunk, the gap before every later chunk, the text of each chunk, the
//! usage, or a failure (HTTP status, malformed SSE, dropped connection, never answering, no
//! `[DONE]`). Also served: `/health` (503 until `ready_after` has passed), `/metrics` (scripted
//! Prometheus text), `/v1/models`, `/v1/engine/startup` (optional JSON) and
//! `POST /reset_prefix_cache` (counted).
//!
//! `child_server` (ignored unless `PROBE_MOCK_PORT` is set) runs the mock as a separate process on
//! a fixed port, so tests can exercise the probe's server lifecycle with `--server-cmd`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

/// How a scripted response ends or fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Answer with this HTTP status and an OpenAI error body carrying `message`.
    Status(u16, String),
    /// Send this (non-JSON) text as an SSE data line after the first chunk.
    Malformed(String),
    /// Abort the connection after this many content chunks.
    DropAfter(usize),
    /// Never send response headers.
    NeverAnswer,
    /// Send every chunk, then close without `[DONE]`.
    NoDone,
}

/// One request's scripted response.
#[derive(Debug, Clone)]
pub struct Script {
    /// Delay from receiving the request to the first content chunk.
    pub first_delay: Duration,
    /// Gap before each chunk after the first.
    pub chunk_gap: Duration,
    /// Text of each content chunk (one chunk = one token for usage purposes).
    pub chunks: Vec<String>,
    pub prompt_tokens: u64,
    pub cached_tokens: Option<u64>,
    /// Sent as `usage.timings` when set.
    pub timings: Option<serde_json::Value>,
    pub failure: Option<Failure>,
}

impl Default for Script {
    fn default() -> Self {
        Self::ok(Duration::from_millis(20), Duration::from_millis(5), 4)
    }
}

impl Script {
    /// `n` chunks "t0", "t1", ... with the given first delay and gap.
    pub fn ok(first_delay: Duration, chunk_gap: Duration, n: usize) -> Self {
        Self {
            first_delay,
            chunk_gap,
            chunks: (0..n).map(|i| format!("t{i} ")).collect(),
            prompt_tokens: 11,
            cached_tokens: None,
            timings: None,
            failure: None,
        }
    }

    pub fn failing(failure: Failure) -> Self {
        Self {
            failure: Some(failure),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// `/health` answers 503 until this long after start.
    pub ready_after: Duration,
    /// `/metrics` body.
    pub metrics: String,
    /// `/v1/engine/startup` body; 404 when None.
    pub startup: Option<serde_json::Value>,
    /// Used when the script queue is empty.
    pub default_script: Script,
    /// Fixed port (0 = any).
    pub port: u16,
}

#[derive(Default)]
pub struct Recorded {
    /// Request bodies, in arrival order.
    pub bodies: Vec<serde_json::Value>,
    pub reset_prefix_cache_calls: usize,
    /// Per request, the instant each content chunk was handed to the connection.
    pub chunk_sent: Vec<Vec<Instant>>,
}

struct MockState {
    cfg: MockConfig,
    started: Instant,
    queue: Mutex<VecDeque<Script>>,
    recorded: Mutex<Recorded>,
}

pub struct MockServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`
    pub url: String,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    pub async fn start(cfg: MockConfig) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", cfg.port))
            .await
            .expect("bind mock server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState {
            cfg,
            started: Instant::now(),
            queue: Mutex::new(VecDeque::new()),
            recorded: Mutex::new(Recorded::default()),
        });
        let app = Router::new()
            .route("/v1/completions", post(generate))
            .route("/v1/chat/completions", post(generate))
            .route("/v1/models", get(models))
            .route("/v1/engine/startup", get(startup))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/reset_prefix_cache", post(reset_prefix_cache))
            .with_state(state.clone());
        // TCP_NODELAY, as a real server should: else small SSE writes wait for delayed ACKs.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// Queues the script for the next request.
    pub fn push(&self, script: Script) {
        self.state.queue.lock().unwrap().push_back(script);
    }

    pub fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.state.recorded.lock().unwrap()
    }
}

async fn health(State(s): State<Arc<MockState>>) -> StatusCode {
    if s.started.elapsed() >= s.cfg.ready_after {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(s): State<Arc<MockState>>) -> String {
    s.cfg.metrics.clone()
}

async fn models() -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [{"id": "mock-model", "object": "model"}]}))
}

async fn startup(State(s): State<Arc<MockState>>) -> Response {
    match &s.cfg.startup {
        Some(v) => Json(v.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn reset_prefix_cache(State(s): State<Arc<MockState>>) -> StatusCode {
    s.recorded.lock().unwrap().reset_prefix_cache_calls += 1;
    StatusCode::OK
}

fn chunk_json(chat: bool, text: &str) -> serde_json::Value {
    if chat {
        serde_json::json!({"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    } else {
        serde_json::json!({"object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": null}]})
    }
}

fn sse(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn generate(
    State(s): State<Arc<MockState>>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let chat = body.get("messages").is_some();
    s.recorded.lock().unwrap().bodies.push(body);
    let script = s
        .queue
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| s.cfg.default_script.clone());
    match &script.failure {
        Some(Failure::Status(code, msg)) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let err = serde_json::json!({"error": {"message": msg, "type": "BadRequestError"}});
            return (status, Json(err)).into_response();
        }
        Some(Failure::NeverAnswer) => std::future::pending::<()>().await,
        _ => {}
    }
    let slot = {
        let mut r = s.recorded.lock().unwrap();
        r.chunk_sent.push(Vec::new());
        r.chunk_sent.len() - 1
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        // Role chunk first, at once (carries no content: must not count as the first token).
        if chat {
            let role =
                serde_json::json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]});
            let _ = tx.send(Ok(sse(&role))).await;
        }
        for (i, text) in script.chunks.iter().enumerate() {
            let wait = if i == 0 {
                script.first_delay
            } else {
                script.chunk_gap
            };
            tokio::time::sleep(wait).await;
            // Dropping after the wait lets the chunks already sent reach the client first.
            if script.failure == Some(Failure::DropAfter(i)) {
                let _ = tx.send(Err(std::io::Error::other("scripted drop"))).await;
                return;
            }
            let frame = sse(&chunk_json(chat, text));
            s.recorded.lock().unwrap().chunk_sent[slot].push(Instant::now());
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
            if i == 0 {
                if let Some(Failure::Malformed(junk)) = &script.failure {
                    let _ = tx.send(Ok(Bytes::from(format!("data: {junk}\n\n")))).await;
                    return;
                }
            }
        }
        let n = script.chunks.len() as u64;
        let mut usage = serde_json::json!({"prompt_tokens": script.prompt_tokens,
            "completion_tokens": n, "total_tokens": script.prompt_tokens + n});
        if let Some(c) = script.cached_tokens {
            usage["prompt_tokens_details"] = serde_json::json!({"cached_tokens": c});
        }
        if let Some(t) = &script.timings {
            usage["timings"] = t.clone();
        }
        let last = serde_json::json!({"choices": [], "usage": usage});
        let _ = tx.send(Ok(sse(&last))).await;
        if script.failure != Some(Failure::NoDone) {
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The vLLM-style log lines the child mock prints at startup.
pub const CHILD_LOG: &str =
    "INFO 11-24 10:00:00 [gpu_worker.py:1] Loading weights took 0.50 seconds\n\
INFO 11-24 10:00:01 [kv_cache_utils.py:1] GPU KV cache size: 23,296 tokens\n\
INFO 11-24 10:00:01 [kv_cache_utils.py:2] Maximum concurrency for 2,048 tokens per request: 11.38x";

/// Runs the mock as a child process when `PROBE_MOCK_PORT` is set (spawned by lifecycle tests
/// with `--exact mock::child_server --ignored`); otherwise does nothing.
#[tokio::test]
#[ignore = "only runs as a spawned child server"]
async fn child_server() {
    let Ok(port) = std::env::var("PROBE_MOCK_PORT") else {
        return;
    };
    let ready_ms: u64 = std::env::var("PROBE_MOCK_READY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    println!("{CHILD_LOG}");
    let cfg = MockConfig {
        port: port.parse().expect("PROBE_MOCK_PORT"),
        ready_after: Duration::from_millis(ready_ms),
        metrics: "vllm:num_requests_running 0\n".into(),
        ..Default::default()
    };
    let _m = MockServer::start(cfg).await;
    eprintln!("mock listening on {port}");
    tokio::time::sleep(Duration::from_secs(300)).await;
}
