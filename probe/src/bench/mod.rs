//! `probe bench`: load generation, statistics and reports for serving benchmarks.

pub mod cli;
pub mod compare;
pub mod dataset;
pub mod output;
pub mod plots;
pub mod run;
pub mod stats;
pub mod summary;
pub mod workload;
