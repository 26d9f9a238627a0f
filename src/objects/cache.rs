//! What libuprobe learns of an object's file (its symbols, sections, segments, the mask-fix
//! sites of libc) kept on disk, by the file's identity, so that the next process that maps the
//! same file (a child after exec, the next run) reads it in a fraction of the time: a probe on
//! `malloc` costs a process its ELF parse only once.
//!
//! The cache is `$XDG_RUNTIME_DIR/uprobe/cache`, else `/tmp/uprobe-<uid>/cache` (the control
//! sockets' directories), made 0700 and used only if it belongs to this user. An entry's name is
//! the file's device, inode, size, modification and change times: a file changed in any way is a
//! new entry. Entries are written whole to a temporary name and renamed, never read half
//! written; anything that does not decode is ignored (the file is parsed again).
//! `UPROBES_CACHE=0` turns it off.

use crate::runtime::{config, fs};
use crate::sigsafe::sys;

/// The identity of a file, as the cache names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Key {
    pub fn of(fd: i32) -> Option<Key> {
        let st = sys::fstat(fd).ok()?;
        Some(Key {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        })
    }

    fn name(&self, kind: &str) -> String {
        format!(
            "{:x}-{:x}-{:x}-{:x}.{:x}-{:x}.{:x}.{kind}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }
}

const MAGIC: &[u8; 8] = b"UPRBC\x00\x00\x02";

fn dir() -> Option<String> {
    if config::env_bytes("UPROBES_CACHE").is_some_and(|v| v == b"0") {
        return None;
    }
    let uid = sys::geteuid();
    let base = match config::env_bytes("XDG_RUNTIME_DIR").and_then(|b| String::from_utf8(b).ok()) {
        Some(x) if !x.is_empty() => format!("{x}/uprobe"),
        _ => format!("/tmp/uprobe-{uid}"),
    };
    let dir = format!("{base}/cache");
    for d in [&base, &dir] {
        match sys::stat(&fs::cpath(d), 0) {
            Ok(st) if st.st_uid == uid && st.st_mode & 0o022 == 0 => {}
            Ok(_) => return None, // someone else's, or writable by others: not trusted
            Err(_) => {
                sys::mkdir(&fs::cpath(d), 0o700).ok()?;
                let st = sys::stat(&fs::cpath(d), 0).ok()?;
                if st.st_uid != uid {
                    return None;
                }
            }
        }
    }
    Some(dir)
}

/// The cached bytes of `kind` for the file `key`, if any.
pub fn get(key: &Key, kind: &str) -> Option<Vec<u8>> {
    let path = format!("{}/{}", dir()?, key.name(kind));
    let mut data = fs::read(&path).ok()?;
    if !data.starts_with(MAGIC) {
        return None;
    }
    // In place: libc's entry is 200 KiB, and a copy is a fresh mapping to fill.
    data.drain(..MAGIC.len());
    Some(data)
}

/// Keep `data` as `kind` for the file `key` (best effort).
pub fn put(key: &Key, kind: &str, data: &[u8]) {
    let Some(dir) = dir() else { return };
    let path = format!("{dir}/{}", key.name(kind));
    let tmp = format!("{path}.{}", sys::getpid());
    let Ok(fd) = sys::open(&fs::cpath(&tmp), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o600)
    else {
        return;
    };
    let ok = sys::write_all(fd, MAGIC).is_ok() && sys::write_all(fd, data).is_ok();
    sys::close(fd);
    if !ok || sys::rename(&fs::cpath(&tmp), &fs::cpath(&path)).is_err() {
        let _ = sys::unlink(&fs::cpath(&tmp));
    }
}

/// Little-endian encoding of what is cached.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

/// Decoding; every read checks its bounds (a damaged entry decodes to None).
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }
    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    pub fn str(&mut self) -> Option<String> {
        let n = usize::try_from(self.u64()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }
    pub fn opt_str(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => self.str().map(Some),
            _ => None,
        }
    }
    /// A count of items that each take at least `min` bytes: bounded by what is left.
    pub fn count(&mut self, min: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.saturating_mul(min) <= self.0.len()).then_some(n)
    }
}
