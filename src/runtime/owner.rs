//! Which process owns the runtime: the one that ran the constructor, then each forked child (the
//! fork handlers say so: the child of an owner owns its copy), never a vfork or posix_spawn child
//! (which runs on its parent's memory), nor a child of a raw `clone` (which runs no fork handler).
//! Hits count, and the registry may be used, only in the owner.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::sigsafe::{sys, trap::OWNER_PID};

/// Set in the fork prepare handler when the forking process owns the runtime.
static FORKING_OWNER: AtomicBool = AtomicBool::new(false);

/// Does this process own the runtime?
pub fn owns() -> bool {
    sys::getpid() == OWNER_PID.load(Ordering::Relaxed)
}

/// This process owns the runtime (the constructor, or an attach).
pub fn take() {
    OWNER_PID.store(sys::getpid(), Ordering::SeqCst);
}

/// Fork prepare: remember whether the forking process owns the runtime.
pub(super) fn before_fork() {
    FORKING_OWNER.store(owns(), Ordering::SeqCst);
}

/// In the child: it owns its copy of the runtime if its parent owned the original. True if so.
pub(super) fn child_takes_over() -> bool {
    if FORKING_OWNER.swap(false, Ordering::SeqCst) {
        take();
        true
    } else {
        false
    }
}
