//! The event stream as a Chrome trace (`--trace-format chrome`, `UPROBES_TRACE_FORMAT=chrome`):
//! the file Perfetto and chrome://tracing open, parsed here and checked slice by slice.

mod common;
use common::*;

use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

/// The trace file as JSON: the array is left open, each event followed by `,` (the format allows
/// both), so a strict parser gets `{}]` appended; the sentinel is dropped again. (Lines of spaces
/// fill a page up where the next event would have crossed into the next one.)
fn parse_trace(text: &str) -> Vec<Value> {
    assert!(text.starts_with("[\n"), "the trace opens an array: {}", short(&text));
    let body = text.trim_end_matches([' ', '\n']);
    assert!(body.ends_with("},") || body == "[", "{}", short(&text));
    let mut events: Vec<Value> = serde_json::from_str(&format!("{text}{{}}]"))
        .unwrap_or_else(|e| panic!("not a JSON array once closed: {e}"));
    events.pop();
    events
}

/// `12.345` (microseconds with a nanosecond fraction) in nanoseconds, exactly.
fn ns(v: &Value) -> u64 {
    let s = v.as_f64().map(|_| v.to_string()).unwrap();
    let (us, frac) = s.split_once('.').unwrap_or((&s, "0"));
    assert!(frac.len() <= 3, "{s}");
    us.parse::<u64>().unwrap() * 1000 + format!("{frac:0<3}").parse::<u64>().unwrap()
}

fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

/// Slices of one thread nest: sorted by start (the longer first), each either lies inside the
/// innermost open one or starts after it ended. Returns the deepest nesting.
fn assert_nested(slices: &[(u64, u64)]) -> usize {
    let mut sorted = slices.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut open: Vec<u64> = Vec::new(); // end times
    let mut deepest = 0;
    for (start, dur) in sorted {
        while open.last().is_some_and(|&end| end <= start) {
            open.pop();
        }
        if let Some(&end) = open.last() {
            assert!(
                start + dur <= end,
                "a slice [{start}, +{dur}] overlaps its parent ending {end}"
            );
        }
        open.push(start + dur);
        deepest = deepest.max(open.len());
    }
    deepest
}

/// `uprobe run --trace-format chrome -o FILE`: fib(12) under a return probe and an entry probe.
/// Every call is one complete slice on the thread's track, with its argument and return value
/// (retval = fib(rdi)), nested as the recursion; every entry is an instant event; the process and
/// its thread are named; the summary went to stderr, the program's output is its own.
#[test]
fn a_chrome_trace_has_every_call_as_a_nested_slice() {
    let out = scratch("trace.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
    lib();
    cmd.args(["run", "--trace-format", "chrome", "-p", "ret:fib%return", "-p", "ret:fib(u64)"])
        .arg("-o")
        .arg(&out)
        .arg("--")
        .arg(fixture("ret"))
        .args(["fib", "12"]);
    let (stdout, stderr, status) = run_command(cmd);
    let plain = run_plain("ret", &["fib", "12"]);
    assert_eq!((stdout.as_str(), status.code()), (plain.stdout.as_str(), Some(0)));
    assert!(stderr.contains("ret:fib%return") && stderr.contains("events traced"), "{stderr}");
    let events = parse_trace(&std::fs::read_to_string(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
    let calls = 2 * fib(13) - 1; // 465
    let of = |ph: &str| events.iter().filter(|e| e["ph"] == ph).collect::<Vec<_>>();
    let (slices, instants, meta) = (of("X"), of("i"), of("M"));
    assert_eq!((slices.len() as u64, instants.len() as u64), (calls, calls));
    assert_eq!(events.len(), slices.len() + instants.len() + meta.len(), "nothing else");
    let pid = slices[0]["pid"].as_u64().unwrap();
    let names: BTreeMap<String, String> = meta
        .iter()
        .map(|m| (m["name"].as_str().unwrap().into(), m["args"]["name"].as_str().unwrap().into()))
        .collect();
    assert_eq!(names["process_name"], "ret");
    assert_eq!(names["thread_name"], "ret");
    assert!(events.iter().all(|e| e["pid"] == pid && e["tid"] == pid), "one thread");
    for s in &slices {
        let n =
            u64::from_str_radix(s["args"]["rdi"].as_str().unwrap().trim_start_matches("0x"), 16);
        assert_eq!(s["args"]["retval"], fib(n.unwrap()), "{s}");
        assert_eq!((s["name"].as_str(), s["cat"].as_str()), (Some("fib"), Some("uprobe")));
    }
    for i in &instants {
        assert!(i["args"]["arg0"].as_u64().unwrap() <= 12 && i["s"] == "t", "{i}");
    }
    let spans: Vec<(u64, u64)> = slices.iter().map(|s| (ns(&s["ts"]), ns(&s["dur"]))).collect();
    assert_eq!(assert_nested(&spans), 12, "fib(12) recurses 12 deep");
    // Each instant lies at the start of its call's slice (the entry it was recorded at).
    let first_slice = spans.iter().map(|s| s.0).min().unwrap();
    let first_instant = instants.iter().map(|i| ns(&i["ts"])).min().unwrap();
    assert!(first_instant >= first_slice, "{first_instant} {first_slice}");
}

/// A forked child in the same file is a process of its own (its pid, its name, its slices);
/// with `%p` each process has its own file.
#[test]
fn a_forked_child_is_its_own_process_in_the_trace() {
    let dir = scratch("trace-fork");
    std::fs::create_dir_all(&dir).unwrap();
    for (template, files) in [("one.json", 1), ("each-%p.json", 2)] {
        let mut cmd = Command::new(fixture("ret"));
        cmd.arg("fork")
            .env("LD_PRELOAD", lib())
            .env("UPROBES", "ret:forker%return")
            .env("UPROBES_TRACE", "1")
            .env("UPROBES_TRACE_FORMAT", "chrome")
            .env("UPROBES_OUTPUT", dir.join(template));
        let (stdout, stderr, status) = run_command(cmd);
        assert_eq!((stdout.as_str(), status.code()), ("ret fork: 1\n", Some(0)), "{stderr}");
        let mut pids: Vec<u64> = Vec::new();
        let paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(paths.len(), files, "{template}");
        for path in paths {
            let events = parse_trace(&std::fs::read_to_string(&path).unwrap());
            for e in events.iter().filter(|e| e["ph"] == "X") {
                assert_eq!(e["name"], "forker");
                pids.push(e["pid"].as_u64().unwrap());
                let named = events
                    .iter()
                    .any(|m| m["ph"] == "M" && m["name"] == "process_name" && m["pid"] == e["pid"]);
                assert!(named, "the process of {e} is named in its file");
            }
            std::fs::remove_file(path).unwrap();
        }
        pids.sort();
        pids.dedup();
        assert_eq!(pids.len(), 2, "{template}: forker returned in two processes: {pids:?}");
    }
}

/// A program killed halfway leaves a trace that is as readable as a finished one: whole events,
/// each ending with `,`, in an array that the format allows to stay open.
#[test]
fn a_trace_cut_by_a_kill_is_still_valid() {
    let out = scratch("killed.json");
    let mut child = Command::new(fixture("counts"))
        .arg("100000000000")
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "counts:leaf")
        .env("UPROBES_TRACE", "1")
        .env("UPROBES_TRACE_FORMAT", "chrome")
        .env("UPROBES_OUTPUT", &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) < 1_000_000 {
        assert!(start.elapsed().as_secs() < 20, "no events written");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let events = parse_trace(&std::fs::read_to_string(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
    // A megabyte of events, about 200 bytes each: every one whole.
    assert!(events.iter().filter(|e| e["ph"] == "i").count() > 3_000);
}
