//! Processes: fork, vfork and posix_spawn children, exec, and forks the runtime never hears of.
//!
//! The runtime belongs to one process, [`trap::OWNER_PID`]. Counting on the trap path and every
//! registry operation check it, so that:
//! - a vfork or posix_spawn child (which runs on its parent's memory until it execs) neither counts
//!   into its parent's counters nor touches its parent's runtime state;
//! - a child made by a raw `clone` (which runs no atfork handler) leaves the runtime alone: its
//!   breakpoints still resume correctly, it counts nothing and writes no summary.
//!
//! A forked child gets the runtime made consistent for one thread by the atfork handlers. What the
//! child handler may do, and does (the rustix `kernel_fork` list, kept): nothing that takes a lock
//! another thread could have held at fork (the registry lock is taken in `prepare` so it is never
//! inherited held), no allocation before the locks are ours, no waiting on other threads (there are
//! none). It takes ownership (new pid), clears the trap-path reader counts, zeroes the counters, and
//! lets go of the registry lock.
//!
//! exec: the summary of the image that execs is written first (its counts would be lost), then
//! LD_PRELOAD and UPROBES, inherited, instrument the new image. `UPROBES_FOLLOW=0` (what
//! `uprobe run --no-follow` sets) takes them out of the environment at startup instead.

use core::ffi::{c_char, c_int};
use std::sync::atomic::Ordering;

use crate::{probes, sys, trap, InRuntime};

/// Does this process own the runtime (not a vfork child, not a raw clone)?
pub fn owns_runtime() -> bool {
    sys::getpid() == trap::OWNER_PID.load(Ordering::Relaxed)
}

/// Take ownership and register the atfork handlers.
pub fn init() {
    trap::OWNER_PID.store(sys::getpid(), Ordering::SeqCst);
    // SAFETY: the three handlers are valid for the life of the process (we are never unloaded).
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

extern "C" fn prepare() {
    if !owns_runtime() {
        return;
    }
    // Held until parent()/child(): the marker keeps traps on this thread from counting while it
    // holds the registry, as in any other runtime section.
    std::mem::forget(InRuntime::enter());
    // The drain thread takes the drain lock, then the registry's: the same order here.
    crate::events::lock_for_fork();
    probes::lock_for_fork();
}

extern "C" fn parent() {
    if !owns_runtime() {
        return;
    }
    probes::unlock_after_fork(false);
    crate::events::unlock_after_fork(false);
    drop(InRuntime::resume());
}

extern "C" fn child() {
    // The parent's pid is still the owner here (memory is a copy): take over.
    if trap::OWNER_PID.load(Ordering::Relaxed) != sys::getppid() {
        return; // the fork came from a process that did not own the runtime either
    }
    trap::OWNER_PID.store(sys::getpid(), Ordering::SeqCst);
    trap::reset_readers_after_fork();
    probes::unlock_after_fork(true);
    crate::events::unlock_after_fork(true);
    // The parent's server thread does not exist here: serve a socket of our own.
    crate::control::forget_socket_after_fork();
    if let Some(output) = crate::output() {
        crate::control::start(true, output);
    }
    drop(InRuntime::resume());
}

/// `UPROBES_FOLLOW=0`: children started by exec are not instrumented.
pub fn apply_follow_setting() {
    let off =
        matches!(std::env::var("UPROBES_FOLLOW").as_deref(), Ok("0" | "no" | "false" | "off"));
    if !off {
        return;
    }
    if let Ok(preload) = std::env::var("LD_PRELOAD") {
        let kept: Vec<&str> = preload
            .split([':', ' '])
            .filter(|e| !e.is_empty() && !e.ends_with("/libuprobe.so") && *e != "libuprobe.so")
            .collect();
        if kept.is_empty() {
            std::env::remove_var("LD_PRELOAD");
        } else {
            std::env::set_var("LD_PRELOAD", kept.join(":"));
        }
    }
    for v in ["UPROBES", "UPROBES_OUTPUT", "UPROBES_FORMAT", "UPROBES_FOLLOW"] {
        std::env::remove_var(v);
    }
}

/// Before an exec replaces this image: its summary.
fn before_exec() {
    if owns_runtime() {
        crate::control::remove_socket();
        crate::write_summary();
    }
}

type ExecveFn =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
type ExecvFn = unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int;

static REAL_EXECVE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static REAL_EXECV: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static REAL_EXECVP: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static REAL_EXECVPE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Interposed `execve(2)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    before_exec();
    match real_fn!(REAL_EXECVE, "execve", ExecveFn) {
        // SAFETY: forwarding the caller's arguments.
        Some(real) => unsafe { real(path, argv, envp) },
        None => -1,
    }
}

/// Interposed `execv(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    before_exec();
    match real_fn!(REAL_EXECV, "execv", ExecvFn) {
        // SAFETY: forwarding the caller's arguments.
        Some(real) => unsafe { real(path, argv) },
        None => -1,
    }
}

/// Interposed `execvp(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    before_exec();
    match real_fn!(REAL_EXECVP, "execvp", ExecvFn) {
        // SAFETY: forwarding the caller's arguments.
        Some(real) => unsafe { real(file, argv) },
        None => -1,
    }
}

/// Interposed `execvpe(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    before_exec();
    match real_fn!(REAL_EXECVPE, "execvpe", ExecveFn) {
        // SAFETY: forwarding the caller's arguments.
        Some(real) => unsafe { real(file, argv, envp) },
        None => -1,
    }
}

/// Resolve the real exec functions while dlsym may be called (not from a vfork child).
pub fn resolve_real_functions() {
    let _ = real_fn!(REAL_EXECVE, "execve", ExecveFn);
    let _ = real_fn!(REAL_EXECV, "execv", ExecvFn);
    let _ = real_fn!(REAL_EXECVP, "execvp", ExecvFn);
    let _ = real_fn!(REAL_EXECVPE, "execvpe", ExecveFn);
}
