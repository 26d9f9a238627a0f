//! The program's view of SIGTRAP, kept apart from ours.
//!
//! libuprobe owns the SIGTRAP disposition for the life of the process. The program still gets its
//! own: `sigaction`, `signal`, `bsd_signal` and `sysv_signal` are interposed, and for SIGTRAP they
//! read and write a virtual disposition that [`chain`] honours for every trap that is not a
//! breakpoint of ours (its own `int3`, `raise(SIGTRAP)`, a `kill` from outside).
//!
//! A breakpoint hit while SIGTRAP is blocked would be fatal (the kernel force-kills on a blocked
//! synchronous signal), so the same interposers, and `sigprocmask`/`pthread_sigmask`, take SIGTRAP
//! out of every mask the program asks for. What is left unseen: masks set with a raw system call
//! (glibc's own `pthread_create` and `posix_spawn` block everything for a few instructions).
//!
//! # Safety
//!
//! [`chain`] runs in the trap handler: async-signal-safe, raw system calls only. The virtual
//! disposition is a seqlock of atomics, read without waiting; the interposers (which libc documents
//! as async-signal-safe) write it without allocation or locks.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::sys;

static SEQ: AtomicU32 = AtomicU32::new(0);
static HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static FLAGS: AtomicU64 = AtomicU64::new(0);
static MASK: AtomicU64 = AtomicU64::new(0);
static OURS: AtomicUsize = AtomicUsize::new(0); // 1 once our SIGTRAP handler is installed

#[derive(Clone, Copy)]
struct AppAction {
    handler: usize,
    flags: u64,
    mask: u64,
}

fn read_action() -> AppAction {
    let mut tries = 0;
    loop {
        let s = SEQ.load(Ordering::Acquire);
        let a = AppAction {
            handler: HANDLER.load(Ordering::Acquire),
            flags: FLAGS.load(Ordering::Acquire),
            mask: MASK.load(Ordering::Acquire),
        };
        tries += 1;
        // A writer interrupted on this very thread would never finish: give up after a few tries.
        if (s & 1 == 0 && SEQ.load(Ordering::Acquire) == s) || tries > 64 {
            return a;
        }
        core::hint::spin_loop();
    }
}

fn write_action(a: AppAction) {
    let mut s = SEQ.load(Ordering::Relaxed);
    loop {
        if s & 1 == 0 {
            match SEQ.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(cur) => s = cur,
            }
        } else {
            core::hint::spin_loop();
            s = SEQ.load(Ordering::Relaxed);
        }
    }
    HANDLER.store(a.handler, Ordering::Release);
    FLAGS.store(a.flags, Ordering::Release);
    MASK.store(a.mask, Ordering::Release);
    SEQ.store(s + 2, Ordering::Release);
}

/// Record that our handler is installed, and what it replaced (the program's inherited view).
pub fn took_sigtrap(previous: sys::KernelSigaction) {
    write_action(AppAction {
        handler: previous.handler,
        flags: previous.flags,
        mask: previous.mask,
    });
    OURS.store(1, Ordering::Release);
}

fn ours() -> bool {
    OURS.load(Ordering::Acquire) != 0
}

/// Hand a SIGTRAP that is not a breakpoint of ours to the program's disposition.
///
/// # Safety
/// Called only from the SIGTRAP handler with the kernel's `info` and `ctx`.
pub unsafe fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let a = read_action();
    // SAFETY: valid siginfo from the kernel.
    let from_cpu = unsafe { (*info).si_code } == 0x80;
    match a.handler {
        libc::SIG_IGN if !from_cpu => {}
        libc::SIG_DFL | libc::SIG_IGN => {
            // As the kernel does for a trap nobody handles: the default action (core dump).
            let dfl =
                sys::KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
            let _ = sys::rt_sigaction(sig, Some(&dfl), None);
            let _ = sys::rt_sigprocmask(libc::SIG_UNBLOCK, Some(&sys::sigbit(sig)), None);
            sys::raise_here(sig);
        }
        handler => {
            if a.flags & libc::SA_RESETHAND as u64 != 0 {
                write_action(AppAction { handler: libc::SIG_DFL, flags: 0, mask: 0 });
            }
            // The mask the kernel would have set for the program's handler, less SIGTRAP (which must
            // never be blocked while breakpoints exist). sigreturn restores the interrupted mask.
            // SAFETY: ctx is the kernel's ucontext; its sigset starts with the 64-bit kernel mask.
            let interrupted = unsafe {
                *(&(*(ctx as *const libc::ucontext_t)).uc_sigmask as *const _ as *const u64)
            };
            let mask = (interrupted | a.mask) & !sys::sigbit(libc::SIGTRAP);
            let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&mask), None);
            if a.flags & libc::SA_SIGINFO as u64 != 0 {
                // SAFETY: the program registered this as an SA_SIGINFO handler.
                let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { core::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the program registered this as a plain handler.
                let f: extern "C" fn(c_int) = unsafe { core::mem::transmute(handler) };
                f(sig);
            }
        }
    }
}

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_BSD_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_SYSV_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;
type MaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

/// Resolve every real function now, while calling dlsym is allowed.
pub fn resolve_real_functions() {
    let _ = real_fn!(REAL_SIGACTION, "sigaction", SigactionFn);
    let _ = real_fn!(REAL_SIGNAL, "signal", SignalFn);
    let _ = real_fn!(REAL_BSD_SIGNAL, "bsd_signal", SignalFn);
    let _ = real_fn!(REAL_SYSV_SIGNAL, "sysv_signal", SignalFn);
    let _ = real_fn!(REAL_SIGPROCMASK, "sigprocmask", MaskFn);
    let _ = real_fn!(REAL_PTHREAD_SIGMASK, "pthread_sigmask", MaskFn);
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// `sigset_t` with SIGTRAP taken out.
fn without_sigtrap(set: &libc::sigset_t) -> libc::sigset_t {
    let mut copy = *set;
    // SAFETY: a valid sigset_t and signal number.
    unsafe { libc::sigdelset(&mut copy, libc::SIGTRAP) };
    copy
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

/// Interposed `sigaction(2)`.
///
/// # Safety
/// As libc's: `act` and `oldact` are null or valid.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    oldact: *mut libc::sigaction,
) -> c_int {
    if sig == libc::SIGTRAP && ours() {
        if !oldact.is_null() {
            let a = read_action();
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
            write_action(AppAction {
                handler: act.sa_sigaction,
                flags: act.sa_flags as u32 as u64,
                mask: sigset_to_mask(&act.sa_mask),
            });
        }
        return 0;
    }
    let Some(real) = real_fn!(REAL_SIGACTION, "sigaction", SigactionFn) else {
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
        _ => unsafe { real(sig, act, oldact) },
    }
}

fn virtual_signal(handler: libc::sighandler_t, flags: u64) -> libc::sighandler_t {
    let old = read_action().handler;
    write_action(AppAction { handler, flags, mask: 0 });
    old
}

/// Interposed `signal(3)` (BSD semantics, as glibc's).
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == libc::SIGTRAP && ours() {
        return virtual_signal(handler, libc::SA_RESTART as u64);
    }
    match real_fn!(REAL_SIGNAL, "signal", SignalFn) {
        // SAFETY: forwarding to libc.
        Some(real) => unsafe { real(sig, handler) },
        None => libc::SIG_ERR,
    }
}

/// Interposed `bsd_signal(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == libc::SIGTRAP && ours() {
        return virtual_signal(handler, libc::SA_RESTART as u64);
    }
    match real_fn!(REAL_BSD_SIGNAL, "bsd_signal", SignalFn) {
        // SAFETY: forwarding to libc.
        Some(real) => unsafe { real(sig, handler) },
        None => libc::SIG_ERR,
    }
}

/// Interposed `sysv_signal(3)` (one-shot semantics).
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn sysv_signal(
    sig: c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    if sig == libc::SIGTRAP && ours() {
        let flags = (libc::SA_RESETHAND | libc::SA_NODEFER) as u32 as u64;
        return virtual_signal(handler, flags);
    }
    match real_fn!(REAL_SYSV_SIGNAL, "sysv_signal", SignalFn) {
        // SAFETY: forwarding to libc.
        Some(real) => unsafe { real(sig, handler) },
        None => libc::SIG_ERR,
    }
}

unsafe fn forward_mask(
    real: Option<MaskFn>,
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
    errno_style: bool,
) -> c_int {
    let Some(real) = real else {
        if errno_style {
            set_errno(libc::ENOSYS);
            return -1;
        }
        return libc::ENOSYS;
    };
    // SAFETY: set is null or valid per the caller.
    match unsafe { set.as_ref() } {
        // Always, not only once probes exist: a probe may be added later, through the socket.
        Some(s) if how != libc::SIG_UNBLOCK => {
            let copy = without_sigtrap(s);
            // SAFETY: forwarding valid pointers to libc.
            unsafe { real(how, &copy, old) }
        }
        // SAFETY: forwarding the caller's pointers to libc.
        _ => unsafe { real(how, set, old) },
    }
}

/// Interposed `sigprocmask(2)`: SIGTRAP cannot be blocked while breakpoints may exist.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let real = real_fn!(REAL_SIGPROCMASK, "sigprocmask", MaskFn);
    // SAFETY: the caller's contract.
    unsafe { forward_mask(real, how, set, old, true) }
}

/// Interposed `pthread_sigmask(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    let real = real_fn!(REAL_PTHREAD_SIGMASK, "pthread_sigmask", MaskFn);
    // SAFETY: the caller's contract.
    unsafe { forward_mask(real, how, set, old, false) }
}
