//! OpenAI-compatible HTTP API: wire types, validation, SSE framing, error mapping and routes.

pub mod error;
pub mod generate;
pub mod protocol;
pub mod server;
pub mod sse;
pub mod validate;

#[cfg(test)]
mod tests;
