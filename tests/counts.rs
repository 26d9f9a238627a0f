//! Exact hit counts in the main program and in a shared library, at entry, at offsets and at
//! addresses; aliases and globs; and bad specs that must leave the program running unharmed.

mod common;
use common::*;

use iced_x86::{Decoder, DecoderOptions};

const N: u64 = 1000;

/// (file virtual address, bytes) of a function of the counts fixture.
fn function(name: &str) -> (u64, Vec<u8>) {
    let (vaddr, _, bytes) = symbol_in_file("counts", name);
    (vaddr, bytes)
}

/// Offsets of the instructions of `code`.
fn boundaries(code: &[u8]) -> Vec<u64> {
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        out.push(d.ip());
        let _ = d.decode();
    }
    out
}

#[test]
fn entry_probes_count_exactly_in_program_and_library() {
    let plain = run_plain("counts", &[]);
    assert_eq!(plain.status.code(), Some(7));
    let probed = run_probed(
        "counts",
        &[],
        "counts:leaf counts:loop_body libcounted.so:lib_add libcounted:lib_square libcounted.so:lib_mul",
    );
    assert_same_behaviour(&plain, &probed);
    for (symbol, hits) in
        [("leaf", N), ("loop_body", 1), ("lib_add", N), ("lib_square", 2 * N), ("lib_mul", 2 * N)]
    {
        assert_eq!(probed.hits(symbol), hits, "{symbol}");
        assert_eq!(probed.probe(symbol)["state"], "active");
    }
    assert!(probed.probe("lib_add")["object"].as_str().unwrap().ends_with("/libcounted.so"));
}

#[test]
fn counts_scale_with_calls() {
    let probed = run_probed("counts", &["12345"], "counts:leaf libcounted.so:lib_mul");
    assert_eq!(probed.hits("leaf"), 12345);
    assert_eq!(probed.hits("lib_mul"), 2 * 12345);
}

#[test]
fn offset_and_address_probes_count_exactly() {
    let (vaddr, code) = function("leaf");
    let b = boundaries(&code);
    assert!(b.len() >= 2, "leaf has at least two instructions: {b:?}");
    let second = b[1];
    let last = *b.last().unwrap();
    let specs = format!("counts:leaf+{second} counts:leaf+{last:#x} counts:{:#x}", vaddr + second);
    let probed = run_probed("counts", &[], &specs);
    assert_eq!(probed.status.code(), Some(7));
    let probes = probed.probes();
    assert_eq!(probes.len(), 3, "{probes:#?}");
    for p in probes {
        assert_eq!(p["state"], "active", "{p}");
        assert_eq!(p["hits"], N, "{p}");
    }
    // The spec by offset and the one by address are the same site.
    assert_eq!(probes[0]["offset"], probes[2]["offset"]);
}

#[test]
fn aliases_are_one_site_and_globs_expand() {
    let probed = run_probed("counts", &[], "libcounted.so:lib_add libcounted.so:lib_sum");
    assert_eq!(probed.hits("lib_add"), N);
    assert_eq!(probed.hits("lib_sum"), N, "an alias counts every hit of its site");
    assert_eq!(probed.probe("lib_add")["offset"], probed.probe("lib_sum")["offset"]);

    let probed = run_probed("counts", &[], "libcounted:lib_*");
    let mut got: Vec<(String, u64)> = probed
        .probes()
        .iter()
        .map(|p| (p["symbol"].as_str().unwrap().to_string(), p["hits"].as_u64().unwrap()))
        .collect();
    got.sort();
    let want = [("lib_add", N), ("lib_mul", 2 * N), ("lib_square", 2 * N)];
    assert_eq!(got, want.map(|(s, n)| (s.to_string(), n)), "lib_sum folds into lib_add");
}

#[test]
fn bad_specs_fail_clearly_and_the_program_runs_on() {
    let plain = run_plain("counts", &[]);
    let (_, leaf) = function("leaf");
    let b = boundaries(&leaf);
    assert!(b[1] > 1, "leaf's first instruction is longer than a byte");
    let inside = "counts:leaf+1".to_string();
    // %return on an address inside a function (not its entry) is refused, as bpftrace does.
    let (leaf_vaddr, _) = function("leaf");
    let inside_ret = format!("counts:{:#x}%return", leaf_vaddr + b[1]);
    let nearest = format!("+{:#x} and +{:#x}", b[0], b[1]);
    let cases: Vec<(&str, &str, String)> = vec![
        ("nolib.so:foo", "pending", String::new()),
        ("counts:no_such_function", "failed", "no function matching `no_such_function`".into()),
        ("not-a-spec", "failed", "malformed spec `not-a-spec`".into()),
        ("counts:", "failed", "empty symbol".into()),
        (
            &inside,
            "failed",
            format!("not an instruction boundary of `leaf`: the nearest are {nearest}"),
        ),
        ("counts:leaf+0x10000", "failed", "past the end of `leaf`".into()),
        ("counts:refused_fn", "failed", "cannot probe `ud2`".into()),
        ("counts:0x10", "failed", "not in an executable segment".into()),
        (&inside_ret, "failed", "a return probe goes on a function's entry".into()),
    ];
    for (spec, state, message) in &cases {
        let probed = run_probed("counts", &[], spec);
        assert_same_behaviour(&plain, &probed);
        let probes = probed.probes();
        assert_eq!(probes.len(), 1, "{spec}: {probes:#?}");
        assert_eq!(probes[0]["state"], *state, "{spec}");
        assert_eq!(probes[0]["spec"], *spec);
        if message.is_empty() {
            assert!(probed.errors().is_empty(), "{spec}: {:?}", probed.errors());
        } else {
            let errors = probed.errors();
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert!(
                errors[0].contains(message.as_str()),
                "{spec}: {:?} lacks {message:?}",
                errors[0]
            );
            assert!(probes[0]["error"].as_str().unwrap().contains(message.as_str()));
        }
    }
    // All of them at once, with good ones among them: the good ones still count.
    let all: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let probed = run_probed("counts", &[], &format!("{};counts:leaf", all.join(";")));
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.probe_by_spec("counts:leaf")["hits"], N);
}

#[test]
fn text_report_to_stderr_by_default_and_pid_in_output_path() {
    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.env("LD_PRELOAD", lib()).env("UPROBES", "counts:leaf,nolib:x");
    let (stdout, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(7));
    assert_eq!(stdout, run_plain("counts", &[]).stdout);
    let head = stderr.lines().find(|l| l.starts_with("libuprobe: pid ")).expect("summary head");
    assert!(head.contains("(counts, argv[0] \""), "the summary names the program: {head}");
    let header = stderr.lines().find(|l| l.contains("HITS")).expect("table header");
    assert!(
        header.contains("ID") && header.contains("STATE") && header.contains("PATH"),
        "{header}"
    );
    let row = stderr.lines().find(|l| l.contains("counts:leaf")).expect("row for counts:leaf");
    let cols: Vec<_> = row.split_whitespace().collect();
    assert_eq!(
        cols[..6],
        ["1", "1,000", "active", expected_path(), "counts:leaf", "leaf"],
        "{row}"
    );
    assert!(stderr.contains("nolib:x") && stderr.contains("pending"), "{stderr}");

    // A program that closes stderr on its way out (as gnulib's close_stdout does) still gets its
    // report on the stderr it started with.
    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.args(["10", "close"]).env("LD_PRELOAD", lib()).env("UPROBES", "counts:leaf");
    let (stdout, stderr, status) = run_command(cmd);
    assert_eq!((stdout.as_str(), status.code()), ("counts: 494\n", Some(7)));
    let row = stderr.lines().find(|l| l.contains("counts:leaf")).expect(&stderr);
    assert_eq!(row.split_whitespace().take(2).collect::<Vec<_>>(), ["1", "10"], "{stderr}");

    let dir = scratch("pid-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.env("LD_PRELOAD", lib())
        .env("UPROBES", "counts:leaf")
        .env("UPROBES_OUTPUT", dir.join("report-%p.txt"));
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(7));
    let text =
        std::fs::read_to_string(dir.join(format!("report-{pid}.txt"))).expect("report-<pid>.txt");
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Defect: a program started through a symbolic link (Debian's `redis-server` is a link to
/// `redis-check-rdb`) could not be probed by the name it was started as: `redis-server:call` stayed
/// pending. The main program answers to that name too, by path and through PATH.
#[test]
fn a_program_started_through_a_link_answers_to_its_name() {
    let dir = scratch("link");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("started-as");
    std::os::unix::fs::symlink(fixture("counts"), &link).unwrap();
    let plain = run_plain("counts", &["321"]);
    for (program, path) in [(link.to_str().unwrap(), None), ("started-as", Some(&dir))] {
        let report = scratch("link.jsonl");
        let mut cmd = std::process::Command::new(program);
        cmd.arg("321")
            .env("LD_PRELOAD", lib())
            .env("UPROBES", "started-as:leaf;counts:loop_body")
            .env("UPROBES_FORMAT", "json")
            .env("UPROBES_OUTPUT", &report);
        if let Some(d) = path {
            let old = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{old}", d.display()));
        }
        let (stdout, stderr, status) = run_command(cmd);
        assert_eq!((status.code(), &stdout), (plain.status.code(), &plain.stdout), "{stderr}");
        let text = std::fs::read_to_string(&report).unwrap();
        let summary: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .find(|v: &serde_json::Value| v["type"] == "summary")
            .unwrap();
        let probe = &summary["probes"][0];
        assert_eq!(
            (probe["state"].as_str(), probe["hits"].as_u64()),
            (Some("active"), Some(321)),
            "{program}: {summary}"
        );
        // Its own file name still matches.
        assert_eq!(summary["probes"][1]["hits"], 1, "{summary}");
        std::fs::remove_file(&report).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
