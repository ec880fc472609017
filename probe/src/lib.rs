//! probe: the lab instrument for OpenAI-compatible LLM servers (ours, vLLM, llama-server).

pub mod clock;
pub mod record;
