//! What libuprobe says: problems found while setting up, and the summary at exit, as a readable
//! table (`UPROBES_FORMAT=text`, the default) or JSON Lines (`UPROBES_FORMAT=json`), written to
//! stderr or appended to `UPROBES_OUTPUT` (`%p` is replaced by the pid).

use std::sync::atomic::{AtomicI32, Ordering};

use serde_json::json;

use crate::probes::{ProbeInfo, ProbeState};
use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Where and how reports go.
#[derive(Clone, Debug)]
pub struct Output {
    /// `UPROBES_OUTPUT` as given (with `%p` unexpanded); `None` is stderr.
    pub path: Option<String>,
    pub format: Format,
}

/// A duplicate of the stderr the program started with. Many programs close stderr on their way out
/// (gnulib's `close_stdout` does, in every coreutils program), before our destructor runs.
static STDERR: AtomicI32 = AtomicI32::new(2);

/// Keep the program's stderr for the report: a close-on-exec duplicate, numbered high so that it
/// never takes a descriptor number the program expects `open` to return.
pub fn keep_stderr() {
    if let Ok(fd) = sys::dup_cloexec_at_least(2, 900).or_else(|_| sys::dup_cloexec_at_least(2, 3)) {
        STDERR.store(fd, Ordering::Relaxed);
    }
}

impl Output {
    /// Append `text` to the output. The file is opened for each report and closed after, so that
    /// libuprobe holds no descriptor the program might close, reuse or inherit.
    pub fn emit(&self, text: &str) {
        match &self.path {
            None => {
                let _ = sys::write_all(STDERR.load(Ordering::Relaxed), text.as_bytes());
            }
            Some(template) => {
                let path = template.replace("%p", &sys::getpid().to_string());
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                match file {
                    Ok(mut f) => {
                        let _ = std::io::Write::write_all(&mut f, text.as_bytes());
                    }
                    Err(e) => {
                        let msg = format!("libuprobe: cannot write report to {path}: {e}\n{text}");
                        let _ = sys::write_all(2, msg.as_bytes());
                    }
                }
            }
        }
    }

    /// A problem found while setting up probes.
    pub fn problem(&self, spec: &str, message: &str) {
        let line = match self.format {
            Format::Text => format!("libuprobe: {spec}: {message}\n"),
            Format::Json => {
                format!("{}\n", json!({"type": "error", "spec": spec, "message": message}))
            }
        };
        self.emit(&line);
    }

    /// The summary written at exit. `trace`: (events written, events lost) when tracing.
    pub fn summary(&self, probes: &[ProbeInfo], trace: Option<(u64, u64)>) {
        let text = match self.format {
            Format::Text => summary_text(sys::getpid(), probes, trace),
            Format::Json => summary_json(sys::getpid(), probes, trace),
        };
        self.emit(&text);
    }
}

/// One probe as JSON: the fields of the summary, of `list` and of `add` answers.
pub fn probe_json(p: &ProbeInfo) -> serde_json::Value {
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
        v["error"] = json!(e);
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

/// A duration for people: ns, us, ms or s.
fn human_ns(ns: u64) -> String {
    match ns {
        n if n < 10_000 => format!("{n}ns"),
        n if n < 10_000_000 => format!("{:.1}us", n as f64 / 1e3),
        n if n < 10_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.1}s", n as f64 / 1e9),
    }
}

/// A return probe's durations, as bpftrace's `hist()` and BCC's funclatency print them.
fn latency_text(p: &ProbeInfo, out: &mut String) {
    let Some(l) = &p.latency else { return };
    *out += &format!(
        "\n  {} ({}): calls {}, total {}, mean {}, min {}, max {}, p50 {}, p99 {}, missed {}\n",
        p.spec,
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
        let bar = "@".repeat(((n * 40).div_ceil(widest)) as usize);
        *out += &format!("  [{:>10}, {:>10}] {n:>10} |{bar:<40}|\n", human_ns(lo), human_ns(hi));
    }
}

pub fn summary_json(pid: i32, probes: &[ProbeInfo], trace: Option<(u64, u64)>) -> String {
    let list: Vec<_> = probes.iter().map(probe_json).collect();
    let mut v = json!({"type": "summary", "pid": pid, "probes": list});
    if let Some((events, lost)) = trace {
        v["events"] = json!(events);
        v["lost"] = json!(lost);
    }
    format!("{v}\n")
}

pub fn summary_text(pid: i32, probes: &[ProbeInfo], trace: Option<(u64, u64)>) -> String {
    let mut out = format!("libuprobe: pid {pid}: {} probe(s)\n", probes.len());
    let spec_w = probes.iter().map(|p| p.spec.len()).max().unwrap_or(4).max(4);
    let sym_w = probes.iter().map(|p| p.symbol.len()).max().unwrap_or(6).max(6);
    out += &format!(
        "{:>5}  {:>12}  {:<7}  {:<spec_w$}  {:<sym_w$}  WHERE\n",
        "ID", "HITS", "STATE", "SPEC", "SYMBOL"
    );
    for p in probes {
        let place = match (p.state, p.offset) {
            (ProbeState::Failed, _) => p.error.clone().unwrap_or_default(),
            (ProbeState::Pending, _) => format!("{} (not loaded)", p.object),
            (_, Some(off)) => format!("{}+{off:#x}", p.object),
            (_, None) => p.object.clone(),
        };
        out += &format!(
            "{:>5}  {:>12}  {:<7}  {:<spec_w$}  {:<sym_w$}  {place}\n",
            p.id,
            p.hits,
            p.state.as_str(),
            p.spec,
            p.symbol
        );
    }
    for p in probes.iter().filter(|p| p.ret) {
        latency_text(p, &mut out);
    }
    if let Some((events, lost)) = trace {
        out += &format!("libuprobe: {events} events traced, {lost} lost\n");
    }
    if !probes.is_empty() && probes.iter().all(|p| p.state == ProbeState::Pending) {
        out += "libuprobe: no object named by the specs was ever loaded\n";
    }
    out
}
