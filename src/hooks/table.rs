//! Every function libuprobe interposes, in one list. For each, the macros generate the exported
//! function (which calls its body in the hook module named), a module of the same name holding
//! the real function's address (the next definition after ours, found with `dlsym(RTLD_NEXT)`),
//! and its resolution. Addresses are resolved once at startup, so that no interposer calls `dlsym`
//! later (it is not async-signal-safe, and a vfork child must not call it).

use core::ffi::{c_char, c_int, c_long, c_void};

use super::{creds, dl, exec, ns, signals, spawn};

macro_rules! interpose {
    ($( fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $body:path; )*) => {
        $(
            #[allow(non_snake_case, non_camel_case_types)]
            pub mod $name {
                #[allow(unused_imports)]
                use super::*;
                use core::sync::atomic::{AtomicUsize, Ordering};
                pub static REAL: AtomicUsize = AtomicUsize::new(0);
                pub type Fn = unsafe extern "C" fn($($ty),*) -> $ret;
                /// Find the real function (the next definition after ours).
                pub fn resolve() {
                    if REAL.load(Ordering::Acquire) == 0 {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: dlsym with a NUL-terminated name.
                        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
                        REAL.store(p as usize, Ordering::Release);
                    }
                }
                /// The real function, or None if libc has none.
                pub fn real() -> Option<Fn> {
                    let mut p = REAL.load(Ordering::Acquire);
                    if p == 0 {
                        resolve();
                        p = REAL.load(Ordering::Acquire);
                    }
                    // SAFETY: the symbol has this C signature in libc.
                    (p != 0).then(|| unsafe { core::mem::transmute::<usize, Fn>(p) })
                }
            }

            /// Interposed (see `hooks::table`).
            ///
            /// # Safety
            /// As the real function's.
            #[no_mangle]
            #[allow(unreachable_code, clippy::diverging_sub_expression, reason = "`_exit` and `_Exit` never return")]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                let real = $name::real();
                if crate::runtime::idle() {
                    if let Some(real) = real {
                        // SAFETY: forwarding the caller's arguments under the caller's contract.
                        return unsafe { real($($arg),*) };
                    }
                }
                // SAFETY: forwarding the caller's arguments under the caller's contract.
                unsafe { $body(real, $($arg),*) }
            }
        )*

        /// Resolve every real function now, while `dlsym` may be called.
        pub fn resolve_all() {
            $( $name::resolve(); )*
            super::unwind::resolve_all();
            spawn::vfork_real::resolve();
        }

        /// Every interposed name (the ones with a body of their own; the unwinder wrappers and
        /// vfork are in `hooks::unwind` and `hooks::spawn`).
        pub const INTERPOSED: &[&str] = &[$(stringify!($name)),*];
    };
}

interpose! {
    // Objects appearing and vanishing (hooks::dl).
    fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void => dl::dlopen;
    fn dlmopen(lmid: c_long, file: *const c_char, mode: c_int) -> *mut c_void => dl::dlmopen;
    fn dlclose(handle: *mut c_void) -> c_int => dl::dlclose;
    fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void => dl::mmap;
    fn mmap64(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void => dl::mmap;
    fn munmap(addr: *mut c_void, len: usize) -> c_int => dl::munmap;
    // The program's view of the signals libuprobe handles, and SIGTRAP kept out of every mask
    // (hooks::signals).
    fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int => signals::sigaction;
    fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal;
    fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::signal;
    fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t => signals::sysv_signal;
    fn sigprocmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int => signals::sigprocmask;
    fn pthread_sigmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int => signals::pthread_sigmask;
    fn sigsuspend(set: *const libc::sigset_t) -> c_int => signals::sigsuspend;
    fn ppoll(fds: *mut libc::pollfd, n: libc::nfds_t, tmo: *const libc::timespec, set: *const libc::sigset_t) -> c_int => signals::ppoll;
    fn pselect(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, tmo: *const libc::timespec, set: *const libc::sigset_t) -> c_int => signals::pselect;
    fn epoll_pwait(fd: c_int, ev: *mut libc::epoll_event, max: c_int, tmo: c_int, set: *const libc::sigset_t) -> c_int => signals::epoll_pwait;
    fn epoll_pwait2(fd: c_int, ev: *mut libc::epoll_event, max: c_int, tmo: *const libc::timespec, set: *const libc::sigset_t) -> c_int => signals::epoll_pwait2;
    fn sigsetmask(mask: c_int) -> c_int => signals::sigsetmask;
    fn sigblock(mask: c_int) -> c_int => signals::sigblock;
    // exec: the summary of the image that goes (hooks::exec).
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => exec::execve;
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int => exec::execv;
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int => exec::execvp;
    fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => exec::execvpe;
    // _exit: the summary of an image that ends without exit handlers (hooks::exec).
    fn _exit(status: c_int) -> ! => exec::exit_now;
    fn _Exit(status: c_int) -> ! => exec::exit_now;
    // Children that borrow the parent's memory (hooks::spawn; vfork is in assembly there).
    fn posix_spawn(pid: *mut libc::pid_t, path: *const c_char, fa: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => spawn::posix_spawn;
    fn posix_spawnp(pid: *mut libc::pid_t, file: *const c_char, fa: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t, argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => spawn::posix_spawn;
    fn system(command: *const c_char) -> c_int => spawn::system;
    fn popen(command: *const c_char, mode: *const c_char) -> *mut libc::FILE => spawn::popen;
    // Threads start past libuprobe's mask fixes, never while they go in (runtime::gate).
    fn pthread_create(thread: *mut libc::pthread_t, attr: *const libc::pthread_attr_t, start: extern "C" fn(*mut c_void) -> *mut c_void, arg: *mut c_void) -> c_int => spawn::pthread_create;
    // Calls the kernel refuses to a multithreaded process (hooks::ns).
    fn unshare(flags: c_int) -> c_int => ns::unshare;
    fn setns(fd: c_int, nstype: c_int) -> c_int => ns::setns;
    // Per-thread privileges: libuprobe's threads follow the thread that changes them
    // (hooks::creds). prctl and syscall are variadic: read as the words the kernel takes.
    fn capset(hdr: *mut c_void, data: *const c_void) -> c_int => creds::capset;
    fn setfsuid(id: libc::uid_t) -> c_int => creds::setfsuid;
    fn setfsgid(id: libc::gid_t) -> c_int => creds::setfsgid;
    fn prctl(option: c_int, a2: libc::c_ulong, a3: libc::c_ulong, a4: libc::c_ulong, a5: libc::c_ulong) -> c_int => creds::prctl;
    fn syscall(nr: c_long, a1: c_long, a2: c_long, a3: c_long, a4: c_long, a5: c_long, a6: c_long) -> c_long => creds::syscall;
}
