//! Seeing objects appear and vanish, so that probes follow the program's code (the kernel's mmap
//! and munmap hooks, in userspace).
//!
//! Three sources, all ending in a rescan (`registry::Registry::rescan`), which installs pending and
//! active probes in new mappings and forgets vanished ones:
//! - the loader's debugger interface: libuprobe's own breakpoint on `_r_debug.r_brk`
//!   (`_dl_debug_state`), which the loader calls after mapping an object and its dependencies and
//!   before relocating them or running their constructors, and after unmapping, for every change
//!   to the link map: dlopen, dlmopen, dlclose, and the loads libc makes by itself
//!   (`__libc_dlopen`: libgcc_s for backtrace and cancellation, NSS modules, gconv modules). The
//!   trap handler sends the thread through a trampoline that calls [`on_link_map_change`] in
//!   normal context. Objects are not relocated yet there: a probe on an IFUNC waits for a rescan
//!   outside the loader (after the interposed `dlopen` returns, or by the control thread);
//! - interposed `dlopen`, `dlmopen` and `dlclose`: a rescan after the real call returns;
//! - interposed `mmap`/`mmap64` (an executable file mapping the program makes itself, outside the
//!   loader) and `munmap` (a mapping with breakpoints that goes away).

use core::ffi::{c_char, c_int, c_long, c_void};
use core::sync::atomic::Ordering;

use crate::error::ProbeError;
use crate::{objects, registry, report, runtime, sigsafe};

/// Called through the trap handler's trampoline at the loader's `r_brk`, with the loader's lock
/// held, before new objects are relocated.
extern "C" fn on_link_map_change() {
    // The hook fires before a change (objects about to be mapped or unmapped) and after it:
    // only then are the mappings complete. Before mapping or unmapping anything, registry work
    // in flight in another thread (reading code, writing patches) finishes first; so the
    // registry, while it holds its lock, sees the loader between changes or in the middle of
    // one that began before it took the lock (`loader::consistent` tells).
    if !objects::loader::consistent() {
        let _rt = crate::runtime::InRuntime::enter();
        registry::wait_idle();
        return;
    }
    let problems = registry::try_rescan(true);
    report::problems(&problems);
    if registry::ifunc_pending() {
        runtime::wake_all();
    }
}

/// After a call that may have changed the objects: rescan, unless libuprobe itself made the call
/// (its own `dlopen(RTLD_NOLOAD)` to resolve an IFUNC).
fn objects_changed() {
    if sigsafe::thread::tls().depth.load(Ordering::Relaxed) != 0 {
        return;
    }
    let problems = registry::try_rescan(false);
    report::problems(&problems);
}

/// Put the hook on the loader's `r_brk`.
pub fn install_link_map_hook() -> Result<(), ProbeError> {
    sigsafe::trap::LINK_MAP_CALLBACK
        .store(on_link_map_change as *const () as usize, Ordering::Release);
    // `loader::find` also remembers where r_debug is, so that `loader::consistent` can read its
    // state.
    let Some(r_brk) = objects::loader::find() else {
        return Err(ProbeError::Runtime {
            why: "the loader exports no _r_debug, or its r_brk is not set".into(),
        });
    };
    registry::with_registry(|r| r.install_link_map_hook(r_brk)).unwrap_or(Ok(()))
}

type DlopenFn = super::table::dlopen::Fn;
type DlmopenFn = super::table::dlmopen::Fn;
type DlcloseFn = super::table::dlclose::Fn;
type MmapFn = super::table::mmap::Fn;
type MunmapFn = super::table::munmap::Fn;

/// # Safety
/// As libc's `dlopen`.
pub unsafe fn dlopen(real: Option<DlopenFn>, file: *const c_char, mode: c_int) -> *mut c_void {
    let Some(real) = real else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { real(file, mode) };
    if !handle.is_null() && mode & libc::RTLD_NOLOAD == 0 {
        objects_changed();
    }
    handle
}

/// # Safety
/// As libc's `dlmopen`.
pub unsafe fn dlmopen(
    real: Option<DlmopenFn>,
    lmid: c_long,
    file: *const c_char,
    mode: c_int,
) -> *mut c_void {
    let Some(real) = real else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { real(lmid, file, mode) };
    if !handle.is_null() && mode & libc::RTLD_NOLOAD == 0 {
        objects_changed();
    }
    handle
}

/// # Safety
/// As libc's `dlclose`.
pub unsafe fn dlclose(real: Option<DlcloseFn>, handle: *mut c_void) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's argument.
    let r = unsafe { real(handle) };
    objects_changed();
    r
}

/// `mmap` and `mmap64`: an executable file mapping gets the probes of its file.
///
/// # Safety
/// As libc's `mmap`.
pub unsafe fn mmap(
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

/// `munmap`: breakpoints in the range vanished with it. Cheap when the range holds none (the
/// common case: malloc returning memory), checked against the trap table without locks.
///
/// # Safety
/// As libc's `munmap`.
pub unsafe fn munmap(real: Option<MunmapFn>, addr: *mut c_void, len: usize) -> c_int {
    let Some(real) = real else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(addr, len) };
    if r == 0 && sigsafe::table::any_in(addr as u64, (addr as u64).saturating_add(len as u64)) {
        objects_changed();
    }
    r
}
