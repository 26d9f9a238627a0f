//! What libuprobe says: problems found while setting up, and the summary at exit, as a readable
//! table (`UPROBES_FORMAT=text`, the default) or JSON Lines (`UPROBES_FORMAT=json`), written to
//! stderr or appended to `UPROBES_OUTPUT` (`%p` is replaced by the pid). Every error and every
//! probe is rendered here, and nowhere else.

pub mod json;
pub mod text;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::consumers::events;
use crate::error::ProbeError;
use crate::registry::{self, Problem};
use crate::runtime::config::{self, Format, TraceFormat};
use crate::runtime::{fs, lock::Mutex, places, InRuntime};
use crate::sigsafe::sys;
use crate::spec;

/// A duplicate of the stderr the program started with. Many programs close stderr on their way
/// out (gnulib's `close_stdout` does, in every coreutils program), before our destructor runs.
/// Checked before each write: a program that closed it (`closerange`) and reused the number for a
/// file of its own never gets the report in that file.
static STDERR: fs::Kept = fs::Kept::new();

/// Where text for stderr goes: the duplicate while it is ours, else the program's stderr now.
fn stderr_fd() -> i32 {
    STDERR.get().unwrap_or(2)
}
/// `UPROBES_OUTPUT` could not be written, and that was said.
static OUTPUT_FAILED: AtomicBool = AtomicBool::new(false);

/// How long the constructor took to set up the runtime and register `UPROBES` (the summary's
/// `setup_ns`).
pub static SETUP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Keep the program's stderr for the report: a close-on-exec duplicate, numbered high so that it
/// never takes a descriptor number the program expects `open` to return.
pub fn keep_stderr() {
    let fd = sys::dup_cloexec_at_least(2, fs::high_fd_floor())
        .or_else(|_| sys::dup_cloexec_at_least(2, 3));
    if let Ok(fd) = fd {
        STDERR.set(fd);
        sys::MESSAGE_FD.store(fd, Ordering::Relaxed);
    }
}

/// Grow the descriptor table to hold the report's high descriptors now, while the process has one
/// thread: growing it later, with other threads, waits for an RCU grace period (milliseconds, at
/// exit, in every process).
pub fn reserve_descriptors() {
    for fd in 0..3 {
        if let Ok(high) = sys::dup_cloexec_at_least(fd, fs::high_fd_floor()) {
            sys::close(high);
            return;
        }
    }
}

/// The report file, open: its descriptor (close-on-exec, numbered high, like the stderr
/// duplicate), its identity, and the pid it was opened for (`%p`).
struct OutFile {
    fd: i32,
    id: (u64, u64),
    pid: i32,
}

static OUT: Mutex<Option<OutFile>> = Mutex::new(None);

/// Write to the report file, opening it on first use. It stays open, so that a program that
/// drops its privileges (a daemon) can still write its report; a descriptor that is no longer
/// the file (the program closed it, and the number was reused) is never written to.
fn write_report_file(template: &str, head: &[u8], text: &[u8], pad: bool) -> Result<(), String> {
    let pid = sys::getpid();
    let mut out = OUT.lock();
    let same = |o: &OutFile| {
        o.pid == pid && sys::fstat(o.fd).is_ok_and(|st| (st.st_dev, st.st_ino) == o.id)
    };
    if !out.as_ref().is_some_and(same) {
        if let Some(o) = out.take() {
            // A forked child's copy of its parent's descriptor is its own to close; a descriptor
            // that is no longer the file belongs to the program.
            if o.pid != pid || sys::fstat(o.fd).is_ok_and(|st| (st.st_dev, st.st_ino) == o.id) {
                sys::close(o.fd);
            }
        }
        let path = template.replace("%p", &pid.to_string());
        let high = open_report(&path)?;
        let st = sys::fstat(high).map_err(|e| e.to_string())?;
        *out = Some(OutFile { fd: high, id: (st.st_dev, st.st_ino), pid });
        // A file that starts here starts with its head (a Chrome trace's `[`); a file shared
        // with a parent, or an earlier image of an exec chain, has it already. A forked child and
        // its parent (or two processes a shell started) may both open it empty: who writes the
        // head is decided under the file's lock (a lock someone else holds for long is given up
        // after a tenth of a second: a second head is then possible, never a hang).
        if !head.is_empty() {
            let mut locked = false;
            for _ in 0..200 {
                locked = sys::flock(high, libc::LOCK_EX | libc::LOCK_NB).is_ok();
                if locked {
                    break;
                }
                sys::sleep_ns(500_000);
            }
            let empty = sys::fstat(high).is_ok_and(|st| st.st_size == 0);
            let wrote = if empty { sys::write_all(high, head) } else { Ok(()) };
            if locked {
                let _ = sys::flock(high, libc::LOCK_UN);
            }
            wrote.map_err(|e| e.to_string())?;
        }
    }
    let fd = out.as_ref().map_or(-1, |o| o.fd);
    write_whole_lines(fd, text, pad).map_err(|e| e.to_string())
}

/// Open a report file (`UPROBES_OUTPUT`, `UPROBES_FOLDED`) for appending, creating it: never
/// through a symbolic link, nor into a file, that another user planted in a sticky directory
/// (`fs::open_protected`). Its descriptor, numbered high.
fn open_report(path: &str) -> Result<i32, String> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND;
    let (fd, _dir) = fs::open_protected(path, places::Last::File { flags, mode: 0o666 })
        .map_err(|e| e.strip_prefix(&format!("{path}: ")).map(str::to_string).unwrap_or(e))?;
    let high = fs::keep_high(fd.0);
    core::mem::forget(fd);
    Ok(high)
}

/// Write `text` (whole lines) so that a kill leaves whole lines: the kernel checks for a fatal
/// signal between the pages of a write to a file, so a batch of events written at once could end
/// in the middle of one (a Chrome trace that no longer parses). Each write ends at a line end and,
/// where the line fits, at or before the file's next page boundary. With `pad` (a Chrome trace,
/// where whitespace between events is allowed), a write that stops short of the boundary because
/// the next line would cross it is filled up to the boundary with a line of spaces, so that no
/// line ever crosses one; without, a line that crosses one can still be cut, in the microseconds
/// it takes to copy it.
fn write_whole_lines(fd: i32, text: &[u8], pad: bool) -> Result<(), sys::Errno> {
    const PAGE: usize = sys::PAGE;
    let mut rest = text;
    let mut buf = Vec::new();
    // Pages matter in a regular file only (a pipe or a terminal has no size to go by).
    let regular = sys::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    if !regular {
        return sys::write_all(fd, text);
    }
    while !rest.is_empty() {
        let size = sys::fstat(fd).map_or(0, |st| st.st_size.max(0) as usize);
        let room = PAGE - size % PAGE;
        if rest.len() <= room {
            return sys::write_all(fd, rest);
        }
        let cut = match rest[..room].iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            // (A line longer than a page goes as it is: it crosses a boundary anyway.)
            None if pad && room < PAGE => 0,
            // No whole line fits before the boundary: the first line alone.
            None => rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1),
        };
        if pad && cut < room && !(cut == 0 && room == PAGE) {
            buf.clear();
            buf.extend_from_slice(&rest[..cut]);
            buf.resize(room - 1, b' ');
            buf.push(b'\n');
            sys::write_all(fd, &buf)?;
        } else {
            sys::write_all(fd, &rest[..cut])?;
        }
        rest = &rest[cut..];
    }
    Ok(())
}

/// Fork: the report file's lock is held across it (see runtime::fork).
pub fn lock_for_fork() {
    OUT.lock_raw();
}

pub fn unlock_after_fork() {
    // SAFETY: taken by lock_for_fork on this thread (in the child: the forking thread, which is
    // this one).
    unsafe { OUT.unlock_raw() };
}

/// Append `text` to the report. With a Chrome trace (`UPROBES_TRACE_FORMAT=chrome`), the output
/// holds the trace alone, and the rest of the report goes to stderr.
pub fn emit(text: &str) {
    let config = config::get();
    if config.trace && config.trace_format == TraceFormat::Chrome {
        if !config.attached {
            let _ = sys::write_all(stderr_fd(), text.as_bytes());
        }
        return;
    }
    write_out(text, b"");
}

/// Write to `UPROBES_OUTPUT` (opened with `head` first when it is new), else to stderr.
fn write_out(text: &str, head: &[u8]) {
    let config = config::get();
    // Loaded into a running process by `uprobe attach`: its stderr is not ours to write to; what
    // the user sees comes through the control socket (`uprobe trace`, `uprobe ctl`).
    if config.attached && config.output.is_none() {
        return;
    }
    let Some(template) = &config.output else {
        let fd = stderr_fd();
        if !head.is_empty() && !STDERR_HEAD.swap(true, Ordering::Relaxed) {
            let _ = sys::write_all(fd, head);
        }
        let _ = sys::write_all(fd, text.as_bytes());
        return;
    };
    // A Chrome trace (the only report with a head) may hold whitespace between events.
    if let Err(e) = write_report_file(template, head, text.as_bytes(), !head.is_empty()) {
        let path = template.replace("%p", &sys::getpid().to_string());
        if !OUTPUT_FAILED.swap(true, Ordering::Relaxed) {
            let msg = format!(
                "libuprobe: cannot write the report to UPROBES_OUTPUT={path}: {e}; writing it to \
                 stderr instead\n"
            );
            let _ = sys::write_all(stderr_fd(), msg.as_bytes());
        }
        let _ = sys::write_all(stderr_fd(), text.as_bytes());
    }
}

/// The Chrome trace's head was written to stderr (no `UPROBES_OUTPUT`).
static STDERR_HEAD: AtomicBool = AtomicBool::new(false);

/// A problem, on the report's channel: `what` is the spec (or the variable, or the part of the
/// runtime) it is about.
pub fn problem(what: &str, message: &str) {
    let what = spec::shorten(what);
    let line = match config::get().format {
        Format::Text => format!("libuprobe: {what}: {message}\n"),
        Format::Json => {
            format!("{}\n", serde_json::json!({"type": "error", "spec": what, "message": message}))
        }
    };
    emit(&line);
}

/// A probe that could not be set up.
pub fn probe_error(spec_text: &str, e: &ProbeError) {
    let what = spec::shorten(spec_text);
    let line = match config::get().format {
        Format::Text => format!("libuprobe: {what}: {e}\n"),
        Format::Json => format!("{}\n", json::error_line(&what, e)),
    };
    emit(&line);
}

/// Problems found by a registration or a rescan.
pub fn problems(list: &[Problem]) {
    for p in list {
        probe_error(&p.spec, &p.error);
    }
}

/// Events go to the report (a Chrome trace: to `UPROBES_OUTPUT`, an array opened with `[`).
pub fn emit_events(text: &str) {
    let chrome = config::get().trace_format == TraceFormat::Chrome;
    write_out(text, if chrome { b"[\n" } else { b"" });
}

/// The program, as a summary names it: its `comm` and its argv[0].
pub fn program() -> (String, String) {
    let comm = fs::read_string("/proc/self/comm").unwrap_or_default().trim_end().to_string();
    let argv0 = fs::read("/proc/self/cmdline")
        .ok()
        .map(|b| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        })
        .unwrap_or_default();
    (comm, argv0)
}

/// Folded stacks by probe id, and the stacks that found no room.
pub type Stacks = (std::collections::BTreeMap<u32, crate::consumers::stacks::Folded>, u64);

/// `UPROBES_FOLDED`: every stack of every probe, appended as folded lines (what `uprobe run
/// --flamegraph` turns into a picture).
fn write_folded(template: &str, pid: i32, stacks: &Stacks) {
    let mut text = String::new();
    for folded in stacks.0.values() {
        for (stack, n) in folded {
            text += &format!("{stack} {n}\n");
        }
    }
    let path = template.replace("%p", &pid.to_string());
    let r = open_report(&path).and_then(|fd| {
        let fd = fs::Fd(fd);
        sys::write_all(fd.0, text.as_bytes()).map_err(|e| e.to_string())
    });
    if let Err(e) = r {
        problem("UPROBES_FOLDED", &format!("cannot write {path}: {e}"));
    }
}

/// Write the summary of this process (at exit, and before an exec replaces the image), when it
/// has probes: from `UPROBES`, or added through the socket and not all removed.
pub fn write_summary() {
    let _rt = InRuntime::enter();
    events::flush();
    let Some(probes) = registry::with_registry(|r| r.snapshot()) else { return };
    let config = config::get();
    if probes.is_empty() && spec::split_specs(&config.specs).is_empty() {
        return;
    }
    let pid = sys::getpid();
    let program = program();
    let trace = events::totals();
    let stacks = crate::consumers::stacks::collect();
    let text = match config.format {
        Format::Text => text::summary(pid, &program, &probes, trace, config.summary_all, &stacks),
        Format::Json => json::summary(pid, &program, &probes, trace, &stacks),
    };
    emit(&text);
    if let Some(template) = &config.folded {
        write_folded(template, pid, &stacks);
    }
}
