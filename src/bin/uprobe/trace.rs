//! `uprobe trace -p PID SPEC...`: attach if needed, add the probes, print the events as they come,
//! and at the end (Ctrl-C, `--duration`, or the process's exit) the summary with latency
//! histograms; then remove the probes, which leaves the process with its original bytes.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{send_all, Target};

static STOP: AtomicBool = AtomicBool::new(false);

/// The longest event line believed.
const MAX_EVENT_LINE: usize = 1 << 20;

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Parse `10s`, `500ms`, `2m`, `1h`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) =
        s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 =
        num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub struct TraceArgs<'a> {
    pub socket: &'a Target,
    pub specs: &'a [String],
    pub duration: Option<Duration>,
    pub json: bool,
}

/// Run the trace session; Ok(exit code).
pub fn trace(
    args: TraceArgs,
    request: impl Fn(&Target, &str) -> Result<Value, String>,
) -> Result<u8, String> {
    let added = request(args.socket, &format!("add {}", args.specs.join(";")))?;
    if added["ok"] != true {
        return Err(super::str_of(&added["error"]));
    }
    let ids: Vec<u64> = added["probes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default();
    for e in added["errors"].as_array().into_iter().flatten() {
        eprintln!("uprobe: {}", super::str_of(e));
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as usize);
        libc::signal(libc::SIGTERM, on_stop as *const () as usize);
    }
    let streamed = stream(&args);
    // Whatever ended the stream: the probes go, and the process is as it was.
    let list = request(args.socket, "list");
    for id in &ids {
        let _ = request(args.socket, &format!("remove {id}"));
    }
    let exited = matches!(&streamed, Err(e) if e.contains("closed"));
    let mut out = std::io::stdout().lock();
    match list {
        Ok(list) => {
            let mine: Vec<Value> = list["probes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|p| p["id"].as_u64().is_some_and(|i| ids.contains(&i)))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let _ = summary(&mut out, &mine, args.json);
        }
        Err(e) if exited => {
            let _ =
                writeln!(out, "uprobe: the process exited; its last counts are gone with it ({e})");
        }
        Err(e) => return Err(e),
    }
    Ok(0)
}

/// Print the events until asked to stop, the duration is over, or the process goes away.
fn stream(args: &TraceArgs) -> Result<(), String> {
    let s = args.socket.connect(Duration::from_secs(10))?;
    let format = if args.json { "json" } else { "text" };
    send_all(&s, format!("events {format}\n").as_bytes()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut first = String::new();
    loop {
        if first.len() > MAX_EVENT_LINE {
            return Err(format!("the process sent an answer longer than {MAX_EVENT_LINE} bytes"));
        }
        match r.read_line(&mut first) {
            Ok(0) => return Err("the process closed the connection".into()),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    let answer: Value = serde_json::from_str(&first).map_err(|e| format!("{first:?}: {e}"))?;
    if answer["ok"] != true {
        return Err(super::str_of(&answer["error"]));
    }
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        if STOP.load(Ordering::SeqCst) || args.duration.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
        if line.len() > MAX_EVENT_LINE {
            return Err(format!(
                "the process sent an event line longer than {MAX_EVENT_LINE} bytes"
            ));
        }
        match r.read_line(&mut line) {
            Ok(0) => return Err("the process closed the connection (it exited?)".into()),
            Ok(_) => {
                if line.ends_with('\n') {
                    if out.write_all(line.as_bytes()).is_err() {
                        return Ok(()); // the reader went away
                    }
                    line.clear();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                let _ = out.flush();
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn human_ns(ns: u64) -> String {
    match ns {
        n if n < 10_000 => format!("{n}ns"),
        n if n < 10_000_000 => format!("{:.1}us", n as f64 / 1e3),
        n if n < 10_000_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        n => format!("{:.1}s", n as f64 / 1e9),
    }
}

/// The trace's probes, as the summary prints them (text), or as a summary line (JSON).
fn summary(out: &mut impl Write, probes: &[Value], json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::json!({"type": "summary", "probes": probes}));
    }
    let s = super::str_of;
    let spec_w = probes.iter().map(|p| s(&p["spec"]).len()).max().unwrap_or(4).max(4);
    writeln!(
        out,
        "{:>5}  {:>12}  {:<7}  {:<4}  {:<spec_w$}  SYMBOL",
        "ID", "HITS", "STATE", "PATH", "SPEC"
    )?;
    for p in probes {
        writeln!(
            out,
            "{:>5}  {:>12}  {:<7}  {:<4}  {:<spec_w$}  {}",
            s(&p["id"]),
            s(&p["hits"]),
            s(&p["state"]),
            s(&p["path"]),
            s(&p["spec"]),
            s(&p["symbol"])
        )?;
    }
    for p in probes {
        let l = &p["latency"];
        let Some(calls) = l["calls"].as_u64() else { continue };
        let n = |k: &str| l[k].as_u64().unwrap_or(0);
        writeln!(
            out,
            "\n  {} ({}): calls {calls}, total {}, mean {}, min {}, max {}, p50 {}, p99 {}, missed {}",
            s(&p["spec"]),
            s(&p["symbol"]),
            human_ns(n("total_ns")),
            human_ns(n("mean_ns")),
            human_ns(n("min_ns")),
            human_ns(n("max_ns")),
            human_ns(n("p50_ns")),
            human_ns(n("p99_ns")),
            s(&p["missed"])
        )?;
        let hist = l["histogram"].as_array().cloned().unwrap_or_default();
        let widest = hist.iter().filter_map(|h| h["count"].as_u64()).max().unwrap_or(1).max(1);
        for h in hist {
            let c = h["count"].as_u64().unwrap_or(0);
            let bar = "@".repeat(((c as u128 * 40).div_ceil(widest as u128)) as usize);
            writeln!(
                out,
                "  [{:>10}, {:>10}] {c:>10} |{bar:<40}|",
                human_ns(h["low_ns"].as_u64().unwrap_or(0)),
                human_ns(h["high_ns"].as_u64().unwrap_or(0))
            )?;
        }
    }
    Ok(())
}
