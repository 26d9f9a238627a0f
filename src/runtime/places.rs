//! Where a process's control socket (and the cache) lives, and what makes such a directory
//! trustworthy. Shared by the runtime (which creates it) and by the `uprobe` command (which finds
//! it): compiled into both, since the command never links the runtime. Only rules live here; each
//! side opens and checks directories by descriptor with its own system calls.
//!
//! A directory of libuprobe's inside a shared one (`/tmp`, or `$XDG_RUNTIME_DIR`) is used only if,
//! opened without following a symbolic link, it is a directory that belongs to the user and that
//! nobody else may enter ([`private_dir_problem`]). When the usual one fails that (another user
//! made `/tmp/uprobe-<uid>` first), a process uses a directory of its own with a random name,
//! `/tmp/uprobe-<uid>-<16 hex digits>` ([`FALLBACK_PREFIX`]), which `uprobe` looks in too.

use std::path::PathBuf;

/// The directories where sockets of this user's processes go first, in the order they are tried:
/// `$XDG_RUNTIME_DIR/uprobe`, then `/tmp/uprobe-<uid>`.
pub fn socket_dirs(uid: u32, xdg_runtime_dir: Option<&str>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(xdg) = xdg_runtime_dir.filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("uprobe"));
    }
    dirs.push(PathBuf::from(format!("/tmp/uprobe-{uid}")));
    dirs
}

/// The name (in `/tmp`) a fallback directory of `uid` starts with; a random suffix of 16 hex
/// digits follows.
pub fn fallback_prefix(uid: u32) -> String {
    format!("uprobe-{uid}-")
}

/// Is `name` (an entry of `/tmp`) a fallback directory's name for `uid`?
pub fn is_fallback_name(name: &str, uid: u32) -> bool {
    name.strip_prefix(&fallback_prefix(uid))
        .is_some_and(|rest| rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Why a directory opened without following a final symbolic link (`O_NOFOLLOW|O_DIRECTORY`),
/// with this `fstat`, may not hold `uid`'s sockets or cache: None if it may.
pub fn private_dir_problem(st_mode: u32, st_uid: u32, uid: u32) -> Option<String> {
    const S_IFMT: u32 = 0o170000;
    const S_IFDIR: u32 = 0o040000;
    if st_mode & S_IFMT != S_IFDIR {
        return Some("is not a directory".into());
    }
    if st_uid != uid {
        return Some(format!("belongs to uid {st_uid}, not {uid}"));
    }
    if st_mode & 0o077 != 0 {
        return Some(format!("may be entered by others (mode {:04o})", st_mode & 0o7777));
    }
    None
}

/// The socket's file name for `pid`.
pub fn socket_name(pid: i32) -> String {
    format!("{pid}.sock")
}

/// The system calls [`open_protected`] makes: the runtime's raw ones, or the command's libc.
/// Errors are errno values; paths end in NUL.
pub trait Calls {
    fn openat(&self, dir: i32, path: &[u8], flags: i32, mode: u32) -> Result<i32, i32>;
    /// `fstatat(dir, path, AT_SYMLINK_NOFOLLOW)` (`path` b"\0" with `AT_EMPTY_PATH`: `dir` itself).
    fn lstatat(&self, dir: i32, path: &[u8]) -> Result<Stat, i32>;
    /// The target of the symbolic link `fd` was opened as (`O_PATH|O_NOFOLLOW`).
    fn readlink_fd(&self, fd: i32) -> Result<Vec<u8>, i32>;
    fn close(&self, fd: i32);
    fn geteuid(&self) -> u32;
}

/// What [`open_protected`] needs of a `stat`.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub dev: u64,
    pub ino: u64,
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
const S_IFDIR: u32 = 0o040000;

/// How the last part of the path is opened: a directory (`O_PATH`), or a file with these `open`
/// flags (and this mode, when `O_CREAT` makes it).
#[derive(Clone, Copy)]
pub enum Last {
    Dir,
    File { flags: i32, mode: u32 },
}

/// Why [`open_protected`] did not open a path.
#[derive(Debug)]
pub enum Refused {
    /// The system said no (errno).
    Errno(i32),
    /// The protection rules said no: why, for the user.
    Protected(String),
}

/// Open `path` one part at a time, each by descriptor, with the rules the kernel applies under
/// `fs.protected_symlinks=1` and `fs.protected_regular=2`, whatever this host's settings: in a
/// sticky directory that others may write (`/tmp`), a symbolic link is followed, and a file that
/// exists is opened, only when it belongs to this user or to the directory's owner. So a link or
/// a file that another user planted where a report will go (`/tmp/report-%p.txt`) is refused,
/// never followed. Returns the descriptor (close-on-exec), and the directory's (`O_PATH`).
pub fn open_protected(c: &impl Calls, path: &str, last: Last) -> Result<(i32, i32), Refused> {
    const O_PATH: i32 = 0o10000000;
    const O_DIRECTORY: i32 = 0o200000;
    const O_NOFOLLOW: i32 = 0o400000;
    const O_CREAT: i32 = 0o100;
    const O_EXCL: i32 = 0o200;
    const AT_FDCWD: i32 = -100;
    const ENOENT: i32 = 2;
    const EEXIST: i32 = 17;
    const ELOOP: i32 = 40;
    const EISDIR: i32 = 21;
    let euid = c.geteuid();
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    let start = if path.starts_with('/') { "/" } else { "." };
    let mut dir =
        c.openat(AT_FDCWD, &cstr(start), O_PATH | O_DIRECTORY, 0).map_err(Refused::Errno)?;
    // The parts still to walk, the next one last.
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
    let (mut links, mut races) = (0, 0);
    let set_dir = |dir: &mut i32, new: i32| {
        c.close(*dir);
        *dir = new;
    };
    let fail = |dir: i32, r: Refused| {
        c.close(dir);
        Err(r)
    };
    while let Some(part) = todo.pop() {
        let is_last = todo.iter().all(|p| p.is_empty() || p == ".");
        if part.is_empty() || part == "." {
            if is_last {
                if let Last::File { .. } = last {
                    return fail(dir, Refused::Errno(EISDIR));
                }
                // The path names a directory: `dir` itself.
                let fd = c.openat(dir, b".\0", O_PATH | O_DIRECTORY, 0);
                return match fd {
                    Ok(fd) => Ok((fd, dir)),
                    Err(e) => fail(dir, Refused::Errno(e)),
                };
            }
            continue;
        }
        let name = cstr(&part);
        let here = match c.lstatat(dir, b"\0") {
            Ok(st) => st,
            Err(e) => return fail(dir, Refused::Errno(e)),
        };
        let shared = here.mode & 0o1000 != 0 && here.mode & 0o022 != 0;
        let foreign = |st: &Stat| shared && st.uid != euid && st.uid != here.uid;
        let st = match c.lstatat(dir, &name) {
            Ok(st) => Some(st),
            Err(ENOENT) => None,
            Err(e) => return fail(dir, Refused::Errno(e)),
        };
        match st {
            Some(st) if st.mode & S_IFMT == S_IFLNK => {
                if foreign(&st) {
                    return fail(
                        dir,
                        Refused::Protected(format!(
                            "`{part}` is a symbolic link of uid {} in a directory others may \
                             write: not followed",
                            st.uid
                        )),
                    );
                }
                links += 1;
                if links > 40 {
                    return fail(dir, Refused::Errno(ELOOP));
                }
                let lfd = match c.openat(dir, &name, O_PATH | O_NOFOLLOW, 0) {
                    Ok(fd) => fd,
                    Err(e) => return fail(dir, Refused::Errno(e)),
                };
                // The link read is the one checked (same inode), not one swapped in since.
                let same = c.lstatat(lfd, b"\0").is_ok_and(|s| s.ino == st.ino && s.dev == st.dev);
                let target = c.readlink_fd(lfd);
                c.close(lfd);
                let target = match target {
                    Ok(t) if same => t,
                    _ => {
                        races += 1;
                        if races > 8 {
                            return fail(dir, Refused::Errno(ELOOP));
                        }
                        todo.push(part);
                        continue;
                    }
                };
                let target = String::from_utf8_lossy(&target).into_owned();
                if target.starts_with('/') {
                    match c.openat(AT_FDCWD, b"/\0", O_PATH | O_DIRECTORY, 0) {
                        Ok(root) => set_dir(&mut dir, root),
                        Err(e) => return fail(dir, Refused::Errno(e)),
                    }
                }
                todo.extend(target.split('/').rev().map(str::to_string));
            }
            Some(st) if !is_last => {
                if st.mode & S_IFMT != S_IFDIR {
                    return fail(dir, Refused::Errno(20)); // ENOTDIR
                }
                match c.openat(dir, &name, O_PATH | O_DIRECTORY | O_NOFOLLOW, 0) {
                    Ok(d) => set_dir(&mut dir, d),
                    Err(ELOOP) if races < 8 => {
                        races += 1;
                        todo.push(part);
                    }
                    Err(e) => return fail(dir, Refused::Errno(e)),
                }
            }
            Some(st) => {
                let (flags, mode) = match last {
                    Last::Dir => (O_PATH | O_DIRECTORY, 0),
                    Last::File { flags, mode } => (flags & !O_CREAT & !O_EXCL, mode),
                };
                if let Last::File { flags, .. } = last {
                    if flags & O_EXCL != 0 {
                        return fail(dir, Refused::Errno(EEXIST));
                    }
                }
                if matches!(last, Last::File { .. }) && foreign(&st) {
                    return fail(
                        dir,
                        Refused::Protected(format!(
                            "`{part}` belongs to uid {} in a directory others may write: not \
                             opened",
                            st.uid
                        )),
                    );
                }
                match c.openat(dir, &name, flags | O_NOFOLLOW, mode) {
                    Ok(fd) => {
                        let same =
                            c.lstatat(fd, b"\0").is_ok_and(|s| s.ino == st.ino && s.dev == st.dev);
                        if same {
                            return Ok((fd, dir));
                        }
                        c.close(fd);
                    }
                    Err(ELOOP) | Err(ENOENT) => {}
                    Err(e) => return fail(dir, Refused::Errno(e)),
                }
                races += 1;
                if races > 8 {
                    return fail(dir, Refused::Errno(ELOOP));
                }
                todo.push(part);
            }
            None => {
                let Last::File { flags, mode } = last else {
                    return fail(dir, Refused::Errno(ENOENT));
                };
                if flags & O_CREAT == 0 || !is_last {
                    return fail(dir, Refused::Errno(ENOENT));
                }
                match c.openat(dir, &name, flags | O_CREAT | O_EXCL | O_NOFOLLOW, mode) {
                    Ok(fd) => return Ok((fd, dir)),
                    Err(EEXIST) if races < 8 => {
                        races += 1;
                        todo.push(part);
                    }
                    Err(e) => return fail(dir, Refused::Errno(e)),
                }
            }
        }
    }
    // An empty path.
    fail(dir, Refused::Errno(ENOENT))
}
