//! The lookup table hits read: every patched address, how to resume there, and its consumers.
//! Immutable once published through an `AtomicPtr`; a writer (the registry, one at a time) swaps in
//! a new one and frees the old one only after every reader that could hold it has left.
//!
//! Readers count themselves in the counter of the epoch they entered in (signal-hook's
//! half-lock, with [`SLOTS`] counters in turn instead of two). A reader may never leave: a
//! program's signal handler that interrupted a hit and `siglongjmp`ed out of it abandons the
//! hit's frame, guard and all. So a writer waits a bounded time ([`WAIT_NS`]); if the readers of
//! the epoch it retires are not all gone by then, that counter is given up for good (no reader
//! uses it again), and the tables its readers may hold are never freed. A few tables leak (one
//! per abandoned reader, at most); nothing waits forever.

use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::consumer::Consumer;
use super::plan::Resume;

/// libuprobe's own breakpoint on the loader's `r_brk` (see `hooks::dl`).
pub const LINK_MAP_HOOK: u8 = 1;
/// An internal probe on a raw `rt_sigprocmask` in libc: SIGTRAP is taken out of the set.
pub const MASK_FIX: u8 = 2;
/// Some consumer needs durations: take a timestamp at entry.
pub const TIMED: u8 = 4;
/// The site is a `popfq` (`mask_reg` holds its length): when it sets the trap flag, the trap
/// path emulates it, so that the single step comes after the program's next instruction.
pub const POPF: u8 = 8;

/// No counter.
pub const NO_COUNTER: u32 = u32::MAX;

/// One patched address in one mapping.
#[derive(Clone, Copy, Debug)]
pub struct TableEntry {
    pub addr: u64,
    pub resume: Resume,
    /// Range in [`Table::consumers`]. Empty for a site that was removed: a thread that trapped
    /// just before the removal still finds how to resume.
    pub first: u32,
    pub count: u32,
    /// The site's hit counter and return counter (see `thread.rs`), or [`NO_COUNTER`].
    pub counter: u32,
    pub ret_counter: u32,
    pub flags: u8,
    /// For [`POPF`]: the instruction's length. For [`MASK_FIX`]: the register that holds the signal set (a gregs index, with
    /// `trap::MASK_HOW_IN_RDI` when `how` in rdi may be SIG_UNBLOCK), and the register that must
    /// hold the set's size, 8 (a check that this is the system call it was taken for).
    pub mask_reg: u8,
    pub size_reg: u8,
}

impl TableEntry {
    pub fn live(&self) -> bool {
        self.count > 0 || self.flags & (LINK_MAP_HOOK | MASK_FIX) != 0
    }
}

/// Where a displaced instruction runs out of line, so that a fault or a single-step trap there
/// is shown to the program at the instruction's own address.
#[derive(Clone, Copy, Debug)]
pub struct SlotMap {
    /// The relocated copy's address, and its length.
    pub start: u64,
    pub len: u32,
    /// The original instruction's address, and its length.
    pub site: u64,
    pub site_len: u32,
    /// Bytes of libuprobe's code after the copy (the `rcx` fix-up after `syscall`, the jump back).
    pub tail: u32,
    /// The copy is a `syscall`, followed by the fix-up of `rcx`.
    pub syscall: bool,
}

/// The immutable lookup table: entries sorted by address.
#[derive(Default)]
pub struct Table {
    pub entries: Vec<TableEntry>,
    pub consumers: Vec<Arc<Consumer>>,
    /// Out-of-line copies, sorted by `start`.
    pub slots: Vec<SlotMap>,
    /// Memory libuprobe wrote code into (XOL slots, jump bodies and stubs): [start, end), sorted.
    pub code: Vec<(u64, u64)>,
}

impl Table {
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<&TableEntry> {
        let i = self.entries.binary_search_by(|e| e.addr.cmp(&addr)).ok()?;
        self.entries.get(i)
    }

    /// The consumers of an entry.
    #[inline]
    pub fn consumers_of(&self, e: &TableEntry) -> &[Arc<Consumer>] {
        let first = e.first as usize;
        let end = first.saturating_add(e.count as usize);
        self.consumers.get(first..end).unwrap_or(&[])
    }

    /// The return consumers of the site at `site` (none if it was unregistered).
    #[inline]
    pub fn return_consumers_at(&self, site: u64) -> impl Iterator<Item = &Arc<Consumer>> {
        self.lookup(site).map(|e| self.consumers_of(e)).unwrap_or(&[]).iter().filter(|c| c.ret)
    }

    /// The out-of-line copy whose code holds `rip`.
    pub fn slot_at(&self, rip: u64) -> Option<&SlotMap> {
        let i = self.slots.partition_point(|s| s.start <= rip).checked_sub(1)?;
        let s = self.slots.get(i)?;
        let end = s.start.wrapping_add(s.len as u64).wrapping_add(s.tail as u64);
        (rip < end).then_some(s)
    }

    /// Is `rip` in memory libuprobe wrote code into?
    pub fn in_code(&self, rip: u64) -> bool {
        let i = self.code.partition_point(|&(start, _)| start <= rip);
        i.checked_sub(1).and_then(|i| self.code.get(i)).is_some_and(|&(_, end)| rip < end)
    }

    /// The addresses of the entries in `[lo, hi)`.
    pub fn entries_in(&self, lo: u64, hi: u64) -> impl Iterator<Item = u64> + '_ {
        let i = self.entries.partition_point(|e| e.addr < lo);
        self.entries
            .get(i..)
            .unwrap_or_default()
            .iter()
            .map(|e| e.addr)
            .take_while(move |&a| a < hi)
    }

    /// Is there an entry in `[lo, hi)`?
    pub fn any_in(&self, lo: u64, hi: u64) -> bool {
        let i = self.entries.partition_point(|e| e.addr < lo);
        self.entries.get(i).is_some_and(|e| e.addr < hi)
    }
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
static EPOCH: AtomicUsize = AtomicUsize::new(0);
/// Reader counters, by epoch modulo `SLOTS`.
pub const SLOTS: usize = 64;
static READERS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Counters given up (a reader of theirs never left, as far as a writer could wait): bit `i` for
/// counter `i`. The epoch never lands on one again.
static ABANDONED: AtomicU64 = AtomicU64::new(0);
/// How many times a counter was given up: whatever was published before one was may be held for
/// good, and is never freed (see [`retire`]).
static ABANDONS: AtomicU64 = AtomicU64::new(0);
/// [`ABANDONS`] when the current table was published.
static TABLE_PUBLISHED_AT: AtomicU64 = AtomicU64::new(0);
/// How long a writer waits for the readers of an epoch.
pub const WAIT_NS: u64 = 20_000_000;
/// Counters that may be given up; past that, no table is freed again.
const MAX_ABANDONED: u32 = SLOTS as u32 - 8;

/// A reader's hold on the current table.
pub struct ReadGuard {
    slot: usize,
}

impl ReadGuard {
    #[inline]
    pub fn enter() -> ReadGuard {
        loop {
            let e = EPOCH.load(Ordering::SeqCst);
            let slot = e % SLOTS;
            if let Some(r) = READERS.get(slot) {
                r.fetch_add(1, Ordering::SeqCst);
                if EPOCH.load(Ordering::SeqCst) == e {
                    return ReadGuard { slot };
                }
                r.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    #[inline]
    pub fn table(&self) -> Option<&Table> {
        // SAFETY: a table reachable from TABLE is freed only after the readers of our epoch left
        // (or never, if they did not).
        unsafe { TABLE.load(Ordering::SeqCst).as_ref() }
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        if let Some(r) = READERS.get(self.slot) {
            r.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Make `new` the table and return the old one once no reader can still be reading it, for the
/// caller to free; null when it must not be freed (a reader may hold it for good). One writer at
/// a time (the caller holds the registry's lock).
///
/// # Safety
/// `new` comes from `Box::into_raw` and is not used by the caller afterwards.
pub unsafe fn replace(new: *mut Table) -> *mut Table {
    // SAFETY: the caller's contract.
    unsafe { retire(&TABLE, &TABLE_PUBLISHED_AT, new) }
}

/// Publish `new` in `slot` (read under [`ReadGuard`]s) and return what it replaces when it can be
/// freed: every reader that could hold it has left, and no reader was given up since it was
/// published (`published_at` keeps [`ABANDONS`] of the current one). Null otherwise: it must
/// never be freed.
///
/// # Safety
/// As [`replace`]; one writer at a time.
pub unsafe fn retire<T>(slot: &AtomicPtr<T>, published_at: &AtomicU64, new: *mut T) -> *mut T {
    let before = ABANDONS.load(Ordering::SeqCst);
    let old_at = published_at.swap(before, Ordering::SeqCst);
    let old = slot.swap(new, Ordering::SeqCst);
    if wait_for_readers() && old_at == before {
        old
    } else {
        core::ptr::null_mut()
    }
}

/// Wait until every reader that entered before now has left (what was unpublished before the
/// call can then be freed): true. False when some did not leave within [`WAIT_NS`] (their
/// counter is given up, and [`ABANDONS`] counts it). One writer at a time.
pub fn wait_for_readers() -> bool {
    let abandoned = ABANDONED.load(Ordering::SeqCst);
    if abandoned.count_ones() >= MAX_ABANDONED {
        ABANDONS.fetch_add(1, Ordering::SeqCst);
        return false;
    }
    let e = EPOCH.load(Ordering::SeqCst);
    // The next epoch whose counter is not given up.
    let mut next = e + 1;
    while abandoned & (1 << (next % SLOTS)) != 0 {
        next += 1;
    }
    EPOCH.store(next, Ordering::SeqCst);
    let Some(r) = READERS.get(e % SLOTS) else { return false };
    let start = super::sys::monotonic_ns();
    while r.load(Ordering::SeqCst) != 0 {
        if super::sys::monotonic_ns().wrapping_sub(start) > WAIT_NS {
            ABANDONED.fetch_or(1 << (e % SLOTS), Ordering::SeqCst);
            ABANDONS.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        super::sys::sched_yield();
    }
    true
}

/// Is there a patched address (or tombstone) in `[lo, hi)`? Lock-free; for the munmap hook.
pub fn any_in(lo: u64, hi: u64) -> bool {
    let guard = ReadGuard::enter();
    guard.table().is_some_and(|t| t.any_in(lo, hi))
}

/// After fork the child has one thread: no reader can be inside a table, whatever the counters say.
pub fn reset_readers_after_fork() {
    for r in &READERS {
        r.store(0, Ordering::SeqCst);
    }
    ABANDONED.store(0, Ordering::SeqCst);
}
