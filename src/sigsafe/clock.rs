//! The clock of durations: the CPU's time-stamp counter where the kernel itself keeps time with it
//! (its clocksource is `tsc`, and the CPU says the counter is invariant: constant rate, running in
//! every power state), calibrated against `CLOCK_MONOTONIC`; `clock_gettime` elsewhere.
//!
//! A return probe's duration is two reads of this clock: `rdtsc` costs 10 ns here, the vDSO's
//! `clock_gettime` 24. Only durations use it: events keep `CLOCK_MONOTONIC` timestamps (a trace's
//! slices, a fork child's events and another process's must line up), and a call entered while
//! events were traced is timed with it too.
//!
//! Calibration: the counter and the clock are read together when the runtime starts; the rate is
//! the ratio of what each advanced since, kept once at least `SETTLED_NS` has passed (until then,
//! taken afresh every quarter of a millisecond or so, from an interval too short to be kept).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::sys;

/// The counter is usable (see the module's text).
static TSC: AtomicBool = AtomicBool::new(false);
/// The counter and `CLOCK_MONOTONIC` read together at the start.
static ANCHOR_TICKS: AtomicU64 = AtomicU64::new(0);
static ANCHOR_NS: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per tick, in 32.32 fixed point; 0 until settled.
static MULT: AtomicU64 = AtomicU64::new(0);

/// How long after the anchor the rate is taken for good: 10 ms make it exact to 5 parts in a
/// million (two `clock_gettime` of 25 ns apart).
const SETTLED_NS: u64 = 10_000_000;

/// The counter.
#[inline(always)]
pub fn ticks() -> u64 {
    // SAFETY: rdtsc has no preconditions (user mode may run it unless the kernel forbids it with
    // CR4.TSD, which a `tsc` clocksource with a vDSO never does).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Decide, once, in the constructor: is the counter the clock of durations?
pub fn init(clocksource: &str) {
    // CPUID 0x80000007, EDX bit 8: invariant TSC (leaf 0x80000000 says how far the leaves go).
    let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    let invariant =
        max >= 0x8000_0007 && core::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0;
    if clocksource.trim() != "tsc" || !invariant {
        return;
    }
    let (t, n, _) = sample();
    ANCHOR_TICKS.store(t, Ordering::Relaxed);
    ANCHOR_NS.store(n, Ordering::Relaxed);
    TSC.store(true, Ordering::Release);
}

/// The counter and the clock at one instant, and how far apart the clock's two reads around the
/// counter's were: the tightest of a few tries (a preemption between them would skew the rate).
fn sample() -> (u64, u64, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..8 {
        let a = sys::monotonic_ns();
        let t = ticks();
        let b = sys::monotonic_ns();
        let gap = b.saturating_sub(a);
        if gap < best.2 {
            best = (t, a + gap / 2, gap);
        }
        if gap < 1_000 {
            break;
        }
    }
    best
}

/// Is the counter the clock of durations?
#[inline(always)]
pub fn tsc() -> bool {
    TSC.load(Ordering::Relaxed)
}

/// A number of ticks, in nanoseconds.
#[inline]
pub fn ticks_to_ns(d: u64) -> u64 {
    let mut m = MULT.load(Ordering::Relaxed);
    if m == 0 {
        m = rate();
    }
    ((u128::from(d) * u128::from(m)) >> 32) as u64
}

/// Before the rate is kept: the last one taken, and when (in ticks). It is taken again at most
/// every [`RETAKE_TICKS`], so that the calls of a process's first milliseconds do not each read
/// the clock.
static PROVISIONAL: AtomicU64 = AtomicU64::new(0);
static PROVISIONAL_AT: AtomicU64 = AtomicU64::new(0);
/// About a quarter of a millisecond at 4 GHz.
const RETAKE_TICKS: u64 = 1 << 20;

/// Nanoseconds per tick (32.32) since the anchor; kept once the interval is long enough.
#[cold]
fn rate() -> u64 {
    let now = ticks();
    let provisional = PROVISIONAL.load(Ordering::Relaxed);
    if provisional != 0 && now.wrapping_sub(PROVISIONAL_AT.load(Ordering::Relaxed)) < RETAKE_TICKS {
        return provisional;
    }
    let (t0, n0) = (ANCHOR_TICKS.load(Ordering::Relaxed), ANCHOR_NS.load(Ordering::Relaxed));
    let (t, n, _) = sample();
    let (dt, dn) = (t.wrapping_sub(t0), n.saturating_sub(n0));
    if dt == 0 {
        return 1 << 32;
    }
    let m = ((u128::from(dn) << 32) / u128::from(dt)).min(u128::from(u64::MAX)) as u64;
    if dn >= SETTLED_NS && m != 0 {
        MULT.store(m, Ordering::Relaxed);
    }
    PROVISIONAL.store(m.max(1), Ordering::Relaxed);
    PROVISIONAL_AT.store(now, Ordering::Relaxed);
    m.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_agrees_with_the_clock() {
        let source = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
        init(&std::fs::read_to_string(source).unwrap_or_default());
        if !tsc() {
            eprintln!("the clocksource is not an invariant tsc: clock_gettime is the clock here");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Each sample's error is at most its gap (the counter was read between the clock's).
        let (t0, n0, e0) = sample();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (t1, n1, e1) = sample();
        let (by_ticks, by_clock) = (ticks_to_ns(t1 - t0), n1 - n0);
        // The rate was taken over at least 10 ms, with the same bracketing error at each end.
        let diff = by_ticks.abs_diff(by_clock);
        assert!(
            diff <= e0 + e1 + by_clock / 1000,
            "{by_ticks} ns by the counter, {by_clock} by the clock (gaps {e0}, {e1})"
        );
    }
}
