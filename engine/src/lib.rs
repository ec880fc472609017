//! engine: an OpenAI-compatible LLM server with continuous batching over a paged KV cache.
//!
//! The request path, each stage a module with one job (see README "Engine design"):
//! `api` (HTTP, validation) -> `core` (step loop thread) -> `sched` + `kv` (what runs, which
//! blocks; no tensor code) -> `executor` (one rank, or N tensor-parallel rank threads) ->
//! `runner` (flattened batch, sampling) -> `model` (candle forward).

pub mod api;
pub mod args;
pub mod config;
pub mod core;
pub mod executor;
pub mod gguf;
pub mod gpu_memory;
pub mod kv;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod sampling;
pub mod sched;
pub mod tokenizer;
pub mod weights;
