//! The control socket: add, remove, list and count probes while the program runs.
//!
//! A runtime thread of its own serves a Unix stream socket (never an abstract one): by default
//! `<pid>.sock` in libuprobe's private directory of this user (`$XDG_RUNTIME_DIR/uprobe`, else
//! `/tmp/uprobe-<uid>`, else a fallback: see `runtime::places`), opened by descriptor and checked,
//! the socket bound through that descriptor and made 0600; `UPROBES_SOCKET` overrides the path
//! (`%p` becomes the pid; a forked child whose path has no `%p` appends `.<pid>`; its directory is
//! walked with the protected-symlink rules), and `UPROBES_SOCKET=none` turns the server off. A
//! socket elsewhere than the default is also linked from the default place, so that `uprobe ctl PID`
//! finds it. Nothing is removed that is not what libuprobe put there (by inode).
//!
//! The protocol is in [`protocol`], the server's loop (limits, fairness) in [`server`]; both use
//! only raw system calls ([`sock`]), never the program's libc.

pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sock;

use crate::runtime::{config, fs, lock::Mutex, places, threads};
use crate::sigsafe::sys;

/// Where a socket (or the link to it) is: a directory, found again and checked at each use, and a
/// name in it.
#[derive(Clone)]
struct Place {
    /// The directory: libuprobe's private one (`fs::base_dir`), or the one `UPROBES_SOCKET`
    /// names (walked by `fs::open_protected`).
    dir: DirKind,
    name: String,
    /// The full path, for messages and links.
    path: String,
    /// The (device, inode) of what libuprobe put there: nothing else is ever removed.
    id: (u64, u64),
}

#[derive(Clone)]
enum DirKind {
    /// libuprobe's private directory at this path, of this uid (as it was when the socket was
    /// made: the process may have changed its uid since).
    Private {
        path: String,
        uid: u32,
    },
    Named(String),
}

impl Place {
    /// Open its directory again (checked again).
    fn open_dir(&self) -> Result<fs::Dir, String> {
        match &self.dir {
            DirKind::Private { path, uid } => fs::open_base(path, *uid)
                .map_err(|e| e.unwrap_or_else(|| format!("{path}: no such directory"))),
            DirKind::Named(path) => open_named_dir(path),
        }
    }

    /// Remove what libuprobe put there, if it is still that.
    fn remove(&self) {
        let Ok(dir) = self.open_dir() else { return };
        let c = fs::cpath(&self.name);
        let ours = sys::statat(dir.fd, &c, libc::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| (st.st_dev, st.st_ino) == self.id);
        if ours {
            let _ = sys::unlinkat(dir.fd, &c, 0);
        }
    }
}

/// The socket this process serves.
struct Socket {
    place: Place,
    /// The symbolic link to it in the default place, when it is elsewhere.
    link: Option<Place>,
}

static SOCKET: Mutex<Option<Socket>> = Mutex::new(None);
/// The listening descriptor the server polls.
pub(crate) static LISTENER: fs::Kept = fs::Kept::new();
/// The eventfd that wakes the server's poll.
pub(crate) static WAKE: fs::Kept = fs::Kept::new();

/// libuprobe's private directory for this user.
fn base_dir() -> Result<fs::Dir, String> {
    fs::base_dir(sys::geteuid(), config::get().runtime_dir.as_deref())
}

/// The directory `path` names (for `UPROBES_SOCKET`), walked as `fs::open_protected` does.
fn open_named_dir(path: &str) -> Result<fs::Dir, String> {
    let (fd, _parent) = fs::open_protected(path, places::Last::Dir)?;
    let dir = fs::Dir { fd: fd.0, path: path.to_string() };
    core::mem::forget(fd);
    Ok(dir)
}

/// Where this process's socket goes (None when the server is off), and where the link to it goes
/// when that is not the default place.
fn socket_path(forked: bool) -> Result<Option<(Place, Option<Place>)>, String> {
    let pid = sys::getpid();
    let default = |dir: &fs::Dir| Place {
        dir: DirKind::Private { path: dir.path.clone(), uid: sys::geteuid() },
        name: places::socket_name(pid),
        path: format!("{}/{}", dir.path, places::socket_name(pid)),
        id: (0, 0),
    };
    match config::get().socket.as_deref() {
        Some("none") | Some("off") => Ok(None),
        Some(v) => {
            let mut p = v.replace("%p", &pid.to_string());
            if forked && !v.contains("%p") {
                p = format!("{p}.{pid}");
            }
            if !p.starts_with('/') {
                // Absolute, so that the link from the default place reaches it.
                let cwd = fs::read_link("/proc/self/cwd").map_err(|e| format!("{p}: {e}"))?;
                p = format!("{cwd}/{p}");
            }
            let (dir, name) = p.rsplit_once('/').unwrap_or(("/", &p));
            let dir = if dir.is_empty() { "/" } else { dir };
            let place = Place {
                dir: DirKind::Named(dir.to_string()),
                name: name.to_string(),
                path: p.clone(),
                id: (0, 0),
            };
            let link = base_dir().ok().map(|d| default(&d)).filter(|l| l.path != p);
            Ok(Some((place, link)))
        }
        None => {
            let dir = base_dir()?;
            // Said once, here: the usual directory could not be used (another user made it).
            if let Some(n) = fs::take_base_notice() {
                crate::report::problem("control socket", &n);
            }
            Ok(Some((default(&dir), None)))
        }
    }
}

/// Bind the socket at `place`: a stale one (no live server) of this user's is replaced; anything
/// else is left. Records what was bound in `place.id`.
fn bind(place: &mut Place) -> Result<i32, String> {
    let path = place.path.clone();
    let dir = place.open_dir()?;
    let c = fs::cpath(&place.name);
    if let Ok(st) = sys::statat(dir.fd, &c, libc::AT_SYMLINK_NOFOLLOW) {
        // A socket, or a link to one that another process left (a process killed before it
        // could remove it, whose pid this one now has) can be replaced when nothing answers.
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFSOCK && kind != libc::S_IFLNK {
            return Err(format!("{path} exists and is not a socket"));
        }
        if st.st_uid != sys::geteuid() {
            return Err(format!("{path} belongs to uid {}: left as it is", st.st_uid));
        }
        if sock::connectable(dir.through(&place.name).as_bytes()) {
            return Err(format!("{path}: another live process serves this socket"));
        }
        sys::unlinkat(dir.fd, &c, 0)
            .map_err(|e| format!("cannot replace the stale socket {path}: {e}"))?;
    }
    // Bound under a private name, made private and listening, then renamed into place: the
    // path appears only once a client can connect to it (a client that saw the path and was
    // refused because listen() had not yet been called would be a race on every start).
    let staging = format!("{}.{}", place.name, sys::getpid());
    let a = fs::cpath(&staging);
    let _ = sys::unlinkat(dir.fd, &a, 0); // left by a killed process whose pid this one now has
    let fd = sock::listen(dir.through(&staging).as_bytes()).map_err(|e| format!("{path}: {e}"))?;
    let fd = fs::keep_high(fd);
    let r = sys::fchmodat(dir.fd, &a, 0o600)
        .map_err(|e| format!("{path}: chmod: {e}"))
        .and_then(|_| {
            sys::statat(dir.fd, &a, libc::AT_SYMLINK_NOFOLLOW).map_err(|e| format!("{path}: {e}"))
        })
        .and_then(|st| {
            place.id = (st.st_dev, st.st_ino);
            sys::renameat(dir.fd, &a, dir.fd, &c).map_err(|e| format!("{path}: {e}"))
        });
    if let Err(e) = r {
        let _ = sys::unlinkat(dir.fd, &a, 0);
        sys::close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// The link from the default place to a socket elsewhere.
fn make_link(link: &mut Place, target: &str) {
    let Ok(dir) = link.open_dir() else { return };
    let l = fs::cpath(&link.name);
    if let Ok(st) = sys::statat(dir.fd, &l, libc::AT_SYMLINK_NOFOLLOW) {
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFLNK && kind != libc::S_IFSOCK {
            return;
        }
        let _ = sys::unlinkat(dir.fd, &l, 0);
    }
    if sys::symlinkat(&fs::cpath(target), dir.fd, &l).is_ok() {
        if let Ok(st) = sys::statat(dir.fd, &l, libc::AT_SYMLINK_NOFOLLOW) {
            link.id = (st.st_dev, st.st_ino);
        }
    }
}

/// Start serving. `forked`: in a child after fork (the parent's socket is the parent's).
pub fn start(forked: bool) -> Result<(), String> {
    if threads::retired() {
        return Ok(()); // nobody would serve it (see hooks::creds)
    }
    let Some((mut place, mut link)) = socket_path(forked)? else {
        // No socket, but jump sites still need watching (see registry::watch); traps alone
        // need no thread.
        if config::get().path == config::PathMode::Trap {
            return Ok(());
        }
        return threads::spawn("uprobe-watch", server::watch_only).map_err(|e| e.to_string());
    };
    let listener = bind(&mut place)?;
    if let Some(l) = &mut link {
        make_link(l, &place.path);
    }
    ensure_wake();
    LISTENER.set(listener);
    *SOCKET.lock() = Some(Socket { place, link });
    crate::consumers::events::set_subscriber_sink(server::push_events);
    threads::spawn("uprobe-ctl", server::serve).map_err(|e| e.to_string())
}

/// The eventfd that wakes the server, made again if the program took its number.
pub(crate) fn ensure_wake() {
    if WAKE.get().is_none() {
        WAKE.set(sock::eventfd().map(fs::keep_high).unwrap_or(-1));
    }
}

/// Wake the server's poll (for a stop, or for work outside the loader).
pub fn wake() {
    // Only if the number is still the eventfd: else 8 bytes would go into the program's file.
    if let Some(fd) = WAKE.get() {
        let _ = sys::write(fd, &1u64.to_ne_bytes());
    }
}

fn unlink_paths(s: &Socket) {
    s.place.remove();
    if let Some(l) = &s.link {
        l.remove();
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
    let mut guard = SOCKET.lock();
    let Some(s) = guard.as_mut() else { return };
    match bind(&mut s.place) {
        Ok(fd) => {
            let old = LISTENER.get();
            LISTENER.set(fd);
            let target = s.place.path.clone();
            if let Some(l) = &mut s.link {
                make_link(l, &target);
            }
            drop(guard);
            wake();
            if let Some(old) = old {
                sys::close(old);
            }
        }
        Err(e) => {
            drop(guard);
            crate::report::problem("control socket", &e);
        }
    }
}

/// The listener the server polls is no longer ours (the program closed its number, maybe reused
/// it): bind the socket again, never touching that number. A failure is said once (the server
/// tries again at its next round).
pub(crate) fn rebind() {
    static SAID: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    let mut guard = SOCKET.lock();
    let Some(s) = guard.as_mut() else { return };
    s.place.remove();
    match bind(&mut s.place) {
        Ok(fd) => {
            LISTENER.set(fd);
            SAID.store(false, core::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            drop(guard);
            if !SAID.swap(true, core::sync::atomic::Ordering::Relaxed) {
                crate::report::problem("control socket", &e);
            }
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
    LISTENER.close();
}

/// In a forked child: serve a socket of its own.
pub fn start_in_child() {
    if let Err(e) = start(true) {
        crate::report::problem("control socket", &e);
    }
}
