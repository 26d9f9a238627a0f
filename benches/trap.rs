//! `cargo bench`: the cost of a probe hit as a ratio to the SIGTRAP floor, both measured in the same
//! process (c_fixtures/bench.c), interleaved over several rounds, minimum of each, so that a noisy
//! machine moves both sides alike.
//!
//! Environment: UPROBE_BENCH_ITERATIONS (default 200000), UPROBE_BENCH_ROUNDS (default 7).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn library() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--lib", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --release --lib");
    assert!(status.success());
    let exe = std::env::current_exe().expect("bench executable");
    exe.parent().and_then(Path::parent).expect("target/release").join("libuprobe.so")
}

fn measure(
    lib: &Path,
    specs: &str,
    trace: bool,
    iterations: &str,
    rounds: &str,
) -> BTreeMap<String, f64> {
    let out = Command::new(Path::new(env!("UPROBE_FIXTURES")).join("bench"))
        .args([iterations, rounds])
        .env("LD_PRELOAD", lib)
        .env("UPROBES", specs)
        .env("UPROBES_OUTPUT", "/dev/null")
        .env("UPROBES_TRACE", if trace { "1" } else { "0" })
        .output()
        .expect("run bench fixture");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().expect("ns figure")))
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list here
    }
    let iterations = std::env::var("UPROBE_BENCH_ITERATIONS").unwrap_or_else(|_| "200000".into());
    let rounds = std::env::var("UPROBE_BENCH_ROUNDS").unwrap_or_else(|_| "7".into());
    let lib = library();
    let m = measure(&lib, "bench:probed bench:probed_ret%return", false, &iterations, &rounds);
    let (bare, floor, probe) = (m["bare"], m["floor"], m["probe"]);
    let hit = probe - bare;
    println!(
        "libuprobe benchmark: {iterations} iterations x {rounds} rounds, minimum per round (ns)"
    );
    println!("  bare call           {bare:>9.2}");
    println!("  SIGTRAP floor       {floor:>9.2}   int3 + empty SA_SIGINFO handler, same process");
    println!("  probe hit           {hit:>9.2}   call of a probed function less a bare call");
    println!("  ratio probe/floor   {:>9.3}", hit / floor);
    let pair = m["probe_ret"] - bare;
    println!("  entry+return pair   {pair:>9.2}   call of a return-probed function (two traps) less a bare call");
    println!("  ratio pair/floor    {:>9.3}", pair / floor);
    // Tracing: every hit also records an event (drained to /dev/null by the drain thread).
    let t = measure(&lib, "bench:probed(int)", true, &iterations, &rounds);
    let traced = t["probe"] - t["bare"];
    println!("  SIGTRAP floor       {:>9.2}   (the traced run's own)", t["floor"]);
    println!("  traced hit          {traced:>9.2}   the same, with UPROBES_TRACE=1");
    println!("  ratio traced/floor  {:>9.3}", traced / t["floor"]);
}
