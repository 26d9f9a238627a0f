//! The gate between libuprobe's mask fixes going in and the program starting threads or spawned
//! children. glibc starts each of those with every signal blocked (SIGTRAP too) by a raw system
//! call; once the mask fixes are in, that call is fixed and SIGTRAP stays open. While they go in,
//! a thread that blocked everything before them would run into one of them (where it restores its
//! mask) with SIGTRAP blocked, and the kernel kills the process. So the program's
//! `pthread_create`, `posix_spawn`, `system` and `popen` wait at this gate while the mask fixes
//! are being installed, and the installation waits for those already under way.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::sigsafe::sys;

static CLOSED: AtomicBool = AtomicBool::new(false);
static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);

/// A thread or child start under way, until dropped.
pub struct Start;

impl Start {
    /// Wait while the gate is closed, then count this start as under way.
    pub fn enter() -> Start {
        loop {
            while CLOSED.load(Ordering::SeqCst) {
                sys::sleep_ns(50_000);
            }
            UNDER_WAY.fetch_add(1, Ordering::SeqCst);
            if !CLOSED.load(Ordering::SeqCst) {
                return Start;
            }
            UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closed while it lives: no new start begins, and those under way were waited for (at most
/// `timeout_ns`; a start that takes longer, a thread blocked in its own start routine's
/// caller, is not waited for beyond it).
pub struct Closed;

impl Closed {
    pub fn close(timeout_ns: u64) -> Closed {
        CLOSED.store(true, Ordering::SeqCst);
        let start = sys::monotonic_ns();
        while UNDER_WAY.load(Ordering::SeqCst) != 0
            && sys::monotonic_ns().saturating_sub(start) < timeout_ns
        {
            sys::sleep_ns(50_000);
        }
        Closed
    }
}

impl Drop for Closed {
    fn drop(&mut self) {
        CLOSED.store(false, Ordering::SeqCst);
    }
}
