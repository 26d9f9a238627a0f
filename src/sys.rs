//! The one place where libuprobe talks to the kernel: raw system calls, the signal restorer, and the
//! per-thread state block.
//!
//! # Safety
//!
//! Everything here is a raw system call made with `syscall`, never through libc. That is deliberate:
//! the user may put a probe on any libc function (`mprotect`, `write`, even `__errno_location`), and
//! the trap handler must neither trap again nor touch `errno`. A raw call cannot be probed and never
//! writes `errno`; its error comes back as a plain [`Errno`].
//!
//! The per-thread state is an initial-exec TLS block defined in assembly. Rust's `thread_local!` in a
//! shared object compiles to `__tls_get_addr`, which may allocate (to grow the DTV after a dlopen), so
//! it is not async-signal-safe. An initial-exec access is two instructions and never calls anything;
//! it is valid because libuprobe is loaded at startup (LD_PRELOAD), where static TLS is guaranteed.

use core::arch::{asm, global_asm};

/// An error number returned by a raw system call. `Copy`, so the trap path can carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

#[inline(always)]
unsafe fn syscall6(nr: i64, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the arguments of system call `nr`; the asm clobbers only what the
    // syscall ABI says the kernel clobbers (rax, rcx, r11) and does not touch the stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

#[inline(always)]
fn check(ret: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// Change the protection of `[addr, addr + len)`.
///
/// # Safety
/// The range must not cover memory that Rust code relies on being accessible with the old protection
/// (the callers only change text pages of mapped objects and XOL pages, and always keep PROT_EXEC).
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Result<(), Errno> {
    // SAFETY: the caller's contract.
    check(unsafe { syscall6(libc::SYS_mprotect, [addr, len, prot as usize, 0, 0, 0]) }).map(drop)
}

/// Map anonymous private memory at exactly `hint` if that range is free (MAP_FIXED_NOREPLACE), or
/// anywhere when `hint` is 0.
pub fn mmap_anon(hint: usize, len: usize, prot: i32) -> Result<usize, Errno> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if hint != 0 {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: an anonymous mapping with MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let ret = check(unsafe {
        syscall6(libc::SYS_mmap, [hint, len, prot as usize, flags as usize, usize::MAX, 0])
    })?;
    if hint != 0 && ret != hint {
        // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: the range was just mapped by us and nothing references it.
        unsafe { munmap(ret, len) };
        return Err(Errno(libc::EEXIST));
    }
    Ok(ret)
}

/// # Safety
/// Nothing may reference the range afterwards.
pub unsafe fn munmap(addr: usize, len: usize) {
    // SAFETY: the caller's contract.
    let _ = unsafe { syscall6(libc::SYS_munmap, [addr, len, 0, 0, 0, 0]) };
}

/// `write(2)` until done or failed. Async-signal-safe.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice.
        let r = check(unsafe {
            syscall6(libc::SYS_write, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0])
        });
        match r {
            Ok(n) => buf = &buf[n..],
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a close-on-exec duplicate numbered `min` or above.
pub fn dup_cloexec_at_least(fd: i32, min: i32) -> Result<i32, Errno> {
    // SAFETY: fcntl F_DUPFD_CLOEXEC only creates a descriptor.
    check(unsafe {
        syscall6(
            libc::SYS_fcntl,
            [fd as usize, libc::F_DUPFD_CLOEXEC as usize, min as usize, 0, 0, 0],
        )
    })
    .map(|fd| fd as i32)
}

/// The vDSO's `clock_gettime`, found once by [`find_vdso_clock`]; 0 means "use the system call".
static VDSO_CLOCK_GETTIME: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// Find `__vdso_clock_gettime` in the vDSO image the kernel mapped (not on the trap path).
pub fn find_vdso_clock() {
    // SAFETY: getauxval is always safe; AT_SYSINFO_EHDR is the vDSO's ELF header, or 0.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if base == 0 {
        return;
    }
    let Some(len) = crate::objects::read_maps().ok().and_then(|maps| {
        maps.iter().find(|m| m.start as usize == base).map(|m| (m.end - m.start) as usize)
    }) else {
        return;
    };
    // SAFETY: the vDSO mapping [base, base + len) is readable for the life of the process.
    let image = unsafe { core::slice::from_raw_parts(base as *const u8, len) };
    let Ok(elf) = goblin::elf::Elf::parse(image) else { return };
    let sym = elf
        .dynsyms
        .iter()
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some("__vdso_clock_gettime"));
    if let Some(sym) = sym {
        let first_load =
            elf.program_headers.iter().find(|p| p.p_type == goblin::elf::program_header::PT_LOAD);
        let bias = first_load.map_or(0, |p| p.p_vaddr) as usize;
        VDSO_CLOCK_GETTIME
            .store(base + sym.st_value as usize - bias, core::sync::atomic::Ordering::Release);
    }
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds: through the vDSO when found, else the raw
/// system call. Async-signal-safe either way (the vDSO takes no lock and touches no errno).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let f = VDSO_CLOCK_GETTIME.load(core::sync::atomic::Ordering::Relaxed);
    if f != 0 {
        // SAFETY: `f` is the vDSO's clock_gettime, with the C signature below.
        let f: extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32 =
            unsafe { core::mem::transmute(f) };
        f(libc::CLOCK_MONOTONIC, &mut ts);
    } else {
        // SAFETY: `ts` is a valid timespec to write.
        let _ = unsafe {
            syscall6(
                libc::SYS_clock_gettime,
                [libc::CLOCK_MONOTONIC as usize, &mut ts as *mut _ as usize, 0, 0, 0, 0],
            )
        };
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Copy up to `buf.len()` bytes at `addr` of this process without risking a fault
/// (`process_vm_readv` answers EFAULT for unmapped memory). Returns how many were readable.
/// Async-signal-safe.
pub fn read_memory_safely(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: local describes `buf`, writable; the kernel checks `remote` and never faults.
    check(unsafe {
        syscall6(
            libc::SYS_process_vm_readv,
            [pid as usize, &local as *const _ as usize, 1, &remote as *const _ as usize, 1, 0],
        )
    })
}

/// Does thread `tid` of process `pid` still exist? (`tgkill` with signal 0.)
pub fn thread_alive(pid: i32, tid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe {
        syscall6(libc::SYS_tgkill, [pid as usize, tid as usize, 0, 0, 0, 0])
            != -(libc::ESRCH as isize)
    }
}

/// `poll(2)`.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<usize, Errno> {
    // SAFETY: `fds` is a valid, writable array of pollfd of that length.
    check(unsafe {
        syscall6(
            libc::SYS_poll,
            [fds.as_mut_ptr() as usize, fds.len(), timeout_ms as usize, 0, 0, 0],
        )
    })
}

/// The credentials of the peer of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_credentials(fd: i32) -> Result<libc::ucred, Errno> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing; the kernel writes at most `len` bytes.
    check(unsafe {
        syscall6(
            libc::SYS_getsockopt,
            [
                fd as usize,
                libc::SOL_SOCKET as usize,
                libc::SO_PEERCRED as usize,
                &mut cred as *mut _ as usize,
                &mut len as *mut _ as usize,
                0,
            ],
        )
    })?;
    Ok(cred)
}

/// Is the CPU's shadow stack enabled for this thread (`arch_prctl(ARCH_SHSTK_STATUS)`)? A
/// kernel without shadow-stack support answers EINVAL: not enabled.
pub fn shadow_stack_enabled() -> bool {
    const ARCH_SHSTK_STATUS: usize = 0x5005;
    let mut features: u64 = 0;
    // SAFETY: the kernel writes one u64 of feature bits.
    let r = unsafe {
        syscall6(
            libc::SYS_arch_prctl,
            [ARCH_SHSTK_STATUS, &mut features as *mut u64 as usize, 0, 0, 0, 0],
        )
    };
    r == 0 && features & 1 != 0
}

pub fn getpid() -> i32 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_getpid, [0; 6]) as i32 }
}

pub fn getppid() -> i32 {
    // SAFETY: getppid has no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_getppid, [0; 6]) as i32 }
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { syscall6(libc::SYS_gettid, [0; 6]) as i32 }
}

/// Send `sig` to this thread. Async-signal-safe.
pub fn raise_here(sig: i32) {
    // SAFETY: tgkill to our own pid/tid with a valid signal number.
    let _ = unsafe {
        syscall6(libc::SYS_tgkill, [getpid() as usize, gettid() as usize, sig as usize, 0, 0, 0])
    };
}

pub fn sched_yield() {
    // SAFETY: no arguments.
    let _ = unsafe { syscall6(libc::SYS_sched_yield, [0; 6]) };
}

/// The kernel's `struct sigaction` for x86-64 `rt_sigaction` (not glibc's layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KernelSigaction {
    pub handler: usize,
    pub flags: u64,
    pub restorer: usize,
    pub mask: u64,
}

pub const SA_RESTORER: u64 = 0x0400_0000;

/// `rt_sigaction(2)`, raw. Async-signal-safe.
pub fn rt_sigaction(
    sig: i32,
    act: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> Result<(), Errno> {
    let act = act.map_or(0, |a| a as *const _ as usize);
    let old = old.map_or(0, |o| o as *mut _ as usize);
    // SAFETY: both pointers are null or point to valid KernelSigaction values; sigsetsize is 8.
    check(unsafe { syscall6(libc::SYS_rt_sigaction, [sig as usize, act, old, 8, 0, 0]) }).map(drop)
}

/// `rt_sigprocmask(2)` on a kernel 64-bit signal set, raw. Async-signal-safe.
pub fn rt_sigprocmask(how: i32, set: Option<&u64>, old: Option<&mut u64>) -> Result<(), Errno> {
    let set = set.map_or(0, |s| s as *const u64 as usize);
    let old = old.map_or(0, |o| o as *mut u64 as usize);
    // SAFETY: both pointers are null or point to valid u64 signal sets; sigsetsize is 8.
    check(unsafe { syscall6(libc::SYS_rt_sigprocmask, [how as usize, set, old, 8, 0, 0]) })
        .map(drop)
}

/// Bit of `sig` in a kernel signal set.
pub const fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

// The restorer our SIGTRAP handler returns through. It lives in libuprobe, not libc, so that a probe
// on libc's own `__restore_rt` does not trap again every time our handler returns.
global_asm!(
    ".pushsection .text.uprobe_sigreturn,\"ax\",@progbits",
    ".globl uprobe_sigreturn",
    ".hidden uprobe_sigreturn",
    ".type uprobe_sigreturn, @function",
    ".p2align 4",
    "uprobe_sigreturn:",
    "    mov eax, 15", // __NR_rt_sigreturn
    "    syscall",
    "    ud2",
    ".size uprobe_sigreturn, . - uprobe_sigreturn",
    ".popsection",
);

extern "C" {
    fn uprobe_sigreturn();
}

/// Address of our signal restorer.
pub fn sigreturn_trampoline() -> usize {
    uprobe_sigreturn as *const () as usize
}

/// The state a thread keeps for libuprobe. Zero-initialised in every new thread by the C library
/// (it is `.tbss`), so "all zero" must mean "a program thread doing nothing of ours".
#[repr(C)]
pub struct ThreadState {
    /// Non-zero while this thread runs libuprobe code (setup, patching, report, our trap handler),
    /// or for its whole life if it is a runtime thread. Traps taken meanwhile run no consumers.
    pub runtime_depth: core::sync::atomic::AtomicU32,
    /// This thread's id, cached when it first records an event (0: not yet).
    pub tid: core::sync::atomic::AtomicI32,
    /// The event ring this thread records into (see `trap::Ring`); 0 until its first event.
    pub ring: core::sync::atomic::AtomicUsize,
    /// Return probes: how many frames of `ret_frames` are in use.
    pub ret_depth: core::sync::atomic::AtomicU32,
    /// Return probes: the real return addresses this thread's hijacked frames will go back to,
    /// innermost last. Preallocated: a call nested deeper is not hijacked (`missed`).
    pub ret_frames: [RetFrame; RET_STACK],
}

/// Return-probe frames a thread can have pending at once.
pub const RET_STACK: usize = 64;

/// One hijacked return (see `trap::hijack_return`).
#[repr(C)]
pub struct RetFrame {
    /// Address of the stack slot that held the return address (rsp at the function's entry).
    pub slot: core::sync::atomic::AtomicU64,
    /// The return address it held.
    pub real: core::sync::atomic::AtomicU64,
    /// The probed function's entry (the breakpoint's address), to find its consumers.
    pub site: core::sync::atomic::AtomicU64,
    pub entry_ns: core::sync::atomic::AtomicU64,
}

global_asm!(
    ".pushsection .tbss.uprobe_thread_state,\"awT\",@nobits",
    ".globl uprobe_thread_state",
    ".hidden uprobe_thread_state",
    ".type uprobe_thread_state, @object",
    ".p2align 6",
    "uprobe_thread_state:",
    ".zero {size}",
    ".size uprobe_thread_state, {size}",
    ".popsection",
    size = const core::mem::size_of::<ThreadState>(),
);

/// This thread's [`ThreadState`]. Two instructions, no call: async-signal-safe.
#[inline(always)]
pub fn thread_state() -> &'static ThreadState {
    let p: *const ThreadState;
    // SAFETY: initial-exec TLS access: fs:0 is the thread pointer, and the GOT slot holds the
    // (negative) offset of our block in static TLS. Reads only.
    unsafe {
        asm!(
            "mov {p}, qword ptr [rip + uprobe_thread_state@GOTTPOFF]",
            "add {p}, qword ptr fs:0",
            p = out(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    // SAFETY: the block is valid, aligned and lives as long as the thread; every field is atomic.
    unsafe { &*p }
}

/// Read one byte of the program's text. Used by the trap path to see whether a breakpoint is still
/// in place.
///
/// # Safety
/// `addr` must be mapped and readable.
#[inline(always)]
pub unsafe fn read_code_byte(addr: usize) -> u8 {
    // SAFETY: the caller's contract; volatile because another thread may rewrite it.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Page size (4 KiB on x86-64; read once from the auxiliary vector to be exact).
pub fn page_size() -> usize {
    // SAFETY: getauxval is always safe to call.
    let ps = unsafe { libc::getauxval(libc::AT_PAGESZ) } as usize;
    if ps == 0 {
        4096
    } else {
        ps
    }
}
