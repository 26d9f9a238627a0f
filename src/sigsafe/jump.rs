//! The jump path's way into Rust. A site on the jump path is a `jmp` to a body of its own
//! (`xol::jump` writes it): the body counts a plain hit itself, in a few instructions, and calls
//! [`uprobe_jump_full`] for everything else (events, arguments, return probes, the internal mask
//! fix, a thread's first hit, a hit while libuprobe's own code runs). That routine saves what the
//! program can observe, calls [`on_jump_hit`] with the registers laid out as a signal context's
//! `gregs` (so that the trap path's code serves both), and restores it all.
//!
//! What is saved: every general register and the flags (a site in the middle of a function may
//! have live flags); xmm0-15, with legacy SSE moves, which leave the upper halves of ymm and zmm
//! alone. That is all the vector state the Rust code touches: it is built for the baseline x86-64
//! target (SSE2, no AVX: `build.rs` refuses a build with AVX enabled), so it never writes ymm/zmm
//! upper halves, xmm16-31, the mask registers or x87 state. The red zone below the program's rsp is
//! skipped by the body before it pushes anything.

use core::arch::global_asm;

// The full entry saves xmm0-15 only, with legacy SSE moves: Rust code built with AVX would write
// ymm/zmm upper halves the program may be using.
#[cfg(any(target_feature = "avx", target_feature = "avx2", target_feature = "avx512f"))]
compile_error!("libuprobe must be built for baseline x86-64 (no AVX): see sigsafe/jump.rs");

use super::emulate::{self, Gregs, RBP, RIP, RSP};
use super::hit::count;
use super::table::{ReadGuard, MASK_FIX};
use super::thread::{self, Counting};
use super::trap;

/// Bytes of the context the routine builds: a `gregs` array.
pub const CTX_SIZE: usize = core::mem::size_of::<Gregs>();
const _: () = assert!(CTX_SIZE == 184);

// Entered by `call` from a body, with rax = the site's address; [rsp] is the return into the body,
// [rsp + 8] the program's rax, and the program's rsp is rsp + 16 + 128 (the body skipped the red
// zone). Returns with every register and the flags as the program had them (the site's rax back
// in rax), popping the saved rax (`ret 8`).
global_asm!(
    ".pushsection .text.uprobe_jump_full,\"ax\",@progbits",
    ".globl uprobe_jump_full",
    ".hidden uprobe_jump_full",
    ".type uprobe_jump_full, @function",
    ".p2align 4",
    "uprobe_jump_full:",
    // Its frame rules, for unwinders that come through (a profiler's sample, gdb): the caller is
    // the body, whose own rules are the site's (see `xol::cfi`).
    "    .cfi_startproc",
    "    pushfq",
    "    .cfi_adjust_cfa_offset 8",
    "    lea rsp, [rsp - {ctx}]",
    "    .cfi_adjust_cfa_offset {ctx}",
    "    mov qword ptr [rsp + 0], r8",
    "    mov qword ptr [rsp + 8], r9",
    "    mov qword ptr [rsp + 16], r10",
    "    mov qword ptr [rsp + 24], r11",
    "    mov qword ptr [rsp + 32], r12",
    "    .cfi_rel_offset r12, 32",
    "    mov qword ptr [rsp + 40], r13",
    "    .cfi_rel_offset r13, 40",
    "    mov qword ptr [rsp + 48], r14",
    "    .cfi_rel_offset r14, 48",
    "    mov qword ptr [rsp + 56], r15",
    "    .cfi_rel_offset r15, 56",
    "    mov qword ptr [rsp + 64], rdi",
    "    mov qword ptr [rsp + 72], rsi",
    "    mov qword ptr [rsp + 80], rbp",
    "    .cfi_rel_offset rbp, 80",
    "    mov qword ptr [rsp + 88], rbx",
    "    .cfi_rel_offset rbx, 88",
    "    mov qword ptr [rsp + 96], rdx",
    "    mov qword ptr [rsp + 112], rcx",
    "    mov qword ptr [rsp + 128], rax", // REG_RIP: the site
    "    mov rax, qword ptr [rsp + {ctx} + 16]",
    "    mov qword ptr [rsp + 104], rax", // REG_RAX
    "    mov rax, qword ptr [rsp + {ctx}]",
    "    mov qword ptr [rsp + 136], rax", // REG_EFL
    "    lea rax, [rsp + {ctx} + 24 + 128]",
    "    mov qword ptr [rsp + 120], rax", // REG_RSP: the program's
    // The program may be single-stepping (TF): not through libuprobe's code.
    "    mov rax, qword ptr [rsp + 136]",
    "    and rax, -0x101",
    "    push rax",
    "    .cfi_adjust_cfa_offset 8",
    "    popfq",
    "    .cfi_adjust_cfa_offset -8",
    "    mov rbx, rsp",
    "    .cfi_def_cfa_register rbx",
    "    and rsp, -16",
    "    sub rsp, 256",
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
    "    call {hit}",
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
    "    .cfi_def_cfa_register rsp",
    "    mov rax, qword ptr [rsp + 136]",
    "    mov qword ptr [rsp + {ctx}], rax",
    "    mov r8, qword ptr [rsp + 0]",
    "    mov r9, qword ptr [rsp + 8]",
    "    mov r10, qword ptr [rsp + 16]",
    "    mov r11, qword ptr [rsp + 24]",
    "    mov r12, qword ptr [rsp + 32]",
    "    mov r13, qword ptr [rsp + 40]",
    "    mov r14, qword ptr [rsp + 48]",
    "    mov r15, qword ptr [rsp + 56]",
    "    mov rdi, qword ptr [rsp + 64]",
    "    mov rsi, qword ptr [rsp + 72]",
    "    mov rbp, qword ptr [rsp + 80]",
    "    mov rbx, qword ptr [rsp + 88]",
    "    mov rdx, qword ptr [rsp + 96]",
    "    mov rax, qword ptr [rsp + 104]",
    "    mov rcx, qword ptr [rsp + 112]",
    "    .cfi_restore rbx",
    "    .cfi_restore rbp",
    "    .cfi_restore r12",
    "    .cfi_restore r13",
    "    .cfi_restore r14",
    "    .cfi_restore r15",
    "    lea rsp, [rsp + {ctx}]",
    "    .cfi_adjust_cfa_offset -{ctx}",
    "    popfq",
    "    .cfi_adjust_cfa_offset -8",
    "    ret 8",
    "    .cfi_endproc",
    ".size uprobe_jump_full, . - uprobe_jump_full",
    ".popsection",
    ctx = const CTX_SIZE,
    hit = sym on_jump_hit,
);

extern "C" {
    fn uprobe_jump_full();
}

const _: () = assert!(libc::REG_R8 == 0 && libc::REG_RDI == 8 && libc::REG_RBX == 11);
const _: () = assert!(libc::REG_RAX == 13 && libc::REG_RCX == 14 && libc::REG_RSP == 15);
const _: () = assert!(libc::REG_RIP == 16 && libc::REG_EFL == 17);

/// The address bodies call.
pub fn full_entry() -> u64 {
    uprobe_jump_full as *const () as u64
}

/// A hit on the jump path that needs more than a count. `g` holds the program's registers at the
/// site (rip = the site); changes to them (the mask fix) are what the program resumes with.
///
/// # Safety
/// Called only by [`uprobe_jump_full`], with its context.
unsafe extern "C" fn on_jump_hit(g: *mut Gregs) {
    // SAFETY: the routine passes its context, valid for the call.
    let g = unsafe { &mut *g };
    let site = emulate::get(g, RIP);
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return };
    let Some(entry) = table.lookup(site).copied() else { return };
    // A site removed after this thread took its jump: not counted (the probe is gone, as on the
    // trap path, where such a thread runs the original instruction again).
    if !entry.live() {
        return;
    }
    if entry.flags & MASK_FIX != 0 {
        trap::fix_mask(entry.mask_reg, entry.size_reg, g);
    }
    if entry.count == 0 {
        return;
    }
    // A vfork or posix_spawn child borrowing this thread, and libuprobe's own code, find
    // `counting()` says No: their hits are not the program's.
    // (A hit of libuprobe's own code here costs a few nanoseconds, not a trap: it is not one of
    // `trap::RUNTIME_TRAPS`.)
    let counting = thread::counting();
    if matches!(counting, Counting::No) {
        return;
    }
    let (sp, bp) = (emulate::get(g, RSP), emulate::get(g, RBP));
    count(&guard, &counting, &entry, table, site, emulate::args(g), Some((sp, bp)));
}
