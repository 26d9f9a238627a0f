//! Shared by the integration tests: build libuprobe.so, run C fixtures with and without it, read the
//! JSON Lines report.
#![allow(dead_code)]

pub mod served;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every fixture run is killed after this long: a hang fails the test instead of the CI job.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// target/<profile>/libuprobe.so, built once per test binary (cargo does not build a cdylib for
/// integration tests by itself). `UPROBE_TEST_LIB` names another build instead (to check that a
/// test fails on a build without the fix it guards).
pub fn lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(other) = std::env::var_os("UPROBE_TEST_LIB") {
            return PathBuf::from(other);
        }
        let exe = std::env::current_exe().expect("test executable");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--lib", "--quiet"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --lib");
        assert!(status.success(), "cargo build --lib failed");
        let lib = profile_dir.join("libuprobe.so");
        assert!(lib.exists(), "{} was not built", lib.display());
        lib
    })
}

/// The path a plain probe takes in this run: `jump`, unless the suite runs with
/// `UPROBES_PATH=trap` (the README's test command runs it both ways).
pub fn expected_path() -> &'static str {
    match std::env::var("UPROBES_PATH").as_deref() {
        Ok("trap") => "trap",
        _ => "jump",
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("UPROBE_FIXTURES")).join(name)
}

/// A symbol of a fixture's ELF file: (virtual address, file offset, the function's bytes).
pub fn symbol_in_file(file: &str, name: &str) -> (u64, u64, Vec<u8>) {
    let bytes = std::fs::read(fixture(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
    let elf = goblin::elf::Elf::parse(&bytes).unwrap_or_else(|e| panic!("parse {file}: {e}"));
    let named = |syms: &goblin::elf::Symtab, strs: &goblin::strtab::Strtab| {
        syms.iter().find(|s| strs.get_at(s.st_name) == Some(name))
    };
    let sym = named(&elf.syms, &elf.strtab)
        .or_else(|| named(&elf.dynsyms, &elf.dynstrtab))
        .unwrap_or_else(|| panic!("no symbol {name} in {file}"));
    let ph = elf
        .program_headers
        .iter()
        .find(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && p.vm_range().contains(&(sym.st_value as usize))
        })
        .expect("a PT_LOAD holds the symbol");
    let off = sym.st_value - ph.p_vaddr + ph.p_offset;
    (sym.st_value, off, bytes[off as usize..(off + sym.st_size) as usize].to_vec())
}

/// A unique scratch path for this test process.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("uprobe-test-{}-{n}-{tag}", std::process::id()))
}

/// What a fixture run produced.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
    /// The JSON Lines report, when the run was probed with UPROBES_FORMAT=json.
    pub report: Vec<Value>,
}

impl Outcome {
    pub fn summary(&self) -> &Value {
        self.report
            .iter()
            .find(|v| v["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary in report; stderr:\n{}", self.stderr))
    }

    pub fn probes(&self) -> &Vec<Value> {
        self.summary()["probes"].as_array().expect("probes array")
    }

    /// The one probe whose symbol is `symbol`.
    pub fn probe(&self, symbol: &str) -> &Value {
        let found: Vec<_> = self.probes().iter().filter(|p| p["symbol"] == symbol).collect();
        assert_eq!(found.len(), 1, "probes with symbol {symbol}: {}", short(&found));
        found[0]
    }

    /// The one probe registered from exactly `spec`.
    pub fn probe_by_spec(&self, spec: &str) -> &Value {
        let found: Vec<_> = self.probes().iter().filter(|p| p["spec"] == spec).collect();
        assert_eq!(found.len(), 1, "probes with spec {spec}: {}", short(&found));
        found[0]
    }

    pub fn hits(&self, symbol: &str) -> u64 {
        self.probe(symbol)["hits"].as_u64().expect("hits")
    }

    /// Messages of the `error` lines.
    pub fn errors(&self) -> Vec<String> {
        self.report
            .iter()
            .filter(|v| v["type"] == "error")
            .map(|v| v["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }
}

/// At most 2,000 characters of what `v` prints as (a failing assertion must stay readable).
pub fn short(v: &impl std::fmt::Debug) -> String {
    let s = format!("{v:?}");
    if s.len() <= 2000 {
        return s;
    }
    let cut: String = s.chars().take(2000).collect();
    format!("{cut}... ({} characters)", s.len())
}

/// Run `cmd` to completion (or the watchdog), without core dumps.
pub fn run_command(mut cmd: Command) -> (String, String, ExitStatus) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            panic!("{cmd:?} still running after {WATCHDOG:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    (stdout, stderr, status)
}

/// Run a fixture as it is, without libuprobe.
pub fn run_plain(name: &str, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(fixture(name));
    cmd.args(args);
    let (stdout, stderr, status) = run_command(cmd);
    Outcome { stdout, stderr, status, report: Vec::new() }
}

/// Run a fixture with libuprobe preloaded, `specs` in UPROBES, the report as JSON Lines in a file.
pub fn run_probed(name: &str, args: &[&str], specs: &str) -> Outcome {
    run_probed_env(name, args, specs, &[])
}

pub fn run_probed_env(name: &str, args: &[&str], specs: &str, env: &[(&str, &str)]) -> Outcome {
    let report = scratch("report.jsonl");
    let mut cmd = Command::new(fixture(name));
    cmd.args(args)
        .env("LD_PRELOAD", lib())
        .env("UPROBES", specs)
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", &report);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (stdout, stderr, status) = run_command(cmd);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let report = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    Outcome { stdout, stderr, status, report }
}

/// Assert that a probed run behaved exactly as the plain one: same stdout, same exit status.
pub fn assert_same_behaviour(plain: &Outcome, probed: &Outcome) {
    assert_eq!(probed.status.code(), plain.status.code(), "exit code; stderr:\n{}", probed.stderr);
    assert_eq!(probed.signal(), plain.signal(), "terminating signal; stderr:\n{}", probed.stderr);
    if probed.stdout != plain.stdout {
        let diff: Vec<_> = plain
            .stdout
            .lines()
            .zip(probed.stdout.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        panic!("stdout differs (first differing lines, plain vs probed): {diff:#?}");
    }
}
