//! `uprobe run --flamegraph FILE.svg`: the program runs as a child (not in place: someone has to
//! draw when it is gone), every process of it appends its folded stacks to a scratch directory
//! (`UPROBES_FOLDED`), and the stacks of all of them become one SVG flame graph, drawn by inferno
//! (the Rust port of Brendan Gregg's flamegraph.pl). The exit status, or the signal, is the
//! program's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;

/// Folded lines (`frame;frame count`) added up by stack.
pub fn merge(text: &str, into: &mut BTreeMap<String, u64>) {
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else { continue };
        let Ok(n) = n.parse::<u64>() else { continue };
        *into.entry(stack.to_string()).or_default() += n;
    }
}

/// Draw `stacks` as an SVG flame graph into `svg`.
pub fn draw(stacks: &BTreeMap<String, u64>, svg: &Path, title: &str) -> Result<(), String> {
    let lines: Vec<String> = stacks.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "hits".to_string();
    let file = super::files::create(svg)?;
    let out = std::io::BufWriter::new(file);
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)
        .map_err(|e| format!("cannot draw the flame graph into {}: {e}", svg.display()))
}

/// Run `cmd` (already set up with the probes) to its end, then draw.
pub fn run_and_draw(mut cmd: Command, svg: &Path, title: String) -> Result<Infallible, String> {
    // A directory nobody else can enter or guess: the stacks in it become the picture.
    let dir = super::files::private_temp_dir("uprobe-folded-")?;
    cmd.env("UPROBES_STACKS", "1").env("UPROBES_FOLDED", dir.join("%p.folded"));
    // Ctrl-C is the program's: this process waits for it, then draws.
    // SAFETY: ignoring two signals in a single-threaded process; the child gets them back.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cmd.get_program().to_string_lossy()))?;
    let mut stacks = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            merge(&text, &mut stacks);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if stacks.is_empty() {
        eprintln!(
            "uprobe: no stack was recorded (no probe was hit): {} not written",
            svg.display()
        );
    } else {
        draw(&stacks, svg, &title)?;
        let hits: u64 = stacks.values().sum();
        eprintln!(
            "uprobe: flame graph of {} distinct stacks ({hits} hits) written to {}",
            stacks.len(),
            svg.display()
        );
    }
    if let Some(sig) = status.signal() {
        // SAFETY: restoring the default action, then dying of the program's signal.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
    std::process::exit(status.code().unwrap_or(1))
}
