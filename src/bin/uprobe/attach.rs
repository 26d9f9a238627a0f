//! `uprobe attach`: load libuprobe.so into a running process with ptrace, without a restart.
//!
//! One thread of the target is seized and interrupted, and made to call `dlopen` on libuprobe.so;
//! then every register it had (and its whole vector state) is put back and it is let go. The
//! library's constructor starts its control socket, as in a preloaded process.
//!
//! What keeps the target unharmed:
//! - the thread chosen is one that holds none of the locks `dlopen` takes: a thread blocked in a
//!   plain system call (`read`, `poll`, `nanosleep`...), or one running the program's own code,
//!   not libc's or the loader's (a thread interrupted inside `malloc` would deadlock on itself);
//! - a system call the thread was blocked in is restarted afterwards as the kernel would have
//!   (its registers, `orig_rax` included, are restored exactly): the program sees no EINTR and
//!   loses no data; the injected call itself runs with `orig_rax = -1`, so that the kernel does not
//!   "restart" it;
//! - a signal that arrives for that thread while it runs the call is held back and sent again
//!   after; a process that was stopped (SIGSTOP) is stopped again when let go;
//! - everything is checked first, and said plainly: permissions (same user or root, Yama's
//!   ptrace_scope), a debugger already attached, a static or 32-bit program, a seccomp filter, a
//!   process that exits meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

/// What `attach` found or did.
pub enum Attached {
    /// libuprobe was already in the process (preloaded, or attached before).
    Already,
    /// Loaded now.
    Loaded,
}

/// System calls a thread can be blocked in without holding a lock `dlopen` needs.
const SAFE_SYSCALLS: &[i64] = &[
    0,   // read
    1,   // write
    7,   // poll
    17,  // pread64
    19,  // readv
    23,  // select
    34,  // pause
    35,  // nanosleep
    43,  // accept
    45,  // recvfrom
    47,  // recvmsg
    61,  // wait4
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    202, // futex (a thread waiting on a condition or a join holds no libc lock)
    230, // clock_nanosleep
    232, // epoll_wait
    247, // waitid
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    288, // accept4
    441, // epoll_pwait2
];

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
}

/// A mapping of the target: (start, end, file offset, path).
struct Map {
    start: u64,
    end: u64,
    offset: u64,
    exec: bool,
    path: String,
}

fn maps(pid: i32) -> Result<Vec<Map>, String> {
    let text = read(&format!("/proc/{pid}/maps"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (lo, hi) = f.first()?.split_once('-')?;
            Some(Map {
                start: u64::from_str_radix(lo, 16).ok()?,
                end: u64::from_str_radix(hi, 16).ok()?,
                offset: u64::from_str_radix(f.get(2)?, 16).ok()?,
                exec: f.get(1)?.contains('x'),
                path: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect())
}

/// Why ptrace is refused, as precisely as can be told.
/// Is process `pid` exiting, and how it shows: gone, a zombie, or (`exe_readable`: where its
/// executable could be read at all) no executable left, which an exit releases with its memory.
fn exiting(pid: i32, exe_readable: bool) -> Option<&'static str> {
    let status = read(&format!("/proc/{pid}/status")).unwrap_or_default();
    let state = status_field(&status, "State:").unwrap_or_default();
    if status.is_empty() || state.starts_with('Z') || state.starts_with('X') {
        return Some("the process exited");
    }
    if exe_readable && std::fs::read_link(format!("/proc/{pid}/exe")).is_err() {
        return Some("the process exited (it has no memory left)");
    }
    None
}

fn why_no_ptrace(pid: i32, errno: i32) -> String {
    let status = read(&format!("/proc/{pid}/status")).unwrap_or_default();
    let target_uid: u32 = status_field(&status, "Uid:")
        .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        .unwrap_or(0);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let base = format!(
        "cannot attach to process {pid}: ptrace: {}",
        std::io::Error::from_raw_os_error(errno)
    );
    if errno != libc::EPERM {
        return base;
    }
    // A process that is exiting has let go of its memory, and ptrace calls that not dumpable.
    // Root is refused only then (or by Yama's scope 3, or a security module): an exit under way
    // shows within moments (a zombie, no memory), so root looks a few times before saying more.
    let looks = if me == 0 && scope != Some(3) { 40 } else { 1 };
    for look in 0..looks {
        if look > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(how) = exiting(pid, me == 0) {
            return format!("{base}: {how}");
        }
    }
    if me != 0 && target_uid != me {
        return format!(
            "{base}: the process belongs to uid {target_uid}; attaching needs the same user, or root \
             (CAP_SYS_PTRACE)"
        );
    }
    match scope {
        Some(3) => format!(
            "{base}: Yama's kernel.yama.ptrace_scope is 3: no process may be attached to, by anyone, \
             until reboot"
        ),
        Some(2) if me != 0 => format!(
            "{base}: Yama's kernel.yama.ptrace_scope is 2: only root (CAP_SYS_PTRACE) may attach"
        ),
        Some(1) if me != 0 => format!(
            "{base}: Yama's kernel.yama.ptrace_scope is 1: only a process's ancestors may attach to \
             it; run as root, or `sysctl kernel.yama.ptrace_scope=0`, or have the program allow it \
             with prctl(PR_SET_PTRACER)"
        ),
        // Root is not held back by dumpability: what refuses it is a security module.
        _ if me == 0 => format!(
            "{base}: root was refused, and the process is not exiting: a security module \
             (AppArmor, SELinux) forbids tracing it"
        ),
        _ => format!(
            "{base}: the process may not be dumpable (a setuid program, or prctl(PR_SET_DUMPABLE, \
             0)); only root can attach to it"
        ),
    }
}

/// The checks before any ptrace: Ok(Some(Attached::Already)) when libuprobe is already loaded.
fn check(pid: i32, force: bool) -> Result<(Vec<Map>, String), String> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("there is no process {pid}"));
    }
    let status = read(&format!("/proc/{pid}/status"))?;
    let mut maps = match maps(pid) {
        Ok(m) => m,
        // Another user's process (or one not dumpable): say so as ptrace would.
        Err(_) => return Err(why_no_ptrace(pid, libc::EPERM)),
    };
    // A process that has just started has its loader mapped and not yet libc: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !maps.iter().any(is_libc) && maps.iter().any(is_loader) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        maps = self::maps(pid).map_err(|_| format!("process {pid} exited"))?;
    }
    if let Some(tracer) = status_field(&status, "TracerPid:").filter(|t| t != "0") {
        let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm")).unwrap_or_default();
        return Err(format!(
            "process {pid} is already traced by process {tracer} ({}): a debugger? detach it first",
            comm.trim()
        ));
    }
    match status_field(&status, "Seccomp:").as_deref() {
        Some("1") => {
            return Err(format!(
            "process {pid} runs in seccomp strict mode: it may make no system call libuprobe needs"
        ))
        }
        Some("2") if !force => {
            return Err(format!(
                "process {pid} runs under a seccomp filter, which may refuse (or kill the process \
                 for) the system calls loading libuprobe makes (mmap, openat, clone, socket...); \
                 --force tries anyway"
            ))
        }
        _ => {}
    }
    let exe = std::fs::read(format!("/proc/{pid}/exe")).map_err(|e| {
        format!("cannot read process {pid}'s executable: {e} (another user's process?)")
    })?;
    if exe.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(format!("process {pid}'s executable is not an ELF file"));
    }
    if exe.get(4) != Some(&2) || exe.get(18..20) != Some([62u8, 0].as_slice()) {
        return Err(format!(
            "process {pid} is not a 64-bit x86-64 program (libuprobe is): a 32-bit program cannot \
             load it"
        ));
    }
    let libc = maps.iter().find(|m| is_libc(m)).map(|m| m.path.clone());
    let Some(libc) = libc else {
        // A process that is exiting has let go of its memory: no mapping at all (a static
        // program has its own), or see `exiting` (its maps were readable: so is its executable).
        if maps.is_empty() || exiting(pid, true).is_some() {
            return Err(format!("process {pid} exited"));
        }
        if maps.iter().any(is_loader) {
            return Err(format!(
                "process {pid} has its dynamic loader but no libc mapped: it does not use libc, \
                 or is still starting; libuprobe.so is loaded with libc's dlopen"
            ));
        }
        return Err(format!(
            "process {pid} has no libc mapped: a statically linked program has no dynamic loader \
             to load libuprobe.so with"
        ));
    };
    Ok((maps, libc))
}

/// The address of `dlopen` (or `dlerror`) in the target: its libc's symbol plus where libc is
/// mapped. glibc 2.34 and later have `dlopen` in libc itself.
fn symbol_address(pid: i32, maps: &[Map], libc: &str, name: &str) -> Result<u64, String> {
    let base = maps
        .iter()
        .filter(|m| m.path == libc)
        .map(|m| m.start - m.offset)
        .min()
        .ok_or_else(|| format!("libc is not mapped in process {pid}"))?;
    let path = format!("/proc/{pid}/root{libc}");
    let bytes = std::fs::read(&path)
        .or_else(|_| std::fs::read(libc))
        .map_err(|e| format!("cannot read {libc}: {e}"))?;
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| format!("{libc}: {e}"))?;
    let sym = elf
        .dynsyms
        .iter()
        .filter(|s| s.st_value != 0 && s.is_function())
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some(name))
        .ok_or_else(|| {
            format!(
                "{libc} has no `{name}` (glibc before 2.34 keeps dlopen in libdl, which the \
                 program has not loaded)"
            )
        })?;
    Ok(base + sym.st_value)
}

/// The thread to borrow: one blocked in a system call that holds no lock `dlopen` needs.
fn candidate_threads(pid: i32) -> Vec<i32> {
    let mut safe = Vec::new();
    let mut others = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![pid] };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let sc =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).unwrap_or_default();
        match sc.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()) {
            Some(n) if SAFE_SYSCALLS.contains(&n) => safe.push(tid),
            _ => others.push(tid),
        }
    }
    safe.sort();
    others.sort();
    safe.extend(others);
    safe
}

fn errno_text(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

fn ptrace(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> Result<i64, i32> {
    // SAFETY: ptrace requests on a thread we seized, with pointers to our own buffers where the
    // request takes one.
    let r = unsafe { libc::ptrace(req, tid, addr, data) };
    if r == -1 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(r)
    }
}

/// Wait for a stop of `tid`; Err with a message if it exited.
fn wait_stop(tid: i32) -> Result<i32, String> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid with a valid pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("waiting for thread {tid}: {e}"));
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err("the process exited during the attach".into());
        }
        return Ok(status);
    }
}

/// The whole register state of a stopped thread: general registers and the XSAVE area.
struct Saved {
    regs: libc::user_regs_struct,
    xstate: Vec<u8>,
}

const NT_X86_XSTATE: usize = 0x202;

fn save(tid: i32) -> Result<Saved, String> {
    // SAFETY: zeroed user_regs_struct is valid.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize)
        .map_err(|e| format!("GETREGS: {}", std::io::Error::from_raw_os_error(e)))?;
    let mut xstate = vec![0u8; 16384];
    let mut iov = libc::iovec { iov_base: xstate.as_mut_ptr().cast(), iov_len: xstate.len() };
    ptrace(libc::PTRACE_GETREGSET, tid, NT_X86_XSTATE, &mut iov as *mut _ as usize)
        .map_err(|e| format!("GETREGSET: {}", std::io::Error::from_raw_os_error(e)))?;
    xstate.truncate(iov.iov_len);
    Ok(Saved { regs, xstate })
}

fn restore(tid: i32, s: &Saved) -> Result<(), String> {
    ptrace(libc::PTRACE_SETREGS, tid, 0, &s.regs as *const _ as usize)
        .map_err(|e| format!("SETREGS: {}", std::io::Error::from_raw_os_error(e)))?;
    let mut x = s.xstate.clone();
    let mut iov = libc::iovec { iov_base: x.as_mut_ptr().cast(), iov_len: x.len() };
    ptrace(libc::PTRACE_SETREGSET, tid, NT_X86_XSTATE, &mut iov as *mut _ as usize)
        .map_err(|e| format!("SETREGSET: {}", std::io::Error::from_raw_os_error(e)))?;
    Ok(())
}

fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("cannot open /proc/{pid}/mem: {e}"))?;
    f.write_all_at(data, addr).map_err(|e| format!("cannot write process {pid}'s memory: {e}"))
}

fn read_cstring(pid: i32, addr: u64) -> String {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/mem")) else { return String::new() };
    let mut buf = vec![0u8; 512];
    let n = f.read_at(&mut buf, addr).unwrap_or(0);
    buf.truncate(n);
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn file_name(m: &Map) -> &str {
    m.path.rsplit('/').next().unwrap_or("")
}

fn is_libc(m: &Map) -> bool {
    let name = file_name(m);
    name.starts_with("libc.so") || name.starts_with("libc-")
}

fn is_loader(m: &Map) -> bool {
    file_name(m).starts_with("ld-linux")
}

/// Is `rip` in libc's or the loader's code (where a thread may hold their locks)?
fn in_libc_or_loader(maps: &[Map], rip: u64) -> bool {
    maps.iter().any(|m| m.exec && m.start <= rip && rip < m.end && (is_libc(m) || is_loader(m)))
}

/// Signals that mean the code the thread runs went wrong: left unblocked while we call, since
/// the kernel resets the handler of a fault signal it finds blocked. The end of a call is itself a
/// SIGSEGV (its return to address 0).
const FAULTS: [i32; 6] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGSYS];

/// Every signal but the faults, as a kernel sigset: what the thread blocks while it runs our call,
/// so that a signal sent to it meanwhile waits, with its own siginfo, for the program's code.
fn call_mask() -> u64 {
    FAULTS.iter().fold(!0u64, |m, &s| m & !(1u64 << (s - 1)))
}

/// Wait for the stop that PTRACE_INTERRUPT asked for. A signal the thread was about to take (a
/// fault of its own, a signal sent to it) stops it first: it is delivered as it would have been,
/// never swallowed, and we wait on.
fn wait_interrupt(tid: i32) -> Result<(), String> {
    loop {
        let status = wait_stop(tid)?;
        if status >> 16 == libc::PTRACE_EVENT_STOP {
            return Ok(());
        }
        let sig = libc::WSTOPSIG(status) as usize;
        ptrace(libc::PTRACE_CONT, tid, 0, sig)
            .map_err(|e| format!("CONT: {}", std::io::Error::from_raw_os_error(e)))?;
    }
}

/// Signals waiting for `tid` that it does not block: the thread is at an instruction that
/// faulted, or has a signal to take before it runs anything else.
fn pending_unblocked(pid: i32, tid: i32) -> bool {
    let status = read(&format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let mask = |name| {
        status_field(&status, name).and_then(|v| u64::from_str_radix(&v, 16).ok()).unwrap_or(0)
    };
    mask("SigPnd:") & !mask("SigBlk:") != 0
}

fn siginfo(tid: i32) -> Result<libc::siginfo_t, String> {
    // SAFETY: zeroed siginfo_t is valid.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETSIGINFO, tid, 0, &mut si as *mut _ as usize)
        .map_err(|e| format!("GETSIGINFO: {}", std::io::Error::from_raw_os_error(e)))?;
    Ok(si)
}

/// Give `tid` back a signal that was sent to it while it ran our call, as near as the kernel
/// lets another process send it: with its siginfo where it was queued (SI_QUEUE and the like),
/// else as a tgkill.
fn send_again(pid: i32, tid: i32, si: &libc::siginfo_t) {
    if si.si_code < 0 && si.si_code != libc::SI_TKILL {
        // SAFETY: rt_tgsigqueueinfo with a siginfo the kernel gave us.
        let r = unsafe {
            libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, si.si_signo, si as *const _)
        };
        if r == 0 {
            return;
        }
    }
    // SAFETY: tgkill to the thread that was to get the signal.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, si.si_signo) };
}

/// Call `func(arg0, arg1)` on the stopped thread `tid`, which must have been saved and must block
/// every signal but FAULTS; returns rax. A fault signal that someone sent it meanwhile is held in
/// `held`, to be sent again once the thread is the program's again; a trap the code we call takes
/// (an int3 of a debugger, or of libuprobe itself) goes to its handler as it would.
fn call(
    pid: i32,
    tid: i32,
    saved: &Saved,
    stack_top: u64,
    func: u64,
    args: [u64; 2],
    held: &mut Vec<libc::siginfo_t>,
) -> Result<u64, String> {
    let mut regs = saved.regs;
    // Below `stack_top` (itself below the red zone), 16-aligned, with a return address of 0: the
    // return faults, and the fault is the end of the call.
    let sp = (stack_top - 64) & !15;
    write_mem(pid, sp - 8, &0u64.to_le_bytes())?;
    regs.rsp = sp - 8;
    regs.rip = func;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rax = 0;
    regs.orig_rax = u64::MAX; // no system call to restart
    regs.eflags &= !(0x400 | 0x100); // DF and TF clear, as a call expects
    ptrace(libc::PTRACE_SETREGS, tid, 0, &regs as *const _ as usize)
        .map_err(|e| format!("SETREGS: {}", std::io::Error::from_raw_os_error(e)))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sig = 0usize;
    loop {
        ptrace(libc::PTRACE_CONT, tid, 0, sig)
            .map_err(|e| format!("CONT: {}", std::io::Error::from_raw_os_error(e)))?;
        sig = 0;
        let status = wait_stop(tid)?;
        if Instant::now() > deadline {
            return Err("the call did not return within 20 s".into());
        }
        if status >> 16 != 0 {
            // A ptrace event stop (a group stop while we run): go on.
            continue;
        }
        let stopsig = libc::WSTOPSIG(status);
        let si = siginfo(tid)?;
        if si.si_code <= 0 {
            // Sent by someone (kill, tgkill, sigqueue): theirs to have after the call.
            held.push(si);
            continue;
        }
        // SAFETY: zeroed user_regs_struct is valid.
        let mut now: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        ptrace(libc::PTRACE_GETREGS, tid, 0, &mut now as *mut _ as usize)
            .map_err(|e| format!("GETREGS: {}", std::io::Error::from_raw_os_error(e)))?;
        if stopsig == libc::SIGSEGV && now.rip == 0 {
            return Ok(now.rax);
        }
        if stopsig == libc::SIGTRAP {
            sig = stopsig as usize;
            continue;
        }
        // A real fault in the call: give up; the caller puts every register back.
        return Err(format!(
            "the call faulted in the process (signal {stopsig} at {:#x})",
            now.rip
        ));
    }
}

/// Load `lib` into process `pid`.
pub fn attach(pid: i32, lib: &Path, force: bool) -> Result<Attached, String> {
    let (maps, libc) = check(pid, force)?;
    let lib_name = lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if maps
        .iter()
        .any(|m| m.path.ends_with(&format!("/{lib_name}")) || m.path.ends_with("/libuprobe.so"))
    {
        return Ok(Attached::Already);
    }
    let dlopen = symbol_address(pid, &maps, &libc, "dlopen")?;
    let dlerror = symbol_address(pid, &maps, &libc, "dlerror")?;
    let lib = std::fs::canonicalize(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    let stopped = read(&format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_field(&s, "State:"))
        .is_some_and(|s| s.starts_with('T'));
    let mut last_error = String::new();
    // A few rounds: a thread that was busy inside libc is let go and tried again later.
    for round in 0..20 {
        for tid in candidate_threads(pid) {
            match try_thread(pid, tid, &maps, &lib, dlopen, dlerror, stopped) {
                Ok(()) => return Ok(Attached::Loaded),
                Err(Retry::Busy) => last_error = format!("thread {tid} was busy inside libc"),
                Err(Retry::Fatal(e)) => return Err(e),
            }
        }
        std::thread::sleep(Duration::from_millis(20 + 10 * round));
    }
    Err(format!(
        "cannot attach to process {pid}: every thread was busy inside libc or the loader each time \
         it was looked at ({last_error}); try again"
    ))
}

enum Retry {
    /// The thread may hold a lock of libc's: not this one, not now.
    Busy,
    Fatal(String),
}

fn try_thread(
    pid: i32,
    tid: i32,
    maps: &[Map],
    lib: &Path,
    dlopen: u64,
    dlerror: u64,
    stopped: bool,
) -> Result<(), Retry> {
    if let Err(e) = ptrace(libc::PTRACE_SEIZE, tid, 0, 0) {
        if e == libc::ESRCH {
            return Err(Retry::Busy); // that thread just exited
        }
        return Err(Retry::Fatal(why_no_ptrace(pid, e)));
    }
    let result = (|| -> Result<(), Retry> {
        ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).map_err(|e| {
            Retry::Fatal(format!("PTRACE_INTERRUPT: {}", std::io::Error::from_raw_os_error(e)))
        })?;
        wait_interrupt(tid).map_err(Retry::Fatal)?;
        if pending_unblocked(pid, tid) {
            // It has a signal to take first (a fault at the instruction it stopped at, as a JIT's
            // guard page gives): let it take it, and come back.
            return Err(Retry::Busy);
        }
        let saved = save(tid).map_err(Retry::Fatal)?;
        // In a system call (orig_rax >= 0) that holds no lock, or in the program's own code.
        let in_syscall = saved.regs.orig_rax as i64 >= 0;
        let safe = if in_syscall {
            SAFE_SYSCALLS.contains(&(saved.regs.orig_rax as i64))
        } else {
            !in_libc_or_loader(maps, saved.regs.rip)
        };
        if !safe {
            return Err(Retry::Busy);
        }
        let mut held = Vec::new();
        let mut program_mask = 0u64;
        ptrace(libc::PTRACE_GETSIGMASK, tid, 8, &mut program_mask as *mut u64 as usize)
            .map_err(|e| Retry::Fatal(format!("GETSIGMASK: {}", errno_text(e))))?;
        let blocked = call_mask();
        ptrace(libc::PTRACE_SETSIGMASK, tid, 8, &blocked as *const u64 as usize)
            .map_err(|e| Retry::Fatal(format!("SETSIGMASK: {}", errno_text(e))))?;
        // The path, on the thread's stack just below its red zone; the call's stack below it.
        let path = format!("{}\0", lib.display());
        let at = (saved.regs.rsp - 128 - path.len() as u64) & !15;
        let flags = (libc::RTLD_NOW | libc::RTLD_LOCAL) as u64;
        let outcome = write_mem(pid, at, path.as_bytes())
            .and_then(|()| call(pid, tid, &saved, at, dlopen, [at, flags], &mut held))
            .and_then(|handle| {
                if handle != 0 {
                    return Ok(());
                }
                let msg = call(pid, tid, &saved, at, dlerror, [0, 0], &mut held)
                    .map(|p| if p == 0 { String::new() } else { read_cstring(pid, p) })
                    .unwrap_or_default();
                Err(format!("dlopen of {} failed in process {pid}: {msg}", lib.display()))
            });
        // Every register back, whatever happened: a system call it was in restarts.
        restore(tid, &saved).map_err(Retry::Fatal)?;
        ptrace(libc::PTRACE_SETSIGMASK, tid, 8, &program_mask as *const u64 as usize)
            .map_err(|e| Retry::Fatal(format!("SETSIGMASK: {}", errno_text(e))))?;
        for si in &held {
            send_again(pid, tid, si);
        }
        outcome.map_err(Retry::Fatal)
    })();
    if stopped {
        // It was stopped: it stays stopped once let go.
        // SAFETY: kill with a valid signal.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0);
    result
}

/// Wait for the socket of `pid` to appear (the library's constructor starts it).
pub fn wait_socket<T>(find: impl Fn() -> Option<T>, timeout: Duration) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = find() {
            return Some(p);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
