//! `uprobe attach`, `detach` and `trace -p` on processes that are already running: real ptrace,
//! real threads blocked in system calls, real pipes.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

fn uprobe(args: &[&str]) -> (String, String, std::process::ExitStatus) {
    lib(); // the tool finds libuprobe.so beside itself
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
    cmd.args(args).env_remove("UPROBES_PATH");
    run_command(cmd)
}

/// The `attached` fixture, started without libuprobe (or with `env`).
struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    fn start(env: &[(&str, &str)]) -> Target {
        let mut cmd = Command::new(fixture("attached"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).env_remove("LD_PRELOAD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert_eq!(ready, "ready\n");
        Target { child, stdin, stdout }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn tell(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    /// "quit": what it printed after, and its exit code.
    fn finish(mut self) -> (String, Option<i32>) {
        writeln!(self.stdin, "quit").unwrap();
        let rest = std::io::read_to_string(&mut self.stdout).unwrap();
        (rest, self.child.wait().unwrap().code())
    }

    fn maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap()
    }
}

fn number(answer: &str) -> u64 {
    answer.rsplit(' ').next().unwrap().parse().unwrap()
}

fn hits(pid: &str, id: u64) -> u64 {
    let (out, err, status) = uprobe(&["ctl", "--json", pid, "list"]);
    assert!(status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let p = v["probes"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap().clone();
    p["hits"].as_u64().unwrap()
}

/// `lib_add` in the target's memory (`/proc/PID/mem`) is byte for byte the file's.
fn assert_lib_add_is_the_files(t: &Target) {
    let (_, off, bytes) = symbol_in_file("libcounted.so", "lib_add");
    let lib = std::fs::canonicalize(fixture("libcounted.so")).unwrap();
    let addr = t
        .maps()
        .lines()
        .filter(|l| {
            l.ends_with(lib.to_str().unwrap()) && l.split_whitespace().nth(1).unwrap().contains('x')
        })
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (lo, hi) = f[0].split_once('-').unwrap();
            let (lo, hi) =
                (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
            let moff = u64::from_str_radix(f[2], 16).unwrap();
            (off >= moff && off - moff < hi - lo).then(|| lo + off - moff)
        })
        .unwrap();
    let mem = std::fs::File::open(format!("/proc/{}/mem", t.pid())).unwrap();
    let mut now = vec![0u8; bytes.len()];
    mem.read_exact_at(&mut now, addr).unwrap();
    assert_eq!(now, bytes, "lib_add is the file's again");
}

/// What the program does alone: the same orders, no attach.
fn plain_run() -> (String, Option<i32>) {
    let mut t = Target::start(&[]);
    t.tell("send");
    t.tell("send");
    t.finish()
}

/// Attach to a running program whose threads are blocked in nanosleep, read and poll; add a
/// probe: every call from then on is counted exactly; remove it, detach: the program's output,
/// the bytes its reader got and its exit status are those of a run without any of it, no thread
/// saw EINTR, and its code is the file's again.
#[test]
fn attach_count_exactly_detach_and_the_program_never_knew() {
    let plain = plain_run();
    assert_eq!(plain, ("reader got:\nmessage 1\nmessage 2\nEINTR seen: no\n".into(), Some(3)));
    let mut t = Target::start(&[]);
    let pid = t.pid();
    assert!(!t.maps().contains("libuprobe.so"));
    let (out, err, status) = uprobe(&["attach", &pid]);
    assert!(status.success(), "{err}");
    assert!(out.starts_with(&format!("attached: process {pid}, control socket ")), "{out}");
    assert!(t.maps().contains("libuprobe.so"), "loaded");
    t.tell("send");
    // The worker stopped between two calls: the probe comes, then it goes on.
    t.tell("pause");
    let (out, err, status) = uprobe(&["ctl", "--json", &pid, "add", "libcounted.so:lib_add"]);
    assert!(status.success(), "{err}");
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let id = added["probes"][0]["id"].as_u64().unwrap();
    let before = number(&t.tell("count"));
    assert_eq!(t.tell("resume"), "resumed");
    std::thread::sleep(Duration::from_millis(100));
    let after = number(&t.tell("pause"));
    assert!(after > before);
    assert_eq!(hits(&pid, id), after - before, "every call since the probe came, once");
    // Detach: no probe left, the file's bytes back in memory.
    let (out, err, status) = uprobe(&["detach", &pid]);
    assert!(status.success(), "{err}");
    assert!(out.starts_with("detached: 1 probe(s) removed"), "{out}");
    assert_lib_add_is_the_files(&t);
    t.tell("resume");
    t.tell("send");
    assert_eq!(t.finish(), plain);
}

/// Attaching to a process that already has libuprobe (preloaded, or attached before) loads no
/// second copy; a stopped process is attached to and stays stopped.
#[test]
fn attach_twice_to_a_preloaded_process_and_to_a_stopped_one() {
    let lib = lib().display().to_string();
    let mut t = Target::start(&[("LD_PRELOAD", &lib)]);
    let pid = t.pid();
    for _ in 0..2 {
        let (out, err, status) = uprobe(&["attach", &pid]);
        assert!(status.success(), "{err}");
        assert!(out.starts_with("attached"), "{out}");
        assert_eq!(
            t.maps().lines().filter(|l| l.contains("libuprobe.so") && l.contains("r-xp")).count(),
            1
        );
    }
    t.tell("send");
    t.tell("send");
    assert_eq!(t.finish(), plain_run());

    // Stopped: attached all the same, and still stopped after.
    let t = Target::start(&[]);
    let pid = t.pid();
    // SAFETY: kill with a valid signal, to our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGSTOP) };
    let state = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
            .unwrap()
    };
    let start = Instant::now();
    while !state().starts_with('T') {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let (out, err, status) = uprobe(&["attach", &pid]);
    assert!(status.success(), "{err}");
    assert!(out.starts_with("attached"), "{out}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(state().starts_with('T'), "still stopped: {}", state());
    // SAFETY: as above.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGCONT) };
    let mut t = t;
    t.tell("send");
    t.tell("send");
    assert_eq!(t.finish(), plain_run());
}

/// `uprobe trace -p PID ... --duration`: events as they come, a summary with the return probe's
/// durations, and afterwards the process runs on with its original bytes and no probe.
#[test]
fn trace_streams_events_and_leaves_the_process_as_it_was() {
    let mut t = Target::start(&[]);
    let pid = t.pid();
    let (out, err, status) = uprobe(&[
        "trace",
        "-p",
        &pid,
        "libcounted.so:lib_add(int,int)",
        "libcounted.so:lib_add%return",
        "--duration",
        "300ms",
        "--json",
    ]);
    assert!(status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let entries = lines.iter().filter(|v| v["type"] == "entry" && v["values"].is_array()).count();
    let returns = lines.iter().filter(|v| v["type"] == "return").count();
    assert!(entries > 100 && returns > 100, "{entries} entries, {returns} returns");
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    let probes = summary["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    assert!(probes[1]["latency"]["calls"].as_u64().unwrap() > 100, "{summary}");
    // Nothing left: the socket lists no probe.
    let (out, _, _) = uprobe(&["ctl", "--json", &pid, "list"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["probes"], serde_json::json!([]));
    assert_lib_add_is_the_files(&t);
    t.tell("send");
    t.tell("send");
    assert_eq!(t.finish(), plain_run());
}

/// Clear refusals, the target unharmed: another user, no such process, a static program, a
/// process that exits while being attached to.
#[test]
fn attach_says_why_it_cannot() {
    let (_, err, status) = uprobe(&["attach", "999999999"]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("there is no process 999999999"), "{err}");

    // Another user (the tests run as root: the tool runs as nobody).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut t = Target::start(&[]);
        let pid = t.pid();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
        cmd.args(["attach", &pid]);
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        let (_, err, status) = run_command(cmd);
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(
            err.contains("belongs to uid 0") || err.contains("another user"),
            "the message says why: {err}"
        );
        assert!(!t.maps().contains("libuprobe.so"));
        t.tell("send");
        t.tell("send");
        assert_eq!(t.finish(), plain_run());
    } else {
        eprintln!("skipped the other-user case: the tests do not run as root");
    }

    // A static program (if the toolchain can link one).
    let dir = scratch("static");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("s.c");
    std::fs::write(&src, "#include <unistd.h>\nint main(void){ for(;;) pause(); }\n").unwrap();
    let exe = dir.join("s");
    let built = Command::new("cc").arg("-static").arg("-o").arg(&exe).arg(&src).status();
    if built.is_ok_and(|s| s.success()) {
        let mut child = Command::new(&exe).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (_, err, status) = uprobe(&["attach", &child.id().to_string()]);
        assert_eq!(status.code(), Some(2));
        assert!(err.contains("statically linked"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        eprintln!("skipped the static case: cc -static cannot link here");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // Processes that exit while they are being attached to: every outcome is an attach or a
    // clear message, never a hang.
    for i in 0..10 {
        let mut child = Command::new("sleep").arg(format!("0.0{}", i % 5 + 1)).spawn().unwrap();
        let pid = child.id().to_string();
        let (_, err, status) = uprobe(&["attach", &pid]);
        let ok = status.success()
            || err.contains("exited")
            || err.contains("there is no process")
            || err.contains("cannot read");
        assert!(ok, "{err}");
        child.wait().unwrap();
    }
}

/// A program that lives on its own faults, as a JIT does: its one thread writes to a guard page
/// and recovers with siglongjmp, as fast as it can, and raises its own SIGTRAPs. An attach lands
/// in the middle of that (often on a thread with its fault pending, or stopped on its way into
/// a handler): each of a dozen attaches loads libuprobe and counts, and each program loses none
/// of its signals and exits as it would alone.
#[test]
fn attach_to_a_program_that_handles_its_own_faults() {
    let plain = Command::new(fixture("jit")).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
    let mut plain = plain.unwrap();
    writeln!(plain.stdin.take().unwrap(), "quit").unwrap();
    let alone = plain.wait_with_output().unwrap();
    let expected = "ready\njit: traps all caught, faults recovered\n";
    assert_eq!(String::from_utf8_lossy(&alone.stdout), expected);
    for round in 0..12 {
        let mut cmd = Command::new(fixture("jit"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).env_remove("LD_PRELOAD");
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert_eq!(ready, "ready\n");
        let pid = child.id().to_string();
        // Let it fault a while first: the attach comes in the thick of it.
        std::thread::sleep(Duration::from_millis(20 + 7 * round));
        let (out, err, status) = uprobe(&["attach", &pid]);
        assert!(status.success(), "round {round}: {err}");
        assert!(out.starts_with("attached"), "{out}");
        let (out, err, status) = uprobe(&["ctl", "--json", &pid, "add", "jit:tick"]);
        assert!(status.success(), "{err}");
        let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let id = added["probes"][0]["id"].as_u64().unwrap();
        let start = Instant::now();
        while hits(&pid, id) == 0 {
            assert!(start.elapsed() < Duration::from_secs(20), "the probe counts");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (_, err, status) = uprobe(&["detach", &pid]);
        assert!(status.success(), "{err}");
        writeln!(stdin, "quit").unwrap();
        let rest = std::io::read_to_string(&mut stdout).unwrap();
        let code = child.wait().unwrap();
        assert_eq!(format!("ready\n{rest}"), expected, "round {round}");
        assert_eq!(code.code(), Some(0), "round {round}: {code:?}");
    }
}
