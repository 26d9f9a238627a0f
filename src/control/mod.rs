//! The control socket: add, remove, list and count probes while the program runs.
//!
//! A runtime thread of its own serves a Unix stream socket (never an abstract one): by default
//! `$XDG_RUNTIME_DIR/uprobe/<pid>.sock`, else `/tmp/uprobe-<uid>/<pid>.sock`, in a directory made
//! 0700, the socket 0600; `UPROBES_SOCKET` overrides the path (`%p` becomes the pid; a forked child
//! whose path has no `%p` appends `.<pid>`), and `UPROBES_SOCKET=none` turns the server off. A
//! socket elsewhere than the default is also linked from the default place, so that `uprobe ctl PID`
//! finds it.
//!
//! The protocol is in [`protocol`], the server's loop (limits, fairness) in [`server`]; both use
//! only raw system calls ([`sock`]), never the program's libc.

pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sock;
pub mod socket_path;

use std::sync::atomic::{AtomicI32, Ordering};

use crate::runtime::{config, fs, lock::Mutex, threads};
use crate::sigsafe::sys;

/// The socket this process serves.
struct Socket {
    /// Where it is (NUL-terminated for the raw calls).
    path: String,
    /// The symbolic link to it in the default place, when it is elsewhere.
    link: Option<String>,
}

static SOCKET: Mutex<Option<Socket>> = Mutex::new(None);
/// The listening descriptor the server polls (-1: none).
pub(crate) static LISTENER: AtomicI32 = AtomicI32::new(-1);
/// The eventfd that wakes the server's poll (-1: none).
pub(crate) static WAKE: AtomicI32 = AtomicI32::new(-1);

fn xdg() -> Option<String> {
    config::env_bytes("XDG_RUNTIME_DIR").and_then(|b| String::from_utf8(b).ok())
}

/// Where this process's socket goes, or None when the server is off.
fn socket_path(forked: bool) -> Option<(String, Option<String>)> {
    let pid = sys::getpid();
    let default = socket_path::default_socket(sys::geteuid(), xdg().as_deref(), pid)
        .to_string_lossy()
        .into_owned();
    match config::get().socket.as_deref() {
        Some("none") | Some("off") => None,
        Some(v) => {
            let mut p = v.replace("%p", &pid.to_string());
            if forked && !v.contains("%p") {
                p = format!("{p}.{pid}");
            }
            let link = (p != default).then_some(default);
            Some((p, link))
        }
        None => Some((default, None)),
    }
}

/// Make `dir` (0700, ours) if it is missing.
fn ensure_dir(dir: &str) -> Result<(), String> {
    let c = fs::cpath(dir);
    match sys::stat(&c, 0) {
        Ok(st) => {
            if st.st_uid != sys::geteuid() {
                return Err(format!("{dir} belongs to another user"));
            }
            Ok(())
        }
        Err(_) => {
            // Make the parents too (XDG_RUNTIME_DIR exists; /tmp/uprobe-UID is one level).
            if let Some((parent, _)) = dir.rsplit_once('/') {
                if !parent.is_empty() && sys::stat(&fs::cpath(parent), 0).is_err() {
                    ensure_dir(parent)?;
                }
            }
            match sys::mkdir(&c, 0o700) {
                Ok(()) | Err(sys::Errno(libc::EEXIST)) => Ok(()),
                Err(e) => Err(format!("cannot make {dir}: {e}")),
            }
        }
    }
}

/// Bind the socket at `path`: a stale one (no live server) is replaced; anything else is left.
fn bind(path: &str) -> Result<i32, String> {
    if let Some((dir, _)) = path.rsplit_once('/') {
        if !dir.is_empty() {
            ensure_dir(dir)?;
        }
    }
    let c = fs::cpath(path);
    if let Ok(st) = sys::stat(&c, libc::AT_SYMLINK_NOFOLLOW) {
        // A socket, or a link to one that another process left (a process killed before it
        // could remove it, whose pid this one now has) can be replaced when nothing answers.
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFSOCK && kind != libc::S_IFLNK {
            return Err(format!("{path} exists and is not a socket"));
        }
        if sock::connectable(path.as_bytes()) {
            return Err(format!("{path}: another live process serves this socket"));
        }
        sys::unlink(&c).map_err(|e| format!("cannot replace the stale socket {path}: {e}"))?;
    }
    // Bound under a private name, made private and listening, then renamed into place: the
    // path appears only once a client can connect to it (a client that saw the path and was
    // refused because listen() had not yet been called would be a race on every start).
    let staging = format!("{path}.{}", sys::getpid());
    let (at, direct) = if staging.len() < 108 { (staging.as_str(), false) } else { (path, true) };
    let a = fs::cpath(at);
    if !direct {
        let _ = sys::unlink(&a); // left by a killed process whose pid this one now has
    }
    let fd = sock::listen(at.as_bytes()).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: chmod of the path we just bound (fchmod on a socket does not change its inode).
    let r = unsafe {
        sys::call(
            libc::SYS_fchmodat,
            [libc::AT_FDCWD as usize, a.as_ptr() as usize, 0o600, 0, 0, 0],
        )
    }
    .map(|_| ())
    .map_err(|e| format!("{path}: chmod: {e}"))
    .and_then(|_| {
        if direct {
            return Ok(());
        }
        sys::rename(&a, &c).map_err(|e| format!("{path}: {e}"))
    });
    if let Err(e) = r {
        let _ = sys::unlink(&a);
        sys::close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// The link from the default place to a socket elsewhere.
fn make_link(link: &str, target: &str) {
    if let Some((dir, _)) = link.rsplit_once('/') {
        if ensure_dir(dir).is_err() {
            return;
        }
    }
    let l = fs::cpath(link);
    if let Ok(st) = sys::stat(&l, libc::AT_SYMLINK_NOFOLLOW) {
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK && st.st_mode & libc::S_IFMT != libc::S_IFSOCK
        {
            return;
        }
        let _ = sys::unlink(&l);
    }
    let t = fs::cpath(target);
    // SAFETY: two NUL-terminated paths.
    let _ = unsafe {
        sys::call(
            libc::SYS_symlinkat,
            [t.as_ptr() as usize, libc::AT_FDCWD as usize, l.as_ptr() as usize, 0, 0, 0],
        )
    };
}

/// Start serving. `forked`: in a child after fork (the parent's socket is the parent's).
pub fn start(forked: bool) -> Result<(), String> {
    let Some((path, link)) = socket_path(forked) else { return Ok(()) };
    let listener = bind(&path)?;
    if let Some(l) = &link {
        make_link(l, &path);
    }
    if WAKE.load(Ordering::Acquire) < 0 {
        WAKE.store(sock::eventfd().unwrap_or(-1), Ordering::Release);
    }
    LISTENER.store(listener, Ordering::Release);
    *SOCKET.lock() = Some(Socket { path, link });
    crate::consumers::events::set_subscriber_sink(server::push_events);
    threads::spawn("uprobe-ctl", server::serve).map_err(|e| e.to_string())
}

/// Wake the server's poll (for a stop, or for work outside the loader).
pub fn wake() {
    let fd = WAKE.load(Ordering::Acquire);
    if fd >= 0 {
        let _ = sys::write(fd, &1u64.to_ne_bytes());
    }
}

fn unlink_paths(s: &Socket) {
    let _ = sys::unlink(&fs::cpath(&s.path));
    if let Some(l) = &s.link {
        let _ = sys::unlink(&fs::cpath(l));
    }
}

/// Remove this process's socket (at exit).
pub fn remove_socket() {
    if let Some(s) = SOCKET.lock().take() {
        unlink_paths(&s);
    }
}

/// Before an exec that will likely succeed: the socket's path goes (the new image serves its
/// own); the listener stays open until the exec closes it.
pub fn before_exec() {
    if let Some(s) = SOCKET.lock().as_ref() {
        unlink_paths(s);
    }
}

/// The exec failed after all: serve the socket again.
pub fn after_failed_exec() {
    let guard = SOCKET.lock();
    let Some(s) = guard.as_ref() else { return };
    match bind(&s.path) {
        Ok(fd) => {
            let old = LISTENER.swap(fd, Ordering::AcqRel);
            if let Some(l) = &s.link {
                make_link(l, &s.path);
            }
            drop(guard);
            wake();
            if old >= 0 {
                sys::close(old);
            }
        }
        Err(e) => {
            drop(guard);
            crate::report::problem("control socket", &e);
        }
    }
}

/// Fork: the socket's lock and the server's are held across it (see runtime::fork).
pub fn lock_for_fork() {
    SOCKET.lock_raw();
    server::lock_for_fork();
}

pub fn unlock_in_parent() {
    server::unlock_in_parent();
    // SAFETY: taken by lock_for_fork on this thread.
    unsafe { SOCKET.unlock_raw() };
}

/// In a forked child: the parent's socket, listener and clients are the parent's (the
/// descriptors are copies of the parent's: closed here, never served).
pub fn unlock_in_child() {
    server::unlock_in_child();
    // SAFETY: taken by lock_for_fork on the forking thread, which is this one.
    unsafe {
        SOCKET.get_locked().take();
        SOCKET.unlock_raw();
    }
    let old = LISTENER.swap(-1, Ordering::AcqRel);
    if old >= 0 {
        sys::close(old);
    }
}

/// In a forked child: serve a socket of its own.
pub fn start_in_child() {
    if let Err(e) = start(true) {
        crate::report::problem("control socket", &e);
    }
}
