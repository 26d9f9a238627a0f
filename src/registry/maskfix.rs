//! libuprobe's own probes: the link-map hook (see hooks::dl), and the mask fixes.
//!
//! A trap taken where SIGTRAP is blocked kills the process (the kernel forces a blocked synchronous
//! signal). libuprobe keeps SIGTRAP out of every signal mask the program sets through libc's
//! functions (hooks::signals); but glibc itself blocks every signal with raw system calls: in
//! `pthread_create` (the new thread starts with everything blocked), at a thread's exit, in
//! `posix_spawn` (whose child also resets the handlers of every blocked signal), in `setcontext`,
//! `abort`... Whatever probe the user asks for, by name or by address, may run in those windows.
//! So, by construction rather than by a list of functions, libuprobe puts a probe of its own on
//! every such system call in libc (`rt_sigprocmask`, `rt_sigsuspend`, `ppoll`, `epoll_pwait`,
//! `epoll_pwait2`), found by scanning libc's code for `mov eax, NR` ... `syscall`, whose hit
//! passes the kernel a copy of the set without SIGTRAP (`sigsafe::trap::fix_mask`); and on the
//! `rt_sigreturn` of glibc's signal restorer, whose hit takes SIGTRAP out of the mask a signal
//! handler may have put in its context. SIGTRAP is then
//! never blocked, and the posix_spawn child keeps libuprobe's handler (it only resets the handlers
//! of blocked signals).

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};

use super::{MaskFix, Registry, Site, SiteKey};
use crate::error::ProbeError;
use crate::objects::{self, MapEntry};
use crate::sigsafe::table::NO_COUNTER;
use crate::sigsafe::trap::{self, MASK_HOW_IN_RDI, MASK_IN_FRAME, NO_SIZE_REG};
use crate::xol::jump::Counters;

/// What became of the mask fixes in this process.
#[derive(Default, Debug, Clone)]
pub enum State {
    /// libc is not mapped yet (or no probe was asked for yet).
    #[default]
    NotYet,
    /// Installed at this many system calls.
    Installed(usize),
    /// Could not be installed: why.
    Failed(String),
}

/// System calls that take a signal set: (number, register of the set, register of its size,
/// `how` in rdi).
const CALLS: &[(u32, i32, i32, bool)] = &[
    (14, libc::REG_RSI, libc::REG_R10, true), // rt_sigprocmask(how, set, old, 8)
    (130, libc::REG_RDI, libc::REG_RSI, false), // rt_sigsuspend(set, 8)
    (271, libc::REG_R10, libc::REG_R8, false), // ppoll(fds, n, timeout, set, 8)
    (281, libc::REG_R8, libc::REG_R9, false), // epoll_pwait(fd, ev, n, timeout, set, 8)
    (441, libc::REG_R8, libc::REG_R9, false), // epoll_pwait2(fd, ev, n, timeout, set, 8)
];

/// The `syscall` instructions in `code` (a file's executable bytes starting at file offset
/// `base`) that are one of [`CALLS`]: `mov eax, NR` followed, within a few instructions that
/// neither branch nor write rax, by `syscall`. Returns (file offset of the syscall, fix).
pub fn find_sites(code: &[u8], base: u64) -> Vec<(u64, MaskFix)> {
    let mut out = Vec::new();
    for sc in memchr::memmem::find_iter(code, &[0x0f, 0x05]) {
        // glibc's signal restorer, __restore_rt: `mov rax, 15; syscall` (rt_sigreturn).
        if sc >= 7 && code[sc - 7..sc] == [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00] {
            out.push((
                base + sc as u64,
                MaskFix { mask_reg: MASK_IN_FRAME, size_reg: NO_SIZE_REG },
            ));
            continue;
        }
        'back: for back in 5..=24usize {
            let Some(start) = sc.checked_sub(back) else { break };
            if code[start] != 0xb8 {
                continue;
            }
            let nr = u32::from_le_bytes([
                code[start + 1],
                code[start + 2],
                code[start + 3],
                code[start + 4],
            ]);
            let Some(&(_, set, size, how)) = CALLS.iter().find(|c| c.0 == nr) else { continue };
            let mut d = Decoder::with_ip(64, &code[start..sc + 2], 0, DecoderOptions::NONE);
            let mut first = true;
            while d.can_decode() {
                let ip = d.ip() as usize;
                let insn = d.decode();
                if insn.is_invalid() {
                    continue 'back;
                }
                if start + ip == sc {
                    if insn.mnemonic() != Mnemonic::Syscall {
                        continue 'back;
                    }
                    let mask_reg = set as u8 | if how { MASK_HOW_IN_RDI } else { 0 };
                    out.push((base + sc as u64, MaskFix { mask_reg, size_reg: size as u8 }));
                    break 'back;
                }
                if first {
                    first = false;
                    continue; // the mov itself
                }
                let writes_rax = insn.op0_kind() == OpKind::Register
                    && insn.op0_register().full_register() == Register::RAX;
                let plain = matches!(
                    insn.mnemonic(),
                    Mnemonic::Mov | Mnemonic::Lea | Mnemonic::Movq | Mnemonic::Xor
                );
                if insn.flow_control() != FlowControl::Next || writes_rax || !plain {
                    continue 'back;
                }
            }
        }
    }
    out
}

/// Is there, at file offset `off` of `elf`, the system call [`find_sites`] finds, with `fix`?
fn site_holds(elf: &objects::ElfFile, off: u64, fix: MaskFix) -> bool {
    let from = off.saturating_sub(24);
    let Ok(code) = elf.bytes_at(from, (off + 2 - from) as usize) else { return false };
    find_sites(code, from)
        .iter()
        .any(|&(o, f)| o == off && f.mask_reg == fix.mask_reg && f.size_reg == fix.size_reg)
}

fn encode_sites(found: &[(u64, MaskFix)]) -> Vec<u8> {
    let mut w = crate::objects::cache::Writer::default();
    w.u64(found.len() as u64);
    for (off, f) in found {
        w.u64(*off);
        w.u8(f.mask_reg);
        w.u8(f.size_reg);
    }
    w.0
}

fn decode_sites(data: &[u8]) -> Option<Vec<(u64, MaskFix)>> {
    let mut r = crate::objects::cache::Reader(data);
    let n = r.count(10)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (off, mask_reg, size_reg) = (r.u64()?, r.u8()?, r.u8()?);
        out.push((off, MaskFix { mask_reg, size_reg }));
    }
    r.0.is_empty().then_some(out)
}

impl Registry {
    /// Install the mask fixes in libc, once, before the first probe is written and before any
    /// runtime thread starts (a thread inside glibc's thread-start window, every signal blocked,
    /// would trap on a fix installed under it).
    pub fn ensure_mask_fix(&mut self, maps: &[MapEntry]) {
        if !matches!(self.mask_fix, State::NotYet) {
            return;
        }
        self.pristine = None;
        let loaded = objects::loaded_objects(maps);
        let Some(libc) = loaded.into_iter().find(|o| {
            let name = o.path.rsplit('/').next().unwrap_or("");
            name.starts_with("libc.so") || name.starts_with("libc-")
        }) else {
            return;
        };
        let elf = match self.resolver.elf(&libc, maps) {
            Ok(e) => e,
            Err(e) => {
                self.mask_fix = State::Failed(e.to_string());
                return;
            }
        };
        // Scanned in the file's bytes, not in memory: the program's own probes may be written
        // there already (on the jump path they go first), and a jump over a `mov eax, NR` would
        // hide its system call. Once per libc file: kept in the cache.
        let cached = elf.cached("maskfix").and_then(|c| decode_sites(&c));
        // Each cached site is checked in the file's bytes, as the scan would find it, before a
        // probe goes there: a damaged entry is scanned again.
        let cached =
            cached.filter(|found| found.iter().all(|&(off, fix)| site_holds(&elf, off, fix)));
        let found = match cached {
            Some(found) => found,
            None => {
                let mut found = Vec::new();
                for m in maps.iter().filter(|m| m.file == Some(libc.id) && m.is_exec()) {
                    let code = match elf.bytes_at(m.offset, (m.end - m.start) as usize) {
                        Ok(c) => c,
                        Err(e) => {
                            self.mask_fix = State::Failed(e.to_string());
                            return;
                        }
                    };
                    found.extend(find_sites(code, m.offset));
                }
                elf.cache("maskfix", &encode_sites(&found));
                found
            }
        };
        if found.is_empty() {
            self.mask_fix = State::Failed("no system call with a signal set found in libc".into());
            return;
        }
        let mut new_installs = Vec::new();
        let mut n = 0;
        for (offset, fix) in found {
            let key = SiteKey { file: libc.id, offset };
            if let Some(site) = self.sites.get_mut(&key) {
                site.mask_fix = Some(fix);
                n += 1;
                continue;
            }
            match self.plan_site(key, maps, Counters::NONE, true) {
                Ok(installs) => {
                    new_installs.extend(installs.iter().map(|i| (key, i.addr)));
                    self.sites.insert(
                        key,
                        Site {
                            consumers: Vec::new(),
                            installs,
                            link_map_hook: false,
                            mask_fix: Some(fix),
                            counter: NO_COUNTER,
                            ret_counter: NO_COUNTER,
                        },
                    );
                    n += 1;
                }
                Err(e) => {
                    self.mask_fix = State::Failed(format!("at libc+{offset:#x}: {e}"));
                    return;
                }
            }
        }
        let _quiet = quiet();
        let problems = self.install(new_installs, "mask fix");
        self.mask_fix = match problems.first() {
            Some(p) => State::Failed(p.error.to_string()),
            None => State::Installed(n),
        };
    }

    /// What became of the mask fixes.
    pub fn mask_fix_state(&self) -> State {
        self.mask_fix.clone()
    }

    /// Put libuprobe's own breakpoint on the loader's `r_brk` (`_dl_debug_state`), which the
    /// loader calls on every change to the link map, whoever asked for it.
    pub fn install_link_map_hook(&mut self, r_brk: u64) -> Result<(), ProbeError> {
        self.pristine = None;
        self.link_map_hook_at = Some(r_brk);
        let maps = objects::read_maps().map_err(|source| ProbeError::Maps { source })?;
        let m = objects::maps::find(&maps, r_brk)
            .filter(|m| m.is_exec() && m.file.is_some())
            .ok_or(ProbeError::NotExecutable { addr: r_brk, object: "the loader".into() })?;
        let file = m.file.ok_or(ProbeError::NotMapped { offset: r_brk })?;
        let key = SiteKey { file, offset: r_brk - m.start + m.offset };
        if let Some(site) = self.sites.get_mut(&key) {
            site.link_map_hook = true;
            self.publish();
            return Ok(());
        }
        let install = self.plan_install(key, m, r_brk, &maps, Counters::NONE, false)?;
        if !trap::can_hijack(install.resume) {
            return Err(ProbeError::Runtime {
                why: "the loader's r_brk starts with an instruction the hook cannot resume".into(),
            });
        }
        self.sites.insert(
            key,
            Site {
                consumers: Vec::new(),
                installs: vec![install],
                link_map_hook: true,
                mask_fix: None,
                counter: NO_COUNTER,
                ret_counter: NO_COUNTER,
            },
        );
        let problems = self.install(vec![(key, install.addr)], "link-map hook");
        problems.into_iter().next().map_or(Ok(()), |p| Err(p.error))
    }
}

/// While the mask fixes go in or come out: no thread may have SIGTRAP blocked. A thread that
/// blocked every signal where a fix is not (yet, or any more) in (one starting in pthread_create,
/// whose parent blocked everything, SIGTRAP included, with a raw system call; a posix_spawn
/// parent) would be killed by the first fix it runs into with SIGTRAP blocked: one going in, or
/// the `int3` a jump-path fix shows while its original bytes come back. So the starts wait at the
/// gate while this lives, and those under way, and any other window, are waited for (they last
/// microseconds; at most a second).
pub(super) fn quiet() -> crate::runtime::gate::Closed {
    let closed = crate::runtime::gate::Closed::close(1_000_000_000);
    wait_for_sigtrap_open(1_000_000_000);
    closed
}

/// Wait (at most `timeout_ns`) until no other thread of this process has SIGTRAP blocked, as
/// `/proc/self/task/*/status` shows. Returns whether none has.
fn wait_for_sigtrap_open(timeout_ns: u64) -> bool {
    let me = crate::sigsafe::sys::gettid();
    let trap = crate::sigsafe::sys::sigbit(libc::SIGTRAP);
    let blocked = || {
        let tasks = crate::runtime::fs::list_dir("/proc/self/task").unwrap_or_default();
        tasks.iter().filter(|t| t.parse::<i32>().is_ok_and(|t| t != me)).any(|t| {
            let status = crate::runtime::fs::read_string(&format!("/proc/self/task/{t}/status"));
            let mask = status.ok().and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("SigBlk:"))?.to_string();
                u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).ok()
            });
            mask.is_some_and(|m| m & trap != 0)
        })
    };
    // One thread (the constructor): nobody to wait for.
    if crate::runtime::fs::list_dir("/proc/self/task").is_ok_and(|t| t.len() <= 1) {
        return true;
    }
    let start = crate::sigsafe::sys::monotonic_ns();
    while blocked() {
        if crate::sigsafe::sys::monotonic_ns().saturating_sub(start) > timeout_ns {
            return false;
        }
        crate::sigsafe::sys::sleep_ns(100_000);
    }
    true
}
