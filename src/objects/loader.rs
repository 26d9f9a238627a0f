//! The dynamic loader's state, as its debugger interface (`_r_debug`) shows it: whether it is in
//! the middle of adding or removing objects. While it is, mappings are being made and replaced
//! (an object is first mapped whole, then its segments over it), and nothing may be installed in
//! them: the loader's own hook (at `RT_CONSISTENT`) rescans when it is done.

use core::sync::atomic::{AtomicUsize, Ordering};

/// The address of the loader's `struct r_debug` (0: unknown).
static R_DEBUG: AtomicUsize = AtomicUsize::new(0);

/// `r_state` values.
const RT_CONSISTENT: i32 = 0;

fn state() -> Option<i32> {
    let r = R_DEBUG.load(Ordering::Acquire);
    // SAFETY: r_state, an int, follows r_brk (offset 24) in the loader's r_debug, which lives as
    // long as the process; read volatile, as the loader changes it.
    (r != 0).then(|| unsafe { core::ptr::read_volatile((r + 24) as *const i32) })
}

/// Find `_r_debug` (once, at setup). Returns its `r_brk`, the loader's hook address.
pub fn find() -> Option<u64> {
    // SAFETY: dlsym with a NUL-terminated name; `_r_debug` is ld.so's exported r_debug.
    let r = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_r_debug".as_ptr()) } as usize;
    if r == 0 {
        return None;
    }
    R_DEBUG.store(r, Ordering::Release);
    // SAFETY: struct r_debug { int r_version; struct link_map *r_map; ElfW(Addr) r_brk; ... }:
    // r_brk is the third 8-byte field.
    let r_brk = unsafe { *(r as *const u64).add(2) };
    (r_brk != 0).then_some(r_brk)
}

/// Is the loader between changes (every object fully mapped)? True when unknown.
pub fn consistent() -> bool {
    state().is_none_or(|s| s == RT_CONSISTENT)
}

/// Wait until no dlopen or dlclose is in progress in another thread (take and let go of the
/// loader's lock, through `dlopen(RTLD_NOLOAD)` of an object that is loaded). After it, every
/// object is relocated, and its IFUNCs can be resolved.
pub fn wait_until_idle(loaded_path: &str) {
    let Ok(path) = std::ffi::CString::new(loaded_path) else { return };
    // SAFETY: RTLD_NOLOAD of a loaded object only returns (and references) its handle.
    unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if !h.is_null() {
            libc::dlclose(h);
        }
    }
}
