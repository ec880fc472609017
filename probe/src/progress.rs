//! Progress output: indicatif bars on a terminal, plain lines otherwise (logs, CI, tests).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Where progress goes.
#[derive(Debug, Clone)]
pub struct Progress {
    tty: bool,
    quiet: bool,
}

impl Progress {
    /// Bars when stderr is a terminal.
    pub fn auto() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            quiet: false,
        }
    }

    /// No output at all (tests).
    pub fn quiet() -> Self {
        Self {
            tty: false,
            quiet: true,
        }
    }

    /// One status line.
    pub fn line(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// A bar of `len` steps (hidden when not a terminal; lines still print).
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.tty || self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar
    }
}
