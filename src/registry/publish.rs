//! Giving hits a new table: built from the current sites and tombstones, swapped in atomically,
//! the old one freed once no hit can still be reading it.

use std::sync::atomic::Ordering;

use super::{Registry, Site};
use crate::patch::TextWriter;
use crate::sigsafe::events::TRACING;
use crate::sigsafe::table::{
    self, Table, TableEntry, LINK_MAP_HOOK, MASK_FIX, NO_COUNTER, POPF, TIMED,
};
use crate::xol::jump::{Counters, Jump};

impl Registry {
    /// Build and publish the table, then point every jump at the body entry its consumers need.
    /// Called only with the registry lock held (one writer).
    pub(super) fn publish(&mut self) {
        super::GENERATION.fetch_add(1, std::sync::atomic::Ordering::Release);
        let jumps = self.sites.values().flat_map(|s| &s.installs);
        let mut watched: Vec<u64> =
            jumps.filter(|i| i.jump.is_some() && !i.yielded).map(|i| i.addr).collect();
        watched.sort_unstable();
        super::WATCHED.store(watched.len(), Ordering::Relaxed);
        self.watch_list = watched;
        // Code planned since the last write (bodies for a site's new counter) goes in first;
        // if it could not be written, no jump is pointed anywhere new (below).
        let flushed = self.areas.flush(&mut TextWriter::new()).is_ok();
        let mut t = Table::default();
        let installs: usize = self.sites.values().map(|s| s.installs.len()).sum();
        t.entries.reserve(installs + self.tombstones.len());
        t.consumers.reserve(self.sites.values().map(|s| s.consumers.len()).sum());
        for site in self.sites.values() {
            let first = t.consumers.len() as u32;
            t.consumers.extend(site.consumers.iter().map(|(_, c)| c.clone()));
            let count = site.consumers.len() as u32;
            let mut flags = 0;
            if site.link_map_hook {
                flags |= LINK_MAP_HOOK;
            }
            if site.mask_fix.is_some() {
                flags |= MASK_FIX;
            }
            if site.consumers.iter().any(|(_, c)| c.latency.is_some()) {
                flags |= TIMED;
            }
            let (mask_reg, size_reg) = site.mask_fix.map_or((0, 0), |m| (m.mask_reg, m.size_reg));
            for i in &site.installs {
                let popf = super::install::popf_len(&i.orig).filter(|_| site.mask_fix.is_none());
                t.entries.push(TableEntry {
                    addr: i.addr,
                    resume: i.resume,
                    first,
                    count,
                    counter: site.counter,
                    ret_counter: site.ret_counter,
                    flags: flags | if popf.is_some() { POPF } else { 0 },
                    mask_reg: popf.unwrap_or(mask_reg),
                    size_reg,
                });
            }
        }
        for (&addr, &resume) in &self.tombstones {
            t.entries.push(TableEntry {
                addr,
                resume,
                first: 0,
                count: 0,
                counter: NO_COUNTER,
                ret_counter: NO_COUNTER,
                flags: 0,
                mask_reg: 0,
                size_reg: 0,
            });
        }
        // A live entry wins over a tombstone at the same address. (Unstable: no two entries have
        // the same key, and a stable sort takes a scratch copy of two thousand entries.)
        t.entries.sort_unstable_by_key(|e| (e.addr, !e.live()));
        t.entries.dedup_by_key(|e| e.addr);
        t.slots = self.slots.maps();
        t.slots.extend(self.jumps.slots());
        t.slots.sort_unstable_by_key(|m| m.start);
        t.code = self.areas.code_ranges();
        // SAFETY: a fresh box, handed over.
        let old = unsafe { table::replace(Box::into_raw(Box::new(t))) };
        if !old.is_null() {
            // SAFETY: `old` came from Box::into_raw in an earlier publish, and no reader holds it.
            drop(unsafe { Box::from_raw(old) });
        }
        // After the table: a hit that takes the full entry finds its consumers there.
        if !flushed {
            return;
        }
        for site in self.sites.values() {
            for i in &site.installs {
                if let Some(j) = &i.jump {
                    j.point_to(entry_of(site, j));
                }
            }
        }
    }
}

/// Which entry of its body a jump at `site` goes to: the one that does all its consumers want by
/// itself (counting, pushing returns), or the full one.
fn entry_of(site: &Site, j: &Jump) -> u64 {
    let b = &j.body;
    let plain = !site.consumers.is_empty()
        && !site.link_map_hook
        && site.mask_fix.is_none()
        && !TRACING.load(Ordering::Relaxed)
        && !site.consumers.iter().any(|(_, c)| c.stack)
        && b.counters == Counters { hits: site.counter, returns: site.ret_counter };
    if !plain {
        return b.full;
    }
    let ret = site.consumers.iter().any(|(_, c)| c.ret);
    let timed = site.consumers.iter().any(|(_, c)| c.latency.is_some());
    match (ret, timed) {
        (false, _) => b.count,
        (true, false) => b.ret,
        // Durations timed in the body need the time-stamp counter (see `sigsafe::clock`).
        (true, true) if crate::sigsafe::clock::tsc() => b.ret_timed,
        (true, true) => b.full,
    }
}
