//! Unwind information for the code libuprobe runs in the program: bodies, stubs and XOL slots, so
//! that a sampling profiler, `backtrace()`, a C++ unwinder, gdb and libuprobe's own `%stack` step
//! through them to the program's caller, as they would through the probed instruction.
//!
//! The rules of that code are the site's own (the program's `.eh_frame` at the probed
//! instruction) with the bytes the body pushed below the program's rsp added to the CFA's offset;
//! after the relocated instruction ran, those after it; while a relocated call jumps to its
//! callee, a function entry's. So each piece of code comes with its rows (`CodeKind`, from the
//! body's assembler and `reloc`), and here they become:
//! - rows for libuprobe's own unwinder (`objects::unwind::add_code`), which reads the site's
//!   rules when it needs them;
//! - DWARF CFI, the site's FDE instructions replayed up to the site (advances dropped) under a
//!   copy of its CIE, then `DW_CFA_def_cfa_offset` where the body pushes or pops. Each *unit* (the
//!   new code of one area, or one stub region, in one batch) is an `.eh_frame` of its own
//!   registered with libgcc (`__register_frame_info_bases`, as JITs do) and, wrapped in a small ELF
//!   object, with gdb's JIT interface (`__jit_debug_descriptor`);
//! - with `UPROBES_PERFMAP=1`, lines of `/tmp/perf-PID.map`, which perf and other profilers read
//!   to name code outside every object.
//!
//! Units are never deregistered (the code is immortal) and never overlap: libgcc looks an address
//! up among units by their ranges. Code areas are filled in order, so a batch's code in one is
//! past every earlier unit there; a punned stub goes where the program's bytes fix it, which may
//! be between the stubs of an earlier unit: such a stub is registered alone when it overlaps no
//! unit, and only with gdb and libuprobe's own unwinder when it does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::objects::unwind::Placed;
use crate::runtime::hash::FastMap;
use crate::sigsafe::unwind::{self, CodeKind, CodeRow, Module};

/// The unwind information of the code written at startup is left to the control socket's thread
/// (or to the end of the constructor, without one): setting up `libc.so.6:*` writes 2,200 bodies,
/// whose rules take milliseconds that the program need not wait for. That thread writes it in
/// short turns, the registry free between them, and stops at exit (nothing would read it).
static DEFERRED: AtomicBool = AtomicBool::new(false);
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// At the end of startup, up to this many pieces of code are described at once (see `uprobe_init`).
pub const DESCRIBED_AT_ONCE: usize = 64;

/// From now on, [`Cfi::emit`] waits for [`take_deferred`].
pub fn defer() {
    DEFERRED.store(true, Ordering::SeqCst);
}

/// Is emission deferred?
pub fn deferred() -> bool {
    DEFERRED.load(Ordering::SeqCst)
}

/// Stop deferring (the caller then has the registry emit what waited).
pub fn take_deferred() {
    DEFERRED.store(false, Ordering::SeqCst);
}

/// The process is exiting: no more turns of deferred emission.
pub fn abandon() {
    ABANDONED.store(true, Ordering::SeqCst);
}

/// Has the process begun to exit?
pub fn abandoned() -> bool {
    ABANDONED.load(Ordering::SeqCst)
}

/// Where the functions libgcc's registration takes its lock with are: `[start, end)` of
/// `pthread_mutex_lock` and `pthread_mutex_unlock`, as libgcc's calls resolve them.
static LOCK_FUNCTIONS: std::sync::OnceLock<[(u64, u64); 2]> = std::sync::OnceLock::new();

/// Find [`LOCK_FUNCTIONS`], before any probe is armed (in the constructor).
pub fn find_lock_functions() {
    LOCK_FUNCTIONS.get_or_init(|| {
        [c"pthread_mutex_lock", c"pthread_mutex_unlock"].map(|name| {
            // SAFETY: a NUL-terminated name; dladdr1 writes `info` and `sym`, read only if it
            // succeeded.
            unsafe {
                let f = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
                let mut info: libc::Dl_info = core::mem::zeroed();
                let mut sym: *const libc::Elf64_Sym = core::ptr::null();
                let found = !f.is_null()
                    && libc::dladdr1(
                        f,
                        &mut info,
                        (&mut sym as *mut *const libc::Elf64_Sym).cast(),
                        1, // RTLD_DL_SYMENT
                    ) != 0
                    && !sym.is_null();
                // Its size unknown: a page is taken as the function (a trap there, even in
                // another function, only makes registration wait).
                let size = if found { (*sym).st_size.max(1) } else { 4096 };
                (f as u64, f as u64 + size)
            }
        })
    });
}

/// Would registering with libgcc take a trap of the program's probes? Its lock is
/// `pthread_mutex_lock` and `pthread_mutex_unlock`, which a trap-path probe may have an `int3`
/// in: libuprobe's own work would then run into the program's probes (`runtime_traps`). Such a
/// unit is left to gdb, perf and libuprobe's own unwinder.
fn registration_would_trap() -> bool {
    let Some(functions) = LOCK_FUNCTIONS.get() else { return true };
    let guard = crate::sigsafe::table::ReadGuard::enter();
    let Some(table) = guard.table() else { return false };
    functions.iter().any(|&(lo, hi)| {
        lo != 0
            && table.entries_in(lo, hi).any(|addr| {
                // SAFETY: the address of a patched instruction in mapped text.
                unsafe { core::ptr::read_volatile(addr as *const u8) == 0xcc }
            })
    })
}

/// What went wrong (the perf map could not be opened), for the layers that report to say once.
/// No lock: the control thread looks at each round, and a fork may come at any time.
static PROBLEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static PROBLEM_SAID: AtomicBool = AtomicBool::new(false);

/// What went wrong, the first time it is asked after it did.
pub fn take_problem() -> Option<String> {
    let why = PROBLEM.get()?;
    (!PROBLEM_SAID.swap(true, Ordering::SeqCst)).then(|| why.clone())
}

/// A row of a piece's rules: from this offset on, this kind.
type Row = (u32, CodeKind);

/// What a piece of code is, for names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Body,
    Stub,
    Slot,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::Body => "body",
            What::Stub => "stub",
            What::Slot => "slot",
        }
    }
}

/// A piece of new code, as its writer describes it.
#[derive(Clone, Copy, Debug)]
pub struct Note<'a> {
    pub lo: u64,
    pub hi: u64,
    pub site: u64,
    pub site_len: u8,
    /// The rules from each offset on (the first at 0).
    pub rows: &'a [(u32, CodeKind)],
    pub what: What,
}

/// A note kept until [`Cfi::emit`]: its rows interned, its site's module found.
struct Noted {
    lo: u64,
    len: u32,
    /// Index into `Cfi::seen` (the site's object and its name).
    module: u32,
    site: u64,
    rows: &'static [(u32, CodeKind)],
    site_len: u8,
    what: What,
}

impl Noted {
    fn hi(&self) -> u64 {
        self.lo + u64::from(self.len)
    }
}

/// The new code since the last [`Cfi::emit`], and what was registered so far.
#[derive(Default)]
pub struct Cfi {
    notes: Vec<Noted>,
    /// Noted code whose rules are not registered yet, by container (sorted).
    units: Vec<((u64, u64), Noted)>,
    /// The objects of the mappings the last note was taken with (by their identity), and where
    /// each is in `seen`, once a note was of it.
    modules_key: (usize, usize, u64, u64),
    modules: Vec<Module>,
    placed: Vec<Placed>,
    module_seen: Vec<Option<u32>>,
    /// The objects notes were of, with their names.
    seen: Vec<(Module, String)>,
    /// Row lists, interned: bodies of one shape share theirs.
    interned: FastMap<Vec<Row>, &'static [Row]>,
    /// Ranges registered with libgcc: lo -> hi.
    registered: BTreeMap<u64, u64>,
    perf_map: Option<crate::runtime::fs::Kept>,
    perf_map_failed: bool,
}

impl Cfi {
    /// A piece of code was written: `maps` are the mappings its site was planned with.
    pub fn note(&mut self, note: Note, maps: &[crate::objects::MapEntry]) {
        let ends = (maps.first().map_or(0, |m| m.start), maps.last().map_or(0, |m| m.end));
        let key = (maps.as_ptr() as usize, maps.len(), ends.0, ends.1);
        // The key is the snapshot's place and shape: a later snapshot may be allocated where a
        // freed one was, with one object swapped for another (a dlclose, then a dlopen). So the
        // object found must still be the one mapped at the site in this snapshot.
        let stale = |c: &Cfi| {
            let i = c.modules.partition_point(|m| m.lo <= note.site);
            let Some(i) = i.checked_sub(1).filter(|&i| note.site < c.modules[i].hi) else {
                return true;
            };
            let at = crate::objects::maps::find(maps, note.site);
            at.is_none_or(|m| m.path != c.placed[i].path || m.start < c.modules[i].lo)
        };
        if key != self.modules_key || self.modules.is_empty() || stale(self) {
            self.modules_key = key;
            (self.modules, self.placed) = crate::objects::unwind::scan(maps);
            self.module_seen = vec![None; self.modules.len()];
        }
        let i = self.modules.partition_point(|m| m.lo <= note.site);
        let Some(i) = i.checked_sub(1).filter(|&i| note.site < self.modules[i].hi) else { return };
        let module = match self.module_seen[i] {
            Some(n) => n,
            None => {
                let path = &self.placed[i].path;
                let short = path.rsplit('/').next().unwrap_or(path).to_string();
                self.seen.push((self.modules[i], short));
                let n = self.seen.len() as u32 - 1;
                self.module_seen[i] = Some(n);
                n
            }
        };
        let rows = match self.interned.get(note.rows) {
            Some(r) => *r,
            None => {
                let r: &'static [(u32, CodeKind)] = Vec::leak(note.rows.to_vec());
                self.interned.insert(note.rows.to_vec(), r);
                r
            }
        };
        let Ok(len) = u32::try_from(note.hi - note.lo) else { return };
        self.notes.push(Noted {
            lo: note.lo,
            len,
            module,
            site: note.site,
            rows,
            site_len: note.site_len,
            what: note.what,
        });
    }

    /// Make the code noted since the last call known to every unwinder: libuprobe's own unwinder
    /// at once, the others container by container until `deadline` (monotonic ns; None: all).
    /// `container` gives the area (or stub region, or page) an address is in. Called with the
    /// registry's lock held, after the code was written. True if some is left for another turn.
    pub fn emit(&mut self, container: impl Fn(u64) -> (u64, u64), deadline: Option<u64>) -> bool {
        if !self.notes.is_empty() {
            let notes = std::mem::take(&mut self.notes);
            let code: Vec<CodeRow> = notes
                .iter()
                .map(|n| CodeRow {
                    lo: n.lo,
                    hi: n.hi(),
                    site: n.site,
                    site_len: n.site_len,
                    rows: n.rows,
                })
                .collect();
            crate::objects::unwind::add_code(&code);
            drop(code);
            self.units.extend(notes.into_iter().map(|n| (container(n.lo), n)));
            self.units.sort_unstable_by_key(|(c, n)| (c.0, n.lo));
        }
        // Units: the pieces of one container, unless they would overlap a unit registered
        // before (a punned stub between two stubs of an earlier batch): then one by one.
        let keyed = std::mem::take(&mut self.units);
        let mut rules = Rules::default();
        let mut start = 0;
        while start < keyed.len() {
            if deadline.is_some_and(|d| crate::sigsafe::sys::monotonic_ns() >= d) {
                break;
            }
            let c = keyed[start].0;
            let end = start + keyed[start..].iter().take_while(|(k, _)| *k == c).count();
            let group: Vec<&Noted> = keyed[start..end].iter().map(|(_, n)| n).collect();
            let (lo, hi) = (group[0].lo, group.iter().map(|n| n.hi()).max().unwrap_or(0));
            if !self.overlaps(lo, hi) {
                self.register_unit(&group, true, &mut rules);
            } else {
                for n in group {
                    let free = !self.overlaps(n.lo, n.hi());
                    self.register_unit(&[n], free, &mut rules);
                }
            }
            start = end;
        }
        self.units = keyed.into_iter().skip(start).collect();
        !self.units.is_empty()
    }

    /// Objects went away (a dlclose): the code noted for their sites and not yet described is
    /// not described (its site's rules were in them; the code is never run again), and the
    /// objects are found again in the next note's snapshot.
    pub fn forget_unmapped(&mut self, maps: &[crate::objects::MapEntry]) {
        let seen = &self.seen;
        let mapped = |n: &Noted| {
            let (m, name) = &seen[n.module as usize];
            crate::objects::maps::find(maps, n.site).is_some_and(|e| {
                e.start >= m.lo && e.end <= m.hi && e.path.rsplit('/').next() == Some(name)
            })
        };
        self.notes.retain(|n| mapped(n));
        self.units.retain(|(_, n)| mapped(n));
        self.modules.clear();
    }

    /// Pieces noted and not yet described.
    pub fn pending(&self) -> usize {
        self.notes.len() + self.units.len()
    }

    fn overlaps(&self, lo: u64, hi: u64) -> bool {
        self.registered.range(..hi).next_back().is_some_and(|(_, &end)| end > lo)
    }

    /// One `.eh_frame` for `notes` (sorted, within one container), inside an ELF object for gdb,
    /// and registered with libgcc if `libgcc`.
    fn register_unit(&mut self, notes: &[&Noted], libgcc: bool, rules: &mut Rules) {
        let lo = notes[0].lo;
        let hi = notes.iter().map(|n| n.hi()).max().unwrap_or(lo);
        if hi - lo > u32::MAX as u64 / 2 {
            return;
        }
        // FDE locations are relative to a base a little below the code: libgcc takes a location
        // field of 0 for a removed function's.
        let base = lo - TEXT_BASE_GAP;
        let mut img = Vec::with_capacity(ELF_HEAD + notes.len() * 160);
        img.resize(ELF_HEAD, 0);
        let eh_at = img.len();
        let mut cies: Vec<(u64, usize)> = Vec::new();
        let mut symbols: Vec<(u64, u64, &Noted)> = Vec::with_capacity(notes.len());
        for &n in notes {
            let Some(site) = rules.at(n, &self.seen[n.module as usize].0) else { continue };
            write_fdes(&mut img, eh_at, &mut cies, n, site, &rules.ops, base);
            symbols.push((n.lo - base, u64::from(n.len), n));
        }
        if symbols.is_empty() {
            return;
        }
        img.extend_from_slice(&[0, 0, 0, 0]);
        let eh_len = img.len() - eh_at;
        let mut strtab = Vec::with_capacity(symbols.len() * 40);
        strtab.push(0);
        let mut symtab = Vec::with_capacity((symbols.len() + 1) * 24);
        symtab.resize(24, 0);
        let mut perf = String::new();
        let perf_map = crate::runtime::config::get().perf_map && !self.perf_map_failed;
        for &(off, size, n) in &symbols {
            let at = strtab.len() as u32;
            let name_at = strtab.len();
            self.symbol_into(&mut strtab, n);
            if perf_map {
                use std::fmt::Write;
                let name = std::str::from_utf8(&strtab[name_at..]).unwrap_or("?");
                let _ = writeln!(perf, "{:x} {size:x} {name}", n.lo);
            }
            strtab.push(0);
            symtab.extend_from_slice(&at.to_le_bytes());
            symtab.push(0x12); // STB_GLOBAL, STT_FUNC
            symtab.push(0);
            symtab.extend_from_slice(&1u16.to_le_bytes()); // .text
            symtab.extend_from_slice(&off.to_le_bytes());
            symtab.extend_from_slice(&size.to_le_bytes());
        }
        finish_elf(&mut img, base, hi, (eh_at, eh_len), &symtab, &strtab);
        let img: &'static [u8] = Vec::leak(img);
        if libgcc && !registration_would_trap() {
            // libgcc's object: its size differs between versions (six to eight words); it
            // keeps it for good, as it keeps the frame.
            let object: &'static mut [u64; 32] = Box::leak(Box::new([0u64; 32]));
            // SAFETY: a complete `.eh_frame` (ended by a zero word) that is never freed, and
            // storage for libgcc's object that is never freed; the text base is `base`, which
            // every FDE's `DW_EH_PE_textrel` location is relative to.
            unsafe {
                __register_frame_info_bases(
                    img[eh_at..].as_ptr(),
                    object.as_mut_ptr().cast(),
                    base as *mut u8,
                    core::ptr::null_mut(),
                )
            };
            self.registered.insert(lo, hi);
        }
        gdb_register(img);
        if perf_map {
            self.perf_map_write(&perf);
        }
    }

    /// `[uprobe] body libc.so.6+0x9d0a0`: what a piece is, and its site (object and offset).
    fn symbol_into(&self, out: &mut Vec<u8>, n: &Noted) {
        out.extend_from_slice(b"[uprobe] ");
        out.extend_from_slice(n.what.name().as_bytes());
        out.push(b' ');
        let (module, name) = &self.seen[n.module as usize];
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"+0x");
        let v = n.site - module.lo;
        let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
        for i in (0..digits).rev() {
            out.push(b"0123456789abcdef"[((v >> (4 * i)) & 15) as usize]);
        }
    }

    /// Append `text` to `/tmp/perf-PID.map` (UPROBES_PERFMAP).
    fn perf_map_write(&mut self, text: &str) {
        if self.perf_map.is_none() {
            match crate::runtime::fs::perf_map() {
                Ok(f) => self.perf_map = Some(f),
                Err(why) => {
                    self.perf_map_failed = true;
                    let _ = PROBLEM.set(format!("no perf map: {why}"));
                    return;
                }
            }
        }
        if let Some(fd) = self.perf_map.as_ref().and_then(|f| f.get()) {
            // Whole lines at once (O_APPEND): a JIT in the program may write the same file.
            let _ = crate::sigsafe::sys::write_all(fd, text.as_bytes());
        }
    }
}

/// The rules at each site, read once per emit (a site's body, stub and slot share them): the
/// instructions that rebuild them, in `ops`.
#[derive(Default)]
struct Rules {
    sites: FastMap<u64, Option<SiteCfi>>,
    ops: Vec<u8>,
    cies: unwind::CieCache,
}

#[derive(Clone, Copy)]
struct SiteCfi {
    /// The CIE's address (its identity) and what a copy needs.
    cie: u64,
    data_align: i64,
    ra_reg: u8,
    init: (u64, u64),
    cfa_rsp: Option<i64>,
    /// Ranges of `Rules::ops`: the rules at the site, and after the instruction (None: the same,
    /// or not known).
    at: (usize, usize),
    after: Option<(usize, usize)>,
}

impl Rules {
    fn at(&mut self, n: &Noted, m: &Module) -> Option<SiteCfi> {
        if let Some(s) = self.sites.get(&n.site) {
            return *s;
        }
        let s = self.read(n, m);
        self.sites.insert(n.site, s);
        s
    }

    fn read(&mut self, n: &Noted, m: &Module) -> Option<SiteCfi> {
        let from = self.ops.len();
        let ops = &mut self.ops;
        let r = unwind::site_rules(m, n.site, &mut |a, b| copy_from(ops, a, b), &mut self.cies);
        let Some(r) = r.filter(|r| r.code_align == 1 && r.ra_reg <= 0x7f) else {
            self.ops.truncate(from);
            return None;
        };
        let at = (from, self.ops.len());
        let next = n.site + u64::from(n.site_len);
        let mut after = None;
        // The rules after the instruction differ only if a row starts within it.
        if next < r.fde.1 && r.next_row <= next && n.rows.iter().any(|r| r.1 == CodeKind::Next) {
            let a = self.ops.len();
            let ops = &mut self.ops;
            let known =
                unwind::site_rules(m, next, &mut |x, y| copy_from(ops, x, y), &mut self.cies);
            if known.is_some() && self.ops[a..] != self.ops[at.0..at.1] {
                after = Some((a, self.ops.len()));
            } else {
                self.ops.truncate(a);
            }
        }
        Some(SiteCfi {
            cie: r.cie_init.0,
            data_align: r.data_align,
            ra_reg: r.ra_reg as u8,
            init: r.cie_init,
            cfa_rsp: r.cfa_rsp,
            at,
            after,
        })
    }
}

const DW_CFA_ADVANCE_LOC1: u8 = 0x02;
const DW_CFA_ADVANCE_LOC2: u8 = 0x03;
const DW_CFA_ADVANCE_LOC4: u8 = 0x04;
const DW_CFA_DEF_CFA_OFFSET: u8 = 0x0e;
const DW_CFA_NOP: u8 = 0x00;
const DW_EH_PE_TEXTREL_UDATA4: u8 = 0x23;
/// How far below a unit's code its text base is.
const TEXT_BASE_GAP: u64 = 16;
/// The key of the CIE of a function's first instruction (no object's CIE is at address 0).
const ENTRY_CIE: u64 = 0;

/// Write the FDEs of `n` (whose site's rules are `s`, their instructions in `ops`) into the
/// `.eh_frame` that starts at `eh_at` in `out`, with the CIEs it needs (`cies`: written ones, by
/// key, at their offsets).
fn write_fdes(
    out: &mut Vec<u8>,
    eh_at: usize,
    cies: &mut Vec<(u64, usize)>,
    n: &Noted,
    s: SiteCfi,
    ops: &[u8],
    base: u64,
) {
    let mut cie_of = |out: &mut Vec<u8>, entry: bool| -> usize {
        let key = if entry { ENTRY_CIE } else { s.cie };
        if let Some(&(_, at)) = cies.iter().find(|(k, _)| *k == key) {
            return at;
        }
        let at = out.len();
        begin_record(out);
        out.extend_from_slice(&[0, 0, 0, 0, 1, b'z', b'R', 0, 1]);
        if entry {
            out.extend_from_slice(&[0x78, 16, 1, DW_EH_PE_TEXTREL_UDATA4, 0x0c, 7, 8, 0x90, 1]);
        } else {
            sleb(out, s.data_align);
            out.push(s.ra_reg);
            out.extend_from_slice(&[1, DW_EH_PE_TEXTREL_UDATA4]);
            copy_from(out, s.init.0, s.init.1);
        }
        end_record(out, at);
        cies.push((key, at));
        let _ = eh_at;
        at
    };
    let at_site = &ops[s.at.0..s.at.1];
    let after = s.after.map(|(a, b)| &ops[a..b]);
    // Consecutive rows of the site's rules (after the instruction too, where they are the same)
    // make one FDE; the rules after it, and a function entry's, one each.
    let ends = n.rows.iter().skip(1).map(|r| n.lo + u64::from(r.0)).chain([n.hi()]);
    let mut open: Option<(usize, u64)> = None; // (the FDE's offset, its location so far)
    for (&(off, kind), end) in n.rows.iter().zip(ends) {
        let start = n.lo + u64::from(off);
        if end <= start {
            continue;
        }
        let kind = match kind {
            CodeKind::Next if after.is_none() => CodeKind::Site(0),
            k => k,
        };
        match kind {
            CodeKind::Site(pushed) => {
                let cfa = |out: &mut Vec<u8>| {
                    if let Some(o) = s.cfa_rsp {
                        out.push(DW_CFA_DEF_CFA_OFFSET);
                        uleb(out, (o + i64::from(pushed)).max(0) as u64);
                    }
                };
                match &mut open {
                    Some((fde, loc)) => {
                        advance(out, start - *loc);
                        *loc = start;
                        cfa(out);
                        set_end(out, *fde, base, end);
                    }
                    None => {
                        let cie = cie_of(out, false);
                        let fde = begin_fde(out, cie, start, end, base);
                        out.extend_from_slice(at_site);
                        if pushed != 0 {
                            cfa(out);
                        }
                        open = Some((fde, start));
                    }
                }
            }
            CodeKind::Next | CodeKind::Entry => {
                if let Some((fde, _)) = open.take() {
                    end_record(out, fde);
                }
                let entry = kind == CodeKind::Entry;
                let cie = cie_of(out, entry);
                let fde = begin_fde(out, cie, start, end, base);
                if !entry {
                    out.extend_from_slice(after.unwrap_or_default());
                }
                end_record(out, fde);
            }
        }
    }
    if let Some((fde, _)) = open {
        end_record(out, fde);
    }
}

/// Start a CIE or FDE: its length, filled in by [`end_record`].
fn begin_record(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0, 0]);
}

/// Pad the record at `at` (its length field included) to 8 bytes and write its length.
fn end_record(out: &mut Vec<u8>, at: usize) {
    let len = (out.len() - at).next_multiple_of(8) - 4;
    out.resize(at + 4 + len, DW_CFA_NOP);
    out[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Start an FDE for `[lo, hi)` under the CIE at `cie`; returns its offset.
fn begin_fde(out: &mut Vec<u8>, cie: usize, lo: u64, hi: u64, base: u64) -> usize {
    let at = out.len();
    begin_record(out);
    // The CIE pointer: from this field back to the CIE.
    out.extend_from_slice(&((at + 4 - cie) as u32).to_le_bytes());
    out.extend_from_slice(&((lo - base) as u32).to_le_bytes());
    out.extend_from_slice(&((hi - lo) as u32).to_le_bytes());
    out.push(0); // no augmentation data
    at
}

/// Make the FDE at `fde` reach `hi`.
fn set_end(out: &mut [u8], fde: usize, base: u64, hi: u64) {
    let mut begin = [0u8; 4];
    begin.copy_from_slice(&out[fde + 8..fde + 12]);
    let lo = base + u64::from(u32::from_le_bytes(begin));
    out[fde + 12..fde + 16].copy_from_slice(&((hi - lo) as u32).to_le_bytes());
}

/// Append the bytes at `[a, b)` of a loaded object's unwind section (bounds checked by the
/// reader that found them).
fn copy_from(out: &mut Vec<u8>, a: u64, b: u64) {
    if b > a && b - a < 4096 {
        // SAFETY: [a, b) lies in a loaded object's `.eh_frame`, checked against its bounds by
        // `sigsafe::unwind`, and the object stays mapped while the registry's lock is held.
        out.extend_from_slice(unsafe {
            core::slice::from_raw_parts(a as *const u8, (b - a) as usize)
        });
    }
}

fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn advance(ops: &mut Vec<u8>, delta: u64) {
    if delta < 0x40 {
        ops.push(0x40 | delta as u8);
    } else if delta <= 0xff {
        ops.extend_from_slice(&[DW_CFA_ADVANCE_LOC1, delta as u8]);
    } else if delta <= 0xffff {
        ops.push(DW_CFA_ADVANCE_LOC2);
        ops.extend_from_slice(&(delta as u16).to_le_bytes());
    } else {
        ops.push(DW_CFA_ADVANCE_LOC4);
        ops.extend_from_slice(&(delta as u32).to_le_bytes());
    }
}

extern "C" {
    // libgcc_s (which libuprobe.so links): the unwinder of backtrace(), C++ and Rust.
    fn __register_frame_info_bases(begin: *const u8, ob: *mut u8, tbase: *mut u8, dbase: *mut u8);
}

// gdb's JIT interface (gdb's manual, "JIT Compilation Interface"): gdb puts a breakpoint on the
// function and reads the descriptor. Hidden, so that a program (a JIT) with descriptors of its
// own keeps them: gdb finds every object's in its symbol table.
core::arch::global_asm!(
    ".pushsection .text.__jit_debug_register_code,\"ax\",@progbits",
    ".globl __jit_debug_register_code",
    ".hidden __jit_debug_register_code",
    ".type __jit_debug_register_code, @function",
    "__jit_debug_register_code:",
    "    .cfi_startproc",
    "    ret",
    "    .cfi_endproc",
    ".size __jit_debug_register_code, . - __jit_debug_register_code",
    ".popsection",
    ".pushsection .data.__jit_debug_descriptor,\"aw\",@progbits",
    ".globl __jit_debug_descriptor",
    ".hidden __jit_debug_descriptor",
    ".type __jit_debug_descriptor, @object",
    ".p2align 3",
    "__jit_debug_descriptor:",
    "    .long 1, 0",
    "    .quad 0, 0",
    ".size __jit_debug_descriptor, 24",
    ".popsection",
);

#[repr(C)]
struct JitEntry {
    next: *mut JitEntry,
    prev: *mut JitEntry,
    symfile: *const u8,
    size: u64,
}

#[repr(C)]
struct JitDescriptor {
    version: u32,
    action: u32,
    relevant: *mut JitEntry,
    first: *mut JitEntry,
}

extern "C" {
    static mut __jit_debug_descriptor: JitDescriptor;
    fn __jit_debug_register_code();
}

/// Hand gdb (if it is there) the ELF object `image`, which is kept for good.
fn gdb_register(image: &'static [u8]) {
    // SAFETY: the descriptor is libuprobe's own, changed only here, under the registry's lock;
    // the entry and the image are never freed.
    unsafe {
        let d = &raw mut __jit_debug_descriptor;
        let entry = Box::into_raw(Box::new(JitEntry {
            next: (*d).first,
            prev: core::ptr::null_mut(),
            symfile: image.as_ptr(),
            size: image.len() as u64,
        }));
        if !(*d).first.is_null() {
            (*(*d).first).prev = entry;
        }
        (*d).first = entry;
        (*d).relevant = entry;
        (*d).action = 1; // JIT_REGISTER_FN
        __jit_debug_register_code();
        (*d).action = 0;
    }
}

/// Sections of the ELF object for gdb: null, `.text`, `.eh_frame`, `.symtab`, `.strtab`,
/// `.shstrtab`.
const SECTIONS: usize = 6;
/// Bytes before the `.eh_frame`: the ELF header and the section headers.
const ELF_HEAD: usize = 64 + 64 * SECTIONS;

/// Make `img` (ELF_HEAD bytes, then the `.eh_frame` at `eh`) a relocatable ELF object for gdb:
/// `.text` (no bytes) at `[base, hi)`, the `.eh_frame` (its FDEs relative to `.text`), and the
/// symbols.
fn finish_elf(
    img: &mut Vec<u8>,
    base: u64,
    hi: u64,
    eh: (usize, usize),
    symtab: &[u8],
    strtab: &[u8],
) {
    let shstrtab = b"\0.text\0.eh_frame\0.symtab\0.strtab\0.shstrtab\0";
    let (n_text, n_eh, n_sym, n_str, n_shstr) = (1u32, 7u32, 17u32, 25u32, 33u32);
    let mut place = |data: &[u8], align: usize| -> u64 {
        img.resize(img.len().next_multiple_of(align), 0);
        let at = img.len() as u64;
        img.extend_from_slice(data);
        at
    };
    let sym_at = place(symtab, 8);
    let str_at = place(strtab, 1);
    let shstr_at = place(shstrtab, 1);
    let out = &mut img[..ELF_HEAD];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4..8].copy_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    out[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[40..48].copy_from_slice(&64u64.to_le_bytes()); // section headers
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[58..60].copy_from_slice(&64u16.to_le_bytes());
    out[60..62].copy_from_slice(&(SECTIONS as u16).to_le_bytes());
    out[62..64].copy_from_slice(&5u16.to_le_bytes());
    // name, type, flags, addr, offset, size, link, info, align, entsize
    // name, type, flags, addr, offset, size, link, info, align, entsize
    type Shdr = (u32, u32, u64, u64, u64, u64, u32, u32, u64, u64);
    let headers: [Shdr; SECTIONS] = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (n_text, 8, 6, base, 0, hi - base, 0, 0, 16, 0), // NOBITS, ALLOC|EXECINSTR
        (n_eh, 1, 2, 0, eh.0 as u64, eh.1 as u64, 0, 0, 8, 0),
        (n_sym, 2, 0, 0, sym_at, symtab.len() as u64, 4, 1, 8, 24),
        (n_str, 3, 0, 0, str_at, strtab.len() as u64, 0, 0, 1, 0),
        (n_shstr, 3, 0, 0, shstr_at, shstrtab.len() as u64, 0, 0, 1, 0),
    ];
    for (i, h) in headers.iter().enumerate() {
        let s = &mut out[64 + 64 * i..128 + 64 * i];
        s[0..4].copy_from_slice(&h.0.to_le_bytes());
        s[4..8].copy_from_slice(&h.1.to_le_bytes());
        s[8..16].copy_from_slice(&h.2.to_le_bytes());
        s[16..24].copy_from_slice(&h.3.to_le_bytes());
        s[24..32].copy_from_slice(&h.4.to_le_bytes());
        s[32..40].copy_from_slice(&h.5.to_le_bytes());
        s[40..44].copy_from_slice(&h.6.to_le_bytes());
        s[44..48].copy_from_slice(&h.7.to_le_bytes());
        s[48..56].copy_from_slice(&h.8.to_le_bytes());
        s[56..64].copy_from_slice(&h.9.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128() {
        let mut v = Vec::new();
        uleb(&mut v, 624485);
        assert_eq!(v, [0xe5, 0x8e, 0x26]);
        v.clear();
        sleb(&mut v, -8);
        assert_eq!(v, [0x78]);
        v.clear();
        sleb(&mut v, -123456);
        assert_eq!(v, [0xc0, 0xbb, 0x78]);
    }

    #[test]
    fn fdes_are_padded_and_point_back_at_their_cie() {
        // A body of three rows: the site's (a function's entry), 8 bytes pushed, then a call
        // relocated (a function entry's rules).
        let rows: &'static [(u32, CodeKind)] =
            Vec::leak(vec![(0, CodeKind::Site(0)), (4, CodeKind::Site(8)), (10, CodeKind::Entry)]);
        let n = Noted {
            lo: 0x1010,
            len: 0x10,
            module: 0,
            site: 0x5000,
            rows,
            site_len: 5,
            what: What::Body,
        };
        let init: &'static [u8] = &[0x0c, 7, 8, 0x90, 1];
        let s = SiteCfi {
            cie: 0x9999,
            data_align: -8,
            ra_reg: 16,
            init: (init.as_ptr() as u64, init.as_ptr() as u64 + init.len() as u64),
            cfa_rsp: Some(8),
            at: (0, 0),
            after: None,
        };
        let mut out = Vec::new();
        let mut cies = Vec::new();
        write_fdes(&mut out, 0, &mut cies, &n, s, &[], 0x1000);
        let u32_at = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap()) as usize;
        // The site's CIE, one FDE of its rules, the entry CIE, one FDE under it.
        let cie1 = 0;
        assert_eq!((u32_at(cie1) + 4) % 8, 0);
        let fde1 = cie1 + 4 + u32_at(cie1);
        assert_eq!(u32_at(fde1 + 4), fde1 + 4 - cie1, "points back at its CIE");
        assert_eq!((u32_at(fde1 + 8), u32_at(fde1 + 12)), (0x10, 10), "[0x1010, 0x101a)");
        // advance 4, def_cfa_offset 16
        assert_eq!(&out[fde1 + 17..fde1 + 20], &[0x44, 0x0e, 16]);
        let cie2 = fde1 + 4 + u32_at(fde1);
        let fde2 = cie2 + 4 + u32_at(cie2);
        assert_eq!(u32_at(fde2 + 4), fde2 + 4 - cie2);
        assert_eq!((u32_at(fde2 + 8), u32_at(fde2 + 12)), (0x1a, 6), "[0x101a, 0x1020)");
        assert_eq!(out.len(), fde2 + 4 + u32_at(fde2));
    }
}
