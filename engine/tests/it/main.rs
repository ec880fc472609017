//! Engine integration tests: one binary, one module per area.

mod api;
mod bench;
mod common;
#[cfg(feature = "cuda")]
mod cuda_diag;
mod cuda_fused;
#[cfg(feature = "cuda")]
mod cuda_gemv;
#[cfg(feature = "cuda")]
mod cuda_greedy;
mod cuda_kernels;
#[cfg(feature = "cuda")]
mod cuda_model;
#[cfg(feature = "cuda")]
mod cuda_tp;
mod model;
mod policies;
mod sched;
