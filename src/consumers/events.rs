//! The event stream (`UPROBES_TRACE=1`): every probe hit is an event, with the six argument
//! registers and the typed arguments its spec asked for, written to the report one per line.
//!
//! Hits record events into per-thread rings from a preallocated pool (`sigsafe::events`): no
//! allocation, no lock, and a full ring drops the event and counts it as `lost`. A runtime thread
//! drains the rings every millisecond while events flow (every 10 ms when idle), in order for each
//! thread, and frees the ring of a thread that has exited once it is empty. At exit (and before an
//! exec) the rest is drained before the summary, so every event of a process that exits normally,
//! and of its threads that exited before, reaches the output.

use crate::runtime::hash::{FastMap, FastSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::registry;
use crate::runtime::config::TraceFormat as Format;
use crate::runtime::{lock::Mutex, threads};
use crate::sigsafe::consumer::ArgType;
use crate::sigsafe::events::{self as rec, Event, Ring, RINGS, RING_EVENTS, STR_MAX};
use crate::sigsafe::sys;

static EVENTS_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Lost events of rings already freed (their thread exited).
static LOST_FREED: AtomicU64 = AtomicU64::new(0);
/// The drain thread runs (or should run again in a forked child).
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Held while draining: one consumer at a time (the drain thread, or a flush).
static DRAIN: Mutex<Meta> =
    Mutex::new(Meta { by_probe: None, chrome: None, lost: Vec::new(), generation: u64::MAX });

/// Where drained events go.
pub type Sink = fn(&str);
static SINK: std::sync::OnceLock<(Sink, Format)> = std::sync::OnceLock::new();

/// How a probe's events are shown: (symbol, symbol as a JSON string, argument types, whether it
/// is a return probe).
type ProbeMeta = (String, String, Vec<ArgType>, bool);

/// Probe metadata by id, fetched from the registry on first sight.
struct Meta {
    by_probe: Option<FastMap<u32, ProbeMeta>>,
    chrome: Option<Chrome>,
    /// Every probe's consumer as of registry generation `generation` (kept after the probe is
    /// removed, so that its last losses are still said), and its losses said so far.
    lost: Vec<(u32, std::sync::Arc<crate::sigsafe::consumer::Consumer>, u64)>,
    generation: u64,
}

/// What the Chrome trace writer remembers: the process and threads already named (`ph: "M"`),
/// and each thread's calls of return probes whose return has not been seen yet (their slice is
/// written whole, `ph: "X"`, at the return).
#[derive(Default)]
struct Chrome {
    named_pid: i32,
    named_threads: FastSet<i32>,
    /// By thread: (probe, entry time, the entry's arguments as a JSON object's members).
    open: FastMap<i32, Vec<(u32, u64, String)>>,
}

/// Clients of the control socket that asked for the event stream (`events`), by format (text,
/// JSON), and where their events go (set by `control`).
pub static SUBSCRIBERS: [AtomicU32; 3] = [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)];
static SUBSCRIBER_SINK: std::sync::OnceLock<SubscriberSink> = std::sync::OnceLock::new();
/// Events lost because a subscriber did not read them.
pub static LOST_SLOW_READER: AtomicU64 = AtomicU64::new(0);

/// Where subscribers' events go: the format, the text of the events (whole lines), and a mark for
/// each line.
pub type SubscriberSink = fn(Format, &str, &[Mark]);

/// A line of the subscribers' text: where it ends, the probe it is of ([`ALL_PROBES`] for a line
/// every subscriber gets), and the ring's losses it says (0: it is an event). A subscriber that
/// cannot take the line still learns of those events: as many as the line stood for.
#[derive(Clone, Copy)]
pub struct Mark {
    pub probe: u32,
    pub end: usize,
    pub ring_lost: u64,
}

/// The probe of a line every subscriber gets (a loss).
pub const ALL_PROBES: u32 = u32::MAX;

/// Why events were lost.
#[derive(Clone, Copy)]
pub enum Loss {
    /// A thread's ring was full (or there was none) when it recorded them.
    Ring,
    /// The subscriber did not read them in time.
    Reader,
}

/// The line that says, in the stream itself, that `count` events (of probe `probe`, when known)
/// are missing from it: text `LOST N events[ of probe ID]: WHY`, JSON
/// `{"type":"lost",["probe":ID,]"count":N,"why":"ring"|"reader"}`, or a Chrome trace's global
/// instant event named `lost events`.
pub fn lost_line(format: Format, count: u64, probe: Option<u32>, why: Loss) -> String {
    let (key, text) = match why {
        Loss::Ring => ("ring", "a thread recorded them while its ring was full"),
        Loss::Reader => ("reader", "this connection did not read them in time"),
    };
    let (of, field) = match probe {
        Some(p) => (format!(" of probe {p}"), format!("\"probe\":{p},")),
        None => (String::new(), String::new()),
    };
    match format {
        Format::Text => format!("LOST {count} events{of}: {text}\n"),
        Format::Json => {
            format!("{{\"type\":\"lost\",{field}\"count\":{count},\"why\":\"{key}\"}}\n")
        }
        Format::Chrome => {
            let pid = sys::getpid();
            format!(
                "{{\"name\":\"lost events\",\"cat\":\"uprobe\",\"ph\":\"i\",\"s\":\"g\",\"ts\":{},\"pid\":{pid},\"tid\":{pid},\"args\":{{{field}\"count\":{count},\"why\":\"{key}\"}}}},\n",
                micros(sys::monotonic_ns())
            )
        }
    }
}

/// Events lost in the rings so far (full rings, threads without one, rings of threads gone).
fn ring_losses() -> u64 {
    let mut lost = LOST_FREED.load(Ordering::Relaxed) + rec::LOST_NO_RING.load(Ordering::Relaxed);
    for i in 0..RINGS {
        if let Some(r) = rec::ring(i) {
            lost += r.lost.load(Ordering::Relaxed);
        }
    }
    lost
}

fn format_index(f: Format) -> usize {
    match f {
        Format::Text => 0,
        Format::Json => 1,
        Format::Chrome => 2,
    }
}

/// Where the socket's subscribers get their events.
pub fn set_subscriber_sink(f: SubscriberSink) {
    let _ = SUBSCRIBER_SINK.set(f);
}

/// A client subscribes to the event stream in `format`: recording goes on (if it was off) and the
/// drain thread runs. The caller republishes the probes (their jumps now need the full entry).
pub fn subscribe(format: Format) -> Result<(), String> {
    map_rings()?;
    SUBSCRIBERS[format_index(format)].fetch_add(1, Ordering::AcqRel);
    rec::TRACING.store(true, Ordering::Release);
    if !DRAINING.swap(true, Ordering::AcqRel) {
        if let Err(e) = threads::spawn("uprobe-events", drain_thread) {
            DRAINING.store(false, Ordering::Release);
            return Err(e.to_string());
        }
    }
    Ok(())
}

/// A subscriber left. Returns true when recording stopped (nobody wants events any more): the
/// caller republishes the probes.
pub fn unsubscribe(format: Format) -> bool {
    let _ =
        SUBSCRIBERS[format_index(format)]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    let anyone = SUBSCRIBERS.iter().any(|n| n.load(Ordering::Acquire) > 0);
    if anyone || SINK.get().is_some() {
        return false;
    }
    rec::TRACING.store(false, Ordering::Release);
    true
}

fn map_rings() -> Result<(), String> {
    rec::PID.store(sys::getpid(), Ordering::Relaxed);
    if rec::RING_POOL.load(Ordering::Acquire).is_null() {
        let len = RINGS * std::mem::size_of::<Ring>();
        let pool = sys::mmap_far(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_NORESERVE)
            .map_err(|e| format!("cannot map {} KiB of event rings: {e}", len / 1024))?;
        // Zeroed memory is RINGS free, empty rings.
        rec::RING_POOL.store(pool as *mut Ring, Ordering::Release);
    }
    Ok(())
}

/// Map the rings and turn recording on; events go to `sink`, formatted as `format`, once
/// [`start_drain`] started the thread that writes them.
pub fn enable(sink: Sink, format: Format) -> Result<(), String> {
    let _ = SINK.set((sink, format));
    map_rings()?;
    rec::TRACING.store(true, Ordering::Release);
    Ok(())
}

/// Start the thread that writes the recorded events (after [`enable`]).
pub fn start_drain() -> Result<(), String> {
    if DRAINING.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    threads::spawn("uprobe-events", drain_thread).map_err(|e| e.to_string())
}

fn drain_thread() {
    while !threads::stopping() {
        let n = drain(&mut DRAIN.lock());
        sys::sleep_ns(if n > 0 { 1_000_000 } else { 10_000_000 });
    }
}

/// Drain what is there now (at exit, and before an exec); the drain thread goes on.
pub fn flush() {
    if rec::RING_POOL.load(Ordering::Acquire).is_null() {
        return;
    }
    let mut meta = DRAIN.lock();
    while drain(&mut meta) > 0 {}
    // The image ends: calls still open in a Chrome trace are written as begun and not ended
    // (`ph: "B"`), which the viewers show as running to the end of the trace.
    let meta = &mut *meta;
    if let (Some((sink, Format::Chrome)), Some(chrome)) = (SINK.get().copied(), &mut meta.chrome) {
        let pid = sys::getpid();
        let mut text = String::new();
        for (tid, calls) in chrome.open.drain() {
            for (probe, ts, args) in calls {
                let name = meta
                    .by_probe
                    .as_ref()
                    .and_then(|m| m.get(&probe))
                    .map_or("\"?\"", |m| m.1.as_str());
                use std::fmt::Write;
                let _ = writeln!(
                    text,
                    "{{\"name\":{name},\"cat\":\"uprobe\",\"ph\":\"B\",\"ts\":{},\"pid\":{pid},\"tid\":{tid},\"args\":{{{args}}}}},",
                    micros(ts)
                );
            }
        }
        if !text.is_empty() {
            sink(&text);
        }
    }
}

/// A Chrome trace timestamp: microseconds, with the nanoseconds as a fraction.
fn micros(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

/// (events written, events lost) so far; None when tracing is off.
pub fn totals() -> Option<(u64, u64)> {
    if rec::RING_POOL.load(Ordering::Acquire).is_null() {
        return None;
    }
    let lost = ring_losses() + LOST_SLOW_READER.load(Ordering::Relaxed);
    Some((EVENTS_WRITTEN.load(Ordering::Relaxed), lost))
}

/// Write every event in the rings; free the rings of threads that are gone. Returns how many.
fn drain(meta: &mut Meta) -> usize {
    let report = SINK.get().copied();
    let wanted = |f: Format| SUBSCRIBERS[format_index(f)].load(Ordering::Acquire) > 0;
    let live = [Format::Text, Format::Json, Format::Chrome].map(|f| wanted(f).then_some(f));
    if report.is_none() && live.iter().all(Option::is_none) {
        return 0;
    }
    let pid = sys::getpid();
    let mut text = String::new();
    let mut live_text = [String::new(), String::new(), String::new()];
    // Each subscriber line's mark (subscribers may take only some probes).
    let mut live_marks: [Vec<Mark>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut n = 0;
    for i in 0..RINGS {
        let Some(r) = rec::ring(i) else { break };
        let owner = r.owner.load(Ordering::Acquire);
        if owner == 0 {
            continue;
        }
        let head = r.head.load(Ordering::Acquire);
        let mut tail = r.tail.load(Ordering::Relaxed);
        while tail < head {
            // SAFETY: slots below `head` were published by the producer and are not rewritten
            // until `tail` moves past them.
            let e = unsafe { *r.events[(tail % RING_EVENTS as u64) as usize].get() };
            tail += 1;
            if let Some((_, format)) = report {
                format_event(meta, format, pid, &e, &mut text);
            }
            for ((f, out), marks) in
                live.iter().zip(live_text.iter_mut()).zip(live_marks.iter_mut())
            {
                if let Some(f) = f {
                    format_event(meta, *f, pid, &e, out);
                    marks.push(Mark { probe: e.probe, end: out.len(), ring_lost: 0 });
                }
            }
            n += 1;
        }
        r.tail.store(tail, Ordering::Release);
        if !sys::thread_alive(pid, owner) && r.head.load(Ordering::Acquire) == tail {
            LOST_FREED.fetch_add(r.lost.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            // A thread that died while recording left a slot reserved and never written: the
            // next owner starts after it.
            let at = r.reserved.load(Ordering::Relaxed);
            LOST_FREED.fetch_add(at.wrapping_sub(tail), Ordering::Relaxed);
            r.head.store(at, Ordering::Relaxed);
            r.tail.store(at, Ordering::Release);
            r.owner.store(0, Ordering::Release);
        }
    }
    // Each probe's events the rings dropped since the last drain are said where its events go.
    refresh_consumers(meta);
    for (id, c, said) in meta.lost.iter_mut() {
        let lost = c.lost.load(Ordering::Relaxed);
        if lost <= *said {
            continue;
        }
        let n = lost - *said;
        *said = lost;
        if let Some((_, format)) = report {
            text.push_str(&lost_line(format, n, Some(*id), Loss::Ring));
        }
        for ((f, out), marks) in live.iter().zip(live_text.iter_mut()).zip(live_marks.iter_mut()) {
            if let Some(f) = f {
                out.push_str(&lost_line(*f, n, Some(*id), Loss::Ring));
                marks.push(Mark { probe: *id, end: out.len(), ring_lost: n });
            }
        }
    }
    if let (Some((sink, _)), false) = (report, text.is_empty()) {
        sink(&text);
    }
    if let Some(push) = SUBSCRIBER_SINK.get() {
        for ((f, out), marks) in live.iter().zip(&live_text).zip(&live_marks) {
            if let (Some(f), false) = (f, out.is_empty()) {
                push(*f, out, marks);
            }
        }
    }
    EVENTS_WRITTEN.fetch_add(n as u64, Ordering::Relaxed);
    n
}

/// The consumers whose losses the drain says: refreshed when the registry changed (and it is not
/// busy: else the next drain does it); removed probes stay.
fn refresh_consumers(meta: &mut Meta) {
    let generation = registry::GENERATION.load(Ordering::Acquire);
    if generation == meta.generation {
        return;
    }
    let Some(now) = registry::try_with_registry(|r| r.consumers()) else { return };
    for (id, c) in now {
        match meta.lost.iter_mut().find(|(i, _, _)| *i == id) {
            Some(entry) => entry.1 = c,
            None => meta.lost.push((id, c, 0)),
        }
    }
    meta.generation = generation;
}

fn format_event(meta: &mut Meta, format: Format, pid: i32, e: &Event, out: &mut String) {
    use std::fmt::Write;
    let by_probe = meta.by_probe.get_or_insert_with(FastMap::default);
    let (symbol, quoted, types, ret) = &*by_probe.entry(e.probe).or_insert_with(|| {
        let m = registry::with_registry(|r| r.event_meta(e.probe)).flatten();
        let (symbol, types, ret) =
            m.unwrap_or_else(|| (format!("probe{}", e.probe), Vec::new(), false));
        let quoted = Value::String(symbol.clone()).to_string();
        (symbol, quoted, types, ret)
    });
    if format == Format::Chrome {
        let chrome = meta.chrome.get_or_insert_with(Chrome::default);
        chrome_event(chrome, (quoted, types, *ret), pid, e, out);
        return;
    }
    // Formatted by hand: the drain thread must keep up with every thread of the program.
    if e.kind == rec::RETURN {
        let (retval, duration) = (e.regs[0], e.regs[1]);
        let _ = match format {
            Format::Json => write!(
                out,
                "{{\"type\":\"return\",\"probe\":{},\"symbol\":{quoted},\"pid\":{pid},\"tid\":{},\"ts_ns\":{},\"retval\":{retval},\"duration_ns\":{duration}}}",
                e.probe, e.tid, e.ts_ns
            ),
            _ => write!(
                out,
                "{}.{:09} {pid}/{} {symbol} returned {retval:#x} ({retval}) after {duration}ns",
                e.ts_ns / 1_000_000_000,
                e.ts_ns % 1_000_000_000,
                e.tid
            ),
        };
        out.push('\n');
        return;
    }
    let _ = match format {
        Format::Json => {
            let r = &e.regs;
            let _ = write!(
                out,
                "{{\"type\":\"entry\",\"probe\":{},\"symbol\":{quoted},\"pid\":{pid},\"tid\":{},\"ts_ns\":{},\"args\":[{},{},{},{},{},{}]",
                e.probe, e.tid, e.ts_ns, r[0], r[1], r[2], r[3], r[4], r[5]
            );
            if !types.is_empty() {
                let _ = write!(out, ",\"values\":{}", Value::Array(typed_values(types, e)));
            }
            write!(out, "}}")
        }
        _ => {
            let _ = write!(
                out,
                "{}.{:09} {pid}/{} {symbol}(",
                e.ts_ns / 1_000_000_000,
                e.ts_ns % 1_000_000_000,
                e.tid
            );
            if types.is_empty() {
                let r = &e.regs;
                let _ = write!(
                    out,
                    "{:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}",
                    r[0], r[1], r[2], r[3], r[4], r[5]
                );
            } else {
                let shown: Vec<String> =
                    typed_values(types, e).iter().map(|v| v.to_string()).collect();
                out.push_str(&shown.join(", "));
            }
            write!(out, ")")
        }
    };
    out.push('\n');
}

/// The name of a thread of this process, for the trace's metadata.
fn thread_name(tid: i32) -> String {
    crate::runtime::fs::read_string(&format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| format!("thread {tid}"))
}

/// One event in Chrome's Trace Event Format: every object ends with `,` and a newline (the
/// array is left open; see README). The process and each thread are named at first sight; an
/// entry probe's hit is an instant event (`ph: "i"`) with its arguments; a return probe's call
/// is one complete slice (`ph: "X"`) written at its return, with the entry's arguments and the
/// return value. Calls nest as the slices' times do, on the thread's track.
fn chrome_event(
    chrome: &mut Chrome,
    (name, types, ret): (&str, &[ArgType], bool),
    pid: i32,
    e: &Event,
    out: &mut String,
) {
    use std::fmt::Write;
    if chrome.named_pid != pid {
        // A forked child (or a new image after exec) names itself; its threads are its own.
        chrome.named_pid = pid;
        chrome.named_threads.clear();
        chrome.open.clear();
        let comm = crate::runtime::fs::read_string("/proc/self/comm").unwrap_or_default();
        let comm = Value::String(comm.trim_end().to_string()).to_string();
        let _ = writeln!(
            out,
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":{pid},\"args\":{{\"name\":{comm}}}}},"
        );
    }
    if chrome.named_threads.insert(e.tid) {
        let t = Value::String(thread_name(e.tid)).to_string();
        let _ = writeln!(
            out,
            "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":{},\"args\":{{\"name\":{t}}}}},",
            e.tid
        );
    }
    let tid = e.tid;
    if e.kind == rec::RETURN {
        let (retval, duration) = (e.regs[0], e.regs[1]);
        let calls = chrome.open.entry(tid).or_default();
        // The entry of this call: the innermost open one of this probe (returns come innermost
        // first; a call whose entry event was lost has none).
        let entry = calls.iter().rposition(|c| c.0 == e.probe).map(|i| {
            let found = calls.remove(i);
            // Calls opened after it never returned (longjmp): they are dropped with it.
            calls.truncate(i);
            found
        });
        let (start, args) = match entry {
            Some((_, ts, args)) => (ts, args),
            None => (e.ts_ns.saturating_sub(duration), String::new()),
        };
        let sep = if args.is_empty() { "" } else { "," };
        let _ = writeln!(
            out,
            "{{\"name\":{name},\"cat\":\"uprobe\",\"ph\":\"X\",\"ts\":{},\"dur\":{},\"pid\":{pid},\"tid\":{tid},\"args\":{{{args}{sep}\"retval\":{retval}}}}},",
            micros(start),
            micros(e.ts_ns.saturating_sub(start))
        );
        return;
    }
    let mut args = String::new();
    if types.is_empty() {
        let r = &e.regs;
        let _ = write!(
            args,
            "\"rdi\":\"{:#x}\",\"rsi\":\"{:#x}\",\"rdx\":\"{:#x}\",\"rcx\":\"{:#x}\",\"r8\":\"{:#x}\",\"r9\":\"{:#x}\"",
            r[0], r[1], r[2], r[3], r[4], r[5]
        );
    } else {
        for (i, v) in typed_values(types, e).iter().enumerate() {
            let _ = write!(args, "{}\"arg{i}\":{v}", if i > 0 { "," } else { "" });
        }
    }
    if ret {
        chrome.open.entry(tid).or_default().push((e.probe, e.ts_ns, args));
        return;
    }
    let _ = writeln!(
        out,
        "{{\"name\":{name},\"cat\":\"uprobe\",\"ph\":\"i\",\"s\":\"t\",\"ts\":{},\"pid\":{pid},\"tid\":{tid},\"args\":{{{args}}}}},",
        micros(e.ts_ns)
    );
}

/// The typed arguments of an event, as JSON values.
fn typed_values(types: &[ArgType], e: &Event) -> Vec<Value> {
    let mut strings = 0;
    types
        .iter()
        .zip(e.regs)
        .map(|(t, r)| match t {
            ArgType::Str => {
                let i = strings;
                strings += 1;
                if i >= 2 {
                    return json!(format!("{r:#x}"));
                }
                match e.str_len[i] {
                    n if n < 0 => json!("<bad>"),
                    n => {
                        let bytes = &e.strs[i][..n as usize];
                        match bytes.iter().position(|&b| b == 0) {
                            Some(end) => json!(String::from_utf8_lossy(&bytes[..end])),
                            None if bytes.len() == STR_MAX => {
                                json!(format!("{}...", String::from_utf8_lossy(bytes)))
                            }
                            None => json!(String::from_utf8_lossy(bytes)),
                        }
                    }
                }
            }
            ArgType::I32 => json!(r as i32),
            ArgType::U32 => json!(r as u32),
            ArgType::I64 => json!(r as i64),
            ArgType::U64 => json!(r),
            ArgType::Hex => json!(format!("{r:#x}")),
        })
        .collect()
}

/// Fork: the drain lock is held across it (see runtime::fork).
pub fn lock_for_fork() {
    DRAIN.lock_raw();
}

pub fn unlock_in_parent() {
    // SAFETY: taken by lock_for_fork on this thread.
    unsafe { DRAIN.unlock_raw() };
}

/// In the child: the parent's events are the parent's to write; start with every ring free and
/// empty (a drain thread of its own starts in [`start_in_child`]).
pub fn unlock_in_child() {
    // The socket's subscribers are the parent's clients.
    for n in &SUBSCRIBERS {
        n.store(0, Ordering::Relaxed);
    }
    if SINK.get().is_none() {
        rec::TRACING.store(false, Ordering::Relaxed);
        DRAINING.store(false, Ordering::Relaxed);
    }
    for i in 0..RINGS {
        let Some(r) = rec::ring(i) else { break };
        r.owner.store(0, Ordering::Relaxed);
        // Indices go on from where they were: a slot's `ready` mark names its index, so the
        // parent's marks can never pass for the child's events.
        let at = r.reserved.load(Ordering::Relaxed);
        r.head.store(at, Ordering::Relaxed);
        r.tail.store(at, Ordering::Relaxed);
        r.lost.store(0, Ordering::Relaxed);
    }
    EVENTS_WRITTEN.store(0, Ordering::Relaxed);
    LOST_FREED.store(0, Ordering::Relaxed);
    rec::LOST_NO_RING.store(0, Ordering::Relaxed);
    rec::PID.store(sys::getpid(), Ordering::Relaxed);
    // SAFETY: taken by lock_for_fork on the forking thread, which is this one; no other thread.
    unsafe {
        let meta = DRAIN.get_locked();
        meta.lost.clear();
        meta.generation = u64::MAX;
        DRAIN.unlock_raw();
    }
}

/// In a forked child, once its locks are its own: a drain thread of its own.
pub fn start_in_child() -> Result<(), threads::SpawnError> {
    if DRAINING.load(Ordering::Acquire) && !threads::retired() {
        threads::spawn("uprobe-events", drain_thread)?;
    }
    Ok(())
}
