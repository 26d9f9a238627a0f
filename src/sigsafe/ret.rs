//! Return probes: at a return-probed function's entry, its return address is replaced with
//! [`trampoline`]'s, and the real one kept on the thread's return stack (in its block); the function
//! returns into the trampoline, which accounts for the return and goes where the function was
//! really returning. No signal on the return side, on either path.

use core::arch::global_asm;
use core::sync::atomic::Ordering;
use std::sync::Arc;

use super::clock;
use super::consumer::Consumer;
use super::events;
use super::sys;
use super::table::ReadGuard;
use super::thread::{self, Block, FRAME_SLOW, FRAME_TSC, RET_STACK};

/// How far below the current stack pointer a pending frame may be and still be on the same stack
/// (and so abandoned, when it is below the current call): frames on another stack (a signal's
/// alternate stack, a coroutine's) are never dropped for being elsewhere.
const ABANDONED_WITHIN: u64 = 1 << 20;

/// The return trampoline's address.
pub fn trampoline() -> u64 {
    uprobe_return_trampoline as *const () as u64
}

/// What a hijack needs to know of the site's consumers.
pub struct Hijack {
    pub site: u64,
    /// The site's return counter.
    pub counter: u32,
    /// Take the entry time (some consumer wants durations).
    pub timed: bool,
    /// The return needs the slow path (durations or events).
    pub slow: bool,
}

/// At a return-probed function's entry (`rsp` points at its return address): remember the return
/// address and replace it with the trampoline. A call nested deeper than the return stack is not
/// followed: `missed`.
pub fn hijack(block: Option<&Block>, rsp: u64, h: &Hijack, consumers: &[Arc<Consumer>]) {
    let missed = || {
        for c in consumers.iter().filter(|c| c.ret) {
            c.missed.fetch_add(1, Ordering::Relaxed);
        }
    };
    let Some(b) = block else { return missed() };
    let tramp = trampoline();
    // SAFETY: at a function's entry, [rsp] is the return address its caller pushed.
    let current = unsafe { core::ptr::read_volatile(rsp as *const u64) };
    // Frames a longjmp (or an exception) abandoned lie at or below this call's slot on the same
    // stack: drop them, as kernel uretprobes do. A frame at this very slot is alive only when the
    // slot still holds the trampoline: a tail call from a return-probed function (chained).
    let mut depth = (b.ret_depth.load(Ordering::Relaxed) as usize).min(RET_STACK);
    while depth > 0 {
        let Some(top) = b.ret_frames.get(depth - 1) else { break };
        let slot = top.slot.load(Ordering::Relaxed);
        let abandoned =
            (slot < rsp && rsp - slot < ABANDONED_WITHIN) || (slot == rsp && current != tramp);
        if !abandoned {
            break;
        }
        depth -= 1;
    }
    b.ret_depth.store(depth as u32, Ordering::Relaxed);
    let Some(f) = b.ret_frames.get(depth) else { return missed() };
    // On the jump path this runs in the thread's normal context, where a signal handler may run a
    // return-probed function anywhere in here: the frame is taken first (depth + 1) with a slot
    // above every stack, so that a nested hijack neither overwrites it nor takes it for
    // abandoned; its real slot is written last.
    f.slot.store(u64::MAX, Ordering::Relaxed);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    b.ret_depth.store(depth as u32 + 1, Ordering::Relaxed);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    // A tail call from another return-probed function: `current` is the trampoline itself, and
    // that frame's return comes right after this one's (same slot, chained).
    f.real.store(current, Ordering::Relaxed);
    f.site.store(h.site, Ordering::Relaxed);
    // Durations by the cheap clock, unless events are traced (their timestamps are the
    // monotonic clock's, and a slice's end is its entry's timestamp and its duration).
    let by_ticks = h.timed && clock::tsc() && !events::TRACING.load(Ordering::Relaxed);
    let entry = match (h.timed, by_ticks) {
        (false, _) => 0,
        (true, true) => clock::ticks(),
        (true, false) => sys::monotonic_ns(),
    };
    f.entry_ns.store(entry, Ordering::Relaxed);
    f.counter.store(h.counter, Ordering::Relaxed);
    let flags = if h.slow { FRAME_SLOW } else { 0 } | if by_ticks { FRAME_TSC } else { 0 };
    f.flags.store(flags, Ordering::Relaxed);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    f.slot.store(rsp, Ordering::Relaxed);
    // SAFETY: the same slot, which the function's `ret` will read.
    unsafe { core::ptr::write_volatile(rsp as *mut u64, tramp) };
}

/// The registers the trampoline saved, in the order of its pushes (lowest address first); the
/// last word is the hijacked return-address slot itself.
#[repr(C)]
pub struct SavedRegs {
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub flags: u64,
    pub slot: u64,
}

// The return trampoline. Entered by the `ret` of a hijacked function (rsp = slot + 8).
//
// The plain return (the thread's innermost frame is this one, it only counts, no events) is
// handled here: count into the thread's counter, pop the frame, return to the real address, with
// the flags saved by lahf/seto. Anything else takes the full way: save what the C ABI lets a
// callee clobber (and the flags, and every xmm register), call `on_return`, which answers the real
// return address, write it into the slot, restore and return there.
global_asm!(
    ".pushsection .text.uprobe_return_trampoline,\"ax\",@progbits",
    ".globl uprobe_return_trampoline",
    ".hidden uprobe_return_trampoline",
    ".type uprobe_return_trampoline, @function",
    ".p2align 4",
    "uprobe_return_trampoline:",
    "    push rax", // where the real return address goes (the hijacked slot)
    "    push rax",
    "    seto al",
    "    lahf",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rsi", // the slot is at rsp + 40
    // A thread whose TLS is not glibc's has no record here (and never hijacked a return).
    "    mov rax, qword ptr fs:[0x28]",
    "    cmp rax, qword ptr [rip + {guard}]",
    "    jne 8f",
    "    mov rsi, qword ptr [rip + uprobe_tls@GOTTPOFF]",
    "    mov rax, qword ptr fs:[rsi + 8]", // the thread's block
    "    test rax, rax",
    "    jz 8f",
    "    mov ecx, dword ptr [rax + {depth}]",
    "    test ecx, ecx",
    "    jz 8f",
    "    lea rdx, [rcx + rcx * 4]",
    "    lea rdx, [rax + rdx * 8 + {frames} - 40]", // the innermost frame
    "    lea rcx, [rsp + 40]",
    "    cmp qword ptr [rdx], rcx",
    "    jne 8f",
    "    cmp dword ptr [rdx + 36], 0", // flags: durations or events
    "    jne 8f",
    "    cmp byte ptr [rip + {tracing}], 0",
    "    jne 8f",
    "    mov rsi, qword ptr fs:[rsi]", // active: null in libuprobe's own code
    "    test rsi, rsi",
    "    jz 8f",
    "    mov ecx, dword ptr [rdx + 32]", // the return counter
    "    cmp ecx, {max_counters}",
    "    jae 8f",
    "    inc qword ptr [rsi + rcx * 8 + {header}]",
    "    mov rcx, qword ptr [rdx + 8]",
    "    mov qword ptr [rsp + 40], rcx",
    "    dec dword ptr [rax + {depth}]",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    add al, 0x7f",
    "    sahf",
    "    pop rax",
    "    ret",
    "8:",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    add al, 0x7f",
    "    sahf",
    "    pop rax",
    "    pushfq",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push rbx",
    "    mov rbx, rsp",
    "    sub rsp, 256",
    "    and rsp, -16",
    "    movdqu xmmword ptr [rsp + 0], xmm0",
    "    movdqu xmmword ptr [rsp + 16], xmm1",
    "    movdqu xmmword ptr [rsp + 32], xmm2",
    "    movdqu xmmword ptr [rsp + 48], xmm3",
    "    movdqu xmmword ptr [rsp + 64], xmm4",
    "    movdqu xmmword ptr [rsp + 80], xmm5",
    "    movdqu xmmword ptr [rsp + 96], xmm6",
    "    movdqu xmmword ptr [rsp + 112], xmm7",
    "    movdqu xmmword ptr [rsp + 128], xmm8",
    "    movdqu xmmword ptr [rsp + 144], xmm9",
    "    movdqu xmmword ptr [rsp + 160], xmm10",
    "    movdqu xmmword ptr [rsp + 176], xmm11",
    "    movdqu xmmword ptr [rsp + 192], xmm12",
    "    movdqu xmmword ptr [rsp + 208], xmm13",
    "    movdqu xmmword ptr [rsp + 224], xmm14",
    "    movdqu xmmword ptr [rsp + 240], xmm15",
    "    cld",
    "    mov rdi, rbx",
    "    call {on_return}",
    "    mov qword ptr [rbx + 88], rax",
    "    movdqu xmm0, xmmword ptr [rsp + 0]",
    "    movdqu xmm1, xmmword ptr [rsp + 16]",
    "    movdqu xmm2, xmmword ptr [rsp + 32]",
    "    movdqu xmm3, xmmword ptr [rsp + 48]",
    "    movdqu xmm4, xmmword ptr [rsp + 64]",
    "    movdqu xmm5, xmmword ptr [rsp + 80]",
    "    movdqu xmm6, xmmword ptr [rsp + 96]",
    "    movdqu xmm7, xmmword ptr [rsp + 112]",
    "    movdqu xmm8, xmmword ptr [rsp + 128]",
    "    movdqu xmm9, xmmword ptr [rsp + 144]",
    "    movdqu xmm10, xmmword ptr [rsp + 160]",
    "    movdqu xmm11, xmmword ptr [rsp + 176]",
    "    movdqu xmm12, xmmword ptr [rsp + 192]",
    "    movdqu xmm13, xmmword ptr [rsp + 208]",
    "    movdqu xmm14, xmmword ptr [rsp + 224]",
    "    movdqu xmm15, xmmword ptr [rsp + 240]",
    "    mov rsp, rbx",
    "    pop rbx",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    popfq",
    "    ret",
    ".size uprobe_return_trampoline, . - uprobe_return_trampoline",
    ".popsection",
    on_return = sym on_return,
    depth = const core::mem::offset_of!(Block, ret_depth),
    frames = const core::mem::offset_of!(Block, ret_frames),
    tracing = sym events::TRACING,
    guard = sym super::thread::STACK_GUARD,
    max_counters = const thread::MAX_COUNTERS,
    header = const thread::HEADER,
);

const _: () = assert!(core::mem::size_of::<thread::RetFrame>() == 40);
const _: () = assert!(core::mem::offset_of!(thread::RetFrame, real) == 8);
const _: () = assert!(core::mem::offset_of!(thread::RetFrame, counter) == 32);
const _: () = assert!(core::mem::offset_of!(thread::RetFrame, flags) == 36);
const _: () = assert!(core::mem::offset_of!(thread::Tls, block) == 8);

extern "C" {
    fn uprobe_return_trampoline();
}

const _: () = assert!(core::mem::offset_of!(SavedRegs, slot) == 88);

/// A hijacked function returned into the trampoline: account for the return, and answer where it
/// was really going.
///
/// # Safety
/// Called only by the trampoline, with its saved registers.
unsafe extern "C" fn on_return(regs: *mut SavedRegs) -> u64 {
    // SAFETY: the trampoline passes its save area, valid for the call.
    let regs = unsafe { &mut *regs };
    let slot = regs as *mut SavedRegs as u64 + core::mem::offset_of!(SavedRegs, slot) as u64;
    let Some(b) = thread::tls_block() else { return return_elsewhere(slot, regs) };
    let depth = (b.ret_depth.load(Ordering::Relaxed) as usize).min(RET_STACK);
    // Innermost first; frames above the match were abandoned (longjmp, exceptions). A function
    // that returned with `ret imm16` popped its arguments too: its slot is up to 65535 bytes
    // below; the nearest such frame is it (abandoned frames lie deeper still).
    let slot_of = |i: usize| b.ret_frames.get(i).map_or(0, |f| f.slot.load(Ordering::Relaxed));
    let exact = (0..depth).rev().find(|&i| slot_of(i) == slot);
    let found = exact.or_else(|| {
        (0..depth)
            .rev()
            .filter(|&i| slot_of(i) < slot && slot - slot_of(i) <= 0xffff)
            .max_by_key(|&i| slot_of(i))
    });
    let i = found.unwrap_or(0);
    let Some(f) = found.and_then(|i| b.ret_frames.get(i)) else {
        return return_elsewhere(slot, regs);
    };
    let (real, site, entry_ns, counter, flags) = (
        f.real.load(Ordering::Relaxed),
        f.site.load(Ordering::Relaxed),
        f.entry_ns.load(Ordering::Relaxed),
        f.counter.load(Ordering::Relaxed),
        f.flags.load(Ordering::Relaxed),
    );
    b.ret_depth.store(i as u32, Ordering::Relaxed);
    let counting = thread::counting();
    if matches!(counting, thread::Counting::No) {
        return real;
    }
    counting.bump(counter);
    let tracing = events::TRACING.load(Ordering::Relaxed);
    if flags & FRAME_SLOW == 0 && !tracing {
        return real;
    }
    let (now, duration) = if flags & FRAME_TSC != 0 {
        let d = clock::ticks_to_ns(clock::ticks().wrapping_sub(entry_ns));
        (if tracing { sys::monotonic_ns() } else { 0 }, d)
    } else {
        let now = if entry_ns != 0 || tracing { sys::monotonic_ns() } else { 0 };
        (now, if entry_ns != 0 { now.saturating_sub(entry_ns) } else { 0 })
    };
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return real };
    for c in table.return_consumers_at(site) {
        if let (Some(l), true) = (&c.latency, entry_ns != 0) {
            l.record(duration);
        }
        if tracing {
            events::record_return(counting.block(), c, regs.rax, duration, now);
        }
    }
    real
}

/// A function returned on a thread other than the one it was called on: a coroutine (a
/// `swapcontext` stack) that moved between threads. Its frame is in the other thread's block; it
/// is taken from there (its slot, a stack address, names it in the whole process).
fn return_elsewhere(slot: u64, regs: &SavedRegs) -> u64 {
    let Some((real, site, counter)) = thread::take_frame_anywhere(slot) else {
        return lost_return();
    };
    let counting = thread::counting();
    counting.bump(counter);
    if events::TRACING.load(Ordering::Relaxed) {
        let guard = ReadGuard::enter();
        if let Some(table) = guard.table() {
            for c in table.return_consumers_at(site) {
                events::record_return(counting.block(), c, regs.rax, 0, 0);
            }
        }
    }
    real
}

/// Nowhere to return to: the stack was switched under us (swapcontext, a coroutine library).
/// Say so and stop, rather than jump somewhere arbitrary.
fn lost_return() -> u64 {
    let _ = sys::write_all(
        sys::MESSAGE_FD.load(Ordering::Relaxed),
        b"\nlibuprobe: a return-probed function returned on a stack it was not called on \
          (a stack switch libuprobe did not see); aborting\n",
    );
    let _ = sys::rt_sigaction(libc::SIGABRT, Some(&sys::KernelSigaction::DEFAULT), None);
    let _ = sys::rt_sigprocmask(libc::SIG_UNBLOCK, Some(&sys::sigbit(libc::SIGABRT)), None);
    sys::raise_here(libc::SIGABRT);
    sys::exit_thread(134)
}

/// The real return address kept for the hijacked slot at `slot` on this thread (a stack being
/// unwound finds the trampoline there).
pub fn real_return(slot: u64) -> Option<u64> {
    let b = thread::tls_block()?;
    let tramp = trampoline();
    let depth = (b.ret_depth.load(Ordering::Relaxed) as usize).min(RET_STACK);
    // A chained frame (tail call) shares its slot with a deeper one, which holds the real address.
    b.ret_frames.iter().take(depth).rev().find_map(|f| {
        let real = f.real.load(Ordering::Relaxed);
        (f.slot.load(Ordering::Relaxed) == slot && real != tramp).then_some(real)
    })
}

/// Hand every pending return of this thread back to its caller (before an unwinder walks the
/// stack): write the real return addresses into the live slots above `live_above`, count those
/// calls as missed, and empty the return stack.
pub fn restore_all(live_above: u64) {
    let Some(b) = thread::tls_block() else { return };
    let tramp = trampoline();
    let depth = (b.ret_depth.load(Ordering::Relaxed) as usize).min(RET_STACK);
    let guard = ReadGuard::enter();
    let table = guard.table();
    for f in b.ret_frames.iter().take(depth).rev() {
        let (slot, real) = (f.slot.load(Ordering::Relaxed), f.real.load(Ordering::Relaxed));
        if let Some(t) = table {
            for c in t.return_consumers_at(f.site.load(Ordering::Relaxed)) {
                c.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
        // A chained frame (tail call) shares its slot with a deeper frame, which holds the real
        // address; a slot below `live_above` belongs to a frame a longjmp abandoned.
        if real == tramp || slot <= live_above {
            continue;
        }
        // SAFETY: a live frame's return-address slot, which we overwrote at its entry.
        unsafe {
            if core::ptr::read_volatile(slot as *const u64) == tramp {
                core::ptr::write_volatile(slot as *mut u64, real);
            }
        }
    }
    b.ret_depth.store(0, Ordering::Relaxed);
}
