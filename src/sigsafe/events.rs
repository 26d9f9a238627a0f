//! Recording traced events: a hit writes a fixed-size [`Event`] into its thread's ring, taken from
//! a preallocated pool. No allocation, no lock, never a wait: a full ring drops the event and
//! counts it as lost. The drain thread (`consumers::events`) reads the rings.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};

use super::consumer::{ArgType, Consumer};
use super::sys;
use super::thread::Block;

/// The longest string an event carries for a `str` argument (more is cut, and marked so).
pub const STR_MAX: usize = 48;
/// Events a thread's ring holds before the drain thread must catch up (then they are `lost`).
pub const RING_EVENTS: usize = 8192;
/// Rings in the pool: threads recording events at once.
pub const RINGS: usize = 64;

/// Event kinds.
pub const ENTRY: u32 = 0;
pub const RETURN: u32 = 1;

/// One traced hit. Fixed size, written by a hit into its thread's ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Event {
    pub probe: u32,
    pub tid: i32,
    /// [`ENTRY`] (regs are the arguments) or [`RETURN`] (regs[0] is the return value, regs[1] the
    /// duration in nanoseconds, 0 when durations are off).
    pub kind: u32,
    pub _pad: u32,
    pub ts_ns: u64,
    /// rdi, rsi, rdx, rcx, r8, r9: the SysV integer argument registers.
    pub regs: [u64; 6],
    /// For the first two `str` arguments: bytes read, -1 if unreadable; and the bytes.
    pub str_len: [i16; 2],
    pub strs: [[u8; STR_MAX]; 2],
}

/// A ring of one thread's events, read by the drain thread. The thread is the only producer, but
/// it may record from a signal handler that interrupted it while it was recording: a slot is
/// reserved by a compare-and-swap on `reserved`, marked in `ready` once written, and `head` (what
/// the drain thread reads up to) only moves over slots that are ready, in order.
#[repr(C)]
pub struct Ring {
    /// The tid of the thread that records here; 0 when free.
    pub owner: AtomicI32,
    pub head: AtomicU64,
    pub tail: AtomicU64,
    pub lost: AtomicU64,
    pub reserved: AtomicU64,
    /// For slot `i % RING_EVENTS`: `i + 1` once event `i` is written.
    pub ready: [AtomicU64; RING_EVENTS],
    pub events: [core::cell::UnsafeCell<Event>; RING_EVENTS],
}

// SAFETY: a slot is written only by the owner thread before it publishes `head`, and read only by
// the drain thread after it sees `head`, before it publishes `tail`.
unsafe impl Sync for Ring {}

/// The pool of rings, mapped when tracing is enabled; null before.
pub static RING_POOL: AtomicPtr<Ring> = AtomicPtr::new(core::ptr::null_mut());
/// Events lost because all rings were taken, or the thread had no block.
pub static LOST_NO_RING: AtomicU64 = AtomicU64::new(0);
/// Tracing is on: entry events are recorded for every probe.
pub static TRACING: AtomicBool = AtomicBool::new(false);
/// The pid events are recorded for (reading `str` arguments uses it).
pub static PID: AtomicI32 = AtomicI32::new(0);

/// Ring `i` of the pool, once mapped.
pub fn ring(i: usize) -> Option<&'static Ring> {
    let pool = RING_POOL.load(Ordering::Acquire);
    if pool.is_null() || i >= RINGS {
        return None;
    }
    // SAFETY: the published pool holds RINGS rings for the life of the process.
    Some(unsafe { &*pool.add(i) })
}

/// This thread's ring: the one its block holds, or a free one it claims now (a CAS on the owner of
/// each ring of the preallocated pool).
#[inline(always)]
fn my_ring(block: &Block) -> Option<&'static Ring> {
    let p = block.ring.load(Ordering::Relaxed);
    if p != 0 {
        // SAFETY: rings live for the life of the process once the pool is mapped.
        return Some(unsafe { &*(p as *const Ring) });
    }
    let tid = block.owner.load(Ordering::Relaxed);
    for i in 0..RINGS {
        let r = ring(i)?;
        if r.owner.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            block.ring.store(r as *const Ring as usize, Ordering::Relaxed);
            return Some(r);
        }
    }
    None
}

/// The next free event slot of this thread's ring, or None (counted as lost). The event becomes
/// visible to the drain thread once the caller [`publish`]es it.
#[inline(always)]
fn reserve(
    block: Option<&Block>,
    c: &Consumer,
) -> Option<(&'static Ring, u64, &'static mut Event)> {
    let Some(ring) = block.and_then(my_ring) else {
        LOST_NO_RING.fetch_add(1, Ordering::Relaxed);
        c.lost.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let mut at = ring.reserved.load(Ordering::Relaxed);
    loop {
        if at.wrapping_sub(ring.tail.load(Ordering::Acquire)) >= RING_EVENTS as u64 {
            ring.lost.fetch_add(1, Ordering::Relaxed);
            c.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // A handler that interrupted this thread between the load and here took `at` itself.
        match ring.reserved.compare_exchange(
            at,
            at.wrapping_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => break,
            Err(now) => at = now,
        }
    }
    let slot = ring.events.get((at % RING_EVENTS as u64) as usize)?;
    // SAFETY: the slot at `at` is this reservation's alone, and the consumer reads it only once
    // `head` moves past it.
    let e = unsafe { &mut *slot.get() };
    Some((ring, at, e))
}

/// Mark event `at` written, and move `head` over every written event in order.
#[inline(always)]
fn publish(ring: &Ring, at: u64) {
    let ready = |i: u64| ring.ready.get((i % RING_EVENTS as u64) as usize);
    if let Some(r) = ready(at) {
        r.store(at.wrapping_add(1), Ordering::Release);
    }
    loop {
        let head = ring.head.load(Ordering::Acquire);
        if ready(head).is_none_or(|r| r.load(Ordering::Acquire) != head.wrapping_add(1)) {
            return;
        }
        // Whoever fails here was overtaken by a nested handler, which moved `head` on.
        let _ = ring.head.compare_exchange(
            head,
            head.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// Record an entry event for consumer `c`; `args` are rdi, rsi, rdx, rcx, r8, r9.
#[inline(never)]
pub fn record_entry(block: Option<&Block>, c: &Consumer, args: [u64; 6]) {
    let Some((ring, head, e)) = reserve(block, c) else { return };
    e.probe = c.id;
    e.kind = ENTRY;
    e.tid = ring.owner.load(Ordering::Relaxed);
    e.ts_ns = sys::monotonic_ns();
    e.regs = args;
    e.str_len = [0, 0];
    let mut n = 0;
    for (t, &reg) in c.args.iter().zip(args.iter()) {
        if *t != ArgType::Str {
            continue;
        }
        let Some(buf) = e.strs.get_mut(n) else { break };
        let len = match sys::read_memory_safely(PID.load(Ordering::Relaxed), reg, buf) {
            Ok(got) if got > 0 => got as i16,
            // A string that ends just before an unmapped page: read what is there.
            _ => read_short_string(reg, buf),
        };
        if let Some(l) = e.str_len.get_mut(n) {
            *l = len;
        }
        n += 1;
    }
    publish(ring, head);
}

/// Record a return event for consumer `c`.
#[inline(never)]
pub fn record_return(block: Option<&Block>, c: &Consumer, retval: u64, duration: u64, now: u64) {
    let Some((ring, head, e)) = reserve(block, c) else { return };
    e.probe = c.id;
    e.kind = RETURN;
    e.tid = ring.owner.load(Ordering::Relaxed);
    e.ts_ns = if now != 0 { now } else { sys::monotonic_ns() };
    e.regs = [retval, duration, 0, 0, 0, 0];
    e.str_len = [0, 0];
    publish(ring, head);
}

/// Byte by byte, for a string within `STR_MAX` of the end of its mapping. -1 if unreadable.
fn read_short_string(addr: u64, out: &mut [u8; STR_MAX]) -> i16 {
    let mut got = 0usize;
    for slot in out.iter_mut() {
        let mut b = [0u8];
        match sys::read_memory_safely(
            PID.load(Ordering::Relaxed),
            addr.wrapping_add(got as u64),
            &mut b,
        ) {
            Ok(1) => {
                *slot = b[0];
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
