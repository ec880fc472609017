//! Engine integration tests: one binary, one module per area.

mod api;
mod cuda_kernels;
mod model;
mod sched;
