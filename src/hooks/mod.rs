//! The hooks: libuprobe's view of what the program does to its objects, processes and signals,
//! through the functions it interposes (all listed in [`table`]) and the fork handlers
//! (`runtime::fork`).
//!
//! | file | what |
//! | --- | --- |
//! | [`table`] | every interposed function, its real address and its resolution |
//! | [`dl`] | objects appearing and vanishing: the link-map hook, dlopen/dlmopen/dlclose, mmap/munmap |
//! | [`exec`] | exec: the summary of the image that goes; `UPROBES_FOLLOW` |
//! | [`spawn`] | vfork and posix_spawn children, which borrow their parent's memory |
//! | [`signals`] | the program's own dispositions; SIGTRAP kept out of every mask |
//! | [`ns`] | unshare and setns, which need a single-threaded process |
//! | [`creds`] | per-thread privilege changes (capset, prctl, seccomp, raw setuid calls): libuprobe's threads follow them |
//! | [`unwind`] | unwinders see real return addresses, never the return trampoline |

pub mod creds;
pub mod dl;
pub mod exec;
pub mod ns;
pub mod signals;
pub mod spawn;
pub mod table;
pub mod unwind;
