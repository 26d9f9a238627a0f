//! Probes on libc's own functions, including those the runtime itself uses, and on all of libc.

mod common;
use common::*;

/// Hits of malloc, free, memcpy and strlen grow by exactly one per workload iteration: libc's own
/// internal calls are the same in both runs, so the difference is exact.
#[test]
fn malloc_free_memcpy_strlen_count_exactly() {
    let specs = "libc.so.6:malloc libc.so.6:free libc.so.6:memcpy@@GLIBC_2.14 libc:strlen";
    let small = run_probed("workload", &["1000"], specs);
    let large = run_probed("workload", &["3000"], specs);
    assert_same_behaviour(&run_plain("workload", &["3000"]), &large);
    for symbol in ["malloc", "free", "memcpy", "strlen"] {
        assert_eq!(large.hits(symbol) - small.hits(symbol), 2000, "{symbol}");
        assert!(small.hits(symbol) >= 1000, "{symbol}");
    }
}

/// strlen is an IFUNC: the probe is on the implementation this CPU uses, not on the resolver
/// (which runs once, at relocation, before any probe exists).
#[test]
fn ifunc_probes_the_implementation() {
    let probed = run_probed("workload", &["500"], "libc.so.6:strlen");
    let p = probed.probe("strlen");
    assert_eq!(p["state"], "active");
    assert!(p["hits"].as_u64().unwrap() >= 500);
}

#[test]
fn all_of_libc_probed_at_once() {
    let plain = run_plain("workload", &["200"]);
    let probed = run_probed("workload", &["200"], "libc.so.6:*");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.stderr, plain.stderr, "the program's own stderr is untouched");
    let probes = probed.probes();
    let active = probes.iter().filter(|p| p["state"] == "active").count();
    assert!(active > 1500, "most of libc is probed: {active} of {}", probes.len());
    for p in probes.iter().filter(|p| p["state"] != "active") {
        let error = p["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("every signal blocked") || error.contains("which is not a file"),
            "unexpected failure: {p}"
        );
    }
    assert!(probed.hits("malloc") >= 200);
    assert!(probed.hits("pthread_create") == 1);
}

#[test]
fn all_of_libc_under_threads() {
    let plain = run_plain("threads", &["4", "20000"]);
    let probed = run_probed("threads", &["4", "20000"], "libc.so.6:* threads:hot");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("hot"), 80_000);
    assert_eq!(probed.hits("pthread_create"), 4);
    assert_eq!(probed.hits("pthread_join"), 4);
}
