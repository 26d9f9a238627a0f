//! The runtime's configuration, read once (without libc's `getenv`, which may be probed): every
//! `UPROBES*` variable is read here and nowhere else.
//!
//! Two sources, in this order: the environment, then the administrator's file
//! [`ADMIN_FILE`] (`NAME=VALUE` lines), which only counts if root owns it and nobody else can write
//! it. A secure-execution process (`AT_SECURE`: setuid, setgid, or gaining file capabilities)
//! reads the administrator's file alone, as glibc ignores `LD_*` there: whoever started it
//! controls its environment. Without that file such a process stays idle (no probe, no thread, no
//! socket, no report, every interposed function passing straight through).

use std::sync::OnceLock;

use crate::sigsafe::sys;

/// How reports are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// How events are written (`UPROBES_TRACE_FORMAT`; by default as `UPROBES_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFormat {
    Text,
    Json,
    /// Chrome's Trace Event Format (JSON array), which Perfetto and chrome://tracing open.
    Chrome,
}

/// Which way probes are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMode {
    /// A jump where it is safe, a trap elsewhere (the default).
    Jump,
    /// Traps only (`UPROBES_PATH=trap`).
    Trap,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// `UPROBES`: the specs to probe from startup.
    pub specs: String,
    /// `UPROBES_OUTPUT`, with `%p` unexpanded; None is stderr.
    pub output: Option<String>,
    pub format: Format,
    /// `UPROBES_TRACE_FORMAT`.
    pub trace_format: TraceFormat,
    /// `UPROBES_TRACE`: an event per hit.
    pub trace: bool,
    /// `UPROBES_FOLLOW`: programs started by exec are instrumented too.
    pub follow: bool,
    /// `UPROBES_SOCKET`: the control socket's path (None: the default; Some("none"): off).
    pub socket: Option<String>,
    /// `UPROBES_PATH`.
    pub path: PathMode,
    /// `UPROBES_LATENCY`: return probes record durations.
    pub latency: bool,
    /// `UPROBES_SUMMARY=all`: every probe in the text summary.
    pub summary_all: bool,
    /// `UPROBES_STACKS`: every probe counts the user stacks of its hits (as `%stack`).
    pub stacks: bool,
    /// `UPROBES_FOLDED`: where to append the stacks in folded form at exit (`%p`: the pid).
    pub folded: Option<String>,
    /// Loaded into a running process (`uprobe attach`), not preloaded: `LD_PRELOAD` does not name
    /// libuprobe and the constructor ran after libc had started.
    pub attached: bool,
    /// `UPROBES_CACHE`: keep what is learnt of files in the cache.
    pub cache: bool,
    /// `XDG_RUNTIME_DIR`, where the socket and cache directories go first (None in a
    /// secure-execution process).
    pub runtime_dir: Option<String>,
    /// A secure-execution process (`AT_SECURE`).
    pub secure: bool,
    /// Nothing to do, ever: a secure-execution process without the administrator's file.
    pub idle: bool,
    /// `UPROBES_PERFMAP`: name libuprobe's code in `/tmp/perf-PID.map`.
    pub perf_map: bool,
}

/// The administrator's configuration: `NAME=VALUE` lines of `UPROBES*` variables, `#` comments.
pub const ADMIN_FILE: &str = "/etc/libuprobe.conf";

/// The largest administrator's file read.
const ADMIN_FILE_MAX: usize = 64 * 1024;

/// A problem with a variable, said once on the report's channel.
pub struct ConfigProblem {
    pub variable: &'static str,
    pub message: String,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

extern "C" {
    static environ: *const *const core::ffi::c_char;
}

/// The environment the process started with, as the loader passed it to the constructor
/// (libuprobe initializes first, before libc has set `environ`).
static INITIAL_ENV: core::sync::atomic::AtomicPtr<*const core::ffi::c_char> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// The environment now: libc's `environ` once set, else the initial one.
fn env_array() -> *const *const core::ffi::c_char {
    // SAFETY: reading libc's `environ` pointer.
    let e = unsafe { environ };
    if e.is_null() {
        INITIAL_ENV.load(core::sync::atomic::Ordering::Acquire)
    } else {
        e
    }
}

/// The raw bytes of environment variable `name`.
pub fn env_bytes(name: &str) -> Option<Vec<u8>> {
    // SAFETY: the environment is a NULL-terminated array of NUL-terminated strings; it is read,
    // not changed, and the program does not change it while the runtime reads it at startup.
    unsafe {
        let mut p = env_array();
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = core::ffi::CStr::from_ptr(*p).to_bytes();
            if let Some(rest) = entry.strip_prefix(name.as_bytes()) {
                if let Some(value) = rest.strip_prefix(b"=") {
                    return Some(value.to_vec());
                }
            }
            p = p.add(1);
        }
    }
    None
}

/// Where the variables come from.
struct Sources {
    /// The environment counts (not in a secure-execution process).
    env: bool,
    /// The administrator's file, when there is one to trust: (name, value) pairs.
    admin: Vec<(String, Vec<u8>)>,
}

impl Sources {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        if self.env {
            if let Some(v) = env_bytes(name) {
                return Some(v);
            }
        }
        self.admin.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
}

/// Is this a secure-execution process (setuid, setgid, file capabilities, an LSM's say)?
pub fn secure_execution() -> bool {
    // SAFETY: getauxval reads the loader's copy of the auxiliary vector, set before any
    // constructor runs; it cannot fail.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// Is `path` a directory only root can change (owned by root, not writable by group or others)?
fn root_only_dir(path: &str) -> bool {
    sys::stat(&super::fs::cpath(path), libc::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFDIR && st.st_uid == 0 && st.st_mode & 0o022 == 0
    })
}

/// The administrator's file, if it can be trusted: a regular file (not a symbolic link) that root
/// owns, that neither group nor others can write, in directories only root can change. A file
/// that is there but fails a check is said, and ignored.
fn read_admin_file(problems: &mut Vec<ConfigProblem>) -> Vec<(String, Vec<u8>)> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = match sys::open(&super::fs::cpath(ADMIN_FILE), flags, 0) {
        Ok(fd) => super::fs::Fd(fd),
        Err(sys::Errno(libc::ENOENT)) | Err(sys::Errno(libc::ENOTDIR)) => return Vec::new(),
        Err(e) => {
            problems.push(ConfigProblem {
                variable: "libuprobe.conf",
                message: format!("cannot read {ADMIN_FILE}: {e}; it is ignored"),
            });
            return Vec::new();
        }
    };
    let refuse = |why: String, problems: &mut Vec<ConfigProblem>| {
        problems.push(ConfigProblem {
            variable: "libuprobe.conf",
            message: format!("{ADMIN_FILE} {why}; it is ignored"),
        });
        Vec::new()
    };
    let Ok(st) = sys::fstat(fd.0) else { return Vec::new() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return refuse("is not a regular file".into(), problems);
    }
    if st.st_uid != 0 {
        return refuse(format!("belongs to uid {}, not root", st.st_uid), problems);
    }
    if st.st_mode & 0o022 != 0 {
        return refuse(
            format!("is writable by others (mode {:04o})", st.st_mode & 0o7777),
            problems,
        );
    }
    if !root_only_dir("/etc") || !root_only_dir("/") {
        return refuse("lies in a directory that others can change".into(), problems);
    }
    if st.st_size as usize > ADMIN_FILE_MAX {
        return refuse(format!("is longer than {ADMIN_FILE_MAX} bytes"), problems);
    }
    let Ok(text) = fd.read_to_end() else { return Vec::new() };
    parse_admin_file(&text, problems)
}

/// `NAME=VALUE` lines (`#` comments, blank lines, a trailing `\r` ignored); only the names
/// [`VARIABLES`] has count.
fn parse_admin_file(text: &[u8], problems: &mut Vec<ConfigProblem>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.trim_ascii_start();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        let Some(eq) = trimmed.iter().position(|&b| b == b'=') else {
            problems.push(ConfigProblem {
                variable: "libuprobe.conf",
                message: format!("{ADMIN_FILE}:{}: not NAME=VALUE; the line is ignored", n + 1),
            });
            continue;
        };
        let name = String::from_utf8_lossy(trimmed[..eq].trim_ascii_end()).into_owned();
        if !VARIABLES.contains(&name.as_str()) {
            problems.push(ConfigProblem {
                variable: "libuprobe.conf",
                message: format!(
                    "{ADMIN_FILE}:{}: `{name}` is not one of libuprobe's variables; the line is \
                     ignored",
                    n + 1
                ),
            });
            continue;
        }
        out.push((name, trimmed[eq + 1..].to_vec()));
    }
    out
}

/// Every variable the runtime reads (the administrator's file may set any of them).
pub const VARIABLES: &[&str] = &[
    "UPROBES",
    "UPROBES_OUTPUT",
    "UPROBES_FORMAT",
    "UPROBES_TRACE",
    "UPROBES_TRACE_FORMAT",
    "UPROBES_STACKS",
    "UPROBES_FOLDED",
    "UPROBES_FOLLOW",
    "UPROBES_SOCKET",
    "UPROBES_LATENCY",
    "UPROBES_PATH",
    "UPROBES_CACHE",
    "UPROBES_SUMMARY",
    "UPROBES_PERFMAP",
];

fn text(src: &Sources, name: &'static str, problems: &mut Vec<ConfigProblem>) -> Option<String> {
    let bytes = src.get(name)?;
    match String::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(ConfigProblem {
                variable: name,
                message: format!(
                    "{name} is not valid UTF-8 (invalid byte at {}); it is ignored",
                    e.utf8_error().valid_up_to()
                ),
            });
            None
        }
    }
}

fn flag(v: Option<&str>) -> Option<bool> {
    match v? {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

fn read() -> (Config, Vec<ConfigProblem>) {
    let mut problems = Vec::new();
    let secure = secure_execution();
    let admin = read_admin_file(&mut problems);
    let idle = secure && admin.is_empty();
    let src = Sources { env: !secure, admin };
    let format = match text(&src, "UPROBES_FORMAT", &mut problems).as_deref() {
        None | Some("") | Some("text") => Format::Text,
        Some("json") => Format::Json,
        Some(other) => {
            problems.push(ConfigProblem {
                variable: "UPROBES_FORMAT",
                message: format!("UPROBES_FORMAT={other} is not `text` or `json`; using text"),
            });
            Format::Text
        }
    };
    let trace_format = match text(&src, "UPROBES_TRACE_FORMAT", &mut problems).as_deref() {
        None | Some("") => match format {
            Format::Text => TraceFormat::Text,
            Format::Json => TraceFormat::Json,
        },
        Some("text") => TraceFormat::Text,
        Some("json") => TraceFormat::Json,
        Some("chrome") => TraceFormat::Chrome,
        Some(other) => {
            problems.push(ConfigProblem {
                variable: "UPROBES_TRACE_FORMAT",
                message: format!(
                    "UPROBES_TRACE_FORMAT={other} is not `text`, `json` or `chrome`; using text"
                ),
            });
            TraceFormat::Text
        }
    };
    let path = match text(&src, "UPROBES_PATH", &mut problems).as_deref() {
        None | Some("") | Some("jump") => PathMode::Jump,
        Some("trap") => PathMode::Trap,
        Some(other) => {
            problems.push(ConfigProblem {
                variable: "UPROBES_PATH",
                message: format!("UPROBES_PATH={other} is not `jump` or `trap`; using jump"),
            });
            PathMode::Jump
        }
    };
    let bool_var = |name: &'static str, default: bool, problems: &mut Vec<ConfigProblem>| {
        let v = text(&src, name, problems);
        match v.as_deref() {
            None | Some("") => default,
            s => flag(s).unwrap_or_else(|| {
                problems.push(ConfigProblem {
                    variable: name,
                    message: format!(
                        "{name}={} is not 1/yes/true/on or 0/no/false/off; using {}",
                        s.unwrap_or_default(),
                        if default { "on" } else { "off" }
                    ),
                });
                default
            }),
        }
    };
    let trace = bool_var("UPROBES_TRACE", false, &mut problems);
    let follow = bool_var("UPROBES_FOLLOW", true, &mut problems);
    let latency = bool_var("UPROBES_LATENCY", true, &mut problems);
    let stacks = bool_var("UPROBES_STACKS", false, &mut problems);
    let summary_all =
        matches!(text(&src, "UPROBES_SUMMARY", &mut problems).as_deref(), Some("all"));
    let cache = bool_var("UPROBES_CACHE", true, &mut problems);
    let perf_map = bool_var("UPROBES_PERFMAP", false, &mut problems);
    let preloaded = env_bytes("LD_PRELOAD").is_some_and(|v| {
        v.split(|&b| b == b':' || b == b' ').any(|e| e.ends_with(b"libuprobe.so"))
    });
    // Preloaded some other way (/etc/ld.so.preload): the constructor runs before libc's, which
    // has not set `environ` yet; `dlopen` (attach) runs it in a started process.
    // SAFETY: reading libc's `environ` pointer.
    let started_late = !unsafe { environ }.is_null();
    let runtime_dir = if secure {
        None
    } else {
        env_bytes("XDG_RUNTIME_DIR")
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|d| !d.is_empty())
    };
    let config = Config {
        specs: text(&src, "UPROBES", &mut problems).unwrap_or_default(),
        output: text(&src, "UPROBES_OUTPUT", &mut problems).filter(|p| !p.is_empty()),
        format,
        trace_format,
        trace,
        follow,
        socket: text(&src, "UPROBES_SOCKET", &mut problems).filter(|s| !s.is_empty()),
        path,
        latency,
        summary_all,
        stacks,
        folded: text(&src, "UPROBES_FOLDED", &mut problems).filter(|p| !p.is_empty()),
        attached: !preloaded && started_late,
        cache,
        runtime_dir,
        secure,
        idle,
        perf_map,
    };
    (config, problems)
}

/// Remove, in place, the `UPROBES*` variables from the environment array `envp`, and libuprobe
/// from `LD_PRELOAD` (`UPROBES_FOLLOW=0`: programs started by exec are not instrumented). In place,
/// because libc's `environ` will be this very array, and libc's `setenv` cannot be used before
/// libc has initialized.
///
/// # Safety
/// `envp` is the process's environment array (writable, NULL-terminated, NUL-terminated strings),
/// and no other thread reads it.
pub unsafe fn strip_env(envp: *mut *mut core::ffi::c_char) {
    if envp.is_null() {
        return;
    }
    // SAFETY: the caller's contract; entries are moved down within the array, and LD_PRELOAD's
    // value is rewritten within its own bytes (it only gets shorter).
    unsafe {
        let (mut read, mut write) = (envp, envp);
        while !(*read).is_null() {
            let entry = core::ffi::CStr::from_ptr(*read).to_bytes();
            let keep = !entry.starts_with(b"UPROBES");
            if let Some(value) = entry.strip_prefix(b"LD_PRELOAD=") {
                let kept: Vec<&[u8]> = value
                    .split(|&b| b == b':' || b == b' ')
                    .filter(|e| {
                        !e.is_empty() && !e.ends_with(b"/libuprobe.so") && *e != b"libuprobe.so"
                    })
                    .collect();
                let mut new = b"LD_PRELOAD=".to_vec();
                new.extend_from_slice(&kept.join(&b':'));
                new.push(0);
                core::ptr::copy_nonoverlapping(new.as_ptr(), *read as *mut u8, new.len());
            }
            if keep {
                *write = *read;
                write = write.add(1);
            }
            read = read.add(1);
        }
        *write = core::ptr::null_mut();
    }
}

/// Read the environment (once, in the constructor, from the array the loader passed it). Returns
/// the problems found the first time.
pub fn init(envp: *const *const core::ffi::c_char) -> Vec<ConfigProblem> {
    INITIAL_ENV.store(envp as *mut _, core::sync::atomic::Ordering::Release);
    let mut problems = Vec::new();
    CONFIG.get_or_init(|| {
        let (c, p) = read();
        problems = p;
        c
    });
    problems
}

/// The configuration (defaults if read before `init`, as by a destructor in a process where the
/// constructor never ran).
pub fn get() -> &'static Config {
    CONFIG.get_or_init(|| read().0)
}
