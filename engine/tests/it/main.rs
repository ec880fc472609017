//! Engine integration tests: one binary, one module per area.

mod cuda_kernels;
mod model;
