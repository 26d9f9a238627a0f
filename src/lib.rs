//! libuprobe: userspace uprobes, preloaded into an unmodified program.
//!
//! This file is the runtime's entry: the constructor reads the environment, installs the SIGTRAP
//! handler and registers the probes of `UPROBES`; the destructor writes the summary. See DESIGN.md
//! for the path of one probe through the other modules:
//!
//! | module | owns |
//! | --- | --- |
//! | `spec` | the spec grammar |
//! | `objects` | mapped objects and their ELF function symbols |
//! | `probes` | the probe tree, breakpoint install/removal |
//! | `trap` | the SIGTRAP handler and emulation (the async-signal-safe set) |
//! | `xol` | decoding, XOL slots, relocation |
//! | `signals` | the program's own view of SIGTRAP |
//! | `report` | summary and problems |
//! | `sys` | every raw system call |

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// The next definition of `$name` after ours (libc's), cached in `$cache`. Every interposer's
/// real function is looked up once at startup, so that no interposer calls `dlsym` later (it is not
/// async-signal-safe, and a vfork child must not call it).
macro_rules! real_fn {
    ($cache:ident, $name:literal, $ty:ty) => {{
        let mut p = $cache.load(core::sync::atomic::Ordering::Acquire);
        if p == 0 {
            // SAFETY: dlsym with a NUL-terminated name.
            p = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!($name, "\0").as_ptr().cast()) }
                as usize;
            $cache.store(p, core::sync::atomic::Ordering::Release);
        }
        if p == 0 {
            None
        } else {
            // SAFETY: the symbol has this C signature in libc.
            Some(unsafe { core::mem::transmute::<usize, $ty>(p) })
        }
    }};
}

mod control;
mod dl_hook;
mod events;
mod fork_hook;
mod objects;
mod probes;
mod report;
mod signals;
mod socket_path;
mod spec;
mod sys;
mod trap;
mod unwind_hook;
mod xol;

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use report::{Format, Output};

/// Marks the current thread as running libuprobe code: traps taken meanwhile (in malloc, memcpy,
/// ... called by the runtime) resume without running consumers.
pub(crate) struct InRuntime(());

impl InRuntime {
    pub(crate) fn enter() -> InRuntime {
        let d = &sys::thread_state().runtime_depth;
        d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        InRuntime(())
    }

    /// The guard of a section entered earlier and forgotten (across fork's prepare and
    /// parent/child handlers): dropping it leaves the section.
    pub(crate) fn resume() -> InRuntime {
        InRuntime(())
    }
}

impl Drop for InRuntime {
    fn drop(&mut self) {
        let d = &sys::thread_state().runtime_depth;
        d.store(d.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
    }
}

/// The runtime's configuration, read once from the environment.
struct Config {
    specs: String,
    output: Output,
    /// `UPROBES_TRACE=1`: an event per hit.
    trace: bool,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

fn read_config() -> (Config, Vec<String>) {
    let mut problems = Vec::new();
    let format = match std::env::var("UPROBES_FORMAT").as_deref() {
        Err(_) | Ok("") | Ok("text") => Format::Text,
        Ok("json") => Format::Json,
        Ok(other) => {
            problems.push(format!("UPROBES_FORMAT={other} is not `text` or `json`; using text"));
            Format::Text
        }
    };
    let path = std::env::var("UPROBES_OUTPUT").ok().filter(|p| !p.is_empty());
    let specs = std::env::var("UPROBES").unwrap_or_default();
    let trace =
        matches!(std::env::var("UPROBES_TRACE").as_deref(), Ok("1" | "yes" | "true" | "on"));
    (Config { specs, output: Output { path, format }, trace }, problems)
}

extern "C" fn uprobe_init() {
    let _rt = InRuntime::enter();
    let (config, problems) = read_config();
    let config = CONFIG.get_or_init(|| config);
    for p in problems {
        config.output.problem("UPROBES_FORMAT", &p);
    }
    fork_hook::apply_follow_setting();
    if config.output.path.is_none() {
        report::keep_stderr();
    }
    signals::resolve_real_functions();
    dl_hook::resolve_real_functions();
    fork_hook::resolve_real_functions();
    unwind_hook::resolve_real_functions();
    fork_hook::init();
    let specs = spec::split_specs(&config.specs);
    if !specs.is_empty() {
        if let Err(e) = ensure_runtime() {
            config.output.problem(&config.specs, &e);
            return;
        }
        if config.trace {
            if let Err(e) = events::enable(&config.output) {
                config.output.problem("UPROBES_TRACE", &e);
            }
        }
        for text in specs {
            let errors = probes::with_registry(|r| r.register(text).1).unwrap_or_default();
            for e in errors {
                config.output.problem(&e.spec, &e.message);
            }
        }
    }
    control::start(false, &config.output);
}

/// The parts of the runtime that only probes need, set up once, on the first probe (at startup
/// for `UPROBES`, or at the first `add` on the control socket): the SIGTRAP handler and the
/// link-map hook.
pub(crate) fn ensure_runtime() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let previous = trap::install_handler()
                .map_err(|e| format!("cannot install the SIGTRAP handler: {e}; no probes"))?;
            signals::took_sigtrap(previous);
            sys::find_vdso_clock(); // timestamps on the trap path without a system call
            if let Err(e) = dl_hook::install_link_map_hook() {
                let message =
                    format!("{e}: objects loaded by libc itself will not get their probes");
                log_problem("link-map hook", &message);
            }
            Ok(())
        })
        .clone()
}

/// Say something went wrong, on the report's channel.
pub(crate) fn log_problem(what: &str, message: &str) {
    if let Some(config) = CONFIG.get() {
        config.output.problem(what, message);
    }
}

/// The report's channel, for the parts of the runtime that start threads after fork.
pub(crate) fn output() -> Option<&'static report::Output> {
    CONFIG.get().map(|c| &c.output)
}

/// Write the summary of this process (at exit, and before an exec replaces the image). Written
/// when there were probes: from `UPROBES`, or added through the socket.
pub(crate) fn write_summary() {
    let _rt = InRuntime::enter();
    let Some(config) = CONFIG.get() else { return };
    events::flush(&config.output);
    if let Some(probes) = probes::with_registry(|r| r.snapshot()) {
        if !probes.is_empty() || !spec::split_specs(&config.specs).is_empty() {
            config.output.summary(&probes, events::totals());
        }
    }
}

extern "C" fn uprobe_fini() {
    if fork_hook::owns_runtime() {
        control::remove_socket();
    }
    write_summary();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = uprobe_init;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = uprobe_fini;
