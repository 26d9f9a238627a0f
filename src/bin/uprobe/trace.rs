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

/// The events connection: the stream, and the requests this session makes on it (their answers
/// come in the stream, after the events queued before them).
struct Session {
    r: BufReader<std::os::unix::net::UnixStream>,
    json: bool,
    /// Events printed, and the events the process said were lost.
    events: u64,
    lost: u64,
}

impl Session {
    /// One line (Ok(None): nothing came within the read timeout).
    fn line(&mut self) -> Result<Option<String>, String> {
        let mut line = String::new();
        loop {
            if line.len() > MAX_EVENT_LINE {
                return Err(format!("the process sent a line longer than {MAX_EVENT_LINE} bytes"));
            }
            match self.r.read_line(&mut line) {
                Ok(0) => return Err("the process closed the connection (it exited?)".into()),
                Ok(_) if line.ends_with('\n') => return Ok(Some(line)),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if line.is_empty() {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// An answer line (`{"ok":...}`) is not an event.
    fn answer_of(line: &str) -> Option<Value> {
        line.starts_with("{\"ok\":").then(|| serde_json::from_str(line).ok()).flatten()
    }

    /// Print an event line (or count a loss the process said); true if it was one.
    fn event(&mut self, out: &mut impl Write, line: &str) -> bool {
        if let Some(n) = lost_count(line) {
            self.lost += n;
        } else {
            self.events += 1;
        }
        out.write_all(line.as_bytes()).is_ok()
    }

    /// Send a request, print the events that come before its answer, and return the answer.
    fn ask(&mut self, out: &mut impl Write, request: &str) -> Result<Value, String> {
        send_all(self.r.get_ref(), format!("{request}\n").as_bytes()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.line()? {
                Some(l) => match Self::answer_of(&l) {
                    Some(a) => return Ok(a),
                    None => {
                        self.event(out, &l);
                    }
                },
                None if Instant::now() > deadline => {
                    return Err(format!("no answer to `{request}` in two minutes"))
                }
                None => {}
            }
        }
    }
}

/// The count of a `LOST N events: ...` line, or of a `{"type":"lost","count":N}` one.
fn lost_count(line: &str) -> Option<u64> {
    if let Some(rest) = line.strip_prefix("LOST ") {
        return rest.split_whitespace().next()?.parse().ok();
    }
    if line.starts_with("{\"type\":\"lost\"") {
        let v: Value = serde_json::from_str(line).ok()?;
        return v["count"].as_u64();
    }
    None
}

/// Run the trace session; Ok(exit code). The probes are added on the events connection itself
/// (`events FORMAT mine`), so that the stream carries exactly their events, from their first hit;
/// at the end they are removed, the rings flushed into the stream, and the summary says how many
/// events came and how many the process lost.
pub fn trace(args: TraceArgs) -> Result<u8, String> {
    let stream = args.socket.connect(Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    let mut s = Session { r: BufReader::new(stream), json: args.json, events: 0, lost: 0 };
    let mut out = std::io::stdout().lock();
    let format = if args.json { "json" } else { "text" };
    let subscribed = s.ask(&mut out, &format!("events {format} mine"))?;
    if subscribed["ok"] != true {
        return Err(super::str_of(&subscribed["error"]));
    }
    let added = s.ask(&mut out, &format!("add {}", args.specs.join(";")))?;
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
    let streamed = stream_events(&mut s, &mut out, args.duration);
    if let Err(e) = &streamed {
        if !e.contains("closed") {
            return Err(e.clone());
        }
        let _ = out.flush();
        let _ = writeln!(
            out,
            "uprobe: the process exited; its last counts are gone with it ({e}); {} events, {} lost",
            s.events, s.lost
        );
        return Ok(0);
    }
    // The counts, then the probes go (the process is as it was), then every event recorded
    // before that into the stream.
    let list = s.ask(&mut out, "list")?;
    for id in &ids {
        let _ = s.ask(&mut out, &format!("remove {id}"));
    }
    let _ = s.ask(&mut out, "flush");
    let mine: Vec<Value> = list["probes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["id"].as_u64().is_some_and(|i| ids.contains(&i)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let (events, lost) = (s.events, s.lost);
    let _ = summary(&mut out, &mine, s.json, events, lost);
    Ok(0)
}

/// Print the events until asked to stop, the duration is over, or the process goes away.
fn stream_events(
    s: &mut Session,
    out: &mut impl Write,
    duration: Option<Duration>,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if STOP.load(Ordering::SeqCst) || duration.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
        match s.line()? {
            Some(l) => {
                if !s.event(out, &l) {
                    return Ok(()); // the reader went away
                }
            }
            None => {
                let _ = out.flush();
            }
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

/// The trace's probes, as the summary prints them (text), or as a summary line (JSON), with the
/// events this trace printed and the events the process said it lost.
fn summary(
    out: &mut impl Write,
    probes: &[Value],
    json: bool,
    events: u64,
    lost: u64,
) -> std::io::Result<()> {
    if json {
        let line = serde_json::json!({"type": "summary", "probes": probes, "events": events, "lost": lost});
        return writeln!(out, "{line}");
    }
    writeln!(out, "uprobe: {events} events, {lost} lost")?;
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
