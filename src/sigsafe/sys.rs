//! Every system call libuprobe makes, raw: `syscall` instructions, never libc.
//!
//! # Safety
//!
//! The user may put a probe on any libc function (`mprotect`, `write`, even `__errno_location`),
//! and the code in this folder must neither hit a probe nor touch `errno`. A raw call cannot be
//! probed and never writes `errno`; its error comes back as a plain [`Errno`]. Every function here
//! is async-signal-safe. The rest of the runtime uses them too, so that its own work (reading
//! files, serving the socket, writing code) never runs into the program's probes.

use core::arch::asm;

/// An error number returned by a raw system call. `Copy`, so the trap path can carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", errno_text(self.0))
    }
}

impl std::error::Error for Errno {}

/// The message of an error number, without calling libc's `strerror` (which may be probed).
pub fn errno_text(e: i32) -> &'static str {
    match e {
        libc::EPERM => "Operation not permitted",
        libc::ENOENT => "No such file or directory",
        libc::ESRCH => "No such process",
        libc::EINTR => "Interrupted system call",
        libc::EIO => "Input/output error",
        libc::EBADF => "Bad file descriptor",
        libc::EAGAIN => "Resource temporarily unavailable",
        libc::ENOMEM => "Cannot allocate memory",
        libc::EACCES => "Permission denied",
        libc::EFAULT => "Bad address",
        libc::EBUSY => "Device or resource busy",
        libc::EEXIST => "File exists",
        libc::ENOTDIR => "Not a directory",
        libc::EISDIR => "Is a directory",
        libc::EINVAL => "Invalid argument",
        libc::EMFILE => "Too many open files",
        libc::ENOSPC => "No space left on device",
        libc::EROFS => "Read-only file system",
        libc::EPIPE => "Broken pipe",
        libc::ENAMETOOLONG => "File name too long",
        libc::ENOSYS => "Function not implemented",
        libc::ENOTSOCK => "Socket operation on non-socket",
        libc::EADDRINUSE => "Address already in use",
        libc::ECONNREFUSED => "Connection refused",
        libc::ECONNRESET => "Connection reset by peer",
        libc::ETIMEDOUT => "Connection timed out",
        libc::ENOEXEC => "Exec format error",
        libc::ETXTBSY => "Text file busy",
        libc::E2BIG => "Argument list too long",
        libc::ELOOP => "Too many levels of symbolic links",
        libc::EOPNOTSUPP => "Operation not supported",
        _ => "unknown error",
    }
}

#[inline(always)]
unsafe fn syscall6(nr: i64, a: [usize; 6]) -> isize {
    let ret: isize;
    let [a0, a1, a2, a3, a4, a5] = a;
    // SAFETY: the caller vouches for the arguments of system call `nr`; the asm clobbers only what
    // the syscall ABI says the kernel clobbers (rax, rcx, r11) and does not touch the stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a0, in("rsi") a1, in("rdx") a2,
            in("r10") a3, in("r8") a4, in("r9") a5,
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

#[inline(always)]
fn check(ret: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno(ret.wrapping_neg() as i32))
    } else {
        Ok(ret as usize)
    }
}

/// A raw system call with up to six arguments.
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers to memory of the right size and
/// mutability, descriptors the caller owns).
#[inline(always)]
pub unsafe fn call(nr: i64, a: [usize; 6]) -> Result<usize, Errno> {
    // SAFETY: the caller's contract.
    check(unsafe { syscall6(nr, a) })
}

/// Change the protection of `[addr, addr + len)`.
///
/// # Safety
/// The range must not cover memory that Rust code relies on being accessible with the old
/// protection.
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Result<(), Errno> {
    // SAFETY: the caller's contract.
    unsafe { call(libc::SYS_mprotect, [addr, len, prot as usize, 0, 0, 0]) }.map(drop)
}

/// Map anonymous private memory at exactly `hint` if that range is free (MAP_FIXED_NOREPLACE), or
/// anywhere when `hint` is 0. `extra` adds flags (MAP_NORESERVE).
pub fn mmap_anon(hint: usize, len: usize, prot: i32, extra: i32) -> Result<usize, Errno> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra;
    if hint != 0 {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    // SAFETY: an anonymous mapping with MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let ret =
        unsafe { call(libc::SYS_mmap, [hint, len, prot as usize, flags as usize, usize::MAX, 0]) }?;
    if hint != 0 && ret != hint {
        // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: the range was just mapped by us and nothing references it.
        unsafe { munmap(ret, len) };
        return Err(Errno(libc::EEXIST));
    }
    Ok(ret)
}

/// The next address of the far zone (0: not chosen yet). See [`mmap_far`].
static FAR_NEXT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Map `len` bytes of libuprobe's own memory (event rings, thread blocks, runtime stacks, the
/// allocator's chunks) far from the program's code: 32 GiB below libuprobe's text (and so below
/// the libraries the loader put beside it), not where the kernel would put it, right under them.
/// There it would take the room that punned jumps' stubs need, which is fixed by the program's
/// bytes to within 2 GiB of its code (a 92 MiB event pool turned a few dozen of libc's functions
/// into traps, `_setjmp` among them, where libuprobe's own threads then trapped at their start).
/// Anywhere the kernel likes if the zone is taken. Async-signal-safe: an atomic bump and mmap.
pub fn mmap_far(len: usize, prot: i32, extra: i32) -> Result<usize, Errno> {
    use core::sync::atomic::Ordering;
    let len = len.next_multiple_of(PAGE);
    if FAR_NEXT.load(Ordering::Relaxed) == 0 {
        let own = mmap_far as *const () as usize;
        let zone = own.saturating_sub(32 << 30) & !((1 << 30) - 1);
        let _ =
            FAR_NEXT.compare_exchange(0, zone.max(1 << 32), Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..4 {
        let at = FAR_NEXT.fetch_add(len + PAGE, Ordering::Relaxed); // a page apart: no merging
        if at < 1 << 32 || at.checked_add(len).is_none_or(|end| end > 0x7fff_0000_0000) {
            break;
        }
        match mmap_anon(at, len, prot, extra) {
            Ok(a) => return Ok(a),
            // Something of the program's is there: the zone goes on a gigabyte further.
            Err(Errno(libc::EEXIST)) => {
                FAR_NEXT.fetch_add(1 << 30, Ordering::Relaxed);
            }
            Err(_) => break,
        }
    }
    mmap_anon(0, len, prot, extra)
}

/// Replace `[addr, addr + len)`, which must be a mapping of the caller's own, with fresh
/// anonymous memory (MAP_FIXED). `extra` adds flags (MAP_POPULATE).
pub fn map_fixed_anon(addr: usize, len: usize, prot: i32, extra: i32) -> Result<usize, Errno> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | extra;
    // SAFETY: the caller's contract: the range is a mapping of its own that nothing else uses.
    unsafe { call(libc::SYS_mmap, [addr, len, prot as usize, flags as usize, usize::MAX, 0]) }
}

/// Map `len` bytes of file `fd` read-only and private.
pub fn mmap_file(fd: i32, len: usize) -> Result<usize, Errno> {
    // SAFETY: a new private read-only mapping; nothing existing is replaced.
    unsafe {
        call(
            libc::SYS_mmap,
            [0, len, libc::PROT_READ as usize, libc::MAP_PRIVATE as usize, fd as usize, 0],
        )
    }
}

/// # Safety
/// Nothing may reference the range afterwards.
pub unsafe fn munmap(addr: usize, len: usize) {
    // SAFETY: the caller's contract.
    let _ = unsafe { call(libc::SYS_munmap, [addr, len, 0, 0, 0, 0]) };
}

/// `madvise(MADV_DONTNEED)`: private anonymous pages read as zero again.
///
/// # Safety
/// Nothing may rely on the contents of the range.
pub unsafe fn discard(addr: usize, len: usize) {
    // SAFETY: the caller's contract.
    let _ = unsafe { call(libc::SYS_madvise, [addr, len, libc::MADV_DONTNEED as usize, 0, 0, 0]) };
}

/// Where libuprobe's messages go when they must be said from the signal-safe core: the report's
/// stderr (a duplicate of the program's, see `report::keep_stderr`).
pub static MESSAGE_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(2);

/// `write(2)` until done or failed.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice.
        let r = unsafe {
            call(libc::SYS_write, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0])
        };
        match r {
            Ok(0) => return Err(Errno(libc::EIO)),
            Ok(n) => buf = buf.get(n..).unwrap_or(&[]),
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write(2)` once.
pub fn write(fd: i32, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is a valid readable slice.
    unsafe { call(libc::SYS_write, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0]) }
}

/// `read(2)` once.
pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is a valid writable slice.
    unsafe { call(libc::SYS_read, [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0]) }
}

/// `pread64(2)`.
pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> Result<usize, Errno> {
    // SAFETY: `buf` is a valid writable slice.
    unsafe {
        call(
            libc::SYS_pread64,
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), off as usize, 0, 0],
        )
    }
}

/// `pwrite64(2)`.
pub fn pwrite(fd: i32, buf: &[u8], off: u64) -> Result<usize, Errno> {
    // SAFETY: `buf` is a valid readable slice.
    unsafe {
        call(
            libc::SYS_pwrite64,
            [fd as usize, buf.as_ptr() as usize, buf.len(), off as usize, 0, 0],
        )
    }
}

/// `openat(AT_FDCWD, path, flags | O_CLOEXEC, mode)`. `path` must end in NUL.
pub fn open(path: &[u8], flags: i32, mode: u32) -> Result<i32, Errno> {
    openat(libc::AT_FDCWD, path, flags, mode)
}

/// `openat(dir, path, flags | O_CLOEXEC, mode)`. `path` must end in NUL.
pub fn openat(dir: i32, path: &[u8], flags: i32, mode: u32) -> Result<i32, Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: `path` is NUL-terminated.
    unsafe {
        call(
            libc::SYS_openat,
            [
                dir as usize,
                path.as_ptr() as usize,
                (flags | libc::O_CLOEXEC) as usize,
                mode as usize,
                0,
                0,
            ],
        )
    }
    .map(|fd| fd as i32)
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor the caller owns.
    let _ = unsafe { call(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0]) };
}

/// `flock(2)`.
pub fn flock(fd: i32, op: i32) -> Result<(), Errno> {
    // SAFETY: no memory is passed.
    unsafe { call(libc::SYS_flock, [fd as usize, op as usize, 0, 0, 0, 0]) }.map(|_| ())
}

/// `fstat(2)`.
pub fn fstat(fd: i32) -> Result<libc::stat, Errno> {
    // SAFETY: zeroed stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `st` is writable and of the kernel's struct stat size on x86-64.
    unsafe { call(libc::SYS_fstat, [fd as usize, &mut st as *mut _ as usize, 0, 0, 0, 0]) }?;
    Ok(st)
}

/// `newfstatat(AT_FDCWD, path, flags)`. `path` must end in NUL.
pub fn stat(path: &[u8], flags: i32) -> Result<libc::stat, Errno> {
    statat(libc::AT_FDCWD, path, flags)
}

/// `newfstatat(dir, path, flags)`. `path` must end in NUL.
pub fn statat(dir: i32, path: &[u8], flags: i32) -> Result<libc::stat, Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: zeroed stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: NUL-terminated path; `st` is writable.
    unsafe {
        call(
            libc::SYS_newfstatat,
            [
                dir as usize,
                path.as_ptr() as usize,
                &mut st as *mut _ as usize,
                flags as usize,
                0,
                0,
            ],
        )
    }?;
    Ok(st)
}

/// `faccessat2(AT_FDCWD, path, mode, AT_EACCESS)`, falling back to `faccessat`.
pub fn access(path: &[u8], mode: i32) -> Result<(), Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    let args = [
        libc::AT_FDCWD as usize,
        path.as_ptr() as usize,
        mode as usize,
        libc::AT_EACCESS as usize,
        0,
        0,
    ];
    // SAFETY: NUL-terminated path.
    match unsafe { call(libc::SYS_faccessat2, args) } {
        Err(Errno(libc::ENOSYS)) => {
            // SAFETY: as above; faccessat has no flags argument (real ids are checked).
            unsafe { call(libc::SYS_faccessat, args) }.map(drop)
        }
        r => r.map(drop),
    }
}

/// `readlinkat(AT_FDCWD, path, buf)`. `path` must end in NUL.
pub fn readlink(path: &[u8], buf: &mut [u8]) -> Result<usize, Errno> {
    readlinkat(libc::AT_FDCWD, path, buf)
}

/// `readlinkat(dir, path, buf)` (an empty `path`, b"\0", reads the link `dir` was opened as with
/// `O_PATH|O_NOFOLLOW`). `path` must end in NUL.
pub fn readlinkat(dir: i32, path: &[u8], buf: &mut [u8]) -> Result<usize, Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated path; `buf` is writable.
    unsafe {
        call(
            libc::SYS_readlinkat,
            [dir as usize, path.as_ptr() as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0],
        )
    }
}

/// `unlinkat(AT_FDCWD, path, 0)`. `path` must end in NUL.
pub fn unlink(path: &[u8]) -> Result<(), Errno> {
    unlinkat(libc::AT_FDCWD, path, 0)
}

/// `unlinkat(dir, path, flags)`. `path` must end in NUL.
pub fn unlinkat(dir: i32, path: &[u8], flags: i32) -> Result<(), Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated path.
    unsafe {
        call(libc::SYS_unlinkat, [dir as usize, path.as_ptr() as usize, flags as usize, 0, 0, 0])
    }
    .map(drop)
}

/// `renameat(AT_FDCWD, from, AT_FDCWD, to)`. Both paths must end in NUL.
pub fn rename(from: &[u8], to: &[u8]) -> Result<(), Errno> {
    renameat(libc::AT_FDCWD, from, libc::AT_FDCWD, to)
}

/// `renameat(from_dir, from, to_dir, to)`. Both paths must end in NUL.
pub fn renameat(from_dir: i32, from: &[u8], to_dir: i32, to: &[u8]) -> Result<(), Errno> {
    if from.last() != Some(&0) || to.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated paths.
    unsafe {
        call(
            libc::SYS_renameat,
            [
                from_dir as usize,
                from.as_ptr() as usize,
                to_dir as usize,
                to.as_ptr() as usize,
                0,
                0,
            ],
        )
    }
    .map(drop)
}

/// `mkdirat(AT_FDCWD, path, mode)`. `path` must end in NUL.
pub fn mkdir(path: &[u8], mode: u32) -> Result<(), Errno> {
    mkdirat(libc::AT_FDCWD, path, mode)
}

/// `mkdirat(dir, path, mode)`. `path` must end in NUL.
pub fn mkdirat(dir: i32, path: &[u8], mode: u32) -> Result<(), Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated path.
    unsafe {
        call(libc::SYS_mkdirat, [dir as usize, path.as_ptr() as usize, mode as usize, 0, 0, 0])
    }
    .map(drop)
}

/// `fchmodat(dir, path, mode)`. `path` must end in NUL.
pub fn fchmodat(dir: i32, path: &[u8], mode: u32) -> Result<(), Errno> {
    if path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated path.
    unsafe {
        call(libc::SYS_fchmodat, [dir as usize, path.as_ptr() as usize, mode as usize, 0, 0, 0])
    }
    .map(drop)
}

/// `symlinkat(target, dir, path)`. Both must end in NUL.
pub fn symlinkat(target: &[u8], dir: i32, path: &[u8]) -> Result<(), Errno> {
    if target.last() != Some(&0) || path.last() != Some(&0) {
        return Err(Errno(libc::EINVAL));
    }
    // SAFETY: NUL-terminated paths.
    unsafe {
        call(
            libc::SYS_symlinkat,
            [target.as_ptr() as usize, dir as usize, path.as_ptr() as usize, 0, 0, 0],
        )
    }
    .map(drop)
}

/// `getrandom(buf, 0)`: bytes from the kernel's generator.
pub fn getrandom(buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is writable.
    unsafe { call(libc::SYS_getrandom, [buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0, 0]) }
}

/// `fchmod(2)`.
pub fn fchmod(fd: i32, mode: u32) -> Result<(), Errno> {
    // SAFETY: no memory is passed.
    unsafe { call(libc::SYS_fchmod, [fd as usize, mode as usize, 0, 0, 0, 0]) }.map(drop)
}

/// `getdents64(2)` into `buf`.
pub fn getdents(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is writable.
    unsafe {
        call(libc::SYS_getdents64, [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0])
    }
}

/// `fcntl(fd, cmd, arg)` for integer arguments.
pub fn fcntl(fd: i32, cmd: i32, arg: usize) -> Result<usize, Errno> {
    // SAFETY: the commands used with this function take an integer argument.
    unsafe { call(libc::SYS_fcntl, [fd as usize, cmd as usize, arg, 0, 0, 0]) }
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a close-on-exec duplicate numbered `min` or above.
pub fn dup_cloexec_at_least(fd: i32, min: i32) -> Result<i32, Errno> {
    fcntl(fd, libc::F_DUPFD_CLOEXEC, min as usize).map(|fd| fd as i32)
}

/// The vDSO's `clock_gettime`, set once by the runtime; 0 means "use the system call".
pub static VDSO_CLOCK_GETTIME: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds: through the vDSO when found, else the raw
/// system call (the vDSO takes no lock, touches no errno and no vector register).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock_gettime(clock)` in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let f = VDSO_CLOCK_GETTIME.load(core::sync::atomic::Ordering::Relaxed);
    if f != 0 {
        // SAFETY: `f` is the vDSO's clock_gettime, with this C signature.
        let f: extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32 =
            unsafe { core::mem::transmute(f) };
        f(clock, &mut ts);
    } else {
        // SAFETY: `ts` is a valid timespec to write.
        let _ = unsafe {
            call(libc::SYS_clock_gettime, [clock as usize, &mut ts as *mut _ as usize, 0, 0, 0, 0])
        };
    }
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// Sleep for `ns` nanoseconds (restarted after a signal).
pub fn sleep_ns(ns: u64) {
    let mut req = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    };
    loop {
        let mut rem = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: both timespecs are valid.
        let r = unsafe {
            call(
                libc::SYS_nanosleep,
                [&req as *const _ as usize, &mut rem as *mut _ as usize, 0, 0, 0, 0],
            )
        };
        match r {
            Err(Errno(libc::EINTR)) => req = rem,
            _ => return,
        }
    }
}

/// Copy up to `buf.len()` bytes at `addr` of process `pid` without risking a fault
/// (`process_vm_readv` answers EFAULT for unmapped memory). Returns how many were readable.
pub fn read_memory_safely(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: local describes `buf`, writable; the kernel checks `remote` and never faults.
    unsafe {
        call(
            libc::SYS_process_vm_readv,
            [pid as usize, &local as *const _ as usize, 1, &remote as *const _ as usize, 1, 0],
        )
    }
}

// A load that may fault, and where to go on if it does: like the kernel's exception tables, the
// fault handler (`trap::on_fault`) sends a fault at `uprobe_probe_load_insn` to
// `uprobe_probe_load_fault`, which answers 0. A few nanoseconds, where `process_vm_readv` costs a
// microsecond.
core::arch::global_asm!(
    ".pushsection .text.uprobe_probe_load,\"ax\",@progbits",
    ".globl uprobe_probe_load",
    ".hidden uprobe_probe_load",
    ".type uprobe_probe_load, @function",
    ".p2align 4",
    "uprobe_probe_load:",
    "    .cfi_startproc",
    ".globl uprobe_probe_load_insn",
    ".hidden uprobe_probe_load_insn",
    "uprobe_probe_load_insn:",
    "    mov rax, qword ptr [rdi]",
    "    mov qword ptr [rsi], rax",
    "    mov eax, 1",
    "    ret",
    ".globl uprobe_probe_load_fault",
    ".hidden uprobe_probe_load_fault",
    "uprobe_probe_load_fault:",
    "    xor eax, eax",
    "    ret",
    "    .cfi_endproc",
    ".size uprobe_probe_load, . - uprobe_probe_load",
    ".globl uprobe_probe_store",
    ".hidden uprobe_probe_store",
    ".type uprobe_probe_store, @function",
    ".p2align 4",
    "uprobe_probe_store:",
    "    .cfi_startproc",
    ".globl uprobe_probe_store_insn",
    ".hidden uprobe_probe_store_insn",
    "uprobe_probe_store_insn:",
    "    mov qword ptr [rdi], rsi",
    "    mov eax, 1",
    "    ret",
    "    .cfi_endproc",
    ".size uprobe_probe_store, . - uprobe_probe_store",
    ".popsection",
);

extern "C" {
    fn uprobe_probe_load(addr: u64, out: *mut u64) -> u32;
    fn uprobe_probe_load_insn();
    fn uprobe_probe_load_fault();
    fn uprobe_probe_store(addr: u64, value: u64) -> u32;
    fn uprobe_probe_store_insn();
}

/// libuprobe's fault handler is installed: [`read_u64_safely`] may use the fast load.
pub static FAULT_RECOVERY: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Where a fault at `rip` goes on, if `rip` is the fast load's or store's instruction.
pub fn fault_recovery(rip: u64) -> Option<u64> {
    (rip == uprobe_probe_load_insn as *const () as u64
        || rip == uprobe_probe_store_insn as *const () as u64)
        .then_some(uprobe_probe_load_fault as *const () as u64)
}

/// Write 8 bytes of this process's memory at `addr`; false if they are not writable (only once
/// libuprobe's fault handler is installed; false before).
pub fn write_u64_safely(addr: u64, value: u64) -> bool {
    if !FAULT_RECOVERY.load(core::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    // SAFETY: the store is in assembly; a fault there is caught by libuprobe's fault handler,
    // which resumes at the recovery label (answer 0).
    unsafe { uprobe_probe_store(addr, value) == 1 }
}

/// Read 8 bytes of this process's memory at `addr`, or None if they are not all readable.
pub fn read_u64_safely(addr: u64) -> Option<u64> {
    if FAULT_RECOVERY.load(core::sync::atomic::Ordering::Relaxed) {
        let mut v = 0u64;
        // SAFETY: the load is in assembly; a fault there is caught by libuprobe's fault handler,
        // which resumes at the recovery label (answer 0) instead of delivering it.
        return (unsafe { uprobe_probe_load(addr, &mut v) } == 1).then_some(v);
    }
    let mut b = [0u8; 8];
    match read_memory_safely(getpid(), addr, &mut b) {
        Ok(8) => Some(u64::from_le_bytes(b)),
        _ => None,
    }
}

/// Copy `buf.len()` bytes of this process's memory at `addr` into `buf`; false if any is not
/// readable. Aligned 8-byte loads (never across a page), so no byte outside whole readable words
/// is touched.
pub fn read_bytes_safely(addr: u64, buf: &mut [u8]) -> bool {
    let mut word = addr & !7;
    let end = addr.wrapping_add(buf.len() as u64);
    while word < end {
        let Some(v) = read_u64_safely(word) else { return false };
        // The word's bytes that are wanted: all of them but at the ends.
        let (lo, hi) = (addr.max(word), end.min(word + 8));
        let (from, to) = ((lo - word) as usize, (lo - addr) as usize);
        let bytes = v.to_le_bytes();
        for i in 0..(hi - lo) as usize {
            if let (Some(d), Some(s)) = (buf.get_mut(to + i), bytes.get(from + i)) {
                *d = *s;
            }
        }
        word += 8;
    }
    true
}

/// `membarrier` commands.
pub const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 5;
pub const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: i32 = 1 << 6;

/// Is the page at `addr` mapped (`mincore`, which fails with ENOMEM on a hole)?
pub fn page_mapped(addr: u64) -> bool {
    let mut vec = 0u8;
    // SAFETY: one page asked about, one byte of answer, written to `vec`.
    unsafe {
        call(
            libc::SYS_mincore,
            [addr as usize & !(PAGE - 1), PAGE, &mut vec as *mut u8 as usize, 0, 0, 0],
        )
    }
    .is_ok()
}

/// Execute a serializing instruction on this CPU: `iretq` to the next instruction, as the kernel's
/// `sync_core` does (`cpuid` would do too, but traps to the hypervisor in a VM).
pub fn serialize_self() {
    // SAFETY: builds an interrupt-return frame for the current context (ss, rsp, rflags, cs, rip)
    // and returns through it to the label right after: every register and the flags unchanged.
    unsafe {
        core::arch::asm!(
            "mov {tmp}, ss",
            "push {tmp}",
            "lea {tmp}, [rsp + 8]",
            "push {tmp}",
            "pushfq",
            "mov {tmp}, cs",
            "push {tmp}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            tmp = out(reg) _,
        );
    }
}

/// Does thread `tid` of process `pid` still exist? (`tgkill` with signal 0.)
pub fn thread_alive(pid: i32, tid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    let r = unsafe { call(libc::SYS_tgkill, [pid as usize, tid as usize, 0, 0, 0, 0]) };
    r != Err(Errno(libc::ESRCH))
}

/// `tgkill(pid, tid, sig)`.
pub fn tgkill(pid: i32, tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: no memory is passed.
    unsafe { call(libc::SYS_tgkill, [pid as usize, tid as usize, sig as usize, 0, 0, 0]) }.map(drop)
}

/// `poll(2)`.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<usize, Errno> {
    // SAFETY: `fds` is a valid, writable array of pollfd of that length.
    unsafe {
        call(libc::SYS_poll, [fds.as_mut_ptr() as usize, fds.len(), timeout_ms as usize, 0, 0, 0])
    }
}

/// `futex(FUTEX_WAIT_PRIVATE)` while `*word == val`, up to `timeout_ns` (0: no timeout).
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, val: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as i64,
        tv_nsec: (timeout_ns % 1_000_000_000) as i64,
    };
    let tsp = if timeout_ns == 0 { 0 } else { &ts as *const _ as usize };
    // SAFETY: `word` is a valid aligned u32; `tsp` is null or a valid timespec.
    let _ = unsafe {
        call(
            libc::SYS_futex,
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
                val as usize,
                tsp,
                0,
                0,
            ],
        )
    };
}

/// `futex(FUTEX_WAKE_PRIVATE)`: wake up to `n` waiters.
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) {
    // SAFETY: `word` is a valid aligned u32.
    let _ = unsafe {
        call(
            libc::SYS_futex,
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
                n as usize,
                0,
                0,
                0,
            ],
        )
    };
}

/// `membarrier(cmd, 0, 0)`.
pub fn membarrier(cmd: i32) -> Result<usize, Errno> {
    // SAFETY: no memory is passed.
    unsafe { call(libc::SYS_membarrier, [cmd as usize, 0, 0, 0, 0, 0]) }
}

/// Is the CPU's shadow stack enabled for this thread (`arch_prctl(ARCH_SHSTK_STATUS)`)? A
/// kernel without shadow-stack support answers EINVAL: not enabled.
pub fn shadow_stack_enabled() -> bool {
    const ARCH_SHSTK_STATUS: usize = 0x5005;
    let mut features: u64 = 0;
    // SAFETY: the kernel writes one u64 of feature bits.
    let r = unsafe {
        call(
            libc::SYS_arch_prctl,
            [ARCH_SHSTK_STATUS, &mut features as *mut u64 as usize, 0, 0, 0, 0],
        )
    };
    r == Ok(0) && features & 1 != 0
}

pub fn getpid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { syscall6(libc::SYS_getpid, [0; 6]) as i32 }
}

pub fn gettid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { syscall6(libc::SYS_gettid, [0; 6]) as i32 }
}

pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { syscall6(libc::SYS_geteuid, [0; 6]) as u32 }
}

/// Send `sig` to this thread.
pub fn raise_here(sig: i32) {
    let _ = tgkill(getpid(), gettid(), sig);
}

pub fn sched_yield() {
    // SAFETY: no arguments.
    let _ = unsafe { syscall6(libc::SYS_sched_yield, [0; 6]) };
}

/// `_exit` of this thread only (the raw `exit` system call).
pub fn exit_thread(code: i32) -> ! {
    loop {
        // SAFETY: ends this thread; nothing runs after it.
        let _ = unsafe { syscall6(libc::SYS_exit, [code as usize, 0, 0, 0, 0, 0]) };
    }
}

/// `_exit` of the whole process (the raw `exit_group` system call).
pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: ends the process; nothing runs after it.
        let _ = unsafe { syscall6(libc::SYS_exit_group, [code as usize, 0, 0, 0, 0, 0]) };
    }
}

/// The kernel's `struct sigaction` for x86-64 `rt_sigaction` (not glibc's layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSigaction {
    pub handler: usize,
    pub flags: u64,
    pub restorer: usize,
    pub mask: u64,
}

impl KernelSigaction {
    pub const DEFAULT: KernelSigaction =
        KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
}

pub const SA_RESTORER: u64 = 0x0400_0000;

/// `rt_sigaction(2)`, raw.
pub fn rt_sigaction(
    sig: i32,
    act: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> Result<(), Errno> {
    let act = act.map_or(0, |a| a as *const _ as usize);
    let old = old.map_or(0, |o| o as *mut _ as usize);
    // SAFETY: both pointers are null or point to valid KernelSigaction values; sigsetsize is 8.
    unsafe { call(libc::SYS_rt_sigaction, [sig as usize, act, old, 8, 0, 0]) }.map(drop)
}

/// `rt_sigprocmask(2)` on a kernel 64-bit signal set, raw.
pub fn rt_sigprocmask(how: i32, set: Option<&u64>, old: Option<&mut u64>) -> Result<(), Errno> {
    let set = set.map_or(0, |s| s as *const u64 as usize);
    let old = old.map_or(0, |o| o as *mut u64 as usize);
    // SAFETY: both pointers are null or point to valid u64 signal sets; sigsetsize is 8.
    unsafe { call(libc::SYS_rt_sigprocmask, [how as usize, set, old, 8, 0, 0]) }.map(drop)
}

/// Bit of `sig` in a kernel signal set.
pub const fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// glibc's internal signals: thread cancellation and the set*id broadcast. Never blocked by a
/// runtime thread (glibc's setuid waits for every thread to answer SIGSETXID).
pub const SIGCANCEL: i32 = 32;
pub const SIGSETXID: i32 = 33;

/// The signals a thread must keep open while it runs libuprobe code: the synchronous ones (a fault
/// in here gets the program's usual treatment, not a forced kill), SIGTRAP (probes on functions
/// the runtime calls must resume) and glibc's two internal signals.
pub const ALWAYS_OPEN: u64 = sigbit(libc::SIGSEGV)
    | sigbit(libc::SIGBUS)
    | sigbit(libc::SIGILL)
    | sigbit(libc::SIGFPE)
    | sigbit(libc::SIGTRAP)
    | sigbit(SIGCANCEL)
    | sigbit(SIGSETXID);

/// Page size (4 KiB on x86-64).
pub const PAGE: usize = 4096;
