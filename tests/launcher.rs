//! `uprobe run`: the launcher passes the program's exit status through and reports.

mod common;
use common::*;

use std::process::Command;

fn uprobe() -> Command {
    lib(); // the launcher finds libuprobe.so beside itself
    Command::new(env!("CARGO_BIN_EXE_uprobe"))
}

#[test]
fn run_reports_json_to_a_file_and_keeps_the_exit_status() {
    let out = scratch("launcher.jsonl");
    let mut cmd = uprobe();
    cmd.args(["run", "-p", "counts:leaf", "-p", "libcounted:lib_add;libcounted:lib_mul", "-o"])
        .arg(&out)
        .arg("--json")
        .arg("--")
        .arg(fixture("counts"))
        .arg("250");
    let (stdout, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert_eq!(stdout, run_plain("counts", &["250"]).stdout);
    let text = std::fs::read_to_string(&out).unwrap();
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let hits: Vec<_> =
        summary["probes"].as_array().unwrap().iter().map(|p| p["hits"].clone()).collect();
    assert_eq!(hits, [250, 250, 500]);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn run_passes_a_terminating_signal_through() {
    let mut cmd = uprobe();
    cmd.args(["run", "-p", "own_trap:probed", "--"]).arg(fixture("own_trap")).arg("die");
    let (_, stderr, status) = run_command(cmd);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTRAP), "{stderr}");
}

#[test]
fn run_prints_the_table_to_stderr_by_default() {
    let mut cmd = uprobe();
    cmd.args(["run", "-p", "counts:leaf", "--"]).arg(fixture("counts"));
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(7));
    let row = stderr.lines().find(|l| l.contains("counts:leaf")).expect(&stderr);
    assert_eq!(row.split_whitespace().take(3).collect::<Vec<_>>(), ["1", "1,000", "active"]);
}

#[test]
fn run_explains_a_missing_library_and_help_documents_run() {
    let mut cmd = uprobe();
    cmd.env("UPROBE_LIB", "/nonexistent/libuprobe.so").args(["run", "--", "/bin/true"]);
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(127));
    assert!(stderr.contains("UPROBE_LIB=/nonexistent/libuprobe.so is not a file"), "{stderr}");

    let mut cmd = uprobe();
    cmd.args(["run", "--help"]);
    let (stdout, _, status) = run_command(cmd);
    assert!(status.success());
    for flag in ["--probe", "--output", "--json", "PROGRAM"] {
        assert!(stdout.contains(flag), "{flag} in:\n{stdout}");
    }
}

/// `--trap-only` turns the jump path off (UPROBES_PATH=trap): same counts, every probe a trap,
/// and why.
#[test]
fn run_trap_only_puts_every_probe_on_the_trap_path() {
    for (flag, path) in [(None, "jump"), (Some("--trap-only"), "trap")] {
        let out = scratch("trap-only.jsonl");
        let mut cmd = uprobe();
        cmd.env_remove("UPROBES_PATH")
            .args(["run", "-p", "jumps:j_long", "--json", "-o"])
            .arg(&out);
        if let Some(f) = flag {
            cmd.arg(f);
        }
        cmd.arg("--").arg(fixture("jumps")).args(["classes", "100"]);
        let (stdout, stderr, status) = run_command(cmd);
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert_eq!(stdout, run_plain("jumps", &["classes", "100"]).stdout);
        let text = std::fs::read_to_string(&out).unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let p = &summary["probes"][0];
        assert_eq!((p["hits"].as_u64(), p["path"].as_str()), (Some(100), Some(path)), "{p}");
        if path == "trap" {
            assert_eq!(p["path_reason"], "UPROBES_PATH=trap");
        }
        std::fs::remove_file(out).unwrap();
    }
}

/// The text summary people read first: highest hits first, with thousands separators; the
/// matches of a glob with no hits are one line (a failed one stays), and `--all` lists them.
#[test]
fn run_sorts_the_summary_and_collapses_quiet_glob_matches() {
    let summary_rows = |all: bool| -> Vec<String> {
        let mut cmd = uprobe();
        cmd.args(["run", "-p", "counts:*"]);
        if all {
            cmd.arg("--all");
        }
        cmd.arg("--").arg(fixture("counts")).arg("1234");
        let (_, stderr, status) = run_command(cmd);
        assert_eq!(status.code(), Some(7), "{stderr}");
        let table = stderr.lines().skip_while(|l| !l.contains("HITS")).skip(1);
        table.take_while(|l| !l.starts_with("libuprobe:")).map(String::from).collect()
    };
    // (hits, state, symbol) of each row.
    let cols = |r: &String| {
        let f: Vec<&str> = r.split_whitespace().collect();
        format!("{} {} {}", f[1], f[2], f[5])
    };
    let rows = summary_rows(false);
    assert_eq!(cols(&rows[0]), "1,234 active leaf", "{rows:#?}");
    assert!(rows[1..10].iter().all(|r| cols(r).starts_with("1 active")), "{rows:#?}");
    assert_eq!(cols(&rows[10]), "0 failed refused_fn", "{rows:#?}");
    assert_eq!(
        rows[11].trim(),
        "... and 2 more matches of counts:* with no hits (UPROBES_SUMMARY=all lists them)"
    );
    assert_eq!(rows.len(), 12, "{rows:#?}");
    let all = summary_rows(true);
    assert_eq!(all.len(), 13, "{all:#?}");
    assert!(all[10..12].iter().all(|r| cols(r).starts_with("0 active")), "{all:#?}");
}
