//! The one clock every record and sample of a run is stamped with (seconds since run start).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic run clock. `now_s()` is seconds since `start`; `start_unix_s` anchors it to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub start_unix_s: f64,
}

impl Clock {
    pub fn start() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self {
            start: Instant::now(),
            start_unix_s: unix,
        }
    }

    pub fn now_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn at_s(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }
}
