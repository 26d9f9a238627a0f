//! The event stream (`UPROBES_TRACE=1`): every probe hit is an event, with the six argument
//! registers and the typed arguments its spec asked for, written to the report one per line.
//!
//! The trap path records events into per-thread rings from a preallocated pool (`trap::Ring`,
//! `trap::record_entry`): no allocation, no lock, and a full ring drops the event and counts it as
//! `lost`. A runtime thread drains the rings every millisecond while events flow (every 10 ms when
//! idle), in order for each thread, and frees the ring of a thread that has exited once it is empty.
//! At exit the rest is drained before the summary, so every event of a process that exits
//! normally, and of its threads that exited before, reaches the output.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

use crate::report::{Format, Output};
use crate::spec::ArgType;
use crate::trap::{self, Event, Ring, RINGS, RING_EVENTS, STR_MAX};
use crate::{probes, sys, InRuntime};

static EVENTS_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Lost events of rings already freed (their thread exited).
static LOST_FREED: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

/// Held while draining: one consumer at a time (the drain thread, or the exit flush).
static DRAIN: Mutex<Meta> = Mutex::new(Meta { by_probe: None });

/// How a probe's events are shown: (symbol, symbol as a JSON string, argument types).
type ProbeMeta = (String, String, Vec<ArgType>);

/// Probe metadata by id, fetched from the registry on first sight.
struct Meta {
    by_probe: Option<HashMap<u32, ProbeMeta>>,
}

/// Map the rings and start the drain thread.
pub fn enable(output: &'static Output) -> Result<(), String> {
    sys::find_vdso_clock();
    if trap::RING_POOL.load(Ordering::Acquire).is_null() {
        let len = RINGS * std::mem::size_of::<Ring>();
        let pool = sys::mmap_anon(0, len, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(|e| format!("cannot map {} KiB of event rings: {e}", len / 1024))?;
        // Zeroed memory is RINGS free, empty rings.
        trap::RING_POOL.store(pool as *mut Ring, Ordering::Release);
    }
    start_drain_thread(output)?;
    trap::TRACING.store(true, Ordering::Release);
    Ok(())
}

fn start_drain_thread(output: &'static Output) -> Result<(), String> {
    STOP.store(false, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("uprobe-events".into())
        .spawn(move || {
            let _rt = InRuntime::enter();
            let keep = [libc::SIGTRAP, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];
            let mask = keep.iter().fold(!0u64, |m, &s| m & !sys::sigbit(s));
            let _ = sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&mask), None);
            while !STOP.load(Ordering::Acquire) {
                let n = {
                    let mut meta = DRAIN.lock().unwrap_or_else(|p| p.into_inner());
                    drain(&mut meta, output)
                };
                std::thread::sleep(Duration::from_millis(if n > 0 { 1 } else { 10 }));
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the event thread: {e}"))
}

/// Drain what is left and stop the drain thread (at exit, and before exec).
pub fn flush(output: &Output) {
    if trap::RING_POOL.load(Ordering::Acquire).is_null() {
        return;
    }
    STOP.store(true, Ordering::SeqCst);
    let mut meta = DRAIN.lock().unwrap_or_else(|p| p.into_inner());
    while drain(&mut meta, output) > 0 {}
}

/// (events written, events lost) so far; None when tracing is off.
pub fn totals() -> Option<(u64, u64)> {
    let pool = trap::RING_POOL.load(Ordering::Acquire);
    if pool.is_null() {
        return None;
    }
    let mut lost = LOST_FREED.load(Ordering::Relaxed) + trap::LOST_NO_RING.load(Ordering::Relaxed);
    for i in 0..RINGS {
        // SAFETY: the pool holds RINGS rings for the life of the process.
        lost += unsafe { &*pool.add(i) }.lost.load(Ordering::Relaxed);
    }
    Some((EVENTS_WRITTEN.load(Ordering::Relaxed), lost))
}

/// Write every event in the rings; free the rings of threads that are gone. Returns how many.
fn drain(meta: &mut Meta, output: &Output) -> usize {
    let pool = trap::RING_POOL.load(Ordering::Acquire);
    let pid = sys::getpid();
    let mut text = String::new();
    let mut n = 0;
    for i in 0..RINGS {
        // SAFETY: the pool holds RINGS rings for the life of the process.
        let r = unsafe { &*pool.add(i) };
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
            format_event(meta, output.format, pid, &e, &mut text);
            n += 1;
        }
        r.tail.store(tail, Ordering::Release);
        if !sys::thread_alive(pid, owner) && r.head.load(Ordering::Acquire) == tail {
            LOST_FREED.fetch_add(r.lost.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            r.owner.store(0, Ordering::Release);
        }
    }
    if !text.is_empty() {
        output.emit(&text);
        EVENTS_WRITTEN.fetch_add(n as u64, Ordering::Relaxed);
    }
    n
}

fn format_event(meta: &mut Meta, format: Format, pid: i32, e: &Event, out: &mut String) {
    use std::fmt::Write;
    let by_probe = meta.by_probe.get_or_insert_with(HashMap::new);
    let (symbol, quoted, types) = &*by_probe.entry(e.probe).or_insert_with(|| {
        let m = probes::with_registry(|r| r.event_meta(e.probe)).flatten();
        let (symbol, types) = m.unwrap_or_else(|| (format!("probe{}", e.probe), Vec::new()));
        let quoted = Value::String(symbol.clone()).to_string();
        (symbol, quoted, types)
    });
    // Formatted by hand: the drain thread must keep up with every thread of the program.
    if e.kind == 1 {
        let (retval, duration) = (e.regs[0], e.regs[1]);
        let _ = match format {
            Format::Json => write!(
                out,
                "{{\"type\":\"return\",\"probe\":{},\"symbol\":{quoted},\"pid\":{pid},\"tid\":{},\"ts_ns\":{},\"retval\":{retval},\"duration_ns\":{duration}}}",
                e.probe, e.tid, e.ts_ns
            ),
            Format::Text => write!(
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
        Format::Text => {
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

static mut HELD_ACROSS_FORK: Option<MutexGuard<'static, Meta>> = None;

/// Hold the drain lock across fork, so that the child never inherits it held.
pub fn lock_for_fork() {
    let guard = DRAIN.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: touched only by the forking thread between prepare and parent/child.
    unsafe { *core::ptr::addr_of_mut!(HELD_ACROSS_FORK) = Some(guard) };
}

/// In the parent: let go. In the child: the parent's events are the parent's to write; start
/// with every ring free and empty, and a drain thread of our own.
pub fn unlock_after_fork(child: bool) {
    // SAFETY: as in lock_for_fork.
    let guard = unsafe { (*core::ptr::addr_of_mut!(HELD_ACROSS_FORK)).take() };
    let pool = trap::RING_POOL.load(Ordering::Acquire);
    if child && !pool.is_null() {
        for i in 0..RINGS {
            // SAFETY: the pool holds RINGS rings; this is the only thread of the child.
            let r = unsafe { &*pool.add(i) };
            r.owner.store(0, Ordering::Relaxed);
            r.head.store(0, Ordering::Relaxed);
            r.tail.store(0, Ordering::Relaxed);
            r.lost.store(0, Ordering::Relaxed);
        }
        let ts = sys::thread_state();
        ts.ring.store(0, Ordering::Relaxed);
        ts.tid.store(0, Ordering::Relaxed);
        EVENTS_WRITTEN.store(0, Ordering::Relaxed);
        LOST_FREED.store(0, Ordering::Relaxed);
        trap::LOST_NO_RING.store(0, Ordering::Relaxed);
    }
    drop(guard);
    if child && !pool.is_null() {
        if let Some(output) = crate::output() {
            let _ = start_drain_thread(output);
        }
    }
}
