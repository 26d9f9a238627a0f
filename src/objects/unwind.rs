//! What the stack unwinder (`sigsafe::unwind`) needs of the loaded objects: for each mapped
//! instance of a file, its code range and its `.eh_frame_hdr` index, read from the program
//! headers where the loader mapped them (no libc call, no loader lock: this runs in the loader's
//! own hook too). Rebuilt when objects come and go, while stacks are wanted; the same list names
//! the objects when stacks are symbolized.

use std::sync::atomic::{AtomicBool, Ordering};

use super::maps::MapEntry;
use crate::runtime::lock::Mutex;
use crate::sigsafe::stacks::{self, Entry, ENTRIES};
use crate::sigsafe::sys;
use crate::sigsafe::unwind::{self, CodeRow, Module, Modules};

/// An object instance, as stacks are symbolized: [lo, hi), its load bias and its path.
#[derive(Clone, Debug)]
pub struct Placed {
    pub lo: u64,
    pub hi: u64,
    pub bias: u64,
    pub path: String,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static PLACED: Mutex<Vec<Placed>> = Mutex::new(Vec::new());

/// Stacks are wanted: map the table of counted stacks, and build the list of objects.
pub fn enable(maps: &[MapEntry]) -> Result<(), String> {
    if stacks::TABLE.load(Ordering::Acquire).is_null() {
        let len = ENTRIES * std::mem::size_of::<Entry>();
        let t = sys::mmap_far(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_NORESERVE)
            .map_err(|e| format!("cannot map {} KiB for stacks: {e}", len / 1024))?;
        stacks::TABLE.store(t as *mut Entry, Ordering::Release);
    }
    if !ENABLED.swap(true, Ordering::AcqRel) {
        refresh(maps);
    }
    Ok(())
}

/// The objects changed: a new list for the unwinder (the caller holds the registry's lock).
pub fn refresh(maps: &[MapEntry]) {
    if !ENABLED.load(Ordering::Acquire) {
        return;
    }
    let (list, placed) = scan(maps);
    *LIST.lock() = list.clone();
    publish(list);
    *PLACED.lock() = placed;
}

/// libuprobe's code in the program, as the unwinder sees it (see `xol::cfi`), sorted by `lo`.
static CODE: Mutex<Vec<CodeRow>> = Mutex::new(Vec::new());
/// The objects of the last snapshot.
static LIST: Mutex<Vec<Module>> = Mutex::new(Vec::new());

/// New code of libuprobe's in the program: the unwinder steps through it from now on.
pub fn add_code(rows: &[CodeRow]) {
    if rows.is_empty() {
        return;
    }
    {
        let mut code = CODE.lock();
        code.extend_from_slice(rows);
        code.sort_unstable_by_key(|r| r.lo);
    }
    if ENABLED.load(Ordering::Acquire) {
        let list = LIST.lock().clone();
        publish(list);
    }
}

/// The part of libuprobe's code at `pc`, if it is any.
pub fn code_at(pc: u64) -> Option<CodeRow> {
    let code = CODE.lock();
    let i = code.partition_point(|c| c.lo <= pc);
    code.get(i.checked_sub(1)?).filter(|c| pc < c.hi).copied()
}

/// Module `list` (sorted) and the code rows, published to the unwinder.
fn publish(list: Vec<Module>) {
    let code = CODE.lock().clone();
    let new = Box::into_raw(Box::new(Modules { list, code }));
    // SAFETY: `new` is a fresh box, not used here again; the old one is no longer reachable.
    let old = unsafe { unwind::replace_modules(new) };
    if !old.is_null() {
        // SAFETY: returned by replace_modules once no reader holds it; it came from Box::into_raw.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// The object instance holding `addr`, when stacks are on.
pub fn placed_at(addr: u64) -> Option<Placed> {
    PLACED.lock().iter().find(|p| p.lo <= addr && addr < p.hi).cloned()
}

fn read<const N: usize>(addr: u64) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    sys::read_bytes_safely(addr, &mut b).then_some(b)
}
fn u16_at(a: u64) -> Option<u64> {
    read::<2>(a).map(|b| u64::from(u16::from_le_bytes(b)))
}
fn u32_at(a: u64) -> Option<u64> {
    read::<4>(a).map(|b| u64::from(u32::from_le_bytes(b)))
}
fn u64_at(a: u64) -> Option<u64> {
    read::<8>(a).map(u64::from_le_bytes)
}

const PT_LOAD: u64 = 1;
const PT_GNU_EH_FRAME: u64 = 0x6474_e550;

/// One mapped instance whose ELF header is at `base`.
fn instance(base: u64, path: &str) -> Option<(Module, Placed)> {
    if read::<4>(base)? != *b"\x7fELF" {
        return None;
    }
    let (phoff, phentsize, phnum) =
        (u64_at(base + 0x20)?, u16_at(base + 0x36)?, u16_at(base + 0x38)?);
    let mut loads: Vec<(u64, u64, u64)> = Vec::new(); // vaddr, memsz, offset
    let mut eh: Option<(u64, u64)> = None;
    for i in 0..phnum {
        let ph = base + phoff + i * phentsize;
        let ty = u32_at(ph)?;
        let (offset, vaddr, memsz) = (u64_at(ph + 8)?, u64_at(ph + 16)?, u64_at(ph + 40)?);
        match ty {
            PT_LOAD => loads.push((vaddr, memsz, offset)),
            PT_GNU_EH_FRAME => eh = Some((vaddr, memsz)),
            _ => {}
        }
    }
    let first = loads.iter().find(|l| l.2 == 0).or(loads.first())?;
    let bias = base.wrapping_sub(first.0 & !0xfff);
    let hi = loads.iter().map(|l| bias.wrapping_add(l.0 + l.1)).max()?;
    let placed = Placed { lo: base, hi, bias, path: path.to_string() };
    let mut m = Module { lo: base, hi, ..Default::default() };
    if let Some((vaddr, memsz)) = eh {
        let hdr = bias.wrapping_add(vaddr);
        let [version, ptr_enc, count_enc, table_enc] = read::<4>(hdr)?;
        // What GNU ld and lld write: a pc-relative 4-byte pointer to .eh_frame, a 4-byte count,
        // a table of 4-byte offsets from the header.
        if version == 1 && ptr_enc == 0x1b && count_enc == 0x03 && table_enc == 0x3b {
            let eh_lo = (hdr + 4).wrapping_add(u32_at(hdr + 4)? as u32 as i32 as i64 as u64);
            let holder =
                loads.iter().map(|l| (bias.wrapping_add(l.0), bias.wrapping_add(l.0 + l.1)));
            let eh_hi = holder.clone().find(|(lo, hi)| *lo <= eh_lo && eh_lo < *hi)?.1;
            m.hdr = hdr;
            m.hdr_end = hdr + memsz;
            m.count = u32_at(hdr + 8)?;
            m.table = hdr + 12;
            m.eh_lo = eh_lo;
            m.eh_hi = eh_hi;
        }
    }
    Some((m, placed))
}

pub fn scan(maps: &[MapEntry]) -> (Vec<Module>, Vec<Placed>) {
    let mut list = Vec::new();
    let mut placed = Vec::new();
    for m in maps.iter().filter(|m| m.offset == 0 && m.file.is_some() && m.path.starts_with('/')) {
        // Only files that have code mapped somewhere (not data files mapped by the program).
        let has_code = maps.iter().any(|x| x.file == m.file && x.is_exec());
        if !has_code {
            continue;
        }
        let path = m.path.trim_end_matches(" (deleted)");
        if let Some((module, p)) = instance(m.start, path) {
            list.push(module);
            placed.push(p);
        }
    }
    list.sort_by_key(|m| m.lo);
    placed.sort_by_key(|p| p.lo);
    (list, placed)
}
