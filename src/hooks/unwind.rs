//! Unwinders must never see the return trampoline.
//!
//! A return probe replaces a return address on the stack with the trampoline's. An unwinder that
//! walks through such a frame (a C++ exception, `backtrace()`, `pthread_exit`) would find no unwind
//! information there and terminate the program, or stop short. So, as uftrace does, the entry
//! points of the unwinders are interposed by small assembly wrappers that first write the real
//! return address back into every live hijacked slot of the calling thread, then jump (not call)
//! to the real function, so that the wrapper leaves no frame of its own for the unwinder to see.
//! The calls whose return addresses were restored are no longer followed to their return: they are
//! counted as `missed`.
//!
//! Interposed: `_Unwind_RaiseException`, `_Unwind_Resume_or_Rethrow`, `_Unwind_ForcedUnwind`,
//! `_Unwind_Backtrace` (libgcc_s: C++ `throw`, `std::rethrow_exception`, Rust and other users), and
//! glibc's `backtrace` and `pthread_exit` (which reach libgcc_s through a handle of their own).
//! Not covered: thread cancellation at a cancellation point, and unwinders that read the stack by
//! themselves (libunwind, debuggers).

use crate::sigsafe::ret;

/// Called by every wrapper before it jumps to the real function. `live_above`: the wrapper's
/// entry rsp; every slot above it belongs to a live caller frame. Signal-safe code only.
extern "C" fn uprobe_restore_returns(live_above: u64) {
    resolve_all(); // an unwinder may run before our constructor
    ret::restore_all(live_above);
}

macro_rules! unwinder_wrappers {
    ($($name:ident),*) => {
        $(
            #[allow(non_snake_case)]
            pub mod $name {
                use core::sync::atomic::{AtomicUsize, Ordering};
                pub static REAL: AtomicUsize = AtomicUsize::new(0);
                pub fn resolve() {
                    if REAL.load(Ordering::Acquire) == 0 {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: dlsym with a NUL-terminated name.
                        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
                        REAL.store(p as usize, Ordering::Release);
                    }
                }
            }

            /// Interposed: restores hijacked returns, then jumps to the real function.
            ///
            /// # Safety
            /// As the real function's.
            #[unsafe(naked)]
            #[no_mangle]
            pub unsafe extern "C" fn $name() {
                // Save the argument registers, restore the hijacked returns, restore the
                // arguments, and jump to the real function with the caller's stack as it was.
                core::arch::naked_asm!(
                    "push rdi",
                    "push rsi",
                    "push rdx",
                    "push rcx",
                    "push r8",
                    "push r9",
                    "sub rsp, 8",
                    "lea rdi, [rsp + 56]",
                    "call {restore}",
                    "add rsp, 8",
                    "pop r9",
                    "pop r8",
                    "pop rcx",
                    "pop rdx",
                    "pop rsi",
                    "pop rdi",
                    "jmp qword ptr [rip + {real}]",
                    restore = sym uprobe_restore_returns,
                    real = sym $name::REAL,
                );
            }
        )*

        /// Resolve the real unwinders.
        pub fn resolve_all() {
            $( $name::resolve(); )*
        }

        /// Every unwinder wrapped.
        pub const WRAPPED: &[&str] = &[$(stringify!($name)),*];
    };
}

unwinder_wrappers!(
    _Unwind_RaiseException,
    _Unwind_Resume_or_Rethrow,
    _Unwind_ForcedUnwind,
    _Unwind_Backtrace,
    backtrace,
    pthread_exit
);
