//! `metrics`: the probes' counts in the Prometheus text exposition format, version 0.0.4, for a
//! scraper (`uprobe exporter` serves it over HTTP for every process of a user).

use std::fmt::Write;

use crate::consumers;
use crate::registry::{self, ProbeInfo};

/// Upper bounds of the duration histogram's buckets: 2^k - 1 nanoseconds, from 63 ns to 68.7 s
/// (every power of four), the same in every process and at every scrape.
const BUCKET_POWERS: std::ops::RangeInclusive<u32> = 6..=36;

/// A label value as the format wants it: `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(p: &ProbeInfo) -> String {
    format!(
        "probe=\"{}\",spec=\"{}\",symbol=\"{}\",object=\"{}\"",
        p.id,
        escape(&p.spec),
        escape(&p.symbol),
        escape(&p.object)
    )
}

/// Seconds, as Prometheus reads them (no exponent needed for our range, but exact).
fn seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// The exposition: every family with its HELP and TYPE, then its samples.
pub fn exposition() -> String {
    let probes = registry::with_registry(|r| r.snapshot()).unwrap_or_default();
    let mut out = String::new();
    out += "# HELP uprobe_hits_total Times the probed instruction ran (a return probe: returns).\n";
    out += "# TYPE uprobe_hits_total counter\n";
    for p in &probes {
        let _ = writeln!(out, "uprobe_hits_total{{{}}} {}", labels(p), p.hits);
    }
    out += "# HELP uprobe_missed_total Calls of a return-probed function whose return was not \
            followed.\n";
    out += "# TYPE uprobe_missed_total counter\n";
    for p in probes.iter().filter(|p| p.ret) {
        let _ = writeln!(out, "uprobe_missed_total{{{}}} {}", labels(p), p.missed);
    }
    let (_, lost) = consumers::events::totals().unwrap_or((0, 0));
    out += "# HELP uprobe_events_lost_total Events dropped (a full ring, or a subscriber that did \
            not read).\n";
    out += "# TYPE uprobe_events_lost_total counter\n";
    let _ = writeln!(out, "uprobe_events_lost_total {lost}");
    out += "# HELP uprobe_duration_seconds Durations of the calls of return-probed functions.\n";
    out += "# TYPE uprobe_duration_seconds histogram\n";
    for p in probes.iter().filter(|p| p.ret) {
        let Some(l) = &p.latency else { continue };
        let labels = labels(p);
        for k in BUCKET_POWERS.step_by(2) {
            // The histogram's buckets are [2^j, 2^(j+1) - 1] ns: each bound is the top of one,
            // so every count is exact.
            let bound = (1u64 << k) - 1;
            let below: u64 =
                l.histogram.iter().filter(|(_, high, _)| *high <= bound).map(|(_, _, n)| n).sum();
            let _ = writeln!(
                out,
                "uprobe_duration_seconds_bucket{{{labels},le=\"{}\"}} {below}",
                seconds(bound)
            );
        }
        let _ = writeln!(out, "uprobe_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", l.calls);
        let _ = writeln!(out, "uprobe_duration_seconds_sum{{{labels}}} {}", seconds(l.total_ns));
        let _ = writeln!(out, "uprobe_duration_seconds_count{{{labels}}} {}", l.calls);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        assert_eq!(seconds(63), "0.000000063");
        assert_eq!(seconds(68_719_476_736), "68.719476736");
    }
}
