//! Installs: a site in one mapping. Planning one decodes the instruction from the file's bytes and
//! decides how a hit resumes; installing it writes the breakpoint (through `patch`).

use super::{Problem, Registry, SiteKey};
use crate::error::ProbeError;
use crate::objects::{self, LoadedObject, MapEntry};
use crate::patch::{self, TextWriter, INT3};
use crate::sigsafe::plan::Resume;
use crate::xol;

/// A breakpoint in one mapping.
#[derive(Clone, Copy, Debug)]
pub struct Install {
    pub addr: u64,
    /// The instruction's first bytes, as the file has them.
    pub orig: [u8; 16],
    pub resume: Resume,
}

impl Install {
    /// Is the breakpoint gone from memory, though libuprobe did not remove it?
    pub fn is_lost(&self) -> bool {
        patch::read_byte(self.addr).is_some_and(|b| b != INT3)
    }
}

impl Registry {
    /// Plan the site `key` in every executable mapping of its file.
    pub(super) fn plan_site(
        &mut self,
        key: SiteKey,
        maps: &[MapEntry],
    ) -> Result<Vec<Install>, ProbeError> {
        let mut installs = Vec::new();
        for m in maps.iter().filter(|m| m.file == Some(key.file) && m.is_exec()) {
            if let Some(addr) = m.addr_of(key.offset) {
                installs.push(self.plan_install(key, m, addr, maps)?);
            }
        }
        if installs.is_empty() {
            return Err(ProbeError::NotMapped { offset: key.offset });
        }
        Ok(installs)
    }

    /// Plan the instruction of `key` at `addr`, in mapping `m`.
    pub(super) fn plan_install(
        &mut self,
        key: SiteKey,
        m: &MapEntry,
        addr: u64,
        maps: &[MapEntry],
    ) -> Result<Install, ProbeError> {
        if m.shared {
            return Err(ProbeError::Shared { path: m.path.clone(), addr: m.start });
        }
        if m.prot & libc::PROT_READ == 0 {
            return Err(ProbeError::ExecuteOnly { path: m.path.clone(), addr: m.start });
        }
        let obj = LoadedObject {
            id: key.file,
            path: m.path.trim_end_matches(" (deleted)").to_string(),
            is_main: false,
            is_self: false,
        };
        let elf = self.resolver.elf(&obj, maps)?;
        let mut bytes = [0x90u8; 16];
        let from_file = elf.bytes_at(key.offset, 16);
        bytes[..from_file.len()].copy_from_slice(from_file);
        let avail = ((m.end - addr) as usize).min(16);
        let d = xol::decode(&bytes[..avail.max(1)], addr)
            .map_err(|source| ProbeError::Instruction { symbol: format!("{addr:#x}"), source })?;
        // The code in memory must be the file's: an int3 of someone else's, or code patched by
        // another tool, would be displaced wrongly.
        let mut mem = [0u8; 16];
        patch::read(addr, &mut mem[..d.len])
            .map_err(|source| ProbeError::Patch { addr, source })?;
        if mem[0] == INT3 && bytes[0] != INT3 {
            return Err(ProbeError::AlreadyInt3 { addr });
        }
        if mem[..d.len] != bytes[..d.len] {
            return Err(ProbeError::Unproven {
                addr,
                object: m.path.clone(),
                why: "the code in memory differs from the file's (another tool patched it?)".into(),
            });
        }
        let resume = match d.emu {
            Some(emu) => Resume::Emulate(emu),
            None => {
                let s = self.slots.get_or_write(&mut self.areas, &d, addr, bytes, maps).map_err(
                    |source| ProbeError::Instruction { symbol: format!("{addr:#x}"), source },
                )?;
                Resume::Xol { slot: s.start }
            }
        };
        Ok(Install { addr, orig: bytes, resume })
    }

    /// Publish sites with new installs, then write their breakpoints; a site whose writes fail is
    /// undone entirely and its probes marked failed.
    pub(super) fn install(
        &mut self,
        new_installs: Vec<(SiteKey, Vec<Install>)>,
        spec: &str,
    ) -> Vec<Problem> {
        if new_installs.is_empty() {
            return Vec::new();
        }
        self.publish();
        let mut writer = TextWriter::new();
        let mut problems = Vec::new();
        let mut undone = false;
        for (key, installs) in new_installs {
            // While the loader adds or removes objects (another thread's dlopen or dlclose),
            // nothing is written: its hook rescans when it is done. (It waits for the registry
            // before it unmaps anything, so a write that started is done first.)
            let written = if objects::loader::consistent() {
                write_breakpoints(&mut writer, &installs)
            } else {
                Err(ProbeError::Patch { addr: 0, source: crate::sigsafe::sys::Errno(libc::EAGAIN) })
            };
            if let Err(error) = written {
                // A mapping another thread unmapped meanwhile (a dlclose) is not a failure: the
                // site waits for its file to be mapped again, as after any dlclose.
                let vanished = matches!(
                    &error,
                    ProbeError::Patch { source, .. }
                        if matches!(source.0, libc::EFAULT | libc::EIO | libc::EAGAIN)
                );
                if vanished {
                    if let Some(site) = self.sites.get_mut(&key) {
                        site.installs.retain(|i| !installs.iter().any(|n| n.addr == i.addr));
                    }
                    undone = true;
                    continue;
                }
                if let Some(site) = self.sites.get_mut(&key) {
                    site.installs.retain(|i| !installs.iter().any(|n| n.addr == i.addr));
                    if site.installs.is_empty() {
                        let ids: Vec<_> = site.consumers.iter().map(|(id, _)| *id).collect();
                        if site.link_map_hook || site.mask_fix.is_some() {
                            site.consumers.clear();
                        } else {
                            self.sites.remove(&key);
                        }
                        for id in ids {
                            let p = self.probe_mut(id);
                            (p.site, p.error) = (None, Some(error.clone()));
                        }
                    }
                }
                problems.push(Problem { spec: spec.to_string(), error });
                undone = true;
            }
        }
        if undone {
            self.publish();
        }
        problems
    }
}

/// Write `int3` at every install; on failure, restore those already written.
fn write_breakpoints(w: &mut TextWriter, installs: &[Install]) -> Result<(), ProbeError> {
    for (n, i) in installs.iter().enumerate() {
        if let Err(source) = w.write(i.addr, &[INT3]) {
            for done in &installs[..n] {
                let _ = w.write(done.addr, &done.orig[..1]);
            }
            return Err(ProbeError::Patch { addr: i.addr, source });
        }
    }
    Ok(())
}

/// Put the original bytes back.
pub(super) fn restore(installs: &[Install]) {
    let mut w = TextWriter::new();
    for i in installs {
        let _ = w.write(i.addr, &i.orig[..1]);
    }
}
