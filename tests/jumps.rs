//! The jump path: which sites get a jump and of which class, what changes in memory, and the
//! live cases the kernel's order of writes is for (threads running through sites while they are
//! added and removed, signal handlers inside bodies, fork and vfork, a thread stopped at a site).
//! c_fixtures/jumps.S has a function per case.

mod common;
use common::served::Served;
use common::*;

use std::os::unix::fs::FileExt;

/// Every test here is about the jump path: it asks for it, whatever the suite runs with.
const JUMP: (&str, &str) = ("UPROBES_PATH", "jump");

/// Where `symbol` of the jumps fixture is in process `pid`, and the file's 16 bytes there.
fn symbol_in(pid: u32, symbol: &str) -> (u64, Vec<u8>) {
    let (_, off, _) = symbol_in_file("jumps", symbol);
    let mut bytes = vec![0; 16];
    std::fs::File::open(fixture("jumps")).unwrap().read_exact_at(&mut bytes, off).unwrap();
    let exe = std::fs::canonicalize(fixture("jumps")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != exe.to_str().unwrap() || !f[1].contains('x') {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').unwrap();
        let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
        let moff = u64::from_str_radix(f[2], 16).unwrap();
        if off >= moff && off - moff < hi - lo {
            return (lo + off - moff, bytes);
        }
    }
    panic!("{symbol} not mapped in {pid}:\n{maps}");
}

fn read_mem(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, addr).unwrap();
    buf
}

/// Functions whose first instruction is 5 bytes or longer.
const CLASS_1: &[&str] = &["j_long", "j_hot", "j_call", "j_jmp", "j_riprel", "j_nop5"];
/// Functions whose first instruction is shorter: a punned jump, or a trap where the address its
/// bytes fix is taken (a 1-byte instruction fixes it to one address, a 4-byte one to 16 MiB).
const CLASS_2: &[&str] = &["j_short", "j_endbr", "j_push", "j_back", "j_table"];

#[test]
fn each_class_of_site_runs_exactly_as_unprobed() {
    let plain = run_plain("jumps", &["classes", "1000"]);
    assert!(plain.status.success());
    let mut specs: Vec<String> =
        CLASS_1.iter().chain(CLASS_2).map(|f| format!("jumps:{f}")).collect();
    specs.push("jumps:j_jcc+3".into()); // the `jne rel32` itself
    let probed = run_probed_env("jumps", &["classes", "1000"], &specs.join(" "), &[JUMP]);
    assert_same_behaviour(&plain, &probed);
    assert!(probed.errors().is_empty(), "{:?}", probed.errors());
    for f in CLASS_1 {
        let p = probed.probe(f);
        assert_eq!((p["path"].as_str(), p["class"].as_u64()), (Some("jump"), Some(1)), "{p}");
        assert_eq!(probed.hits(f), 1000, "{f}");
    }
    let jcc = probed.probe_by_spec("jumps:j_jcc+3");
    assert_eq!((jcc["path"].as_str(), jcc["class"].as_u64()), (Some("jump"), Some(1)), "{jcc}");
    assert_eq!(jcc["hits"], 1000);
    for f in CLASS_2 {
        let p = probed.probe(f);
        let punned = p["path"] == "jump" && p["class"] == 2;
        let no_room = p["path"] == "trap"
            && p["path_reason"].as_str().unwrap_or("").starts_with("no room for a punned jump");
        assert!(punned || no_room, "{p}");
        // j_back loops back to its second instruction, which the punned jump does not change:
        // one hit a call, not one an iteration.
        assert_eq!(probed.hits(f), 1000, "{f}");
    }
    // An endbr64 leaves a 16 MiB window: there is always room.
    assert_eq!(probed.probe("j_endbr")["class"], 2);
}

/// Only the probed instruction changes: a class 1 site its first 5 bytes, a punned site its own
/// bytes only (the bytes after it, which its jump's target is made of, stay); removal puts the
/// file's bytes back.
#[test]
fn only_the_probed_instruction_changes_in_memory() {
    let s = Served::start_program("jumps", &["spin", "2"], &[JUMP]);
    let pid = s.child.id();
    let added = s.req("add jumps:j_long jumps:j_endbr jumps:j_short jumps:j_nop5");
    assert_eq!(added["ok"], true, "{added}");
    for (f, len) in [("j_long", 5), ("j_endbr", 4), ("j_short", 2), ("j_nop5", 5)] {
        let (addr, file) = symbol_in(pid, f);
        let mem = read_mem(pid, addr, 16);
        let p = added["probes"].as_array().unwrap().iter().find(|p| p["symbol"] == f).unwrap();
        if p["path"] != "jump" {
            assert_eq!(mem[0], 0xcc, "{f} is a trap: {p}");
            assert_eq!(mem[1..], file[1..16], "{f}");
            continue;
        }
        assert_eq!(mem[0], 0xe9, "{f}");
        assert_eq!(mem[len..], file[len..16], "{f}: the bytes after the instruction stay");
        if len < 5 {
            // Punned: the jump's high bytes are the next instruction's, unchanged.
            assert_eq!(mem[len..5], file[len..5], "{f}");
        }
    }
    for p in added["probes"].as_array().unwrap() {
        assert_eq!(s.req(&format!("remove {}", p["id"]))["ok"], true);
    }
    for f in ["j_long", "j_endbr", "j_short", "j_nop5"] {
        let (addr, file) = symbol_in(pid, f);
        assert_eq!(read_mem(pid, addr, 16), file[..16], "{f}: the file's bytes are back");
    }
    let (rest, _) = s.finish();
    assert!(rest.starts_with("calls "), "{rest}");
}

/// Code that runs with every signal blocked (here by a raw system call, which libuprobe does not
/// see) is probed on the jump path: only the trap path needs SIGTRAP. On the trap path the kernel
/// kills such a program (the documented limit of traps; glibc's own windows are fixed by mask
/// fixes, a program's raw system calls are not).
#[test]
fn code_that_blocks_every_signal_is_probed_on_the_jump_path() {
    let plain = run_plain("jumps", &["blocked", "5000"]);
    let probed = run_probed_env("jumps", &["blocked", "5000"], "jumps:j_long", &[JUMP]);
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("j_long"), 5000);
    let trap =
        run_probed_env("jumps", &["blocked", "5000"], "jumps:j_long", &[("UPROBES_PATH", "trap")]);
    assert_eq!(trap.signal(), Some(libc::SIGTRAP), "{}", trap.stderr);
}

/// A signal handler that interrupts a thread anywhere, inside a body or a stub or the full
/// entry's Rust code, and calls the probed function itself: every call counted once, the
/// program's results intact; for entry probes, events, and return probes (the return side too).
#[test]
fn signal_handlers_inside_bodies_call_the_probed_function() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("jumps:j_long", &[]),
        ("jumps:j_long", &[("UPROBES_TRACE", "1")]),
        ("jumps:j_long%return", &[("UPROBES_LATENCY", "0")]),
        ("jumps:j_long%return", &[]),
        ("jumps:j_long jumps:j_long%return", &[("UPROBES_LATENCY", "0")]),
    ];
    for (specs, env) in cases {
        let mut env = env.to_vec();
        env.push(JUMP);
        let o = run_probed_env("jumps", &["signals", "300000"], specs, &env);
        assert!(o.status.success(), "{specs} {env:?}: {}", o.stderr);
        let line = o.stdout.trim();
        assert!(line.starts_with("signals: sum right, calls "), "{line}");
        let calls: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        for p in o.probes() {
            assert_eq!(p["path"], "jump", "{p}");
            assert_eq!(p["hits"], calls, "{specs} {env:?}: {p}");
            if p["return"] == true {
                assert_eq!(p["missed"], 0, "{p}");
            }
        }
        if env.contains(&("UPROBES_TRACE", "1")) {
            // Every event written or counted lost (the rings are bounded; the calls are many).
            let events = o.report.iter().filter(|v| v["type"] == "entry").count() as u64;
            let lost = o.summary()["lost"].as_u64().unwrap();
            assert_eq!(events + lost, calls, "an event a call");
        }
    }
}

/// Eight threads run through j_hot while the socket adds and removes a probe on its second
/// instruction (a site of its own: int3, serialize, tail, serialize, e9, serialize, and back)
/// and on another function, 10,000 times. A probe on j_hot's first instruction stays all along:
/// it counts every call exactly. The churned probe counts every call made while it was surely
/// armed (but for one call a thread that was already past it), and never more than the calls.
/// At the end the file's bytes are back.
#[test]
fn probes_come_and_go_while_eight_threads_run_through_them() {
    let mut s = Served::start_program("jumps", &["spin", "8"], &[JUMP, ("UPROBES", "jumps:j_hot")]);
    assert_eq!(s.first, "spinning 8\n");
    let pid = s.child.id();
    let calls = |s: &mut Served| -> u64 {
        s.tell("count").strip_prefix("calls ").unwrap().parse().unwrap()
    };
    let mut checked = 0;
    for cycle in 0..10_000 {
        let added = s.req("add jumps:j_hot+5 jumps:j_long");
        assert_eq!(added["ok"], true, "cycle {cycle}: {added}");
        let ids: Vec<u64> =
            added["probes"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
        if cycle % 1000 == 0 {
            // Calls made between two moments the probe was armed: all counted.
            let before = calls(&mut s);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let after = calls(&mut s);
            let hits = s.hits(ids[0]);
            let total = calls(&mut s);
            // (A thread preempted inside j_hot past the second instruction when the probe came
            // finishes a call it is not counted for: at most one a thread.)
            let window = after - before;
            assert!(hits + 8 >= window, "cycle {cycle}: {hits} hits, {window} calls");
            assert!(after > before, "the threads run");
            assert!(hits <= total, "cycle {cycle}: {hits} hits, {total} calls in all");
            checked += 1;
        }
        for id in ids {
            assert_eq!(s.req(&format!("remove {id}"))["ok"], true, "cycle {cycle}");
        }
    }
    assert_eq!(checked, 10);
    for f in ["j_hot_second", "j_long"] {
        let (addr, file) = symbol_in(pid, f);
        assert_eq!(read_mem(pid, addr, 8), file[..8], "{f}: the file's bytes are back");
    }
    let (rest, report) = s.finish();
    let total: u64 = rest.trim().strip_prefix("calls ").unwrap().parse().unwrap();
    let summary = report.iter().rev().find(|v| v["type"] == "summary").unwrap();
    let permanent = &summary["probes"][0];
    assert_eq!(permanent["spec"], "jumps:j_hot");
    assert_eq!(permanent["path"], "jump");
    assert_eq!(permanent["hits"], total, "every call counted once: {permanent}");
}

/// fork, vfork and posix_spawn in a loop while probes on what the children run are added and
/// removed: every child exits as it should (a vfork child's hits, on its parent's memory, are
/// not the parent's).
#[test]
fn fork_and_vfork_while_sites_are_being_patched() {
    let plain = run_plain("jumps", &["forks", "300"]);
    let mut s = Served::start_program("jumps", &["forks", "300"], &[JUMP]);
    let mut cycles = 0;
    let start = std::time::Instant::now();
    // One request; None once the program is gone.
    let req = |s: &Served, line: &str| -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&s.socket).ok()?;
        c.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        std::io::BufReader::new(c).read_line(&mut answer).ok()?;
        serde_json::from_str(&answer).ok()
    };
    loop {
        let Some(added) = req(&s, "add jumps:j_long jumps:j_short jumps:j_endbr") else { break };
        assert_eq!(added["ok"], true, "{added}");
        for p in added["probes"].as_array().unwrap() {
            let _ = req(&s, &format!("remove {}", p["id"]));
        }
        cycles += 1;
        if s.child.try_wait().unwrap().is_some() || start.elapsed().as_secs() > 60 {
            break;
        }
    }
    let out = std::io::read_to_string(&mut s.stdout).unwrap();
    let status = s.child.wait().unwrap();
    let report = std::fs::read_to_string(&s.report).unwrap_or_default();
    assert!(status.success(), "{status} after {cycles} cycles, output {out:?}; report:\n{report}");
    assert_eq!(s.first + &out, plain.stdout);
    assert!(cycles > 0);
}

/// A thread stopped (by ptrace) exactly at a site while the probe is added, then let go: its
/// first instruction is the new patch, and it is counted; every call after too.
#[test]
fn a_thread_stopped_at_a_site_while_it_is_patched() {
    let mut s = Served::start_program("jumps", &["stopper"], &[JUMP]);
    let f: Vec<String> = s.first.split_whitespace().map(str::to_string).collect();
    let tid: i32 = f[1].parse().unwrap();
    let site = u64::from_str_radix(&f[3], 16).unwrap();
    // SAFETY: ptrace of a thread of our own child, with valid arguments.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0), 0, "ptrace");
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        let mut st = 0;
        assert_eq!(libc::waitpid(tid, &mut st, libc::__WALL), tid);
        // Step until the thread is at the site.
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        for _ in 0..1_000_000 {
            libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _);
            if regs.rip == site {
                break;
            }
            libc::ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0);
            libc::waitpid(tid, &mut st, libc::__WALL);
        }
        assert_eq!(regs.rip, site, "the thread reached j_long");
    }
    let before: u64 = s.tell("count").strip_prefix("calls ").unwrap().parse().unwrap();
    let added = s.req("add jumps:j_long");
    assert_eq!(added["ok"], true, "{added}");
    let id = added["probes"][0]["id"].as_u64().unwrap();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0), 0) };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let _ = s.tell("count");
    let (rest, report) = s.finish();
    let total: u64 = rest.trim().strip_prefix("calls ").unwrap().parse().unwrap();
    let summary = report.iter().rev().find(|v| v["type"] == "summary").unwrap();
    let p = summary["probes"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap();
    assert_eq!(p["hits"].as_u64().unwrap(), total - before, "the stopped call and every one after");
}

/// The share of a library's functions whose entry gets a jump, by class, from the JSON summary
/// of a run that probed all of them: (jump share, class 1 share, class 2 share, sites).
fn coverage(o: &Outcome) -> (f64, f64, f64, usize) {
    let active: Vec<&serde_json::Value> =
        o.probes().iter().filter(|p| p["state"] == "active").collect();
    let n = active.len().max(1) as f64;
    let class = |c: u64| active.iter().filter(|p| p["class"] == c).count() as f64 / n;
    let (c1, c2) = (class(1), class(2));
    (c1 + c2, c1, c2, active.len())
}

/// The jump path's reach on real libraries: every function entry of libc, libsqlite3 and
/// libpython, probed at once; the share that gets a jump, by class (printed; libc at least 90%).
/// The rest are traps where a punned jump's stub has no room (its target falls in the library
/// itself, or outside the address space).
#[test]
fn most_function_entries_of_real_libraries_get_a_jump() {
    let env = [JUMP, ("UPROBES_SOCKET", "none")];
    let mut rows = Vec::new();
    let plain = run_plain("jumps", &["classes", "10"]);
    let libc = run_probed_env("jumps", &["classes", "10"], "libc.so.6:*", &env);
    assert_same_behaviour(&plain, &libc);
    rows.push(("libc.so.6", coverage(&libc)));
    let libs = [
        "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    ];
    for lib in libs {
        assert!(std::path::Path::new(lib).exists(), "{lib} (.ci/run installs it)");
        let name = lib.rsplit('/').next().unwrap();
        let o = run_probed_env("jumps", &["load", lib], &format!("{name}:*"), &env);
        assert_eq!(o.stdout, "load: ok\n", "{}", o.stderr);
        rows.push((name, coverage(&o)));
    }
    for (name, (share, c1, c2, n)) in &rows {
        eprintln!(
            "jump path: {name:<24} {n:>5} function entries: {:>5.1}% jump (class 1 {:>4.1}%, class 2 {:>4.1}%)",
            share * 100.0,
            c1 * 100.0,
            c2 * 100.0
        );
        assert!(*n > 1000, "{name}: {n} sites");
        assert!(*share >= 0.80, "{name}: {:.1}%", share * 100.0);
    }
    assert!(rows[0].1 .0 >= 0.90, "libc: {:.1}% of function entries", rows[0].1 .0 * 100.0);
}
