//! The program's own SIGTRAP handling is untouched by libuprobe.

mod common;
use common::*;

#[test]
fn own_handler_gets_its_own_traps_with_probes_active() {
    let plain = run_plain("own_trap", &[]);
    assert_eq!(
        plain.stdout,
        "handler is the program's: 1\nhandled 10 traps, 10 with the expected si_code\n\
         errno after a probe hit: 1234\nsum 18\n"
    );
    let probed = run_probed("own_trap", &[], "own_trap:probed");
    assert_same_behaviour(&plain, &probed);
    // 5 in the loop, 10 from inside the program's own SIGTRAP handler, 1 for errno, 1 with every
    // signal blocked.
    assert_eq!(probed.hits("probed"), 17);
}

#[test]
fn an_int3_nobody_handles_still_kills_by_sigtrap() {
    let plain = run_plain("own_trap", &["die"]);
    assert_eq!(plain.signal(), Some(libc::SIGTRAP));
    let probed = run_probed("own_trap", &["die"], "own_trap:probed");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.stdout, "");
}
