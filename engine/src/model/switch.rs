//! Process-wide on/off switches for the engine's optional kernel paths, each overridable on one
//! thread (tests and benchmarks compare two paths while other threads keep their own).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::LocalKey;

/// Declares `static NAME: Switch` with its own per-thread override cell:
/// `switch! { /// doc \n static NAME = true; }`.
#[macro_export]
macro_rules! switch {
    ($(#[$doc:meta])* $vis:vis static $name:ident = $on:expr;) => {
        $(#[$doc])*
        $vis static $name: $crate::model::switch::Switch = {
            thread_local! {
                static HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
            }
            $crate::model::switch::Switch::new($on, &HERE)
        };
    };
}

/// One switch: a process-wide value and a per-thread override (`None`: follow the process).
pub struct Switch {
    on: AtomicBool,
    this_thread: &'static LocalKey<Cell<Option<bool>>>,
}

impl Switch {
    /// `this_thread` is the switch's own `thread_local!` cell.
    pub const fn new(on: bool, this_thread: &'static LocalKey<Cell<Option<bool>>>) -> Self {
        Self {
            on: AtomicBool::new(on),
            this_thread,
        }
    }

    /// Sets the process-wide value.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// The process-wide value, whatever this thread's override.
    pub fn process(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Overrides the switch for calls on this thread (`None`: follow the process-wide value).
    pub fn set_on_this_thread(&self, on: Option<bool>) {
        self.this_thread.with(|t| t.set(on));
    }

    /// This thread's override, if any.
    pub fn this_thread(&self) -> Option<bool> {
        self.this_thread.with(Cell::get)
    }

    /// The value on this thread: its override, else the process-wide value.
    pub fn on(&self) -> bool {
        self.this_thread().unwrap_or_else(|| self.process())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static HERE: Cell<Option<bool>> = const { Cell::new(None) };
    }
    static S: Switch = Switch::new(true, &HERE);

    #[test]
    fn the_thread_override_wins_on_its_thread_only() {
        assert!(S.on());
        S.set_on_this_thread(Some(false));
        assert!(!S.on() && S.process());
        std::thread::spawn(|| assert!(S.on())).join().unwrap();
        S.set_on_this_thread(None);
        assert!(S.on());
    }
}
