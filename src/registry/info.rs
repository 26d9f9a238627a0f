//! What the user sees of a probe: a snapshot, taken under the registry's lock.

use std::sync::atomic::Ordering;

use crate::error::ProbeError;
use crate::sigsafe::consumer::{self, Latency};

pub type ProbeId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// Breakpoints are in every mapping of the site.
    Active,
    /// Its object is not loaded (yet, or any more).
    Pending,
    /// Could not be set up; `error` says why.
    Failed,
    /// Its breakpoint is gone from memory, removed by something other than libuprobe (a kernel
    /// uprobe enabled and disabled on the same instruction restores the original byte).
    Lost,
}

impl ProbeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeState::Active => "active",
            ProbeState::Pending => "pending",
            ProbeState::Failed => "failed",
            ProbeState::Lost => "lost",
        }
    }
}

/// A probe, as the summary, `list` and `stats` show it.
#[derive(Clone, Debug)]
pub struct ProbeInfo {
    pub id: ProbeId,
    pub spec: String,
    pub object: String,
    pub symbol: String,
    /// File offset of the probed instruction.
    pub offset: Option<u64>,
    pub state: ProbeState,
    pub error: Option<ProbeError>,
    /// For an entry probe, hits; for a return probe (`%return`), returns.
    pub hits: u64,
    pub ret: bool,
    /// Return probes: calls not followed to their return.
    pub missed: u64,
    /// Return probes: the durations of the calls (None when durations are off).
    pub latency: Option<LatencyInfo>,
    /// How hits reach libuprobe here: `trap` (int3 and SIGTRAP) or `jump`; and, for `trap` when
    /// the jump path is on, why no jump.
    pub path: Option<&'static str>,
    pub path_reason: Option<String>,
    /// For `jump`: 1 when the instruction is 5 bytes or longer, 2 for a punned jump.
    pub class: Option<u8>,
}

/// Durations of a return probe's calls, in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct LatencyInfo {
    pub calls: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Upper bounds of the buckets holding the 50th and 99th percentile (within 1/8).
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Power-of-two buckets with calls: (low, high inclusive, calls), as bpftrace's `hist()`.
    pub histogram: Vec<(u64, u64, u64)>,
}

impl LatencyInfo {
    pub fn of(l: &Latency) -> LatencyInfo {
        let counts: Vec<u64> = l.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let calls: u64 = counts.iter().sum();
        if calls == 0 {
            return LatencyInfo::default();
        }
        let (min_ns, max_ns) = (l.min_ns(), l.max_ns.load(Ordering::Relaxed));
        let percentile = |q: f64| {
            let want = ((calls as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    let high = if i + 1 < counts.len() {
                        consumer::bucket_low(i + 1) - 1
                    } else {
                        u64::MAX
                    };
                    return high.clamp(min_ns, max_ns);
                }
            }
            max_ns
        };
        let mut histogram: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let low = consumer::bucket_low(i);
            let p2 = if low == 0 { 0 } else { 1u64 << (63 - low.leading_zeros()) };
            let high = if p2 == 0 { 0 } else { p2.saturating_mul(2) - 1 };
            match histogram.last_mut() {
                Some(last) if last.0 == p2 => last.2 += c,
                _ => histogram.push((p2, high, c)),
            }
        }
        let total_ns = l.total_ns.load(Ordering::Relaxed);
        LatencyInfo {
            calls,
            total_ns,
            mean_ns: total_ns / calls,
            min_ns,
            max_ns,
            p50_ns: percentile(0.50),
            p99_ns: percentile(0.99),
            histogram,
        }
    }
}
