//! The one way the runtime starts a thread of its own (the control socket's server, the event
//! drain). Each runtime thread:
//! - runs on a stack libuprobe maps itself, recorded before the thread starts, so that even the
//!   code glibc runs on a new thread before its start routine is known to be libuprobe's
//!   (`sigsafe::thread::on_runtime_stack`), and hits there are never counted;
//! - is marked as in the runtime for its whole life;
//! - blocks the program's asynchronous signals (so that they go to the program's own threads), but
//!   never glibc's SIGCANCEL and SIGSETXID (or `setuid` in any thread would wait for it forever);
//! - can be stopped and started again (around `unshare(CLONE_NEWUSER)` and `setns`, which the
//!   kernel refuses to a multithreaded process).

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::lock::Mutex;
use super::mark::InRuntime;
use crate::sigsafe::{sys, thread};

/// Bytes of a runtime thread's stack.
const STACK: usize = 512 * 1024;

/// Why a runtime thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot map a stack for thread {name}: {errno}")]
    Stack { name: &'static str, errno: sys::Errno },
    #[error("cannot start thread {name}: pthread_create: {}", sys::errno_text(*.code))]
    Create { name: &'static str, code: i32 },
    #[error("too many runtime threads")]
    Full,
    #[error("thread {name} is not started: the program installed a seccomp filter")]
    Retired { name: &'static str },
}

/// A runtime thread's body: runs until `stopping()` says so, then returns.
pub type Body = fn();

struct Running {
    name: &'static str,
    body: Body,
    thread: libc::pthread_t,
    stack: usize,
    tid: &'static AtomicI32,
}

struct Threads {
    running: Vec<Running>,
    /// Stopped by `stop_all`, to start again in `start_all`.
    stopped: Vec<(&'static str, Body)>,
}

static THREADS: Mutex<Threads> = Mutex::new(Threads { running: Vec::new(), stopped: Vec::new() });
static STOPPING: AtomicBool = AtomicBool::new(false);
/// No runtime thread may start any more in this process (nor in its forked children): the
/// program installed a seccomp filter (see hooks::creds).
static RETIRED: AtomicBool = AtomicBool::new(false);

/// Have the runtime threads ended for good?
pub fn retired() -> bool {
    RETIRED.load(Ordering::Acquire)
}

/// No runtime thread starts again: the stopped ones are forgotten, and [`spawn`] refuses. True the
/// first time. Makes no system call (it may run where only `read`, `write` and `exit` are left),
/// and is meant for a process whose threads [`stop_all`] stopped.
pub fn retire() -> bool {
    if RETIRED.swap(true, Ordering::AcqRel) {
        return false;
    }
    THREADS.lock().stopped.clear();
    true
}

/// Runtime thread bodies poll this and return when it is set.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

struct Start {
    name: &'static str,
    body: Body,
    tid: &'static AtomicI32,
}

extern "C" fn start(arg: *mut c_void) -> *mut c_void {
    InRuntime::for_life();
    // SAFETY: `arg` is the Box<Start> leaked by `spawn`, handed to this thread alone.
    let s = unsafe { Box::from_raw(arg as *mut Start) };
    s.tid.store(sys::gettid(), Ordering::Release);
    let mut name = [0u8; 16];
    for (d, b) in name.iter_mut().zip(s.name.bytes().take(15)) {
        *d = b;
    }
    // SAFETY: PR_SET_NAME reads a 16-byte NUL-terminated name.
    let _ = unsafe {
        sys::call(libc::SYS_prctl, [libc::PR_SET_NAME as usize, name.as_ptr() as usize, 0, 0, 0, 0])
    };
    (s.body)();
    core::ptr::null_mut()
}

/// Start a runtime thread running `body`.
pub fn spawn(name: &'static str, body: Body) -> Result<(), SpawnError> {
    let mut threads = THREADS.lock();
    spawn_locked(&mut threads, name, body)
}

fn spawn_locked(threads: &mut Threads, name: &'static str, body: Body) -> Result<(), SpawnError> {
    if retired() {
        return Err(SpawnError::Retired { name });
    }
    let stack = sys::mmap_far(STACK, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_NORESERVE)
        .map_err(|errno| SpawnError::Stack { name, errno })?;
    if !thread::add_runtime_stack(stack as u64, (stack + STACK) as u64) {
        // SAFETY: the stack was never used.
        unsafe { sys::munmap(stack, STACK) };
        return Err(SpawnError::Full);
    }
    let tid: &'static AtomicI32 = Box::leak(Box::new(AtomicI32::new(0)));
    let arg = Box::into_raw(Box::new(Start { name, body, tid })) as *mut c_void;
    // The new thread inherits this mask: it never takes one of the program's signals, not even
    // before its start routine runs.
    let mut old = 0u64;
    let _ = sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&!sys::ALWAYS_OPEN), Some(&mut old));
    // SAFETY: attr is initialised before use and destroyed after; the stack is ours, unused, and
    // STACK bytes long; `start` matches pthread's start routine type.
    let (code, t) = unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstack(&mut attr, stack as *mut c_void, STACK);
        let mut t: libc::pthread_t = 0;
        let code = libc::pthread_create(&mut t, &attr, start, arg);
        libc::pthread_attr_destroy(&mut attr);
        (code, t)
    };
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&old), None);
    if code != 0 {
        // SAFETY: the thread was not created: `arg` and the stack are still ours alone.
        unsafe {
            drop(Box::from_raw(arg as *mut Start));
            thread::remove_runtime_stack(stack as u64);
            sys::munmap(stack, STACK);
        }
        return Err(SpawnError::Create { name, code });
    }
    threads.running.push(Running { name, body, thread: t, stack, tid });
    Ok(())
}

/// Stop every runtime thread and wait until the kernel has forgotten them (so that the process is
/// single-threaded again, if the program's own threads allow). Their bodies are kept for
/// [`start_all`]. Returns how many were stopped.
pub fn stop_all() -> usize {
    let mut threads = THREADS.lock();
    if threads.running.is_empty() {
        return 0;
    }
    STOPPING.store(true, Ordering::Release);
    crate::runtime::wake_all();
    let pid = sys::getpid();
    let running = core::mem::take(&mut threads.running);
    let n = running.len();
    for r in running {
        // SAFETY: a joinable thread we created and nobody else joins.
        unsafe { libc::pthread_join(r.thread, core::ptr::null_mut()) };
        // pthread_join returns when the thread's tid is cleared, a moment before the kernel takes
        // it out of the thread group: wait for that too.
        let tid = r.tid.load(Ordering::Acquire);
        for _ in 0..10_000 {
            if tid == 0 || !sys::thread_alive(pid, tid) {
                break;
            }
            sys::sched_yield();
        }
        thread::remove_runtime_stack(r.stack as u64);
        // SAFETY: the thread is gone: nothing runs on its stack any more.
        unsafe { sys::munmap(r.stack, STACK) };
        threads.stopped.push((r.name, r.body));
    }
    STOPPING.store(false, Ordering::Release);
    n
}

/// Start again the threads [`stop_all`] stopped.
pub fn start_all() -> Vec<SpawnError> {
    let mut threads = THREADS.lock();
    let stopped = core::mem::take(&mut threads.stopped);
    stopped
        .into_iter()
        .filter_map(|(name, body)| spawn_locked(&mut threads, name, body).err())
        .collect()
}

/// In a forked child: the parent's runtime threads do not exist here.
pub(super) fn forget_after_fork() {
    // SAFETY: the child has one thread, which held this lock across fork (runtime::fork).
    let threads = unsafe { THREADS.get_locked() };
    for r in threads.running.drain(..) {
        thread::remove_runtime_stack(r.stack as u64);
        // SAFETY: the parent's thread does not exist in the child; its stack is a dead copy.
        unsafe { sys::munmap(r.stack, STACK) };
    }
    threads.stopped.clear();
}

pub(super) fn lock_for_fork() {
    THREADS.lock_raw();
}

/// # Safety
/// Taken by [`lock_for_fork`] on this thread.
pub(super) unsafe fn unlock_after_fork() {
    // SAFETY: the caller's contract.
    unsafe { THREADS.unlock_raw() };
}

/// Is the runtime thread of this name running?
pub fn running(name: &str) -> bool {
    THREADS.lock().running.iter().any(|r| r.name == name)
}

/// Is any runtime thread running?
pub fn any_running() -> bool {
    !THREADS.lock().running.is_empty()
}
