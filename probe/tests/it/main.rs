//! probe integration tests: one binary, one module per area; servers are in-process on 127.0.0.1:0.

mod bench;
mod coldwarm;
mod kvscaling;
mod mock;
