//! A fixture that reads orders on stdin and serves the control socket (tests/control.rs,
//! tests/jumps.rs).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::{fixture, lib, scratch};

/// The `serve` fixture, started with libuprobe preloaded and no UPROBES.
pub struct Served {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    pub socket: PathBuf,
    pub report: PathBuf,
    /// The fixture's first line ("ready" for `defects`), for those that print one.
    pub first: String,
}

impl Served {
    pub fn start() -> Served {
        Served::start_program("serve", &[], &[])
    }

    /// A fixture that reads its orders on stdin, with libuprobe preloaded and its socket in a
    /// scratch directory. A fixture that says "ready" first is waited for.
    pub fn start_program(name: &str, args: &[&str], env: &[(&str, &str)]) -> Served {
        let dir = scratch("ctl");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("serve.sock");
        let report = dir.join("report.jsonl");
        let mut cmd = Command::new(fixture(name));
        cmd.args(args)
            .env("LD_PRELOAD", lib())
            .env("UPROBES_SOCKET", &socket)
            .env("UPROBES_OUTPUT", &report)
            .env("UPROBES_FORMAT", "json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            if *k == "ARG0" {
                std::os::unix::process::CommandExt::arg0(&mut cmd, v);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        if name != "serve" && name != "fds" {
            stdout.read_line(&mut first).unwrap();
            if name == "defects" {
                assert_eq!(first, "ready\n");
            }
        }
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket at {}", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Served { child, stdin, stdout, socket, report, first }
    }

    /// One request on a fresh connection.
    pub fn req(&self, line: &str) -> Value {
        // A failure says what became of the program (a crash shows as a zombie, `Z`).
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
            let stat = stat.map(|s| s.rsplit(')').next().unwrap_or_default().trim().to_string());
            let report = std::fs::read_to_string(&self.report).unwrap_or_default();
            format!("{stat:?}; its report so far: {report:?}")
        };
        let mut s = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("{line}: connect: {e}; the program: {}", state()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{line}: write: {e}; the program: {}", state()));
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("{line}: read: {e}; the program: {}", state()));
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{line}: {answer:?}: {e}; the program: {}", state()))
    }

    /// A line to the program; its one-line answer.
    pub fn tell(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    pub fn hits(&self, id: u64) -> u64 {
        let list = self.req("list");
        let p = list["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("{list}"));
        p["hits"].as_u64().unwrap()
    }

    pub fn quit(self) -> Vec<Value> {
        self.finish().1
    }

    /// "quit" to the program: what it printed after, and the report.
    pub fn finish(mut self) -> (String, Vec<Value>) {
        writeln!(self.stdin, "quit").unwrap();
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        assert!(self.child.wait().unwrap().success());
        assert!(!self.socket.exists(), "the socket is removed at exit");
        let text = std::fs::read_to_string(&self.report).unwrap_or_default();
        let _ = std::fs::remove_dir_all(self.socket.parent().unwrap());
        (rest, text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
    }
}
