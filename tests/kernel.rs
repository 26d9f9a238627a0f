//! libuprobe beside kernel uprobes (root and tracefs needed; skipped, saying so, otherwise): the
//! same counts, and a kernel uprobe that takes libuprobe's breakpoint away is noticed.

mod common;
use common::served::Served;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tracefs directory, mounted if needed; None (with the reason) where kernel uprobes cannot
/// be used.
fn tracefs() -> Result<PathBuf, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("kernel uprobes need root".into());
    }
    let dir = PathBuf::from("/sys/kernel/tracing");
    if !dir.join("uprobe_events").exists() {
        let _ = Command::new("mount").args(["-t", "tracefs", "nodev"]).arg(&dir).status();
    }
    if dir.join("uprobe_events").exists() {
        Ok(dir)
    } else {
        Err("no tracefs with uprobe_events (CONFIG_UPROBE_EVENTS?)".into())
    }
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new().append(true).open(path)?.write_all(text.as_bytes())
}

/// A kernel uprobe on `file:offset`, removed when dropped.
struct KernelProbe {
    dir: PathBuf,
    name: String,
}

impl KernelProbe {
    fn new(dir: &Path, name: &str, file: &Path, offset: u64) -> KernelProbe {
        let _ = write(&dir.join("uprobe_events"), &format!("-:uprobe_test/{name}\n"));
        write(
            &dir.join("uprobe_events"),
            &format!("p:uprobe_test/{name} {}:{offset:#x}\n", file.display()),
        )
        .expect("add a kernel uprobe");
        KernelProbe { dir: dir.to_path_buf(), name: name.to_string() }
    }

    fn event(&self, file: &str) -> PathBuf {
        self.dir.join("events/uprobe_test").join(&self.name).join(file)
    }

    fn enable(&self, on: bool) {
        write(&self.event("enable"), if on { "1\n" } else { "0\n" }).unwrap();
    }
}

impl Drop for KernelProbe {
    fn drop(&mut self) {
        self.enable(false);
        let _ = write(&self.dir.join("uprobe_events"), &format!("-:uprobe_test/{}\n", self.name));
    }
}

/// Defect: a kernel uprobe enabled and disabled on an instruction libuprobe probes restores the
/// original byte, silently removing libuprobe's breakpoint: the probe said `active` at zero hits.
#[test]
fn a_breakpoint_taken_away_by_a_kernel_uprobe_is_reported_lost() {
    let dir = match tracefs() {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let scratch_dir = scratch("kernel");
    std::fs::create_dir_all(&scratch_dir).unwrap();
    let socket = scratch_dir.join("s.sock");
    let mut child = Command::new(fixture("serve"))
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "serve:target")
        .env("UPROBES_SOCKET", &socket)
        .env("UPROBES_OUTPUT", scratch_dir.join("report"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let req = |line: &str| -> serde_json::Value {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut a = String::new();
        BufReader::new(s).read_line(&mut a).unwrap();
        serde_json::from_str(&a).unwrap()
    };
    let offset = req("list")["probes"][0]["offset"].as_u64().unwrap();
    assert_eq!(req("list")["probes"][0]["state"], "active");
    {
        let k = KernelProbe::new(&dir, "lost", &fixture("serve"), offset);
        k.enable(true);
        k.enable(false);
    }
    let p = &req("list")["probes"][0];
    assert_eq!(p["state"], "lost", "{p}");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&scratch_dir).unwrap();
}

/// The same count as the kernel's for the same instruction of a real program run.
#[test]
fn counts_equal_kernel_uprobes() {
    let dir = match tracefs() {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let (_, leaf_offset, _) = symbol_in_file("counts", "leaf");
    let k = KernelProbe::new(&dir, "leaf", &fixture("counts"), leaf_offset);
    k.enable(true);
    let plain = run_plain("counts", &["4321"]);
    let profile = std::fs::read_to_string(dir.join("uprobe_profile")).unwrap();
    drop(k);
    let kernel: u64 = profile
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("leaf"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{profile}"));
    assert!(!plain.stdout.is_empty());
    let probed = run_probed("counts", &["4321"], "counts:leaf");
    assert_eq!((kernel, probed.hits("leaf")), (4321, 4321));
}

/// The kernel's count of a probe of `KernelProbe` (uprobe_profile), 0 before its first hit.
fn kernel_hits(dir: &Path, name: &str) -> u64 {
    let profile = std::fs::read_to_string(dir.join("uprobe_profile")).unwrap();
    profile
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The `jumps` fixture's five functions in a loop (`busy`), probed, from a private copy of the
/// fixture: the kernel's probes fire in that program alone.
fn busy_jumps(tag: &str) -> (Served, PathBuf, Vec<&'static str>) {
    let dir = scratch(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!("jumps-{tag}"));
    std::fs::copy(fixture("jumps"), &copy).unwrap();
    let name = copy.file_name().unwrap().to_str().unwrap().to_string();
    let funcs = vec!["j_long", "j_short", "j_endbr", "j_push", "j_back"];
    let specs: Vec<String> = funcs.iter().map(|f| format!("{name}:{f}")).collect();
    let s =
        Served::start_program(copy.to_str().unwrap(), &["busy"], &[("UPROBES", &specs.join(";"))]);
    assert_eq!(s.first, "busy\n");
    (s, copy, funcs)
}

/// The probe on function `f` in a `list` answer or a summary (their `probes` arrays).
fn probe_of(v: &serde_json::Value, f: &str) -> serde_json::Value {
    let p = v["probes"].as_array().unwrap().iter().find(|p| p["symbol"] == f).cloned();
    p.unwrap_or_else(|| panic!("no probe on {f}: {v}"))
}

/// The program's rounds so far.
fn rounds(s: &mut Served) -> u64 {
    use std::io::{BufRead, Write};
    let mut a = String::new();
    let _ = writeln!(s.stdin, "count").and_then(|_| s.stdout.read_line(&mut a).map(|_| ()));
    let n = a.trim().strip_prefix("calls ").and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("the program answered {a:?} to count: {:?}", s.child.wait()))
}

/// Let the program run at least `n` more rounds.
fn run_rounds(s: &mut Served, n: u64) {
    let start = rounds(s);
    let t = Instant::now();
    while rounds(s) < start + n {
        assert!(t.elapsed() < WATCHDOG, "the program stopped making rounds");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A kernel uprobe at `offset` of the copy: added, enabled until the kernel counted hits and
/// the program ran on, then taken away; the program runs on after it too. `before_removal` runs
/// while it is there.
fn kernel_probe_comes_and_goes(
    dir: &Path,
    s: &mut Served,
    copy: &Path,
    name: &str,
    offset: u64,
    before_removal: impl FnOnce(&mut Served),
) -> u64 {
    let k = KernelProbe::new(dir, name, copy, offset);
    k.enable(true);
    let t = Instant::now();
    while kernel_hits(dir, name) == 0 {
        assert!(t.elapsed() < WATCHDOG, "the kernel's probe {name} is never hit");
        std::thread::sleep(Duration::from_millis(5));
    }
    run_rounds(s, 2000);
    before_removal(s);
    let hits = kernel_hits(dir, name);
    drop(k);
    run_rounds(s, 2000);
    hits
}

/// The instruction boundaries of the first five bytes of each function of `busy` (the bytes a
/// jump covers): (function, offset in it).
const COVERED: [(&str, u64); 6] =
    [("j_short", 2), ("j_endbr", 4), ("j_push", 1), ("j_push", 4), ("j_back", 1), ("j_back", 4)];

/// Defect: a kernel uprobe (bpftrace, perf probe) on the instruction after a punned jump's
/// (the one whose first bytes are the jump's rel32) turned the jump elsewhere: SIGSEGV at once.
/// Now every such instruction has its stub too: the program runs as without libuprobe, and
/// both libuprobe's count and the kernel's are exact.
#[test]
fn kernel_uprobes_inside_jumps_leave_both_counts_exact() {
    let dir = match tracefs() {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let (mut s, copy, funcs) = busy_jumps("inside");
    let list = s.req("list");
    for p in list["probes"].as_array().unwrap() {
        assert_eq!(p["state"], "active", "{p}");
    }
    for (f, off) in COVERED {
        let base = symbol_in_file("jumps", f).1;
        let name = format!("inside_{}_{f}_{off}", std::process::id());
        let hits = kernel_probe_comes_and_goes(&dir, &mut s, &copy, &name, base + off, |_| {});
        assert!(hits > 0, "{f}+{off}");
    }
    let (rest, report) = s.finish();
    let n: u64 = rest
        .strip_prefix("rounds ")
        .and_then(|r| r.strip_suffix(", every result right\n"))
        .unwrap_or_else(|| panic!("{rest:?}"))
        .parse()
        .unwrap();
    let summary = report.iter().find(|v| v["type"] == "summary").unwrap();
    for f in funcs {
        let p = probe_of(summary, f);
        assert_eq!((f, &p["state"], p["hits"].as_u64()), (f, &"active".into(), Some(n)), "{p}");
    }
    std::fs::remove_dir_all(copy.parent().unwrap()).unwrap();
}

/// Defect: a kernel uprobe on a jump site's first byte, taken away again, left the file's first
/// byte before the jump's others: SIGSEGV, or (`mov eax, imm32` with the jump's rel32 as its
/// immediate) a wrong result and no crash. Now the site is given up to the kernel's probe once
/// that one is hit, and said `lost`; the program runs as without libuprobe.
#[test]
fn kernel_uprobes_on_sites_take_them_and_the_program_runs_on() {
    let dir = match tracefs() {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let (mut s, copy, funcs) = busy_jumps("on");
    let mut jumps = 0;
    for f in &funcs {
        let base = symbol_in_file("jumps", f).1;
        let name = format!("on_{}_{f}", std::process::id());
        let path = probe_of(&s.req("list"), f)["path"].as_str().unwrap().to_string();
        jumps += usize::from(path == "jump");
        let hits = kernel_probe_comes_and_goes(&dir, &mut s, &copy, &name, base, |s| {
            // A jump site is given up once the kernel's probe is there (a trap's int3 is the
            // kernel's too: nothing to see until the kernel takes it away). `lost` shows as soon
            // as the kernel's byte is there; given up, the report says.
            if path != "jump" {
                return;
            }
            let t = Instant::now();
            let spec = format!("jumps-on:{f}");
            loop {
                let report = std::fs::read_to_string(&s.report).unwrap_or_default();
                let given_up = report.lines().any(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                    v["spec"] == spec.as_str()
                        && v["message"].as_str().is_some_and(|m| m.starts_with("lost at"))
                });
                if given_up {
                    break;
                }
                assert!(t.elapsed() < WATCHDOG, "{f}: never given up: {report}");
                std::thread::sleep(Duration::from_millis(5));
            }
            let p = probe_of(&s.req("list"), f);
            assert_eq!(p["state"], "lost", "{p}");
        });
        assert!(hits > 0, "{f}");
    }
    let (rest, report) = s.finish();
    assert!(rest.starts_with("rounds ") && rest.ends_with(", every result right\n"), "{rest:?}");
    let summary = report.iter().find(|v| v["type"] == "summary").unwrap();
    for f in &funcs {
        let p = probe_of(summary, f);
        assert_eq!(p["state"], "lost", "{p}");
    }
    let said = report.iter().filter(|v| {
        v["type"] == "error"
            && v["message"].as_str().is_some_and(|m| m.contains("another tool put a breakpoint"))
    });
    assert_eq!(said.count(), jumps, "{report:?}");
    std::fs::remove_dir_all(copy.parent().unwrap()).unwrap();
}
