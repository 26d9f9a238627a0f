//! fork: the locks every part of the runtime holds across it, in one ordered list, and what a child
//! does to own a consistent copy of the runtime.
//!
//! The prepare handler takes, in this order: the runtime-threads lock (which also serializes
//! concurrent forks), then each lock of [`ForkLock`] in the order `lib.rs` registered them, then
//! the allocator's (last, so that nothing after it allocates). The parent and child handlers let go
//! in the reverse order.
//!
//! What a child may do after fork, and does (the rustix `kernel_fork` list, kept): nothing that
//! takes a lock another thread could have held at fork (every runtime lock was taken in prepare, so
//! none is inherited held by a thread that does not exist), no allocation before those locks are
//! its own, no waiting on other threads (there are none). It takes ownership (the forking process
//! owned the runtime: decided in prepare, never guessed from `getppid`), clears the table's reader
//! counts, zeroes every count, lets go of the locks, and only then starts its own runtime threads.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use super::alloc::ALLOCATOR;
use super::mark::InRuntime;
use super::{owner, threads};
use crate::sigsafe::{table, thread};

/// A lock held across fork, with what the parent and the child do to let go of it.
pub struct ForkLock {
    pub name: &'static str,
    pub lock: fn(),
    pub unlock_in_parent: fn(),
    /// In the child: let go, and make the guarded state right for a process of one thread.
    pub unlock_in_child: fn(),
}

struct Order {
    locks: Vec<ForkLock>,
    /// Run in the child once every lock is let go: start its own runtime threads.
    child_start: Vec<fn()>,
}

static ORDER: OnceLock<Order> = OnceLock::new();
/// The prepare handler took the locks (the forking process owns the runtime).
static LOCKED: AtomicBool = AtomicBool::new(false);
/// The signal mask the forking thread's runtime mark will restore (u64::MAX: none).
static SAVED_MASK: AtomicU64 = AtomicU64::new(u64::MAX);

/// Set the order (once, at startup) and register the handlers with `pthread_atfork`.
pub fn install(locks: Vec<ForkLock>, child_start: Vec<fn()>) {
    if ORDER.set(Order { locks, child_start }).is_ok() {
        // SAFETY: the handlers are valid for the life of the process (libuprobe is never
        // unloaded).
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    }
}

/// The names of the locks held across fork, in order (for the README and the tests).
pub fn lock_names() -> Vec<&'static str> {
    let mut v = vec!["runtime threads"];
    v.extend(
        ORDER.get().map(|o| o.locks.iter().map(|l| l.name).collect::<Vec<_>>()).unwrap_or_default(),
    );
    v.push("allocator");
    v
}

extern "C" fn prepare() {
    if !owner::owns() {
        owner::before_fork();
        return;
    }
    // The program's signals stay blocked until parent()/child() (a handler calling into
    // libuprobe would wait on a lock this thread holds); what libc's fork does in between is the
    // program's own work, and its probes count (`_IO_list_lock`, `_Fork`, ...).
    let rt = InRuntime::enter();
    threads::lock_for_fork();
    owner::before_fork();
    if let Some(o) = ORDER.get() {
        for l in &o.locks {
            (l.lock)();
        }
    }
    ALLOCATOR.lock_for_fork();
    LOCKED.store(true, Ordering::SeqCst);
    let mask = rt.step_out_for_fork();
    SAVED_MASK.store(mask.unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn saved_mask() -> Option<u64> {
    let m = SAVED_MASK.load(Ordering::Relaxed);
    (m != u64::MAX).then_some(m)
}

extern "C" fn parent() {
    if !LOCKED.swap(false, Ordering::SeqCst) {
        return;
    }
    InRuntime::back_from_fork();
    // SAFETY: taken in prepare() by this thread.
    unsafe { ALLOCATOR.unlock_after_fork() };
    if let Some(o) = ORDER.get() {
        for l in o.locks.iter().rev() {
            (l.unlock_in_parent)();
        }
    }
    let mask = saved_mask();
    // SAFETY: taken in prepare() by this thread.
    unsafe { threads::unlock_after_fork() };
    InRuntime::leave(mask);
}

extern "C" fn child() {
    if !LOCKED.swap(false, Ordering::SeqCst) {
        return;
    }
    InRuntime::back_from_fork();
    if !owner::child_takes_over() {
        InRuntime::leave(saved_mask());
        return;
    }
    // SAFETY: taken in prepare() by the forking thread, which is this one.
    unsafe { ALLOCATOR.unlock_after_fork() };
    table::reset_readers_after_fork();
    thread::reset_after_fork();
    if let Some(o) = ORDER.get() {
        for l in o.locks.iter().rev() {
            (l.unlock_in_child)();
        }
    }
    threads::forget_after_fork();
    let mask = saved_mask();
    // SAFETY: taken in prepare() by the forking thread, which is this one.
    unsafe { threads::unlock_after_fork() };
    if let Some(o) = ORDER.get() {
        for f in &o.child_start {
            f();
        }
    }
    InRuntime::leave(mask);
}
