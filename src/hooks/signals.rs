//! The program's own view of the signals libuprobe handles, and SIGTRAP kept out of every signal
//! mask the program sets through libc.
//!
//! Once libuprobe handles SIGTRAP and the synchronous faults (`sigsafe::chain`), `sigaction`,
//! `signal`, `bsd_signal` and `sysv_signal` read and write the program's virtual disposition of
//! those signals, which libuprobe honours for every signal that is not its business (the
//! program's own `int3`, `raise(SIGTRAP)`, a fault in the program's code).
//!
//! A breakpoint hit while SIGTRAP is blocked would be fatal (the kernel force-kills on a blocked
//! synchronous signal), so these interposers take SIGTRAP out of every mask the program asks for:
//! `sigprocmask`, `pthread_sigmask`, `sigaction`'s `sa_mask`, and the masks of `sigsuspend`,
//! `ppoll`, `pselect`, `epoll_pwait`, `epoll_pwait2`, `sigsetmask` and `sigblock`. Always, not only
//! once probes exist: a probe may be added later, through the socket. The masks glibc sets with
//! raw system calls are fixed by libuprobe's own probes (`registry::maskfix`).

use core::ffi::c_int;

use crate::sigsafe::chain::{self, AppAction};
use crate::sigsafe::sys;

use super::table;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

fn without_sigtrap(set: &libc::sigset_t) -> libc::sigset_t {
    let mut copy = *set;
    // SAFETY: a valid sigset_t and signal number.
    unsafe { libc::sigdelset(&mut copy, libc::SIGTRAP) };
    copy
}

/// `set` without SIGTRAP, or null.
fn strip(set: *const libc::sigset_t, copy: &mut libc::sigset_t) -> *const libc::sigset_t {
    // SAFETY: set is null or valid per the caller of the interposed function.
    match unsafe { set.as_ref() } {
        Some(s) => {
            *copy = without_sigtrap(s);
            copy
        }
        None => set,
    }
}

fn mask_to_sigset(mask: u64) -> libc::sigset_t {
    // SAFETY: zeroed sigset_t is a valid empty set; the first 8 bytes are the kernel's 64 signals.
    let mut set: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: sigset_t is at least 8 bytes.
    unsafe { *(&mut set as *mut _ as *mut u64) = mask };
    set
}

fn sigset_to_mask(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is at least 8 bytes.
    unsafe { *(set as *const _ as *const u64) }
}

/// # Safety
/// As libc's `sigaction`: `act` and `oldact` are null or valid.
pub unsafe fn sigaction(
    real: Option<table::sigaction::Fn>,
    sig: c_int,
    act: *const libc::sigaction,
    oldact: *mut libc::sigaction,
) -> c_int {
    if chain::is_virtual(sig) {
        if !oldact.is_null() {
            let a = chain::read(sig);
            // SAFETY: oldact is valid per the caller; zeroed is a valid sigaction.
            unsafe {
                *oldact = core::mem::zeroed();
                (*oldact).sa_sigaction = a.handler;
                (*oldact).sa_flags = (a.flags & !sys::SA_RESTORER) as c_int;
                (*oldact).sa_mask = mask_to_sigset(a.mask);
            }
        }
        // SAFETY: act is null or valid per the caller.
        if let Some(act) = unsafe { act.as_ref() } {
            chain::write(
                sig,
                AppAction {
                    handler: act.sa_sigaction,
                    flags: act.sa_flags as u32 as u64,
                    mask: sigset_to_mask(&act.sa_mask),
                },
            );
        }
        return 0;
    }
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: act is null or valid per the caller.
    match unsafe { act.as_ref() } {
        Some(a) => {
            let mut copy = *a;
            copy.sa_mask = without_sigtrap(&a.sa_mask);
            // SAFETY: forwarding valid pointers to libc.
            unsafe { real(sig, &copy, oldact) }
        }
        // SAFETY: forwarding the caller's pointers to libc.
        None => unsafe { real(sig, act, oldact) },
    }
}

fn virtual_signal(sig: c_int, handler: libc::sighandler_t, flags: u64) -> libc::sighandler_t {
    let old = chain::read(sig).handler;
    chain::write(sig, AppAction { handler, flags, mask: 0 });
    old
}

/// `signal` and `bsd_signal` (BSD semantics, as glibc's).
///
/// # Safety
/// As libc's.
pub unsafe fn signal(
    real: Option<table::signal::Fn>,
    sig: c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    if chain::is_virtual(sig) {
        return virtual_signal(sig, handler, libc::SA_RESTART as u64);
    }
    match real {
        // SAFETY: forwarding to libc.
        Some(real) => unsafe { real(sig, handler) },
        None => libc::SIG_ERR,
    }
}

/// `sysv_signal` (one-shot semantics).
///
/// # Safety
/// As libc's.
pub unsafe fn sysv_signal(
    real: Option<table::sysv_signal::Fn>,
    sig: c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    if chain::is_virtual(sig) {
        let flags = (libc::SA_RESETHAND | libc::SA_NODEFER) as u32 as u64;
        return virtual_signal(sig, handler, flags);
    }
    match real {
        // SAFETY: forwarding to libc.
        Some(real) => unsafe { real(sig, handler) },
        None => libc::SIG_ERR,
    }
}

/// # Safety
/// As libc's `sigprocmask`.
pub unsafe fn sigprocmask(
    real: Option<table::sigprocmask::Fn>,
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    let set = if how == libc::SIG_UNBLOCK { set } else { strip(set, &mut copy) };
    // SAFETY: forwarding valid pointers to libc.
    unsafe { real(how, set, old) }
}

/// # Safety
/// As libc's `pthread_sigmask`.
pub unsafe fn pthread_sigmask(
    real: Option<table::pthread_sigmask::Fn>,
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let Some(real) = real else { return libc::ENOSYS };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    let set = if how == libc::SIG_UNBLOCK { set } else { strip(set, &mut copy) };
    // SAFETY: forwarding valid pointers to libc.
    unsafe { real(how, set, old) }
}

/// # Safety
/// As libc's `sigsuspend`.
pub unsafe fn sigsuspend(real: Option<table::sigsuspend::Fn>, set: *const libc::sigset_t) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    // SAFETY: forwarding a valid pointer to libc.
    unsafe { real(strip(set, &mut copy)) }
}

/// # Safety
/// As libc's `ppoll`.
pub unsafe fn ppoll(
    real: Option<table::ppoll::Fn>,
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    // SAFETY: forwarding the caller's pointers to libc.
    unsafe { real(fds, n, tmo, strip(set, &mut copy)) }
}

/// # Safety
/// As libc's `pselect`.
pub unsafe fn pselect(
    real: Option<table::pselect::Fn>,
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    // SAFETY: forwarding the caller's pointers to libc.
    unsafe { real(n, r, w, e, tmo, strip(set, &mut copy)) }
}

/// # Safety
/// As libc's `epoll_pwait`.
pub unsafe fn epoll_pwait(
    real: Option<table::epoll_pwait::Fn>,
    fd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    tmo: c_int,
    set: *const libc::sigset_t,
) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    // SAFETY: forwarding the caller's pointers to libc.
    unsafe { real(fd, ev, max, tmo, strip(set, &mut copy)) }
}

/// # Safety
/// As libc's `epoll_pwait2`.
pub unsafe fn epoll_pwait2(
    real: Option<table::epoll_pwait2::Fn>,
    fd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    let Some(real) = real else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: a zeroed sigset_t is valid scratch.
    let mut copy = unsafe { core::mem::zeroed() };
    // SAFETY: forwarding the caller's pointers to libc.
    unsafe { real(fd, ev, max, tmo, strip(set, &mut copy)) }
}

const SIGTRAP_BIT: c_int = 1 << (libc::SIGTRAP - 1);

/// # Safety
/// As libc's `sigsetmask`.
pub unsafe fn sigsetmask(real: Option<table::sigsetmask::Fn>, mask: c_int) -> c_int {
    // SAFETY: forwarding to libc.
    real.map_or(-1, |real| unsafe { real(mask & !SIGTRAP_BIT) })
}

/// # Safety
/// As libc's `sigblock`.
pub unsafe fn sigblock(real: Option<table::sigblock::Fn>, mask: c_int) -> c_int {
    // SAFETY: forwarding to libc.
    real.map_or(-1, |real| unsafe { real(mask & !SIGTRAP_BIT) })
}
