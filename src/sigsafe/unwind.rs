//! User stacks at a hit: an x86-64 unwinder driven by the objects' `.eh_frame` call frame
//! information (indexed by `.eh_frame_hdr`), so that code built without frame pointers (every
//! library of a distribution) unwinds fully; frame pointers where an address has no CFI.
//!
//! It runs in the signal handler and in the jump path's full entry: no allocation, no lock, no
//! panic. The objects' unwind sections are read where the loader mapped them (every read checked
//! against the section's bounds); the stack is read with the fault-recovering load, so that a
//! wrong frame ends the stack instead of faulting. The list of objects is a snapshot, built by
//! the runtime when objects come and go (`objects::unwind`) and published here; it is read under
//! the lookup table's read guard, and a replaced one is freed only after every reader left.
//!
//! framehop (samply's unwinder) was evaluated first: it can unwind without allocating, but its
//! DWARF parsing (gimli) has panic paths that would be reachable from the handlers, which
//! `tests/signal_safe.rs` forbids (a panic there aborts the program). What is handled here is
//! what compilers emit for x86-64 functions: CFA as a register plus offset, and the return
//! address and rbp saved at offsets from it; a frame that needs a DWARF expression (a PLT entry,
//! a signal trampoline) ends the stack.

use core::sync::atomic::{AtomicPtr, Ordering};

use super::sys;

/// Deepest stack recorded.
pub const MAX_FRAMES: usize = 127;

/// A loaded object's code range and its unwind index, in this process's memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Module {
    /// Addresses of its loaded segments: [lo, hi).
    pub lo: u64,
    pub hi: u64,
    /// `.eh_frame_hdr`'s search table: `count` pairs of 4-byte (initial location, FDE address),
    /// both relative to `hdr` (`DW_EH_PE_datarel | DW_EH_PE_sdata4`), sorted.
    pub hdr: u64,
    pub hdr_end: u64,
    pub table: u64,
    pub count: u64,
    /// `.eh_frame`, as far as the segment that holds it goes.
    pub eh_lo: u64,
    pub eh_hi: u64,
}

/// The objects, sorted by `lo`; and libuprobe's own code in the program (bodies, stubs, slots),
/// each range with the site it stands for, sorted by `lo` and disjoint.
pub struct Modules {
    pub list: Vec<Module>,
    pub code: Vec<CodeRow>,
}

/// A range of libuprobe's code run in place of the program's, and the frame rules there in terms
/// of the site's own (see `xol::cfi`, which writes the same rules as DWARF for other unwinders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRow {
    pub lo: u64,
    pub hi: u64,
    /// The probed instruction's address and length.
    pub site: u64,
    pub site_len: u8,
    /// The rules from each offset on (the first at 0); interned, never freed.
    pub rows: &'static [(u32, CodeKind)],
}

impl CodeRow {
    /// The rules at `pc` (inside the range).
    pub fn kind_at(&self, pc: u64) -> CodeKind {
        let off = pc.wrapping_sub(self.lo);
        let i = self.rows.partition_point(|r| u64::from(r.0) <= off);
        self.rows.get(i.wrapping_sub(1)).map_or(CodeKind::Site(0), |r| r.1)
    }
}

/// The rules in a range of libuprobe's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeKind {
    /// The site's, with `n` more bytes pushed below the program's rsp (fewer, if negative: the
    /// relocated copy of a `pop` has run).
    Site(i32),
    /// Those after the probed instruction, read from its function's rules (its relocated copy
    /// has run and set rsp in a way the bytes pushed do not say: `leave`, `mov rsp, rbp`).
    Next,
    /// A function's first instruction's: a relocated call has pushed its return address and
    /// jumps to the callee.
    Entry,
}

/// The snapshot in use (null: none built yet).
static MODULES: AtomicPtr<Modules> = AtomicPtr::new(core::ptr::null_mut());

/// Publish `new` and return the snapshot it replaces once no reader can still be reading it; the
/// caller frees it (null: it must not be freed, a reader may hold it for good: see
/// `table::wait_for_readers`). The caller holds the registry's lock.
///
/// # Safety
/// `new` comes from `Box::into_raw` and is not used by the caller afterwards.
pub unsafe fn replace_modules(new: *mut Modules) -> *mut Modules {
    static PUBLISHED_AT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    // SAFETY: the caller's contract.
    unsafe { super::table::retire(&MODULES, &PUBLISHED_AT, new) }
}

/// The snapshot; the caller holds a [`super::table::ReadGuard`] for as long as it uses it.
fn modules(_guard: &super::table::ReadGuard) -> Option<&Modules> {
    let p = MODULES.load(Ordering::SeqCst);
    // SAFETY: a replaced snapshot is freed only after the readers of the guard's epoch left.
    unsafe { p.as_ref() }
}

impl Modules {
    fn find(&self, pc: u64) -> Option<&Module> {
        let list = &self.list;
        let i = list.partition_point(|m| m.lo <= pc);
        let m = list.get(i.checked_sub(1)?)?;
        (pc < m.hi).then_some(m)
    }

    fn code_row(&self, pc: u64) -> Option<&CodeRow> {
        let i = self.code.partition_point(|c| c.lo <= pc);
        let c = self.code.get(i.checked_sub(1)?)?;
        (pc < c.hi).then_some(c)
    }

    /// The rules at `pc`: in an object's code from its `.eh_frame`, in libuprobe's code from
    /// the site's.
    fn row(&self, pc: u64) -> Option<Row> {
        if let Some(m) = self.find(pc) {
            return row_at(m, pc);
        }
        let c = self.code_row(pc)?;
        match c.kind_at(pc) {
            CodeKind::Entry => Some(ENTRY_ROW),
            CodeKind::Next => {
                // Those after the instruction, if its function's rules go on past it.
                let next = c.site.wrapping_add(u64::from(c.site_len));
                let m = self.find(c.site)?;
                let (_, _, _, end) = find_fde(m, c.site)?;
                row_at(m, if next < end { next } else { c.site })
            }
            CodeKind::Site(pushed) => {
                let mut row = self.find(c.site).and_then(|m| row_at(m, c.site))?;
                if row.cfa_reg == RSP {
                    row.cfa_off += i64::from(pushed);
                }
                Some(row)
            }
        }
    }
}

/// The rules at a function's first instruction: the return address at the top of the stack.
const ENTRY_ROW: Row = Row { cfa_reg: RSP, cfa_off: 8, rbp: Rule::Same, ra: Rule::At(-8) };

/// A bounded reader over memory the loader mapped (an object's unwind sections).
#[derive(Clone, Copy)]
struct Cursor {
    at: u64,
    end: u64,
}

impl Cursor {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let next = self.at.checked_add(N as u64)?;
        if next > self.end {
            return None;
        }
        // SAFETY: [at, next) lies within a section of a loaded object (checked above against
        // bounds taken from its program headers), which stays mapped while it is loaded.
        let v = unsafe { core::ptr::read_unaligned(self.at as *const [u8; N]) };
        self.at = next;
        Some(v)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
    fn uleb(&mut self) -> Option<u64> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
    }
    fn sleb(&mut self) -> Option<i64> {
        let (mut v, mut shift) = (0i64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return Some(v);
            }
        }
    }
    /// A pointer in `DW_EH_PE` encoding `enc` (pc-relative or absolute; no indirection).
    fn pointer(&mut self, enc: u8) -> Option<u64> {
        let here = self.at;
        let v = match enc & 0x0f {
            0x00 => self.u64()?,
            0x01 => self.uleb()?,
            0x02 => u64::from(self.u16()?),
            0x03 => u64::from(self.u32()?),
            0x04 => self.u64()?,
            0x09 => self.sleb()? as u64,
            0x0a => self.u16()? as i16 as i64 as u64,
            0x0b => self.u32()? as i32 as i64 as u64,
            0x0c => self.u64()?,
            _ => return None,
        };
        match enc & 0x70 {
            0x00 => Some(v),
            0x10 => Some(here.wrapping_add(v)),
            _ => None,
        }
    }
}

/// How to find a register of the caller.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Unchanged (callee-saved and not saved, or same value).
    Same,
    /// Saved at CFA + n.
    At(i64),
    /// Not recoverable (the return address of the outermost frame).
    Undefined,
}

#[derive(Clone, Copy)]
struct Row {
    cfa_reg: u16,
    cfa_off: i64,
    rbp: Rule,
    ra: Rule,
}

const RSP: u16 = 7;
const RBP: u16 = 6;

/// The CIE's part of the rules.
#[derive(Clone, Copy)]
struct Cie {
    code_align: u64,
    data_align: i64,
    ra_reg: u64,
    fde_enc: u8,
    has_aug_data: bool,
    instructions: Cursor,
}

fn parse_cie(at: u64, m: &Module) -> Option<Cie> {
    // A damaged CIE pointer must not take the reader out of the section (before it, above all:
    // what lies there may not be mapped).
    if at < m.eh_lo || at >= m.eh_hi {
        return None;
    }
    let mut c = Cursor { at, end: m.eh_hi };
    let len = u64::from(c.u32()?);
    if len == 0 || len == 0xffff_ffff {
        return None;
    }
    let end = c.at.checked_add(len)?;
    if end > m.eh_hi {
        return None;
    }
    c.end = end;
    if c.u32()? != 0 {
        return None; // not a CIE
    }
    let version = c.u8()?;
    let mut aug = [0u8; 8];
    let mut n = 0;
    loop {
        let b = c.u8()?;
        if b == 0 {
            break;
        }
        *aug.get_mut(n)? = b;
        n += 1;
    }
    let code_align = c.uleb()?;
    let data_align = c.sleb()?;
    let ra_reg = if version == 1 { u64::from(c.u8()?) } else { c.uleb()? };
    let mut fde_enc = 0u8;
    let mut has_aug_data = false;
    if aug.first() == Some(&b'z') {
        has_aug_data = true;
        let aug_len = c.uleb()?;
        let data_end = c.at.checked_add(aug_len)?;
        for &a in aug.get(1..n)? {
            match a {
                b'R' => fde_enc = c.u8()?,
                b'L' => {
                    c.u8()?;
                }
                b'P' => {
                    let enc = c.u8()?;
                    c.pointer(enc & 0x7f)?;
                }
                b'S' | b'B' => {}
                _ => return None,
            }
        }
        c.at = data_end;
    } else if n != 0 {
        return None; // an augmentation this unwinder does not know
    }
    Some(Cie { code_align, data_align, ra_reg, fde_enc, has_aug_data, instructions: c })
}

/// Run call frame instructions from `c` until the location passes `target`.
///
/// `keep`, when there is one, is given the bytes of each instruction that sets a rule (every one
/// but the advances), in order: replayed from an empty row, they give the row at `target`. An
/// unwind has none (the operands would be read twice, at every frame).
fn execute(
    c: &mut Cursor,
    cie: &Cie,
    row: &mut Row,
    initial: &Row,
    loc: &mut u64,
    target: u64,
    mut keep: Option<&mut dyn FnMut(u64, u64)>,
) -> Option<()> {
    let mut saved = [*row; 8];
    let mut depth = 0usize;
    let set = |row: &mut Row, reg: u64, rule: Rule| {
        if reg == u64::from(RBP) {
            row.rbp = rule;
        } else if reg == cie.ra_reg {
            row.ra = rule;
        }
    };
    let restore = |row: &mut Row, reg: u64| {
        if reg == u64::from(RBP) {
            row.rbp = initial.rbp;
        } else if reg == cie.ra_reg {
            row.ra = initial.ra;
        }
    };
    while c.at < c.end {
        let start = c.at;
        let op = c.u8()?;
        if let Some(keep) = keep.as_mut().filter(|_| !(op >> 6 == 1 || (0x01..=0x04).contains(&op)))
        {
            // Not an advance: its bytes go into a replay whatever follows (the operands are
            // read below; the length is known once they are).
            let mut probe = Cursor { at: c.at, end: c.end };
            if skip_operands(&mut probe, op, cie)? {
                keep(start, probe.at);
            }
        }
        let advance = |loc: &mut u64, delta: u64| -> bool {
            *loc = loc.wrapping_add(delta.wrapping_mul(cie.code_align));
            *loc > target
        };
        match op >> 6 {
            1 => {
                if advance(loc, u64::from(op & 0x3f)) {
                    return Some(());
                }
                continue;
            }
            2 => {
                let off = c.uleb()? as i64 * cie.data_align;
                set(row, u64::from(op & 0x3f), Rule::At(off));
                continue;
            }
            3 => {
                restore(row, u64::from(op & 0x3f));
                continue;
            }
            _ => {}
        }
        match op {
            0x00 => {}                                                   // nop
            0x01 => *loc = c.pointer(cie.fde_enc)?,                      // set_loc
            0x02 if advance(loc, u64::from(c.u8()?)) => return Some(()), // advance_loc1
            0x03 if advance(loc, u64::from(c.u16()?)) => return Some(()),
            0x04 if advance(loc, u64::from(c.u32()?)) => return Some(()),
            0x02..=0x04 => {}
            0x05 => {
                // offset_extended
                let reg = c.uleb()?;
                let off = c.uleb()? as i64 * cie.data_align;
                set(row, reg, Rule::At(off));
            }
            0x06 => restore(row, c.uleb()?), // restore_extended
            0x07 => set(row, c.uleb()?, Rule::Undefined),
            0x08 => set(row, c.uleb()?, Rule::Same),
            0x09 => {
                // register: a caller's register kept in another register
                let reg = c.uleb()?;
                c.uleb()?;
                if reg == u64::from(RBP) || reg == cie.ra_reg {
                    return None;
                }
            }
            0x0a => {
                // remember_state
                *saved.get_mut(depth)? = *row;
                depth += 1;
            }
            0x0b => {
                // restore_state: the location stays
                depth = depth.checked_sub(1)?;
                *row = *saved.get(depth)?;
            }
            0x0c => {
                row.cfa_reg = u16::try_from(c.uleb()?).ok()?;
                row.cfa_off = c.uleb()? as i64;
            }
            0x0d => row.cfa_reg = u16::try_from(c.uleb()?).ok()?,
            0x0e => row.cfa_off = c.uleb()? as i64,
            0x11 => {
                // offset_extended_sf
                let reg = c.uleb()?;
                let off = c.sleb()? * cie.data_align;
                set(row, reg, Rule::At(off));
            }
            0x12 => {
                row.cfa_reg = u16::try_from(c.uleb()?).ok()?;
                row.cfa_off = c.sleb()? * cie.data_align;
            }
            0x13 => row.cfa_off = c.sleb()? * cie.data_align,
            0x2e => {
                c.uleb()?; // GNU_args_size
            }
            0x0f => return None, // def_cfa_expression: a PLT entry, a signal frame
            0x10 | 0x16 => {
                // expression, val_expression: fine for other registers, not for ours
                let reg = c.uleb()?;
                let len = c.uleb()?;
                c.at = c.at.checked_add(len)?;
                if reg == u64::from(RBP) || reg == cie.ra_reg {
                    return None;
                }
            }
            0x14 | 0x15 => {
                // val_offset(_sf): the caller's register is an address; not ours in practice
                let reg = c.uleb()?;
                if op == 0x14 {
                    c.uleb()?;
                } else {
                    c.sleb()?;
                }
                if reg == u64::from(RBP) || reg == cie.ra_reg {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(())
}

/// Step over the operands of call frame instruction `op`; false for one that sets nothing.
fn skip_operands(c: &mut Cursor, op: u8, cie: &Cie) -> Option<bool> {
    match op >> 6 {
        2 => {
            c.uleb()?;
            return Some(true);
        }
        1 | 3 => return Some(true),
        _ => {}
    }
    match op {
        0x00 => return Some(false),
        0x01 => {
            c.pointer(cie.fde_enc)?;
        }
        0x02 => {
            c.u8()?;
        }
        0x03 => {
            c.u16()?;
        }
        0x04 => {
            c.u32()?;
        }
        0x06..=0x08 | 0x0d | 0x0e | 0x13 | 0x2e => {
            c.uleb()?;
        }
        0x0a | 0x0b => {}
        0x05 | 0x09 | 0x0c | 0x14 => {
            c.uleb()?;
            c.uleb()?;
        }
        0x11 | 0x12 | 0x15 => {
            c.uleb()?;
            c.sleb()?;
        }
        0x0f => {
            let len = c.uleb()?;
            c.at = c.at.checked_add(len)?;
        }
        0x10 | 0x16 => {
            c.uleb()?;
            let len = c.uleb()?;
            c.at = c.at.checked_add(len)?;
        }
        _ => return None,
    }
    Some(true)
}

/// Where `pc`'s rules are: its FDE's CIE, the FDE's instructions and the range it covers.
fn find_fde(m: &Module, pc: u64) -> Option<(Cie, Cursor, u64, u64)> {
    // Binary search of the header's table for the last entry at or below pc.
    let (mut lo, mut hi) = (0u64, m.count);
    let entry = |i: u64| -> Option<(u64, u64)> {
        let mut c = Cursor { at: m.table.checked_add(i.checked_mul(8)?)?, end: m.hdr_end };
        let (loc, fde) = (c.u32()? as i32 as i64 as u64, c.u32()? as i32 as i64 as u64);
        Some((m.hdr.wrapping_add(loc), m.hdr.wrapping_add(fde)))
    };
    if m.count == 0 || m.table.checked_add(m.count.checked_mul(8)?)? > m.hdr_end {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if entry(mid)?.0 <= pc {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (start, fde) = entry(lo)?;
    if start > pc || fde < m.eh_lo || fde >= m.eh_hi {
        return None;
    }
    // The FDE.
    let mut c = Cursor { at: fde, end: m.eh_hi };
    let len = u64::from(c.u32()?);
    if len == 0 || len == 0xffff_ffff {
        return None;
    }
    c.end = c.at.checked_add(len)?.min(m.eh_hi);
    let cie_ptr = c.at;
    let cie_off = u64::from(c.u32()?);
    let cie = parse_cie(cie_ptr.checked_sub(cie_off)?, m)?;
    let pc_begin = c.pointer(cie.fde_enc)?;
    let pc_range = c.pointer(cie.fde_enc & 0x0f)?;
    if pc < pc_begin || pc >= pc_begin.wrapping_add(pc_range) {
        return None;
    }
    if cie.has_aug_data {
        let n = c.uleb()?;
        c.at = c.at.checked_add(n)?;
    }
    Some((cie, c, pc_begin, pc_begin.wrapping_add(pc_range)))
}

/// CIEs already read, with their initial rules (by the CIE's address): most FDEs of an object
/// share one or two.
#[derive(Default)]
pub struct CieCache {
    entries: [Option<(u64, Row)>; 4],
    /// The entry the next miss replaces (round robin: no moves, which would be a `memmove`).
    next: usize,
}

/// The rules at `pc` in module `m` (None: no FDE for it, or one this unwinder does not follow), with
/// its CIE, the FDE's range and where the next row starts; `keep` is given the instructions that
/// rebuild them (see [`execute`]). For `xol::cfi`, which asks for many sites at once; an unwind
/// asks [`row_at`].
fn rules_at_cached(
    m: &Module,
    pc: u64,
    keep: Option<&mut dyn FnMut(u64, u64)>,
    cache: &mut CieCache,
) -> Option<(Row, Cie, u64, u64, u64)> {
    let (cie, mut c, pc_begin, pc_end) = find_fde(m, pc)?;
    let key = cie.instructions.at;
    let cached = cache.entries.iter().flatten().find(|(k, _)| *k == key);
    let initial = match cached {
        Some(&(_, row)) => row,
        None => {
            let mut row = ENTRY_ROW;
            let mut loc = pc_begin;
            let mut init = Cursor { at: cie.instructions.at, end: cie.instructions.end };
            let start_row = row;
            execute(&mut init, &cie, &mut row, &start_row, &mut loc, u64::MAX, None)?;
            let at = cache.next % cache.entries.len();
            if let Some(e) = cache.entries.get_mut(at) {
                *e = Some((key, row));
            }
            cache.next = at + 1;
            row
        }
    };
    let mut row = initial;
    let mut loc = pc_begin;
    execute(&mut c, &cie, &mut row, &initial, &mut loc, pc, keep)?;
    // `loc` passed `pc` at an advance (the next row's start), or the instructions ended.
    let next_row = if loc > pc { loc.min(pc_end) } else { pc_end };
    Some((row, cie, pc_begin, pc_end, next_row))
}

/// The rules at `pc` alone: what an unwind asks at every frame, on the shortest way.
fn row_at(m: &Module, pc: u64) -> Option<Row> {
    let (cie, mut c, pc_begin, _) = find_fde(m, pc)?;
    let mut row = ENTRY_ROW;
    let mut loc = pc_begin;
    let mut init = Cursor { at: cie.instructions.at, end: cie.instructions.end };
    execute(&mut init, &cie, &mut row, &ENTRY_ROW, &mut loc, u64::MAX, None)?;
    let initial = row;
    loc = pc_begin;
    execute(&mut c, &cie, &mut row, &initial, &mut loc, pc, None)?;
    Some(row)
}

/// What another unwinder needs to rebuild the rules at `pc` of module `m` (not for a handler:
/// `xol::cfi` asks, when it writes the unwind information of new code).
#[derive(Clone, Copy, Debug)]
pub struct SiteRules {
    pub code_align: u64,
    pub data_align: i64,
    pub ra_reg: u64,
    /// The CIE's initial instructions, where the loader mapped them.
    pub cie_init: (u64, u64),
    /// The CFA is rsp + this (None: another register, or an expression).
    pub cfa_rsp: Option<i64>,
    /// The FDE's range.
    pub fde: (u64, u64),
    /// Where the rules change next after `pc` (or the FDE's end).
    pub next_row: u64,
}

/// The rules at `pc` (see [`SiteRules`]); `keep` gets the FDE's instructions that set them.
pub fn site_rules(
    m: &Module,
    pc: u64,
    keep: &mut dyn FnMut(u64, u64),
    cache: &mut CieCache,
) -> Option<SiteRules> {
    let (row, cie, lo, hi, next_row) = rules_at_cached(m, pc, Some(keep), cache)?;
    Some(SiteRules {
        code_align: cie.code_align,
        data_align: cie.data_align,
        ra_reg: cie.ra_reg,
        cie_init: (cie.instructions.at, cie.instructions.end),
        cfa_rsp: (row.cfa_reg == RSP).then_some(row.cfa_off),
        fde: (lo, hi),
        next_row,
    })
}

/// The return address saved at `slot`: where a return probe put its trampoline, the real one.
fn read_return(slot: u64) -> Option<u64> {
    let ra = sys::read_u64_safely(slot)?;
    if ra == super::ret::trampoline() {
        return super::ret::real_return(slot);
    }
    Some(ra)
}

/// The restorer a signal handler returns to (glibc's `__restore_rt`, libuprobe's own:
/// `mov rax, 15; syscall`).
const SIGRETURN: [u8; 7] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00];

/// Is `pc` the restorer a signal handler returns to? Its `syscall` may be probed: libuprobe's mask
/// fix puts an int3 or a jump on it.
pub fn is_sigreturn(pc: u64) -> bool {
    // Asked at every frame of every unwind: one aligned load decides for nearly every pc (its
    // first byte is not the restorer's); a second (the next word) only when it may be.
    let (word, shift) = (pc & !7, (pc & 7) * 8);
    let Some(lo) = sys::read_u64_safely(word) else { return false };
    if (lo >> shift) as u8 != SIGRETURN[0] {
        return false;
    }
    let v = if shift == 0 {
        lo
    } else {
        let Some(hi) = sys::read_u64_safely(word.wrapping_add(8)) else { return false };
        (lo >> shift) | (hi << (64 - shift))
    };
    let b = v.to_le_bytes();
    b[..7] == SIGRETURN && matches!(b[7], 0x0f | 0xcc | 0xe9)
}

/// The registers a signal interrupted, from the frame at `sp` (where the restorer runs: the
/// `ucontext_t` the kernel wrote, its `gregs` 40 bytes in).
fn interrupted(sp: u64) -> Option<Regs> {
    let greg = |i: u64| sys::read_u64_safely(sp.wrapping_add(40 + 8 * i));
    Some(Regs { pc: greg(16)?, sp: greg(15)?, bp: greg(10)? })
}

/// The registers an unwind needs.
#[derive(Clone, Copy)]
pub struct Regs {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
}

/// Fill `out` with the stack at `regs`, innermost first: the probed instruction, then each
/// return address. Returns how many frames.
pub fn unwind(guard: &super::table::ReadGuard, regs: Regs, out: &mut [u64; MAX_FRAMES]) -> usize {
    let Some(mods) = modules(guard) else { return 0 };
    let Regs { mut pc, mut sp, mut bp } = regs;
    let mut n = 0;
    // The pc is where the thread was stopped (the first frame, or one a signal interrupted), not
    // a return address.
    let mut exact = true;
    for slot in out.iter_mut() {
        if pc == 0 {
            break;
        }
        *slot = pc;
        n += 1;
        // A return address points after its call: its rules are the call's (pc - 1).
        let lookup = if exact { pc } else { pc.wrapping_sub(1) };
        exact = false;
        if is_sigreturn(pc) {
            // A signal handler returns here; the frame holds the interrupted registers.
            let Some(regs) = interrupted(sp) else { break };
            (pc, sp, bp) = (regs.pc, regs.sp, regs.bp);
            exact = true;
            continue;
        }
        let row = mods.row(lookup);
        let (next_pc, next_sp, next_bp) = match row {
            Some(row) => {
                let base = match row.cfa_reg {
                    RSP => sp,
                    RBP => bp,
                    _ => break,
                };
                let cfa = base.wrapping_add(row.cfa_off as u64);
                let ra = match row.ra {
                    Rule::At(off) => match read_return(cfa.wrapping_add(off as u64)) {
                        Some(v) => v,
                        None => break,
                    },
                    _ => break, // the outermost frame (`_start`, a thread's start)
                };
                let nbp = match row.rbp {
                    Rule::At(off) => match sys::read_u64_safely(cfa.wrapping_add(off as u64)) {
                        Some(v) => v,
                        None => break,
                    },
                    Rule::Same => bp,
                    Rule::Undefined => 0,
                };
                (ra, cfa, nbp)
            }
            None => {
                // No CFI here: frame pointers, if rbp looks like one.
                if bp <= sp || bp.wrapping_sub(sp) > (64 << 20) || bp & 7 != 0 {
                    break;
                }
                let (Some(ra), Some(nbp)) =
                    (read_return(bp.wrapping_add(8)), sys::read_u64_safely(bp))
                else {
                    break;
                };
                (ra, bp.wrapping_add(16), nbp)
            }
        };
        if next_sp <= sp {
            break; // the stack must grow towards the caller
        }
        (pc, sp, bp) = (next_pc, next_sp, next_bp);
    }
    n
}
