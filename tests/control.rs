//! The control socket and `uprobe ctl`: probes added and removed while the program runs, hostile
//! clients, other users.

mod common;
use common::*;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The `serve` fixture, started with libuprobe preloaded and no UPROBES.
struct Served {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    socket: PathBuf,
    report: PathBuf,
}

impl Served {
    fn start() -> Served {
        let dir = scratch("ctl");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("serve.sock");
        let report = dir.join("report.jsonl");
        let mut child = Command::new(fixture("serve"))
            .env("LD_PRELOAD", lib())
            .env("UPROBES_SOCKET", &socket)
            .env("UPROBES_OUTPUT", &report)
            .env("UPROBES_FORMAT", "json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket at {}", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Served { child, stdin, stdout, socket, report }
    }

    /// One request on a fresh connection.
    fn req(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    /// A line to the program; its one-line answer.
    fn tell(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    fn hits(&self, id: u64) -> u64 {
        let list = self.req("list");
        let p = list["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("{list}"));
        p["hits"].as_u64().unwrap()
    }

    fn quit(mut self) -> Vec<Value> {
        writeln!(self.stdin, "quit").unwrap();
        assert!(self.child.wait().unwrap().success());
        assert!(!self.socket.exists(), "the socket is removed at exit");
        let text = std::fs::read_to_string(&self.report).unwrap_or_default();
        let _ = std::fs::remove_dir_all(self.socket.parent().unwrap());
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// The bytes of `target` in the serve fixture's file: (file offset, bytes).
fn target_in_file() -> (u64, Vec<u8>) {
    let (_, off, bytes) = symbol_in_file("serve", "target");
    (off, bytes)
}

fn read_mem(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, addr).unwrap();
    buf
}

#[test]
fn add_count_remove_and_the_original_bytes_are_back() {
    let mut s = Served::start();
    assert_eq!(s.req("list"), serde_json::json!({"ok": true, "probes": []}));
    let added = s.req("add serve:target");
    assert_eq!(added["ok"], true, "{added}");
    let p = &added["probes"][0];
    assert_eq!((p["state"].as_str(), p["hits"].as_u64()), (Some("active"), Some(0)));
    let id = p["id"].as_u64().unwrap();
    let (file_off, file_bytes) = target_in_file();
    assert_eq!(p["offset"], file_off);

    let addr = u64::from_str_radix(s.tell("addr").trim_start_matches("addr 0x"), 16).unwrap();
    let pid = s.child.id();
    assert_eq!(read_mem(pid, addr, 1), [0xcc], "the breakpoint is in place");

    assert_eq!(s.tell("call 1000"), "done 1000");
    assert_eq!(s.hits(id), 1000);
    assert_eq!(s.tell("call 234"), "done 234");
    assert_eq!(s.hits(id), 1234);

    let stats = s.req("stats reset");
    assert_eq!((stats["hits"].as_u64(), stats["reset"].as_bool()), (Some(1234), Some(true)));
    assert_eq!(s.hits(id), 0);

    assert_eq!(s.req(&format!("remove {id}")), serde_json::json!({"ok": true, "removed": [id]}));
    assert_eq!(
        read_mem(pid, addr, file_bytes.len()),
        file_bytes,
        "the function's bytes equal the file's"
    );
    assert_eq!(s.tell("call 500"), "done 500");
    assert_eq!(s.req("list")["probes"], serde_json::json!([]));
    let again = s.req(&format!("remove {id}"));
    assert_eq!(again["error"], format!("no probe with id {id}"));

    // remove by spec, and errors that name what was typed
    assert_eq!(s.req("add serve:target")["ok"], true);
    assert_eq!(s.req("remove serve:target")["ok"], true);
    let bad = s.req("add serve:no_such_fn");
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("no function matching `no_such_fn`"), "{bad}");
    assert_eq!(s.req("list")["probes"], serde_json::json!([]), "a failed add leaves nothing");
    let report = s.quit();
    assert!(!report.iter().any(|v| v["type"] == "summary"), "every probe was removed: no summary");
}

#[test]
fn a_thousand_add_remove_cycles_under_eight_threads() {
    let mut s = Served::start();
    assert_eq!(s.tell("spin 8"), "spinning 8");
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let mut xol = None;
    let mut rss_after_warmup = 0;
    let mut total_hits = 0;
    for cycle in 0..1000 {
        let added = s.req("add serve:target");
        assert_eq!(added["ok"], true, "cycle {cycle}: {added}");
        let id = added["probes"][0]["id"].as_u64().unwrap();
        let first = s.hits(id);
        let second = s.hits(id);
        assert!(second >= first, "counts only rise: {first} then {second}");
        total_hits += second;
        assert_eq!(s.req(&format!("remove {id}"))["ok"], true);
        let stats = s.req("stats");
        let bytes = stats["xol_bytes"].as_u64().unwrap();
        assert_eq!(*xol.get_or_insert(bytes), bytes, "cycle {cycle}: XOL memory grew");
        if cycle == 50 {
            rss_after_warmup = rss(s.child.id());
        }
    }
    let grown = rss(s.child.id()).saturating_sub(rss_after_warmup);
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB over 950 cycles");
    assert!(total_hits > 0, "the spinning threads hit the probe");
    let stopped = s.tell("stop");
    let fields: Vec<u64> = stopped.split_whitespace().skip(1).map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields[1], 0, "every result target() returned was right ({stopped})");
    s.quit();
}

#[test]
fn hostile_clients_do_not_hurt_the_program() {
    let mut s = Served::start();
    assert_eq!(s.req("add serve:target")["ok"], true);
    let cases: &[(&[u8], &str)] = &[
        (b"bogus\n", "unknown command `bogus`"),
        (b"\n", "empty request"),
        (b"add\n", "`add` needs a SPEC"),
        (b"remove\n", "`remove` needs"),
        (b"list extra\n", "takes no argument"),
        (b"add not a spec\n", "malformed spec"),
        (b"\xff\xfe\xfd\n", "not valid UTF-8"),
    ];
    for (request, message) in cases {
        let mut c = UnixStream::connect(&s.socket).unwrap();
        c.write_all(request).unwrap();
        let mut answer = String::new();
        BufReader::new(c).read_line(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["ok"], false, "{request:?}");
        assert!(v["error"].as_str().unwrap().contains(message), "{request:?}: {v}");
    }
    // A line over the limit is refused and the client dropped.
    let mut big = UnixStream::connect(&s.socket).unwrap();
    big.write_all(&vec![b'a'; 10_000]).unwrap();
    let mut answer = String::new();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(&big).read_line(&mut answer).unwrap();
    assert!(answer.contains("longer than 4096 bytes"), "{answer}");

    // 200 connections at once: silent ones, half-written lines, garbage.
    let mut held = Vec::new();
    for i in 0..200 {
        let mut c = UnixStream::connect(&s.socket).unwrap();
        match i % 3 {
            0 => {}
            1 => c.write_all(b"add serve:tar").unwrap(),
            _ => c.write_all(&[0u8, 1, 2, 3, 255]).unwrap(),
        }
        held.push(c);
    }
    let start = Instant::now();
    assert_eq!(s.req("list")["ok"], true);
    assert!(start.elapsed() < Duration::from_secs(5), "answered in {:?}", start.elapsed());
    assert_eq!(s.tell("call 77"), "done 77", "the program runs on");
    let list = s.req("list");
    assert_eq!(list["probes"][0]["hits"], 77, "{list}");
    drop(held);
    let mut drain = Vec::new();
    let _ = big.read_to_end(&mut drain);
    s.quit();
}

#[test]
fn a_client_of_another_uid_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let s = Served::start();
    // Open the path to everyone, so that only the credentials check stands in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
    cmd.args(["ctl", "--socket"]).arg(&s.socket).arg("list");
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused a client of uid 65534"), "{stderr}");
    assert_eq!(s.req("list")["ok"], true, "root and the owner still get in");
    let report = s.quit();
    assert!(
        report
            .iter()
            .any(|v| v["type"] == "error" && v["message"].as_str().unwrap().contains("uid 65534")),
        "the refusal is logged: {report:?}"
    );
}

#[test]
fn uprobe_ctl_speaks_for_a_pid() {
    let mut s = Served::start();
    let socket = s.socket.clone();
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
        cmd.arg("ctl").arg("--socket").arg(&socket).args(args);
        run_command(cmd)
    };
    let (out, _, status) = ctl(&["add", "serve:target"]);
    assert!(status.success());
    assert!(out.starts_with("added 1 probe(s)\n"), "{out}");
    assert_eq!(s.tell("call 42"), "done 42");
    let (out, _, _) = ctl(&["list"]);
    let row = out.lines().nth(1).unwrap();
    assert_eq!(
        row.split_whitespace().take(4).collect::<Vec<_>>(),
        ["1", "42", "active", "serve:target"]
    );
    let (out, _, _) = ctl(&["--json", "stats"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["hits"], 42);
    let (_, err, status) = ctl(&["remove", "9"]);
    assert_eq!((status.code(), err.trim()), (Some(1), "uprobe: no probe with id 9"));
    // By pid, through the default socket directory: a process without a socket is explained.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
    cmd.args(["ctl", "999999999", "list"]);
    let (_, err, status) = run_command(cmd);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("process 999999999 has no control socket"), "{err}");
    s.quit();
}
