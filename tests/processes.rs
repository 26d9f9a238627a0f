//! Probes follow the program into new processes: fork, vfork + exec, posix_spawn, exec chains, and
//! forks that run no atfork handler.

mod common;
use common::*;

use serde_json::Value;
use std::collections::BTreeMap;

/// Run `forks` with the report of every process in its own file; return (stdout, status, every
/// summary by pid, in file order).
fn run_tree(
    args: &[&str],
    specs: &str,
    extra_env: &[(&str, &str)],
) -> (String, Option<i32>, BTreeMap<i64, Vec<Value>>) {
    let dir = scratch("tree");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new(fixture("forks"));
    cmd.args(args)
        .env("LD_PRELOAD", lib())
        .env("UPROBES", specs)
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", dir.join("report-%p.jsonl"));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (stdout, stderr, status) = run_command(cmd);
    let mut summaries: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["type"] == "summary" {
                summaries.entry(v["pid"].as_i64().unwrap()).or_default().push(v);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(stderr.is_empty() || !stderr.contains("FAILED"), "{stderr}");
    (stdout, status.code(), summaries)
}

fn hits(summary: &Value, symbol: &str) -> u64 {
    let p = summary["probes"].as_array().unwrap().iter().find(|p| p["symbol"] == symbol).unwrap();
    p["hits"].as_u64().unwrap()
}

fn state<'a>(summary: &'a Value, symbol: &str) -> &'a str {
    let p = summary["probes"].as_array().unwrap().iter().find(|p| p["symbol"] == symbol).unwrap();
    p["state"].as_str().unwrap()
}

#[test]
fn fork_gives_each_process_its_own_exact_counts() {
    let (stdout, code, summaries) = run_tree(&["fork", "40", "7"], "forks:f", &[]);
    assert_eq!((stdout.as_str(), code), ("forks fork: ok\n", Some(0)));
    let mut counts: Vec<u64> = summaries.values().map(|s| hits(&s[0], "f")).collect();
    counts.sort();
    assert_eq!(counts, [7, 80], "child starts at zero: 7; parent: 40 before + 40 after the fork");
}

#[test]
fn forking_while_threads_hit_probes_and_the_runtime_installs_them() {
    let lib = fixture("libcounted.so").display().to_string();
    let (stdout, code, summaries) =
        run_tree(&["storm", "40", "5", &lib], "forks:f libcounted.so:lib_add", &[]);
    assert_eq!((stdout.as_str(), code), ("forks storm: ok\n", Some(0)));
    assert_eq!(summaries.len(), 41, "the parent and 40 children each wrote a summary");
    let children: Vec<u64> =
        summaries.values().map(|s| hits(&s[0], "f")).filter(|&h| h == 5).collect();
    assert_eq!(children.len(), 40, "every child counted exactly its own 5 calls");
}

#[test]
fn vfork_and_exec_instrument_the_new_program() {
    let counts = fixture("counts").display().to_string();
    let (stdout, code, summaries) = run_tree(&["vfork", &counts, "9"], "forks:f counts:leaf", &[]);
    let expected = format!("{}forks vfork: ok\n", run_plain("counts", &["9"]).stdout);
    assert_eq!((stdout, code), (expected, Some(0)));
    assert_eq!(summaries.len(), 2);
    let (parent, child): (Vec<_>, Vec<_>) =
        summaries.values().map(|s| &s[0]).partition(|s| state(s, "f") == "active");
    assert_eq!(hits(parent[0], "f"), 1, "the vfork child's calls are not the parent's");
    assert_eq!(hits(child[0], "leaf"), 9);
    assert_eq!(state(child[0], "f"), "pending", "forks is not in the counts image");
}

#[test]
fn posix_spawn_children_are_instrumented_and_do_not_disturb_the_parent() {
    let counts = fixture("counts").display().to_string();
    // libc:posix_spawn also puts a probe on code the spawn child runs on the parent's memory.
    let (stdout, code, summaries) =
        run_tree(&["spawn", &counts, "11"], "forks:f counts:leaf libc:posix_spawn", &[]);
    let expected = format!("{}forks spawn: ok\n", run_plain("counts", &["11"]).stdout);
    assert_eq!((stdout, code), (expected, Some(0)));
    let (parent, child): (Vec<_>, Vec<_>) =
        summaries.values().map(|s| &s[0]).partition(|s| state(s, "f") == "active");
    assert_eq!(hits(parent[0], "f"), 1);
    assert_eq!(hits(child[0], "leaf"), 11);
}

#[test]
fn all_of_libc_probed_through_posix_spawn() {
    let counts = fixture("counts").display().to_string();
    let (stdout, code, _) = run_tree(&["spawn", &counts, "3"], "libc.so.6:*", &[]);
    let expected = format!("{}forks spawn: ok\n", run_plain("counts", &["3"]).stdout);
    assert_eq!((stdout, code), (expected, Some(0)));
}

#[test]
fn each_image_of_an_exec_chain_reports_its_own_counts() {
    let (stdout, code, summaries) = run_tree(&["chain", "3", "6"], "forks:f", &[]);
    assert_eq!((stdout.as_str(), code), ("forks chain: ok\n", Some(0)));
    assert_eq!(summaries.len(), 1, "one pid");
    let images = summaries.values().next().unwrap();
    assert_eq!(images.len(), 4, "a summary per image: before each of 3 execs, and at exit");
    assert!(images.iter().all(|s| hits(s, "f") == 6), "{images:#?}");
}

#[test]
fn no_follow_leaves_exec_children_alone() {
    let counts = fixture("counts").display().to_string();
    let (_, code, summaries) =
        run_tree(&["vfork", &counts, "9"], "forks:f counts:leaf", &[("UPROBES_FOLLOW", "0")]);
    assert_eq!(code, Some(0));
    assert_eq!(summaries.len(), 1, "only the parent is instrumented");
}

#[test]
fn a_raw_clone_child_runs_without_the_runtime() {
    let (stdout, code, summaries) = run_tree(&["clone", "25"], "forks:f", &[]);
    assert_eq!((stdout.as_str(), code), ("forks clone: ok\n", Some(0)));
    assert_eq!(summaries.len(), 1, "the raw child (no atfork handler) writes no summary");
    assert_eq!(hits(&summaries.values().next().unwrap()[0], "f"), 1, "nor counts into its parent");
}
