//! What a thread keeps for libuprobe: a tiny initial-exec TLS record, and a block of its own from a
//! pool (its hit counters, its return-probe stack, its event ring).
//!
//! The TLS record is 40 bytes, so that libuprobe also loads where static TLS is scarce. Its first
//! word, `active`, is what a jump trampoline reads: the thread's block when hits on this thread are
//! the program's, null otherwise (before the thread's first hit, while it runs libuprobe code,
//! while a vfork or posix_spawn child borrows it). A trampoline that finds it null takes the slow
//! path, which sorts out which case it is.
//!
//! Blocks live in chunks of anonymous memory that are never unmapped, so counts survive the thread:
//! a block stays with its thread until the thread is gone, and is then folded into [`GLOBAL`] and
//! handed to another thread. Counting never writes a cache line that another thread writes.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::sys;

/// Return-probe frames a thread can have pending at once.
pub const RET_STACK: usize = 64;
/// Hit counters per block: one per probed site (two for a site with return probes).
pub const MAX_COUNTERS: usize = 32768;
/// Bytes of a block before its counters (page-aligned, so counters can be discarded by page).
pub const HEADER: usize = 8192;
/// Bytes of one block.
pub const BLOCK_SIZE: usize = HEADER + MAX_COUNTERS * 8;
const CHUNK_BLOCKS: usize = 64;
const MAX_CHUNKS: usize = 64;
const CHUNK_SIZE: usize = CHUNK_BLOCKS * BLOCK_SIZE;

/// One hijacked return (see `ret.rs`).
#[repr(C)]
pub struct RetFrame {
    /// Address of the stack slot that held the return address (rsp at the function's entry).
    pub slot: AtomicU64,
    /// The return address it held.
    pub real: AtomicU64,
    /// The probed function's entry, to find its consumers.
    pub site: AtomicU64,
    /// When the call began (0 when no consumer of the site wants durations): nanoseconds of
    /// `CLOCK_MONOTONIC`, or ticks with [`FRAME_TSC`].
    pub entry_ns: AtomicU64,
    /// The site's return counter.
    pub counter: AtomicU32,
    /// [`FRAME_SLOW`]: the return needs the slow path (durations, events).
    pub flags: AtomicU32,
}

/// The return of this frame needs more than a count.
pub const FRAME_SLOW: u32 = 1;
/// The frame's `entry_ns` is the time-stamp counter's (see `sigsafe::clock`), not nanoseconds.
pub const FRAME_TSC: u32 = 2;

/// The start of a thread's block.
#[repr(C)]
pub struct Block {
    /// The tid of the thread that owns it; 0 when free.
    pub owner: AtomicI32,
    /// Set once claimed, until reclaimed: its counters may be non-zero.
    pub used: AtomicU32,
    /// The event ring this thread records into (`events::Ring`); 0 until its first event.
    pub ring: AtomicUsize,
    /// Return probes: how many frames of `ret_frames` are in use.
    pub ret_depth: AtomicU32,
    /// Next of `scratch_masks` to use.
    pub scratch_next: AtomicU32,
    /// Scratch for the internal probes that take SIGTRAP out of a mask glibc is about to set; used
    /// in turn, so that a signal handler nested between the fix and the system call does not
    /// overwrite the set its interrupted code is about to pass.
    pub scratch_masks: [AtomicU64; 4],
    pub ret_frames: [RetFrame; RET_STACK],
}

const _: () = assert!(core::mem::size_of::<Block>() <= HEADER);

impl Block {
    /// Counter `i` of this block.
    #[inline(always)]
    pub fn counter(&self, i: u32) -> Option<&AtomicU64> {
        if i as usize >= MAX_COUNTERS {
            return None;
        }
        let base = self as *const Block as usize + HEADER;
        // SAFETY: a block is BLOCK_SIZE bytes of our own mapping, its counters from HEADER on,
        // aligned and valid for the life of the process.
        Some(unsafe { &*((base + i as usize * 8) as *const AtomicU64) })
    }

    /// Add one to counter `i`. Only the owner thread writes its counters, and a signal handler
    /// nested on it cannot run between the load and the store of the trap path (which blocks
    /// signals), so a plain load and store is exact.
    #[inline(always)]
    pub fn bump(&self, i: u32) {
        if let Some(c) = self.counter(i) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }
}

/// The TLS record. Zero in every new thread (it is `.tbss`).
#[repr(C)]
pub struct Tls {
    /// The block hits count into now, or null (see the module documentation). Offset 0: the
    /// trampolines read it as `fs:[tls_offset()]`.
    pub active: AtomicPtr<Block>,
    /// The thread's block, once claimed.
    pub block: AtomicPtr<Block>,
    /// Non-zero while this thread runs libuprobe code (written only by `runtime::mark`).
    pub depth: AtomicU32,
    /// Non-zero while a vfork or posix_spawn child borrows this thread's stack and TLS.
    pub suspended: AtomicU32,
    /// The vfork wrapper's return address (see `hooks::spawn`).
    pub vfork_ret: AtomicU64,
}

global_asm!(
    ".pushsection .tbss.uprobe_tls,\"awT\",@nobits",
    ".globl uprobe_tls",
    ".hidden uprobe_tls",
    ".type uprobe_tls, @object",
    ".p2align 3",
    "uprobe_tls:",
    ".zero {size}",
    ".size uprobe_tls, {size}",
    ".popsection",
    size = const core::mem::size_of::<Tls>(),
);

/// glibc's stack-protector canary (`fs:0x28` of every thread glibc made: it copies the main
/// thread's), read once at startup; 0 until then.
pub static STACK_GUARD: AtomicU64 = AtomicU64::new(0);

/// The canary of the thread running this.
#[inline(always)]
fn canary() -> u64 {
    let v: u64;
    // SAFETY: reads the stack-protector word of the thread control block, which every thread's
    // own code reads already (stack-protected functions do at each call).
    unsafe {
        asm!("mov {}, qword ptr fs:0x28", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v
}

/// Read glibc's canary (at startup, on a thread glibc made).
pub fn init_foreign_check() {
    STACK_GUARD.store(canary(), Ordering::Relaxed);
}

/// Is this thread's TLS not glibc's? A raw `clone(CLONE_SETTLS)` thread of the program's, whose
/// `fs` points into a block the program owns: libuprobe's record below `fs` is not there, and
/// is neither read nor written. Such a thread counts through the shared counters, with no block.
#[inline(always)]
pub fn foreign() -> bool {
    let g = STACK_GUARD.load(Ordering::Relaxed);
    g != 0 && canary() != g
}

/// The record a thread with a foreign TLS gets: never written (see `runtime::mark`), no block.
static FOREIGN: Tls = Tls {
    active: AtomicPtr::new(core::ptr::null_mut()),
    block: AtomicPtr::new(core::ptr::null_mut()),
    depth: AtomicU32::new(0),
    suspended: AtomicU32::new(0),
    vfork_ret: AtomicU64::new(0),
};

/// Is `t` the record of threads with a foreign TLS?
pub fn is_foreign_record(t: &Tls) -> bool {
    core::ptr::eq(t, &FOREIGN)
}

/// This thread's TLS record (a shared, read-only one for a thread whose TLS is not glibc's:
/// [`foreign`]). A few instructions, no call.
#[inline(always)]
pub fn tls() -> &'static Tls {
    if foreign() {
        return &FOREIGN;
    }
    let p: *const Tls;
    // SAFETY: initial-exec TLS access: fs:0 is the thread pointer, and the GOT slot holds the
    // (negative) offset of our record in static TLS. Reads only.
    unsafe {
        asm!(
            "mov {p}, qword ptr [rip + uprobe_tls@GOTTPOFF]",
            "add {p}, qword ptr fs:0",
            p = out(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    // SAFETY: the record is valid, aligned and lives as long as the thread; every field is atomic.
    unsafe { &*p }
}

/// The offset of the TLS record from the thread pointer: `fs:[tls_offset()]` is `active` in every
/// thread.
pub fn tls_offset() -> i64 {
    let tp: u64;
    // SAFETY: reads the thread pointer.
    unsafe {
        asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    (tls() as *const Tls as u64).wrapping_sub(tp) as i64
}

static CHUNKS: [AtomicUsize; MAX_CHUNKS] = [const { AtomicUsize::new(0) }; MAX_CHUNKS];

/// Counts of threads whose blocks were reclaimed, and hits on threads that could get no block.
static GLOBAL: [AtomicU64; MAX_COUNTERS] = [const { AtomicU64::new(0) }; MAX_COUNTERS];

/// Stacks of runtime threads, [lo, hi) pairs: a thread running on one is libuprobe's, even before
/// its start routine has marked it (glibc runs code of its own on a new thread first).
static RUNTIME_STACKS: [(AtomicU64, AtomicU64); 8] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; 8];

/// Record a runtime thread's stack (before the thread starts). False when the table is full.
pub fn add_runtime_stack(lo: u64, hi: u64) -> bool {
    for (l, h) in &RUNTIME_STACKS {
        if l.compare_exchange(0, lo, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            h.store(hi, Ordering::Release);
            return true;
        }
    }
    false
}

/// Forget a runtime thread's stack (after the thread is gone).
pub fn remove_runtime_stack(lo: u64) {
    for (l, h) in &RUNTIME_STACKS {
        if l.load(Ordering::Acquire) == lo {
            h.store(0, Ordering::Release);
            l.store(0, Ordering::Release);
        }
    }
}

#[inline(always)]
fn current_sp() -> u64 {
    let sp: u64;
    // SAFETY: reads rsp.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    sp
}

/// Is this thread running on a runtime thread's stack?
pub fn on_runtime_stack() -> bool {
    let sp = current_sp();
    RUNTIME_STACKS.iter().any(|(l, h)| {
        let lo = l.load(Ordering::Acquire);
        lo != 0 && lo <= sp && sp < h.load(Ordering::Acquire)
    })
}

fn block_at(chunk: usize, i: usize) -> &'static Block {
    // SAFETY: `chunk` is a mapped chunk of CHUNK_BLOCKS blocks (zero-initialised memory is a valid
    // free Block), never unmapped.
    unsafe { &*((chunk + i * BLOCK_SIZE) as *const Block) }
}

/// Every block of every mapped chunk.
fn blocks() -> impl Iterator<Item = &'static Block> {
    CHUNKS
        .iter()
        .map(|c| c.load(Ordering::Acquire))
        .take_while(|&c| c != 0)
        .flat_map(|c| (0..CHUNK_BLOCKS).map(move |i| block_at(c, i)))
}

/// Take a free block for thread `tid`, mapping a new chunk if every block is taken. None when the
/// pool is full or memory cannot be mapped. Async-signal-safe: CAS and raw mmap only.
fn claim(tid: i32) -> Option<&'static Block> {
    for slot in &CHUNKS {
        let mut chunk = slot.load(Ordering::Acquire);
        if chunk == 0 {
            let fresh =
                sys::mmap_far(CHUNK_SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_NORESERVE)
                    .ok()?;
            match slot.compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => chunk = fresh,
                Err(other) => {
                    // SAFETY: our fresh chunk was never published.
                    unsafe { sys::munmap(fresh, CHUNK_SIZE) };
                    chunk = other;
                }
            }
        }
        for i in 0..CHUNK_BLOCKS {
            let b = block_at(chunk, i);
            if b.owner.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                b.used.store(1, Ordering::Release);
                return Some(b);
            }
        }
    }
    None
}

/// Where a hit on this thread counts.
pub enum Counting {
    /// In the thread's own block.
    Block(&'static Block),
    /// In [`GLOBAL`], atomically: the thread could get no block.
    Global,
    /// Nowhere: libuprobe's own code, or a vfork child on its parent's thread.
    No,
}

impl Counting {
    #[inline(always)]
    pub fn bump(&self, i: u32) {
        match self {
            Counting::Block(b) => b.bump(i),
            Counting::Global => {
                if let Some(c) = GLOBAL.get(i as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Counting::No => {}
        }
    }

    pub fn block(&self) -> Option<&'static Block> {
        match self {
            Counting::Block(b) => Some(b),
            _ => None,
        }
    }
}

/// Where hits on this thread count now; claims the thread's block on its first hit.
#[inline(always)]
pub fn counting() -> Counting {
    if foreign() {
        return Counting::Global;
    }
    let t = tls();
    let a = t.active.load(Ordering::Relaxed);
    if !a.is_null() {
        // SAFETY: `active` only ever holds a block of the pool, which lives forever.
        return Counting::Block(unsafe { &*a });
    }
    counting_slow(t)
}

#[inline(never)]
fn counting_slow(t: &Tls) -> Counting {
    if t.depth.load(Ordering::Relaxed) != 0 || t.suspended.load(Ordering::Relaxed) != 0 {
        return Counting::No;
    }
    if on_runtime_stack() {
        // A runtime thread before its start routine marked it: mark it now, for good.
        t.depth.store(1, Ordering::Relaxed);
        return Counting::No;
    }
    match own_block() {
        Some(b) => {
            t.active.store(b as *const Block as *mut Block, Ordering::Relaxed);
            Counting::Block(b)
        }
        None => Counting::Global,
    }
}

/// This thread's block, claimed now if it has none (whatever it is doing).
pub fn own_block() -> Option<&'static Block> {
    let t = tls();
    if is_foreign_record(t) {
        return None;
    }
    let b = t.block.load(Ordering::Relaxed);
    if !b.is_null() {
        // SAFETY: `block` only ever holds a block of the pool, which lives forever.
        return Some(unsafe { &*b });
    }
    let b = claim(sys::gettid())?;
    t.block.store(b as *const Block as *mut Block, Ordering::Relaxed);
    Some(b)
}

/// This thread's block, if it has claimed one.
#[inline(always)]
pub fn tls_block() -> Option<&'static Block> {
    let b = tls().block.load(Ordering::Relaxed);
    // SAFETY: `block` only ever holds a block of the pool, which lives forever.
    (!b.is_null()).then(|| unsafe { &*b })
}

/// The sums of counters `0..out.len()` over every thread, living or gone, into `out`.
pub fn sum_into(out: &mut [u64]) {
    for (o, g) in out.iter_mut().zip(GLOBAL.iter()) {
        *o = g.load(Ordering::Relaxed);
    }
    for b in blocks().filter(|b| b.used.load(Ordering::Acquire) != 0) {
        for (i, o) in out.iter_mut().enumerate() {
            if let Some(c) = b.counter(i as u32) {
                *o = o.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
    }
}

/// The pending return whose slot is `slot`, in any thread's block: (real return address, site,
/// return counter). The frame is marked gone (slot 0) in its block, whose thread will drop it.
pub fn take_frame_anywhere(slot: u64) -> Option<(u64, u64, u32)> {
    for b in blocks().filter(|b| b.owner.load(Ordering::Acquire) != 0) {
        let depth = (b.ret_depth.load(Ordering::Acquire) as usize).min(RET_STACK);
        for f in b.ret_frames.iter().take(depth) {
            if f.slot.compare_exchange(slot, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                let real = f.real.load(Ordering::Relaxed);
                return Some((
                    real,
                    f.site.load(Ordering::Relaxed),
                    f.counter.load(Ordering::Relaxed),
                ));
            }
        }
    }
    None
}

/// Fold the blocks of threads that are gone into [`GLOBAL`] and free them. `limit`: counters in
/// use. Not for the trap path (it is merely slow, not unsafe).
pub fn reclaim(limit: usize) {
    let pid = sys::getpid();
    for b in blocks() {
        let owner = b.owner.load(Ordering::Acquire);
        if owner == 0 || sys::thread_alive(pid, owner) {
            continue;
        }
        for i in 0..limit.min(MAX_COUNTERS) {
            if let (Some(c), Some(g)) = (b.counter(i as u32), GLOBAL.get(i)) {
                let v = c.swap(0, Ordering::Relaxed);
                if v != 0 {
                    g.fetch_add(v, Ordering::Relaxed);
                }
            }
        }
        clear_header(b);
        b.used.store(0, Ordering::Release);
        b.owner.store(0, Ordering::Release);
    }
}

fn clear_header(b: &Block) {
    b.ring.store(0, Ordering::Relaxed);
    b.ret_depth.store(0, Ordering::Relaxed);
}

/// Zero counters `0..limit` everywhere (`stats reset` keeps counts by baseline instead; this is
/// for a forked child, whose counts start at zero).
fn zero_all() {
    for g in &GLOBAL {
        g.store(0, Ordering::Relaxed);
    }
    for b in blocks().filter(|b| b.used.load(Ordering::Acquire) != 0) {
        let counters = b as *const Block as usize + HEADER;
        // SAFETY: the counters of a block are whole pages of our own anonymous memory; only
        // this (the only) thread of the child can touch them now.
        unsafe { sys::discard(counters, MAX_COUNTERS * 8) };
    }
}

/// In a forked child (one thread): every count starts at zero, every block but this thread's is
/// free, and this thread's keeps its pending returns (a return probe may be pending across fork).
pub fn reset_after_fork() {
    zero_all();
    let me = tls().block.load(Ordering::Relaxed) as usize;
    let tid = sys::gettid();
    for b in blocks() {
        if b as *const Block as usize == me {
            b.owner.store(tid, Ordering::Release);
            b.ring.store(0, Ordering::Relaxed);
        } else if b.owner.load(Ordering::Relaxed) != 0 {
            clear_header(b);
            b.used.store(0, Ordering::Release);
            b.owner.store(0, Ordering::Release);
        }
    }
}

/// Threads that hold a block now (for `stats`).
pub fn threads_with_blocks() -> usize {
    blocks().filter(|b| b.owner.load(Ordering::Relaxed) != 0).count()
}
