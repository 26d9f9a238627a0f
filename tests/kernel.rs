//! libuprobe beside kernel uprobes (root and tracefs needed; skipped, saying so, otherwise): the
//! same counts, and a kernel uprobe that takes libuprobe's breakpoint away is noticed.

mod common;
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
