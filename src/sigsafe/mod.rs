//! The async-signal-safe core: every line of code that runs inside a signal handler, a trampoline
//! or the return trampoline, and the state they share with the rest of the runtime. Nothing else
//! lives here, and nothing here imports from the rest of the crate, so that the whole set can be
//! audited at once.
//!
//! # Safety: the rules of this folder
//!
//! - No allocation, no lock, no formatting, no panic, no libc call: system calls are raw
//!   ([`sys`]), so `errno` is never written and no probed libc function is entered from here.
//! - Shared state is atomics: the lookup [`table::Table`] is published through an `AtomicPtr` and
//!   freed only after every reader that could hold it has left; per-thread state is reached
//!   through initial-exec TLS ([`thread`]), two instructions, never `__tls_get_addr`.
//! - Memory the program owns is read with `process_vm_readv` when it may be unmapped.
//! - The lints below deny the panicking constructs; `tests/signal_safe.rs` checks that the release
//!   build's handlers reach no panic symbol.
//!
//! | file | what |
//! | --- | --- |
//! | [`sys`] | every raw system call |
//! | [`thread`] | the TLS record, per-thread blocks, per-thread hit counters |
//! | [`table`] | the published lookup table and its readers |
//! | [`plan`] | how a hit resumes (XOL slot or emulation) |
//! | [`emulate`] | control flow applied to a saved context |
//! | [`consumer`] | what a hit records beyond its count: durations, argument types |
//! | [`events`] | event rings and recording |
//! | [`ret`] | return probes: the return stack and the return trampoline |
//! | [`chain`] | the program's own dispositions of the signals libuprobe handles |
//! | [`unwind`] | user stacks: `.eh_frame` CFI and frame pointers, over a published list of objects |
//! | [`stacks`] | identical stacks counted in place, per probe |
//! | [`hit`] | what a hit does, however it arrived: count, events, return hijack |
//! | [`jump`] | the jump path's shared entry: registers saved, then the hit |
//! | [`trap`] | the SIGTRAP and fault handlers |

#![deny(
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

pub mod chain;
pub mod clock;
pub mod consumer;
pub mod emulate;
pub mod events;
pub mod hit;
pub mod jump;
pub mod plan;
pub mod ret;
pub mod stacks;
pub mod sys;
pub mod table;
pub mod thread;
pub mod trap;
pub mod unwind;
