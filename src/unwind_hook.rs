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

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{sys, trap, InRuntime};

static UPROBE_REAL_UNWIND_RAISE: AtomicUsize = AtomicUsize::new(0);
static UPROBE_REAL_UNWIND_RETHROW: AtomicUsize = AtomicUsize::new(0);
static UPROBE_REAL_UNWIND_FORCED: AtomicUsize = AtomicUsize::new(0);
static UPROBE_REAL_UNWIND_BACKTRACE: AtomicUsize = AtomicUsize::new(0);
static UPROBE_REAL_BACKTRACE: AtomicUsize = AtomicUsize::new(0);
static UPROBE_REAL_PTHREAD_EXIT: AtomicUsize = AtomicUsize::new(0);

/// Find the real functions (the next definitions after ours).
pub fn resolve_real_functions() {
    let names: [(&AtomicUsize, &core::ffi::CStr); 6] = [
        (&UPROBE_REAL_UNWIND_RAISE, c"_Unwind_RaiseException"),
        (&UPROBE_REAL_UNWIND_RETHROW, c"_Unwind_Resume_or_Rethrow"),
        (&UPROBE_REAL_UNWIND_FORCED, c"_Unwind_ForcedUnwind"),
        (&UPROBE_REAL_UNWIND_BACKTRACE, c"_Unwind_Backtrace"),
        (&UPROBE_REAL_BACKTRACE, c"backtrace"),
        (&UPROBE_REAL_PTHREAD_EXIT, c"pthread_exit"),
    ];
    for (slot, name) in names {
        if slot.load(Ordering::Acquire) == 0 {
            // SAFETY: dlsym with a NUL-terminated name.
            let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
            slot.store(p as usize, Ordering::Release);
        }
    }
}

/// Called by every wrapper before it jumps to the real function. `live_above`: the wrapper's
/// entry rsp; every slot above it belongs to a live caller frame.
extern "C" fn uprobe_restore_returns(live_above: u64) {
    let _rt = InRuntime::enter();
    resolve_real_functions(); // an unwinder may run before our constructor
    let trampoline = trap::RET_TRAMPOLINE.load(Ordering::Acquire);
    let ts = sys::thread_state();
    let depth = ts.ret_depth.load(Ordering::Relaxed) as usize;
    if trampoline == 0 || depth == 0 {
        return;
    }
    for f in ts.ret_frames[..depth].iter().rev() {
        let (slot, real) = (f.slot.load(Ordering::Relaxed), f.real.load(Ordering::Relaxed));
        trap::count_missed(f.site.load(Ordering::Relaxed));
        // A chained frame (tail call) shares its slot with a deeper frame, which holds the real
        // address; a slot below `live_above` belongs to a frame a longjmp abandoned.
        if real == trampoline || slot <= live_above {
            continue;
        }
        // SAFETY: a live frame's return-address slot, which we overwrote at its entry.
        unsafe {
            if core::ptr::read_volatile(slot as *const u64) == trampoline {
                core::ptr::write_volatile(slot as *mut u64, real);
            }
        }
    }
    ts.ret_depth.store(0, Ordering::Relaxed);
}

// Each wrapper: save the argument registers, restore the hijacked returns, restore the
// arguments, and jump to the real function with the caller's stack exactly as it was. Naked
// functions, so that they are exported (interposing the real ones) and have no prologue.
macro_rules! unwinder_wrapper {
    ($name:ident, $real:ident) => {
        /// Interposed: restores hijacked returns, then jumps to the real function.
        ///
        /// # Safety
        /// As the real function's.
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name() {
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
                real = sym $real,
            );
        }
    };
}

unwinder_wrapper!(_Unwind_RaiseException, UPROBE_REAL_UNWIND_RAISE);
unwinder_wrapper!(_Unwind_Resume_or_Rethrow, UPROBE_REAL_UNWIND_RETHROW);
unwinder_wrapper!(_Unwind_ForcedUnwind, UPROBE_REAL_UNWIND_FORCED);
unwinder_wrapper!(_Unwind_Backtrace, UPROBE_REAL_UNWIND_BACKTRACE);
unwinder_wrapper!(backtrace, UPROBE_REAL_BACKTRACE);
unwinder_wrapper!(pthread_exit, UPROBE_REAL_PTHREAD_EXIT);
