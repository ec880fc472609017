//! probe: the lab instrument for OpenAI-compatible LLM servers (ours, vLLM, llama-server).

pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod coldwarm;
pub mod fetch;
pub mod kvscaling;
pub mod plot;
pub mod progress;
pub mod record;
pub mod report;
pub mod samplers;
pub mod server;
