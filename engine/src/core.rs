//! The engine core: the step loop on its own thread (take new/aborted requests, schedule, run, emit).
//!
//! CONTRACT with `api` (the only way HTTP handlers talk to the engine):
//! - `EngineHandle::add_request(EngineRequest)` returns a receiver of `RequestEvent`s: zero or more
//!   `Tokens` then exactly one `Finished` (or `Error`). Dropping the receiver (client gone) or calling
//!   `abort` frees the request's KV blocks on the next step.
//! - Requests are already validated and tokenized by `api` (limits checked there).
//! - `EngineHandle::metrics()` gives the live numbers `/metrics` renders.

use crate::metrics::{EngineMetrics, FinishedRequestStats};
use crate::sampling::SamplingParams;
use crate::sched::policy::SchedulingPolicy;
use crate::sched::{
    Request, RequestOutput, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput,
};
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// A validated, tokenized request handed to the core.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Lower runs first under `--scheduling-policy priority`.
    pub priority: i32,
    pub arrival_time: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS token or a stop string/token.
    Stop,
    /// `max_tokens` reached (or max-model-len).
    Length,
    Abort,
}

/// Server-side timings of one request, seconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RequestTimings {
    pub queued_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub preempted_s: f64,
}

#[derive(Debug, Clone)]
pub enum RequestEvent {
    /// Newly generated token ids (usually one per step).
    Tokens {
        token_ids: Vec<u32>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
        timings: RequestTimings,
    },
    Error {
        message: String,
    },
}

/// Why a step could not run (the affected requests end with `RequestEvent::Error`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExecuteError(pub String);

/// Runs planned steps: the seam between the core and the model (`runner::ModelRunner`, or a fake).
pub trait ModelExecutor: Send {
    /// Runs one step; returns one entry per `output.scheduled` request: the sampled token where
    /// `sample` is set, None otherwise.
    fn execute(&mut self, output: &SchedulerOutput) -> Result<Vec<Option<u32>>, ExecuteError>;

    /// Bytes one KV block takes (all layers, K and V), when the executor can swap blocks to the
    /// CPU pool (`output.blocks_to_swap_out/in`); None disables swapping.
    fn kv_bytes_per_block(&self) -> Option<usize> {
        None
    }
}

/// `--swap-space` default, GiB (vLLM's).
pub const DEFAULT_SWAP_SPACE_GIB: f64 = 4.0;

enum Command {
    Add(Box<EngineRequest>, UnboundedSender<RequestEvent>),
    Abort(String),
    ResetPrefixCache(mpsc::Sender<bool>),
    Shutdown,
}

/// The api's handle on the running core: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<EngineMetrics>,
    config: Arc<SchedulerConfig>,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver aborts
    /// the request. A request the scheduler refuses gets one `Error` event.
    pub fn add_request(&self, request: EngineRequest) -> UnboundedReceiver<RequestEvent> {
        let (tx, rx) = unbounded_channel();
        if let Err(mpsc::SendError(Command::Add(_, tx))) =
            self.tx.send(Command::Add(Box::new(request), tx))
        {
            let _ = tx.send(RequestEvent::Error {
                message: "engine core is not running".into(),
            });
        }
        rx
    }

    /// Aborts a request in any state; it ends with `Finished { reason: Abort }`.
    pub fn abort(&self, request_id: &str) {
        let _ = self.tx.send(Command::Abort(request_id.to_string()));
    }

    /// Drops the prefix cache's block hashes (vLLM's `reset_prefix_cache`) so the next requests
    /// are cold; false when blocks are still in use (nothing is dropped then).
    pub fn reset_prefix_cache(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Command::ResetPrefixCache(tx)).is_err() {
            return false;
        }
        rx.recv().unwrap_or(false)
    }

    pub fn metrics(&self) -> Arc<EngineMetrics> {
        self.metrics.clone()
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Stops the core thread after the current step; pending requests are dropped.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Per-request state the core keeps beside the scheduler's.
struct Client {
    tx: UnboundedSender<RequestEvent>,
    arrival: Instant,
    last_token: Option<Instant>,
}

/// The step loop: owns the scheduler and the executor, runs on its own thread.
pub struct EngineCore {
    scheduler: Scheduler,
    executor: Box<dyn ModelExecutor>,
    metrics: Arc<EngineMetrics>,
    clients: HashMap<String, Client>,
    rx: mpsc::Receiver<Command>,
    prefix_seen: (u64, u64),
    /// Bytes per KV block, for the swap-traffic counter.
    kv_bytes_per_block: u64,
    shutdown: bool,
}

impl EngineCore {
    /// Starts the core thread and returns its handle. The thread ends on `shutdown` or when every
    /// handle is dropped.
    pub fn spawn(
        config: SchedulerConfig,
        policy: Box<dyn SchedulingPolicy>,
        executor: Box<dyn ModelExecutor>,
        metrics: Arc<EngineMetrics>,
    ) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        Self::spawn_with_swap_space(config, policy, executor, metrics, DEFAULT_SWAP_SPACE_GIB)
    }

    /// `spawn` with a `--swap-space` of `swap_space_gib` GiB: the CPU pool holds that many bytes
    /// of KV blocks (none when the executor cannot swap).
    pub fn spawn_with_swap_space(
        config: SchedulerConfig,
        policy: Box<dyn SchedulingPolicy>,
        executor: Box<dyn ModelExecutor>,
        metrics: Arc<EngineMetrics>,
        swap_space_gib: f64,
    ) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let bytes_per_block = executor.kv_bytes_per_block().unwrap_or(0);
        // No CPU swap pool unless the budget is a positive number (NaN included).
        let num_cpu_blocks =
            if bytes_per_block == 0 || swap_space_gib.is_nan() || swap_space_gib <= 0.0 {
                0
            } else {
                (swap_space_gib * (1u64 << 30) as f64 / bytes_per_block as f64) as usize
            };
        metrics.set_cache_config_info(vec![
            ("block_size".into(), config.block_size.to_string()),
            (
                "enable_prefix_caching".into(),
                if config.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                }
                .into(),
            ),
            ("num_cpu_blocks".into(), num_cpu_blocks.to_string()),
            ("num_gpu_blocks".into(), config.num_gpu_blocks.to_string()),
        ]);
        let (tx, rx) = mpsc::channel();
        let handle = EngineHandle {
            tx,
            metrics: metrics.clone(),
            config: Arc::new(config.clone()),
        };
        let mut core = EngineCore {
            scheduler: Scheduler::new(config, policy).with_num_cpu_blocks(num_cpu_blocks),
            executor,
            metrics,
            clients: HashMap::new(),
            rx,
            prefix_seen: (0, 0),
            kv_bytes_per_block: bytes_per_block as u64,
            shutdown: false,
        };
        let join = std::thread::Builder::new()
            .name("engine-core".into())
            .spawn(move || core.run())?;
        Ok((handle, join))
    }

    fn run(&mut self) {
        while !self.shutdown {
            if !self.scheduler.has_requests() {
                // Idle: block until something arrives.
                match self.rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.shutdown = true;
                        break;
                    }
                }
            }
            if self.shutdown {
                break;
            }
            self.abort_disconnected();
            if self.scheduler.has_requests() {
                self.step();
            }
            self.publish_state();
        }
        let ids: Vec<String> = self.clients.keys().cloned().collect();
        self.abort(&ids, None);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(req, tx) => {
                let EngineRequest {
                    request_id,
                    prompt_token_ids,
                    sampling,
                    priority,
                    arrival_time,
                } = *req;
                if self.clients.contains_key(&request_id) {
                    let _ = tx.send(RequestEvent::Error {
                        message: format!("request {request_id:?} already exists"),
                    });
                    return;
                }
                let r = Request::new(
                    request_id.clone(),
                    prompt_token_ids,
                    sampling,
                    priority,
                    arrival_time,
                );
                match self.scheduler.add_request(r) {
                    Ok(()) => {
                        self.clients.insert(
                            request_id,
                            Client {
                                tx,
                                arrival: arrival_time,
                                last_token: None,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = tx.send(RequestEvent::Error {
                            message: e.to_string(),
                        });
                    }
                }
            }
            Command::Abort(id) => self.abort(&[id], None),
            Command::ResetPrefixCache(reply) => {
                let _ = reply.send(self.scheduler.reset_prefix_cache());
            }
            Command::Shutdown => self.shutdown = true,
        }
    }

    /// Requests whose receiver was dropped (client gone) are aborted and their blocks freed.
    fn abort_disconnected(&mut self) {
        let gone: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| c.tx.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        if !gone.is_empty() {
            self.abort(&gone, None);
        }
    }

    /// Ends requests: `Finished { Abort }` to their clients, or `Error` when `error` is given.
    fn abort(&mut self, ids: &[String], error: Option<&str>) {
        let status = if error.is_some() {
            RequestStatus::FinishedError
        } else {
            RequestStatus::FinishedAborted
        };
        for req in self.scheduler.finish_requests(ids, status) {
            let Some(client) = self.clients.remove(&req.request_id) else {
                continue;
            };
            self.metrics.record_finished(FinishReason::Abort, None);
            let event = match error {
                Some(message) => RequestEvent::Error {
                    message: message.to_string(),
                },
                None => finished_event(&req, FinishReason::Abort),
            };
            let _ = client.tx.send(event);
        }
    }

    fn step(&mut self) {
        let swaps_before = self.scheduler.swap_counts();
        let t0 = Instant::now();
        let out = self.scheduler.schedule();
        let t1 = Instant::now();
        self.metrics
            .add_preemptions(out.preempted_req_ids.len() as u64);
        let swaps = self.scheduler.swap_counts();
        self.metrics.add_swaps(
            swaps.swaps_out - swaps_before.swaps_out,
            swaps.swaps_in - swaps_before.swaps_in,
            (out.blocks_to_swap_out.len() + out.blocks_to_swap_in.len()) as u64
                * self.kv_bytes_per_block,
        );
        if out.is_empty() {
            // Nothing fits right now (cannot last: running requests always progress); wait
            // briefly for commands instead of spinning.
            if let Ok(cmd) = self.rx.recv_timeout(Duration::from_millis(5)) {
                self.handle(cmd);
            }
            return;
        }
        match self.executor.execute(&out) {
            Ok(sampled) if sampled.len() == out.scheduled.len() => {
                let t2 = Instant::now();
                let outputs = self.scheduler.update_from_output(&out, &sampled);
                self.emit(outputs);
                log_step(&out, &self.scheduler, [t0, t1, t2, Instant::now()]);
            }
            Ok(sampled) => {
                let msg = format!(
                    "model runner returned {} results for {} scheduled requests",
                    sampled.len(),
                    out.scheduled.len()
                );
                self.fail_step(&out, &msg);
            }
            Err(e) => self.fail_step(&out, &format!("model execution failed: {e}")),
        }
    }

    fn fail_step(&mut self, out: &SchedulerOutput, message: &str) {
        tracing::error!("{message}");
        let ids: Vec<String> = out.scheduled.iter().map(|s| s.request_id.clone()).collect();
        self.abort(&ids, Some(message));
    }

    fn emit(&mut self, outputs: Vec<RequestOutput>) {
        let now = Instant::now();
        for o in outputs {
            let prompt_len = self.prompt_len(&o);
            let Some(client) = self.clients.get_mut(&o.request_id) else {
                continue;
            };
            let n = o.new_token_ids.len() as u64;
            match client.last_token {
                None => {
                    let ttft = now.saturating_duration_since(client.arrival).as_secs_f64();
                    self.metrics.time_to_first_token.observe(ttft);
                    if let Some(p) = prompt_len {
                        self.metrics.add_prompt_tokens(p as u64);
                    }
                }
                Some(t) => self
                    .metrics
                    .inter_token_latency
                    .observe(now.saturating_duration_since(t).as_secs_f64()),
            }
            client.last_token = Some(now);
            self.metrics.add_generation_tokens(n);
            let _ = client.tx.send(RequestEvent::Tokens {
                token_ids: o.new_token_ids.clone(),
            });
            if let (Some(reason), Some(req)) = (o.finish_reason, o.finished.as_ref()) {
                let client = self.clients.remove(&o.request_id).expect("present");
                let t = req.timings();
                self.metrics.record_finished(
                    reason,
                    Some(FinishedRequestStats {
                        e2e_s: now.saturating_duration_since(client.arrival).as_secs_f64(),
                        queue_s: t.queued_s,
                        prefill_s: t.prefill_s,
                        decode_s: t.decode_s,
                        preempted_s: t.preempted_s,
                    }),
                );
                let _ = client.tx.send(finished_event(req, reason));
            }
        }
    }

    fn prompt_len(&self, o: &RequestOutput) -> Option<usize> {
        match &o.finished {
            Some(r) => Some(r.num_prompt_tokens()),
            None => self
                .scheduler
                .get(&o.request_id)
                .map(|r| r.num_prompt_tokens()),
        }
    }

    fn publish_state(&mut self) {
        let kv = self.scheduler.kv();
        self.metrics.set_scheduler_state(
            self.scheduler.num_running(),
            self.scheduler.num_waiting(),
            kv.usage(),
        );
        let (q, h) = (kv.prefix_queries, kv.prefix_hits);
        self.metrics
            .add_prefix_cache(q - self.prefix_seen.0, h - self.prefix_seen.1);
        self.prefix_seen = (q, h);
    }
}

/// One debug line per step (`RUST_LOG=engine::core=debug`): what ran and where the time went.
fn log_step(out: &SchedulerOutput, scheduler: &Scheduler, t: [Instant; 4]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let decode = out
        .scheduled
        .iter()
        .filter(|r| r.token_ids.len() == 1 && r.num_output_tokens > 0)
        .count();
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    tracing::debug!(
        "step: {} seqs, {} tokens ({} prefill, {} decode rows), swap out/in {}/{} blocks, \
         {} preempted; schedule {:.2} ms, execute {:.2} ms, emit {:.2} ms; running {}, waiting {}",
        out.scheduled.len(),
        out.total_num_scheduled_tokens,
        out.total_num_scheduled_tokens - decode,
        decode,
        out.blocks_to_swap_out.len(),
        out.blocks_to_swap_in.len(),
        out.preempted_req_ids.len(),
        ms(t[0], t[1]),
        ms(t[1], t[2]),
        ms(t[2], t[3]),
        scheduler.num_running(),
        scheduler.num_waiting(),
    );
}

fn finished_event(req: &Request, reason: FinishReason) -> RequestEvent {
    RequestEvent::Finished {
        reason,
        prompt_tokens: req.num_prompt_tokens(),
        completion_tokens: req.num_output_tokens(),
        cached_tokens: req.num_cached_tokens,
        timings: req.timings(),
    }
}
