//! Seeing objects appear and vanish, so that probes follow the program's code (the kernel's mmap
//! and munmap hooks, in userspace).
//!
//! Three sources, all ending in `probes::try_rescan`, which installs pending and active probes in
//! new mappings and forgets vanished ones:
//! - the loader's debugger interface: libuprobe's own breakpoint on `_r_debug.r_brk`
//!   (`_dl_debug_state`), which the loader calls after mapping an object and its dependencies and
//!   before relocating them or running their constructors, and after unmapping, for every change
//!   to the link map: dlopen, dlmopen, dlclose, and the loads libc makes by itself (`__libc_dlopen`:
//!   libgcc_s for backtrace and cancellation, NSS modules, gconv modules for iconv). The trap
//!   handler sends the thread through a trampoline that runs the rescan in normal context;
//! - interposed `dlopen`, `dlmopen` and `dlclose`: a rescan after the real call returns (finishes
//!   IFUNC probes, which must wait until the object is relocated, and covers a loader without
//!   `r_brk`);
//! - interposed `mmap`/`mmap64` (an executable file mapping the program makes itself, outside the
//!   loader) and `munmap` (a mapping with breakpoints that goes away).

use core::ffi::{c_char, c_int, c_long, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{probes, sys, InRuntime};

/// Called through the trap handler's trampoline at the loader's `r_brk`, with the loader's lock
/// held, before new objects are relocated.
pub extern "C" fn on_link_map_change() {
    let _rt = InRuntime::enter();
    probes::try_rescan(true);
}

/// After a call that may have changed the objects: rescan, unless libuprobe itself made the call
/// (its own `dlopen(RTLD_NOLOAD)` to resolve an IFUNC).
fn objects_changed() {
    if sys::thread_state().runtime_depth.load(Ordering::Relaxed) != 0 {
        return;
    }
    let _rt = InRuntime::enter();
    probes::try_rescan(false);
}

/// Put the hook on the loader's `r_brk`.
pub fn install_link_map_hook() -> Result<(), String> {
    // struct r_debug { int r_version; struct link_map *r_map; ElfW(Addr) r_brk; ... }
    // SAFETY: dlsym with a NUL-terminated name; `_r_debug` is ld.so's exported r_debug.
    let r_debug = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_r_debug".as_ptr()) } as *const u64;
    if r_debug.is_null() {
        return Err("the loader exports no _r_debug".into());
    }
    // SAFETY: r_brk is the third 8-byte field of r_debug.
    let r_brk = unsafe { *r_debug.add(2) };
    if r_brk == 0 {
        return Err("the loader's r_brk is not set".into());
    }
    probes::with_registry(|r| r.install_link_map_hook(r_brk)).unwrap_or(Ok(()))
}

type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
type DlmopenFn = unsafe extern "C" fn(c_long, *const c_char, c_int) -> *mut c_void;
type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, i64) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, usize) -> c_int;

static REAL_DLOPEN: AtomicUsize = AtomicUsize::new(0);
static REAL_DLMOPEN: AtomicUsize = AtomicUsize::new(0);
static REAL_DLCLOSE: AtomicUsize = AtomicUsize::new(0);
static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MMAP64: AtomicUsize = AtomicUsize::new(0);
static REAL_MUNMAP: AtomicUsize = AtomicUsize::new(0);

pub fn resolve_real_functions() {
    let _ = real_fn!(REAL_DLOPEN, "dlopen", DlopenFn);
    let _ = real_fn!(REAL_DLMOPEN, "dlmopen", DlmopenFn);
    let _ = real_fn!(REAL_DLCLOSE, "dlclose", DlcloseFn);
    let _ = real_fn!(REAL_MMAP, "mmap", MmapFn);
    let _ = real_fn!(REAL_MMAP64, "mmap64", MmapFn);
    let _ = real_fn!(REAL_MUNMAP, "munmap", MunmapFn);
}

/// Interposed `dlopen(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    let Some(real) = real_fn!(REAL_DLOPEN, "dlopen", DlopenFn) else {
        return core::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { real(file, mode) };
    if !handle.is_null() && mode & libc::RTLD_NOLOAD == 0 {
        objects_changed();
    }
    handle
}

/// Interposed `dlmopen(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn dlmopen(lmid: c_long, file: *const c_char, mode: c_int) -> *mut c_void {
    let Some(real) = real_fn!(REAL_DLMOPEN, "dlmopen", DlmopenFn) else {
        return core::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { real(lmid, file, mode) };
    if !handle.is_null() && mode & libc::RTLD_NOLOAD == 0 {
        objects_changed();
    }
    handle
}

/// Interposed `dlclose(3)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    let Some(real) = real_fn!(REAL_DLCLOSE, "dlclose", DlcloseFn) else { return -1 };
    // SAFETY: forwarding the caller's argument.
    let r = unsafe { real(handle) };
    objects_changed();
    r
}

/// The real `mmap` or `mmap64`, then a rescan for an executable file mapping.
///
/// # Safety
/// As libc's mmap.
unsafe fn interposed_mmap(
    real: Option<MmapFn>,
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> *mut c_void {
    let Some(real) = real else { return libc::MAP_FAILED };
    // SAFETY: forwarding the caller's arguments.
    let p = unsafe { real(addr, len, prot, flags, fd, off) };
    if p != libc::MAP_FAILED
        && prot & libc::PROT_EXEC != 0
        && fd >= 0
        && flags & libc::MAP_ANONYMOUS == 0
    {
        objects_changed();
    }
    p
}

/// Interposed `mmap(2)`: an executable file mapping gets the probes of its file.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> *mut c_void {
    let real = real_fn!(REAL_MMAP, "mmap", MmapFn);
    // SAFETY: the caller's contract.
    unsafe { interposed_mmap(real, addr, len, prot, flags, fd, off) }
}

/// Interposed `mmap64(2)`.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> *mut c_void {
    let real = real_fn!(REAL_MMAP64, "mmap64", MmapFn);
    // SAFETY: the caller's contract.
    unsafe { interposed_mmap(real, addr, len, prot, flags, fd, off) }
}

/// Interposed `munmap(2)`: breakpoints in the range vanished with it. Cheap when the range holds
/// none (the common case: malloc returning memory), checked against the trap table without locks.
///
/// # Safety
/// As libc's.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let Some(real) = real_fn!(REAL_MUNMAP, "munmap", MunmapFn) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(addr, len) };
    if r == 0
        && crate::trap::any_breakpoint_in(addr as u64, (addr as u64).saturating_add(len as u64))
    {
        objects_changed();
    }
    r
}
