//! libuprobe: userspace uprobes, preloaded into an unmodified program.
//!
//! This file is the top of the house: the constructor and the destructor, which put the parts
//! together. The path of one probe (docs/DESIGN.md), bottom of the house first:
//!
//! | module | owns |
//! | --- | --- |
//! | [`sigsafe`] | the async-signal-safe core: raw system calls, per-thread state, the published table, the signal handlers, the return trampoline, event recording |
//! | [`runtime`] | what every part shares: process ownership, the in-runtime mark, runtime threads, the locks held across fork, the configuration, libc-free allocation and I/O |
//! | [`spec`] | the spec grammar |
//! | [`error`] | why a probe could not be set up, typed |
//! | [`objects`] | mapped objects and their ELF files |
//! | [`patch`] | the only code that writes the program's text (and libuprobe's code areas) |
//! | [`xol`] | decoding, out-of-line slots, relocation, the jump path's bodies and stubs |
//! | [`resolve`] | spec + mapped objects -> sites, and what is refused |
//! | [`registry`] | the probe tree: sites, installs, counters, the published table |
//! | [`consumers`] | the event stream's drain and formatting |
//! | [`report`] | the summary and problem lines, text and JSON |
//! | [`control`] | the control socket |
//! | [`hooks`] | interposed functions: objects, exec, spawn, signals, namespaces, unwinders |

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod consumers;
pub mod control;
pub mod error;
pub mod hooks;
pub mod objects;
pub mod patch;
pub mod registry;
pub mod report;
pub mod resolve;
pub mod runtime;
pub mod sigsafe;
pub mod spec;
pub mod xol;

use core::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use runtime::fork::ForkLock;
use runtime::{config, owner, InRuntime};
use sigsafe::{chain, trap};

/// What the runtime needs before the first probe: libuprobe's handlers for SIGTRAP and the
/// synchronous faults (the program's dispositions become virtual), and the link-map hook.
fn setup() -> Result<(), String> {
    // The clock of durations (the CPU's counter where the kernel keeps time with it).
    let source = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
    sigsafe::clock::init(&runtime::fs::read_string(source).unwrap_or_default());
    chain::take(libc::SIGTRAP, trap::sigtrap_handler(), trap::HANDLER_FLAGS)
        .map_err(|e| format!("cannot install the SIGTRAP handler: {e}; no probes"))?;
    let mut faults = 0;
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
        match chain::take(sig, trap::fault_handler(), trap::HANDLER_FLAGS) {
            Ok(()) => faults += 1,
            Err(e) => report::problem("signals", &format!("cannot handle signal {sig}: {e}")),
        }
    }
    if faults == 4 {
        sigsafe::sys::FAULT_RECOVERY.store(true, std::sync::atomic::Ordering::Release);
    }
    let maps = objects::read_maps().map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    if let Some(own) = objects::maps::find(&maps, trap::restorer() as u64) {
        trap::OWN_TEXT[0].store(own.start, Ordering::Relaxed);
        trap::OWN_TEXT[1].store(own.end, Ordering::Relaxed);
    }
    // The mask fixes, now or with the first site that needs a trap (see Registry::register_many:
    // on the jump path in a single-threaded process, sites get their final bytes at once; the
    // link-map hook, a trap, runs in the loader, never with every signal blocked).
    registry::with_registry(|r| r.ensure_mask_fix_unless_lazy(&maps));
    if let Err(e) = hooks::dl::install_link_map_hook() {
        report::problem(
            "link-map hook",
            &format!("{e}: objects loaded by libc itself will not get their probes"),
        );
    }
    Ok(())
}

fn events_in_child() {
    // The parent's stacks are the parent's: the child counts its own.
    consumers::stacks::reset();
    if let Err(e) = consumers::events::start_in_child() {
        report::problem("UPROBES_TRACE", &e.to_string());
    }
}

/// The locks held across fork, in the order they are taken (see runtime::fork).
fn fork_locks() -> Vec<ForkLock> {
    vec![
        ForkLock {
            name: "control socket",
            lock: control::lock_for_fork,
            unlock_in_parent: control::unlock_in_parent,
            unlock_in_child: control::unlock_in_child,
        },
        ForkLock {
            name: "event drain",
            lock: consumers::events::lock_for_fork,
            unlock_in_parent: consumers::events::unlock_in_parent,
            unlock_in_child: consumers::events::unlock_in_child,
        },
        ForkLock {
            name: "registry",
            lock: registry::lock_for_fork,
            unlock_in_parent: registry::unlock_in_parent,
            unlock_in_child: registry::unlock_in_child,
        },
        ForkLock {
            name: "report file",
            lock: report::lock_for_fork,
            unlock_in_parent: report::unlock_after_fork,
            unlock_in_child: report::unlock_after_fork,
        },
    ]
}

/// Set once the runtime is initialized (the constructor runs once, whoever calls it).
static STARTED: AtomicBool = AtomicBool::new(false);

extern "C" {
    fn __cxa_atexit(f: extern "C" fn(*mut c_void), arg: *mut c_void, dso: *const u8) -> c_int;
}

/// The constructor. libuprobe.so is linked with `-z initfirst`: the loader runs it before any
/// other object's constructor (libc's included), so that the calls those constructors make are
/// counted; the environment comes from the loader's arguments, since libc has not set `environ`.
extern "C" fn uprobe_init(_argc: c_int, _argv: *const *const c_char, envp: *mut *mut c_char) {
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    // glibc's canary, which tells its threads from a program's raw-clone ones (before the first
    // TLS access of libuprobe's: see sigsafe::thread::foreign).
    sigsafe::thread::init_foreign_check();
    let _rt = InRuntime::enter();
    let started = sigsafe::sys::monotonic_ns();
    let problems = config::init(envp as *const *const c_char);
    let config = config::get();
    if config.idle {
        // A secure-execution process without the administrator's file: nothing of libuprobe
        // runs, and every interposed function passes straight through (see runtime::config).
        runtime::IDLE.store(true, Ordering::Release);
        hooks::table::resolve_all();
        return;
    }
    owner::take();
    if config.attached {
        // Loaded by `uprobe attach`: nothing goes to the program's stderr (see report::emit).
    } else if config.output.is_none() {
        report::keep_stderr();
    } else {
        report::reserve_descriptors();
    }
    for p in problems {
        report::problem(p.variable, &p.message);
    }
    if !config.follow {
        // SAFETY: the loader's environment array, which libc will adopt as `environ`; no other
        // thread runs yet.
        unsafe { config::strip_env(envp) };
    }
    // The summary at exit: an exit handler registered this early runs after every other one,
    // and after every ELF destructor (the loader's own exit handler, which runs them, is
    // registered later, when the program starts). Not tied to libuprobe's DSO (its destructors
    // run among the others): libuprobe is never unloaded (linked with -z nodelete).
    // SAFETY: a valid handler, in code that stays mapped.
    unsafe { __cxa_atexit(at_exit, core::ptr::null_mut(), core::ptr::null()) };
    hooks::table::resolve_all();
    objects::find_vdso_clock();
    runtime::set_setup(setup);
    runtime::on_wake(control::wake);
    runtime::fork::install(fork_locks(), vec![control::start_in_child, events_in_child]);
    let specs = spec::split_specs(&config.specs);
    if !specs.is_empty() {
        if let Err(e) = runtime::ensure_setup() {
            report::problem(&config.specs, &e);
            return;
        }
    }
    // On the jump path the probes are written before the runtime's threads start: with one
    // thread, every site gets its final bytes at once (no int3 first, no cross-core
    // serialization); starting the threads then runs into the program's probes as libuprobe's own
    // work, not counted, and at the cost of a jump. With traps only, the threads start first, so
    // that starting them never takes a trap.
    let threads_first = config.path == config::PathMode::Trap;
    xol::cfi::defer();
    xol::cfi::find_lock_functions();
    if threads_first {
        if let Err(e) = control::start(false) {
            report::problem("control socket", &e);
        }
    }
    let mut tracing = false;
    if !specs.is_empty() {
        if config.trace {
            match consumers::events::enable(report::emit_events, config.trace_format) {
                Ok(()) => tracing = true,
                Err(e) => report::problem("UPROBES_TRACE", &e),
            }
        }
        if tracing && threads_first {
            tracing = false;
            if let Err(e) = consumers::events::start_drain() {
                report::problem("UPROBES_TRACE", &e);
            }
        }
        let problems = registry::with_registry(|r| r.register_many(&specs).1).unwrap_or_default();
        report::problems(&problems);
    }
    if tracing {
        if let Err(e) = consumers::events::start_drain() {
            report::problem("UPROBES_TRACE", &e);
        }
    }
    if !threads_first {
        if let Err(e) = control::start(false) {
            report::problem("control socket", &e);
        }
    }
    let setup = sigsafe::sys::monotonic_ns().saturating_sub(started);
    report::SETUP_NS.store(setup, Ordering::Relaxed);
    // The unwind information of the code just written: a few pieces (a few probes: tens of
    // microseconds) now, so that no sample or debugger finds them undescribed; many
    // (`libc.so.6:*`: 4,400 pieces, milliseconds) by the control socket's thread, while the
    // program runs; without that thread, now.
    let many = registry::cfi_pending() > xol::cfi::DESCRIBED_AT_ONCE;
    if many && runtime::threads::running("uprobe-ctl") {
        control::wake();
    } else {
        registry::emit_deferred_cfi(true);
        if let Some(why) = xol::cfi::take_problem() {
            report::problem("UPROBES_PERFMAP", &why);
        }
    }
}

/// At exit, after every other exit handler and destructor: the summary.
extern "C" fn at_exit(_: *mut c_void) {
    xol::cfi::abandon();
    if STARTED.load(Ordering::SeqCst) {
        hooks::exec::finish();
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn(c_int, *const *const c_char, *mut *mut c_char) = uprobe_init;
