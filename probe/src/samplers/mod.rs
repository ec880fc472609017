//! Counters sampled on the run clock: GPU (NVML), host and server process (/proc), server /metrics.

pub mod metrics;
pub mod nvml;
pub mod procfs;
pub mod task;

use serde::{Deserialize, Serialize};

pub use metrics::ServerMetrics;
pub use nvml::{GpuReading, GpuSampler};
pub use procfs::{MemInfo, ProcReading, ProcSampler};
pub use task::{Sample, SamplerConfig, SamplerTask};

/// A reading, or why there is none ("NVML library not found", "no such process"...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    Value(T),
    NotAvailable(String),
}

impl<T> Reading<T> {
    pub fn value(&self) -> Option<&T> {
        match self {
            Reading::Value(v) => Some(v),
            Reading::NotAvailable(_) => None,
        }
    }

    /// The reason when not available.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Reading::Value(_) => None,
            Reading::NotAvailable(r) => Some(r),
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Reading::Value(v) => Reading::Value(f(v)),
            Reading::NotAvailable(r) => Reading::NotAvailable(r),
        }
    }
}

impl<T, E: std::fmt::Display> From<Result<T, E>> for Reading<T> {
    fn from(r: Result<T, E>) -> Self {
        match r {
            Ok(v) => Reading::Value(v),
            Err(e) => Reading::NotAvailable(e.to_string()),
        }
    }
}
