//! Identical stacks counted in place: a fixed table of (probe, frames) → count, mapped once when
//! the first stack probe appears. A hit that finds its stack adds one to it; a new stack claims a
//! free entry (compare-and-swap), writes its frames and marks it ready. No allocation, no lock, no
//! wait: an entry being written by another hit is passed over (the same stack may then take two
//! entries; they are added together when read), and a stack that finds no room within
//! [`PROBE_LIMIT`] entries is counted in [`LOST`].

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use super::table::ReadGuard;
use super::unwind::{self, Regs, MAX_FRAMES};

/// Entries in the table.
pub const ENTRIES: usize = 32768;
/// Entries a stack looks at, from its hash, before it is lost.
const PROBE_LIMIT: usize = 64;

const EMPTY: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

#[repr(C)]
pub struct Entry {
    pub state: AtomicU32,
    pub probe: AtomicU32,
    pub hash: AtomicU64,
    pub count: AtomicU64,
    pub depth: AtomicU32,
    pub frames: [AtomicU64; MAX_FRAMES],
}

/// The table (null until mapped by `consumers::stacks`): [`ENTRIES`] zeroed entries.
pub static TABLE: AtomicPtr<Entry> = AtomicPtr::new(core::ptr::null_mut());
/// Stacks that found no room.
pub static LOST: AtomicU64 = AtomicU64::new(0);

pub fn entry(i: usize) -> Option<&'static Entry> {
    let t = TABLE.load(Ordering::Acquire);
    // SAFETY: the table holds ENTRIES entries, mapped for good.
    (!t.is_null() && i < ENTRIES).then(|| unsafe { &*t.add(i) })
}

/// Is the entry ready to be read (its frames written)?
pub fn ready(e: &Entry) -> bool {
    e.state.load(Ordering::Acquire) == READY
}

fn hash(probe: u32, frames: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ u64::from(probe);
    for &f in frames {
        h = (h ^ f).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h | 1
}

/// The stack at a hit, unwound once for all the hit's stack consumers.
pub struct Captured {
    frames: [u64; MAX_FRAMES],
    depth: usize,
}

impl Captured {
    #[inline(never)]
    pub fn take(guard: &ReadGuard, regs: Regs) -> Captured {
        let mut frames = [0u64; MAX_FRAMES];
        let depth = unwind::unwind(guard, regs, &mut frames);
        Captured { frames, depth }
    }

    /// Count this stack once for `probe`.
    pub fn count_for(&self, probe: u32) {
        let Some(frames) = self.frames.get(..self.depth) else { return };
        if TABLE.load(Ordering::Acquire).is_null() || frames.is_empty() {
            return;
        }
        let h = hash(probe, frames);
        for k in 0..PROBE_LIMIT {
            let Some(e) = entry((h as usize).wrapping_add(k) % ENTRIES) else { return };
            let mut state = e.state.load(Ordering::Acquire);
            if state == EMPTY {
                match e.state.compare_exchange(EMPTY, WRITING, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        e.probe.store(probe, Ordering::Relaxed);
                        e.hash.store(h, Ordering::Relaxed);
                        e.depth.store(frames.len() as u32, Ordering::Relaxed);
                        for (slot, &f) in e.frames.iter().zip(frames) {
                            slot.store(f, Ordering::Relaxed);
                        }
                        e.count.store(1, Ordering::Relaxed);
                        e.state.store(READY, Ordering::Release);
                        return;
                    }
                    Err(now) => state = now,
                }
            }
            if state == READY
                && e.hash.load(Ordering::Relaxed) == h
                && e.probe.load(Ordering::Relaxed) == probe
                && e.depth.load(Ordering::Relaxed) as usize == frames.len()
                && e.frames.iter().zip(frames).all(|(a, &b)| a.load(Ordering::Relaxed) == b)
            {
                e.count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        LOST.fetch_add(1, Ordering::Relaxed);
    }
}
