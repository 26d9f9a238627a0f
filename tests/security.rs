//! Safe on a shared host: nothing another local user controls steers what libuprobe reads, writes
//! or patches. Played as the README's Security section says: uid A the attacker, uid V the victim
//! (numeric uids through `setpriv`, no accounts needed), a setuid and a file-capability program
//! under an /etc/ld.so.preload of a private mount namespace. These need root (skipped, saying so,
//! otherwise).

mod common;
use common::*;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why these tests cannot run here, if they cannot.
fn unable() -> Option<&'static str> {
    if !is_root() {
        return Some("playing other users needs root");
    }
    if !have("setpriv") || !have("unshare") {
        return Some("setpriv and unshare (util-linux) are needed");
    }
    None
}

/// Two numeric uids of nobody's, for this run: (attacker A, victim V).
fn uids() -> (u32, u32) {
    let base = 61000 + (std::process::id() % 1500) * 4;
    (base, base + 1)
}

/// `program ARGS` as `uid` (its own group, no others).
fn as_user(uid: u32, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

fn chown(path: &Path, uid: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::lchown(c.as_ptr(), uid, uid) }, 0, "chown {}", path.display());
}

/// A scratch directory anyone may enter (the other uids run things from it).
fn open_scratch(tag: &str) -> PathBuf {
    let dir = scratch(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The uprobe command (`UPROBE_TEST_BIN` names another build, as `UPROBE_TEST_LIB` does for the
/// library).
fn uprobe() -> PathBuf {
    std::env::var_os("UPROBE_TEST_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_uprobe")), PathBuf::from)
}

/// Give a file the capability CAP_NET_BIND_SERVICE (permitted and effective): what `setcap
/// cap_net_bind_service+ep FILE` writes, without needing setcap.
fn give_file_capability(path: &Path) {
    // struct vfs_cap_data, revision 2: magic_etc (revision | effective), then permitted and
    // inheritable, low and high words.
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(
        &(1u32 << 10) // CAP_NET_BIND_SERVICE
            .to_le_bytes(),
    );
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and name; `v` is readable.
    let r = unsafe {
        libc::setxattr(c.as_ptr(), c"security.capability".as_ptr(), v.as_ptr().cast(), v.len(), 0)
    };
    assert_eq!(r, 0, "setxattr security.capability: {}", std::io::Error::last_os_error());
}

/// Run `inner` (a shell command) in a private mount namespace whose /etc has `files` added (an
/// overlay: the host's /etc is never touched), e.g. an ld.so.preload naming libuprobe.
fn in_namespace(
    scratch_dir: &Path,
    files: &[(&str, &str, u32)],
    inner: &str,
) -> (String, String, std::process::ExitStatus) {
    let upper = scratch_dir.join("etc-upper");
    let work = scratch_dir.join("etc-work");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    for (name, text, owner) in files {
        let p = upper.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        chown(&p, *owner);
    }
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc && {inner}",
        upper.display(),
        work.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script]);
    let out = run_command(cmd);
    let _ = std::fs::remove_dir_all(&upper);
    let _ = std::fs::remove_dir_all(&work);
    out
}

/// Item 1: a setuid program (and a file-capability one) started by another user ignores every
/// UPROBES* variable and stays idle; the administrator's root-owned /etc/libuprobe.conf is the one
/// source it honours. Before the fix, the report was appended to a root-owned file named by
/// UPROBES_OUTPUT and a root-owned symbolic link was replaced by the socket.
#[test]
fn a_secure_execution_program_obeys_only_the_administrator() {
    if let Some(why) = unable() {
        return eprintln!("skipped: {why}");
    }
    let (attacker, _) = uids();
    let _cleanup = TmpOf(attacker);
    let dir = open_scratch("secure");
    let setuid = dir.join("secure-setuid");
    let filecap = dir.join("secure-filecap");
    for p in [&setuid, &filecap] {
        std::fs::copy(fixture("secure"), p).unwrap();
        chown(p, 0);
    }
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(&filecap, std::fs::Permissions::from_mode(0o755)).unwrap();
    give_file_capability(&filecap);
    let victim = dir.join("root-owned.txt");
    std::fs::write(&victim, "root's data\n").unwrap();
    let link = dir.join("root-owned-link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let preload = format!("{}\n", lib().display());
    let hostile_env = format!(
        "env UPROBES=secure:main UPROBES_OUTPUT={} UPROBES_SOCKET={} UPROBES_FORMAT=json \
         UPROBES_FOLDED={} UPROBES_STACKS=1 XDG_RUNTIME_DIR={}",
        victim.display(),
        link.display(),
        victim.display(),
        dir.display()
    );
    let run_as_attacker = |program: &Path, files: &[(&str, &str, u32)]| {
        let inner = format!(
            "exec setpriv --reuid={attacker} --regid={attacker} --clear-groups {hostile_env} {} 1000",
            program.display()
        );
        in_namespace(&dir, files, &inner)
    };
    let untouched = |what: &str| {
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's data\n", "{what}");
        assert_eq!(std::fs::read_link(&link).unwrap(), victim, "{what}: the link is as it was");
    };
    for program in [&setuid, &filecap] {
        let name = program.file_name().unwrap().to_string_lossy().into_owned();
        // Idle: no thread of libuprobe's, nothing written, nothing said.
        let (stdout, stderr, status) = run_as_attacker(program, &[("ld.so.preload", &preload, 0)]);
        assert!(status.success(), "{name}: {status:?}\n{stderr}");
        assert_eq!(
            stdout, "secure 1\nwork 1000 3497500\nthreads 1\nlibuprobe mapped\n",
            "{name}: stderr:\n{stderr}"
        );
        assert_eq!(stderr, "", "{name}");
        untouched(&name);
        // The administrator's file: its probes, its report file; the environment still ignored.
        let report = dir.join(format!("admin-{name}.jsonl"));
        let conf = format!(
            "# libuprobe for every process\nUPROBES=secure:work\nUPROBES_FORMAT=json\n\
             UPROBES_OUTPUT={}\nUPROBES_SOCKET=none\n",
            report.display()
        );
        let files = [("ld.so.preload", preload.as_str(), 0), ("libuprobe.conf", conf.as_str(), 0)];
        let (stdout, stderr, status) = run_as_attacker(program, &files);
        assert!(status.success(), "{name}: {status:?}\n{stderr}");
        assert!(stdout.starts_with("secure 1\nwork 1000 3497500\n"), "{name}: {stdout}");
        let text =
            std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{name}: {e}: {stderr}"));
        // setpriv and env are preloaded too, and write their own summaries: the program's.
        let summary: Value = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["type"] == "summary" && v["comm"] == name.as_str())
            .unwrap_or_else(|| panic!("{name}: no summary in {text}"));
        let probes = summary["probes"].as_array().unwrap();
        assert_eq!(probes.len(), 1, "{name}: only the administrator's probes: {summary}");
        assert_eq!(
            (probes[0]["spec"].as_str(), probes[0]["hits"].as_u64()),
            (Some("secure:work"), Some(1000))
        );
        untouched(&name);
        // A file that is not root's is not the administrator's: idle again.
        let files =
            [("ld.so.preload", preload.as_str(), 0), ("libuprobe.conf", conf.as_str(), attacker)];
        let _ = std::fs::remove_file(&report);
        let (stdout, _, status) = run_as_attacker(program, &files);
        assert!(status.success());
        assert!(stdout.contains("threads 1\n"), "{name}: {stdout}");
        assert!(!report.exists(), "{name}: an attacker's libuprobe.conf was honoured");
        untouched(&name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Removes what a test made in /tmp for uid `v`, whoever made it.
struct TmpOf(u32);

impl Drop for TmpOf {
    fn drop(&mut self) {
        let v = self.0;
        for e in std::fs::read_dir("/tmp").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == format!("uprobe-{v}")
                || name.starts_with(&format!("uprobe-{v}-"))
                || name.starts_with(&format!("uprobe-{v}."))
            {
                let p = e.path();
                if p.is_symlink() || !p.is_dir() {
                    let _ = std::fs::remove_file(&p);
                } else {
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
    }
}

/// A child killed when dropped (a test that fails must not leave it running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A line-driven fixture run as `uid`, with libuprobe preloaded; its stderr collected.
struct AsUser {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    stderr: std::thread::JoinHandle<String>,
}

impl AsUser {
    fn start(uid: u32, name: &str, env: &[(&str, &str)]) -> AsUser {
        let mut cmd = as_user(uid, &fixture(name), &[]);
        cmd.env("LD_PRELOAD", lib()).env_remove("XDG_RUNTIME_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        AsUser { child, stdin, stdout, stderr }
    }

    fn order(&mut self, line: &str) -> String {
        self.stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        answer
    }

    /// Its pid, once its socket is served somewhere.
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn quit(mut self) -> (std::process::ExitStatus, String) {
        let _ = self.stdin.write_all(b"quit\n");
        drop(self.stdin);
        let status = self.child.wait().unwrap();
        (status, self.stderr.join().unwrap())
    }
}

/// The socket of `pid` once it is there, in the directories of `uid` (a fallback's included).
fn wait_socket(uid: u32, pid: i32) -> PathBuf {
    let start = Instant::now();
    loop {
        for e in std::fs::read_dir("/tmp").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("uprobe-{uid}")) {
                let s = e.path().join(format!("{pid}.sock"));
                if s.exists() && e.metadata().is_ok_and(|m| m.uid() == uid) {
                    return s;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket of process {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fake control server run as `uid` by python3 at `path`: every request gets `stats` (a JSON
/// line) or, for `metrics`, `metrics` (text). With `flood`, answers never end.
fn fake_server(
    uid: u32,
    path: &Path,
    stats: &str,
    metrics: &str,
    flood: bool,
) -> std::process::Child {
    let script = r#"
import os, socket, sys, threading
path, stats, metrics, flood = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
stats = stats.replace("PID", str(os.getpid()))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try: os.unlink(path)
except OSError: pass
s.bind(path)
os.chmod(path, 0o777)
s.listen(64)
def serve(c):
    try:
        req = c.makefile("rb").readline()
        if flood:
            chunk = (b"x_total 1\n" if req.startswith(b"metrics") else b"a") * 65536
            while True: c.sendall(chunk)
        c.sendall((metrics if req.startswith(b"metrics") else stats).encode())
    except OSError: pass
    finally: c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let python = PathBuf::from("/usr/bin/python3");
    let mut cmd = as_user(uid, &python, &["-c", script]);
    cmd.arg(path).arg(stats).arg(metrics).arg(if flood { "1" } else { "0" });
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "the fake server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on loopback; the body.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("{e} (after {text:?})"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(format!("not HTTP: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_string());
    }
    Ok(body.to_string())
}

/// The exporter run as `uid` on `port`, killed when dropped.
struct Exporter(std::process::Child);

impl Exporter {
    fn start(uid: u32, port: u16) -> Exporter {
        let mut cmd =
            as_user(uid, &uprobe(), &["exporter", "--listen", &format!("127.0.0.1:{port}")]);
        let child = cmd
            .env_remove("XDG_RUNTIME_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "the exporter did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Exporter(child)
    }

    fn status(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item 2: another user made `/tmp/uprobe-<V>` first (mode 0777) and put a socket of theirs in it.
/// V's process puts its socket elsewhere, says where, and V's `uprobe ctl`, `ps` and `exporter`
/// show V's real counts, never the forged ones; a server that floods gets nowhere.
#[test]
fn another_users_socket_directory_is_never_used() {
    if let Some(why) = unable() {
        return eprintln!("skipped: {why}");
    }
    if !Path::new("/usr/bin/python3").exists() {
        return eprintln!("skipped: python3 plays the fake servers");
    }
    let (attacker, victim) = uids();
    let _cleanup = (TmpOf(victim), TmpOf(attacker));
    let planted = PathBuf::from(format!("/tmp/uprobe-{victim}"));
    let status =
        as_user(attacker, Path::new("/bin/mkdir"), &["-m", "0777"]).arg(&planted).status().unwrap();
    assert!(status.success());
    let mut v =
        AsUser::start(victim, "serve", &[("UPROBES", "serve:target"), ("UPROBES_FORMAT", "json")]);
    assert_eq!(v.order("call 500"), "done 500\n");
    let pid = v.pid();
    let real = wait_socket(victim, pid);
    assert_ne!(real.parent().unwrap(), planted, "the socket went into the planted directory");
    let forged = Killed(fake_server(
        attacker,
        &planted.join(format!("{pid}.sock")),
        "{\"ok\":true,\"pid\":1,\"hits\":31337,\"probes\":[{\"id\":1,\"spec\":\"serve:target\",\"hits\":31337,\"state\":\"active\"}]}\n",
        "# TYPE forged_by_uid_A counter\nforged_by_uid_A 1\n\n",
        false,
    ));
    let ctl = run_command({
        let mut c = as_user(victim, &uprobe(), &["ctl", "--json", &pid.to_string(), "stats"]);
        c.env_remove("XDG_RUNTIME_DIR");
        c
    });
    assert!(ctl.2.success(), "{ctl:?}");
    let answer: Value = serde_json::from_str(&ctl.0).unwrap();
    assert_eq!(answer["hits"], 500, "{answer}");
    let ps = run_command({
        let mut c = as_user(victim, &uprobe(), &["ps"]);
        c.env_remove("XDG_RUNTIME_DIR");
        c
    });
    let row: Vec<&str> =
        ps.0.lines().filter(|l| l.split_whitespace().next() == Some(&pid.to_string())).collect();
    assert_eq!(row.len(), 1, "{}", ps.0);
    assert_eq!(row[0].split_whitespace().nth(2), Some("500"), "{}", ps.0);
    assert!(!ps.0.contains("31337"), "{}", ps.0);
    let port = free_port();
    let exporter = Exporter::start(victim, port);
    let metrics = http_get(port, "/metrics").unwrap();
    assert!(!metrics.contains("forged"), "{metrics}");
    let hits: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("uprobe_hits_total{{pid=\"{pid}\"")))
        .collect();
    assert_eq!(hits.len(), 1, "{metrics}");
    assert!(hits[0].ends_with(" 500"), "{metrics}");
    // A server of V's own that floods: `ctl` gives up with a message, the exporter stays bounded
    // and serves the rest.
    let flood_path = real.parent().unwrap().join("flood.sock");
    let flood = Killed(fake_server(victim, &flood_path, "", "", true));
    let flood_pid = flood.0.id();
    std::fs::rename(&flood_path, real.parent().unwrap().join(format!("{flood_pid}.sock"))).unwrap();
    let ctl = run_command({
        let mut c = as_user(victim, &uprobe(), &["ctl", "--json", &flood_pid.to_string(), "stats"]);
        c.env_remove("XDG_RUNTIME_DIR");
        c
    });
    assert!(!ctl.2.success() && ctl.1.contains("longer than"), "{ctl:?}");
    for _ in 0..3 {
        let metrics = http_get(port, "/metrics").unwrap();
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!("uprobe_hits_total{{pid=\"{pid}\""))),
            "{metrics}"
        );
    }
    let peak_kb = exporter.status("VmHWM:");
    assert!(peak_kb < 200 * 1024, "the exporter grew to {peak_kb} kB");
    drop(flood);
    drop(exporter);
    drop(forged);
    let (status, stderr) = v.quit();
    assert!(status.success(), "{stderr}");
    let notices: Vec<&str> =
        stderr.lines().filter(|l| l.contains(&format!("/tmp/uprobe-{victim} "))).collect();
    assert_eq!(notices.len(), 1, "{stderr}");
    assert!(
        notices[0].contains("belongs to uid")
            && notices[0].contains(&format!("using {}", real.parent().unwrap().display())),
        "{stderr}"
    );
}

/// libuprobe's integrity check of a cache entry's payload (objects::cache::check): rustc's
/// FxHasher over the length and the bytes, as the cache writes it.
fn cache_check(payload: &[u8]) -> u64 {
    const K: u64 = 0xf135_7aea_2e62_a9c5;
    let mut h = 0u64;
    let mut add = |w: u64| h = (h.rotate_left(26) ^ w).wrapping_mul(K);
    add(payload.len() as u64);
    let mut chunks = payload.chunks_exact(8);
    for c in &mut chunks {
        add(u64::from_le_bytes(c.try_into().unwrap()));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        add(u64::from_le_bytes(w) ^ (rest.len() as u64) << 56);
    }
    h.rotate_left(20)
}

/// The cache entry of `file` in `cache_dir`.
fn cache_entry(cache_dir: &Path, file: &Path) -> PathBuf {
    let m = std::fs::metadata(file).unwrap();
    let prefix = format!("{:x}-{:x}-", m.dev(), m.ino());
    std::fs::read_dir(cache_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(".elf")
        })
        .unwrap_or_else(|| {
            panic!("no cache entry of {} in {}", file.display(), cache_dir.display())
        })
}

/// `entry` (a cache entry's bytes) with function `name` moved by `by` bytes, still well formed
/// (in order) and with a right integrity check: what someone able to write the entry would make.
fn poisoned(entry: &[u8], name: &str, by: u64) -> Vec<u8> {
    // Format 2 (an older libuprobe's, for checking that a test fails without the fix) had no
    // integrity check.
    let checked = match &entry[..8] {
        b"UPRBC\x00\x00\x03" => true,
        b"UPRBC\x00\x00\x02" => false,
        other => panic!("not a cache entry: {other:?}"),
    };
    let head = if checked { 16 } else { 8 };
    let payload = &entry[head..];
    if checked {
        let sum = u64::from_le_bytes(entry[8..16].try_into().unwrap());
        assert_eq!(cache_check(payload), sum, "the check as the cache makes it");
    }
    // soname, segments, sections, then the count of records and the records (40 bytes each).
    let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().unwrap());
    let mut at = if payload[0] == 1 { 1 + 8 + u64_at(1) as usize } else { 1 };
    let nseg = u64_at(at) as usize;
    at += 8 + nseg * 25;
    let nsec = u64_at(at) as usize;
    at += 8;
    for _ in 0..nsec {
        at += 8 + u64_at(at) as usize + 24;
    }
    let n = u64_at(at) as usize;
    let recs = at + 8;
    let u32_at = |r: usize, k: usize| {
        u32::from_le_bytes(payload[r + k..r + k + 4].try_into().unwrap()) as usize
    };
    let i = (0..n)
        .find(|&i| {
            let r = recs + i * 40;
            let (from, len) = (u32_at(r, 16), u32_at(r, 20));
            &payload[recs + from..recs + from + len] == name.as_bytes()
        })
        .unwrap_or_else(|| panic!("no record of {name}"));
    let r = recs + i * 40;
    let vaddr = u64_at(r) + by;
    assert!(i + 1 == n || u64_at(r + 40) >= vaddr, "{name} moved by {by} would come out of order");
    let mut payload = payload.to_vec();
    payload[r..r + 8].copy_from_slice(&vaddr.to_le_bytes());
    let mut out = entry[..8].to_vec();
    if checked {
        out.extend_from_slice(&cache_check(&payload).to_le_bytes());
    }
    out.extend_from_slice(&payload);
    out
}

/// Item 3: a cache entry never decides where code is written unless the file says the same. One
/// function moved by 12 bytes (a decodable entry, with its integrity check made right) would patch
/// the middle of an instruction (`main` + 12 is inside `mov $0x3e8, %r13d` in this build); it is
/// found out, the file parsed again, the entry rewritten.
/// A damaged entry (a byte flipped) is ignored too.
#[test]
fn a_poisoned_cache_entry_decides_nothing() {
    let dir = scratch("cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = [("XDG_RUNTIME_DIR", dir.to_str().unwrap())];
    let plain = run_plain("counts", &["4321"]);
    let first = run_probed_env("counts", &["4321"], "counts:leaf;counts:main", &env);
    assert_same_behaviour(&plain, &first);
    assert_eq!((first.hits("leaf"), first.hits("main")), (4321, 1));
    let entry_path = cache_entry(&dir.join("uprobe/cache"), &fixture("counts"));
    let good = std::fs::read(&entry_path).unwrap();
    let bad = poisoned(&good, "main", 12);
    std::fs::write(&entry_path, &bad).unwrap();
    let probed = run_probed_env("counts", &["4321"], "counts:leaf;counts:main", &env);
    assert_same_behaviour(&plain, &probed);
    assert_eq!((probed.hits("leaf"), probed.hits("main")), (4321, 1));
    assert_eq!(
        probed.probe("main")["offset"],
        first.probe("main")["offset"],
        "where main is, as the file says"
    );
    assert_eq!(
        std::fs::read(&entry_path).unwrap(),
        good,
        "the entry is written again from the file"
    );
    let mut damaged = good.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x55;
    std::fs::write(&entry_path, &damaged).unwrap();
    let probed = run_probed_env("counts", &["4321"], "counts:leaf;counts:main", &env);
    assert_same_behaviour(&plain, &probed);
    assert_eq!((probed.hits("leaf"), probed.hits("main")), (4321, 1));
    assert_eq!(std::fs::read(&entry_path).unwrap(), good);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Item 3, as another user plays it: uid A's symbolic link `/tmp/uprobe-<V>`, switched as fast as
/// A can between a directory of V's (which passes every check) and one of A's own holding a
/// poisoned entry. V's processes never use a directory through a link: every run counts exactly.
#[test]
fn a_symlink_race_on_the_cache_finds_nothing() {
    if let Some(why) = unable() {
        return eprintln!("skipped: {why}");
    }
    let (attacker, victim) = uids();
    let (attacker, victim) = (attacker + 2, victim + 2);
    let _cleanup = TmpOf(victim);
    let dir = open_scratch("race");
    let victims = dir.join("victims");
    let attackers = dir.join("attackers");
    for (d, owner, mode) in [(&victims, victim, 0o700), (&attackers, attacker, 0o755)] {
        std::fs::create_dir_all(d.join("uprobe/cache")).unwrap();
        for p in [d.clone(), d.join("uprobe"), d.join("uprobe/cache")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            chown(&p, owner);
        }
    }
    let run = |env: &[(&str, &str)]| {
        let mut cmd = as_user(victim, &fixture("counts"), &["4321"]);
        cmd.env("LD_PRELOAD", lib())
            .env("UPROBES", "counts:leaf;counts:main")
            .env("UPROBES_FORMAT", "json")
            .env_remove("XDG_RUNTIME_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_command(cmd)
    };
    // V's own entry, made in V's directory; A's copy of it, poisoned, in A's.
    let plain = run_plain("counts", &["4321"]);
    let made = run(&[("XDG_RUNTIME_DIR", victims.to_str().unwrap())]);
    assert_eq!(made.2.code(), plain.status.code(), "{made:?}");
    let good =
        std::fs::read(cache_entry(&victims.join("uprobe/cache"), &fixture("counts"))).unwrap();
    let name = cache_entry(&victims.join("uprobe/cache"), &fixture("counts"))
        .file_name()
        .unwrap()
        .to_owned();
    let planted = attackers.join("uprobe/cache").join(&name);
    std::fs::write(&planted, poisoned(&good, "main", 12)).unwrap();
    chown(&planted, attacker);
    let planted_bytes = std::fs::read(&planted).unwrap();
    // A's switcher.
    let link = format!("/tmp/uprobe-{victim}");
    let script = format!(
        "while :; do ln -sfn {v} {link}.t && mv -T {link}.t {link}; ln -sfn {a} {link}.t && mv -T {link}.t {link}; done",
        v = victims.join("uprobe").display(),
        a = attackers.join("uprobe").display()
    );
    let switcher =
        Killed(as_user(attacker, Path::new("/bin/sh"), &["-c", &script]).spawn().unwrap());
    for i in 0..60 {
        let (stdout, stderr, status) = run(&[]);
        assert_eq!(
            (status.code(), stdout.as_str()),
            (plain.status.code(), plain.stdout.as_str()),
            "run {i}: {stderr}"
        );
        // setpriv's summary first (it is preloaded too), then the program's.
        let summary: Value = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "summary" && v["comm"] == "counts")
            .unwrap_or_else(|| panic!("run {i}: {stderr}"));
        assert_eq!(
            (&summary["probes"][0]["hits"], &summary["probes"][1]["hits"]),
            (&4321.into(), &1.into()),
            "run {i}: {stderr}"
        );
    }
    drop(switcher);
    assert_eq!(std::fs::read(&planted).unwrap(), planted_bytes);
    let _ = std::fs::remove_file(format!("{link}.t"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Item 4: a report file in a sticky directory others may write (`/tmp`) is never reached through
/// another user's symbolic link, nor is another user's file there appended to (the rules of
/// fs.protected_symlinks and protected_regular, whatever this host's settings): said on stderr,
/// and the report goes to stderr instead. `uprobe run -o` refuses the same. A link of the user's
/// own is followed.
#[test]
fn report_files_never_follow_a_planted_link() {
    if let Some(why) = unable() {
        return eprintln!("skipped: {why}");
    }
    let (attacker, victim) = uids();
    let (attacker, victim) = (attacker + 4, victim + 4);
    let _cleanup = TmpOf(victim);
    let home = open_scratch("home");
    chown(&home, victim);
    let profile = home.join(".profile");
    std::fs::write(&profile, "# V's profile\n").unwrap();
    chown(&profile, victim);
    let tag = format!("{}-{}", std::process::id(), attacker);
    let link = PathBuf::from(format!("/tmp/uprobe-test-report-{tag}.txt"));
    let file = PathBuf::from(format!("/tmp/uprobe-test-report-{tag}.file"));
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&file);
    std::os::unix::fs::symlink(&profile, &link).unwrap();
    chown(&link, attacker);
    std::fs::write(&file, "A's file\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    chown(&file, attacker);
    let run_as_v = |output: &Path| {
        let mut cmd = as_user(victim, &fixture("counts"), &["100"]);
        cmd.env("LD_PRELOAD", lib())
            .env("UPROBES", "counts:leaf")
            .env("UPROBES_OUTPUT", output)
            .env_remove("XDG_RUNTIME_DIR");
        run_command(cmd)
    };
    let plain = run_plain("counts", &["100"]);
    for planted in [&link, &file] {
        let (stdout, stderr, status) = run_as_v(planted);
        assert_eq!((status.code(), &stdout), (plain.status.code(), &plain.stdout), "{stderr}");
        assert!(stderr.contains("in a directory others may write"), "{stderr}");
        assert!(stderr.contains("writing it to stderr instead"), "{stderr}");
        assert!(stderr.contains("counts:leaf"), "the report on stderr: {stderr}");
    }
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), "# V's profile\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "A's file\n");
    // `uprobe run -o` would have truncated it.
    let mut cmd = as_user(victim, &uprobe(), &["run", "-o"]);
    cmd.arg(&link).args(["-p", "counts:leaf", "--"]).arg(fixture("counts"));
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(127), "{stderr}");
    assert!(stderr.contains("symbolic link of uid"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), "# V's profile\n");
    // V's own link is V's to follow.
    let own = PathBuf::from(format!("/tmp/uprobe-test-report-{tag}.own"));
    let _ = std::fs::remove_file(&own);
    std::os::unix::fs::symlink(home.join("report.txt"), &own).unwrap();
    chown(&own, victim);
    let (_, stderr, status) = run_as_v(&own);
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(std::fs::read_to_string(home.join("report.txt")).unwrap().contains("counts:leaf"));
    for p in [&link, &file, &own] {
        let _ = std::fs::remove_file(p);
    }
    std::fs::remove_dir_all(&home).unwrap();
}

/// Item 5: 300 idle connections and a stopped process whose socket's backlog is full starve no
/// scrape: the exporter answers, with the live process's counts and an error for the stopped
/// one, from a bounded number of threads.
#[test]
fn the_exporter_cannot_be_starved() {
    if let Some(why) = unable() {
        return eprintln!("skipped: {why}");
    }
    let (_, victim) = uids();
    let victim = victim + 6;
    let _cleanup = TmpOf(victim);
    let mut live = AsUser::start(victim, "serve", &[("UPROBES", "serve:target")]);
    assert_eq!(live.order("call 300"), "done 300\n");
    let mut stopped = AsUser::start(victim, "serve", &[("UPROBES", "serve:target")]);
    assert_eq!(stopped.order("call 5"), "done 5\n");
    let stopped_socket = wait_socket(victim, stopped.pid());
    wait_socket(victim, live.pid());
    // SAFETY: stopping a child of ours.
    unsafe { libc::kill(stopped.pid(), libc::SIGSTOP) };
    // Fill its backlog: connections nobody accepts, until the kernel refuses more.
    let mut held = Vec::new();
    for _ in 0..1000 {
        match connect_nonblocking(&stopped_socket) {
            Some(s) => held.push(s),
            None => break,
        }
    }
    assert!(held.len() < 1000, "the backlog never filled");
    let port = free_port();
    let exporter = Exporter::start(victim, port);
    let idle: Vec<std::net::TcpStream> =
        (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert_eq!(idle.len(), 300);
    let metrics = http_get(port, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&format!("uprobe_hits_total{{pid=\"{}\"", live.pid()))
                && l.ends_with(" 300")),
        "{metrics}"
    );
    let errors =
        metrics.lines().find(|l| l.starts_with("uprobe_exporter_scrape_errors_total ")).unwrap();
    assert_ne!(errors, "uprobe_exporter_scrape_errors_total 0", "{metrics}");
    assert!(exporter.status("Threads:") <= 3, "threads: {}", exporter.status("Threads:"));
    drop(idle);
    drop(held);
    // SAFETY: continuing a child of ours.
    unsafe { libc::kill(stopped.pid(), libc::SIGCONT) };
    drop(exporter);
    let (s1, e1) = live.quit();
    let (s2, e2) = stopped.quit();
    assert!(s1.success() && s2.success(), "{e1}\n{e2}");
}

/// A connection to a Unix socket, or None when the kernel refuses more (a full backlog).
fn connect_nonblocking(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_encoded_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    // SAFETY: a descriptor we own.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid address of that size.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    (r == 0).then_some(owned)
}

/// Item 6 (and the invisibility issue's credentials item): libuprobe's threads hold exactly what
/// the program's thread does after each change it makes, never more (a client of the control
/// socket would talk to a thread that kept root's capabilities) nor less (glibc's setuid
/// broadcast would abort the process): a capset drop, keep-caps and setresuid then capset as
/// setpriv does, no_new_privs, a raw setresuid. After a seccomp filter, libuprobe's threads end;
/// the probes go on counting.
#[test]
fn runtime_threads_follow_the_programs_privileges() {
    if !is_root() {
        return eprintln!("skipped: the privilege changes need root");
    }
    for mode in ["capset", "keepcaps", "nnp", "rawuid", "seccomp"] {
        let plain = run_plain("creds", &[mode]);
        assert!(plain.stdout.contains(&format!("{mode}: agree\n")), "{mode}: {}", plain.stdout);
        let probed = run_probed("creds", &[mode], "creds:work");
        assert_same_behaviour(&plain, &probed);
        assert_eq!(probed.hits("work"), 1000, "{mode}");
        let threads: Vec<u32> = probed
            .stderr
            .lines()
            .filter_map(|l| l.strip_prefix("threads ")?.parse().ok())
            .collect();
        let after = *threads.last().unwrap();
        if mode == "seccomp" {
            assert_eq!(after, 1, "{mode}: libuprobe's threads end after a seccomp filter");
            assert!(
                probed.errors().iter().any(|e| e.contains("seccomp filter")),
                "{:?}",
                probed.errors()
            );
        } else {
            assert!(after >= 2, "{mode}: libuprobe's threads were compared too: {threads:?}");
        }
    }
}

/// Real programs that change credentials, preloaded with probes: setpriv (which aborted: glibc's
/// setxid broadcast failed in libuprobe's thread), su, runuser and capsh exit and print as
/// without libuprobe.
#[test]
fn privilege_tools_run_as_without_libuprobe() {
    if !is_root() {
        return eprintln!("skipped: the privilege tools need root");
    }
    let cases: &[&[&str]] = &[
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "id"],
        &["setpriv", "--reuid=65534", "--regid=65534", "--init-groups", "--inh-caps=-all", "id"],
        &["su", "-s", "/bin/sh", "nobody", "-c", "id; grep Cap /proc/self/status"],
        &["runuser", "-u", "nobody", "--", "id"],
        &[
            "capsh",
            "--caps=cap_setuid,cap_setgid+ep",
            "--keep=1",
            "--user=nobody",
            "--",
            "-c",
            "id",
        ],
        &["capsh", "--drop=cap_net_raw", "--", "-c", "grep Cap /proc/self/status"],
    ];
    for args in cases {
        if !have(args[0]) {
            eprintln!("skipped {}: not installed", args[0]);
            continue;
        }
        let plain = run_command({
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        });
        for spec in ["", "libc.so.6:malloc", "libc.so.6:*"] {
            let mut c = Command::new(args[0]);
            c.args(&args[1..])
                .env("LD_PRELOAD", lib())
                .env("UPROBES", spec)
                .env("UPROBES_OUTPUT", "/dev/null");
            let probed = run_command(c);
            assert_eq!(
                (probed.2.code(), &probed.0),
                (plain.2.code(), &plain.0),
                "{args:?} under {spec:?}: {}",
                probed.1
            );
        }
    }
}

/// The PostgreSQL server's binaries (Debian's postgresql package), if installed.
fn postgres_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// Defect: PostgreSQL started through setpriv (as an init script or a container entry point
/// does, dropping root for the server's own user) never started: setpriv aborted in glibc's
/// setxid broadcast. A cluster made and started as `nobody` under `libc.so.6:malloc` and
/// `libc.so.6:*`, every server process preloaded, answers a query as without libuprobe, and
/// stops cleanly.
#[test]
fn postgres_started_through_setpriv_runs_as_without_libuprobe() {
    if !is_root() || !have("setpriv") {
        return eprintln!("skipped: needs root and setpriv");
    }
    let Some(bin) = postgres_bin() else {
        return eprintln!("skipped: PostgreSQL is not installed (Debian's postgresql)");
    };
    let dir = open_scratch("postgres");
    chown(&dir, 65534);
    let data = dir.join("data");
    let nobody = |program: &Path| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(program);
        c
    };
    let mut initdb = nobody(&bin.join("initdb"));
    initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "test", "--no-sync"]);
    let made = run_command(initdb);
    assert!(made.2.success(), "initdb: {}", made.1);
    let socket_dir = dir.to_str().unwrap();
    let query = |spec: Option<&str>| {
        let mut start = nobody(&bin.join("pg_ctl"));
        start.arg("-D").arg(&data).args(["-w", "-l"]).arg(dir.join("log")).args([
            "-o",
            &format!("-k {socket_dir} -c listen_addresses=''"),
            "start",
        ]);
        if let Some(spec) = spec {
            start
                .env("LD_PRELOAD", lib())
                .env("UPROBES", spec)
                .env("UPROBES_OUTPUT", dir.join("report"));
        }
        let started = run_command(start);
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        assert!(started.2.success(), "{spec:?}: pg_ctl start: {}\n{log}", started.1);
        let mut psql = nobody(&bin.join("psql"));
        psql.args(["-h", socket_dir, "-U", "test", "-d", "postgres", "-A", "-t", "-c"])
            .arg("select count(*), sum(g) from generate_series(1, 1000) g");
        let answer = run_command(psql);
        let mut stop = nobody(&bin.join("pg_ctl"));
        stop.arg("-D").arg(&data).args(["-w", "-m", "fast", "stop"]);
        let stopped = run_command(stop);
        assert!(stopped.2.success(), "{spec:?}: pg_ctl stop: {}", stopped.1);
        (answer.0, answer.2.code())
    };
    let plain = query(None);
    assert_eq!(plain, ("1000|500500\n".to_string(), Some(0)));
    for spec in ["libc.so.6:malloc", "libc.so.6:*"] {
        assert_eq!(query(Some(spec)), plain, "under {spec}");
        let report = std::fs::read_to_string(dir.join("report")).unwrap_or_default();
        assert!(report.contains("malloc"), "the server's processes reported: {report}");
        let _ = std::fs::remove_file(dir.join("report"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
