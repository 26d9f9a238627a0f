//! The consumer side of one probe, as a hit sees it: what else to record beyond the site's count
//! (events, durations), and the few counters a hit updates in place.

use core::sync::atomic::{AtomicU64, Ordering};

/// How a traced event shows an argument register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    /// A NUL-terminated string, read safely from the program's memory (`<bad>` if unreadable).
    Str,
    I32,
    U32,
    I64,
    U64,
    /// Hexadecimal (`x64`, `ptr`).
    Hex,
}

/// One probe's consumer. Shared between the registry (which owns it) and published tables (which
/// keep it alive while a hit may be updating it).
pub struct Consumer {
    /// The probe's id, as events name it.
    pub id: u32,
    /// Types of the first arguments, for traced events.
    pub args: Vec<ArgType>,
    /// A return probe: its hits are returns, `latency` their durations.
    pub ret: bool,
    /// `%stack`: the user stack of each hit is counted (`sigsafe::stacks`).
    pub stack: bool,
    /// Calls not followed to their return (nested deeper than the per-thread return stack, or
    /// handed back to an unwinder).
    pub missed: AtomicU64,
    /// This probe's events that found no room (a full ring, or no ring): each stream that could
    /// have carried them says how many.
    pub lost: AtomicU64,
    /// Durations, for a return probe when durations are on.
    pub latency: Option<Box<Latency>>,
}

/// Sub-buckets per power of two in [`Latency`]: percentiles are within 1/8 of the truth.
const SUB_BUCKETS: usize = 8;
pub const LATENCY_BUCKETS: usize = 64 * SUB_BUCKETS;

/// Durations of a return probe's calls, updated lock-free by hits. All zeros is the empty state
/// (the shortest duration is kept as its distance below `u64::MAX`), so that a fresh one needs no
/// writes: `libc.so.6:*%return` makes two thousand, 4 KiB each, and setting up only the pages
/// that calls reach halves its setup.
pub struct Latency {
    pub calls: AtomicU64,
    pub total_ns: AtomicU64,
    /// `u64::MAX` less the shortest duration (0: none yet).
    below_min: AtomicU64,
    pub max_ns: AtomicU64,
    /// Log-linear: 8 sub-buckets for every power of two (see [`bucket_of`]).
    pub buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl Latency {
    /// An empty one, allocated zeroed: memory fresh from the kernel is not even touched.
    pub fn boxed() -> Box<Latency> {
        let layout = std::alloc::Layout::new::<Latency>();
        // SAFETY: a non-zero-sized layout; every field is an atomic integer, for which all zeros
        // is a valid value (and, here, the empty state); the block is the global allocator's, as
        // a Box's must be.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut Latency;
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Box::from_raw(p)
        }
    }

    #[inline(always)]
    pub fn record(&self, ns: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.below_min.fetch_max(u64::MAX - ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        if let Some(b) = self.buckets.get(bucket_of(ns)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The shortest duration (`u64::MAX` when there was none).
    pub fn min_ns(&self) -> u64 {
        u64::MAX - self.below_min.load(Ordering::Relaxed)
    }

    /// Empty again. One that never recorded (`calls`, incremented first by `record` and cleared
    /// last here, is 0) is left alone: a fork's child resets every return probe's table, and
    /// writing two thousand untouched ones would give it 4,000 pages.
    pub fn reset(&self) {
        if self.calls.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.total_ns.store(0, Ordering::Relaxed);
        self.below_min.store(0, Ordering::Relaxed);
        self.max_ns.store(0, Ordering::Relaxed);
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.calls.store(0, Ordering::Relaxed);
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
