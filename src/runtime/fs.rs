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
