//! The control socket: add, remove, list and count probes while the program runs.
//!
//! A runtime thread of its own serves a Unix stream socket (never an abstract one): by default
//! `$XDG_RUNTIME_DIR/uprobe/<pid>.sock`, else `/tmp/uprobe-<uid>/<pid>.sock`, in a directory made
//! 0700, the socket 0600; `UPROBES_SOCKET` overrides the path (`%p` becomes the pid; a forked child
//! whose path has no `%p` appends `.<pid>`), and `UPROBES_SOCKET=none` turns the server off.
//!
//! Protocol: one request per line, one JSON object per line in answer (see README). The server
//! never trusts a client: the peer's credentials are checked on every connection (same uid or
//! root), a line is at most [`MAX_LINE`] bytes, at most [`MAX_CLIENTS`] clients are served at once,
//! a client idle for [`IDLE`] is dropped, and all I/O is non-blocking from one `poll` loop, so no
//! client can hold the server, and the program's own threads never wait on it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{probes, report, spec, sys, InRuntime};

/// The longest request line, newline excluded.
pub const MAX_LINE: usize = 4096;
/// Clients served at once; more are answered with an error and dropped.
pub const MAX_CLIENTS: usize = 256;
/// A client that sends nothing for this long is dropped.
pub const IDLE: Duration = Duration::from_secs(10);
/// Answers a client has not read, beyond which it is dropped.
const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// The socket this process serves, removed at exit.
static SOCKET: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Where this process's socket goes, or None when the server is off.
fn socket_path(forked: bool) -> Option<PathBuf> {
    let pid = sys::getpid();
    match std::env::var("UPROBES_SOCKET") {
        Ok(v) if v == "none" || v == "off" => None,
        Ok(v) if !v.is_empty() => {
            let mut p = v.replace("%p", &pid.to_string());
            if forked && !v.contains("%p") {
                p = format!("{p}.{pid}");
            }
            Some(PathBuf::from(p))
        }
        // SAFETY: geteuid cannot fail.
        _ => Some(crate::socket_path::default_socket(unsafe { libc::geteuid() }, pid)),
    }
}

/// Start the server thread. `forked`: in a child after fork (the parent's thread does not exist
/// here, and the parent's socket is the parent's).
pub fn start(forked: bool, output: &report::Output) {
    let Some(path) = socket_path(forked) else { return };
    match bind(&path) {
        Ok(listener) => {
            *SOCKET.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
            let spawned = std::thread::Builder::new()
                .name("uprobe-ctl".into())
                .spawn(move || serve(listener, path));
            if let Err(e) = spawned {
                output.problem("control socket", &format!("cannot start the server thread: {e}"));
            }
        }
        Err(e) => output.problem("control socket", &format!("{}: {e}", path.display())),
    }
}

/// Remove this process's socket (at exit, and before exec replaces the image).
pub fn remove_socket() {
    let mut guard = SOCKET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = guard.take() {
        let _ = std::fs::remove_file(path);
    }
}

/// After fork: the child has no server thread and must not remove the parent's socket.
pub fn forget_socket_after_fork() {
    if let Ok(mut guard) = SOCKET.try_lock() {
        guard.take();
    }
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let meta = std::fs::metadata(dir)?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if std::os::unix::fs::MetadataExt::uid(&meta) != me {
            return Err(std::io::Error::other(format!(
                "{} belongs to another user",
                dir.display()
            )));
        }
    }
    // A socket left by a dead process with our pid: replace it. Anything else: leave it alone.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::other("exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::other("another live process serves this socket"));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    last: Instant,
    closing: bool,
}

fn serve(listener: UnixListener, path: PathBuf) {
    // A runtime thread for life: traps taken here run no consumers, and it takes no signal the
    // program may want (SIGTRAP stays open: probes on functions it calls must resume).
    let _rt = InRuntime::enter();
    let keep = [libc::SIGTRAP, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];
    let mask = keep.iter().fold(!0u64, |m, &s| m & !sys::sigbit(s));
    let _ = sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&mask), None);
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let mut fds =
            vec![libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        for c in &clients {
            let events = libc::POLLIN | if c.output.is_empty() { 0 } else { libc::POLLOUT };
            fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
        }
        if sys::poll(&mut fds, 1000).is_err() {
            continue;
        }
        if fds[0].revents != 0 {
            accept_all(&listener, &mut clients);
        }
        let now = Instant::now();
        for (c, pfd) in clients.iter_mut().zip(&fds[1..]) {
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                read_requests(c);
            }
            if !c.output.is_empty() {
                match c.stream.write(&c.output) {
                    Ok(n) => drop(c.output.drain(..n)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => c.closing = true,
                }
            }
            if now.duration_since(c.last) > IDLE || c.output.len() > MAX_PENDING_OUTPUT {
                c.closing = true;
            }
        }
        clients.retain(|c| !(c.closing && (c.output.is_empty() || c.last.elapsed() > IDLE)));
        if !path.exists() {
            return; // removed at exit or exec
        }
    }
}

fn accept_all(listener: &UnixListener, clients: &mut Vec<Client>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => return,
        };
        let _ = stream.set_nonblocking(true);
        if let Err(reason) = check_peer(&stream) {
            refuse(&stream, &reason);
            crate::log_problem("control socket", &reason);
            continue;
        }
        if clients.len() >= MAX_CLIENTS {
            refuse(&stream, &format!("too many clients (at most {MAX_CLIENTS} at once)"));
            continue;
        }
        clients.push(Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            last: Instant::now(),
            closing: false,
        });
    }
}

fn refuse(mut stream: &UnixStream, reason: &str) {
    let _ = stream.write_all(format!("{}\n", json!({"ok": false, "error": reason})).as_bytes());
}

/// Only our own uid, or root, may talk to us.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = sys::peer_credentials(stream.as_raw_fd())
        .map_err(|e| format!("refused a client whose credentials cannot be read: {e}"))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "refused a client of uid {} (pid {}): only uid {me} or root may control this process",
            cred.uid, cred.pid
        ))
    }
}

fn read_requests(c: &mut Client) {
    let mut buf = [0u8; 8192];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.closing = true;
                break;
            }
            Ok(n) => {
                c.input.extend_from_slice(&buf[..n]);
                c.last = Instant::now();
                if c.input.len() > 64 * 1024 {
                    break; // answer what is there first
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                c.closing = true;
                break;
            }
        }
    }
    while let Some(nl) = c.input.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = c.input.drain(..=nl).collect();
        let line = &line[..line.len() - 1];
        let answer = if line.len() > MAX_LINE {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            handle(line)
        };
        c.output.extend_from_slice(format!("{answer}\n").as_bytes());
    }
    if c.input.len() > MAX_LINE {
        let answer =
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes: dropped")});
        c.output.extend_from_slice(format!("{answer}\n").as_bytes());
        c.input.clear();
        c.closing = true;
    }
}

fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

/// Answer one request line.
pub fn handle(line: &[u8]) -> Value {
    let Ok(text) = std::str::from_utf8(line) else {
        return error("the request is not valid UTF-8");
    };
    let text = text.trim();
    let (command, arg) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let arg = arg.trim();
    match command {
        "add" => add(arg),
        "remove" => remove(arg),
        "list" if arg.is_empty() => list(),
        "stats" if arg.is_empty() => stats(false),
        "stats" if arg == "reset" => stats(true),
        "help" => help(),
        "" => error("empty request; try `help`"),
        "list" | "stats" => error(format!("`{command}` takes no argument `{arg}`; try `help`")),
        other => error(format!("unknown command `{other}`; try `help`")),
    }
}

fn add(arg: &str) -> Value {
    if arg.is_empty() {
        return error("`add` needs a SPEC, e.g. `add libc.so.6:malloc`");
    }
    if let Err(e) = crate::ensure_runtime() {
        return error(e);
    }
    let result = probes::with_registry(|r| {
        let mut kept = Vec::new();
        let mut errors = Vec::new();
        for text in spec::split_specs(arg) {
            let (ids, errs) = r.register(text);
            errors.extend(errs.into_iter().map(|e| e.message));
            let infos = r.snapshot();
            for id in ids {
                match infos.iter().find(|p| p.id == id) {
                    // A failed probe is not kept: the registry is as if it had never been asked.
                    Some(p) if p.state == probes::ProbeState::Failed => {
                        r.unregister(id);
                    }
                    Some(p) => kept.push(report::probe_json(p)),
                    None => {}
                }
            }
        }
        (kept, errors)
    });
    match result {
        None => error("this process does not own the runtime"),
        Some((kept, errors)) if kept.is_empty() => error(errors.join("; ")),
        Some((kept, errors)) => json!({"ok": true, "probes": kept, "errors": errors}),
    }
}

fn remove(arg: &str) -> Value {
    if arg.is_empty() {
        return error("`remove` needs a probe ID or the SPEC it was added with");
    }
    let result = probes::with_registry(|r| {
        let ids: Vec<probes::ProbeId> = match arg.parse::<probes::ProbeId>() {
            Ok(id) => vec![id],
            Err(_) => r.snapshot().iter().filter(|p| p.spec == arg).map(|p| p.id).collect(),
        };
        ids.into_iter().filter(|&id| r.unregister(id)).collect::<Vec<_>>()
    });
    match result {
        None => error("this process does not own the runtime"),
        Some(removed) if removed.is_empty() => match arg.parse::<u32>() {
            Ok(id) => error(format!("no probe with id {id}")),
            Err(_) => error(format!("no probe was added as `{arg}`")),
        },
        Some(removed) => json!({"ok": true, "removed": removed}),
    }
}

fn list() -> Value {
    match probes::with_registry(|r| r.snapshot()) {
        Some(probes) => {
            json!({"ok": true, "probes": probes.iter().map(report::probe_json).collect::<Vec<_>>()})
        }
        None => error("this process does not own the runtime"),
    }
}

fn stats(reset: bool) -> Value {
    let result = probes::with_registry(|r| {
        let snapshot = r.snapshot();
        if reset {
            r.reset_counts();
        }
        (snapshot, r.site_count(), r.xol_bytes())
    });
    let Some((probes, sites, xol_bytes)) = result else {
        return error("this process does not own the runtime");
    };
    let total: u64 = probes.iter().map(|p| p.hits).sum();
    let (events, lost) = crate::events::totals().unwrap_or((0, 0));
    let list: Vec<Value> = probes
        .iter()
        .map(|p| {
            let mut v = json!({"id": p.id, "spec": p.spec, "symbol": p.symbol, "state": p.state.as_str(), "hits": p.hits});
            if p.ret {
                // The same latency figures as the summary's, live.
                let full = report::probe_json(p);
                v["missed"] = full["missed"].clone();
                v["latency"] = full["latency"].clone();
            }
            v
        })
        .collect();
    json!({
        "ok": true,
        "pid": sys::getpid(),
        "hits": total,
        "probes": list,
        "sites": sites,
        "xol_bytes": xol_bytes,
        "events": events,
        "lost": lost,
        "reset": reset,
    })
}

fn help() -> Value {
    json!({"ok": true, "commands": [
        "add SPEC          register probes (UPROBES grammar; globs allowed)",
        "remove ID         unregister probe ID",
        "remove SPEC       unregister every probe added as SPEC",
        "list              every probe: id, spec, object, symbol, offset, state, hits",
        "stats             hits per probe, total, sites, XOL memory",
        "stats reset       the same, then every count back to zero",
        "help              this list",
    ]})
}
