//! Installs: a site in one mapping. Planning one decodes the instruction from the file's bytes and
//! decides how a hit arrives (a jump where one is safe, a trap otherwise) and how a trap resumes;
//! installing writes the bytes (through `patch`), in the kernel's order for live code.
//!
//! Writing a jump over live code (`text_poke_bp` in the kernel), for a whole batch of sites:
//! 1. the bodies and stubs are written, the table published (a trap anywhere finds its site);
//! 2. `int3` at every site: the site is a trap probe, counted by the trap handler;
//! 3. every core serialized; the jump's tail bytes written (no CPU runs them: byte 0 traps);
//! 4. every core serialized; byte 0 becomes `e9`;
//! 5. every core serialized.
//!
//! Removal is the reverse (`int3` over `e9`, serialize, tail restored, serialize, byte 0 restored,
//! serialize). A thread that trapped in between is counted once, by the trap handler, and resumes
//! in the body's relocated instruction; one that took the jump is counted once by the body.

use std::collections::BTreeMap;

use super::{Problem, Registry, SiteKey};
use crate::error::ProbeError;
use crate::objects::{self, LoadedObject, MapEntry};
use crate::patch::{self, Barrier, TextWriter, INT3};
use crate::runtime::config::{self, PathMode};
use crate::sigsafe::plan::Resume;
use crate::sigsafe::sys::{self, Errno};
use crate::xol::jump::{Counters, Jump, JMP_LEN};
use crate::xol::{self, Decoded};

/// A site in one mapping.
#[derive(Clone, Copy, Debug)]
pub struct Install {
    pub addr: u64,
    /// The instruction's first bytes (and what follows), as the file has them.
    pub orig: [u8; 16],
    /// How a trap at `addr` resumes.
    pub resume: Resume,
    /// The jump, when the site is on the jump path (written once installed).
    pub jump: Option<Jump>,
    /// Given up to another tool that put a breakpoint on its first byte (see
    /// `Registry::watch`): its bytes are the file's but that one, and libuprobe writes there no
    /// more.
    pub yielded: bool,
}

impl Install {
    /// The byte at `addr` while installed.
    fn head(&self) -> u8 {
        if self.jump.is_some() {
            0xe9
        } else {
            INT3
        }
    }

    /// Is the patch gone from memory, though libuprobe did not remove it?
    pub fn is_lost(&self) -> bool {
        self.yielded || patch::read_byte(self.addr).is_some_and(|b| b != self.head())
    }

    /// The bytes the install depends on: its own patch, and a punned jump's pinned bytes.
    pub fn footprint_end(&self) -> u64 {
        self.addr + if self.jump.is_some() { JMP_LEN as u64 } else { 1 }
    }
}

/// An install planned and not written yet: its site and address. (A site's installs are
/// consecutive in a batch.)
pub type NewInstall = (SiteKey, u64);

/// Did planning or writing fail because the code went away (or was being mapped) meanwhile? Such a
/// site waits for its file to be mapped again, as after any dlclose, instead of failing.
pub fn vanished(e: &ProbeError) -> bool {
    let gone = |errno: i32| matches!(errno, libc::EFAULT | libc::EIO | libc::ENOMEM | libc::EAGAIN);
    match e {
        ProbeError::Patch { source, .. } if gone(source.0) => true,
        ProbeError::NotMapped { .. } => true,
        // A dlopen or dlclose that began before the registry's lock was taken is still mapping
        // or unmapping (an object is mapped whole first, then its segments over it).
        ProbeError::Patch { .. } | ProbeError::Unproven { .. } | ProbeError::AlreadyInt3 { .. } => {
            !objects::loader::consistent()
        }
        _ => false,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// Why sites are traps, by address (for `path_reason`).
pub type TrapReasons = BTreeMap<u64, String>;

/// The length of the instruction at the start of `bytes` if it is `popfq` (`9d`, maybe after a
/// REX prefix; not the 16-bit `66 9d`).
pub fn popf_len(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [0x9d, ..] => Some(1),
        [0x40..=0x4f, 0x9d, ..] => Some(2),
        _ => None,
    }
}

impl Registry {
    /// Plan the site `key` in every executable mapping of its file.
    pub(super) fn plan_site(
        &mut self,
        key: SiteKey,
        maps: &[MapEntry],
        counters: Counters,
        jump_ok: bool,
    ) -> Result<Vec<Install>, ProbeError> {
        // Nearly always one mapping: room for one (an empty vector grows to four at its first
        // push, 576 bytes a site that `libc.so.6:*` keeps for two thousand sites).
        let mut installs = Vec::with_capacity(1);
        for m in maps.iter().filter(|m| m.file == Some(key.file) && m.is_exec()) {
            if let Some(addr) = m.addr_of(key.offset) {
                installs.push(self.plan_install(key, m, addr, maps, counters, jump_ok)?);
            }
        }
        if installs.is_empty() {
            return Err(ProbeError::NotMapped { offset: key.offset });
        }
        Ok(installs)
    }

    /// Plan the instruction of `key` at `addr`, in mapping `m`. The install's bytes are taken
    /// (see [`Registry::occupied`]) from now on.
    pub(super) fn plan_install(
        &mut self,
        key: SiteKey,
        m: &MapEntry,
        addr: u64,
        maps: &[MapEntry],
        counters: Counters,
        jump_ok: bool,
    ) -> Result<Install, ProbeError> {
        if m.shared {
            return Err(ProbeError::Shared { path: m.path.clone(), addr: m.start });
        }
        if m.prot & libc::PROT_READ == 0 {
            return Err(ProbeError::ExecuteOnly { path: m.path.clone(), addr: m.start });
        }
        let avail = ((m.end - addr) as usize).min(16);
        let mut bytes = [0x90u8; 16];
        // Where the page still is the file's (and all 16 bytes are mapped, so that they are the
        // same 16 either way), its code is read in place; elsewhere from the file.
        if !self.pristine.as_ref().is_some_and(|p| p.covers(m)) {
            self.pristine = objects::maps::Pristine::of(m);
        }
        let in_place = avail == 16
            && self.pristine.as_ref().is_some_and(|p| p.holds(addr, 16))
            && patch::read(addr, &mut bytes).is_ok();
        if !in_place {
            let obj = LoadedObject {
                id: key.file,
                path: m.path.trim_end_matches(" (deleted)").to_string(),
                is_main: false,
                is_self: false,
            };
            let elf = self.resolver.elf(&obj, maps)?;
            bytes = [0x90u8; 16];
            let from_file = elf.bytes_at(key.offset, 16)?;
            bytes[..from_file.len()].copy_from_slice(from_file);
        }
        let d = xol::decode(&bytes[..avail.max(1)], addr)
            .map_err(|source| ProbeError::Instruction { symbol: format!("{addr:#x}"), source })?;
        // The code in memory must be the file's: an int3 of someone else's, or code patched by
        // another tool, would be displaced wrongly. (A punned jump also relies on the bytes after
        // the instruction: they are compared too.)
        let checked = d.len.max(JMP_LEN).min(avail);
        let mut mem = [0u8; 16];
        if in_place {
            mem = bytes; // read from memory just now: the same bytes
        } else {
            patch::read(addr, &mut mem[..checked])
                .map_err(|source| ProbeError::Patch { addr, source })?;
        }
        if mem[0] == INT3 && bytes[0] != INT3 {
            return Err(ProbeError::AlreadyInt3 { addr });
        }
        if mem[..d.len] != bytes[..d.len] {
            return Err(ProbeError::Unproven {
                addr,
                object: m.path.clone(),
                why: format!(
                    "the code in memory ({}) differs from the file's ({}): another tool patched it?",
                    hex(&mem[..d.len]),
                    hex(&bytes[..d.len])
                ),
            });
        }
        // An existing jump whose bytes this site lies in goes back to a trap first.
        if let Some((&j, &(end, _))) = self.occupied.range(..addr).next_back() {
            if end > addr {
                self.demote.push(j);
            }
        }
        let jump = match self.why_no_jump(&d, addr, m, &mem[..checked], &bytes, jump_ok) {
            Some(why) => {
                self.trap_reasons.insert(addr, why);
                None
            }
            None => match self.jumps.plan(&mut self.areas, &d, addr, bytes, counters, maps) {
                Ok(j) => Some(j),
                Err(why) => {
                    self.trap_reasons.insert(addr, why);
                    None
                }
            },
        };
        let resume = match (&jump, d.emu) {
            (Some(j), _) => Resume::Xol { slot: j.body.insn },
            (None, Some(emu)) => Resume::Emulate(emu),
            (None, None) => {
                let s = self.slots.get_or_write(&mut self.areas, &d, addr, bytes, maps).map_err(
                    |source| ProbeError::Instruction { symbol: format!("{addr:#x}"), source },
                )?;
                Resume::Xol { slot: s.start }
            }
        };
        if jump.is_some() {
            self.trap_reasons.remove(&addr);
        }
        let install = Install { addr, orig: bytes, resume, jump, yielded: false };
        self.occupied.insert(addr, (install.footprint_end(), key));
        Ok(install)
    }

    /// Why the instruction `d` at `addr` cannot have a jump (None: it can). `mem`: the bytes in
    /// memory from `addr` (at least the jump's length when the mapping has them).
    fn why_no_jump(
        &self,
        d: &Decoded,
        addr: u64,
        m: &MapEntry,
        mem: &[u8],
        file: &[u8; 16],
        jump_ok: bool,
    ) -> Option<String> {
        if config::get().path == PathMode::Trap {
            return Some("UPROBES_PATH=trap".into());
        }
        if !jump_ok {
            return Some("libuprobe's own hook on the loader stays a trap".into());
        }
        if !Barrier::available() {
            return Some(
                "the kernel cannot serialize other cores (membarrier SYNC_CORE unavailable)".into(),
            );
        }
        let end = addr + JMP_LEN as u64;
        if end > m.end || mem.len() < JMP_LEN {
            return Some("a jump would reach past the end of the mapping".into());
        }
        if mem[..JMP_LEN] != file[..JMP_LEN] {
            return Some("the bytes after the instruction differ from the file's".into());
        }
        if let Some((&other, _)) = self.occupied.range(addr + 1..end).next() {
            return Some(format!("a jump would cover the probe at {other:#x}"));
        }
        if d.call && sys::shadow_stack_enabled() {
            return Some("the CPU's shadow stack is on: a relocated call is not on it".into());
        }
        if popf_len(file).is_some() {
            return Some(
                "`popfq` may set the trap flag, whose single step only the trap path shows after \
                 the right instruction"
                    .into(),
            );
        }
        None
    }

    /// Publish sites with new installs, then write their patches; a site whose writes fail is
    /// undone entirely and its probes marked failed.
    pub(super) fn install(&mut self, new_installs: Vec<NewInstall>, spec: &str) -> Vec<Problem> {
        if new_installs.is_empty() && self.demote.is_empty() {
            return Vec::new();
        }
        let mut writer = TextWriter::new();
        // What is written now makes pages copies of their own: read pagemap again next time.
        self.pristine = None;
        if let Err(errno) = self.areas.flush(&mut writer) {
            // Without its code, no site planned since the last flush can resume anywhere.
            return self.fail_all(new_installs, spec, ProbeError::Patch { addr: 0, source: errno });
        }
        self.publish();
        self.demote_pending(&mut writer, &new_installs);
        // While the loader adds or removes objects (another thread's dlopen or dlclose), nothing
        // is written: its hook rescans when it is done. (It waits for the registry before it
        // unmaps anything, so a write that started is done first.)
        let consistent = objects::loader::consistent();
        // With one thread (the constructor, before the runtime's threads start), no other CPU
        // can be running the sites: each gets its final bytes at once.
        let alone = consistent && single_threaded();
        // (address, bytes, how many): int3, or with one thread a jump's final bytes.
        let mut patches: Vec<(u64, [u8; JMP_LEN], usize)> = Vec::new();
        for &(key, addr) in &new_installs {
            let jump = if alone { self.find_install(key, addr).and_then(|f| f.jump) } else { None };
            patches.push(match jump {
                Some(j) => (addr, j.bytes, j.len as usize),
                None => (addr, [INT3; JMP_LEN], 1),
            });
        }
        let writes: Vec<(u64, &[u8])> = patches.iter().map(|(a, b, n)| (*a, &b[..*n])).collect();
        let results = if consistent {
            writer.write_many(&writes)
        } else {
            vec![Err(Errno(libc::EAGAIN)); writes.len()]
        };
        let mut failed: BTreeMap<u64, Errno> = BTreeMap::new();
        for ((addr, _), r) in writes.iter().zip(&results) {
            if let Err(e) = r {
                failed.insert(*addr, *e);
            }
        }
        // The jumps, for the sites whose int3 is in.
        let jumps: Vec<Install> = new_installs
            .iter()
            .filter(|(_, a)| !failed.contains_key(a))
            .filter_map(|&(k, a)| self.find_install(k, a))
            .filter(|i| i.jump.is_some() && !alone)
            .collect();
        if alone {
            crate::sigsafe::sys::serialize_self();
        }
        for (addr, e) in write_jumps(&mut writer, &jumps) {
            failed.insert(addr, e);
        }
        // A failed write takes its whole site down, its other mappings included.
        let mut problems = Vec::new();
        let mut undone = false;
        for site in new_installs.chunk_by(|a, b| a.0 == b.0) {
            let key = site[0].0;
            let Some(error) = site.iter().find_map(|(_, a)| failed.get(a)) else { continue };
            let addrs: Vec<u64> = site.iter().map(|&(_, a)| a).collect();
            let ok: Vec<Install> = addrs
                .iter()
                .filter(|a| !failed.contains_key(a))
                .filter_map(|&a| self.find_install(key, a))
                .collect();
            restore(&mut writer, &ok);
            let error = ProbeError::Patch { addr: addrs[0], source: *error };
            undone = true;
            self.drop_installs(key, &addrs);
            if vanished(&error) {
                continue;
            }
            if let Some(site) = self.sites.get_mut(&key) {
                if site.installs.is_empty() {
                    let ids: Vec<_> = site.consumers.iter().map(|(id, _)| *id).collect();
                    if site.link_map_hook || site.mask_fix.is_some() {
                        site.consumers.clear();
                    } else {
                        self.sites.remove(&key);
                    }
                    for id in ids {
                        let p = self.probe_mut(id);
                        (p.site, p.error) = (None, Some(Box::new(error.clone())));
                    }
                }
            }
            problems.push(Problem { spec: spec.to_string(), error });
        }
        if undone {
            self.publish();
        }
        problems
    }

    /// Every new install failed before anything was written: forget them.
    fn fail_all(
        &mut self,
        new_installs: Vec<NewInstall>,
        spec: &str,
        error: ProbeError,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        for site in new_installs.chunk_by(|a, b| a.0 == b.0) {
            let key = site[0].0;
            let addrs: Vec<u64> = site.iter().map(|&(_, a)| a).collect();
            self.drop_installs(key, &addrs);
            if let Some(site) = self.sites.get(&key) {
                if site.installs.is_empty() && !site.link_map_hook && site.mask_fix.is_none() {
                    let ids: Vec<_> = site.consumers.iter().map(|(id, _)| *id).collect();
                    self.sites.remove(&key);
                    for id in ids {
                        let p = self.probe_mut(id);
                        (p.site, p.error) = (None, Some(Box::new(error.clone())));
                    }
                }
            }
            problems.push(Problem { spec: spec.to_string(), error: error.clone() });
        }
        // Probes of the same batch added to sites that were already in (nothing to write for
        // them) still get into the table.
        self.publish();
        problems
    }

    /// The install of `key` at `addr`.
    pub(super) fn find_install(&self, key: SiteKey, addr: u64) -> Option<Install> {
        self.sites.get(&key)?.installs.iter().find(|i| i.addr == addr).copied()
    }

    /// Forget installs of `key` (their bytes are free again).
    pub(super) fn drop_installs(&mut self, key: SiteKey, addrs: &[u64]) {
        if let Some(site) = self.sites.get_mut(&key) {
            site.installs.retain(|i| !addrs.contains(&i.addr));
        }
        for a in addrs {
            self.occupied.remove(a);
            self.trap_reasons.remove(a);
        }
    }

    /// Turn the jumps that a newly planned site lies in back into traps, before anything of the
    /// new site is written. A jump planned in this same batch is simply not written.
    fn demote_pending(&mut self, w: &mut TextWriter, batch: &[NewInstall]) {
        let demote = std::mem::take(&mut self.demote);
        if demote.is_empty() {
            return;
        }
        let mut written = Vec::new();
        for addr in demote {
            let Some(&(_, key)) = self.occupied.get(&addr) else { continue };
            let Some(i) = self.find_install(key, addr).filter(|i| i.jump.is_some() && !i.yielded)
            else {
                continue;
            };
            let new = batch.contains(&(key, addr));
            if !new {
                written.push(i);
            }
            self.set_trap(key, addr, "a probe was added inside its jump's bytes".into());
        }
        if !written.is_empty() {
            // int3 over the jump, then the original tail: the site is a trap at `addr`.
            let int3 = [INT3];
            let heads: Vec<(u64, &[u8])> = written.iter().map(|i| (i.addr, &int3[..])).collect();
            w.write_many(&heads);
            Barrier::sync();
            let tails: Vec<(u64, &[u8])> = written.iter().filter_map(tail_of_orig).collect();
            w.write_many(&tails);
            Barrier::sync();
        }
        self.publish();
    }

    /// The install of `key` at `addr` is a trap from now on.
    fn set_trap(&mut self, key: SiteKey, addr: u64, why: String) {
        if let Some(i) =
            self.sites.get_mut(&key).and_then(|s| s.installs.iter_mut().find(|i| i.addr == addr))
        {
            i.jump = None;
            self.occupied.insert(addr, (i.footprint_end(), key));
        }
        self.trap_reasons.insert(addr, why);
    }
}

/// Is this thread the process's only one (`/proc/self/stat`, field 20)?
pub(super) fn single_threaded() -> bool {
    let Ok(stat) = crate::runtime::fs::read_string("/proc/self/stat") else { return false };
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return false };
    rest.split_whitespace().nth(17) == Some("1")
}

/// The original bytes of a jump's tail (bytes 1 to its length).
pub(super) fn tail_of_orig(i: &Install) -> Option<(u64, &[u8])> {
    let j = i.jump?;
    (j.len > 1).then(|| (i.addr + 1, &i.orig[1..j.len as usize]))
}

/// Turn `int3`s into jumps (steps 3 to 5). Returns the sites whose writes failed (their mapping
/// went away meanwhile).
fn write_jumps(w: &mut TextWriter, jumps: &[Install]) -> Vec<(u64, Errno)> {
    if jumps.is_empty() {
        return Vec::new();
    }
    let mut failed = Vec::new();
    Barrier::sync();
    let tails: Vec<(u64, &[u8])> = jumps
        .iter()
        .filter_map(|i| {
            let j = i.jump.as_ref()?;
            (j.len > 1).then(|| (i.addr + 1, &j.bytes[1..j.len as usize]))
        })
        .collect();
    for ((a, _), r) in tails.iter().zip(w.write_many(&tails)) {
        if let Err(e) = r {
            failed.push((a - 1, e));
        }
    }
    Barrier::sync();
    let e9 = [0xe9u8];
    let heads: Vec<(u64, &[u8])> = jumps
        .iter()
        .filter(|i| !failed.iter().any(|f| f.0 == i.addr))
        .map(|i| (i.addr, &e9[..]))
        .collect();
    for ((a, _), r) in heads.iter().zip(w.write_many(&heads)) {
        if let Err(e) = r {
            failed.push((*a, e));
        }
    }
    Barrier::sync();
    failed
}

/// Put the original bytes back (jumps in the kernel's order), for installs that are in memory.
/// (One given up to another tool is the file's already, but for that tool's byte, left alone.)
pub(super) fn restore(w: &mut TextWriter, installs: &[Install]) {
    let installs: Vec<&Install> = installs.iter().filter(|i| !i.yielded).collect();
    let jumps: Vec<&Install> = installs.iter().copied().filter(|i| i.jump.is_some()).collect();
    let int3 = [INT3];
    if !jumps.is_empty() {
        let heads: Vec<(u64, &[u8])> = jumps.iter().map(|i| (i.addr, &int3[..])).collect();
        w.write_many(&heads);
        Barrier::sync();
        let tails: Vec<(u64, &[u8])> = jumps.iter().filter_map(|i| tail_of_orig(i)).collect();
        w.write_many(&tails);
        Barrier::sync();
    }
    let heads: Vec<(u64, &[u8])> = installs.iter().map(|i| (i.addr, &i.orig[..1])).collect();
    w.write_many(&heads);
    if !jumps.is_empty() {
        Barrier::sync();
    }
}
