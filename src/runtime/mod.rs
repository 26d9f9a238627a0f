//! What every part of libuprobe shares, at the bottom of the house: which process owns the
//! runtime, the "in the runtime" mark, the one spawner of runtime threads, the ordered list of locks
//! held across fork, the configuration, and the means to do all of it without the program's libc
//! (an allocator, `mem*` functions, raw file I/O, a futex mutex).

pub mod alloc;
pub mod config;
pub mod fork;
pub mod fs;
pub mod gate;
pub mod hash;
pub mod lock;
pub mod mark;
pub mod mem;
pub mod owner;
pub mod places;
pub mod threads;

pub use mark::{in_runtime, InRuntime};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// libuprobe does nothing in this process (see `config`: a secure-execution process without the
/// administrator's file). Every interposed function then calls the real one and nothing else.
pub static IDLE: AtomicBool = AtomicBool::new(false);

/// Is libuprobe idle in this process?
pub fn idle() -> bool {
    IDLE.load(Ordering::Relaxed)
}

/// Functions that wake a runtime thread from its wait.
type Wakers = lock::Mutex<Vec<fn()>>;

static WAKERS: OnceLock<Wakers> = OnceLock::new();

/// Register a function that wakes a runtime thread from its wait (so that it sees `stopping()`).
pub fn on_wake(f: fn()) {
    WAKERS.get_or_init(|| lock::Mutex::new(Vec::new())).lock().push(f);
}

/// Wake every runtime thread.
pub fn wake_all() {
    if let Some(w) = WAKERS.get() {
        let fs: Vec<fn()> = w.lock().clone();
        for f in fs {
            f();
        }
    }
}

/// What the runtime needs before the first probe (handlers, the link-map hook), set up once:
/// registered by the crate root, run by whoever registers the first probe.
static SETUP: OnceLock<fn() -> Result<(), String>> = OnceLock::new();
static SETUP_DONE: OnceLock<Result<(), String>> = OnceLock::new();

/// Register the setup (once, at startup).
pub fn set_setup(f: fn() -> Result<(), String>) {
    let _ = SETUP.set(f);
}

/// Run the setup, once; its outcome.
pub fn ensure_setup() -> Result<(), String> {
    SETUP_DONE
        .get_or_init(|| match SETUP.get() {
            Some(f) => f(),
            None => Err("libuprobe was not initialised".into()),
        })
        .clone()
}
