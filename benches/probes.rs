//! `cargo bench`: what a probe costs, on the jump path and on the int3 path, as ratios to costs
//! measured in the same run (a bare call, the SIGTRAP floor, `clock_gettime`, the unprobed
//! program), so that a noisy machine moves both sides alike. Figures are minimums over rounds.
//! It prints; it asserts nothing (the README keeps the figures and the targets).
//!
//! Environment: UPROBE_BENCH_ITERATIONS (default 200000), UPROBE_BENCH_ROUNDS (default 7).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

fn bench_exe() -> PathBuf {
    Path::new(env!("UPROBE_FIXTURES")).join("bench")
}

/// Run the bench fixture with `args`, preloaded with `lib` and `env`; its "name value" lines.
fn run(lib: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, f64> {
    let mut cmd = Command::new(bench_exe());
    cmd.args(args).env("UPROBES_OUTPUT", "/dev/null").env_remove("UPROBES_PATH");
    if let Some(lib) = lib {
        cmd.env("LD_PRELOAD", lib);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bench fixture");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().expect("a figure")))
        .collect()
}

/// The minimum wall time of `cmd` over `n` runs.
fn wall(n: usize, mut make: impl FnMut() -> Command) -> Duration {
    (0..n)
        .map(|_| {
            let mut c = make();
            let t = Instant::now();
            let out = c.output().expect("run");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// The JSON summary's `setup_ns` of runs of `bench nothing` with `specs`: the minimum and the
/// median of `n`.
fn setup_ns(lib: &Path, specs: &str, path: &str, n: usize) -> (f64, f64) {
    let out = std::env::temp_dir().join(format!("uprobe-bench-{}.jsonl", std::process::id()));
    let mut all = Vec::new();
    for _ in 0..n {
        let _ = std::fs::remove_file(&out);
        let status = Command::new(bench_exe())
            .arg("nothing")
            .env("LD_PRELOAD", lib)
            .env("UPROBES", specs)
            .env("UPROBES_PATH", path)
            .env("UPROBES_FORMAT", "json")
            .env("UPROBES_OUTPUT", &out)
            .status()
            .expect("run bench");
        assert!(status.success());
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let ns = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["setup_ns"].as_f64())
            .expect("setup_ns in the summary");
        all.push(ns);
    }
    let _ = std::fs::remove_file(&out);
    all.sort_by(f64::total_cmp);
    (all[0], all[all.len() / 2])
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list here
    }
    let iterations = std::env::var("UPROBE_BENCH_ITERATIONS").unwrap_or_else(|_| "200000".into());
    let rounds = std::env::var("UPROBE_BENCH_ROUNDS").unwrap_or_else(|_| "7".into());
    let lib = library();
    let micro = ["micro", iterations.as_str(), rounds.as_str()];
    let specs = "bench:probed bench:probed2 bench:probed_ret bench:probed_ret%return";
    println!("libuprobe benchmark: {iterations} iterations x {rounds} rounds, minimum per round");

    // Hits: the same program, the jump path and the int3 path.
    let plain = run(None, &micro, &[]);
    let jump = run(Some(&lib), &micro, &[("UPROBES", specs), ("UPROBES_LATENCY", "0")]);
    let trap = run(
        Some(&lib),
        &micro,
        &[("UPROBES", specs), ("UPROBES_LATENCY", "0"), ("UPROBES_PATH", "trap")],
    );
    let timed = run(Some(&lib), &micro, &[("UPROBES", specs), ("UPROBES_LATENCY", "1")]);
    let traced = run(
        Some(&lib),
        &micro,
        &[("UPROBES", "bench:probed_args(int,int)"), ("UPROBES_TRACE", "1")],
    );
    let traced_trap = run(
        Some(&lib),
        &micro,
        &[
            ("UPROBES", "bench:probed_args(int,int)"),
            ("UPROBES_TRACE", "1"),
            ("UPROBES_PATH", "trap"),
        ],
    );
    let stacked = run(Some(&lib), &micro, &[("UPROBES", "bench:stack_leaf%stack")]);
    let stacked_trap =
        run(Some(&lib), &micro, &[("UPROBES", "bench:stack_leaf%stack"), ("UPROBES_PATH", "trap")]);
    let bare = plain["bare"];
    let cost = |m: &BTreeMap<String, f64>, k: &str| (m[k] - plain[k]).max(0.0);
    let floor = plain["floor"];
    let clock = plain["clock"];
    println!("  bare call                      {bare:>9.2} ns");
    println!(
        "  SIGTRAP floor                  {floor:>9.2} ns   int3 + empty handler, unprobed run"
    );
    println!("  clock_gettime                  {clock:>9.2} ns");
    println!("  per hit, less the unprobed call:          jump path    int3 path   int3/jump");
    let row = |name: &str, j: f64, t: f64| {
        println!(
            "  {name:<28} {j:>9.2} ns {t:>9.2} ns {:>10.0}x",
            if j > 0.01 { t / j } else { f64::INFINITY }
        );
    };
    row("counted hit (class 1 site)", cost(&jump, "probe"), cost(&trap, "probe"));
    row("counted hit (class 2, punned)", cost(&jump, "probe2"), cost(&trap, "probe2"));
    row("entry+return pair", cost(&jump, "probe_ret"), cost(&trap, "probe_ret"));
    row("traced event, 2 arguments", cost(&traced, "probe_args"), cost(&traced_trap, "probe_args"));
    row("hit with its stack, 20 frames", cost(&stacked, "deep20"), cost(&stacked_trap, "deep20"));
    println!(
        "  entry+return pair with durations (UPROBES_LATENCY=1, two reads of the durations' clock): {:.2} ns",
        cost(&timed, "probe_ret")
    );
    let ev = cost(&traced, "probe_args");
    println!(
        "  traced event / (2 x clock_gettime + 10 ns): {:.2}   (counted hit / bare call: {:.2})",
        ev / (2.0 * clock + 10.0),
        cost(&jump, "probe") / bare
    );

    // Scaling: one probe, one thread and two threads, calls per second.
    let n: u64 = iterations.parse().unwrap_or(200_000) * 20;
    let ns = n.to_string();
    // The best of five interleaved runs each, and the same without probes: on a VM whose two
    // vCPUs do not always run at once, the unprobed program's own scaling is the baseline.
    let once = |lib: Option<&Path>, threads: &str| {
        let env: &[(&str, &str)] = if lib.is_some() { &[("UPROBES", "bench:probed")] } else { &[] };
        run(lib, &["threads", &ns, threads], env)["ns"]
    };
    let (mut one, mut two, mut plain_one, mut plain_two) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        one = one.min(once(Some(&lib), "1"));
        two = two.min(once(Some(&lib), "2"));
        plain_one = plain_one.min(once(None, "1"));
        plain_two = plain_two.min(once(None, "2"));
    }
    println!(
        "  two threads on one probe: {:.2}x the calls per second of one thread (unprobed: {:.2}x)",
        2.0 * one / two,
        2.0 * plain_one / plain_two
    );

    // Setup: registering every function of libc.
    let setup_jump = setup_ns(&lib, "libc.so.6:*", "jump", 9);
    let setup_trap = setup_ns(&lib, "libc.so.6:*", "trap", 5);
    let setup_one = setup_ns(&lib, "libc.so.6:malloc", "jump", 15);
    println!(
        "  setup of libc.so.6:* (2,200 sites): {:.1} ms on the jump path (median {:.1}), {:.1} ms traps only; libc.so.6:malloc {:.2} ms (median {:.2})",
        setup_jump.0 / 1e6,
        setup_jump.1 / 1e6,
        setup_trap.0 / 1e6,
        setup_one.0 / 1e6,
        setup_one.1 / 1e6
    );
    let start = |lib: Option<&Path>, specs: Option<&str>| {
        let lib = lib.map(Path::to_path_buf);
        let specs = specs.map(str::to_string);
        move || {
            let mut c = Command::new(bench_exe());
            c.arg("nothing").env("UPROBES_OUTPUT", "/dev/null").env("UPROBES_SOCKET", "none");
            if let Some(l) = &lib {
                c.env("LD_PRELOAD", l);
            }
            if let Some(s) = &specs {
                c.env("UPROBES", s);
            }
            c
        }
    };
    let base = wall(30, start(None, None));
    let none = wall(30, start(Some(&lib), None));
    let malloc = wall(30, start(Some(&lib), Some("libc.so.6:malloc")));
    println!(
        "  a process preloaded with no probes: +{:.2} ms; with libc.so.6:malloc: +{:.2} ms",
        (none.as_secs_f64() - base.as_secs_f64()) * 1e3,
        (malloc.as_secs_f64() - base.as_secs_f64()) * 1e3
    );

    // A real program under libc.so.6:*: the fixture's libc work, and sqlite3 when it is there.
    let work = |lib: Option<&Path>, specs: &str, path: &str| {
        let lib = lib.map(Path::to_path_buf);
        let (specs, path) = (specs.to_string(), path.to_string());
        move || {
            let mut c = Command::new(bench_exe());
            c.args(["libc", "200000"]).env("UPROBES_OUTPUT", "/dev/null").env("UPROBES", &specs);
            c.env("UPROBES_PATH", &path);
            if let Some(l) = &lib {
                c.env("LD_PRELOAD", l);
            }
            c
        }
    };
    let plain_work = wall(3, work(None, "", "jump"));
    let jump_work = wall(3, work(Some(&lib), "libc.so.6:*", "jump"));
    let trap_work = wall(1, work(Some(&lib), "libc.so.6:*", "trap"));
    println!(
        "  libc-heavy fixture under libc.so.6:*: {:.2}x the unprobed run on the jump path, {:.1}x traps only",
        jump_work.as_secs_f64() / plain_work.as_secs_f64(),
        trap_work.as_secs_f64() / plain_work.as_secs_f64()
    );
    if let Ok(sqlite) = which("sqlite3") {
        let db = std::env::temp_dir().join(format!("uprobe-bench-{}.db", std::process::id()));
        let script = "create table t(a integer, b text); begin; \
             with recursive c(x) as (select 1 union all select x + 1 from c where x < 20000) \
             insert into t select x, printf('row %d', x) from c; commit; \
             select count(*), sum(a), max(length(b)) from t where b like '%7%';";
        let run_sqlite = |lib: Option<&Path>, specs: &str| {
            let (sqlite, db, lib) = (sqlite.clone(), db.clone(), lib.map(Path::to_path_buf));
            let specs = specs.to_string();
            move || {
                let _ = std::fs::remove_file(&db);
                let mut c = Command::new(&sqlite);
                c.arg(&db).arg(script).env("UPROBES_OUTPUT", "/dev/null").env("UPROBES", &specs);
                if let Some(l) = &lib {
                    c.env("LD_PRELOAD", l);
                }
                c
            }
        };
        let p = wall(3, run_sqlite(None, ""));
        let j = wall(3, run_sqlite(Some(&lib), "libc.so.6:*"));
        let _ = std::fs::remove_file(&db);
        println!(
            "  sqlite3 (20,000 rows) under libc.so.6:*: {:.2}x the unprobed run ({:.0} ms vs {:.0} ms)",
            j.as_secs_f64() / p.as_secs_f64(),
            j.as_secs_f64() * 1e3,
            p.as_secs_f64() * 1e3
        );
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}
