//! Files, read and written with raw system calls (see `sigsafe::sys`): the runtime reads
//! `/proc/self/maps`, ELF files and directories, and writes its report, without entering the
//! program's libc.

use crate::sigsafe::sys::{self, Errno};

/// `path` with a NUL terminator, for the raw calls.
pub fn cpath(path: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(path.len() + 1);
    v.extend_from_slice(path.as_bytes());
    v.push(0);
    v
}

/// An open descriptor, closed when dropped.
pub struct Fd(pub i32);

impl Drop for Fd {
    fn drop(&mut self) {
        sys::close(self.0);
    }
}

impl Fd {
    pub fn open(path: &str, flags: i32) -> Result<Fd, Errno> {
        sys::open(&cpath(path), flags, 0o600).map(Fd)
    }

    /// Everything from the current position to the end.
    pub fn read_to_end(&self) -> Result<Vec<u8>, Errno> {
        let size = sys::fstat(self.0).map(|st| st.st_size.max(0) as usize).unwrap_or(0);
        // Straight into the buffer (one copy), growing it when the file is longer than it said.
        let mut out = vec![0u8; size.max(4096)];
        let mut len = 0;
        loop {
            if len == out.len() {
                // Full: is there more? Asked with a small read first, so that a file as long as
                // fstat said (a cache entry) is not copied into a buffer twice its size.
                let mut more = [0u8; 256];
                match sys::read(self.0, &mut more) {
                    Ok(0) => return Ok(out),
                    Ok(n) => {
                        out.resize(len * 2, 0);
                        out[len..len + n].copy_from_slice(&more[..n]);
                        len += n;
                    }
                    Err(Errno(libc::EINTR)) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            match sys::read(self.0, &mut out[len..]) {
                Ok(0) => {
                    out.truncate(len);
                    return Ok(out);
                }
                Ok(n) => len += n,
                Err(Errno(libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The whole file.
pub fn read(path: &str) -> Result<Vec<u8>, Errno> {
    Fd::open(path, libc::O_RDONLY)?.read_to_end()
}

/// The whole file, as text (lossy).
pub fn read_string(path: &str) -> Result<String, Errno> {
    read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Append `data` to `path`, creating it (0600... as the umask allows, 0666 like `open` would).
pub fn append(path: &str, data: &[u8]) -> Result<(), Errno> {
    let fd = sys::open(&cpath(path), libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND, 0o666)?;
    let fd = Fd(fd);
    sys::write_all(fd.0, data)
}

/// The target of a symbolic link.
pub fn read_link(path: &str) -> Result<String, Errno> {
    let mut buf = vec![0u8; 4096];
    let n = sys::readlink(&cpath(path), &mut buf)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The names in a directory (without `.` and `..`).
pub fn list_dir(path: &str) -> Result<Vec<String>, Errno> {
    let fd = Fd::open(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut names = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = sys::getdents(fd.0, &mut buf)?;
        if n == 0 {
            return Ok(names);
        }
        let mut at = 0;
        while at + 19 < n {
            // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
            let reclen = u16::from_le_bytes([buf[at + 16], buf[at + 17]]) as usize;
            if reclen == 0 || at + reclen > n {
                break;
            }
            let name = &buf[at + 19..at + reclen];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = String::from_utf8_lossy(&name[..end]).into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
            at += reclen;
        }
    }
}

/// Does `path` exist (without following a final symlink)?
pub fn exists(path: &str) -> bool {
    sys::stat(&cpath(path), libc::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// The lowest number libuprobe's own descriptors take: high, so that the numbers a program
/// expects `open` to return (the lowest free ones) are never libuprobe's. Just under the soft
/// `RLIMIT_NOFILE` (at most 1024, so that the descriptor table does not grow large).
pub fn high_fd_floor() -> i32 {
    use core::sync::atomic::{AtomicI32, Ordering};
    static FLOOR: AtomicI32 = AtomicI32::new(0);
    let f = FLOOR.load(Ordering::Relaxed);
    if f > 0 {
        return f;
    }
    let mut lim = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
    // SAFETY: `lim` is writable.
    let _ = unsafe {
        sys::call(
            libc::SYS_getrlimit,
            [libc::RLIMIT_NOFILE as usize, &mut lim as *mut _ as usize, 0, 0, 0, 0],
        )
    };
    let top = lim.rlim_cur.min(1024) as i32;
    let floor = (top - 24).max(top * 3 / 4).max(3);
    FLOOR.store(floor, Ordering::Relaxed);
    floor
}

/// `fd` moved to a high number (see [`high_fd_floor`]), close-on-exec; the low one is closed.
/// Where no high number is free, `fd` itself.
pub fn keep_high(fd: i32) -> i32 {
    if fd >= high_fd_floor() {
        return fd;
    }
    match sys::dup_cloexec_at_least(fd, high_fd_floor()) {
        Ok(high) => {
            sys::close(fd);
            high
        }
        Err(_) => fd,
    }
}

/// A directory held open by descriptor: opened without following a symbolic link, checked, and
/// used only through its descriptor (`*at` calls, and [`Dir::through`] for socket addresses), so
/// that nothing swapped in under its name afterwards is ever used.
pub struct Dir {
    pub fd: i32,
    /// Its path, for messages.
    pub path: String,
}

impl Drop for Dir {
    fn drop(&mut self) {
        sys::close(self.fd);
    }
}

impl Dir {
    /// A path that reaches `name` in this very directory, for the calls that take no directory
    /// descriptor (`bind`, `connect`): through `/proc/self/fd`.
    pub fn through(&self, name: &str) -> String {
        format!("/proc/self/fd/{}/{name}", self.fd)
    }

    /// `name` in this directory, NUL-terminated.
    pub fn c(name: &str) -> Vec<u8> {
        cpath(name)
    }
}

/// Open the directory `name` in `parent` (a descriptor, or `AT_FDCWD`), creating it 0700 when
/// `create` and it is missing, and check that it is private to `uid` (see
/// `places::private_dir_problem`). Err: why not (None when it does not exist and was not made).
pub fn private_dir(
    parent: i32,
    name: &str,
    shown: &str,
    uid: u32,
    create: bool,
) -> Result<Dir, Option<String>> {
    let c = cpath(name);
    if create {
        match sys::mkdirat(parent, &c, 0o700) {
            Ok(()) | Err(Errno(libc::EEXIST)) => {}
            Err(e) => return Err(Some(format!("{shown}: cannot be made: {e}"))),
        }
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let fd = match sys::openat(parent, &c, flags, 0) {
        Ok(fd) => Fd(keep_high(fd)),
        Err(Errno(libc::ENOENT)) => return Err(None),
        Err(Errno(libc::ELOOP)) => return Err(Some(format!("{shown} is a symbolic link"))),
        Err(Errno(libc::ENOTDIR)) => return Err(Some(format!("{shown} is not a directory"))),
        Err(e) => return Err(Some(format!("{shown}: {e}"))),
    };
    let st = sys::fstat(fd.0).map_err(|e| Some(format!("{shown}: {e}")))?;
    if let Some(why) = super::places::private_dir_problem(st.st_mode, st.st_uid, uid) {
        return Err(Some(format!("{shown} {why}")));
    }
    let dir = Dir { fd: fd.0, path: shown.to_string() };
    core::mem::forget(fd);
    Ok(dir)
}

/// Why the usual directory was not used, and where things went instead: said once, by the
/// control socket (see [`take_base_notice`]).
static NOTICE: super::lock::Mutex<Option<String>> = super::lock::Mutex::new(None);
static TOLD: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The notice [`base_dir`] left, the first time it is asked for.
pub fn take_base_notice() -> Option<String> {
    NOTICE.lock().take()
}

/// The directory where this user's sockets and cache go (see `places`), chosen once per user id,
/// and opened (and checked) again at each call. When the usual one could not be used, a notice
/// says so (once: [`take_base_notice`]).
pub fn base_dir(uid: u32, runtime_dir: Option<&str>) -> Result<Dir, String> {
    use super::lock::Mutex;
    if !uid_mapped(uid) {
        // In a user namespace that maps no uid to this process (after `unshare(CLONE_NEWUSER)`),
        // every unmapped owner reads as the overflow uid: no directory's owner can be told.
        return Err(format!(
            "this process's uid is not mapped in its user namespace (it reads as {uid}): no \
             directory of its own can be told from another user's"
        ));
    }
    static CHOSEN: Mutex<Option<(u32, String)>> = Mutex::new(None);
    let chosen = CHOSEN.lock().clone();
    if let Some((_, path)) = chosen.filter(|(u, _)| *u == uid) {
        if let Ok(d) = open_base(&path, uid) {
            return Ok(d);
        }
    }
    let mut refused = Vec::new();
    let mut found = None;
    for cand in super::places::socket_dirs(uid, runtime_dir) {
        let path = cand.to_string_lossy().into_owned();
        match open_base(&path, uid) {
            Ok(d) => {
                found = Some(d);
                break;
            }
            Err(Some(why)) => refused.push(why),
            Err(None) => {}
        }
    }
    let d = match found {
        Some(d) => d,
        None => fallback_dir(uid)?,
    };
    *CHOSEN.lock() = Some((uid, d.path.clone()));
    if !refused.is_empty() && !TOLD.swap(true, core::sync::atomic::Ordering::Relaxed) {
        *NOTICE.lock() =
            Some(format!("{}: not used; using {} instead", refused.join("; "), d.path));
    }
    Ok(d)
}

/// Is `uid` (this process's effective uid) a uid of its user namespace? Not when it is the overflow
/// uid that the kernel shows for unmapped ones (65534) and `/proc/self/uid_map` does not map it.
fn uid_mapped(uid: u32) -> bool {
    if uid != 65534 {
        return true;
    }
    let Ok(map) = read_string("/proc/self/uid_map") else { return true };
    map.lines().any(|l| {
        let v: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        v.len() == 3 && (v[0]..v[0] + v[2]).contains(&(uid as u64))
    })
}

/// `path` (`PARENT/NAME`) as a private directory of `uid`, made if missing (its parent must exist).
pub fn open_base(path: &str, uid: u32) -> Result<Dir, Option<String>> {
    let (parent, name) = path.rsplit_once('/').ok_or(None)?;
    let parent = if parent.is_empty() { "/" } else { parent };
    let pfd = Fd::open(parent, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|_| None)?;
    private_dir(pfd.0, name, path, uid, true)
}

/// A directory of this user's own in /tmp, with a name nobody can guess (`places::fallback_prefix`
/// and 16 random hex digits): one that is there already and private, else a new one.
fn fallback_dir(uid: u32) -> Result<Dir, String> {
    let tmp =
        Fd::open("/tmp", libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| format!("/tmp: {e}"))?;
    let mut names: Vec<String> = list_dir("/tmp")
        .unwrap_or_default()
        .into_iter()
        .filter(|n| super::places::is_fallback_name(n, uid))
        .collect();
    names.sort();
    for n in &names {
        if let Ok(d) = private_dir(tmp.0, n, &format!("/tmp/{n}"), uid, false) {
            return Ok(d);
        }
    }
    for _ in 0..8 {
        let mut r = [0u8; 8];
        sys::getrandom(&mut r).map_err(|e| format!("getrandom: {e}"))?;
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{}{hex}", super::places::fallback_prefix(uid));
        match sys::mkdirat(tmp.0, &cpath(&name), 0o700) {
            Ok(()) => {
                let made = private_dir(tmp.0, &name, &format!("/tmp/{name}"), uid, false);
                if made.is_err() {
                    let _ = sys::unlinkat(tmp.0, &cpath(&name), libc::AT_REMOVEDIR);
                }
                return made.map_err(|e| e.unwrap_or_else(|| format!("/tmp/{name} vanished")));
            }
            Err(Errno(libc::EEXIST)) => continue,
            Err(e) => return Err(format!("cannot make a directory in /tmp: {e}")),
        }
    }
    Err("cannot make a directory of its own in /tmp".into())
}

/// The runtime's system calls for `places::open_protected`.
struct RawCalls;

impl super::places::Calls for RawCalls {
    fn openat(&self, dir: i32, path: &[u8], flags: i32, mode: u32) -> Result<i32, i32> {
        sys::openat(dir, path, flags, mode).map_err(|e| e.0)
    }
    fn lstatat(&self, dir: i32, path: &[u8]) -> Result<super::places::Stat, i32> {
        let flags = libc::AT_SYMLINK_NOFOLLOW | if path == b"\0" { libc::AT_EMPTY_PATH } else { 0 };
        let st = sys::statat(dir, path, flags).map_err(|e| e.0)?;
        Ok(super::places::Stat { mode: st.st_mode, uid: st.st_uid, dev: st.st_dev, ino: st.st_ino })
    }
    fn readlink_fd(&self, fd: i32) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 4096];
        let n = sys::readlinkat(fd, b"\0", &mut buf).map_err(|e| e.0)?;
        buf.truncate(n);
        Ok(buf)
    }
    fn close(&self, fd: i32) {
        sys::close(fd);
    }
    fn geteuid(&self) -> u32 {
        sys::geteuid()
    }
}

/// Open `path` as `places::open_protected` does (a link or a file another user planted in a
/// sticky directory is refused): the file's descriptor (high, close-on-exec) and its directory's.
pub fn open_protected(path: &str, last: super::places::Last) -> Result<(Fd, Fd), String> {
    match super::places::open_protected(&RawCalls, path, last) {
        Ok((fd, dir)) => Ok((Fd(fd), Fd(dir))),
        Err(super::places::Refused::Errno(e)) => Err(format!("{path}: {}", Errno(e))),
        Err(super::places::Refused::Protected(why)) => Err(format!("{path}: {why}")),
    }
}

/// `/tmp/perf-PID.map`, opened to append (created if need be, mode 0644), by the protected rules:
/// a link or a file another user put there is refused.
pub fn perf_map() -> Result<Kept, String> {
    let path = format!("/tmp/perf-{}.map", sys::getpid());
    let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC;
    let (fd, _dir) = open_protected(&path, super::places::Last::File { flags, mode: 0o644 })?;
    let st = sys::fstat(fd.0).map_err(|e| format!("{path}: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("{path} is not a regular file"));
    }
    let kept = Kept::new();
    let raw = fd.0;
    core::mem::forget(fd);
    kept.set(keep_high(raw));
    Ok(kept)
}

/// A descriptor libuprobe keeps for itself, with the identity of what it opened (`fstat`'s device
/// and inode). The program may close any number (a daemon's `closerange(3, ~0)`) and get it back
/// for a file of its own: [`Kept::get`] then says so, and the number is forgotten, never used or
/// closed again.
pub struct Kept {
    fd: core::sync::atomic::AtomicI32,
    dev: core::sync::atomic::AtomicU64,
    ino: core::sync::atomic::AtomicU64,
}

impl Kept {
    pub const fn new() -> Kept {
        Kept {
            fd: core::sync::atomic::AtomicI32::new(-1),
            dev: core::sync::atomic::AtomicU64::new(0),
            ino: core::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Keep `fd` (-1: none), remembering what it is now. The old one is returned, as it was.
    pub fn set(&self, fd: i32) -> i32 {
        use core::sync::atomic::Ordering::Release;
        if let Ok(st) = sys::fstat(fd) {
            self.dev.store(st.st_dev, Release);
            self.ino.store(st.st_ino, Release);
        }
        self.fd.swap(fd, core::sync::atomic::Ordering::AcqRel)
    }

    /// The descriptor, if it is still what was kept; else None, and it is forgotten.
    pub fn get(&self) -> Option<i32> {
        use core::sync::atomic::Ordering::Acquire;
        let fd = self.fd.load(Acquire);
        if fd < 0 {
            return None;
        }
        if sys::fstat(fd).is_ok_and(|st| {
            (st.st_dev, st.st_ino) == (self.dev.load(Acquire), self.ino.load(Acquire))
        }) {
            return Some(fd);
        }
        let _ = self.fd.compare_exchange(fd, -1, core::sync::atomic::Ordering::AcqRel, Acquire);
        None
    }

    /// The number, unchecked (for `poll`, whose answer is checked with [`Kept::get`]).
    pub fn raw(&self) -> i32 {
        self.fd.load(core::sync::atomic::Ordering::Acquire)
    }

    /// Close it if it is still ours, and keep none.
    pub fn close(&self) {
        if let Some(fd) = self.get() {
            sys::close(fd);
        }
        self.fd.store(-1, core::sync::atomic::Ordering::Release);
    }

    /// Forget it without closing (a forked child's copy is closed by [`Kept::close`] instead).
    pub fn forget(&self) -> i32 {
        self.fd.swap(-1, core::sync::atomic::Ordering::AcqRel)
    }
}

impl Default for Kept {
    fn default() -> Self {
        Self::new()
    }
}
