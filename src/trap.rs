//! The SIGTRAP handler: find the probe for the trapping address without locks, run its consumers,
//! then resume the program through the XOL slot or by emulating the displaced instruction.
//!
//! # Safety: the async-signal-safe set
//!
//! Everything reachable from [`on_sigtrap`] is in this file, plus `sys::{thread_state,
//! read_code_byte, getpid, gettid, monotonic_ns, read_memory_safely, rt_sigaction, rt_sigprocmask,
//! raise_here}` and `signals::chain`.
//! The rules:
//! - no allocation, no lock, no formatting, no panic, no libc call (so `errno` is never written and
//!   no probed libc function is entered from here);
//! - shared state is read through atomics: the lookup [`Table`] is published through an `AtomicPtr`
//!   and freed by the writer only after every reader that could hold it has left ([`ReadGuard`]);
//! - the handler is installed with `SA_NODEFER`, and marks its thread as "in the runtime" while it
//!   runs, so that a trap taken inside it (a compiler-inserted `memcpy` on a probed libc, say) resumes
//!   at once without running consumers instead of recursing or being force-killed.

use core::arch::global_asm;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::spec::ArgType;
use crate::sys;
use crate::xol::{Cond, Emu, IndirectOperand, LoopKind, Resume, NO_REG};

/// `si_code` of a SIGTRAP raised by `int3`.
const SI_KERNEL: i32 = 0x80;

/// What a hit updates: the consumer side of one probe. Shared between the registry (which owns it)
/// and published tables (which keep it alive while a trap may be updating it).
#[derive(Default)]
pub struct Consumer {
    pub hits: AtomicU64,
    /// The probe's id, as events name it.
    pub id: u32,
    /// Types of the first arguments, for traced events.
    pub args: Vec<ArgType>,
    /// A return probe: `hits` counts returns, `latency` their durations.
    pub ret: bool,
    /// Calls not followed to their return (nested deeper than the per-thread return stack).
    pub missed: AtomicU64,
    pub latency: Option<Box<Latency>>,
}

/// Sub-buckets per power of two in [`Latency`]: percentiles are within 1/8 of the truth.
const SUB_BUCKETS: usize = 8;
pub const LATENCY_BUCKETS: usize = 64 * SUB_BUCKETS;

/// Durations of a return probe's calls, updated lock-free by the trap path.
pub struct Latency {
    pub calls: AtomicU64,
    pub total_ns: AtomicU64,
    pub min_ns: AtomicU64,
    pub max_ns: AtomicU64,
    /// Log-linear: 8 sub-buckets for every power of two (see `bucket_of`).
    pub buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            calls: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS],
        }
    }
}

impl Latency {
    #[inline(always)]
    fn record(&self, ns: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.total_ns.store(0, Ordering::Relaxed);
        self.min_ns.store(u64::MAX, Ordering::Relaxed);
        self.max_ns.store(0, Ordering::Relaxed);
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }
}

/// The bucket of a duration: exact below 8 ns, then 8 per power of two.
#[inline(always)]
pub fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS as u64 {
        return ns as usize;
    }
    let b = 63 - ns.leading_zeros() as usize; // ns in [2^b, 2^(b+1)), b >= 3
    let sub = ((ns >> (b - 3)) & 7) as usize;
    ((b - 2) * SUB_BUCKETS + sub).min(LATENCY_BUCKETS - 1)
}

/// The smallest duration in bucket `i`.
pub fn bucket_low(i: usize) -> u64 {
    if i < SUB_BUCKETS {
        return i as u64;
    }
    let (b, sub) = (i / SUB_BUCKETS + 2, (i % SUB_BUCKETS) as u64);
    (8 + sub) << (b - 3)
}

/// The longest string an event carries for a `str` argument (more is cut, and marked so).
pub const STR_MAX: usize = 48;
/// Events a thread's ring holds before the drain thread must catch up (then they are `lost`).
pub const RING_EVENTS: usize = 8192;
/// Rings in the pool: threads recording events at once.
pub const RINGS: usize = 64;

/// One traced entry. Fixed size, written by the trap path into its thread's ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    pub probe: u32,
    pub tid: i32,
    /// 0: entry (regs are the arguments); 1: return (regs[0] is the return value, regs[1] the
    /// duration in nanoseconds).
    pub kind: u32,
    pub _pad: u32,
    pub ts_ns: u64,
    /// rdi, rsi, rdx, rcx, r8, r9: the SysV integer argument registers.
    pub regs: [u64; 6],
    /// For the first two `str` arguments: bytes read, -1 if unreadable; and the bytes.
    pub str_len: [i16; 2],
    pub strs: [[u8; STR_MAX]; 2],
}

/// A single-producer (its thread, on the trap path), single-consumer (the drain thread) ring.
#[repr(C)]
pub struct Ring {
    /// The tid of the thread that records here; 0 when free.
    pub owner: core::sync::atomic::AtomicI32,
    pub head: AtomicU64,
    pub tail: AtomicU64,
    pub lost: AtomicU64,
    pub events: [core::cell::UnsafeCell<Event>; RING_EVENTS],
}

// SAFETY: a slot is written only by the owner thread before it publishes `head`, and read only by
// the drain thread after it sees `head`, before it publishes `tail`.
unsafe impl Sync for Ring {}

/// The pool of rings, mapped when tracing is enabled; null before.
pub static RING_POOL: AtomicPtr<Ring> = AtomicPtr::new(core::ptr::null_mut());
/// Events lost because all rings were taken.
pub static LOST_NO_RING: AtomicU64 = AtomicU64::new(0);

/// This thread's ring: the one it holds, or a free one it claims now (no allocation: a CAS on
/// the owner of each ring of the preallocated pool).
#[inline(always)]
fn my_ring() -> Option<&'static Ring> {
    let ts = sys::thread_state();
    let p = ts.ring.load(Ordering::Relaxed);
    if p != 0 {
        // SAFETY: rings live for the life of the process once the pool is mapped.
        return Some(unsafe { &*(p as *const Ring) });
    }
    let pool = RING_POOL.load(Ordering::Acquire);
    if pool.is_null() {
        return None;
    }
    let tid = sys::gettid();
    for i in 0..RINGS {
        // SAFETY: the pool holds RINGS rings.
        let r = unsafe { &*pool.add(i) };
        if r.owner.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            ts.tid.store(tid, Ordering::Relaxed);
            ts.ring.store(r as *const Ring as usize, Ordering::Relaxed);
            return Some(r);
        }
    }
    None
}

/// Record an entry event for consumer `c`. Never blocks: a full ring counts the event as lost.
/// The next free event slot of this thread's ring, or None (counted as lost). The event becomes
/// visible to the drain thread only when the caller stores `head + 1`.
#[inline(always)]
fn reserve_event() -> Option<(&'static Ring, u64, &'static mut Event)> {
    let Some(ring) = my_ring() else {
        LOST_NO_RING.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let head = ring.head.load(Ordering::Relaxed);
    if head.wrapping_sub(ring.tail.load(Ordering::Acquire)) >= RING_EVENTS as u64 {
        ring.lost.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: the slot at `head` is not visible to the consumer until `head` is published, and
    // only this thread produces into its ring.
    let e = unsafe { &mut *ring.events[(head % RING_EVENTS as u64) as usize].get() };
    Some((ring, head, e))
}

#[inline(never)]
fn record_entry(c: &Consumer, g: &Gregs) {
    let Some((ring, head, e)) = reserve_event() else { return };
    e.probe = c.id;
    e.kind = 0;
    e.tid = sys::thread_state().tid.load(Ordering::Relaxed);
    e.ts_ns = sys::monotonic_ns();
    let regs =
        [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX, libc::REG_RCX, libc::REG_R8, libc::REG_R9];
    for (i, r) in regs.iter().enumerate() {
        e.regs[i] = g[*r as usize] as u64;
    }
    e.str_len = [0, 0];
    let mut n = 0;
    for (i, t) in c.args.iter().enumerate() {
        if *t == ArgType::Str && n < 2 {
            let len = match sys::read_memory_safely(fork_pid(), e.regs[i], &mut e.strs[n]) {
                Ok(got) if got > 0 => got as i16,
                // A string that ends just before an unmapped page: read what is there.
                _ => read_short_string(e.regs[i], &mut e.strs[n]),
            };
            e.str_len[n] = len;
            n += 1;
        }
    }
    ring.head.store(head + 1, Ordering::Release);
}

/// Record a return event for consumer `c`.
#[inline(never)]
fn record_return(c: &Consumer, retval: u64, duration: u64, now: u64) {
    let Some((ring, head, e)) = reserve_event() else { return };
    e.probe = c.id;
    e.kind = 1;
    e.tid = sys::thread_state().tid.load(Ordering::Relaxed);
    e.ts_ns = now;
    e.regs = [retval, duration, 0, 0, 0, 0];
    e.str_len = [0, 0];
    ring.head.store(head + 1, Ordering::Release);
}

/// Byte by byte, for a string within `STR_MAX` of the end of its mapping. -1 if unreadable.
fn read_short_string(addr: u64, out: &mut [u8; STR_MAX]) -> i16 {
    let mut got = 0;
    while got < STR_MAX {
        let mut b = [0u8];
        match sys::read_memory_safely(fork_pid(), addr.wrapping_add(got as u64), &mut b) {
            Ok(1) => {
                out[got] = b[0];
                got += 1;
                if b[0] == 0 {
                    break;
                }
            }
            _ => break,
        }
    }
    if got == 0 {
        -1
    } else {
        got as i16
    }
}

/// Tracing is on: entry events are recorded for every probe.
pub static TRACING: AtomicBool = AtomicBool::new(false);

/// One breakpoint in one mapping.
#[derive(Clone, Copy)]
pub struct TableEntry {
    pub addr: u64,
    pub resume: Resume,
    /// Range in [`Table::consumers`]. Empty for a breakpoint that was removed: a thread that trapped
    /// just before the removal still finds how to resume.
    pub first: u32,
    pub count: u32,
    /// libuprobe's breakpoint on the loader's `r_brk`: the thread is sent through
    /// [`uprobe_link_map_trampoline`] so that new objects get their probes before they run.
    pub link_map_hook: bool,
}

/// The immutable lookup table the trap handler reads: sorted by address.
#[derive(Default)]
pub struct Table {
    pub entries: Vec<TableEntry>,
    pub consumers: Vec<Arc<Consumer>>,
}

impl Table {
    #[inline]
    fn lookup(&self, addr: u64) -> Option<&TableEntry> {
        let i = self.entries.binary_search_by(|e| e.addr.cmp(&addr)).ok()?;
        self.entries.get(i)
    }

    /// The consumers of a breakpoint.
    #[inline]
    fn consumers_of(&self, e: &TableEntry) -> &[Arc<Consumer>] {
        let (first, count) = (e.first as usize, e.count as usize);
        self.consumers.get(first..first + count).unwrap_or(&[])
    }

    /// The return consumers of the breakpoint at `site` (none if it was unregistered).
    #[inline]
    fn return_consumers_at(&self, site: u64) -> impl Iterator<Item = &Arc<Consumer>> {
        self.lookup(site).map(|e| self.consumers_of(e)).unwrap_or(&[]).iter().filter(|c| c.ret)
    }
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
static EPOCH: AtomicUsize = AtomicUsize::new(0);
static READERS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// A reader's hold on the current table (signal-hook's half-lock: two reader counters by epoch
/// parity; a writer swaps the table, bumps the epoch and waits for the old parity to drain).
struct ReadGuard {
    parity: usize,
}

impl ReadGuard {
    #[inline]
    fn enter() -> ReadGuard {
        loop {
            let e = EPOCH.load(Ordering::SeqCst);
            READERS[e & 1].fetch_add(1, Ordering::SeqCst);
            if EPOCH.load(Ordering::SeqCst) == e {
                return ReadGuard { parity: e & 1 };
            }
            READERS[e & 1].fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[inline]
    fn table(&self) -> Option<&Table> {
        // SAFETY: a table reachable from TABLE is freed only after the readers of our parity left.
        unsafe { TABLE.load(Ordering::SeqCst).as_ref() }
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        READERS[self.parity].fetch_sub(1, Ordering::SeqCst);
    }
}

/// Replace the table. Called only with the registry mutex held (one writer at a time), never from
/// the trap path. Returns once no trap can still be reading the old table, which it then frees.
pub fn publish(new: Table) {
    debug_assert!(new.entries.windows(2).all(|w| w[0].addr < w[1].addr));
    let old = TABLE.swap(Box::into_raw(Box::new(new)), Ordering::SeqCst);
    let e = EPOCH.fetch_add(1, Ordering::SeqCst);
    while READERS[e & 1].load(Ordering::SeqCst) != 0 {
        sys::sched_yield();
    }
    if !old.is_null() {
        // SAFETY: `old` came from Box::into_raw in an earlier publish, and no reader holds it now.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// Set when objects may have changed while no rescan could run; see `probes::try_rescan`.
pub static RESCAN_WANTED: AtomicBool = AtomicBool::new(false);

/// The pid that owns the runtime (set at startup and by the atfork child handler).
pub static OWNER_PID: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(0);

#[inline(always)]
fn fork_pid() -> i32 {
    OWNER_PID.load(Ordering::Relaxed)
}

/// Can the link-map hook resume after this instruction? Its trampoline ends in `ret`: to an XOL
/// slot pushed for it, or, for a `ret` at r_brk, straight back to the loader.
pub fn can_hijack(r: Resume) -> bool {
    matches!(r, Resume::Xol { .. } | Resume::Emulate(Emu::Ret { pop: 0 }))
}

// The link-map hook's trampoline, entered from the trap handler at the first instruction of the
// loader's `_dl_debug_state` (a `void (void)` function, so caller-saved registers are free). It calls
// `dl_hook::on_link_map_change` on an aligned stack, in normal (not signal) context, then returns
// to what the handler pushed: the XOL slot of the displaced instruction, or the loader itself.
global_asm!(
    ".pushsection .text.uprobe_link_map_trampoline,\"ax\",@progbits",
    ".globl uprobe_link_map_trampoline",
    ".hidden uprobe_link_map_trampoline",
    ".type uprobe_link_map_trampoline, @function",
    ".p2align 4",
    "uprobe_link_map_trampoline:",
    "    push rbx",
    "    mov rbx, rsp",
    "    and rsp, -16",
    "    call {hook}",
    "    mov rsp, rbx",
    "    pop rbx",
    "    ret",
    ".size uprobe_link_map_trampoline, . - uprobe_link_map_trampoline",
    ".popsection",
    hook = sym crate::dl_hook::on_link_map_change,
);

extern "C" {
    fn uprobe_link_map_trampoline();
}

/// Is there a breakpoint (or tombstone) in `[lo, hi)`? Lock-free; used by the munmap interposer.
pub fn any_breakpoint_in(lo: u64, hi: u64) -> bool {
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return false };
    let i = table.entries.partition_point(|e| e.addr < lo);
    table.entries.get(i).is_some_and(|e| e.addr < hi)
}

/// After fork the child has one thread: no reader can be inside a table, whatever the counters say.
pub fn reset_readers_after_fork() {
    READERS[0].store(0, Ordering::SeqCst);
    READERS[1].store(0, Ordering::SeqCst);
}

/// Install the SIGTRAP handler. Returns the disposition it replaced, for chaining.
pub fn install_handler() -> Result<sys::KernelSigaction, sys::Errno> {
    // Block every other asynchronous signal while we run, so that no program handler runs on this
    // thread while it is marked as "in the runtime" (its hits would not be counted). Faults stay
    // unblocked: a fault in here must get the program's usual treatment, not a forced kill.
    let faults = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP];
    let mask = faults.iter().fold(!0u64, |m, &s| m & !sys::sigbit(s));
    let act = sys::KernelSigaction {
        handler: on_sigtrap as *const () as usize,
        flags: (libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART) as u64 | sys::SA_RESTORER,
        restorer: sys::sigreturn_trampoline(),
        mask,
    };
    let mut old = sys::KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
    sys::rt_sigaction(libc::SIGTRAP, Some(&act), Some(&mut old))?;
    Ok(old)
}

/// The SIGTRAP handler. Async-signal-safe (see the module's Safety section).
unsafe extern "C" fn on_sigtrap(sig: i32, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let ts = sys::thread_state();
    let depth = ts.runtime_depth.load(Ordering::Relaxed);
    // Only this thread writes its own depth; a nested handler restores it before returning.
    ts.runtime_depth.store(depth + 1, Ordering::Relaxed);
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO handler.
    let handled = unsafe { handle_breakpoint(&*info, &mut *(ctx as *mut libc::ucontext_t), depth) };
    ts.runtime_depth.store(depth, Ordering::Relaxed);
    if !handled {
        // SAFETY: same pointers, passed on unchanged.
        unsafe { crate::signals::chain(sig, info, ctx) };
    }
}

/// Is this trap one of our breakpoints? If so, count it and set up the resume; return true.
#[inline(always)]
fn handle_breakpoint(info: &libc::siginfo_t, uc: &mut libc::ucontext_t, depth: u32) -> bool {
    if info.si_code != SI_KERNEL {
        return false; // raise(), kill(), tgkill(): never ours
    }
    let site = (uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64).wrapping_sub(1);
    let trampoline = RET_TRAMPOLINE.load(Ordering::Relaxed);
    if site == trampoline && trampoline != 0 {
        return_trampoline_hit(&mut uc.uc_mcontext.gregs, depth);
        return true;
    }
    let g = &mut uc.uc_mcontext.gregs;
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return false };
    let Some(entry) = table.lookup(site) else { return false };
    // Hits count only in the process that owns the runtime: not in a vfork or posix_spawn child,
    // which runs on the parent's memory (and counters), nor in a child made by a raw clone.
    let own = depth == 0 && (entry.count > 0 || entry.link_map_hook) && sys::getpid() == fork_pid();
    let consumers = table.consumers_of(entry);
    let mut hijack = false;
    if own {
        let tracing = TRACING.load(Ordering::Relaxed);
        for c in consumers {
            if c.ret {
                hijack = true; // counted when it returns
            } else {
                c.hits.fetch_add(1, Ordering::Relaxed);
            }
            if tracing {
                record_entry(c, g);
            }
        }
    }
    let (resume, hook) = (entry.resume, entry.link_map_hook);
    // SAFETY: `site` is inside a mapping we patched (it is in the table) and we just trapped there.
    if unsafe { sys::read_code_byte(site as usize) } != 0xcc {
        // The breakpoint was removed after this trap: the original instruction is back, run it.
        g[libc::REG_RIP as usize] = site as i64;
        return true;
    }
    if hijack {
        hijack_return(site, g, consumers);
    }
    drop(guard);
    if hook {
        if own && can_hijack(resume) {
            // Call the link-map hook as if the loader had: push where to go on (the slot, or
            // nothing for a bare `ret`) and enter the trampoline, which returns there.
            if let Resume::Xol { slot } = resume {
                push(g, slot);
            }
            g[libc::REG_RIP as usize] = uprobe_link_map_trampoline as *const () as i64;
            return true;
        }
        // Inside the runtime (or a child that does not own it): whoever holds the registry
        // rescans before letting go.
        RESCAN_WANTED.store(true, Ordering::SeqCst);
    }
    match resume {
        Resume::Xol { slot } => g[libc::REG_RIP as usize] = slot as i64,
        Resume::Emulate(emu) => emulate(emu, g),
    }
    true
}

/// Count a call of the return probes at `site` as missed (its return will not be seen).
pub fn count_missed(site: u64) {
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return };
    for c in table.return_consumers_at(site) {
        c.missed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The return trampoline: one `int3` in a page of its own. A hijacked function returns here.
pub static RET_TRAMPOLINE: AtomicU64 = AtomicU64::new(0);

/// Map the return trampoline (once, when the first return probe is registered).
pub fn ensure_return_trampoline() -> Result<u64, sys::Errno> {
    let t = RET_TRAMPOLINE.load(Ordering::Acquire);
    if t != 0 {
        return Ok(t);
    }
    let page = sys::page_size();
    let p = sys::mmap_anon(0, page, libc::PROT_READ | libc::PROT_WRITE)?;
    // SAFETY: a fresh private page of ours: fill it with int3, then make it executable.
    unsafe {
        core::ptr::write_bytes(p as *mut u8, 0xcc, page);
        sys::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC)?;
    }
    RET_TRAMPOLINE.store(p as u64, Ordering::Release);
    Ok(p as u64)
}

/// How far below the current stack pointer a pending frame may be and still be on the same stack
/// (and so abandoned, when it is below the current call): frames on another stack (a signal's
/// alternate stack, a coroutine's) are never dropped for being elsewhere.
const ABANDONED_WITHIN: u64 = 1 << 20;

/// At a return-probed function's entry: remember the return address and replace it with the
/// trampoline. A call nested deeper than the per-thread stack is not hijacked: `missed`.
#[inline(never)]
fn hijack_return(site: u64, g: &mut Gregs, consumers: &[Arc<Consumer>]) {
    let ts = sys::thread_state();
    let rsp = g[libc::REG_RSP as usize] as u64;
    let trampoline = RET_TRAMPOLINE.load(Ordering::Relaxed);
    // SAFETY: at a function's entry, [rsp] is the return address its caller pushed.
    let current = unsafe { core::ptr::read_volatile(rsp as *const u64) };
    // Frames a longjmp (or an exception) abandoned lie at or below this call's slot on the same
    // stack: drop them, as kernel uretprobes do. A frame at this very slot is alive only when the
    // slot still holds the trampoline: a tail call from a return-probed function (chained).
    let mut depth = ts.ret_depth.load(Ordering::Relaxed) as usize;
    while depth > 0 {
        let slot = ts.ret_frames[depth - 1].slot.load(Ordering::Relaxed);
        let abandoned =
            (slot < rsp && rsp - slot < ABANDONED_WITHIN) || (slot == rsp && current != trampoline);
        if !abandoned {
            break;
        }
        depth -= 1;
    }
    ts.ret_depth.store(depth as u32, Ordering::Relaxed);
    if depth >= sys::RET_STACK {
        for c in consumers.iter().filter(|c| c.ret) {
            c.missed.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let real = current;
    // A tail call from another return-probed function: `real` is the trampoline itself, and
    // that frame's return comes right after this one's (same slot, chained).
    let f = &ts.ret_frames[depth];
    f.slot.store(rsp, Ordering::Relaxed);
    f.real.store(real, Ordering::Relaxed);
    f.site.store(site, Ordering::Relaxed);
    f.entry_ns.store(sys::monotonic_ns(), Ordering::Relaxed);
    ts.ret_depth.store(depth as u32 + 1, Ordering::Relaxed);
    // SAFETY: the same slot, which the function's `ret` will read.
    unsafe { core::ptr::write_volatile(rsp as *mut u64, trampoline) };
}

/// A hijacked function returned to the trampoline: account for the return, then go where it was
/// really going.
fn return_trampoline_hit(g: &mut Gregs, depth: u32) {
    let ts = sys::thread_state();
    let slot = (g[libc::REG_RSP as usize] as u64).wrapping_sub(8); // `ret` popped it
    let mut i = ts.ret_depth.load(Ordering::Relaxed) as usize;
    // Innermost first; frames above the match were abandoned (longjmp, exceptions).
    let found = loop {
        if i == 0 {
            break None;
        }
        i -= 1;
        if ts.ret_frames[i].slot.load(Ordering::Relaxed) == slot {
            break Some(i);
        }
    };
    let Some(i) = found else {
        // Nowhere to return to: the stack was switched under us. Say so and stop, rather than
        // jump somewhere arbitrary.
        let _ = sys::write_all(2, b"libuprobe: a return-probed function returned on a stack it was not called on; aborting\n");
        let dfl = sys::KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
        let _ = sys::rt_sigaction(libc::SIGABRT, Some(&dfl), None);
        sys::raise_here(libc::SIGABRT);
        return;
    };
    let f = &ts.ret_frames[i];
    let (real, site, entry_ns) = (
        f.real.load(Ordering::Relaxed),
        f.site.load(Ordering::Relaxed),
        f.entry_ns.load(Ordering::Relaxed),
    );
    ts.ret_depth.store(i as u32, Ordering::Relaxed);
    g[libc::REG_RIP as usize] = real as i64;
    if depth != 0 || sys::getpid() != fork_pid() {
        return;
    }
    let now = sys::monotonic_ns();
    let duration = now.saturating_sub(entry_ns);
    let tracing = TRACING.load(Ordering::Relaxed);
    let guard = ReadGuard::enter();
    let Some(table) = guard.table() else { return };
    for c in table.return_consumers_at(site) {
        c.hits.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = &c.latency {
            l.record(duration);
        }
        if tracing {
            record_return(c, g[libc::REG_RAX as usize] as u64, duration, now);
        }
    }
}

const EFL_CF: u64 = 1 << 0;
const EFL_PF: u64 = 1 << 2;
const EFL_ZF: u64 = 1 << 6;
const EFL_SF: u64 = 1 << 7;
const EFL_OF: u64 = 1 << 11;

#[inline(always)]
fn cond_holds(cond: Cond, fl: u64) -> bool {
    let f = |bit| fl & bit != 0;
    match cond {
        Cond::O => f(EFL_OF),
        Cond::No => !f(EFL_OF),
        Cond::B => f(EFL_CF),
        Cond::Ae => !f(EFL_CF),
        Cond::E => f(EFL_ZF),
        Cond::Ne => !f(EFL_ZF),
        Cond::Be => f(EFL_CF) || f(EFL_ZF),
        Cond::A => !f(EFL_CF) && !f(EFL_ZF),
        Cond::S => f(EFL_SF),
        Cond::Ns => !f(EFL_SF),
        Cond::P => f(EFL_PF),
        Cond::Np => !f(EFL_PF),
        Cond::L => f(EFL_SF) != f(EFL_OF),
        Cond::Ge => f(EFL_SF) == f(EFL_OF),
        Cond::Le => f(EFL_ZF) || f(EFL_SF) != f(EFL_OF),
        Cond::G => !f(EFL_ZF) && f(EFL_SF) == f(EFL_OF),
    }
}

type Gregs = [i64; 23];

#[inline(always)]
fn reg(g: &Gregs, r: u8) -> u64 {
    if r == NO_REG {
        0
    } else {
        g[r as usize] as u64
    }
}

#[inline(always)]
fn indirect_target(op: IndirectOperand, g: &Gregs) -> u64 {
    match op {
        IndirectOperand::Reg(r) => reg(g, r),
        IndirectOperand::Mem { base, index, scale, disp } => {
            let addr = reg(g, base)
                .wrapping_add(reg(g, index).wrapping_mul(scale as u64))
                .wrapping_add(disp);
            // SAFETY: the instruction itself would read these 8 bytes; if they are not mapped, the
            // fault is the program's own, as it would have been without the probe.
            unsafe { core::ptr::read_volatile(addr as *const u64) }
        }
    }
}

/// Push a return address the way `call` does. The kernel put the signal frame below the red zone,
/// so the 8 bytes below the interrupted rsp are free.
#[inline(always)]
fn push(g: &mut Gregs, value: u64) {
    let sp = (g[libc::REG_RSP as usize] as u64).wrapping_sub(8);
    // SAFETY: the displaced call would write the same 8 bytes of the program's stack.
    unsafe { core::ptr::write_volatile(sp as *mut u64, value) };
    g[libc::REG_RSP as usize] = sp as i64;
}

/// Apply a control-flow instruction to the saved context.
#[inline(always)]
fn emulate(emu: Emu, g: &mut Gregs) {
    const RIP: usize = libc::REG_RIP as usize;
    const RCX: usize = libc::REG_RCX as usize;
    let flags = g[libc::REG_EFL as usize] as u64;
    let new_rip = match emu {
        Emu::Jmp { target } => target,
        Emu::Call { target, next } => {
            push(g, next);
            target
        }
        Emu::Jcc { cond, target, next } => {
            if cond_holds(cond, flags) {
                target
            } else {
                next
            }
        }
        Emu::Loop { kind, target, next } => {
            let count = (g[RCX] as u64).wrapping_sub(1);
            g[RCX] = count as i64;
            let zf = flags & EFL_ZF != 0;
            let again = count != 0
                && match kind {
                    LoopKind::Loop => true,
                    LoopKind::Loope => zf,
                    LoopKind::Loopne => !zf,
                };
            if again {
                target
            } else {
                next
            }
        }
        Emu::Jrcxz { addr32, target, next } => {
            let rcx = g[RCX] as u64;
            let count = if addr32 { rcx as u32 as u64 } else { rcx };
            if count == 0 {
                target
            } else {
                next
            }
        }
        Emu::Ret { pop } => {
            let sp = g[libc::REG_RSP as usize] as u64;
            // SAFETY: `ret` would read the same 8 bytes.
            let to = unsafe { core::ptr::read_volatile(sp as *const u64) };
            g[libc::REG_RSP as usize] = sp.wrapping_add(8 + pop as u64) as i64;
            to
        }
        Emu::CallIndirect { op, next } => {
            let target = indirect_target(op, g); // operands are read before the push, as the CPU does
            push(g, next);
            target
        }
        Emu::JmpIndirect { op } => indirect_target(op, g),
    };
    g[RIP] = new_rip as i64;
}
