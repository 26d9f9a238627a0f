//! The runtime's configuration, read once from the environment (without libc's `getenv`, which may
//! be probed): every `UPROBES*` variable is read here and nowhere else.

use std::sync::OnceLock;

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
    /// libuprobe.
    pub attached: bool,
}

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

fn text(name: &'static str, problems: &mut Vec<ConfigProblem>) -> Option<String> {
    let bytes = env_bytes(name)?;
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
    let format = match text("UPROBES_FORMAT", &mut problems).as_deref() {
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
    let trace_format = match text("UPROBES_TRACE_FORMAT", &mut problems).as_deref() {
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
    let path = match text("UPROBES_PATH", &mut problems).as_deref() {
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
        let v = text(name, problems);
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
    let summary_all = matches!(text("UPROBES_SUMMARY", &mut problems).as_deref(), Some("all"));
    let preloaded = env_bytes("LD_PRELOAD").is_some_and(|v| {
        v.split(|&b| b == b':' || b == b' ').any(|e| e.ends_with(b"libuprobe.so"))
    });
    let config = Config {
        specs: text("UPROBES", &mut problems).unwrap_or_default(),
        output: text("UPROBES_OUTPUT", &mut problems).filter(|p| !p.is_empty()),
        format,
        trace_format,
        trace,
        follow,
        socket: text("UPROBES_SOCKET", &mut problems).filter(|s| !s.is_empty()),
        path,
        latency,
        summary_all,
        stacks,
        folded: text("UPROBES_FOLDED", &mut problems).filter(|p| !p.is_empty()),
        attached: !preloaded,
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
