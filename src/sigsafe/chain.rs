//! The program's own view of the signals libuprobe handles (SIGTRAP, and the synchronous faults
//! SIGSEGV, SIGBUS, SIGILL, SIGFPE), and delivery to it.
//!
//! Once libuprobe's handler owns such a signal, the program's `sigaction` and friends (interposed
//! in `hooks::signals`) read and write a virtual disposition kept here, which [`deliver`] honours
//! for every signal that is not libuprobe's business. Each disposition is a seqlock of atomics,
//! read without waiting.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::sys::{self, KernelSigaction};

/// The signals whose disposition is virtual once libuprobe handles them.
pub const VIRTUAL: [i32; 5] =
    [libc::SIGTRAP, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// The kernel mask of [`VIRTUAL`].
pub const VIRTUAL_MASK: u64 = sys::sigbit(libc::SIGTRAP)
    | sys::sigbit(libc::SIGSEGV)
    | sys::sigbit(libc::SIGBUS)
    | sys::sigbit(libc::SIGILL)
    | sys::sigbit(libc::SIGFPE);

/// A disposition as the program set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppAction {
    pub handler: usize,
    pub flags: u64,
    pub mask: u64,
}

struct Slot {
    seq: AtomicU32,
    handler: AtomicUsize,
    flags: AtomicU64,
    mask: AtomicU64,
    /// libuprobe's handler for this signal, once installed.
    ours: AtomicUsize,
    /// The flags libuprobe installs it with (SA_ONSTACK is added when the program asks for it).
    our_flags: AtomicU64,
    installed: AtomicBool,
}

static SLOTS: [Slot; 5] = [const {
    Slot {
        seq: AtomicU32::new(0),
        handler: AtomicUsize::new(libc::SIG_DFL),
        flags: AtomicU64::new(0),
        mask: AtomicU64::new(0),
        ours: AtomicUsize::new(0),
        our_flags: AtomicU64::new(0),
        installed: AtomicBool::new(false),
    }
}; 5];

fn slot(sig: i32) -> Option<&'static Slot> {
    let i = VIRTUAL.iter().position(|&s| s == sig)?;
    SLOTS.get(i)
}

/// Is `sig` handled by libuprobe now, with the program's disposition kept here?
pub fn is_virtual(sig: i32) -> bool {
    slot(sig).is_some_and(|s| s.installed.load(Ordering::Acquire))
}

/// The program's disposition of `sig` (a virtual one).
pub fn read(sig: i32) -> AppAction {
    let Some(s) = slot(sig) else {
        return AppAction { handler: libc::SIG_DFL, flags: 0, mask: 0 };
    };
    let mut tries = 0;
    loop {
        let seq = s.seq.load(Ordering::Acquire);
        let a = AppAction {
            handler: s.handler.load(Ordering::Acquire),
            flags: s.flags.load(Ordering::Acquire),
            mask: s.mask.load(Ordering::Acquire),
        };
        tries += 1;
        // A writer interrupted on this very thread would never finish: give up after a few tries.
        if (seq & 1 == 0 && s.seq.load(Ordering::Acquire) == seq) || tries > 64 {
            return a;
        }
        core::hint::spin_loop();
    }
}

/// Set the program's disposition of `sig`; the kernel's follows its SA_ONSTACK wish.
pub fn write(sig: i32, a: AppAction) {
    let Some(s) = slot(sig) else { return };
    let mut seq = s.seq.load(Ordering::Relaxed);
    loop {
        if seq & 1 == 0 {
            match s.seq.compare_exchange_weak(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(cur) => seq = cur,
            }
        } else {
            core::hint::spin_loop();
            seq = s.seq.load(Ordering::Relaxed);
        }
    }
    s.handler.store(a.handler, Ordering::Release);
    s.flags.store(a.flags, Ordering::Release);
    s.mask.store(a.mask, Ordering::Release);
    s.seq.store(seq.wrapping_add(2), Ordering::Release);
    if s.installed.load(Ordering::Acquire) {
        install_real(sig, s, a.flags);
    }
}

fn install_real(sig: i32, s: &Slot, app_flags: u64) {
    let act = KernelSigaction {
        handler: s.ours.load(Ordering::Acquire),
        flags: s.our_flags.load(Ordering::Acquire) | (app_flags & libc::SA_ONSTACK as u64),
        restorer: super::trap::restorer(),
        mask: !(VIRTUAL_MASK | sys::ALWAYS_OPEN),
    };
    let _ = sys::rt_sigaction(sig, Some(&act), None);
}

/// Install libuprobe's `handler` for `sig` (with `flags`), keeping the disposition it replaces as
/// the program's.
pub fn take(sig: i32, handler: usize, flags: u64) -> Result<(), sys::Errno> {
    let Some(s) = slot(sig) else { return Err(sys::Errno(libc::EINVAL)) };
    if s.installed.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut old = KernelSigaction::DEFAULT;
    sys::rt_sigaction(sig, None, Some(&mut old))?;
    s.ours.store(handler, Ordering::Release);
    s.our_flags.store(flags, Ordering::Release);
    let app =
        AppAction { handler: old.handler, flags: old.flags & !sys::SA_RESTORER, mask: old.mask };
    write(sig, app);
    s.installed.store(true, Ordering::Release);
    install_real(sig, s, app.flags);
    Ok(())
}

/// For each signal libuprobe handles: if its handler is no longer libuprobe's (a program it was
/// loaded into after start, whose calls to `sigaction` it does not see, installed its own), take
/// that disposition as the program's and put libuprobe's back. Returns how many were taken back.
pub fn reclaim() -> usize {
    let mut n = 0;
    for sig in 1..=64 {
        let Some(s) = slot(sig) else { continue };
        if !s.installed.load(Ordering::Acquire) {
            continue;
        }
        let mut now = KernelSigaction::DEFAULT;
        if sys::rt_sigaction(sig, None, Some(&mut now)).is_err() {
            continue;
        }
        if now.handler == s.ours.load(Ordering::Acquire) {
            continue;
        }
        let app = AppAction {
            handler: now.handler,
            flags: now.flags & !sys::SA_RESTORER,
            mask: now.mask,
        };
        write(sig, app);
        install_real(sig, s, app.flags);
        n += 1;
    }
    n
}

/// Hand a signal that is not libuprobe's business to the program's disposition, as the kernel
/// would have.
///
/// `refault`: returning from the handler re-executes the instruction that raised `sig` (a real
/// fault), so the default action can be left to the kernel; otherwise it is raised here.
///
/// # Safety
/// Called only from libuprobe's handler for `sig`, with the kernel's `info` and `ctx` (or ones
/// built like the kernel's).
pub unsafe fn deliver(sig: i32, info: *mut libc::siginfo_t, ctx: *mut c_void, refault: bool) {
    let a = read(sig);
    // SAFETY: valid siginfo from the kernel.
    let code = unsafe { (*info).si_code };
    let from_kernel = code > 0;
    match a.handler {
        libc::SIG_IGN if !from_kernel => {}
        libc::SIG_DFL | libc::SIG_IGN => {
            // The default action, as for a signal nobody handles.
            let _ = sys::rt_sigaction(sig, Some(&KernelSigaction::DEFAULT), None);
            if from_kernel && refault {
                // A fault: returning re-executes the faulting instruction, which now gets the
                // default action with the right context (and core dump).
                return;
            }
            let _ = sys::rt_sigprocmask(libc::SIG_UNBLOCK, Some(&sys::sigbit(sig)), None);
            sys::raise_here(sig);
        }
        handler => {
            if a.flags & libc::SA_RESETHAND as u64 != 0 {
                write(sig, AppAction { handler: libc::SIG_DFL, flags: 0, mask: 0 });
            }
            // The mask the kernel would have set for the program's handler, less SIGTRAP (which
            // must never be blocked while probes exist). sigreturn restores the interrupted mask.
            // SAFETY: ctx is the kernel's ucontext; its sigset starts with the 64-bit kernel mask.
            let interrupted = unsafe {
                *(&(*(ctx as *const libc::ucontext_t)).uc_sigmask as *const _ as *const u64)
            };
            let mut mask = interrupted | a.mask;
            if a.flags & libc::SA_NODEFER as u64 == 0 {
                mask |= sys::sigbit(sig);
            }
            mask &= !sys::sigbit(libc::SIGTRAP);
            let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&mask), None);
            if a.flags & libc::SA_SIGINFO as u64 != 0 {
                // SAFETY: the program registered this as an SA_SIGINFO handler.
                let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { core::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the program registered this as a plain handler.
                let f: extern "C" fn(i32) = unsafe { core::mem::transmute(handler) };
                f(sig);
            }
        }
    }
}
