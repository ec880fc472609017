//! Server lifecycle: spawn a server (our engine or any `--server-cmd`) in its own process group,
//! capture its log, poll `/health` until ready, read its startup facts, and kill it on drop.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::clock::Clock;

/// Log lines kept in memory for error messages.
const TAIL_LINES: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server command is empty or has unbalanced quotes: {0:?}")]
    BadCommand(String),
    #[error("could not start `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("could not write the server log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free local port: {0}")]
    Port(std::io::Error),
    #[error(
        "server not ready after {waited_s:.1} s (no 200 from {health_url}); last log lines:\n{tail}"
    )]
    NotReady {
        waited_s: f64,
        health_url: String,
        tail: String,
    },
    #[error("server exited ({status}) before it was ready; last log lines:\n{tail}")]
    Exited { status: String, tail: String },
    #[error("no engine binary: {0}")]
    NoEngine(String),
    #[error("building the engine failed: {0}")]
    Build(String),
}

/// Where the engine binary is: `$ENGINE_BIN`, next to this executable, or None.
pub fn find_engine_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENGINE_BIN").map(PathBuf::from) {
        return Some(p);
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in target/<profile>/deps; the engine sits one level up.
    [dir.join("engine"), dir.join("../engine")]
        .into_iter()
        .find(|p| p.is_file())
}

/// The workspace root this probe was built from, if it still exists (has `engine/Cargo.toml`).
pub fn workspace_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    root.join("engine/Cargo.toml").is_file().then_some(root)
}

/// Finds the engine binary, building it with `cargo build --release -p engine` (output shown)
/// when absent and the probe runs from its workspace.
pub async fn engine_bin_or_build() -> Result<PathBuf, ServerError> {
    if let Some(p) = find_engine_bin() {
        return Ok(p);
    }
    let root = workspace_root().ok_or_else(|| {
        ServerError::NoEngine("set $ENGINE_BIN or put `engine` next to `probe`".into())
    })?;
    eprintln!("engine binary not found; building it: cargo build --release -p engine");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "engine"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .await
        .map_err(|e| ServerError::Build(e.to_string()))?;
    if !status.success() {
        return Err(ServerError::Build(format!("cargo exited with {status}")));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/engine");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(ServerError::Build(format!(
            "built, but {} is missing",
            bin.display()
        )))
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for a server started right after).
pub fn free_port() -> Result<u16, ServerError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(ServerError::Port)?;
    Ok(l.local_addr().map_err(ServerError::Port)?.port())
}

/// Splits a shell-words command and replaces `{port}` in every word.
pub fn command_words(cmd: &str, port: u16) -> Result<Vec<String>, ServerError> {
    let words = shlex::split(cmd).filter(|w| !w.is_empty());
    let words = words.ok_or_else(|| ServerError::BadCommand(cmd.to_string()))?;
    Ok(words
        .into_iter()
        .map(|w| w.replace("{port}", &port.to_string()))
        .collect())
}

/// What to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// argv, placeholders already substituted.
    pub argv: Vec<String>,
    pub port: u16,
    pub log_path: PathBuf,
    pub ready_timeout: Duration,
    /// Extra environment for the child.
    pub env: Vec<(String, String)>,
}

impl LaunchSpec {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The exact launch command, shell-quoted.
    pub fn command_line(&self) -> String {
        shlex::try_join(self.argv.iter().map(String::as_str))
            .unwrap_or_else(|_| self.argv.join(" "))
    }
}

/// A running server. Dropping it kills its whole process group.
pub struct ServerHandle {
    child: Child,
    pub pid: u32,
    pub url: String,
    pub log_path: PathBuf,
    /// Clock time of the spawn.
    pub spawn_s: f64,
    /// Clock time `/health` first answered 200.
    pub ready_s: Option<f64>,
    tail: Arc<Mutex<VecDeque<String>>>,
    killed: bool,
}

impl ServerHandle {
    /// Spawns the command in a new process group, teeing stdout+stderr to `log_path`.
    pub async fn spawn(spec: &LaunchSpec, clock: &Clock) -> Result<Self, ServerError> {
        let (prog, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| ServerError::BadCommand(String::new()))?;
        if let Some(dir) = spec.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Log {
                path: spec.log_path.clone(),
                source,
            })?;
        }
        let file = tokio::fs::File::create(&spec.log_path)
            .await
            .map_err(|source| ServerError::Log {
                path: spec.log_path.clone(),
                source,
            })?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let spawn_s = clock.now_s();
        let mut child = cmd.spawn().map_err(|source| ServerError::Spawn {
            cmd: spec.command_line(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(err, tx);
        }
        let tail_w = tail.clone();
        tokio::spawn(async move {
            let mut file = file;
            while let Some(line) = rx.recv().await {
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
                let _ = file.flush().await;
                let mut t = tail_w.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Self {
            child,
            pid,
            url: spec.url(),
            log_path: spec.log_path.clone(),
            spawn_s,
            ready_s: None,
            tail,
            killed: false,
        })
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().skip(t.len().saturating_sub(n)).cloned().collect()
    }

    /// All captured log text still in memory (the last 200 lines).
    pub fn log_text(&self) -> String {
        self.log_tail(TAIL_LINES).join("\n")
    }

    /// Polls `/health` every 50 ms until 200, the process exits, or `timeout` passes.
    /// Returns spawn->ready seconds.
    pub async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        clock: &Clock,
        timeout: Duration,
    ) -> Result<f64, ServerError> {
        let health_url = format!("{}/health", self.url);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the log readers a moment to drain the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ServerError::Exited {
                    status: status.to_string(),
                    tail: self.log_tail(20).join("\n"),
                });
            }
            let ok = http
                .get(&health_url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                let now = clock.now_s();
                self.ready_s = Some(now);
                return Ok(now - self.spawn_s);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServerError::NotReady {
                    waited_s: timeout.as_secs_f64(),
                    health_url,
                    tail: self.log_tail(20).join("\n"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`. Idempotent.
    pub async fn shutdown(&mut self, grace: Duration) {
        if self.killed {
            return;
        }
        signal_group(self.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            signal_group(self.pid, libc::SIGKILL);
            let _ = self.child.wait().await;
        }
        signal_group(self.pid, libc::SIGKILL);
        self.killed = true;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.killed {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

fn signal_group(pid: u32, sig: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid signals the process group we created at spawn.
        unsafe {
            libc::kill(-(pid as libc::pid_t), sig);
        }
    }
}

fn spawn_reader<R>(r: R, tx: tokio::sync::mpsc::UnboundedSender<String>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
}

/// Drops terminal color codes (`ESC [ ... letter`) so logs read cleanly and parse reliably.
pub fn strip_ansi(line: &str) -> String {
    if !line.contains('\u{1b}') {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Facts a server states about itself at startup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartupFacts {
    /// vLLM: `KV cache size: N tokens`.
    pub kv_cache_tokens: Option<u64>,
    /// vLLM: `Maximum concurrency for N tokens per request: X.XXx`.
    pub max_concurrency_tokens: Option<u64>,
    pub max_concurrency: Option<f64>,
    /// vLLM's engine config line: `... tensor_parallel_size=2, ...`.
    #[serde(default)]
    pub tensor_parallel_size: Option<u64>,
    /// Our engine's `GET /v1/engine/startup` JSON (phases in seconds, sizes).
    pub engine_startup: Option<serde_json::Value>,
}

impl StartupFacts {
    /// Parses the vLLM-style lines out of a server log (last occurrence wins).
    pub fn from_log(log: &str) -> Self {
        let mut f = Self::default();
        for line in log.lines() {
            if let Some(rest) = after(line, "tensor_parallel_size=") {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(n) = digits.parse() {
                    f.tensor_parallel_size = Some(n);
                }
            }
            if let Some(rest) = after(line, "KV cache size:") {
                if let Some(n) = rest.split_whitespace().next().and_then(parse_count) {
                    f.kv_cache_tokens = Some(n);
                }
            }
            if let Some(rest) = after(line, "Maximum concurrency for") {
                let mut words = rest.split_whitespace();
                let tokens = words.next().and_then(parse_count);
                let factor = rest
                    .rsplit(':')
                    .next()
                    .map(|s| s.trim().trim_end_matches('x').trim_end_matches('.'))
                    .and_then(|s| s.parse::<f64>().ok());
                if tokens.is_some() && factor.is_some() {
                    f.max_concurrency_tokens = tokens;
                    f.max_concurrency = factor;
                }
            }
        }
        f
    }

    /// GETs `/v1/engine/startup`; None when the server has no such route or says nothing useful.
    pub async fn fetch_engine_startup(
        http: &reqwest::Client,
        url: &str,
    ) -> Option<serde_json::Value> {
        let r = http
            .get(format!("{url}/v1/engine/startup"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json::<serde_json::Value>()
            .await
            .ok()
            .filter(|v| v.is_object())
    }

    /// Ranks the server splits the model over: our engine's startup report, else vLLM's log.
    pub fn tensor_parallel_size(&self) -> Option<u64> {
        self.engine_startup
            .as_ref()
            .and_then(|v| v.get("tensor_parallel_size"))
            .and_then(|v| v.as_u64())
            .or(self.tensor_parallel_size)
    }

    /// Startup phase seconds from the engine report (`phases` object), sorted as reported.
    pub fn phases(&self) -> Vec<(String, f64)> {
        self.engine_startup
            .as_ref()
            .and_then(|v| v.get("phases"))
            .and_then(|p| p.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn phase(&self, name: &str) -> Option<f64> {
        self.engine_startup
            .as_ref()?
            .get("phases")?
            .get(name)?
            .as_f64()
    }
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// `23,296` / `23296` / `23_296` -> 23296.
fn parse_count(s: &str) -> Option<u64> {
    let digits: String = s.chars().filter(|c| !matches!(c, ',' | '_')).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_parse_with_and_without_separators() {
        let log = "INFO [kv_cache_utils.py:716] GPU KV cache size: 23,296 tokens\n\
                   INFO [kv_cache_utils.py:720] Maximum concurrency for 2,048 tokens per request: 11.38x\n";
        let f = StartupFacts::from_log(log);
        assert_eq!(f.kv_cache_tokens, Some(23296));
        assert_eq!(f.max_concurrency_tokens, Some(2048));
        assert_eq!(f.max_concurrency, Some(11.38));
        let g = StartupFacts::from_log(
            "KV cache size: 512 tokens\nMaximum concurrency for 8192 tokens per request: 0.06x",
        );
        assert_eq!(
            (g.kv_cache_tokens, g.max_concurrency),
            (Some(512), Some(0.06))
        );
        assert_eq!(
            StartupFacts::from_log("nothing here"),
            StartupFacts::default()
        );
    }

    #[test]
    fn tensor_parallel_size_from_vllm_log_or_engine_report() {
        let vllm = "INFO 12-01 [core.py:69] Initializing a V1 LLM engine (v0.10.1) with config: \
                    model='codellama/CodeLlama-34b-hf', dtype=torch.bfloat16, \
                    tensor_parallel_size=2, pipeline_parallel_size=1, quantization=None";
        let f = StartupFacts::from_log(vllm);
        assert_eq!(f.tensor_parallel_size(), Some(2));
        let g = StartupFacts {
            engine_startup: Some(serde_json::json!({"tensor_parallel_size": 4})),
            ..f
        };
        assert_eq!(
            g.tensor_parallel_size(),
            Some(4),
            "the engine's own report wins"
        );
        assert_eq!(StartupFacts::default().tensor_parallel_size(), None);
    }

    #[test]
    fn phases_come_from_the_engine_report() {
        let f = StartupFacts {
            engine_startup: Some(
                serde_json::json!({"phases": {"weights_load": 1.5, "warmup": 0.25}}),
            ),
            ..Default::default()
        };
        assert_eq!(f.phase("weights_load"), Some(1.5));
        assert_eq!(f.phases().len(), 2);
        assert_eq!(StartupFacts::default().phase("weights_load"), None);
    }

    #[test]
    fn ansi_colors_are_stripped() {
        let l = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m KV cache size: 23,296 tokens";
        assert_eq!(strip_ansi(l), "2026  INFO KV cache size: 23,296 tokens");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn command_words_substitute_the_port() {
        let w = command_words("vllm serve 'my model' --port {port}", 8123).unwrap();
        assert_eq!(w, vec!["vllm", "serve", "my model", "--port", "8123"]);
        assert!(command_words("a 'unbalanced", 1).is_err());
        assert!(command_words("   ", 1).is_err());
    }
}
