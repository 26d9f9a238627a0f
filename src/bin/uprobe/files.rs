//! Files the command writes where the user said (`run -o`, `--flamegraph`), opened with the
//! protected-symlink rules of `places::open_protected`: a link or a file that another user planted
//! in a sticky directory (`/tmp/out.json`) is refused, never followed or truncated.

use std::fs::File;
use std::os::fd::FromRawFd;

use super::places::{self, Calls, Last, Refused, Stat};

struct LibcCalls;

fn cstr(path: &[u8]) -> &std::ffi::CStr {
    std::ffi::CStr::from_bytes_until_nul(path).unwrap_or(c"")
}

impl Calls for LibcCalls {
    fn openat(&self, dir: i32, path: &[u8], flags: i32, mode: u32) -> Result<i32, i32> {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::openat(dir, cstr(path).as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
        } else {
            Ok(fd)
        }
    }
    fn lstatat(&self, dir: i32, path: &[u8]) -> Result<Stat, i32> {
        let flags = libc::AT_SYMLINK_NOFOLLOW | if path == b"\0" { libc::AT_EMPTY_PATH } else { 0 };
        // SAFETY: zeroed stat is valid.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: a NUL-terminated path; `st` is writable.
        if unsafe { libc::fstatat(dir, cstr(path).as_ptr(), &mut st, flags) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        Ok(Stat { mode: st.st_mode, uid: st.st_uid, dev: st.st_dev, ino: st.st_ino })
    }
    fn readlink_fd(&self, fd: i32) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable; an empty path reads the link `fd` is.
        let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }
    fn close(&self, fd: i32) {
        // SAFETY: a descriptor this code opened.
        unsafe { libc::close(fd) };
    }
    fn geteuid(&self) -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }
}

/// Create (or truncate) `path` for writing, with the protected-symlink rules.
pub fn create(path: &std::path::Path) -> Result<File, String> {
    let text = path.to_string_lossy();
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
    match places::open_protected(&LibcCalls, &text, Last::File { flags, mode: 0o666 }) {
        Ok((fd, dir)) => {
            LibcCalls.close(dir);
            // SAFETY: a descriptor we own.
            Ok(unsafe { File::from_raw_fd(fd) })
        }
        Err(Refused::Errno(e)) => Err(format!("{text}: {}", std::io::Error::from_raw_os_error(e))),
        Err(Refused::Protected(why)) => Err(format!("{text}: {why}")),
    }
}

/// A new directory of this user's alone (0700, a name nobody can guess), for scratch files.
pub fn private_temp_dir(prefix: &str) -> Result<std::path::PathBuf, String> {
    let mut template =
        std::env::temp_dir().join(format!("{prefix}XXXXXX")).into_os_string().into_encoded_bytes();
    template.push(0);
    // SAFETY: a writable NUL-terminated template ending in XXXXXX.
    let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(format!(
            "cannot make a directory in {}: {}",
            std::env::temp_dir().display(),
            std::io::Error::last_os_error()
        ));
    }
    template.pop();
    // SAFETY: the bytes came from an OsString, with only ASCII replaced.
    Ok(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(template) }.into())
}
