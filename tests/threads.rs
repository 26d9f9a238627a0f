//! Counts are exact under many threads: no hit lost, none counted twice.

mod common;
use common::*;

#[test]
fn eight_threads_of_100000_hits_count_exactly() {
    let plain = run_plain("threads", &["8", "100000"]);
    let probed = run_probed("threads", &["8", "100000"], "threads:hot");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("hot"), 800_000);
}
