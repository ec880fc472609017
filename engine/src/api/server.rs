//! HTTP routes (completions, chat, models, health, metrics, startup report) and the server entry.

use super::error::ApiError;
use super::generate::{EngineClient, GenStep, Generation, TextCodec};
use super::protocol::*;
use super::sse;
use super::validate::{self, Endpoint, PromptInput, ValidParams};
use crate::core::EngineRequest;
use crate::launch::StartupReport;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Everything a ready server serves with.
pub struct Served {
    pub engine: Arc<dyn EngineClient>,
    pub codec: Arc<dyn TextCodec>,
    pub max_model_len: usize,
    pub eos_token_ids: Vec<u32>,
    pub startup: StartupReport,
}

/// Shared route state: fixed settings, plus the engine once startup finished.
pub struct ApiState {
    pub served_model_name: String,
    pub api_key: Option<String>,
    ready: OnceLock<Served>,
}

impl ApiState {
    pub fn new(served_model_name: String, api_key: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            served_model_name,
            api_key,
            ready: OnceLock::new(),
        })
    }

    /// Mark the server ready (`/health` turns 200). A second call is ignored.
    pub fn set_ready(&self, served: Served) {
        let _ = self.ready.set(served);
    }

    fn served(&self) -> Result<&Served, ApiError> {
        self.ready
            .get()
            .ok_or_else(|| ApiError::unavailable("the engine is still starting"))
    }
}

/// All routes; `/v1/*` behind the optional API key.
pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/engine/startup", get(startup))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/tokenize", post(tokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

async fn require_api_key(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| given.trim() == key);
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::from_status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    match state.served() {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

/// vLLM's `POST /tokenize`: `{"prompt", "add_special_tokens"?}` (llama-server's `{"content"}` too)
/// -> `{"tokens", "count", "max_model_len"}`.
async fn tokenize(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let served = match state.served() {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let v: serde_json::Value = match parse_body(body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let Some(text) = v
        .get("prompt")
        .or_else(|| v.get("content"))
        .and_then(|p| p.as_str())
    else {
        return ApiError::bad_request("`prompt` (a string) is required", Some("prompt"))
            .into_response();
    };
    let special = v
        .get("add_special_tokens")
        .and_then(|b| b.as_bool())
        .unwrap_or(true);
    match served.codec.encode_with(text, special) {
        Ok(tokens) => Json(serde_json::json!({
            "count": tokens.len(),
            "max_model_len": served.max_model_len,
            "tokens": tokens,
        }))
        .into_response(),
        Err(e) => ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), Some("prompt"))
            .into_response(),
    }
}

/// vLLM's `POST /reset_prefix_cache`: 200 with `{"reset": bool}` (false while blocks are in use).
async fn reset_prefix_cache(State(state): State<Arc<ApiState>>) -> Response {
    let engine = match state.served() {
        Ok(s) => s.engine.clone(),
        Err(e) => return e.into_response(),
    };
    match tokio::task::spawn_blocking(move || engine.reset_prefix_cache()).await {
        Ok(Some(reset)) => Json(serde_json::json!({ "reset": reset })).into_response(),
        Ok(None) => ApiError::from_status(
            StatusCode::NOT_IMPLEMENTED,
            "this engine cannot reset its prefix cache",
        )
        .into_response(),
        Err(e) => ApiError::internal(format!("prefix cache reset failed: {e}")).into_response(),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let text = state
        .ready
        .get()
        .map(|s| s.engine.render_metrics())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn startup(State(state): State<Arc<ApiState>>) -> Result<Json<StartupReport>, ApiError> {
    Ok(Json(state.served()?.startup.clone()))
}

async fn models(State(state): State<Arc<ApiState>>) -> Result<Json<ModelList>, ApiError> {
    let served = state.served()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.served_model_name.clone(),
            object: "model",
            created: unix_now(),
            owned_by: "engine",
            root: served.startup.model.clone(),
            max_model_len: served.max_model_len,
        }],
    }))
}

/// Parse a JSON body ourselves so every failure gets the OpenAI error shape.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

async fn completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    validate::check_model(req.model.as_deref(), &state.served_model_name)?;
    let served = state.served()?;
    let prompt_ids = match validate::parse_prompt(req.prompt.as_ref(), served.codec.vocab_size())? {
        PromptInput::Tokens(ids) => ids,
        PromptInput::Text(text) => served.codec.encode(&text).map_err(|e| {
            ApiError::bad_request(format!("cannot tokenize prompt: {e}"), Some("prompt"))
        })?,
    };
    let params = validate::validate_params(
        &req.params,
        Endpoint::Completions,
        prompt_ids.len(),
        served.max_model_len,
        &served.eos_token_ids,
    )?;
    let (generation, include_usage, stream) = start(served, prompt_ids, params, "cmpl-");
    let ctx = ResponseCtx {
        id: generation.request_id().to_owned(),
        model: state.served_model_name.clone(),
        created: unix_now(),
    };
    if stream {
        Ok(sse_response(completion_stream(
            generation,
            ctx,
            include_usage,
        )))
    } else {
        let (text, finish_reason, stop_reason, usage) = collect(generation).await?;
        Ok(Json(CompletionResponse {
            id: ctx.id,
            object: "text_completion",
            created: ctx.created,
            model: ctx.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish_reason),
                stop_reason,
            }],
            usage: Some(usage),
        })
        .into_response())
    }
}

async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(body)?;
    validate::check_model(req.model.as_deref(), &state.served_model_name)?;
    let served = state.served()?;
    let messages = validate::parse_messages(&req.messages)?;
    let prompt_ids = served.codec.encode_chat(&messages).map_err(|e| {
        ApiError::bad_request(
            format!("cannot apply the chat template: {e}"),
            Some("messages"),
        )
    })?;
    let params = validate::validate_params(
        &req.params,
        Endpoint::Chat,
        prompt_ids.len(),
        served.max_model_len,
        &served.eos_token_ids,
    )?;
    let (generation, include_usage, stream) = start(served, prompt_ids, params, "chatcmpl-");
    let ctx = ResponseCtx {
        id: generation.request_id().to_owned(),
        model: state.served_model_name.clone(),
        created: unix_now(),
    };
    if stream {
        Ok(sse_response(chat_stream(generation, ctx, include_usage)))
    } else {
        let (text, finish_reason, stop_reason, usage) = collect(generation).await?;
        Ok(Json(ChatCompletionResponse {
            id: ctx.id,
            object: "chat.completion",
            created: ctx.created,
            model: ctx.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason: Some(finish_reason),
                stop_reason,
            }],
            usage,
        })
        .into_response())
    }
}

fn start(
    served: &Served,
    prompt_token_ids: Vec<u32>,
    params: ValidParams,
    id_prefix: &str,
) -> (Generation, bool, bool) {
    let request = EngineRequest {
        request_id: random_id(id_prefix),
        prompt_token_ids,
        sampling: params.sampling,
        priority: params.priority,
        arrival_time: Instant::now(),
    };
    let generation = Generation::start(
        served.engine.clone(),
        served.codec.as_ref(),
        request,
        params.stop,
    );
    (generation, params.include_usage, params.stream)
}

async fn collect(
    mut generation: Generation,
) -> Result<(String, &'static str, Option<String>, Usage), ApiError> {
    let mut text = String::new();
    while let Some(step) = generation.next().await {
        match step {
            GenStep::Text(t) => text.push_str(&t),
            GenStep::Finished {
                finish_reason,
                stop_reason,
                usage,
            } => return Ok((text, finish_reason, stop_reason, usage)),
            GenStep::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the request ended without a result"))
}

struct ResponseCtx {
    id: String,
    model: String,
    created: u64,
}

fn sse_response(frames: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Stream state shared by both endpoints: the generation plus where we are in the frame sequence.
struct StreamState {
    generation: Option<Generation>,
    ctx: ResponseCtx,
    include_usage: bool,
    first: bool,
}

fn completion_stream(
    generation: Generation,
    ctx: ResponseCtx,
    include_usage: bool,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let chunk = |ctx: &ResponseCtx, choices: Vec<CompletionChoice>, usage: Option<Usage>| {
        sse::json_frame(&CompletionResponse {
            id: ctx.id.clone(),
            object: "text_completion",
            created: ctx.created,
            model: ctx.model.clone(),
            choices,
            usage,
        })
    };
    frames(
        generation,
        ctx,
        include_usage,
        move |ctx, event| match event {
            FrameEvent::Role => None,
            FrameEvent::Text(text) => Some(chunk(
                ctx,
                vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason: None,
                    stop_reason: None,
                }],
                None,
            )),
            FrameEvent::Finish(finish_reason, stop_reason) => Some(chunk(
                ctx,
                vec![CompletionChoice {
                    index: 0,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(finish_reason),
                    stop_reason,
                }],
                None,
            )),
            FrameEvent::Usage(usage) => Some(chunk(ctx, vec![], Some(usage))),
        },
    )
}

fn chat_stream(
    generation: Generation,
    ctx: ResponseCtx,
    include_usage: bool,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let chunk = |ctx: &ResponseCtx, choices: Vec<ChatChunkChoice>, usage: Option<Usage>| {
        sse::json_frame(&ChatCompletionChunk {
            id: ctx.id.clone(),
            object: "chat.completion.chunk",
            created: ctx.created,
            model: ctx.model.clone(),
            choices,
            usage,
        })
    };
    let choice = |delta: ChatDelta, finish_reason, stop_reason| ChatChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason,
        stop_reason,
    };
    frames(
        generation,
        ctx,
        include_usage,
        move |ctx, event| match event {
            FrameEvent::Role => Some(chunk(
                ctx,
                vec![choice(
                    ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    None,
                    None,
                )],
                None,
            )),
            FrameEvent::Text(text) => Some(chunk(
                ctx,
                vec![choice(
                    ChatDelta {
                        role: None,
                        content: Some(text),
                    },
                    None,
                    None,
                )],
                None,
            )),
            FrameEvent::Finish(reason, stop_reason) => Some(chunk(
                ctx,
                vec![choice(ChatDelta::default(), Some(reason), stop_reason)],
                None,
            )),
            FrameEvent::Usage(usage) => Some(chunk(ctx, vec![], Some(usage))),
        },
    )
}

enum FrameEvent {
    Role,
    Text(String),
    Finish(&'static str, Option<String>),
    Usage(Usage),
}

/// Drive a generation into SSE frames; dropping the stream (client gone) drops the generation,
/// which aborts the request in the engine.
fn frames<F>(
    generation: Generation,
    ctx: ResponseCtx,
    include_usage: bool,
    render: F,
) -> impl futures::Stream<Item = Bytes> + Send + 'static
where
    F: Fn(&ResponseCtx, FrameEvent) -> Option<Bytes> + Send + Sync + 'static,
{
    use futures::StreamExt;
    let state = StreamState {
        generation: Some(generation),
        ctx,
        include_usage,
        first: true,
    };
    let render = Arc::new(render);
    futures::stream::unfold(state, move |mut st| {
        let render = render.clone();
        async move {
            let mut out: Vec<Bytes> = Vec::new();
            if st.first {
                st.first = false;
                out.extend(render(&st.ctx, FrameEvent::Role));
            }
            let generation = st.generation.as_mut()?;
            match generation.next().await {
                Some(GenStep::Text(t)) => out.extend(render(&st.ctx, FrameEvent::Text(t))),
                Some(GenStep::Finished {
                    finish_reason,
                    stop_reason,
                    usage,
                }) => {
                    out.extend(render(
                        &st.ctx,
                        FrameEvent::Finish(finish_reason, stop_reason),
                    ));
                    if st.include_usage {
                        out.extend(render(&st.ctx, FrameEvent::Usage(usage)));
                    }
                    out.push(sse::done_frame());
                    st.generation = None;
                }
                Some(GenStep::Error(message)) => {
                    out.push(sse::raw_frame(&ApiError::internal(message).body_json()));
                    out.push(sse::done_frame());
                    st.generation = None;
                }
                None => {
                    out.push(sse::done_frame());
                    st.generation = None;
                }
            }
            Some((out, st))
        }
    })
    .flat_map(futures::stream::iter)
}

/// The `engine` binary: parse flags, bind, load in the background, serve until Ctrl-C.
pub fn main_from_args() -> anyhow::Result<()> {
    let process_start = Instant::now();
    let args =
        crate::args::EngineArgs::parse_from_argv(std::env::args_os()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    args.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, process_start))
}

async fn serve(args: crate::args::EngineArgs, process_start: Instant) -> anyhow::Result<()> {
    use anyhow::Context;
    tracing::info!("engine {} args: {:?}", env!("CARGO_PKG_VERSION"), args);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // Stream chunks leave at once: without TCP_NODELAY, Nagle's algorithm holds small SSE writes
    // until the client's delayed ACK (~40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let state = ApiState::new(args.served_model_name()?, args.api_key.clone());
    let app = router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    tracing::info!("Starting API server on http://{addr} (health 503 until ready)");
    let launched = tokio::task::spawn_blocking(move || crate::launch::launch(&args, process_start))
        .await
        .context("startup thread failed")??;
    let crate::launch::Launched {
        served,
        handle,
        core_thread,
    } = launched;
    state.set_ready(served);
    tracing::info!("Application startup complete.");
    let result = server.await.context("server task failed")?;
    handle.shutdown();
    // Let the step in flight finish and the model and its device memory drop on the core thread
    // before the process exits: exiting under a running step races the CUDA driver's teardown.
    let joined = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || core_thread.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("the engine core did not stop within 30 s; exiting anyway");
    }
    result.context("server error")
}
