//! The text renderings: the summary table and latency histograms.

use crate::registry::{ProbeInfo, ProbeState};
use crate::spec;

/// Stacks shown per probe in the text summary (all with `UPROBES_SUMMARY=all`).
const STACKS_SHOWN: usize = 20;

/// Widest a column of the table grows; longer cells are shortened.
const MAX_WIDTH: usize = 60;

fn cell(s: &str) -> String {
    if s.chars().count() <= MAX_WIDTH {
        return s.to_string();
    }
    let cut: String = s.chars().take(MAX_WIDTH - 3).collect();
    format!("{cut}...")
}

/// A duration for people: ns, us, ms or s.
pub fn human_ns(ns: u64) -> String {
    match ns {
        n if n < 10_000 => format!("{n}ns"),
        n if n < 10_000_000 => format!("{:.1}us", n as f64 / 1e3),
        n if n < 10_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.1}s", n as f64 / 1e9),
    }
}

/// A return probe's durations, as bpftrace's `hist()` and BCC's funclatency print them.
fn latency(p: &ProbeInfo, out: &mut String) {
    let Some(l) = &p.latency else { return };
    *out += &format!(
        "\n  {} ({}): calls {}, total {}, mean {}, min {}, max {}, p50 {}, p99 {}, missed {}\n",
        spec::shorten(&p.spec),
        p.symbol,
        l.calls,
        human_ns(l.total_ns),
        human_ns(l.mean_ns),
        human_ns(if l.calls == 0 { 0 } else { l.min_ns }),
        human_ns(l.max_ns),
        human_ns(l.p50_ns),
        human_ns(l.p99_ns),
        p.missed
    );
    let widest = l.histogram.iter().map(|h| h.2).max().unwrap_or(1).max(1);
    for &(lo, hi, n) in &l.histogram {
        let bar = "@".repeat((n as u128 * 40).div_ceil(widest as u128) as usize);
        *out += &format!("  [{:>10}, {:>10}] {n:>10} |{bar:<40}|\n", human_ns(lo), human_ns(hi));
    }
}

/// Why probes are on the trap path, grouped by the reason's first words (the JSON report has
/// each one's whole reason).
fn trap_reasons(probes: &[ProbeInfo], out: &mut String) {
    let mut groups: Vec<(String, usize)> = Vec::new();
    for p in probes.iter().filter(|p| p.path == Some("trap")) {
        let why = p.path_reason.as_deref().unwrap_or("unknown");
        let head = why.split(':').next().unwrap_or(why).trim().to_string();
        match groups.iter_mut().find(|g| g.0 == head) {
            Some(g) => g.1 += 1,
            None => groups.push((head, 1)),
        }
    }
    for (why, n) in groups {
        *out += &format!("libuprobe: {n} probe(s) on the trap path: {}\n", cell(&why));
    }
}

/// A count for people: right-aligned by the caller, with thousands separators (`1,234,567`).
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Is this spec a glob (several matches, collapsed when they have no hits)?
fn is_glob(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

/// The summary table: probes by hits, highest first (ties by id); the active members of a glob
/// that have no hits are collapsed into one line per glob, unless `all` (`UPROBES_SUMMARY=all`,
/// `uprobe run --all`). Failed and pending probes are always listed.
pub fn summary(
    pid: i32,
    program: &(String, String),
    probes: &[ProbeInfo],
    trace: Option<(u64, u64)>,
    all: bool,
    stacks: &super::Stacks,
) -> String {
    let (comm, argv0) = program;
    let mut out =
        format!("libuprobe: pid {pid} ({comm}, argv[0] {argv0:?}): {} probe(s)\n", probes.len());
    let mut order: Vec<&ProbeInfo> = probes.iter().collect();
    order.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.id.cmp(&b.id)));
    // (spec, how many) of the collapsed glob members, in the order the globs first appear.
    let mut quiet: Vec<(&str, usize)> = Vec::new();
    if !all {
        order.retain(|p| {
            let collapse = p.hits == 0 && p.state == ProbeState::Active && is_glob(&p.spec);
            if collapse {
                match quiet.iter_mut().find(|q| q.0 == p.spec) {
                    Some(q) => q.1 += 1,
                    None => quiet.push((&p.spec, 1)),
                }
            }
            !collapse
        });
    }
    let specs: Vec<String> = order.iter().map(|p| cell(&p.spec)).collect();
    let symbols: Vec<String> = order.iter().map(|p| cell(&p.symbol)).collect();
    let hits: Vec<String> = order.iter().map(|p| thousands(p.hits)).collect();
    let spec_w = specs.iter().map(|s| s.chars().count()).max().unwrap_or(4).max(4);
    let sym_w = symbols.iter().map(|s| s.chars().count()).max().unwrap_or(6).max(6);
    let hits_w = hits.iter().map(|s| s.len()).max().unwrap_or(4).max(12);
    out += &format!(
        "{:>5}  {:>hits_w$}  {:<7}  {:<4}  {:<spec_w$}  {:<sym_w$}  WHERE\n",
        "ID", "HITS", "STATE", "PATH", "SPEC", "SYMBOL"
    );
    for (((p, spec), symbol), hits) in order.iter().zip(&specs).zip(&symbols).zip(&hits) {
        let place = match (p.state, p.offset) {
            (ProbeState::Failed, _) => p.error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
            (ProbeState::Pending, _) => format!("{} (not loaded)", p.object),
            (ProbeState::Lost, Some(off)) => {
                format!("{}+{off:#x} (the breakpoint was removed by something else)", p.object)
            }
            (_, Some(off)) => format!("{}+{off:#x}", p.object),
            (_, None) => p.object.clone(),
        };
        out += &format!(
            "{:>5}  {hits:>hits_w$}  {:<7}  {:<4}  {:<spec_w$}  {:<sym_w$}  {place}\n",
            p.id,
            p.state.as_str(),
            p.path.unwrap_or("-"),
            spec,
            symbol
        );
    }
    for (spec, n) in quiet {
        out += &format!(
            "       ... and {} more match{} of {} with no hits (UPROBES_SUMMARY=all lists them)\n",
            thousands(n as u64),
            if n == 1 { "" } else { "es" },
            cell(spec)
        );
    }
    trap_reasons(probes, &mut out);
    for p in order.iter().filter(|p| p.ret) {
        latency(p, &mut out);
    }
    for p in order.iter() {
        let Some(folded) = stacks.0.get(&p.id) else { continue };
        out += &format!(
            "\n  stacks of {} ({}): {} distinct, folded (outermost first)\n",
            spec::shorten(&p.spec),
            p.symbol,
            thousands(folded.len() as u64)
        );
        let shown = if all { folded.len() } else { folded.len().min(STACKS_SHOWN) };
        for (stack, n) in folded.iter().take(shown) {
            out += &format!("  {stack} {n}\n");
        }
        if shown < folded.len() {
            out += &format!(
                "  ... and {} more stacks (UPROBES_SUMMARY=all lists them)\n",
                thousands((folded.len() - shown) as u64)
            );
        }
    }
    if stacks.1 > 0 {
        out += &format!("libuprobe: {} stacks lost (the table was full)\n", thousands(stacks.1));
    }
    if let Some((events, lost)) = trace {
        out +=
            &format!("libuprobe: {} events traced, {} lost\n", thousands(events), thousands(lost));
    }
    if !probes.is_empty() && probes.iter().all(|p| p.state == ProbeState::Pending) {
        out += "libuprobe: no object named by the specs was ever loaded\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProbeError;
    use crate::registry::{LatencyInfo, ProbeInfo, ProbeState};

    fn probe(
        spec: String,
        symbol: String,
        state: ProbeState,
        error: Option<ProbeError>,
    ) -> ProbeInfo {
        ProbeInfo {
            id: 1,
            spec,
            object: "o".repeat(70_000),
            symbol,
            offset: Some(u64::MAX),
            state,
            error,
            hits: u64::MAX,
            ret: true,
            missed: u64::MAX,
            latency: Some(LatencyInfo {
                calls: u64::MAX,
                total_ns: u64::MAX,
                mean_ns: u64::MAX,
                min_ns: 0,
                max_ns: u64::MAX,
                p50_ns: 1,
                p99_ns: u64::MAX,
                histogram: vec![(0, 0, u64::MAX), (1, 1, 1), (u64::MAX / 2, u64::MAX, 7)],
            }),
            path: Some("trap"),
            path_reason: Some("x".repeat(70_000)),
            class: None,
        }
    }

    #[test]
    fn counts_have_thousands_separators() {
        let t: Vec<String> = [0, 7, 999, 1_000, 12_345, 1_234_567, u64::MAX].map(thousands).into();
        assert_eq!(
            t,
            ["0", "7", "999", "1,000", "12,345", "1,234,567", "18,446,744,073,709,551,615"]
        );
    }

    /// Highest first; a glob's quiet members collapse into one line, unless all are asked for.
    #[test]
    fn the_summary_is_sorted_and_quiet_glob_members_collapse() {
        let mk = |id, spec: &str, symbol: &str, hits| {
            let mut p = probe(spec.into(), symbol.into(), ProbeState::Active, None);
            p.id = id;
            p.hits = hits;
            p.ret = false;
            p.object = "libc.so.6".into();
            p.path = Some("jump");
            p.offset = Some(0x10);
            p
        };
        let probes = vec![
            mk(1, "libc:str*", "strlen", 5),
            mk(2, "libc:str*", "strchr", 0),
            mk(3, "libc:str*", "strcmp", 1_234_567),
            mk(4, "libc:str*", "strrchr", 0),
            mk(5, "libc:malloc", "malloc", 0),
        ];
        let program = ("p".to_string(), "p".to_string());
        let text = summary(1, &program, &probes, None, false, &Default::default());
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert!(rows[0].contains("1,234,567") && rows[0].contains("strcmp"), "{text}");
        assert!(rows[1].contains("strlen"), "{text}");
        assert!(rows[2].contains("malloc"), "a single probe with no hits stays: {text}");
        assert!(rows[3].contains("... and 2 more matches of libc:str* with no hits"), "{text}");
        assert_eq!(rows.len(), 4, "{text}");
        let full = summary(1, &program, &probes, None, true, &Default::default());
        assert_eq!(full.lines().count(), 2 + 5, "{full}");
        assert!(!full.contains("more match"));
    }

    /// The report never panics, whatever the probes hold (a spec of 65,536 characters made the
    /// text table's width overflow).
    #[test]
    fn the_report_takes_anything() {
        let long = "s".repeat(70_000);
        let weird = "\u{0}\n\u{10ffff}é%return:(".repeat(5_000);
        let error = Some(ProbeError::Spec(crate::spec::SpecError {
            spec: long.clone(),
            why: weird.clone(),
        }));
        let probes: Vec<ProbeInfo> = [
            probe(long.clone(), weird.clone(), ProbeState::Failed, error),
            probe(weird.clone(), long.clone(), ProbeState::Active, None),
            probe(String::new(), String::new(), ProbeState::Pending, None),
            probe(long.clone(), long.clone(), ProbeState::Lost, None),
        ]
        .into();
        let program = (weird.clone(), long.clone());
        let text =
            summary(1, &program, &probes, Some((u64::MAX, u64::MAX)), true, &Default::default());
        assert!(text.lines().all(|l| l.len() < 250_000));
        let json =
            crate::report::json::summary(1, &program, &probes, Some((0, 0)), &Default::default());
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
    }
}
