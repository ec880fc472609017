//! GPU readings through NVML (nvml-wrapper): memory used, utilization, power, SM clock per GPU.
//!
//! No NVML library or no GPU yields `Reading::NotAvailable(reason)`, never a panic.

use nvml_wrapper::enum_wrappers::device::Clock as NvClock;
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

use super::Reading;

/// One GPU at one instant. A field NVML refused is None (its reason is in `missing`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GpuReading {
    pub index: u32,
    pub name: Option<String>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization_pct: Option<u32>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    /// "field: reason" for each field that could not be read.
    pub missing: Vec<String>,
}

/// Holds an NVML handle (initialised once) or the reason it could not be had.
pub struct GpuSampler {
    nvml: Result<Nvml, String>,
}

impl GpuSampler {
    pub fn new() -> Self {
        let nvml = Nvml::init().map_err(|e| format!("NVML not available: {e}"));
        Self { nvml }
    }

    /// Why there are no readings, if so.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.nvml.as_ref().err().map(String::as_str)
    }

    /// Driver version and GPU names, for the report's config section.
    pub fn describe(&self) -> Reading<String> {
        let nvml = match &self.nvml {
            Ok(n) => n,
            Err(e) => return Reading::NotAvailable(e.clone()),
        };
        let driver = nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
        let count = nvml.device_count().unwrap_or(0);
        let names: Vec<String> = (0..count)
            .filter_map(|i| nvml.device_by_index(i).ok()?.name().ok())
            .collect();
        if names.is_empty() {
            return Reading::NotAvailable("NVML sees no GPU".into());
        }
        Reading::Value(format!("{} (driver {driver})", names.join(", ")))
    }

    /// One reading per GPU.
    pub fn read(&self) -> Reading<Vec<GpuReading>> {
        let nvml = match &self.nvml {
            Ok(n) => n,
            Err(e) => return Reading::NotAvailable(e.clone()),
        };
        let count = match nvml.device_count() {
            Ok(0) => return Reading::NotAvailable("NVML sees no GPU".into()),
            Ok(c) => c,
            Err(e) => return Reading::NotAvailable(format!("NVML device count: {e}")),
        };
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut r = GpuReading {
                index,
                ..Default::default()
            };
            let dev = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    r.missing.push(format!("device: {e}"));
                    out.push(r);
                    continue;
                }
            };
            let mut note = |field: &str, e: nvml_wrapper::error::NvmlError| {
                r.missing.push(format!("{field}: {e}"));
            };
            let name = dev.name().map_err(|e| note("name", e)).ok();
            let mem = dev.memory_info().map_err(|e| note("memory", e)).ok();
            let util = dev
                .utilization_rates()
                .map_err(|e| note("utilization", e))
                .ok();
            let power = dev.power_usage().map_err(|e| note("power", e)).ok();
            let clock = dev
                .clock_info(NvClock::SM)
                .map_err(|e| note("sm_clock", e))
                .ok();
            r.name = name;
            r.memory_used_bytes = mem.as_ref().map(|m| m.used);
            r.memory_total_bytes = mem.map(|m| m.total);
            r.utilization_pct = util.map(|u| u.gpu);
            r.power_w = power.map(|mw| f64::from(mw) / 1000.0);
            r.sm_clock_mhz = clock;
            out.push(r);
        }
        Reading::Value(out)
    }
}

impl Default for GpuSampler {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_reading_round_trips() {
        let text = include_str!("../../tests/fixtures/nvml_h100.json");
        let r: Vec<GpuReading> = serde_json::from_str(text).unwrap();
        assert_eq!(r[0].memory_used_bytes, Some(71_403_126_784));
        assert_eq!(r[0].power_w, Some(312.5));
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Vec<GpuReading>>(&back).unwrap(), r);
    }

    #[test]
    fn no_gpu_is_a_reason_not_a_panic() {
        let s = GpuSampler::new();
        match s.read() {
            Reading::Value(v) => assert!(!v.is_empty()),
            Reading::NotAvailable(reason) => assert!(!reason.is_empty()),
        }
    }
}
