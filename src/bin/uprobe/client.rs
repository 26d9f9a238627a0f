//! Talking to a process's control socket, trusting nothing on the way:
//! - sockets are looked for only in directories that pass `places::private_dir_problem` for the
//!   user they would belong to: opened by descriptor (`O_NOFOLLOW|O_DIRECTORY`), checked with
//!   `fstat`, and reached through that descriptor (`/proc/self/fd/N/NAME`), so that a directory
//!   another user made first (`/tmp/uprobe-<uid>`, mode 0777, a socket of theirs inside) is never
//!   used;
//! - an answer is believed only from the process that was asked: the server's credentials
//!   (`SO_PEERCRED`) must be the target's pid, and the uid the directory belongs to;
//! - every answer is bounded in size ([`MAX_ANSWER`]), and every step in time (connect, write,
//!   read).

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::places;

/// The longest answer line believed (a `stats` of every libc function with its stacks is a few
/// MiB); a server that sends more is cut off.
pub const MAX_ANSWER: u64 = 64 << 20;

/// This command's effective uid.
pub fn uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// A control socket, and what its server must be to be believed.
pub struct Target {
    /// The directory holding it (kept open: the socket is reached through it), if found by pid.
    dir: Option<OwnedFd>,
    /// Its name in `dir`, or the whole path (`--socket`).
    name: String,
    /// For messages.
    pub path: PathBuf,
    /// The pid the server must have (None: any, for `--socket`).
    pid: Option<i32>,
    /// The uid the server must have (None: this user's or root's, for `--socket`).
    owner: Option<u32>,
}

impl Target {
    /// A socket named on the command line (`--socket PATH`): any process of this user or root's.
    pub fn explicit(path: &Path) -> Target {
        Target {
            dir: None,
            name: path.to_string_lossy().into_owned(),
            path: path.to_path_buf(),
            pid: None,
            owner: None,
        }
    }

    fn address(&self) -> String {
        match &self.dir {
            Some(d) => format!("/proc/self/fd/{}/{}", d.as_raw_fd(), self.name),
            None => self.name.clone(),
        }
    }

    /// Connect (within `timeout`), and check who answers.
    pub fn connect(&self, timeout: Duration) -> Result<UnixStream, String> {
        let stream = connect_within(&self.address(), timeout).map_err(|e| self.connect_error(e))?;
        self.check_peer(&stream)?;
        Ok(stream)
    }

    /// One attempt to connect without waiting (Ok(None): try again), the server checked.
    pub fn connect_once(&self) -> Result<Option<UnixStream>, String> {
        match connect_once(&self.address()) {
            Ok(Some(s)) => self.check_peer(&s).map(|_| Some(s)),
            Ok(None) => Ok(None),
            Err(e) => Err(self.connect_error(e)),
        }
    }

    fn connect_error(&self, e: std::io::Error) -> String {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "{}: permission denied (the process belongs to another user)",
                self.path.display()
            ),
            std::io::ErrorKind::ConnectionRefused => {
                format!("{}: connection refused (the process has exited?)", self.path.display())
            }
            std::io::ErrorKind::TimedOut => format!(
                "{}: the process does not accept connections (stopped, or too busy)",
                self.path.display()
            ),
            _ => format!("{}: {e}", self.path.display()),
        }
    }

    /// Is the server the process asked, of the uid expected?
    fn check_peer(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = peer_credentials(stream).map_err(|e| format!("{}: {e}", self.path.display()))?;
        if let Some(pid) = self.pid {
            if cred.pid != pid {
                return Err(format!(
                    "{}: answered by process {} (uid {}), not by process {pid}: not believed",
                    self.path.display(),
                    cred.pid,
                    cred.uid
                ));
            }
        }
        let me = uid();
        let uid_ok = match self.owner {
            Some(owner) => cred.uid == owner,
            None => cred.uid == me || cred.uid == 0 || me == 0,
        };
        if !uid_ok {
            return Err(format!(
                "{}: answered by a process of uid {}, not of uid {}: not believed",
                self.path.display(),
                cred.uid,
                self.owner.unwrap_or(me)
            ));
        }
        Ok(())
    }
}

/// One attempt to connect to a Unix socket, without waiting: Ok(None) when its backlog is full
/// (try again later). The stream is non-blocking.
pub fn connect_once(path: &str) -> std::io::Result<Option<UnixStream>> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    if path.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: no memory is passed.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        let len = (2 + path.len() + 1) as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        let r = unsafe { libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) };
        if r == 0 {
            return Ok(Some(UnixStream::from(owned)));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Connect to a Unix socket, giving up after `timeout` (a server whose backlog is full, being
/// stopped, makes a blocking connect wait for good).
pub fn connect_within(path: &str, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(stream) = connect_once(path)? {
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        if Instant::now() >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The credentials of the process at the other end (`SO_PEERCRED`).
pub fn peer_credentials(s: &UnixStream) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// A directory of `owner`'s sockets at `path`, if it passes the checks: opened without following
/// a symbolic link, a directory, `owner`'s, nobody else's to enter. Err: why not (None: it is
/// not there).
fn open_private(path: &Path, owner: u32) -> Result<OwnedFd, Option<String>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Some(format!("{} is a symbolic link", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Some(format!(
                "{} may not be entered by uid {} (permission denied)",
                path.display(),
                uid()
            )))
        }
        Err(e) => return Err(Some(format!("{}: {e}", path.display()))),
    };
    let st = f.metadata().map_err(|e| Some(format!("{}: {e}", path.display())))?;
    if let Some(why) = places::private_dir_problem(st.mode(), st.uid(), owner) {
        return Err(Some(format!("{} {why}: not used", path.display())));
    }
    Ok(OwnedFd::from(f))
}

/// Every directory where sockets of `owner`'s processes may be, with the runtime directory
/// `xdg` (theirs): the usual ones, then the fallbacks in /tmp.
fn candidate_dirs(owner: u32, xdg: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = places::socket_dirs(owner, xdg);
    let mut fallbacks: Vec<PathBuf> = std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| places::is_fallback_name(&e.file_name().to_string_lossy(), owner))
        .map(|e| e.path())
        .collect();
    fallbacks.sort();
    dirs.extend(fallbacks);
    dirs
}

/// The effective uid of process `pid`, and its `XDG_RUNTIME_DIR` (when readable).
fn process_owner(pid: i32) -> (Option<u32>, Option<String>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse::<u32>().ok()));
    let xdg = std::fs::read(format!("/proc/{pid}/environ")).ok().and_then(|env| {
        env.split(|&b| b == 0).find_map(|e| {
            e.strip_prefix(b"XDG_RUNTIME_DIR=").map(|v| String::from_utf8_lossy(v).into_owned())
        })
    });
    (euid, xdg)
}

/// The socket of `pid`, wherever its process put it: in a checked directory of this user's, or
/// (for root) of the process's user.
pub fn find(pid: i32) -> Result<Target, String> {
    let me = uid();
    let my_xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    let (their_uid, their_xdg) = process_owner(pid);
    let mut owners = vec![(me, my_xdg)];
    if let Some(u) = their_uid.filter(|&u| u != me) {
        owners.push((u, their_xdg));
    }
    let name = places::socket_name(pid);
    let mut looked = Vec::new();
    let mut refused = Vec::new();
    for (owner, xdg) in &owners {
        for dir in candidate_dirs(*owner, xdg.as_deref()) {
            looked.push(dir.join(&name).display().to_string());
            let fd = match open_private(&dir, *owner) {
                Ok(fd) => fd,
                Err(Some(why)) => {
                    refused.push(why);
                    continue;
                }
                Err(None) => continue,
            };
            let c = std::ffi::CString::new(name.as_str()).expect("no NUL in a socket name");
            // SAFETY: zeroed stat is valid; a NUL-terminated name.
            let mut st: libc::stat = unsafe { core::mem::zeroed() };
            // SAFETY: as above; `st` is writable.
            let there = unsafe {
                libc::fstatat(fd.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
            } == 0;
            if there {
                return Ok(Target {
                    dir: Some(fd),
                    name: name.clone(),
                    path: dir.join(&name),
                    pid: Some(pid),
                    owner: Some(*owner),
                });
            }
        }
    }
    let alive = Path::new(&format!("/proc/{pid}")).exists();
    let why = if !alive {
        "there is no such process".to_string()
    } else if let Some(r) = refused.iter().find(|r| r.contains("permission denied")) {
        format!(
            "{r}: the process belongs to uid {}; run uprobe as that user or as root",
            their_uid.map_or("?".into(), |u| u.to_string())
        )
    } else {
        "libuprobe is not loaded in it (start it with `uprobe run`, or `uprobe attach` it), or \
         UPROBES_SOCKET put its socket elsewhere (use --socket)"
            .to_string()
    };
    let mut msg =
        format!("process {pid} has no control socket ({why}); looked for {}", looked.join(" and "));
    let others: Vec<&String> =
        refused.iter().filter(|r| !r.contains("permission denied")).collect();
    if !others.is_empty() {
        msg += &format!(
            "; not trusted: {}",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
        );
    }
    Err(msg)
}

/// Every control socket in this user's checked directories, by pid.
pub fn reachable() -> Vec<(i32, Target)> {
    let me = uid();
    let mut found: Vec<(i32, Target)> = Vec::new();
    for dir in candidate_dirs(me, std::env::var("XDG_RUNTIME_DIR").ok().as_deref()) {
        let Ok(fd) = open_private(&dir, me) else { continue };
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
            continue;
        };
        let mut names: Vec<(i32, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.strip_suffix(".sock")?.parse().ok()?;
                Some((pid, name))
            })
            .collect();
        names.sort();
        for (pid, name) in names {
            if found.iter().any(|(p, _)| *p == pid) {
                continue;
            }
            let Ok(dup) = fd.try_clone() else { continue };
            found.push((
                pid,
                Target {
                    dir: Some(dup),
                    path: dir.join(&name),
                    name,
                    pid: Some(pid),
                    owner: Some(me),
                },
            ));
        }
    }
    found.sort_by_key(|(p, _)| *p);
    found
}

/// Write all of `buf` without SIGPIPE (which this command leaves at its default, so that
/// `uprobe ctl ... | head` stops quietly): a server that refused us and closed must give an
/// error to read, not a death by signal.
pub fn send_all(stream: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: a valid descriptor and buffer.
        let n = unsafe {
            libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// One line of at most `limit` bytes (its newline included). Err if longer, or cut short.
pub fn read_line_bounded(r: &mut impl BufRead, limit: u64) -> std::io::Result<String> {
    let mut line = Vec::new();
    r.take(limit).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") && line.len() as u64 >= limit {
        return Err(std::io::Error::other(format!("an answer longer than {limit} bytes")));
    }
    String::from_utf8(line).map_err(|_| std::io::Error::other("an answer that is not UTF-8"))
}

/// Send one request, read one answer (bounded; two minutes at most: `add libc.so.6:*` in a
/// large program takes a while).
pub fn request(target: &Target, line: &str) -> Result<Value, String> {
    let stream = target.connect(Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    // A server that refuses us answers at once and closes: the write may then fail (EPIPE) with
    // the refusal already waiting to be read, so read whatever came back before giving up.
    let written = send_all(&stream, format!("{line}\n").as_bytes());
    let mut reader = BufReader::new(stream);
    let read = read_line_bounded(&mut reader, MAX_ANSWER);
    let shown = target.path.display();
    let answer = match read {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            if let Err(e) = written {
                return Err(format!("{shown}: {e}"));
            }
            return Err(format!("{shown}: the process closed the connection without an answer"));
        }
        Err(e) => {
            if let Err(w) = written {
                return Err(format!("{shown}: {w}"));
            }
            return Err(format!("{shown}: {e}"));
        }
    };
    serde_json::from_str(&answer).map_err(|e| {
        let cut: String = answer.chars().take(200).collect();
        format!("{shown}: bad answer {cut:?}: {e}")
    })
}

impl Target {
    /// Remove the socket if nobody listens on it and its process is gone (a process killed
    /// before it could remove its own), through its directory.
    pub fn remove_if_stale(&self) {
        let (Some(dir), Some(pid)) = (&self.dir, self.pid) else { return };
        let refused = matches!(
            UnixStream::connect(self.address()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
        if refused && !Path::new(&format!("/proc/{pid}")).exists() {
            if let Ok(c) = std::ffi::CString::new(self.name.as_str()) {
                // SAFETY: a directory descriptor we hold and a NUL-terminated name.
                unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
            }
        }
    }
}
