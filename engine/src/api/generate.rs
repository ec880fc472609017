//! One request's output path: engine events -> incremental detokenization -> stop strings -> text.

use super::protocol::Usage;
use super::validate::StopMatcher;
use crate::core::{EngineRequest, FinishReason, RequestEvent, RequestTimings};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

/// What the HTTP layer needs from the engine core.
pub trait EngineClient: Send + Sync + 'static {
    /// Queue a validated request; events arrive on the returned channel.
    fn add_request(&self, request: EngineRequest) -> UnboundedReceiver<RequestEvent>;
    /// Stop a request and free its KV blocks.
    fn abort(&self, request_id: &str);
    /// Prometheus text of the live engine metrics.
    fn render_metrics(&self) -> String;
    /// Drops the prefix cache's hashes: Some(false) while blocks are in use, None when the
    /// engine cannot (blocks the calling thread briefly).
    fn reset_prefix_cache(&self) -> Option<bool> {
        None
    }
}

/// Turns token ids into text as they arrive (holding back incomplete UTF-8).
pub trait IncrementalDecode: Send {
    fn push(&mut self, token_id: u32) -> Option<String>;
    /// Text still held back at the end of generation.
    fn flush(&mut self) -> Option<String> {
        None
    }
}

/// What the HTTP layer needs from the tokenizer.
pub trait TextCodec: Send + Sync + 'static {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// `encode`, optionally without the special tokens (BOS) the tokenizer adds.
    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let _ = add_special_tokens;
        self.encode(text)
    }
    /// Render `(role, content)` messages with the model's chat template and tokenize them.
    fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String>;
    fn decoder(&self) -> Box<dyn IncrementalDecode>;
    fn vocab_size(&self) -> usize;
}

/// One step of a request's output.
#[derive(Debug, Clone)]
pub enum GenStep {
    Text(String),
    Finished {
        finish_reason: &'static str,
        stop_reason: Option<String>,
        usage: Usage,
    },
    Error(String),
}

pub fn finish_reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// A running request. Dropping it before the end aborts the request in the engine.
pub struct Generation {
    engine: Arc<dyn EngineClient>,
    request_id: String,
    rx: UnboundedReceiver<RequestEvent>,
    decoder: Box<dyn IncrementalDecode>,
    stop: StopMatcher,
    stop_token_ids: Vec<u32>,
    prompt_tokens: usize,
    completion_tokens: usize,
    queue: VecDeque<GenStep>,
    done: bool,
}

/// How long to wait for the engine's final event after aborting on a stop string.
const ABORT_DRAIN: Duration = Duration::from_secs(2);

impl Generation {
    pub fn start(
        engine: Arc<dyn EngineClient>,
        codec: &dyn TextCodec,
        request: EngineRequest,
        stop: Vec<String>,
    ) -> Self {
        let request_id = request.request_id.clone();
        let prompt_tokens = request.prompt_token_ids.len();
        let stop_token_ids = request.sampling.stop_token_ids.clone();
        let rx = engine.add_request(request);
        Self {
            engine,
            request_id,
            rx,
            decoder: codec.decoder(),
            stop: StopMatcher::new(stop),
            stop_token_ids,
            prompt_tokens,
            completion_tokens: 0,
            queue: VecDeque::new(),
            done: false,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next non-empty text piece, the final `Finished`, or an `Error`; `None` after the end.
    pub async fn next(&mut self) -> Option<GenStep> {
        loop {
            if let Some(step) = self.queue.pop_front() {
                return Some(step);
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(RequestEvent::Tokens { token_ids }) => self.on_tokens(&token_ids).await,
                Some(RequestEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    timings,
                }) => {
                    if let Some(rest) = self.decoder.flush() {
                        let out = self.stop.push(&rest);
                        if !out.text.is_empty() {
                            self.queue.push_back(GenStep::Text(out.text));
                        }
                    }
                    let tail = self.stop.flush();
                    if !tail.is_empty() {
                        self.queue.push_back(GenStep::Text(tail));
                    }
                    self.completion_tokens = completion_tokens;
                    self.finish(
                        finish_reason_str(reason),
                        None,
                        prompt_tokens,
                        cached_tokens,
                        Some(timings),
                    );
                }
                Some(RequestEvent::Error { message }) => {
                    self.done = true;
                    self.queue.push_back(GenStep::Error(message));
                }
                None => {
                    self.done = true;
                    self.queue.push_back(GenStep::Error(
                        "the engine ended the request without a result".into(),
                    ));
                }
            }
        }
    }

    async fn on_tokens(&mut self, ids: &[u32]) {
        for &id in ids {
            self.completion_tokens += 1;
            if self.stop_token_ids.contains(&id) {
                continue;
            }
            let Some(piece) = self.decoder.push(id) else {
                continue;
            };
            let out = self.stop.push(&piece);
            if !out.text.is_empty() {
                self.queue.push_back(GenStep::Text(out.text));
            }
            if let Some(stop) = out.stopped_on {
                self.engine.abort(&self.request_id);
                let (cached, timings) = self.drain_after_abort().await;
                let prompt = self.prompt_tokens;
                self.finish("stop", Some(stop), prompt, cached, timings);
                return;
            }
        }
    }

    /// After an abort, wait briefly for the engine's `Finished` to pick up cache hits and timings.
    async fn drain_after_abort(&mut self) -> (usize, Option<RequestTimings>) {
        let deadline = tokio::time::Instant::now() + ABORT_DRAIN;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(RequestEvent::Finished {
                    cached_tokens,
                    timings,
                    ..
                })) => return (cached_tokens, Some(timings)),
                Ok(Some(RequestEvent::Tokens { .. })) => continue,
                _ => return (0, None),
            }
        }
    }

    fn finish(
        &mut self,
        finish_reason: &'static str,
        stop_reason: Option<String>,
        prompt_tokens: usize,
        cached_tokens: usize,
        timings: Option<RequestTimings>,
    ) {
        self.done = true;
        self.queue.push_back(GenStep::Finished {
            finish_reason,
            stop_reason,
            usage: Usage::new(
                prompt_tokens,
                self.completion_tokens,
                cached_tokens,
                timings,
            ),
        });
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            self.engine.abort(&self.request_id);
        }
    }
}
