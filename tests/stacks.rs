//! User stacks at hits (`%stack`, `--stacks`, `--flamegraph`): a fixture with known call stacks
//! through a library built without frame pointers (whose rbp holds garbage while it calls back),
//! counted exactly, on whichever path the suite runs (jumps, or traps with UPROBES_PATH=trap).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::process::Command;

/// The folded stacks of the probe with `spec`, from a JSON summary: stack -> count.
fn folded(o: &Outcome, spec: &str) -> BTreeMap<String, u64> {
    let p = o.probe_by_spec(spec);
    let lines = p["stacks"].as_array().unwrap_or_else(|| panic!("no stacks in {p}"));
    lines
        .iter()
        .map(|l| {
            let (s, n) = l.as_str().unwrap().rsplit_once(' ').unwrap();
            (s.to_string(), n.parse().unwrap())
        })
        .collect()
}

/// From `main` on: what the fixture decides (the frames above main are libc's start-up).
fn from_main(stacks: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (s, n) in stacks {
        assert!(s.starts_with("_start;__libc_start_main;"), "unwound to the start: {s}");
        let at = s.find(";main (").unwrap_or_else(|| panic!("no main in {s}"));
        *out.entry(s[at + 1..].to_string()).or_default() += n;
    }
    out
}

/// The line of `c_fixtures/FILE` that holds `text`, as the line tables name it.
fn line(file: &str, text: &str) -> String {
    let src = std::fs::read_to_string(format!("{}/c_fixtures/{file}", env!("CARGO_MANIFEST_DIR")));
    let n = src.unwrap().lines().position(|l| l.contains(text)).expect(text) + 1;
    format!("{file}:{n}")
}

/// The fixture's stacks, each frame with the line of its call, down to `visit` (`leaf`) or to
/// `lib_apply` itself; a probed function's own frame has the line of its first statement.
fn expected(even: u64, odd: u64, leaf: bool) -> BTreeMap<String, u64> {
    let main = format!("main ({})", line("stacks.c", "walk_even(2) : walk_odd(1)"));
    let call = |walk: &str, at: &str| format!("{walk} ({})", line("stacks.c", at));
    let by_even = call("walk_even", "lib_apply(visit, n) + 1");
    let by_odd = call("walk_odd", "lib_apply(visit, n) ^ 1");
    let tail = if leaf {
        format!(
            "lib_apply ({});visit ({})",
            line("stk_lib.c", "s += f(i)"),
            line("stacks.c", "sink += i")
        )
    } else {
        format!("lib_apply ({})", line("stk_lib.c", "long lib_apply("))
    };
    BTreeMap::from([
        (format!("{main};{by_even};{tail}"), even),
        (format!("{main};{by_odd};{tail}"), odd),
    ])
}

/// stacks 30: visit is called 2 x 10 times from walk_even and 20 times from walk_odd, through
/// lib_apply (libstk.so: no frame pointer, rbp garbage), every stack unwound to `_start`. Checked
/// to fail when the unwinder ignores `.eh_frame` (frame pointers alone stop in lib_apply).
#[test]
fn stacks_through_a_library_without_frame_pointers_are_exact() {
    let plain = run_plain("stacks", &["30"]);
    let o = run_probed("stacks", &["30"], "stacks:visit%stack");
    assert_same_behaviour(&plain, &o);
    assert_eq!(o.hits("visit"), 40);
    assert_eq!(from_main(&folded(&o, "stacks:visit%stack")), expected(20, 20, true));
    assert_eq!(o.summary()["stacks_lost"], 0);
}

/// A return probe on the frame in between (its return address replaced by the trampoline) and a
/// stack probe on the same function: the stacks are the same as without it, and the entry's own
/// stack ends at lib_apply.
#[test]
fn stacks_see_through_return_probes() {
    let specs = "stacks:visit%stack libstk.so:lib_apply%return%stack";
    let o = run_probed("stacks", &["30"], specs);
    assert_same_behaviour(&run_plain("stacks", &["30"]), &o);
    assert_eq!(from_main(&folded(&o, "stacks:visit%stack")), expected(20, 20, true));
    let own = from_main(&folded(&o, "libstk.so:lib_apply%return%stack"));
    assert_eq!(own, expected(10, 20, false));
}

/// `UPROBES_STACKS=1` gives every probe its stacks; a recursion deeper than 127 frames keeps the
/// innermost 127.
#[test]
fn every_probe_counts_stacks_and_deep_ones_stop_at_127_frames() {
    let o = run_probed_env("ret", &["deep", "300"], "ret:deep", &[("UPROBES_STACKS", "1")]);
    assert_same_behaviour(&run_plain("ret", &["deep", "300"]), &o);
    let stacks = folded(&o, "ret:deep");
    assert_eq!(stacks.values().sum::<u64>(), 300);
    let deepest = stacks.keys().map(|s| s.split(';').count()).max().unwrap();
    assert_eq!(deepest, 127);
    let shallow = stacks.keys().find(|s| s.contains(";main (") && s.matches("deep").count() == 1);
    let shallow = shallow.expect("the outermost call");
    assert!(shallow.starts_with("_start;"), "{shallow}");
}

/// `uprobe run --flamegraph`: an SVG flame graph of the stacks (inferno's), the program's output
/// and exit status its own, the summary's stacks in text.
#[test]
fn run_draws_a_flame_graph() {
    let svg = scratch("flame.svg");
    lib();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uprobe"));
    cmd.args(["run", "-p", "stacks:visit", "--flamegraph"])
        .arg(&svg)
        .arg("--")
        .arg(fixture("stacks"))
        .arg("30");
    let (stdout, stderr, status) = run_command(cmd);
    assert_eq!((stdout, status.code()), (run_plain("stacks", &["30"]).stdout, Some(0)));
    assert!(stderr.contains("stacks of stacks:visit (visit): 2 distinct"), "{stderr}");
    assert!(stderr.contains(";lib_apply (stk_lib.c:10);visit (stacks.c:14) 20\n"), "{stderr}");
    assert!(stderr.contains("flame graph of 2 distinct stacks (40 hits)"), "{stderr}");
    let text = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).unwrap();
    assert!(text.starts_with("<?xml") && text.trim_end().ends_with("</svg>"), "an SVG");
    for frame in ["visit (stacks.c:14)", "lib_apply (stk_lib.c:10)", "walk_even (", "_start ("] {
        assert!(text.contains(&format!("<title>{frame}")), "{frame} is a frame of the graph");
    }
    assert!(text.contains("<title>all (40 hits, 100%)</title>"), "the root counts every hit");
}

/// Defect: a damaged `.eh_frame` (every FDE's CIE pointer out of range, in the library the stacks
/// go through) made `%stack` read before the section and die of SIGSEGV, while the program
/// without `%stack` ran fine. The unwinder stays in the section: the stacks end at the damaged
/// frame, every hit is counted, the program prints and exits as without libuprobe.
#[test]
fn a_damaged_eh_frame_ends_the_stack_not_the_program() {
    let plain = run_plain("stacks_bad", &["30"]);
    assert_eq!(plain.stdout, run_plain("stacks", &["30"]).stdout);
    let o = run_probed("stacks_bad", &["30"], "stacks_bad:visit%stack");
    assert_same_behaviour(&plain, &o);
    assert_eq!(o.hits("visit"), 40);
    let stacks = folded(&o, "stacks_bad:visit%stack");
    assert_eq!(stacks.values().sum::<u64>(), 40, "{stacks:?}");
    assert!(
        stacks.keys().all(|s| !s.contains("main")),
        "unwound through a damaged FDE: {stacks:?}"
    );
}

/// What `c_fixtures/sample.c` prints when every sample unwound to `_start`, and (`some`) some of
/// them were taken in libuprobe's code, or (`none`) none were.
fn sampled(outside: &str) -> String {
    format!("samples: 64, outside every object: {outside}, unwound to _start: 64 (0)\n")
}

/// The pcs the sampling fixture found in no object (its stderr), and its pid.
fn outside_pcs(stderr: &str) -> (u32, Vec<u64>) {
    let pid = stderr.lines().find_map(|l| l.strip_prefix("pid ")).expect(stderr);
    let pcs = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("pc "))
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .collect();
    (pid.parse().unwrap(), pcs)
}

/// Defect: with a hot function or a loop head probed, a sampling profiler's samples (SIGPROF from
/// ITIMER_PROF, `backtrace()` in the handler) mostly had a pc outside every object, in libuprobe's
/// code, and their stacks ended there. Bodies, stubs and XOL slots now come with unwind rules
/// (the site's own, shifted by what the body pushed), registered with libgcc as JITs register
/// theirs: each of 64 samples unwinds through the interrupted frame to `_start`, as without
/// libuprobe, on the suite's path, whether the probe only counts, takes the full way (`%stack`: a
/// sample in libuprobe's Rust code and its assembly entry), or sits in the middle of a frame whose
/// CFA is rsp-based (main's loop head). With UPROBES_PERFMAP=1 every such pc is named in
/// `/tmp/perf-PID.map`.
#[test]
fn samples_in_libuprobes_code_unwind_to_start() {
    let plain = run_plain("sample", &[]);
    assert_eq!(plain.stdout, sampled("none"));
    for spec in ["sample:work", "sample:loop_head", "sample:work%stack"] {
        let o = run_probed_env("sample", &[], spec, &[("UPROBES_PERFMAP", "1")]);
        assert!(o.status.success(), "{spec}: {}", o.stderr);
        let (pid, pcs) = outside_pcs(&o.stderr);
        let map = format!("/tmp/perf-{pid}.map");
        let text = std::fs::read_to_string(&map).unwrap_or_default();
        let _ = std::fs::remove_file(&map);
        if spec.contains("%stack") {
            // Most samples are in libuprobe.so's own code, which has its own unwind tables.
            assert!(o.stdout.ends_with(": 64 (0)\n"), "{spec}: {}", o.stdout);
        } else {
            assert_eq!(o.stdout, sampled("some"), "{spec}");
        }
        let entries: Vec<(u64, u64, &str)> = text
            .lines()
            .map(|l| {
                let mut f = l.splitn(3, ' ');
                let lo = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
                let len = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
                (lo, lo + len, f.next().unwrap())
            })
            .collect();
        assert!(!entries.is_empty(), "{spec}: a perf map in {map}");
        for pc in pcs {
            let named = entries.iter().find(|(lo, hi, _)| *lo <= pc && pc < *hi);
            let (_, _, name) = named.unwrap_or_else(|| panic!("{spec}: {pc:#x} not in {text}"));
            assert!(name.starts_with("[uprobe] ") && name.contains("sample+0x"), "{name}");
        }
    }
}

/// libuprobe's own unwinder (`%stack`) steps through a signal frame into the code the signal
/// interrupted, libuprobe's included: the stacks of a probe in a SIGPROF handler go on past the
/// handler to the probed function's body and main, down to `_start`.
#[test]
fn a_stack_in_a_signal_handler_goes_through_the_signal_frame() {
    let o = run_probed("sample", &[], "sample:in_handler%stack;sample:work");
    assert!(o.status.success(), "{}", o.stderr);
    let calls: u64 = o
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("handler calls "))
        .expect(&o.stderr)
        .parse()
        .unwrap();
    assert_eq!(o.hits("in_handler"), calls, "one hit per SIGPROF");
    let stacks = folded(&o, "sample:in_handler%stack");
    assert_eq!(stacks.values().sum::<u64>(), calls, "{stacks:?}");
    for s in stacks.keys() {
        assert!(s.starts_with("_start;__libc_start_main;"), "unwound to the start: {s}");
        assert!(s.contains(";main (sample.c:"), "{s}");
        assert!(s.contains(";<signal handler called>;on_prof (sample.c:"), "{s}");
    }
    assert!(
        stacks.keys().any(|s| s.contains(";[uprobe] work (sample.c:")),
        "a sample in the body of `work`, named after it: {stacks:?}"
    );
}

/// gdb sees libuprobe's code through its JIT interface (an ELF object for each unit of code,
/// with the same unwind rules and a symbol per piece): stopped by a SIGPROF in a body, or an XOL
/// slot, `bt` names it and goes on to main. On the jump path whatever the suite's: under gdb, the
/// trap path's int3s and gdb's own breakpoints share SIGTRAP (see README's Limits).
#[test]
fn gdb_names_and_unwinds_libuprobes_code() {
    if Command::new("gdb").arg("--version").output().is_err() {
        panic!("gdb is not installed (.ci/run installs it)");
    }
    let script = scratch("gdb-sample.py");
    std::fs::write(
        &script,
        r#"
import gdb
gdb.execute("set pagination off")
gdb.execute("handle SIGPROF stop print pass")
gdb.execute("run > /dev/null 2>&1")
for i in range(2000):
    where = gdb.execute("info symbol $pc", to_string=True)
    if where.startswith("[uprobe]") or where.startswith("No symbol"):
        print("STOPPED", where.strip())
        print(gdb.execute("bt", to_string=True))
        break
    gdb.execute("continue", to_string=True)
gdb.execute("kill")
"#,
    )
    .unwrap();
    let mut cmd = Command::new("gdb");
    cmd.args(["-q", "-nx", "-batch", "-ex", "set startup-with-shell off"])
        .arg("-ex")
        .arg(format!("set environment LD_PRELOAD={}", lib().display()))
        .args(["-ex", "set environment UPROBES=sample:work", "-ex"])
        .arg("set environment UPROBES_OUTPUT=/dev/null")
        .arg("-x")
        .arg(&script)
        .arg(fixture("sample"));
    cmd.env_remove("UPROBES_PATH");
    let (out, err, _) = run_command(cmd);
    std::fs::remove_file(&script).unwrap();
    let stopped = out.lines().find(|l| l.starts_with("STOPPED ")).unwrap_or_else(|| {
        panic!("gdb never stopped in libuprobe's code:\n{out}\n{err}");
    });
    assert!(stopped.contains("[uprobe] ") && stopped.contains("sample+0x"), "{stopped}");
    let bt: Vec<&str> = out.lines().filter(|l| l.starts_with('#')).collect();
    assert!(bt[0].contains("[uprobe] "), "{bt:?}");
    assert!(bt.iter().any(|f| f.contains(" in main () at ")), "{bt:?}");
}
