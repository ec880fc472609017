//! probe: the lab instrument for OpenAI-compatible LLM servers (ours, vLLM, llama-server).

pub mod bench;
pub mod clock;
pub mod plot;
pub mod record;
