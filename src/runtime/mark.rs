//! The "in the runtime" mark: while a thread runs libuprobe code, hits on it are not the program's
//! and are not counted (its calls into probed code, if any, still resume). This guard is the only
//! writer of a thread's mark (`sigsafe::thread::Tls::depth` and the `active` block it hides).
//!
//! On a program thread, entering also blocks the program's asynchronous signals until the
//! outermost guard is dropped, so that none of the program's signal handlers runs, uncounted,
//! inside libuprobe's code. The synchronous signals, SIGTRAP and glibc's two internal signals stay
//! open (`sys::ALWAYS_OPEN`).

use core::sync::atomic::Ordering;

use crate::sigsafe::{sys, thread};

/// Marks the current thread as running libuprobe code, until dropped.
pub struct InRuntime {
    /// The signal mask to restore, when this guard blocked signals.
    saved_mask: Option<u64>,
}

impl InRuntime {
    pub fn enter() -> InRuntime {
        let t = thread::tls();
        if thread::is_foreign_record(t) {
            // A thread whose TLS is not glibc's: no record to mark (its hits count through the
            // shared counters whatever it runs); only the signals are blocked.
            let mut old = 0u64;
            let blocked =
                sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&!sys::ALWAYS_OPEN), Some(&mut old));
            return InRuntime { saved_mask: blocked.is_ok().then_some(old) };
        }
        let depth = t.depth.load(Ordering::Relaxed);
        let mut saved_mask = None;
        if depth == 0 {
            let mut old = 0u64;
            if sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&!sys::ALWAYS_OPEN), Some(&mut old))
                .is_ok()
            {
                saved_mask = Some(old);
            }
        }
        t.depth.store(depth + 1, Ordering::Relaxed);
        t.active.store(core::ptr::null_mut(), Ordering::Relaxed);
        InRuntime { saved_mask }
    }

    /// Keep the mark past this guard's scope (across fork's prepare and parent/child handlers);
    /// [`InRuntime::leave`] ends it.
    pub fn keep(self) -> Option<u64> {
        let mask = self.saved_mask;
        core::mem::forget(self);
        mask
    }

    /// End a mark kept with [`InRuntime::keep`].
    pub fn leave(saved_mask: Option<u64>) {
        drop(InRuntime { saved_mask });
    }

    /// Fork's prepare handler, once it holds every lock: this thread runs libc's fork next (the
    /// program's own work: its probes count), with the program's signals still blocked (a
    /// handler that called into libuprobe now would wait on a lock this thread holds). The mark
    /// comes back with [`InRuntime::back_from_fork`], and goes with [`InRuntime::leave`].
    pub fn step_out_for_fork(self) -> Option<u64> {
        let mask = self.keep();
        let t = thread::tls();
        if thread::is_foreign_record(t) {
            return mask;
        }
        let depth = t.depth.load(Ordering::Relaxed).saturating_sub(1);
        t.depth.store(depth, Ordering::Relaxed);
        if depth == 0 && t.suspended.load(Ordering::Relaxed) == 0 {
            t.active.store(t.block.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        mask
    }

    /// Fork's parent or child handler: libuprobe's code again, on the mark
    /// [`InRuntime::step_out_for_fork`] left (the signals are still blocked).
    pub fn back_from_fork() {
        let t = thread::tls();
        if thread::is_foreign_record(t) {
            return;
        }
        t.depth.store(t.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        t.active.store(core::ptr::null_mut(), Ordering::Relaxed);
    }

    /// Mark this thread as a runtime thread for good (its start routine).
    pub fn for_life() {
        let t = thread::tls();
        if thread::is_foreign_record(t) {
            return;
        }
        t.depth.store(1, Ordering::Relaxed);
        t.active.store(core::ptr::null_mut(), Ordering::Relaxed);
    }
}

impl Drop for InRuntime {
    fn drop(&mut self) {
        let t = thread::tls();
        if thread::is_foreign_record(t) {
            if let Some(mask) = self.saved_mask {
                let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&mask), None);
            }
            return;
        }
        let depth = t.depth.load(Ordering::Relaxed).saturating_sub(1);
        t.depth.store(depth, Ordering::Relaxed);
        if depth == 0 && t.suspended.load(Ordering::Relaxed) == 0 {
            t.active.store(t.block.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Some(mask) = self.saved_mask {
            let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&mask), None);
        }
    }
}

/// Is this thread running libuprobe's code (or is it one of libuprobe's threads)?
pub fn in_runtime() -> bool {
    thread::tls().depth.load(Ordering::Relaxed) > 0
}

/// Hits on this thread stop counting: a vfork or posix_spawn child is about to borrow its stack
/// and TLS (and its hits are not the parent's). Called by the parent before it starts the child.
pub extern "C" fn suspend_counting() {
    let t = thread::tls();
    if thread::is_foreign_record(t) {
        return;
    }
    t.suspended.store(1, Ordering::Relaxed);
    t.active.store(core::ptr::null_mut(), Ordering::Relaxed);
}

/// The child is gone (it exec'd or exited): hits on this thread count again.
pub extern "C" fn resume_counting() {
    let t = thread::tls();
    if thread::is_foreign_record(t) {
        return;
    }
    t.suspended.store(0, Ordering::Relaxed);
    if t.depth.load(Ordering::Relaxed) == 0 {
        t.active.store(t.block.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
