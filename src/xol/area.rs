//! Memory libuprobe writes its own code and data into, within reach of the code it serves:
//!
//! - code areas (read + execute): XOL slots, jump bodies, the stubs of long jumps;
//! - data areas (read + write): the pointer each jump stub goes through, so that a site's body is
//!   chosen by one atomic store, never by rewriting live code;
//! - stub pages (read + execute) at addresses fixed by the program's own bytes: the targets of
//!   punned jumps (see `xol::jump`).
//!
//! Nothing here is ever unmapped, and no byte is handed out twice: a thread preempted inside
//! libuprobe's code always finds the bytes it started. Code is written through `/proc/self/mem`
//! (see `patch`), batched, so that the pages stay read + execute and are never writable.

use std::collections::BTreeMap;

use super::decode::XolError;
use crate::objects::MapEntry;
use crate::patch::TextWriter;
use crate::sigsafe::sys;

struct Area {
    base: u64,
    len: u64,
    used: u64,
    /// Mapped read-write and never run yet: written directly, made read + execute at the next
    /// flush (a code area is never writable and executable at once).
    fresh: bool,
}

impl Area {
    fn take(&mut self, near: u64, size: u64, align: u64) -> Option<u64> {
        let at = (self.base + self.used).next_multiple_of(align);
        (self.base.abs_diff(near) < MAX_DISTANCE && at + size <= self.base + self.len).then(|| {
            self.used = at + size - self.base;
            at
        })
    }
}

/// A page of stubs at fixed addresses. Most hold one stub (a punned jump's window is a page at
/// most), so the taken bytes are a short list of ranges, not a bitmap a byte (512 bytes a page,
/// a thousand pages for `libc.so.6:*`).
#[derive(Default)]
struct StubPage {
    /// Taken byte ranges `[start, end)` within the page, unordered.
    taken: Vec<(u16, u16)>,
    /// Offset of the byte after the highest stub.
    next: u64,
}

impl StubPage {
    fn is_free(&self, from: u64, to: u64) -> bool {
        self.taken.iter().all(|&(s, e)| to <= s as u64 || e as u64 <= from)
    }
}

/// Every area. Owned by the registry (under its lock).
#[derive(Default)]
pub struct Areas {
    code: Vec<Area>,
    data: Vec<Area>,
    /// Stub pages by page address: which of their bytes are taken.
    stubs: BTreeMap<u64, StubPage>,
    /// Where stub pages are mapped: 64 MiB or 2 MiB regions (most stubs of one object fall in a few, one
    /// mapping each), or single pages where a region does not fit.
    regions: Vec<Area>,
    /// Code to write at the next [`Areas::flush`] (where it may be running), by address.
    pending: Vec<(u64, Vec<u8>)>,
    /// Code written into fresh areas since the last flush (for tests).
    #[cfg(test)]
    written: Vec<(u64, Vec<u8>)>,
    /// What is mapped, for finding free room: the registry's snapshot of the mappings, and what
    /// libuprobe mapped since.
    taken: Taken,
    /// The unwind information of the code written (see `xol::cfi`).
    pub cfi: super::cfi::Cfi,
}

/// The taken ranges of the address space: a snapshot of the mappings (recomputed when the
/// registry passes a new one) plus libuprobe's own mappings made since, by start.
#[derive(Default)]
struct Taken {
    /// Identity of the snapshot (its address, length and ends).
    key: (usize, usize, u64, u64),
    /// start -> end (ranges may overlap, when the snapshot is stale).
    ranges: BTreeMap<u64, u64>,
    zones: [(u64, u64); 2],
}

impl Taken {
    fn refresh(&mut self, maps: &[MapEntry], ours: impl Iterator<Item = (u64, u64)>) {
        let ends = (maps.first().map_or(0, |m| m.start), maps.last().map_or(0, |m| m.end));
        let key = (maps.as_ptr() as usize, maps.len(), ends.0, ends.1);
        if key == self.key && !self.ranges.is_empty() {
            return;
        }
        self.key = key;
        self.ranges.clear();
        for (start, end) in maps.iter().map(|m| (m.start, m.end)).chain(ours) {
            self.add(start, end);
        }
        self.zones = growth_zones(maps);
    }

    fn add(&mut self, start: u64, end: u64) {
        let e = self.ranges.entry(start).or_insert(end);
        *e = (*e).max(end);
    }

    /// The free ranges that meet `[lo, hi)`, in address order.
    fn gaps(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        // Where the free space at `lo` starts: after every range that starts before `lo` and
        // reaches past it (the ranges before `lo` are looked at from the nearest back).
        let mut prev_end = 0x10000u64;
        for (_, &end) in self.ranges.range(..=lo).rev().take(64) {
            prev_end = prev_end.max(end);
        }
        let mut out = Vec::new();
        for (&start, &end) in self.ranges.range(lo.saturating_add(1)..) {
            if prev_end >= hi {
                break;
            }
            if start > prev_end {
                out.push((prev_end, start.min(USER_END)));
            }
            prev_end = prev_end.max(end);
        }
        if prev_end < hi {
            out.push((prev_end, USER_END));
        }
        out
    }
}

/// Size of one code or data area.
const AREA_SIZE: u64 = 256 * 1024;
/// How far from the code it serves an area may be: well inside rel32 (±2 GiB), so that the code's
/// own RIP-relative targets (within its object) stay within reach of a copy too.
pub const MAX_DISTANCE: u64 = 1 << 30;
const PAGE: u64 = sys::PAGE as u64;

impl Areas {
    /// `size` bytes of code memory, aligned to `align`, within [`MAX_DISTANCE`] of `near`.
    pub fn alloc_near(
        &mut self,
        near: u64,
        size: u64,
        align: u64,
        maps: &[MapEntry],
    ) -> Result<u64, XolError> {
        if let Some(at) = self.code.iter_mut().find_map(|a| a.take(near, size, align)) {
            return Ok(at);
        }
        let base = self.map_near(near, AREA_SIZE, maps, libc::PROT_READ | libc::PROT_WRITE)?;
        self.code.push(Area { base, len: AREA_SIZE, used: size, fresh: true });
        Ok(base)
    }

    /// An aligned 8-byte word of read-write memory within [`MAX_DISTANCE`] of `near`.
    pub fn alloc_data_near(&mut self, near: u64, maps: &[MapEntry]) -> Result<u64, XolError> {
        if let Some(at) = self.data.iter_mut().find_map(|a| a.take(near, 8, 8)) {
            return Ok(at);
        }
        let base = self.map_near(near, AREA_SIZE, maps, libc::PROT_READ | libc::PROT_WRITE)?;
        self.data.push(Area { base, len: AREA_SIZE, used: 8, fresh: false });
        Ok(base)
    }

    /// Write `code` at `at` (memory handed out by this `Areas`, never run yet): at once where
    /// the area is fresh (mapped read-write, run by no one until the next [`Areas::flush`] makes
    /// it executable), at the next flush otherwise. (`libc.so.6:*` stages two thousand bodies:
    /// kept until the flush, they were a megabyte of heap.)
    pub fn stage(&mut self, at: u64, code: &[u8]) {
        let end = at + code.len() as u64;
        let fresh = self
            .code
            .iter()
            .rev()
            .chain(self.regions.iter().rev())
            .any(|a| a.fresh && a.base <= at && end <= a.base + a.len);
        if fresh {
            // SAFETY: a fresh area is ours, mapped read-write, and no thread runs it yet.
            unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), at as *mut u8, code.len()) };
            #[cfg(test)]
            self.written.push((at, code.to_vec()));
        } else {
            self.pending.push((at, code.to_vec()));
        }
    }

    /// Make the fresh areas read + execute (their code is written already), and write the staged
    /// code into memory that may be running, through `/proc/self/mem`, one write per contiguous
    /// run.
    pub fn flush(&mut self, w: &mut TextWriter) -> Result<(), sys::Errno> {
        // Fresh areas that touch are made read + execute at once (a library's stub regions,
        // 64 MiB each, mostly do); each stops being fresh as soon as it is (a later `stage` must
        // not write into it directly), and on a failure the staged code stays staged.
        let mut fresh_ranges: Vec<(u64, u64)> = self
            .code
            .iter()
            .chain(&self.regions)
            .filter(|a| a.fresh)
            .map(|a| (a.base, a.base + a.len))
            .collect();
        fresh_ranges.sort_unstable();
        let mut i = 0;
        while i < fresh_ranges.len() {
            let (lo, mut hi) = fresh_ranges[i];
            i += 1;
            while i < fresh_ranges.len() && fresh_ranges[i].0 == hi {
                hi = fresh_ranges[i].1;
                i += 1;
            }
            let rx = libc::PROT_READ | libc::PROT_EXEC;
            // SAFETY: our own areas; nothing runs them yet, and nothing writes them through this
            // mapping from now on.
            unsafe { sys::mprotect(lo as usize, (hi - lo) as usize, rx)? };
            for a in self.code.iter_mut().chain(self.regions.iter_mut()) {
                if lo <= a.base && a.base + a.len <= hi {
                    a.fresh = false;
                }
            }
        }
        #[cfg(test)]
        self.written.clear();
        let mut pending = std::mem::take(&mut self.pending);
        // No two stagings share an address (memory is handed out once): sorted, runs form.
        pending.sort_unstable_by_key(|(at, _)| *at);
        let mut run: Option<(u64, Vec<u8>)> = None;
        let mut live = Vec::new();
        for (at, code) in pending {
            match &mut run {
                Some((start, bytes)) if *start + bytes.len() as u64 == at => {
                    bytes.extend_from_slice(&code)
                }
                _ => {
                    live.extend(run.take());
                    run = Some((at, code));
                }
            }
        }
        live.extend(run);
        for (start, bytes) in live {
            w.write(start, &bytes)?;
        }
        Ok(())
    }

    /// The code staged since the last flush, written or not (for tests).
    #[cfg(test)]
    pub fn staged(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v = self.pending.clone();
        v.extend(self.written.iter().cloned());
        v.sort_unstable_by_key(|(at, _)| *at);
        v
    }

    /// Bytes of code and data memory mapped so far (stub pages included).
    pub fn mapped_bytes(&self) -> u64 {
        // Stub regions are reserved, not used: only their stub pages count.
        let areas: u64 = self.code.iter().chain(&self.data).map(|a| a.len).sum();
        areas + self.stubs.len() as u64 * PAGE
    }

    /// Every range of code memory (areas and stub pages), sorted.
    pub fn code_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> =
            self.code.iter().chain(&self.regions).map(|a| (a.base, a.base + a.len)).collect();
        v.sort_unstable();
        v
    }

    /// Tell every unwinder about the code written since the last call (see `xol::cfi`).
    /// See [`super::cfi::Cfi::emit`].
    pub fn emit_cfi(&mut self, deadline: Option<u64>) -> bool {
        let mut areas: Vec<(u64, u64)> =
            self.code.iter().chain(&self.regions).map(|a| (a.base, a.base + a.len)).collect();
        areas.sort_unstable();
        self.cfi.emit(
            |addr| {
                let i = areas.partition_point(|a| a.0 <= addr);
                match i.checked_sub(1).map(|i| areas[i]).filter(|a| addr < a.1) {
                    Some(a) => a,
                    None => {
                        // A stub page of its own.
                        let page = addr & !(PAGE - 1);
                        (page, page + PAGE)
                    }
                }
            },
            deadline,
        )
    }

    /// Is `addr` inside memory of ours?
    pub fn contains(&self, addr: u64) -> bool {
        self.code
            .iter()
            .chain(&self.data)
            .chain(&self.regions)
            .any(|a| a.base <= addr && addr < a.base + a.len)
    }

    /// `len` bytes for a stub starting in `[lo, hi)` (at `lo` exactly when `hi == lo + 1`): in a
    /// stub page of ours where the bytes are free, or in a new stub page mapped where nothing is
    /// (and away from where the heap and the stack grow). The bytes are taken.
    pub fn stub_in(&mut self, lo: u64, hi: u64, len: u64, maps: &[MapEntry]) -> Option<u64> {
        if lo < 0x10000 || hi > USER_END - PAGE || hi <= lo {
            return None;
        }
        // In a page of ours first: any free byte of a small window; the page's next unused byte
        // otherwise (stubs that may go anywhere in a wide window fill pages in order).
        let first_page = lo & !(PAGE - 1);
        let found = self.stubs.range(first_page..hi).find_map(|(&page, p)| {
            let (from, to) = (lo.max(page), hi.min(page + PAGE));
            if hi - lo <= PAGE {
                (from..to).find(|&at| self.stub_free(at, len))
            } else {
                let next = page + p.next;
                (from <= next && next < to && self.stub_free(next, len)).then_some(next)
            }
        });
        if let Some(at) = found {
            self.take_stub(at, len);
            return Some(at);
        }
        // Then a page of one of our stub regions where no stub is yet.
        let in_region = self.regions.iter().find_map(|r| {
            let at = lo.max(r.base);
            let last = at + len - 1;
            (at < hi && last < r.base + r.len).then_some(at)
        });
        if let Some(at) = in_region {
            let (page, last) = (at & !(PAGE - 1), (at + len - 1) & !(PAGE - 1));
            if self.map_stub_pages(page, (last - page) / PAGE + 1) && self.stub_free(at, len) {
                self.take_stub(at, len);
                return Some(at);
            }
        }
        // Then new pages, in the first free gap that holds the window's start.
        self.refresh_taken(maps);
        let zones = self.taken.zones;
        for (glo, ghi) in self.taken.gaps(lo, hi) {
            let at = lo.max(glo);
            let page = at & !(PAGE - 1);
            if at >= hi || at + len > ghi || page < glo {
                continue;
            }
            let last = (at + len - 1) & !(PAGE - 1);
            if in_zones(&zones, page, last + PAGE) {
                continue;
            }
            if self.map_stub_pages(page, (last - page) / PAGE + 1) && self.stub_free(at, len) {
                self.take_stub(at, len);
                return Some(at);
            }
        }
        None
    }

    /// Are the bytes `[at, at + len)` in stub pages of ours, and free? (One look-up a page: a
    /// window of 256 places is tried place by place.)
    fn stub_free(&self, at: u64, len: u64) -> bool {
        let mut a = at;
        while a < at + len {
            let page = a & !(PAGE - 1);
            let end = (at + len).min(page + PAGE);
            let Some(p) = self.stubs.get(&page) else { return false };
            if !p.is_free(a - page, end - page) {
                return false;
            }
            a = end;
        }
        true
    }

    fn take_stub(&mut self, at: u64, len: u64) {
        let mut a = at;
        while a < at + len {
            let page = a & !(PAGE - 1);
            let end = (at + len).min(page + PAGE);
            if let Some(p) = self.stubs.get_mut(&page) {
                p.taken.push(((a - page) as u16, (end - page) as u16));
                p.next = p.next.max(end - page);
            }
            a = end;
        }
    }

    fn refresh_taken(&mut self, maps: &[MapEntry]) {
        let ours = self
            .code
            .iter()
            .chain(&self.data)
            .chain(&self.regions)
            .map(|a| (a.base, a.base + a.len));
        self.taken.refresh(maps, ours);
    }

    /// Map `len` bytes in the nearest free room to `near` (within [`MAX_DISTANCE`], away from
    /// where the heap and the stack grow).
    fn map_near(
        &mut self,
        near: u64,
        len: u64,
        maps: &[MapEntry],
        prot: i32,
    ) -> Result<u64, XolError> {
        self.refresh_taken(maps);
        let zones = self.taken.zones;
        // Candidates: both ends of each gap, and the zones' edges, closest first.
        let mut candidates: Vec<u64> = Vec::new();
        let (lo, hi) = (near.saturating_sub(MAX_DISTANCE), near.saturating_add(MAX_DISTANCE));
        for (glo, ghi) in self.taken.gaps(lo, hi) {
            if ghi <= glo || ghi - glo < len {
                continue;
            }
            candidates.push(glo);
            candidates.push(ghi - len);
            for &(zl, zh) in &zones {
                candidates.extend(
                    [zh, zl.saturating_sub(len)]
                        .into_iter()
                        .filter(|&c| glo <= c && c + len <= ghi),
                );
            }
        }
        candidates.retain(|&c| {
            c.abs_diff(near) < MAX_DISTANCE && c + len <= USER_END && !in_zones(&zones, c, c + len)
        });
        candidates.sort_by_key(|c| c.abs_diff(near));
        let mut last = sys::Errno(libc::ENOMEM);
        for c in candidates {
            match sys::mmap_anon(c as usize, len as usize, prot, 0) {
                Ok(a) => {
                    self.taken.add(a as u64, a as u64 + len);
                    return Ok(a as u64);
                }
                Err(e) => last = e,
            }
        }
        Err(XolError::NoArea { near, errno: last })
    }

    fn map_stub_pages(&mut self, page: u64, n: u64) -> bool {
        for k in 0..n {
            let p = page + k * PAGE;
            if self.stubs.contains_key(&p) {
                continue;
            }
            if !self.regions.iter().any(|r| r.base <= p && p < r.base + r.len) {
                let Some(region) = self.map_stub_region(p) else { return false };
                self.regions.push(region);
            }
            self.stubs.insert(p, StubPage::default());
        }
        true
    }

    /// Map a region holding `page` for stubs: the 64 MiB or else the 2 MiB one that contains it,
    /// where it is free, or the page alone. (One object's punned jumps need stubs on a thousand
    /// pages scattered over its ±2 GiB: with larger regions they take a few dozen mappings, not
    /// hundreds, each made read + execute at the next flush. A region is reserved, not used:
    /// only the pages stubs are written to take memory.)
    fn map_stub_region(&mut self, page: u64) -> Option<Area> {
        // With strict overcommit (`vm.overcommit_memory=2`) MAP_NORESERVE is ignored: a writable
        // region is charged whole, and stays charged once it has pages. There, 2 MiB regions.
        let sizes: &[u64] = if strict_overcommit() { &[2 << 20] } else { &[64 << 20, 2 << 20] };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let zones = self.taken.zones;
        for &size in sizes {
            let base = page & !(size - 1);
            let free = base >= 0x10000
                && base + size <= USER_END
                && !in_zones(&zones, base, base + size)
                && self
                    .taken
                    .gaps(base, base + size)
                    .iter()
                    .any(|&(lo, hi)| lo <= base && base + size <= hi);
            if free && sys::mmap_anon(base as usize, size as usize, rw, libc::MAP_NORESERVE).is_ok()
            {
                self.taken.add(base, base + size);
                return Some(Area { base, len: size, used: 0, fresh: true });
            }
        }
        let at = sys::mmap_anon(page as usize, PAGE as usize, rw, 0).ok()? as u64;
        self.taken.add(at, at + PAGE);
        Some(Area { base: at, len: PAGE, used: 0, fresh: true })
    }
}

/// Does the kernel charge every writable private mapping, MAP_NORESERVE or not?
fn strict_overcommit() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STRICT: AtomicU8 = AtomicU8::new(0); // 0: not read yet; 1: no; 2: yes
    match STRICT.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let mode = crate::runtime::fs::read_string("/proc/sys/vm/overcommit_memory");
            let strict = mode.is_ok_and(|m| m.trim() == "2");
            STRICT.store(if strict { 2 } else { 1 }, Ordering::Relaxed);
            strict
        }
    }
}

/// The end of the user address space (47-bit).
const USER_END: u64 = 0x7fff_ffff_f000;

/// Where the program's heap (brk) and main stack grow: no area of ours goes there, so that both
/// grow as they would without libuprobe.
pub fn growth_zones(maps: &[MapEntry]) -> [(u64, u64); 2] {
    const HEAP_ROOM: u64 = 256 << 20;
    let heap = match maps.iter().find(|m| m.path == "[heap]") {
        Some(h) => (h.start, h.start + HEAP_ROOM),
        None => {
            // No heap yet: it will start up to 32 MiB after the executable's last mapping (its
            // bss, an anonymous mapping right after its file's).
            let exe = maps.first().and_then(|m| m.file);
            let mut end = maps.iter().filter(|m| m.file == exe).map(|m| m.end).max().unwrap_or(0);
            if let Some(bss) = maps.iter().find(|m| m.start == end && m.file.is_none()) {
                end = bss.end;
            }
            if end == 0 {
                (0, 0)
            } else {
                (end, end + HEAP_ROOM + (32 << 20))
            }
        }
    };
    let stack = maps
        .iter()
        .find(|m| m.path == "[stack]")
        .map_or((0, 0), |s| (s.start.saturating_sub(256 << 20), s.end));
    [heap, stack]
}

fn in_zones(zones: &[(u64, u64)], lo: u64, hi: u64) -> bool {
    zones.iter().any(|&(zl, zh)| lo < zh && zl < hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64, file: Option<u64>, path: &str) -> MapEntry {
        MapEntry {
            start,
            end,
            prot: libc::PROT_READ,
            offset: 0,
            shared: false,
            file: file.map(|ino| crate::objects::FileId { dev: 1, ino }),
            path: path.into(),
        }
    }

    /// Before the program's first malloc there is no [heap]: the zone is after the executable
    /// (and its bss), not after whatever anonymous mapping comes next (that was the libraries'
    /// neighbourhood, where punned jumps need their stubs).
    #[test]
    fn the_heap_zone_follows_the_executable() {
        let maps = [
            entry(0x5000_0000, 0x5000_2000, Some(1), "/bin/x"),
            entry(0x5000_2000, 0x5000_3000, None, ""),
            entry(0x7f00_0000_0000, 0x7f00_0010_0000, None, ""),
            entry(0x7f00_0010_0000, 0x7f00_0020_0000, Some(2), "/lib/libc.so.6"),
            entry(0x7ffd_0000_0000, 0x7ffd_0002_1000, None, "[stack]"),
        ];
        let [heap, stack] = growth_zones(&maps);
        assert_eq!(heap.0, 0x5000_3000);
        assert!(heap.1 < 0x7f00_0000_0000);
        assert!(stack.0 < 0x7ffd_0000_0000 && stack.1 == 0x7ffd_0002_1000);
        let with_heap = [entry(0x5000_4000, 0x5000_8000, None, "[heap]")];
        assert_eq!(growth_zones(&with_heap)[0].0, 0x5000_4000);
    }

    #[test]
    fn stubs_go_where_nothing_is() {
        let maps = crate::objects::read_maps().unwrap();
        // A free page: one past the end of the lowest gap above 4 GiB that is 1 MiB long.
        let mut areas = Areas::default();
        areas.refresh_taken(&maps);
        let gaps = areas.taken.gaps(0, USER_END);
        let &(glo, _) = gaps.iter().find(|&&(lo, hi)| lo > 1 << 32 && hi - lo > 4 << 20).unwrap();
        let exact = glo + 0x1234;
        assert_eq!(areas.stub_in(exact, exact + 1, 6, &maps), Some(exact));
        // The same bytes are taken now; the next ones are free, on the same page.
        assert_eq!(areas.stub_in(exact, exact + 1, 6, &maps), None);
        assert_eq!(areas.stub_in(exact + 6, exact + 7, 6, &maps), Some(exact + 6));
        // A window: the first free place in it.
        let w = glo + 0x8000;
        assert_eq!(areas.stub_in(w, w + 256, 6, &maps), Some(w));
        assert_eq!(areas.stub_in(w, w + 256, 6, &maps), Some(w + 6));
        // A window starting in a mapping goes past it.
        let m = maps.iter().find(|m| m.start > 1 << 32).unwrap();
        let got = areas.stub_in(m.start, m.start + (64 << 20), 6, &maps).unwrap();
        assert!(got >= m.end, "{got:#x} inside {:#x}..{:#x}", m.start, m.end);
    }
}
