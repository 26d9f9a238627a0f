//! Calls that change what one thread may do: capabilities (`capset`), the file-system ids
//! (`setfsuid`, `setfsgid`), and what `prctl` and `seccomp` set per thread (keep-caps and the other
//! securebits, the bounding and ambient sets, no_new_privs, a seccomp filter), also when made with
//! `syscall(2)`, as the raw forms of the setuid family are.
//!
//! libuprobe's threads must never hold more than the program's own (a client of the control socket
//! would talk to a thread that kept root's capabilities), nor less: glibc's `setuid` family
//! (`setuid` ... `setresgid`, `setgroups`, `initgroups`) makes every thread repeat the call, and
//! aborts the process when the result differs in one of them (setpriv restores capabilities on its
//! own thread, then calls `setresgid`). Those libc calls need nothing here, as long as every thread
//! was alike before them. So around each per-thread change, libuprobe's threads are stopped, and
//! the calling thread starts them again after it: a new thread inherits its creator's credentials,
//! capabilities, securebits, no_new_privs and seccomp filter.
//!
//! After a seccomp filter, they are not started again: a filter written for the program's threads
//! may kill the process for a call of theirs. The probes go on counting; the control socket and the
//! live event stream end (said on the report's channel), and the summary is written at exit.

use core::ffi::{c_int, c_long, c_ulong};

use super::table;
use crate::runtime::{owner, threads, InRuntime};

/// The `prctl` options that change the calling thread alone.
fn per_thread_prctl(option: c_int) -> bool {
    matches!(
        option,
        libc::PR_SET_KEEPCAPS
            | libc::PR_SET_SECUREBITS
            | libc::PR_CAPBSET_DROP
            | libc::PR_CAP_AMBIENT
            | libc::PR_SET_NO_NEW_PRIVS
    )
}

/// What a call changes of the calling thread.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Credentials, capabilities, securebits, no_new_privs.
    Privileges,
    /// A seccomp filter (or strict mode, where nothing but read, write and exit is left).
    Seccomp { strict: bool },
}

/// Around `f`, a change of the calling thread's privileges: libuprobe's threads stopped before,
/// and started again after by this thread (not after a seccomp filter). errno is the call's.
fn followed<R: Into<i64> + Copy>(change: Change, f: impl FnOnce() -> R) -> R {
    // A vfork or posix_spawn child (on its parent's memory) must not touch its parent's threads.
    if !owner::owns() || crate::runtime::in_runtime() {
        return f();
    }
    let stopped = {
        let _rt = InRuntime::enter();
        threads::stop_all()
    };
    let r = f();
    let failed = r.into() == -1;
    match change {
        // In strict mode any other system call kills the process: nothing more is done.
        Change::Seccomp { strict: true } if !failed => {
            threads::retire();
        }
        Change::Seccomp { .. } if !failed => {
            // SAFETY: __errno_location returns this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            let _rt = InRuntime::enter();
            if threads::retire() {
                crate::control::remove_socket();
                crate::report::problem(
                    "seccomp",
                    "the program installed a seccomp filter: libuprobe's threads have ended (no \
                     control socket, no live events); its probes go on counting, and the summary \
                     is written at exit",
                );
            }
            drop(_rt);
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = errno };
        }
        _ if stopped > 0 => {
            // SAFETY: __errno_location returns this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            let rt = InRuntime::enter();
            for e in threads::start_all() {
                crate::report::problem("runtime thread", &e.to_string());
            }
            drop(rt);
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = errno };
        }
        _ => {}
    }
    r
}

/// # Safety
/// As libc's `capset`.
pub unsafe fn capset(
    real: Option<table::capset::Fn>,
    hdr: *mut libc::c_void,
    data: *const libc::c_void,
) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    followed(Change::Privileges, || unsafe { real(hdr, data) })
}

/// # Safety
/// As libc's `setfsuid`.
pub unsafe fn setfsuid(real: Option<table::setfsuid::Fn>, id: libc::uid_t) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's argument.
    followed(Change::Privileges, || unsafe { real(id) })
}

/// # Safety
/// As libc's `setfsgid`.
pub unsafe fn setfsgid(real: Option<table::setfsgid::Fn>, id: libc::gid_t) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's argument.
    followed(Change::Privileges, || unsafe { real(id) })
}

/// # Safety
/// As libc's `prctl` (its variadic arguments are read as the five words the kernel takes).
pub unsafe fn prctl(
    real: Option<table::prctl::Fn>,
    option: c_int,
    a2: c_ulong,
    a3: c_ulong,
    a4: c_ulong,
    a5: c_ulong,
) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { real(option, a2, a3, a4, a5) };
    match prctl_change(option, a2 as c_long) {
        Some(change) => followed(change, call),
        None => call(),
    }
}

/// What `prctl(option, arg2, ...)` changes of the calling thread, if anything.
fn prctl_change(option: c_int, arg2: c_long) -> Option<Change> {
    match option {
        libc::PR_SET_SECCOMP => match arg2 as u32 {
            libc::SECCOMP_MODE_STRICT => Some(Change::Seccomp { strict: true }),
            libc::SECCOMP_MODE_FILTER => Some(Change::Seccomp { strict: false }),
            _ => None,
        },
        _ if per_thread_prctl(option) => Some(Change::Privileges),
        _ => None,
    }
}

/// What a raw system call changes of the calling thread (there is no glibc broadcast to the
/// other threads then), if anything.
fn raw_change(nr: c_long, a1: c_long, a2: c_long) -> Option<Change> {
    match nr {
        libc::SYS_setuid
        | libc::SYS_setgid
        | libc::SYS_setreuid
        | libc::SYS_setregid
        | libc::SYS_setresuid
        | libc::SYS_setresgid
        | libc::SYS_setgroups
        | libc::SYS_setfsuid
        | libc::SYS_setfsgid
        | libc::SYS_capset => Some(Change::Privileges),
        libc::SYS_prctl => prctl_change(a1 as c_int, a2),
        libc::SYS_seccomp => match a1 as u32 {
            libc::SECCOMP_SET_MODE_STRICT => Some(Change::Seccomp { strict: true }),
            libc::SECCOMP_SET_MODE_FILTER => Some(Change::Seccomp { strict: false }),
            _ => None,
        },
        _ => None,
    }
}

/// # Safety
/// As libc's `syscall` (its variadic arguments are read as the six words the kernel takes).
#[allow(clippy::too_many_arguments, reason = "the system call number and its six arguments")]
pub unsafe fn syscall(
    real: Option<table::syscall::Fn>,
    nr: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { real(nr, a1, a2, a3, a4, a5, a6) };
    match raw_change(nr, a1, a2) {
        None => call(),
        Some(change) => followed(change, call),
    }
}
