//! The signal handlers: SIGTRAP (a hit on a breakpoint: count it, record what its consumers want,
//! resume through the XOL slot or by emulation), and the synchronous faults (a fault in a displaced
//! instruction is shown to the program at the instruction's own address).

use core::arch::global_asm;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use super::chain;
use super::emulate::{self, Gregs, RBP, RIP, RSP};
use super::hit::{count, in_runtime};
use super::plan::Resume;
use super::sys;
use super::table::{ReadGuard, SlotMap, LINK_MAP_HOOK, MASK_FIX, POPF};
use super::thread::{self, Counting};

/// `si_code` of a SIGTRAP raised by `int3`.
const SI_KERNEL: i32 = 0x80;

/// The pid that owns the runtime (written by `runtime::owner` only): hits count only there, never
/// in a vfork or posix_spawn child running on its parent's memory.
pub static OWNER_PID: AtomicI32 = AtomicI32::new(0);

/// Set when objects may have changed while no rescan could run (the link-map hook fired inside
/// libuprobe's own code): whoever holds the registry rescans before letting go.
pub static RESCAN_WANTED: AtomicBool = AtomicBool::new(false);

/// The function the link-map hook calls, in normal context, with the loader's lock held
/// (registered by `hooks::dl`); 0 before.
pub static LINK_MAP_CALLBACK: AtomicUsize = AtomicUsize::new(0);

/// Flags of libuprobe's handlers. `SA_NODEFER`: a trap taken while a handler of ours runs on this
/// thread (a probe hit in the program's own SIGTRAP handler, which `chain` calls) is handled too.
pub const HANDLER_FLAGS: u64 =
    (libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART) as u64 | sys::SA_RESTORER;

// The restorer our handlers return through. It lives in libuprobe, not libc, so that a probe on
// libc's own `__restore_rt` does not trap again every time a handler of ours returns. Its bytes
// are glibc's (`mov rax, 15; syscall`), and it has no CFI: unwinders (libgcc's, gdb's,
// libuprobe's own) know a signal frame by those bytes.
global_asm!(
    ".pushsection .text.uprobe_sigreturn,\"ax\",@progbits",
    ".globl uprobe_sigreturn",
    ".hidden uprobe_sigreturn",
    ".type uprobe_sigreturn, @function",
    ".p2align 4",
    "uprobe_sigreturn:",
    "    mov rax, 15", // __NR_rt_sigreturn
    "    syscall",
    "    ud2",
    ".size uprobe_sigreturn, . - uprobe_sigreturn",
    ".popsection",
);

extern "C" {
    fn uprobe_sigreturn();
    fn uprobe_link_map_trampoline();
}

/// Address of our signal restorer.
pub fn restorer() -> usize {
    uprobe_sigreturn as *const () as usize
}

/// The SIGTRAP handler's address.
pub fn sigtrap_handler() -> usize {
    on_sigtrap as *const () as usize
}

/// The fault handler's address.
pub fn fault_handler() -> usize {
    on_fault as *const () as usize
}

// The link-map hook's trampoline, entered from the trap handler at the first instruction of the
// loader's `_dl_debug_state` (a `void (void)` function, so caller-saved registers are free). It
// calls the registered callback on an aligned stack, in normal (not signal) context, then returns
// to what the handler pushed: the XOL slot of the displaced instruction, or the loader itself.
global_asm!(
    ".pushsection .text.uprobe_link_map_trampoline,\"ax\",@progbits",
    ".globl uprobe_link_map_trampoline",
    ".hidden uprobe_link_map_trampoline",
    ".type uprobe_link_map_trampoline, @function",
    ".p2align 4",
    "uprobe_link_map_trampoline:",
    "    .cfi_startproc",
    "    push rbx",
    "    .cfi_adjust_cfa_offset 8",
    "    .cfi_offset rbx, -16",
    "    mov rbx, rsp",
    "    .cfi_def_cfa_register rbx",
    "    and rsp, -16",
    "    cld",
    "    call qword ptr [rip + {callback}]",
    "    mov rsp, rbx",
    "    .cfi_def_cfa_register rsp",
    "    pop rbx",
    "    .cfi_adjust_cfa_offset -8",
    "    .cfi_restore rbx",
    "    ret",
    "    .cfi_endproc",
    ".size uprobe_link_map_trampoline, . - uprobe_link_map_trampoline",
    ".popsection",
    callback = sym LINK_MAP_CALLBACK,
);

/// Can the link-map hook resume after this instruction? Its trampoline ends in `ret`: to an XOL
/// slot pushed for it, or, for a `ret` at r_brk, straight back to the loader.
pub fn can_hijack(r: Resume) -> bool {
    matches!(r, Resume::Xol { .. } | Resume::Emulate(super::plan::Emu::Ret { pop: 0 }))
}

enum Outcome {
    /// Ours, and the context is set to resume.
    Done,
    /// Not a breakpoint of ours: the program's.
    NotOurs,
    /// Ours, but the displaced instruction would have faulted reading `addr` (the context is
    /// set back to the instruction).
    Fault(u64),
}

/// The SIGTRAP handler.
unsafe extern "C" fn on_sigtrap(sig: i32, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO handler.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    // SAFETY: as above.
    let code = unsafe { (*info).si_code };
    match handle_breakpoint(code, &mut uc.uc_mcontext.gregs) {
        Outcome::Done => {}
        Outcome::NotOurs => {
            // A single step (or watchpoint) in libuprobe's own code: the program never sees its
            // instructions; only the step that completes a displaced instruction is shown, where
            // the instruction lives.
            let rip = emulate::get(&uc.uc_mcontext.gregs, RIP);
            if code != SI_KERNEL && in_own_code(rip) && !after_displaced(rip) {
                return;
            }
            translate(&mut uc.uc_mcontext.gregs, info);
            // SAFETY: the kernel's pointers, passed on.
            unsafe { chain::deliver(sig, info, ctx, false) };
        }
        Outcome::Fault(addr) => {
            // SAFETY: zeroed siginfo is valid; the fields are written at the kernel's offsets.
            let mut si: libc::siginfo_t = unsafe { core::mem::zeroed() };
            si.si_signo = libc::SIGSEGV;
            si.si_code = 1; // SEGV_MAPERR
                            // SAFETY: si_addr is the first word of the fault union, at offset 16 on x86-64.
            unsafe { *((&mut si as *mut libc::siginfo_t as *mut u8).add(16) as *mut u64) = addr };
            // SAFETY: a siginfo built like the kernel's, and the kernel's context.
            unsafe { chain::deliver(libc::SIGSEGV, &mut si, ctx, false) };
        }
    }
}

/// The handler of SIGSEGV, SIGBUS, SIGILL and SIGFPE: a fault in an out-of-line copy is shown to
/// the program at the original instruction; then it goes to the program's disposition.
unsafe extern "C" fn on_fault(sig: i32, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO handler.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    if sig == libc::SIGSEGV || sig == libc::SIGBUS {
        if let Some(to) = sys::fault_recovery(emulate::get(&uc.uc_mcontext.gregs, RIP)) {
            emulate::set(&mut uc.uc_mcontext.gregs, RIP, to);
            return;
        }
    }
    translate(&mut uc.uc_mcontext.gregs, info);
    // SAFETY: the kernel's pointers, passed on.
    unsafe { chain::deliver(sig, info, ctx, true) };
}

/// libuprobe's own text (the mapping holding its handlers), set at setup.
pub static OWN_TEXT: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Is `rip` in code of libuprobe's: its own text, or code it wrote (slots, bodies, stubs)?
fn in_own_code(rip: u64) -> bool {
    let [lo, hi] = &OWN_TEXT;
    if lo.load(Ordering::Relaxed) <= rip && rip < hi.load(Ordering::Relaxed) {
        return true;
    }
    let guard = ReadGuard::enter();
    guard.table().is_some_and(|t| t.in_code(rip))
}

/// Is `rip` right after a displaced instruction ran out of line (where a step is the program's)?
fn after_displaced(rip: u64) -> bool {
    let guard = ReadGuard::enter();
    guard.table().and_then(|t| t.slot_at(rip)).is_some_and(|m| rip >= m.start + m.len as u64)
}

/// If the context is inside an out-of-line copy, move it to where the program believes it is: the
/// original instruction (not yet executed) or the one after it (executed).
fn translate(g: &mut Gregs, info: *mut libc::siginfo_t) {
    let rip = emulate::get(g, RIP);
    let guard = ReadGuard::enter();
    let Some(m) = guard.table().and_then(|t| t.slot_at(rip)).copied() else { return };
    drop(guard);
    let to = place_of(&m, rip);
    if m.syscall && to != m.site {
        emulate::set(g, emulate::RCX, m.site.wrapping_add(m.site_len as u64));
    }
    emulate::set(g, RIP, to);
    // SIGILL, SIGFPE and SIGTRAP carry the instruction's address too.
    // SAFETY: `info` is the kernel's siginfo; si_addr is at offset 16 on x86-64.
    unsafe {
        let addr = (info as *mut u8).add(16) as *mut u64;
        if *addr == rip {
            *addr = to;
        }
    }
}

fn place_of(m: &SlotMap, rip: u64) -> u64 {
    if rip == m.start {
        m.site
    } else {
        m.site.wrapping_add(m.site_len as u64)
    }
}

/// Is this trap one of our breakpoints? If so, count it and set up the resume.
#[inline(always)]
fn handle_breakpoint(code: i32, g: &mut Gregs) -> Outcome {
    if code != SI_KERNEL {
        return Outcome::NotOurs; // raise(), kill(), tgkill(), single-step: never ours
    }
    let site = emulate::get(g, RIP).wrapping_sub(1);
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return Outcome::NotOurs };
    let Some(entry) = table.lookup(site).copied() else { return Outcome::NotOurs };
    if !entry.live() {
        // The breakpoint was removed after this trap: the original instruction is back, run it.
        emulate::set(g, RIP, site);
        return Outcome::Done;
    }
    if entry.flags & MASK_FIX != 0 {
        fix_mask(entry.mask_reg, entry.size_reg, g);
    }
    // Hits count only in the process that owns the runtime (not in a vfork or posix_spawn child,
    // which runs on the parent's memory), and not while libuprobe's own code runs.
    let ours = sys::getpid() == OWNER_PID.load(Ordering::Relaxed);
    let counting = if ours && entry.count > 0 { thread::counting() } else { Counting::No };
    if ours && entry.count > 0 && matches!(counting, Counting::No) && in_runtime() {
        RUNTIME_TRAPS.fetch_add(1, Ordering::Relaxed);
    }
    let args = emulate::args(g);
    let rsp0 = emulate::get(g, RSP);
    let rbp0 = emulate::get(g, RBP);

    if entry.flags & LINK_MAP_HOOK != 0 {
        let here = ours && !in_runtime() && thread::tls().suspended.load(Ordering::Relaxed) == 0;
        if here && can_hijack(entry.resume) {
            // Call the link-map hook as if the loader had: push where to go on (the slot, or
            // nothing for a bare `ret`) and enter the trampoline, which returns there.
            if let Resume::Xol { slot } = entry.resume {
                emulate::push(g, slot);
            }
            emulate::set(g, RIP, uprobe_link_map_trampoline as *const () as u64);
            count(&guard, &counting, &entry, table, site, args, Some((rsp0, rbp0)));
            return Outcome::Done;
        }
        // Inside the runtime (or a child that does not own it): whoever holds the registry
        // rescans before letting go.
        RESCAN_WANTED.store(true, Ordering::SeqCst);
    }
    if entry.flags & POPF != 0 && entry.count > 0 {
        // A `popfq` that sets the trap flag: run out of line, its single step would come after
        // the jump back, one instruction early. Emulated here instead, the kernel's sigreturn
        // sets the flags, and the step comes after the program's next instruction, as it would.
        let efl = emulate::get(g, libc::REG_EFL as usize);
        if let Some(v) = sys::read_u64_safely(rsp0) {
            if v & TF != 0 && efl & TF == 0 {
                emulate::set(g, libc::REG_EFL as usize, (efl & !POPF_BITS) | (v & POPF_BITS));
                emulate::set(g, RSP, rsp0.wrapping_add(8));
                emulate::set(g, RIP, site.wrapping_add(entry.mask_reg as u64));
                count(&guard, &counting, &entry, table, site, args, Some((rsp0, rbp0)));
                return Outcome::Done;
            }
        }
    }
    match entry.resume {
        Resume::Xol { slot } => emulate::set(g, RIP, slot),
        Resume::Emulate(emu) => {
            if let Err(f) = emulate::emulate(emu, g) {
                // The hit counts (as under kernel uprobes: the probe fired, then the instruction
                // faulted); the fault is the program's, at the instruction's own address.
                emulate::set(g, RIP, site);
                count(&guard, &counting, &entry, table, site, args, None);
                return Outcome::Fault(f.addr);
            }
        }
    }
    count(&guard, &counting, &entry, table, site, args, Some((rsp0, rbp0)));
    Outcome::Done
}

/// The trap flag.
const TF: u64 = 0x100;
/// The flags `popfq` sets in user mode that sigreturn restores (the kernel's FIX_EFLAGS): AC, OF,
/// DF, TF, SF, ZF, AF, PF, CF.
const POPF_BITS: u64 = 0x40dd5;

/// Bit 7 of a table entry's `mask_reg`: the system call is `rt_sigprocmask`, whose `how` (rdi)
/// may be SIG_UNBLOCK (nothing to fix).
pub const MASK_HOW_IN_RDI: u8 = 0x80;
/// `mask_reg` of `rt_sigreturn`: the mask is the `uc_sigmask` of the signal frame at rsp (the
/// kernel's ucontext: 8 + 8 + 24 + 256 bytes before it), fixed in place.
pub const MASK_IN_FRAME: u8 = 0x7e;
const UC_SIGMASK: u64 = 0x128;
/// `size_reg` when the system call has no size argument to check.
pub const NO_SIZE_REG: u8 = 0xff;

/// Traps taken while libuprobe's own code ran on a thread (not counted: its own work running
/// into the program's probes). Shown by `stats` and in the JSON summary.
pub static RUNTIME_TRAPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// An internal probe right before glibc passes a signal set to the kernel: if the set blocks
/// SIGTRAP, pass a copy without it, so that no thread ever blocks SIGTRAP where a probe may be hit
/// (a new thread's first instructions, a posix_spawn child, a thread's exit path).
pub fn fix_mask(mask_reg: u8, size_reg: u8, g: &mut Gregs) {
    if size_reg != NO_SIZE_REG && emulate::get(g, size_reg as usize) != 8 {
        return; // not the system call this site was taken for
    }
    if mask_reg == MASK_IN_FRAME {
        let at = emulate::get(g, RSP).wrapping_add(UC_SIGMASK);
        if let Some(mask) = sys::read_u64_safely(at) {
            if mask & sys::sigbit(libc::SIGTRAP) != 0 {
                sys::write_u64_safely(at, mask & !sys::sigbit(libc::SIGTRAP));
            }
        }
        return;
    }
    let reg = (mask_reg & 0x7f) as usize;
    if mask_reg & MASK_HOW_IN_RDI != 0
        && emulate::get(g, libc::REG_RDI as usize) == libc::SIG_UNBLOCK as u64
    {
        return;
    }
    let set = emulate::get(g, reg);
    if set == 0 {
        return;
    }
    let Some(mask) = sys::read_u64_safely(set) else { return };
    if mask & sys::sigbit(libc::SIGTRAP) == 0 {
        return;
    }
    let Some(b) = thread::own_block() else { return };
    let i = b.scratch_next.fetch_add(1, Ordering::Relaxed) as usize % b.scratch_masks.len();
    let Some(scratch) = b.scratch_masks.get(i) else { return };
    scratch.store(mask & !sys::sigbit(libc::SIGTRAP), Ordering::Relaxed);
    emulate::set(g, reg, scratch.as_ptr() as u64);
}
