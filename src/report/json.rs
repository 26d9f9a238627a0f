//! The JSON renderings: a probe (summary, `list`, `add`), an error line, the summary line.

use serde_json::{json, Value};

use crate::error::ProbeError;
use crate::registry::ProbeInfo;

/// An error as JSON: its message and the kind of cause.
pub fn error(e: &ProbeError) -> Value {
    json!({"message": e.to_string(), "kind": e.kind()})
}

/// A problem line of the report.
pub fn error_line(spec: &str, e: &ProbeError) -> Value {
    json!({"type": "error", "spec": spec, "message": e.to_string(), "kind": e.kind()})
}

/// One probe as JSON: the fields of the summary, of `list` and of `add` answers.
pub fn probe(p: &ProbeInfo) -> Value {
    let mut v = json!({
        "id": p.id,
        "spec": p.spec,
        "object": p.object,
        "symbol": p.symbol,
        "offset": p.offset,
        "state": p.state.as_str(),
        "hits": p.hits,
    });
    if let Some(e) = &p.error {
        v["error"] = json!(e.to_string());
        v["error_kind"] = json!(e.kind());
    }
    if let Some(path) = p.path {
        v["path"] = json!(path);
        if let Some(class) = p.class {
            v["class"] = json!(class);
        }
        if let (Some(why), "trap") = (&p.path_reason, path) {
            v["path_reason"] = json!(why);
        }
    }
    if p.ret {
        v["return"] = json!(true);
        v["missed"] = json!(p.missed);
        if let Some(l) = &p.latency {
            let hist: Vec<_> = l
                .histogram
                .iter()
                .map(|&(lo, hi, n)| json!({"low_ns": lo, "high_ns": hi, "count": n}))
                .collect();
            v["latency"] = json!({
                "calls": l.calls, "total_ns": l.total_ns, "mean_ns": l.mean_ns, "min_ns": l.min_ns,
                "max_ns": l.max_ns, "p50_ns": l.p50_ns, "p99_ns": l.p99_ns, "histogram": hist,
            });
        }
    }
    v
}

/// The summary line; `stacks`: the folded stacks of the probes that count them, and how many
/// found no room.
pub fn summary(
    pid: i32,
    program: &(String, String),
    probes: &[ProbeInfo],
    trace: Option<(u64, u64)>,
    stacks: &super::Stacks,
) -> String {
    let list: Vec<_> = probes
        .iter()
        .map(|p| {
            let mut v = probe(p);
            if let Some(folded) = stacks.0.get(&p.id) {
                let lines: Vec<String> = folded.iter().map(|(s, n)| format!("{s} {n}")).collect();
                v["stacks"] = json!(lines);
            }
            v
        })
        .collect();
    let runtime_traps =
        crate::sigsafe::trap::RUNTIME_TRAPS.load(std::sync::atomic::Ordering::Relaxed);
    let mut v = json!({
        "type": "summary", "pid": pid, "comm": program.0, "argv0": program.1, "probes": list,
        "runtime_traps": runtime_traps,
        "setup_ns": super::SETUP_NS.load(std::sync::atomic::Ordering::Relaxed),
    });
    if let Some((events, lost)) = trace {
        v["events"] = json!(events);
        v["lost"] = json!(lost);
    }
    if !stacks.0.is_empty() || stacks.1 > 0 {
        v["stacks_lost"] = json!(stacks.1);
    }
    format!("{v}\n")
}
