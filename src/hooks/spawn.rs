//! Children that run on their parent's memory until they exec: vfork, and glibc's posix_spawn
//! (behind `posix_spawn`, `posix_spawnp`, `system` and `popen`), which starts its child with
//! `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, but with the parent thread's TLS.
//!
//! While such a child runs, the parent thread that started it is suspended in the kernel, and the
//! child borrows its TLS: libuprobe stops counting on that thread (`runtime::mark`) for the time,
//! so that the child's hits never reach the parent's counts, on the jump path as on the trap path.
//! The cost: while a thread is inside `system()` (which also waits for its child), its own signal
//! handlers' hits are not counted either.
//!
//! And `posix_spawnattr_setsigdefault` with SIGTRAP in the set would make the child reset
//! libuprobe's SIGTRAP handler before it execs (a probe hit there would then kill it): the child
//! is given the attributes without SIGTRAP in that set (after the exec, SIGTRAP's disposition is
//! the default anyway, as the program asked).

use core::ffi::{c_char, c_int, c_void};

use crate::runtime::gate::Start;
use crate::runtime::mark::{resume_counting, suspend_counting};
use crate::sigsafe::thread::Tls;

use super::table;

/// Counting is suspended on this thread while the guard lives.
struct Suspended;

impl Suspended {
    fn new() -> Suspended {
        suspend_counting();
        Suspended
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        resume_counting();
    }
}

/// `posix_spawn` and `posix_spawnp`.
///
/// # Safety
/// As libc's.
pub unsafe fn posix_spawn(
    real: Option<table::posix_spawn::Fn>,
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let Some(real) = real else { return libc::ENOSYS };
    let mut copy: libc::posix_spawnattr_t;
    // SAFETY: attr is null or a valid, initialised attribute object per the caller; a copy of it
    // is a valid attribute object (glibc's is plain data).
    let attr = match unsafe { attr.as_ref() } {
        Some(a) => {
            copy = *a;
            // SAFETY: a zeroed sigset_t is a valid empty set.
            let mut def = unsafe { core::mem::zeroed() };
            // SAFETY: valid attribute object and sigset.
            unsafe {
                libc::posix_spawnattr_getsigdefault(&copy, &mut def);
                libc::sigdelset(&mut def, libc::SIGTRAP);
                libc::posix_spawnattr_setsigdefault(&mut copy, &def);
            }
            &copy as *const libc::posix_spawnattr_t
        }
        None => attr,
    };
    let _s = Suspended::new();
    let _g = Start::enter();
    // SAFETY: forwarding the caller's arguments (attr: a copy with the same contents but one bit).
    unsafe { real(pid, path, fa, attr, argv, envp) }
}

/// # Safety
/// As libc's `system`.
pub unsafe fn system(real: Option<table::system::Fn>, command: *const c_char) -> c_int {
    let Some(real) = real else { return -1 };
    let _s = Suspended::new();
    let _g = Start::enter();
    // SAFETY: forwarding the caller's argument.
    unsafe { real(command) }
}

/// # Safety
/// As libc's `popen`.
pub unsafe fn popen(
    real: Option<table::popen::Fn>,
    command: *const c_char,
    mode: *const c_char,
) -> *mut libc::FILE {
    let Some(real) = real else { return core::ptr::null_mut() };
    let _s = Suspended::new();
    let _g = Start::enter();
    // SAFETY: forwarding the caller's arguments.
    unsafe { real(command, mode) }
}

/// # Safety
/// As libc's `pthread_create`.
pub unsafe fn pthread_create(
    real: Option<table::pthread_create::Fn>,
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: extern "C" fn(*mut c_void) -> *mut c_void,
    arg: *mut c_void,
) -> c_int {
    let Some(real) = real else { return libc::ENOSYS };
    // libuprobe's own threads start from its runtime, which never closes the gate around them.
    let _g = (!crate::runtime::in_runtime()).then(Start::enter);
    // SAFETY: forwarding the caller's arguments.
    unsafe { real(thread, attr, start, arg) }
}

/// The real `vfork`.
pub mod vfork_real {
    use core::sync::atomic::{AtomicUsize, Ordering};
    pub static REAL: AtomicUsize = AtomicUsize::new(0);
    pub fn resolve() {
        if REAL.load(Ordering::Acquire) == 0 {
            // SAFETY: dlsym with a NUL-terminated name.
            let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"vfork".as_ptr()) };
            REAL.store(p as usize, Ordering::Release);
        }
    }
}

/// Interposed `vfork`: the child returns twice on one stack, so nothing may be kept on it across
/// the call. The return address goes to the thread's TLS record (`vfork_ret`); counting is
/// suspended before the real vfork (the child inherits that), and resumed in the parent when it
/// returns. The child leaves counting suspended: it execs or exits.
///
/// # Safety
/// As libc's.
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn vfork() -> libc::pid_t {
    core::arch::naked_asm!(
        // A thread whose TLS is not glibc's has no record of libuprobe's: the real vfork, as is.
        "mov r11, qword ptr fs:[0x28]",
        "cmp r11, qword ptr [rip + {guard}]",
        "jne 3f",
        "mov r11, qword ptr [rip + uprobe_tls@GOTTPOFF]",
        "pop qword ptr fs:[r11 + {ret_off}]",
        "call {suspend}",
        "call qword ptr [rip + {real}]",
        "test eax, eax",
        "jz 2f",
        "push rax",
        "sub rsp, 8",
        "call {resume}",
        "add rsp, 8",
        "pop rax",
        "2:",
        "mov r11, qword ptr [rip + uprobe_tls@GOTTPOFF]",
        "push qword ptr fs:[r11 + {ret_off}]",
        "ret",
        "3:",
        "jmp qword ptr [rip + {real}]",
        ret_off = const core::mem::offset_of!(Tls, vfork_ret),
        guard = sym crate::sigsafe::thread::STACK_GUARD,
        suspend = sym suspend_counting,
        resume = sym resume_counting,
        real = sym vfork_real::REAL,
    );
}
