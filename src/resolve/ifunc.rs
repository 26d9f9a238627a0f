//! IFUNC symbols (`strlen`, `memcpy`, ... in glibc): the implementation this process calls is
//! probed, not the resolver. It is found as the dynamic linker binds it: `dlopen(RTLD_NOLOAD)` and
//! `dlvsym`/`dlsym`, which only work on an object that is relocated (the caller sees to that).

use crate::objects::{FuncSym, LoadedObject};

/// The address an IFUNC resolves to in this process.
pub fn resolve(obj: &LoadedObject, f: &FuncSym) -> Option<u64> {
    let path = std::ffi::CString::new(obj.path.as_str()).ok()?;
    let name = std::ffi::CString::new(f.name.as_str()).ok()?;
    // SAFETY: RTLD_NOLOAD only returns a handle to an object that is already loaded (and, as the
    // caller ensures, relocated); dlsym and dlclose are called with that handle and NUL-terminated
    // names.
    unsafe {
        let h = if obj.is_main {
            libc::dlopen(core::ptr::null(), libc::RTLD_LAZY)
        } else {
            libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD)
        };
        if h.is_null() {
            return None;
        }
        let version = f
            .versioned
            .as_deref()
            .and_then(|v| v.split('@').next_back())
            .map(|v| std::ffi::CString::new(v).ok());
        let p = match version {
            Some(Some(v)) if !v.as_bytes().is_empty() => {
                let p = libc::dlvsym(h, name.as_ptr(), v.as_ptr());
                if p.is_null() {
                    libc::dlsym(h, name.as_ptr())
                } else {
                    p
                }
            }
            _ => libc::dlsym(h, name.as_ptr()),
        };
        libc::dlclose(h);
        (!p.is_null()).then_some(p as u64)
    }
}
