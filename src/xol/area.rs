//! Executable memory libuprobe writes its own code into (XOL slots, and the jump path's
//! trampolines), within reach of the code it serves. Areas are never unmapped, and a piece is
//! never handed out twice: a thread preempted inside libuprobe's code always finds the bytes it
//! started.

use super::decode::XolError;
use crate::objects::MapEntry;
use crate::sigsafe::sys;

struct Area {
    base: u64,
    len: u64,
    used: u64,
}

/// Every area. Owned by the registry (under its lock).
#[derive(Default)]
pub struct Areas {
    areas: Vec<Area>,
}

/// Size of one area.
const AREA_SIZE: u64 = 256 * 1024;
/// How far from the code it serves an area may be: well inside rel32 (±2 GiB), so that the code's
/// own RIP-relative targets (within its object) stay within reach of a copy too.
pub const MAX_DISTANCE: u64 = 1 << 30;

impl Areas {
    /// `size` bytes, aligned to `align`, within [`MAX_DISTANCE`] of `near`.
    pub fn alloc_near(
        &mut self,
        near: u64,
        size: u64,
        align: u64,
        maps: &[MapEntry],
    ) -> Result<u64, XolError> {
        let fits = |a: &Area| {
            let at = (a.base + a.used).next_multiple_of(align);
            a.base.abs_diff(near) < MAX_DISTANCE && at + size <= a.base + a.len
        };
        if let Some(a) = self.areas.iter_mut().find(|a| fits(a)) {
            let at = (a.base + a.used).next_multiple_of(align);
            a.used = at + size - a.base;
            return Ok(at);
        }
        let base = map_near(near, AREA_SIZE, maps)?;
        self.areas.push(Area { base, len: AREA_SIZE, used: size });
        Ok(base)
    }

    /// Write `code` at `at`, inside one of our areas. Other threads may be running code of ours on
    /// the same pages, so PROT_EXEC stays on throughout.
    pub fn write(&self, at: u64, code: &[u8]) -> Result<(), sys::Errno> {
        let end = at + code.len() as u64;
        debug_assert!(self.areas.iter().any(|a| a.base <= at && end <= a.base + a.len));
        let page = sys::PAGE as u64;
        let (lo, hi) = (at & !(page - 1), (end + page - 1) & !(page - 1));
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        // SAFETY: [lo, hi) lies inside one of our areas, which nothing else uses; the bytes
        // written were never handed out before, so no thread runs them.
        unsafe {
            sys::mprotect(lo as usize, (hi - lo) as usize, rwx)?;
            core::ptr::copy_nonoverlapping(code.as_ptr(), at as *mut u8, code.len());
            sys::mprotect(lo as usize, (hi - lo) as usize, libc::PROT_READ | libc::PROT_EXEC)
        }
    }

    /// Bytes of code memory mapped so far.
    pub fn mapped_bytes(&self) -> u64 {
        self.areas.iter().map(|a| a.len).sum()
    }

    /// Is `addr` inside one of our areas?
    pub fn contains(&self, addr: u64) -> bool {
        self.areas.iter().any(|a| a.base <= addr && addr < a.base + a.len)
    }
}

/// Map `len` bytes of executable memory in the nearest free gap to `near`.
pub fn map_near(near: u64, len: u64, maps: &[MapEntry]) -> Result<u64, XolError> {
    let mut gaps = Vec::new();
    let mut prev_end = 0x10000u64;
    for m in maps {
        if m.start > prev_end {
            gaps.push((prev_end, m.start));
        }
        prev_end = prev_end.max(m.end);
    }
    gaps.push((prev_end, 0x7fff_ffff_0000));
    // Candidates: the end of each gap's lower side and the start of its upper side, closest first.
    let mut candidates: Vec<u64> = Vec::new();
    for (lo, hi) in gaps {
        if hi <= lo || hi - lo < len {
            continue;
        }
        candidates.push(lo);
        candidates.push(hi - len);
    }
    candidates.retain(|c| c.abs_diff(near) < MAX_DISTANCE && *c + len <= 0x7fff_ffff_0000);
    candidates.sort_by_key(|c| c.abs_diff(near));
    let prot = libc::PROT_READ | libc::PROT_EXEC;
    let mut last = sys::Errno(libc::ENOMEM);
    for c in candidates {
        match sys::mmap_anon(c as usize, len as usize, prot, 0) {
            Ok(a) => return Ok(a as u64),
            Err(e) => last = e,
        }
    }
    Err(XolError::NoArea { near, errno: last })
}
