//! Calls the kernel refuses to a multithreaded process: `unshare(CLONE_NEWUSER)` (and
//! CLONE_THREAD, CLONE_SIGHAND, CLONE_VM), `setns` into a user or mount namespace. libuprobe's own
//! threads must not change what the program can do, so they are stopped around such a call (and
//! the kernel waited for until it has forgotten them) and started again after it, whatever its
//! outcome.

use core::ffi::c_int;

use crate::runtime::threads;

use super::table;

/// Around `f`: no runtime thread.
fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    let stopped = threads::stop_all();
    let r = f();
    if stopped > 0 {
        let errors = threads::start_all();
        for e in errors {
            crate::report::problem("runtime thread", &e.to_string());
        }
    }
    r
}

/// # Safety
/// As libc's `unshare`.
pub unsafe fn unshare(real: Option<table::unshare::Fn>, flags: c_int) -> c_int {
    let Some(real) = real else { return -1 };
    let needs = libc::CLONE_NEWUSER | libc::CLONE_THREAD | libc::CLONE_SIGHAND | libc::CLONE_VM;
    if flags & needs == 0 {
        // SAFETY: forwarding the caller's argument.
        return unsafe { real(flags) };
    }
    // SAFETY: forwarding the caller's argument.
    single_threaded(|| unsafe { real(flags) })
}

/// # Safety
/// As libc's `setns`.
pub unsafe fn setns(real: Option<table::setns::Fn>, fd: c_int, nstype: c_int) -> c_int {
    let Some(real) = real else { return -1 };
    if !matches!(nstype, 0 | libc::CLONE_NEWUSER | libc::CLONE_NEWNS) {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { real(fd, nstype) };
    }
    // SAFETY: forwarding the caller's arguments.
    single_threaded(|| unsafe { real(fd, nstype) })
}
