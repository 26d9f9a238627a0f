//! What libuprobe learns of an object's file (its symbols, sections, segments, the mask-fix
//! sites of libc) kept on disk, by the file's identity, so that the next process that maps the
//! same file (a child after exec, the next run) reads it in a fraction of the time: a probe on
//! `malloc` costs a process its ELF parse only once.
//!
//! The cache is `cache` in libuprobe's private directory of this user (`$XDG_RUNTIME_DIR/uprobe`,
//! else `/tmp/uprobe-<uid>`, else the fallback: `runtime::places`), opened by descriptor and
//! checked like it (this user's, nobody else's to enter, not a symbolic link), and used only through
//! that descriptor; an entry is read only if it is a regular file of this user's. An entry's name
//! is the file's device, inode, size, modification and change times: a file changed in any way is
//! a new entry. Entries are written whole to a temporary name and renamed, never read half
//! written, and carry an integrity check; anything damaged or that does not decode is ignored (the
//! file is parsed again). What an entry says is checked against the file before it decides where
//! code is written. `UPROBES_CACHE=0` turns it off.

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

const MAGIC: &[u8; 8] = b"UPRBC\x00\x00\x03";

/// The largest entry read back (libc's is about 200 KiB).
const MAX_ENTRY: usize = 64 << 20;

/// The cache directory, opened by descriptor and checked (see `runtime::fs::private_dir`), or
/// None when off or not usable.
fn dir() -> Option<fs::Dir> {
    let config = config::get();
    if !config.cache {
        return None;
    }
    let uid = sys::geteuid();
    let base = fs::base_dir(uid, config.runtime_dir.as_deref()).ok()?;
    fs::private_dir(base.fd, "cache", &format!("{}/cache", base.path), uid, true).ok()
}

/// The integrity check of an entry's payload: against an entry damaged or cut short (a full
/// disk, a crash in the middle of a write by another tool), not against someone able to write
/// the directory, which only this user can (what an entry says about code is checked against
/// the file itself before it is used: see `ElfFile::verify_cached`).
fn check(payload: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::runtime::hash::FxHasher::default();
    h.write_u64(payload.len() as u64);
    h.write(payload);
    h.finish()
}

/// The cached bytes of `kind` for the file `key`, if any, whole and undamaged.
pub fn get(key: &Key, kind: &str) -> Option<Vec<u8>> {
    let dir = dir()?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = fs::Fd(sys::openat(dir.fd, &fs::cpath(&key.name(kind)), flags, 0).ok()?);
    let st = sys::fstat(fd.0).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG
        || st.st_uid != sys::geteuid()
        || st.st_size as usize > MAX_ENTRY
    {
        return None;
    }
    let mut data = fd.read_to_end().ok()?;
    let head = data.get(..MAGIC.len() + 8)?;
    if !head.starts_with(MAGIC) {
        return None;
    }
    let sum = u64::from_le_bytes(head[MAGIC.len()..].try_into().ok()?);
    // In place: libc's entry is 200 KiB, and a copy is a fresh mapping to fill.
    data.drain(..MAGIC.len() + 8);
    (check(&data) == sum).then_some(data)
}

/// Keep `data` as `kind` for the file `key` (best effort): written whole under a name of its
/// own, then renamed into place.
pub fn put(key: &Key, kind: &str, data: &[u8]) {
    let Some(dir) = dir() else { return };
    let name = key.name(kind);
    let tmp = fs::cpath(&format!("{name}.{}", sys::getpid()));
    let _ = sys::unlinkat(dir.fd, &tmp, 0); // left by a killed process whose pid this one has
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let Ok(fd) = sys::openat(dir.fd, &tmp, flags, 0o600) else { return };
    let ok = sys::write_all(fd, MAGIC).is_ok()
        && sys::write_all(fd, &check(data).to_le_bytes()).is_ok()
        && sys::write_all(fd, data).is_ok();
    sys::close(fd);
    if !ok || sys::renameat(dir.fd, &tmp, dir.fd, &fs::cpath(&name)).is_err() {
        let _ = sys::unlinkat(dir.fd, &tmp, 0);
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
