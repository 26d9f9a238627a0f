//! The instruction zoo: a probe on one instruction of every class, each checked to leave every
//! register, the flags, the stack and memory exactly as the unprobed run does, and to be hit exactly
//! as often as the instruction runs.

mod common;
use common::*;

/// zp_ label -> times zoo_main.c executes that instruction.
const EXPECTED_HITS: &[(&str, u64)] = &[
    ("zp_riprel_load", 1),
    ("zp_riprel_store", 1),
    ("zp_riprel_lea", 1),
    ("zp_riprel_cmp_imm", 1),
    ("zp_riprel_sse", 1),
    ("zp_riprel_sse_op", 1),
    ("zp_call_rel32", 1),
    ("zp_jmp_rel8", 1),
    ("zp_jmp_rel32", 1),
    ("zp_jo", 32),
    ("zp_jno", 32),
    ("zp_jb", 32),
    ("zp_jae", 32),
    ("zp_je", 32),
    ("zp_jne", 32),
    ("zp_jbe", 32),
    ("zp_ja", 32),
    ("zp_js", 32),
    ("zp_jns", 32),
    ("zp_jp", 32),
    ("zp_jnp", 32),
    ("zp_jl", 32),
    ("zp_jge", 32),
    ("zp_jle", 32),
    ("zp_jg", 32),
    ("zp_jl_rel32", 2),
    ("zp_loop", 3),
    ("zp_loopne", 2),
    ("zp_loope", 4),
    ("zp_jrcxz", 2),
    ("zp_ret", 1),
    ("zp_ret_imm16", 1),
    ("zp_call_reg", 1),
    ("zp_call_mem", 1),
    ("zp_call_stack_mem", 1),
    ("zp_call_riprel", 1),
    ("zp_jmp_reg", 1),
    ("zp_jmp_mem", 1),
    ("zp_jmp_riprel", 1),
    ("zp_push", 1),
    ("zp_pop", 1),
    ("zp_endbr64", 1),
    ("zp_lock_cmpxchg", 2),
    ("zp_lock_cmpxchg_riprel", 2),
    ("zp_rep_movsb", 1),
    ("zp_syscall", 1),
    ("zp_rsp_load", 1),
];

#[test]
fn every_instruction_class_runs_exactly_as_unprobed() {
    let plain = run_plain("zoo", &[]);
    assert!(plain.status.success());
    assert_eq!(plain.stdout.lines().count(), 24 + 16 * 32 + 11, "zoo_main.c prints one line a run");
    let probed = run_probed("zoo", &[], "zoo:zp_*");
    assert_same_behaviour(&plain, &probed);
    assert!(probed.errors().is_empty(), "{:?}", probed.errors());
    assert_eq!(probed.probes().len(), EXPECTED_HITS.len(), "one probe per zp_ label");
    for (label, hits) in EXPECTED_HITS {
        assert_eq!(probed.probe(label)["state"], "active", "{label}");
        assert_eq!(probed.hits(label), *hits, "{label}");
    }
}

/// The same through the jump path's full entry (every hit records an event, so every hit saves
/// and restores the registers around Rust code), and through the return side of a return probe:
/// every register, the flags and the whole vector state (ymm/zmm upper halves, xmm16-31, the
/// mask registers, where the CPU has them: zoo_main.c says which on stderr) come back intact.
#[test]
fn every_instruction_class_runs_exactly_as_unprobed_with_events() {
    let plain = run_plain("zoo", &[]);
    let probed = run_probed_env("zoo", &[], "zoo:zp_*", &[("UPROBES_TRACE", "1")]);
    assert_same_behaviour(&plain, &probed);
    assert!(probed.errors().is_empty(), "{:?}", probed.errors());
    for (label, hits) in EXPECTED_HITS {
        assert_eq!(probed.hits(label), *hits, "{label}");
    }
    let entries = probed.report.iter().filter(|v| v["type"] == "entry").count() as u64;
    assert_eq!(entries, EXPECTED_HITS.iter().map(|(_, n)| n).sum::<u64>(), "an event a hit");
}

/// Each class alone too: a probe must not depend on its neighbours being probed.
#[test]
fn each_instruction_class_alone() {
    let plain = run_plain("zoo", &[]);
    for (label, hits) in EXPECTED_HITS.iter().step_by(5) {
        let probed = run_probed("zoo", &[], &format!("zoo:{label}"));
        assert_same_behaviour(&plain, &probed);
        assert_eq!(probed.hits(label), *hits, "{label}");
    }
}
