//! `uprobe`: the launcher. `uprobe run` starts a program with libuprobe preloaded.
//!
//! It never links the runtime (libuprobe.so is a cdylib only): it sets the environment the runtime
//! reads and then replaces itself with the program (`exec`), so the program's pid, exit status and
//! terminating signal are its own, with nothing in between.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use serde_json::Value;

#[path = "../../runtime/places.rs"]
#[allow(dead_code, reason = "the runtime's half of the shared file")]
mod places;

mod attach;
mod client;
mod exporter;
mod files;
mod flame;
mod trace;

#[derive(Parser)]
#[command(
    name = "uprobe",
    version,
    about = "Userspace uprobes: count and trace calls of any function of an unmodified program, without root",
    after_help = "Spec forms: OBJECT:SYMBOL, OBJECT:SYMBOL+OFFSET, OBJECT:0xADDRESS (SYMBOL may be a glob).\n\
                  OBJECT is a soname, file name, path or short name (libc); the main program by its file name.\n\
                  Example: uprobe run -p libc:malloc -p 'app:handle_*' -- ./app --serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM with libuprobe preloaded; print a summary of hits when it exits.
    Run(RunArgs),
    /// Talk to a running process started with libuprobe preloaded: add, remove, list, count probes.
    Ctl(CtlArgs),
    /// List the processes whose control socket this user can reach (same as `uprobe ctl --list`).
    Ps,
    /// Load libuprobe into a running process (ptrace); its control socket appears.
    Attach(AttachArgs),
    /// Remove every probe of a process; it runs on with its original code.
    Detach {
        /// The process.
        pid: i32,
    },
    /// Attach if needed, add probes, print events as they come and a summary at the end; then
    /// remove the probes.
    Trace(TraceArgs),
    /// Serve the metrics of every instrumented process of this user over HTTP, for Prometheus.
    #[command(
        after_help = "Example:\n  uprobe exporter --listen 127.0.0.1:9464   # then scrape http://127.0.0.1:9464/metrics"
    )]
    Exporter {
        /// Address and port to listen on (loopback by default: see README before exposing it).
        #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR:PORT")]
        listen: String,
        /// Only processes with this command name (repeatable).
        #[arg(long, value_name = "NAME")]
        comm: Vec<String>,
        /// Only this process (repeatable).
        #[arg(long, value_name = "PID")]
        pid: Vec<i32>,
        /// Only probes whose symbol or spec matches this glob (repeatable).
        #[arg(long, value_name = "GLOB")]
        probe: Vec<String>,
    },
}

#[derive(clap::Args)]
#[command(after_help = "Example:\n  uprobe attach 4242 && uprobe ctl 4242 add libc.so.6:malloc")]
struct AttachArgs {
    /// The process.
    pid: i32,
    /// Attach even under a seccomp filter (which may refuse or kill the calls loading makes).
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  uprobe trace -p 4242 'libc.so.6:malloc(u64)' --duration 10s\n  uprobe trace -p 4242 'libssl.so.3:SSL_write%return' --json"
)]
struct TraceArgs {
    /// The process (attached first if it has no control socket).
    #[arg(short = 'p', long = "pid")]
    pid: i32,
    /// Probe specs (the UPROBES grammar).
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<String>,
    /// Stop after this long (10s, 500ms, 2m); default: until Ctrl-C or the process exits.
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
    /// Events and summary as JSON Lines.
    #[arg(long)]
    json: bool,
    /// Attach even under a seccomp filter.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  uprobe ctl 4242 add 'libc.so.6:malloc'\n  uprobe ctl 4242 stats --reset\n  uprobe ctl 4242 remove 1\n  uprobe ctl --list"
)]
struct CtlArgs {
    /// List the reachable processes instead.
    #[arg(long, conflicts_with = "pid")]
    list: bool,
    /// Print the raw JSON answers.
    #[arg(long, global = true)]
    json: bool,
    /// The socket to talk to, instead of the one for PID.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The process.
    #[arg(required_unless_present_any = ["list", "socket"])]
    pid: Option<i32>,
    #[command(subcommand)]
    op: Option<CtlOp>,
}

#[derive(Subcommand)]
enum CtlOp {
    /// Register probes (UPROBES grammar; globs allowed).
    Add {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
    },
    /// Unregister a probe by ID, or every probe added as SPEC.
    Remove {
        #[arg(value_name = "ID|SPEC")]
        target: String,
    },
    /// Every probe: id, spec, object, symbol, offset, state, hits.
    List,
    /// Hits per probe; with --reset, then back to zero.
    Stats {
        #[arg(long)]
        reset: bool,
    },
    /// The counts in the Prometheus text format.
    Metrics,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A probe spec (repeatable; each may also hold several specs separated by `;`, `,` or spaces).
    #[arg(short = 'p', long = "probe", value_name = "SPEC")]
    probes: Vec<String>,
    /// Write the report to FILE (truncated first) instead of stderr. `%p` becomes the pid.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Report as JSON Lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Write an event per hit, with its arguments, to the report (sets UPROBES_TRACE=1).
    #[arg(long)]
    trace: bool,
    /// Do not instrument programs that PROGRAM starts with exec (sets UPROBES_FOLLOW=0).
    #[arg(long)]
    no_follow: bool,
    /// The events' format: text, json, or chrome (Trace Event Format, for ui.perfetto.dev and
    /// chrome://tracing; the events then go to --output alone, the summary to stderr). Implies
    /// --trace; sets UPROBES_TRACE_FORMAT.
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json", "chrome"])]
    trace_format: Option<String>,
    /// Every probe an int3 trap, no jumps (sets UPROBES_PATH=trap): for comparison, or as an
    /// escape hatch.
    #[arg(long)]
    trap_only: bool,
    /// Count the user stack of every hit of every probe (as each spec had %stack; sets
    /// UPROBES_STACKS=1): folded stacks in the summary.
    #[arg(long)]
    stacks: bool,
    /// Run PROGRAM to its end, then draw the stacks of every hit of every probe, in every process
    /// it started, as one SVG flame graph into FILE (implies --stacks).
    #[arg(long, value_name = "FILE.svg")]
    flamegraph: Option<PathBuf>,
    /// Every probe in the text summary (by default the matches of a glob that have no hits are
    /// one line); sets UPROBES_SUMMARY=all.
    #[arg(long)]
    all: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "PROGRAM [ARGS]...")]
    program: Vec<OsString>,
}

/// libuprobe.so: `UPROBE_LIB`, else the one beside this executable.
fn library() -> Result<PathBuf, String> {
    if let Some(lib) = std::env::var_os("UPROBE_LIB") {
        let lib = PathBuf::from(lib);
        return if lib.is_file() {
            std::fs::canonicalize(&lib).map_err(|e| format!("UPROBE_LIB={}: {e}", lib.display()))
        } else {
            Err(format!("UPROBE_LIB={} is not a file", lib.display()))
        };
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the uprobe executable: {e}"))?;
    let lib = exe.with_file_name("libuprobe.so");
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release`, or set UPROBE_LIB",
            lib.display()
        ))
    }
}

fn run(args: RunArgs) -> Result<std::convert::Infallible, String> {
    let lib = library()?;
    let mut cmd = Command::new(&args.program[0]);
    cmd.args(&args.program[1..]);
    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(old) if !old.is_empty() => {
            let mut v = lib.clone().into_os_string();
            v.push(":");
            v.push(old);
            v
        }
        _ => lib.into_os_string(),
    };
    cmd.env("LD_PRELOAD", preload);
    if !args.probes.is_empty() {
        cmd.env("UPROBES", args.probes.join(";"));
    } else if std::env::var_os("UPROBES").is_none() {
        eprintln!("uprobe: no probes given (-p SPEC); running the program without any");
    }
    if let Some(out) = &args.output {
        // Truncate now: the runtime appends, so that every process of a tree can share one file.
        let path = out.to_string_lossy().replace("%p", "");
        if !out.to_string_lossy().contains("%p") {
            use std::io::Write;
            let mut f = files::create(std::path::Path::new(&path))
                .map_err(|e| format!("cannot create {e}"))?;
            if args.trace_format.as_deref() == Some("chrome") {
                // The trace's head now: a trace without events is an empty array, not a file.
                f.write_all(b"[\n").map_err(|e| format!("cannot write {path}: {e}"))?;
            }
        }
        let absolute = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
        cmd.env("UPROBES_OUTPUT", absolute);
    }
    if args.json {
        cmd.env("UPROBES_FORMAT", "json");
    }
    if args.trace || args.trace_format.is_some() {
        cmd.env("UPROBES_TRACE", "1");
    }
    if let Some(f) = &args.trace_format {
        cmd.env("UPROBES_TRACE_FORMAT", f);
    }
    if args.no_follow {
        cmd.env("UPROBES_FOLLOW", "0");
    }
    if args.trap_only {
        cmd.env("UPROBES_PATH", "trap");
    }
    if args.all {
        cmd.env("UPROBES_SUMMARY", "all");
    }
    if args.stacks {
        cmd.env("UPROBES_STACKS", "1");
    }
    if let Some(svg) = &args.flamegraph {
        let program = args.program[0].to_string_lossy();
        let title = format!("uprobe run -p {} -- {program}", args.probes.join(" -p "));
        return flame::run_and_draw(cmd, svg, title);
    }
    let err = cmd.exec();
    Err(format!("cannot run {}: {err}", args.program[0].to_string_lossy()))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The probes of an answer as a table.
fn print_probes(probes: &[Value]) {
    let spec_w = probes.iter().map(|p| str_of(&p["spec"]).len()).max().unwrap_or(4).max(4);
    let sym_w = probes.iter().map(|p| str_of(&p["symbol"]).len()).max().unwrap_or(6).max(6);
    println!(
        "{:>5}  {:>12}  {:<7}  {:<4}  {:<spec_w$}  {:<sym_w$}  WHERE",
        "ID", "HITS", "STATE", "PATH", "SPEC", "SYMBOL"
    );
    for p in probes {
        let place = match (p["error"].as_str(), p["offset"].as_u64()) {
            (Some(e), _) => e.to_string(),
            (None, Some(off)) => format!("{}+{off:#x}", str_of(&p["object"])),
            (None, None) => str_of(&p["object"]),
        };
        println!(
            "{:>5}  {:>12}  {:<7}  {:<4}  {:<spec_w$}  {:<sym_w$}  {place}",
            str_of(&p["id"]),
            str_of(&p["hits"]),
            str_of(&p["state"]),
            str_of(&p["path"]),
            str_of(&p["spec"]),
            str_of(&p["symbol"])
        );
        if let Some(why) = p["path_reason"].as_str() {
            println!("{:>5}  trap: {why}", "");
        }
    }
}

fn ctl(args: CtlArgs) -> Result<ExitCode, String> {
    if args.list {
        if args.op.is_some() {
            return Err("--list takes no command".into());
        }
        return ps();
    }
    let socket = match (&args.socket, args.pid) {
        (Some(s), _) => client::Target::explicit(s),
        (None, Some(pid)) => client::find(pid)?,
        (None, None) => return Err("a PID or --socket is needed".into()),
    };
    if let Some(CtlOp::Metrics) = &args.op {
        print!("{}", exporter::fetch(&socket)?);
        return Ok(ExitCode::SUCCESS);
    }
    let line = match &args.op {
        Some(CtlOp::Metrics) => return Err("metrics is answered above".into()),
        Some(CtlOp::Add { specs }) => format!("add {}", specs.join(";")),
        Some(CtlOp::Remove { target }) => format!("remove {target}"),
        Some(CtlOp::List) | None => "list".into(),
        Some(CtlOp::Stats { reset: false }) => "stats".into(),
        Some(CtlOp::Stats { reset: true }) => "stats reset".into(),
    };
    let answer = client::request(&socket, &line)?;
    if args.json {
        println!("{answer}");
    } else if answer["ok"] != true {
        eprintln!("uprobe: {}", str_of(&answer["error"]));
    } else {
        let empty = Vec::new();
        let probes = answer["probes"].as_array().unwrap_or(&empty);
        match &args.op {
            Some(CtlOp::Add { .. }) => {
                println!("added {} probe(s)", probes.len());
                print_probes(probes);
                for e in answer["errors"].as_array().unwrap_or(&empty) {
                    eprintln!("uprobe: {}", str_of(e));
                }
            }
            Some(CtlOp::Remove { .. }) => {
                let ids: Vec<String> =
                    answer["removed"].as_array().unwrap_or(&empty).iter().map(str_of).collect();
                println!("removed probe(s) {}", ids.join(", "));
            }
            Some(CtlOp::Stats { reset }) => {
                println!("{:>5}  {:>12}  {:<7}  {:<4}  SPEC", "ID", "HITS", "STATE", "PATH");
                for p in probes {
                    println!(
                        "{:>5}  {:>12}  {:<7}  {:<4}  {}",
                        str_of(&p["id"]),
                        str_of(&p["hits"]),
                        str_of(&p["state"]),
                        str_of(&p["path"]),
                        str_of(&p["spec"])
                    );
                }
                println!(
                    "total {} hits; {} sites; {} bytes of XOL slots",
                    answer["hits"], answer["sites"], answer["xol_bytes"]
                );
                if *reset {
                    println!("counts reset to zero");
                }
            }
            Some(CtlOp::List) | Some(CtlOp::Metrics) | None => print_probes(probes),
        }
    }
    Ok(if answer["ok"] == true { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A command line (NUL-separated arguments) on one line: arguments separated by spaces, and
/// control characters (a newline in an argument) escaped, so that each process is one row.
fn printable_command(cmdline: &[u8]) -> String {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).chars().flat_map(char::escape_debug).collect())
        .collect();
    args.join(" ")
}

fn ps() -> Result<ExitCode, String> {
    println!("{:>8}  {:>6}  {:>12}  {:<40}  COMMAND", "PID", "PROBES", "HITS", "SOCKET");
    {
        for (pid, target) in client::reachable() {
            let Ok(answer) = client::request(&target, "stats") else {
                target.remove_if_stale();
                continue;
            };
            let comm = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| printable_command(&c))
                .unwrap_or_default();
            let probes = answer["probes"].as_array().map_or(0, |p| p.len());
            println!(
                "{pid:>8}  {probes:>6}  {:>12}  {:<40}  {comm}",
                str_of(&answer["hits"]),
                target.path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Load libuprobe into `pid` unless it is there; its socket.
fn attach_cmd(pid: i32, force: bool) -> Result<client::Target, String> {
    if let Ok(p) = client::find(pid) {
        if client::request(&p, "help").is_ok() {
            return Ok(p); // preloaded, or attached before
        }
    }
    let lib = library()?;
    match attach::attach(pid, &lib, force)? {
        attach::Attached::Already | attach::Attached::Loaded => {}
    }
    attach::wait_socket(|| client::find(pid).ok(), std::time::Duration::from_secs(10)).ok_or_else(|| {
        // A process that ended meanwhile (a zombie, or gone) took its socket with it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
        if stat.is_empty() || state.starts_with('Z') || state.starts_with('X') {
            return format!("libuprobe was loaded in process {pid}, but the process exited");
        }
        format!(
            "libuprobe is loaded in process {pid}, but its control socket did not appear (UPROBES_SOCKET \
             in its environment may have put it elsewhere, or turned it off)"
        )
    })
}

fn detach(pid: i32) -> Result<ExitCode, String> {
    let socket = client::find(pid)?;
    let answer = client::request(&socket, "remove all")?;
    if answer["ok"] != true {
        eprintln!("uprobe: {}", str_of(&answer["error"]));
        return Ok(ExitCode::from(1));
    }
    let n = answer["removed"].as_array().map_or(0, |a| a.len());
    println!(
        "detached: {n} probe(s) removed from process {pid}; its code is as it was (libuprobe stays \
         loaded and idle: `uprobe attach` again reuses it)"
    );
    Ok(ExitCode::SUCCESS)
}

fn trace_cmd(args: TraceArgs) -> Result<ExitCode, String> {
    let duration = args.duration.as_deref().map(trace::parse_duration).transpose()?;
    let socket = attach_cmd(args.pid, args.force)?;
    let code = trace::trace(trace::TraceArgs {
        socket: &socket,
        specs: &args.specs,
        duration,
        json: args.json,
    })?;
    Ok(ExitCode::from(code))
}

fn main() -> ExitCode {
    // Like every Unix filter: when the reader goes away (`uprobe ctl PID list | head -1`), stop
    // quietly on SIGPIPE instead of failing to print.
    // SAFETY: restoring the default disposition of SIGPIPE, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => match run(args) {
            Ok(never) => match never {},
            Err(message) => {
                eprintln!("uprobe: {message}");
                return ExitCode::from(127);
            }
        },
        Cmd::Ctl(args) => ctl(args),
        Cmd::Ps => ps(),
        Cmd::Attach(args) => attach_cmd(args.pid, args.force).map(|p| {
            println!("attached: process {}, control socket {}", args.pid, p.path.display());
            ExitCode::SUCCESS
        }),
        Cmd::Detach { pid } => detach(pid),
        Cmd::Trace(args) => trace_cmd(args),
        Cmd::Exporter { listen, comm, pid, probe } => {
            let filters = exporter::Filters { comm, pid, probe };
            exporter::serve(&listen, filters, client::reachable).map(|_| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("uprobe: {message}");
            ExitCode::from(2)
        }
    }
}
