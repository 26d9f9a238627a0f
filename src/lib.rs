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

mod objects;
mod probes;
mod report;
mod signals;
mod spec;
mod sys;
mod trap;
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
    (Config { specs, output: Output { path, format } }, problems)
}

extern "C" fn uprobe_init() {
    let _rt = InRuntime::enter();
    let (config, problems) = read_config();
    let config = CONFIG.get_or_init(|| config);
    for p in problems {
        config.output.problem("UPROBES_FORMAT", &p);
    }
    let specs = spec::split_specs(&config.specs);
    if specs.is_empty() {
        return;
    }
    if config.output.path.is_none() {
        report::keep_stderr();
    }
    signals::resolve_real_functions();
    match trap::install_handler() {
        Ok(previous) => signals::took_sigtrap(previous),
        Err(e) => {
            config.output.problem(
                &config.specs,
                &format!("cannot install the SIGTRAP handler: {e}; no probes"),
            );
            return;
        }
    }
    for text in specs {
        let (_, errors) = probes::with_registry(|r| r.register(text));
        for e in errors {
            config.output.problem(&e.spec, &e.message);
        }
    }
}

extern "C" fn uprobe_fini() {
    let _rt = InRuntime::enter();
    let Some(config) = CONFIG.get() else { return };
    if spec::split_specs(&config.specs).is_empty() {
        return;
    }
    let probes = probes::with_registry(|r| r.snapshot());
    config.output.summary(&probes);
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = uprobe_init;

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = uprobe_fini;
