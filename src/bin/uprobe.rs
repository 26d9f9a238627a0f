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
    /// Do not instrument programs that PROGRAM starts with exec (sets UPROBES_FOLLOW=0).
    #[arg(long)]
    no_follow: bool,
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
            std::fs::File::create(&path).map_err(|e| format!("cannot create {path}: {e}"))?;
        }
        let absolute = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
        cmd.env("UPROBES_OUTPUT", absolute);
    }
    if args.json {
        cmd.env("UPROBES_FORMAT", "json");
    }
    if args.no_follow {
        cmd.env("UPROBES_FOLLOW", "0");
    }
    let err = cmd.exec();
    Err(format!("cannot run {}: {err}", args.program[0].to_string_lossy()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args).map(|never| match never {}),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("uprobe: {message}");
            ExitCode::from(127)
        }
    }
}
