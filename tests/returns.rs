//! Return probes: return values and durations, recursion, and everything that leaves a function
//! other than `ret` (longjmp, C++ exceptions, unwinders, pthread_exit, fork).

mod common;
use common::*;

use serde_json::Value;

fn latency(o: &Outcome, symbol: &str) -> (u64, u64) {
    let p = o.probes().iter().find(|p| p["symbol"] == symbol && p["return"] == true).unwrap();
    (p["hits"].as_u64().unwrap(), p["missed"].as_u64().unwrap())
}

#[test]
fn return_values_and_durations_are_recorded_exactly() {
    let traced = run_probed_env("ret", &["values"], "ret:add3%return", &[("UPROBES_TRACE", "1")]);
    assert_same_behaviour(&run_plain("ret", &["values"]), &traced);
    let returns: Vec<&Value> = traced.report.iter().filter(|v| v["type"] == "return").collect();
    let values: Vec<u64> = returns.iter().map(|v| v["retval"].as_u64().unwrap()).collect();
    assert_eq!(values, [0, 6, 12, 18, 24]);
    assert!(returns
        .iter()
        .all(|v| v["duration_ns"].as_u64().unwrap() > 0 && v["symbol"] == "add3"));
    let p = traced.probe("add3");
    assert_eq!((p["hits"].as_u64(), p["missed"].as_u64()), (Some(5), Some(0)));
    let l = &p["latency"];
    assert_eq!(l["calls"], 5);
    let (min, p50, p99, max) = (
        l["min_ns"].as_u64().unwrap(),
        l["p50_ns"].as_u64().unwrap(),
        l["p99_ns"].as_u64().unwrap(),
        l["max_ns"].as_u64().unwrap(),
    );
    assert!(min <= p50 && p50 <= p99 && p99 <= max, "{l}");
    // The shortest and the longest are those of the events.
    let durations: Vec<u64> = returns.iter().map(|v| v["duration_ns"].as_u64().unwrap()).collect();
    assert_eq!(min, *durations.iter().min().unwrap(), "{l}");
    assert_eq!(max, *durations.iter().max().unwrap(), "{l}");
    let in_histogram: u64 =
        l["histogram"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(in_histogram, 5);
}

#[test]
fn recursion_entries_equal_returns_and_pairs_nest() {
    // fib(15) makes 2 * fib(16) - 1 = 1973 calls.
    let traced =
        run_probed_env("ret", &["fib", "15"], "ret:fib ret:fib%return", &[("UPROBES_TRACE", "1")]);
    assert_same_behaviour(&run_plain("ret", &["fib", "15"]), &traced);
    let entry = traced.probes().iter().find(|p| p["spec"] == "ret:fib").unwrap();
    assert_eq!(entry["hits"], 1973);
    assert_eq!(latency(&traced, "fib"), (1973, 0));
    // The return probe's own events (its entry events carry the arguments): every return closes
    // the latest open entry, a stack never below zero and empty at the end.
    let id = traced.probes().iter().find(|p| p["return"] == true).unwrap()["id"].clone();
    let mut open = 0i64;
    for v in traced.report.iter().filter(|v| v["probe"] == id) {
        open += if v["type"] == "entry" { 1 } else { -1 };
        assert!(open >= 0, "a return before its entry");
    }
    assert_eq!(open, 0);
    assert_eq!(traced.report.iter().filter(|v| v["type"] == "return").count(), 1973);
}

#[test]
fn longjmp_out_of_a_return_probed_frame() {
    let probed = run_probed("ret", &["longjmp", "50"], "ret:jumper%return ret:plain%return");
    assert_same_behaviour(&run_plain("ret", &["longjmp", "50"]), &probed);
    assert_eq!(latency(&probed, "jumper").0, 0, "jumper never returns");
    assert_eq!(
        latency(&probed, "plain"),
        (50, 0),
        "the abandoned frames do not cost later returns"
    );
}

#[test]
fn a_cpp_exception_through_return_probed_frames() {
    let probed = run_probed("exc", &[], "exc:through%return exc:thrower%return");
    assert_same_behaviour(&run_plain("exc", &[]), &probed);
    assert_eq!(probed.stdout, "exc: sum 25, caught 5\n");
    // Even numbers return normally; odd ones throw, and their frames were handed back to the
    // unwinder.
    assert_eq!(latency(&probed, "through"), (5, 5));
    assert_eq!(latency(&probed, "thrower"), (5, 5));
}

#[test]
fn backtrace_from_inside_return_probed_functions() {
    let plain = run_plain("ret", &["backtrace"]);
    assert!(plain.stdout.contains("frame bt_leaf\nframe bt_mid\nframe main\n"), "{}", plain.stdout);
    let probed = run_probed("ret", &["backtrace"], "ret:bt_leaf%return ret:bt_mid%return");
    assert_same_behaviour(&plain, &probed);
}

#[test]
fn nesting_deeper_than_the_return_stack_is_missed_not_fatal() {
    let probed = run_probed("ret", &["deep", "100"], "ret:deep%return");
    assert_same_behaviour(&run_plain("ret", &["deep", "100"]), &probed);
    assert_eq!(latency(&probed, "deep"), (64, 36), "64 frames followed, the 36 deeper ones missed");
}

#[test]
fn a_thread_that_exits_inside_a_return_probed_function() {
    let probed = run_probed("ret", &["exit"], "ret:exiter%return");
    assert_same_behaviour(&run_plain("ret", &["exit"]), &probed);
    assert_eq!(probed.stdout, "ret exit: 42\n");
    assert_eq!(latency(&probed, "exiter"), (0, 1));
}

#[test]
fn fork_inside_a_return_probed_function() {
    let dir = scratch("retfork");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new(fixture("ret"));
    cmd.arg("fork")
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "ret:forker%return")
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", dir.join("r-%p.jsonl"));
    let (stdout, _, status) = run_command(cmd);
    assert_eq!((stdout.as_str(), status.code()), ("ret fork: 1\n", Some(0)));
    let mut returns = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        let v: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        returns.push(v["probes"][0]["hits"].as_u64().unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(returns, [1, 1], "the child returns through its own copy of the pending return");
}

#[test]
fn tail_calls_between_return_probed_functions_chain() {
    // tail_outer jumps to tail_inner: one return (to the trampoline) answers for both.
    let specs = "ret:tail_outer%return ret:tail_inner%return";
    let traced = run_probed_env("ret", &["tail", "100"], specs, &[("UPROBES_TRACE", "1")]);
    assert_same_behaviour(&run_plain("ret", &["tail", "100"]), &traced);
    assert_eq!(latency(&traced, "tail_outer"), (100, 0));
    assert_eq!(latency(&traced, "tail_inner"), (100, 0));
    let outer: Vec<u64> = traced
        .report
        .iter()
        .filter(|v| v["type"] == "return" && v["symbol"] == "tail_outer")
        .map(|v| v["retval"].as_u64().unwrap())
        .collect();
    assert_eq!(
        outer,
        (0..100).map(|i| i + 2).collect::<Vec<_>>(),
        "the outer call returns what the inner one did"
    );
}

#[test]
fn the_socket_shows_latency_live() {
    let dir = scratch("retsock");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let mut child = std::process::Command::new(fixture("serve"))
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "serve:target%return")
        .env("UPROBES_SOCKET", &socket)
        .env("UPROBES_OUTPUT", dir.join("report"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, BufReader, Write};
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(stdin, "call 300").unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "done 300\n");
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    s.write_all(b"stats\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    let v: Value = serde_json::from_str(&answer).unwrap();
    let p = &v["probes"][0];
    assert_eq!(
        (p["hits"].as_u64(), p["latency"]["calls"].as_u64(), p["missed"].as_u64()),
        (Some(300), Some(300), Some(0)),
        "{v}"
    );
    writeln!(stdin, "quit").unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Defect: a forked child reset only its hits: `missed` and the durations kept its parent's.
#[test]
fn a_forked_child_starts_with_no_missed_returns_and_no_durations() {
    let dir = scratch("forkdeep");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new(fixture("ret"));
    cmd.args(["forkdeep", "100"])
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "ret:deep%return")
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", dir.join("r-%p.jsonl"));
    let (stdout, _, status) = run_command(cmd);
    assert_eq!((stdout.as_str(), status.code()), ("ret forkdeep: 99\n", Some(0)));
    let mut got = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        let v: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let p = &v["probes"][0];
        got.push((p["hits"].as_u64(), p["missed"].as_u64(), p["latency"]["calls"].as_u64()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    got.sort();
    assert_eq!(
        got,
        [(Some(10), Some(0), Some(10)), (Some(64), Some(36), Some(64))],
        "the child: its own 10 returns, none missed; the parent: 64 followed, 36 missed"
    );
}

/// Durations without events are timed by the CPU's counter (where the kernel keeps time with it,
/// see `sigsafe::clock`), converted to nanoseconds: the shortest, the longest and the sum of 50
/// calls that each sleep 1 ms lie within what the caller measured around each call with
/// `CLOCK_MONOTONIC` (a part in a thousand for the calibration, far above its error), and are at
/// least the time slept. Counted in ticks, or converted at a wrong rate, they would not.
#[test]
fn durations_agree_with_the_callers_clock() {
    let o = run_probed("ret", &["sleep", "50"], "ret:sleeper%return");
    assert_eq!(o.stdout, "ret sleep: 50\n", "{}", o.stderr);
    let outer: Vec<u64> = o
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("outer "))
        .expect(&o.stderr)
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    let (lo, hi, sum) = (outer[0], outer[1], outer[2]);
    let p = o.probe("sleeper");
    let l = &p["latency"];
    let get = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} in {l}"));
    assert_eq!(get("calls"), 50, "{l}");
    let within = |inner: u64, outer: u64| inner <= outer + outer / 1000;
    assert!(
        within(get("min_ns"), lo),
        "shortest {} ns, the caller saw {lo} at least: {l}",
        get("min_ns")
    );
    assert!(
        within(get("max_ns"), hi),
        "longest {} ns, the caller saw {hi} at most: {l}",
        get("max_ns")
    );
    assert!(within(get("total_ns"), sum), "sum {} ns, the caller's {sum}: {l}", get("total_ns"));
    let slept = 1_000_000u64;
    assert!(get("min_ns") >= slept - slept / 1000, "a call sleeps 1 ms at least: {l}");
    assert!(get("total_ns") >= 50 * (slept - slept / 1000), "{l}");
}
