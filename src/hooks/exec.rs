//! exec: the summary of the image that goes is written first (its counts would be lost), then
//! LD_PRELOAD and UPROBES, inherited, instrument the new image. `_exit` (and `_Exit`), which end
//! the image without exit handlers (every shell exits so, and a forked child by convention): the
//! summary as at `exit`.
//!
//! Only an exec that can succeed ends the image: before it, libuprobe checks what the kernel will
//! check first (the file exists, is a regular file the caller may execute, starts like an ELF file
//! or a script), and a PATH search is done as libc will do it. An exec that is bound to fail
//! (a shell trying each directory of PATH) writes nothing and changes nothing; the runtime, its
//! socket and its threads go on. If an exec that passed the check fails all the same, the socket
//! is served again and the image goes on; its summary at exit is then its second (said in README).

use core::ffi::{c_char, c_int, CStr};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::runtime::{fs, owner, InRuntime};
use crate::sigsafe::sys;
use crate::{control, report};

use super::table;

/// Will an exec of `path` likely succeed?
fn can_exec(path: &[u8]) -> bool {
    let mut p = path.to_vec();
    p.push(0);
    let Ok(st) = sys::stat(&p, 0) else { return false };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || sys::access(&p, libc::X_OK).is_err() {
        return false;
    }
    let Ok(fd) = sys::open(&p, libc::O_RDONLY, 0) else {
        // Executable but not readable: the kernel may still run it (an ELF file).
        return true;
    };
    let fd = fs::Fd(fd);
    let mut head = [0u8; 4];
    matches!(sys::read(fd.0, &mut head), Ok(n) if n >= 2)
        && (head == *b"\x7fELF" || head[..2] == *b"#!")
}

/// The file `execvp(file)` runs: `file` itself if it has a `/`, else the first executable match in
/// PATH (or libc's default path).
fn search_path(file: &[u8]) -> Option<Vec<u8>> {
    if file.contains(&b'/') {
        return Some(file.to_vec());
    }
    if file.is_empty() {
        return None;
    }
    let path =
        crate::runtime::config::env_bytes("PATH").unwrap_or_else(|| b"/bin:/usr/bin".to_vec());
    path.split(|&b| b == b':').find_map(|dir| {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(file);
        can_exec(&candidate).then_some(candidate)
    })
}

/// Before an exec that will likely replace this image: its summary. Returns whether the socket
/// was taken down (to be served again if the exec fails).
fn before_exec(target: Option<Vec<u8>>) -> bool {
    if !owner::owns() || !target.is_some_and(|t| can_exec(&t)) {
        return false;
    }
    let _rt = InRuntime::enter();
    control::before_exec();
    report::write_summary();
    true
}

fn after_failed_exec(prepared: bool) {
    if prepared {
        let _rt = InRuntime::enter();
        control::after_failed_exec();
    }
}

fn bytes(p: *const c_char) -> Option<Vec<u8>> {
    // SAFETY: exec's path is a NUL-terminated string (or null, which fails with EFAULT).
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes().to_vec())
}

/// # Safety
/// As libc's `execve`.
pub unsafe fn execve(
    real: Option<table::execve::Fn>,
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let prepared = before_exec(bytes(path));
    // SAFETY: forwarding the caller's arguments.
    let r = real.map_or(-1, |real| unsafe { real(path, argv, envp) });
    after_failed_exec(prepared);
    r
}

/// # Safety
/// As libc's `execv`.
pub unsafe fn execv(
    real: Option<table::execv::Fn>,
    path: *const c_char,
    argv: *const *const c_char,
) -> c_int {
    let prepared = before_exec(bytes(path));
    // SAFETY: forwarding the caller's arguments.
    let r = real.map_or(-1, |real| unsafe { real(path, argv) });
    after_failed_exec(prepared);
    r
}

/// # Safety
/// As libc's `execvp`.
pub unsafe fn execvp(
    real: Option<table::execvp::Fn>,
    file: *const c_char,
    argv: *const *const c_char,
) -> c_int {
    let prepared = before_exec(bytes(file).and_then(|f| search_path(&f)));
    // SAFETY: forwarding the caller's arguments.
    let r = real.map_or(-1, |real| unsafe { real(file, argv) });
    after_failed_exec(prepared);
    r
}

/// # Safety
/// As libc's `execvpe`.
pub unsafe fn execvpe(
    real: Option<table::execvpe::Fn>,
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let prepared = before_exec(bytes(file).and_then(|f| search_path(&f)));
    // SAFETY: forwarding the caller's arguments.
    let r = real.map_or(-1, |real| unsafe { real(file, argv, envp) });
    after_failed_exec(prepared);
    r
}

/// Set once the summary of this image was written at its end.
static FINISHED: AtomicBool = AtomicBool::new(false);

/// The image ends (`exit`, through libuprobe's exit handler; or `_exit`): its socket goes and its
/// summary is written, once. Runs no code of the program's and takes no lock the program could
/// hold (the runtime has its own allocator and writes with system calls), so it may run where
/// `_exit` is called from a signal handler.
pub fn finish() {
    if FINISHED.swap(true, Ordering::SeqCst) {
        return;
    }
    let _rt = InRuntime::enter();
    if owner::owns() {
        control::remove_socket();
    }
    report::write_summary();
}

/// # Safety
/// As libc's `_exit`.
pub unsafe fn exit_now(real: Option<table::_exit::Fn>, status: c_int) -> ! {
    // Not in a vfork child (which shares this memory, and whose `_exit` ends only itself), and
    // not inside libuprobe's own code on this thread (where signals are blocked anyway).
    if owner::owns() && !crate::runtime::in_runtime() {
        finish();
    }
    match real {
        // SAFETY: forwarding the caller's argument.
        Some(real) => unsafe { real(status) },
        None => sys::exit_group(status),
    }
}
