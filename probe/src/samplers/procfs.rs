//! Host and process counters from /proc (procfs crate): a process's CPU% over an interval, RSS,
//! disk read bytes (/proc/<pid>/io), and the page cache (/proc/meminfo Cached/Buffers).

use std::path::{Path, PathBuf};

use procfs::process::{Io, Stat};
use procfs::FromRead;
use serde::{Deserialize, Serialize};

use super::Reading;

/// /proc/meminfo fields the reports use, in bytes; None when the kernel did not list one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MemInfo {
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    pub cached_bytes: Option<u64>,
    pub buffers_bytes: Option<u64>,
}

impl MemInfo {
    /// Parses /proc/meminfo text; missing lines stay None.
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| -> Option<u64> {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                let mut words = rest.split_whitespace();
                let n: u64 = words.next()?.parse().ok()?;
                Some(if words.next() == Some("kB") {
                    n * 1024
                } else {
                    n
                })
            })
        };
        Self {
            mem_total_bytes: field("MemTotal"),
            mem_available_bytes: field("MemAvailable"),
            cached_bytes: field("Cached"),
            buffers_bytes: field("Buffers"),
        }
    }

    pub fn read_from(path: &Path) -> Reading<Self> {
        match std::fs::read_to_string(path) {
            Ok(t) => Reading::Value(Self::parse(&t)),
            Err(e) => Reading::NotAvailable(format!("{}: {e}", path.display())),
        }
    }

    pub fn read() -> Reading<Self> {
        Self::read_from(Path::new("/proc/meminfo"))
    }

    /// Page cache = Cached + Buffers, when both are known.
    pub fn page_cache_bytes(&self) -> Option<u64> {
        Some(self.cached_bytes? + self.buffers_bytes?)
    }
}

/// One reading of a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcReading {
    pub pid: i32,
    /// user + system CPU seconds since the process started.
    pub cpu_time_s: Option<f64>,
    /// CPU% since the previous reading (100 = one core busy); None on the first reading.
    pub cpu_pct: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// Bytes this process caused to be fetched from storage (/proc/<pid>/io read_bytes).
    pub read_bytes: Option<u64>,
    /// Bytes read through read(2) and friends, page cache hits included (rchar).
    pub rchar: Option<u64>,
    /// "field: reason" for each value that could not be read.
    pub missing: Vec<String>,
}

/// CPU time and RSS from /proc/<pid>/stat text.
pub fn parse_stat(text: &str, ticks_per_s: u64, page_size: u64) -> Result<(f64, u64), String> {
    let stat = Stat::from_read(text.as_bytes()).map_err(|e| format!("stat: {e}"))?;
    let cpu = (stat.utime + stat.stime) as f64 / ticks_per_s.max(1) as f64;
    Ok((cpu, stat.rss * page_size))
}

/// (read_bytes, rchar) from /proc/<pid>/io text.
pub fn parse_io(text: &str) -> Result<(u64, u64), String> {
    let io = Io::from_read(text.as_bytes()).map_err(|e| format!("io: {e}"))?;
    Ok((io.read_bytes, io.rchar))
}

/// Samples one process; keeps the previous CPU time to turn it into a percentage.
pub struct ProcSampler {
    pid: i32,
    root: PathBuf,
    ticks_per_s: u64,
    page_size: u64,
    last: Option<(f64, f64)>,
}

impl ProcSampler {
    pub fn new(pid: i32) -> Self {
        Self::with_root(pid, PathBuf::from("/proc"))
    }

    /// Reads `<root>/<pid>/stat` and `<root>/<pid>/io` (tests point this at fixtures).
    pub fn with_root(pid: i32, root: PathBuf) -> Self {
        Self {
            pid,
            root,
            ticks_per_s: procfs::ticks_per_second(),
            page_size: procfs::page_size(),
            last: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Reads the process at clock time `now_s`.
    pub fn read(&mut self, now_s: f64) -> Reading<ProcReading> {
        let dir = self.root.join(self.pid.to_string());
        let stat_text = match std::fs::read_to_string(dir.join("stat")) {
            Ok(t) => t,
            Err(e) => return Reading::NotAvailable(format!("process {}: {e}", self.pid)),
        };
        let mut r = ProcReading {
            pid: self.pid,
            ..Default::default()
        };
        match parse_stat(&stat_text, self.ticks_per_s, self.page_size) {
            Ok((cpu, rss)) => {
                r.cpu_time_s = Some(cpu);
                r.rss_bytes = Some(rss);
                if let Some((t0, c0)) = self.last {
                    if now_s > t0 {
                        r.cpu_pct = Some(100.0 * (cpu - c0) / (now_s - t0));
                    }
                }
                self.last = Some((now_s, cpu));
            }
            Err(e) => r.missing.push(e),
        }
        match std::fs::read_to_string(dir.join("io"))
            .map_err(|e| format!("io: {e}"))
            .and_then(|t| parse_io(&t))
        {
            Ok((read_bytes, rchar)) => {
                r.read_bytes = Some(read_bytes);
                r.rchar = Some(rchar);
            }
            Err(e) => r.missing.push(e),
        }
        Reading::Value(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[test]
    fn recorded_meminfo_parses_and_missing_lines_are_none() {
        let m = MemInfo::read_from(&fixtures().join("proc_meminfo.txt"));
        let m = m.value().unwrap();
        assert_eq!(m.cached_bytes, Some(6_536_064 * 1024));
        assert_eq!(m.buffers_bytes, Some(13_352 * 1024));
        assert_eq!(m.page_cache_bytes(), Some((6_536_064 + 13_352) * 1024));
        let partial = MemInfo::parse("MemTotal: 100 kB\n");
        assert_eq!(
            (partial.mem_total_bytes, partial.cached_bytes),
            (Some(102_400), None)
        );
        assert_eq!(partial.page_cache_bytes(), None);
        assert!(MemInfo::read_from(Path::new("/nonexistent/meminfo"))
            .reason()
            .is_some());
    }

    #[test]
    fn recorded_process_files_give_cpu_rss_and_io() {
        let mut s = ProcSampler::with_root(4242, fixtures().join("proc"));
        s.ticks_per_s = 100;
        s.page_size = 4096;
        let r = s.read(1.0);
        let r = r.value().unwrap();
        assert_eq!(r.cpu_time_s, Some((19 + 1) as f64 / 100.0));
        assert_eq!(r.rss_bytes, Some(26_431 * 4096));
        assert_eq!((r.read_bytes, r.rchar), (Some(81_920), Some(211_253)));
        assert_eq!(r.cpu_pct, None, "no previous reading yet");
        assert!(r.missing.is_empty(), "{:?}", r.missing);
        // Same counters one second later: 0% CPU.
        assert_eq!(s.read(2.0).value().unwrap().cpu_pct, Some(0.0));
    }

    #[test]
    fn missing_process_files_are_reasons() {
        let mut gone = ProcSampler::with_root(1, fixtures().join("no-such-dir"));
        assert!(gone.read(0.0).reason().unwrap().contains("process 1"));
        // stat present but io missing: a value with the io reason listed.
        let mut s = ProcSampler::with_root(4343, fixtures().join("proc"));
        let r = s.read(0.0);
        let r = r.value().unwrap();
        assert!(r.rss_bytes.is_some());
        assert_eq!(r.read_bytes, None);
        assert!(
            r.missing.iter().any(|m| m.starts_with("io")),
            "{:?}",
            r.missing
        );
        // The live process (this test) can always be read.
        let mut me = ProcSampler::new(std::process::id() as i32);
        assert!(me.read(0.0).value().unwrap().rss_bytes.unwrap() > 0);
    }
}
