//! The jump path's code: for a site, a `jmp rel32` over the probed instruction, a stub it lands
//! on, and a body the stub goes to through a pointer.
//!
//! ```text
//!  site:  jmp stub            stub:  jmp [pointer]        pointer (read-write data)
//!                                                          -> body.count or body.full
//!  body.count:  lea rsp, [rsp-128]; push rax; seto al; lahf; push rax
//!               mov rax, fs:[0x28]; cmp rax, [guard]; jne slow   ; glibc's TLS? (else: slow)
//!               mov rax, fs:[tls]            ; the thread's block, or 0
//!               test rax, rax; jz slow
//!               inc qword [rax + counter]    ; the thread's own counter: no shared cache line
//!               pop rax; add al, 0x7f; sahf; pop rax; lea rsp, [rsp+128]
//!  body.insn:   <the instruction, relocated>; jmp back
//!  slow:        pop rax; add al, 0x7f; sahf; pop rax
//!  common:      push rax; mov rax, site; call [full]  ; sigsafe::jump: everything else
//!               lea rsp, [rsp+128]; jmp body.insn
//!  body.full:   lea rsp, [rsp-128]; jmp common
//! ```
//!
//! Which entry the pointer names is the registry's choice (`count` when a hit is only counted,
//! `full` when a consumer wants more), changed by one atomic store. Bodies, stubs and pointers are
//! immortal and reused when the same site comes back: a thread preempted in one finds it intact.
//!
//! Two classes of sites get a jump; only the probed instruction's own bytes ever change, so no
//! thread can be inside what is written and no branch can land in it:
//! 1. the instruction is 5 bytes or longer: `e9 rel32` over its first five, the stub anywhere
//!    within reach;
//! 2. it is 1 to 4 bytes (a *punned* jump, E9Patch's B2 tactic): `e9` and the instruction's other
//!    bytes form the jump's first bytes, and the following instruction's bytes, unchanged, are the
//!    high bytes of its rel32. That fixes the stub's address to a window (one address for a
//!    1-byte instruction, 256 for 2, 64 KiB for 3, 16 MiB for 4) where a stub page is mapped if
//!    nothing is there. The bytes after the instruction are *pinned*: while the jump is there,
//!    nothing else may change them (the registry makes sure).

use crate::runtime::hash::FastMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::area::Areas;
use super::cfi;
use super::decode::{Decoded, XolError};
use super::reloc::relocate;
use crate::objects::MapEntry;
use crate::sigsafe::table::SlotMap;
use crate::sigsafe::unwind::CodeKind;
use crate::sigsafe::{jump, ret, thread};

/// Length of `jmp rel32`.
pub const JMP_LEN: usize = 5;
/// Length of a stub: `jmp qword ptr [rip + disp32]`.
const STUB_LEN: u64 = 6;
/// Offset of a thread's counters in its block (see `sigsafe::thread`).
const COUNTERS_AT: u64 = thread::HEADER as u64;

/// A site's body.
#[derive(Clone, Copy, Debug)]
pub struct Body {
    /// Where a count-only hit enters (the same as `full` when the site has no counter).
    pub count: u64,
    /// Where a hit that needs the Rust side enters.
    pub full: u64,
    /// Where a hit of a site with return probes enters (the same as `full` when it has none).
    pub ret: u64,
    /// The same, taking the entry's time (a site whose return probes keep durations).
    pub ret_timed: u64,
    /// The relocated instruction: where a trap at the site resumes, too.
    pub insn: u64,
    pub slot: SlotMap,
    /// The counters this body counts into.
    pub counters: Counters,
}

/// A site's jump.
#[derive(Clone, Copy, Debug)]
pub struct Jump {
    /// 1: the instruction is 5 bytes or longer; 2: punned.
    pub class: u8,
    /// How many of the site's bytes the jump changes (the instruction's length, at most 5), and
    /// what they become.
    pub len: u8,
    pub bytes: [u8; JMP_LEN],
    /// The word the stub jumps through.
    pub pointer: u64,
    pub body: Body,
}

impl Jump {
    /// Make the stub go to `entry` (one of the body's entries).
    pub fn point_to(&self, entry: u64) {
        // SAFETY: `pointer` is an aligned word of a data area of ours, mapped read-write for the
        // life of the process; the stub reads it with one aligned 8-byte load.
        let p = unsafe { &*(self.pointer as *const AtomicU64) };
        p.store(entry, Ordering::Release);
    }
}

/// Stub and pointer of a site (by address and bytes).
#[derive(Clone, Copy)]
struct Stub {
    class: u8,
    len: u8,
    bytes: [u8; JMP_LEN],
    pointer: u64,
}

/// Every body and stub written so far.
#[derive(Default)]
pub struct Jumps {
    bodies: FastMap<(u64, [u8; 16], Counters), Body>,
    stubs: FastMap<(u64, [u8; 16]), Stub>,
    /// A body's size and where its relocated instruction starts, by shape (which counters, the
    /// relocated instruction's length): what a body needs before it has a place.
    shapes: FastMap<(bool, bool, usize), (u64, u64)>,
}

/// No counter (the site is only ever hit through the full entry).
pub const NO_COUNTER: u32 = u32::MAX;

impl Jumps {
    /// The jump for instruction `d` at `site`, whose file bytes are `bytes` (the instruction, then
    /// what follows it: a punned jump pins `bytes[d.len..5]`). `counter`: the site's hit counter.
    /// The code is staged in `areas`, written at their next flush.
    pub fn plan(
        &mut self,
        areas: &mut Areas,
        d: &Decoded,
        site: u64,
        bytes: [u8; 16],
        counters: Counters,
        maps: &[MapEntry],
    ) -> Result<Jump, String> {
        let body = self.body(areas, d, site, bytes, counters, maps).map_err(|e| e.to_string())?;
        let stub = match self.stubs.get(&(site, bytes)) {
            Some(s) => *s,
            None => {
                let s = write_stub(areas, d, site, &bytes, maps)?;
                self.stubs.insert((site, bytes), s);
                s
            }
        };
        let jump = Jump {
            class: stub.class,
            len: stub.len,
            bytes: stub.bytes,
            pointer: stub.pointer,
            body,
        };
        jump.point_to(body.full);
        Ok(jump)
    }

    /// The body of `d` at `site` counting into `counters`: an old one, or one written now.
    pub fn body(
        &mut self,
        areas: &mut Areas,
        d: &Decoded,
        site: u64,
        bytes: [u8; 16],
        counters: Counters,
        maps: &[MapEntry],
    ) -> Result<Body, XolError> {
        if let Some(b) = self.bodies.get(&(site, bytes, counters)) {
            return Ok(*b);
        }
        let b = write_body(areas, &mut self.shapes, d, site, counters, maps)?;
        self.bodies.insert((site, bytes, counters), b);
        Ok(b)
    }

    /// Room for `n` more sites.
    pub fn reserve(&mut self, n: usize) {
        self.bodies.reserve(n);
        self.stubs.reserve(n);
    }

    /// Every body's relocated instruction, for the fault translation.
    pub fn slots(&self) -> impl Iterator<Item = SlotMap> + '_ {
        self.bodies.values().map(|b| b.slot)
    }
}

/// Counters of a body: the site's hit counter and return counter (or [`NO_COUNTER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Counters {
    pub hits: u32,
    pub returns: u32,
}

impl Counters {
    /// No counter at all (libuprobe's own sites).
    pub const NONE: Counters = Counters { hits: NO_COUNTER, returns: NO_COUNTER };
}

/// Write the body of `d` at `site` (see the module documentation; the `ret` entry, for a site
/// with return probes, also pushes the return on the thread's return stack and hijacks it, as
/// `sigsafe::ret::hijack` does, leaving every case but the plain one to the full entry).
fn write_body(
    areas: &mut Areas,
    shapes: &mut FastMap<(bool, bool, usize), (u64, u64)>,
    d: &Decoded,
    site: u64,
    counters: Counters,
    maps: &[MapEntry],
) -> Result<Body, XolError> {
    // The relocated instruction's length does not depend on where it goes (a copy, rel32s): the
    // body's size is known before its place.
    let probe = relocate(d, site, site.wrapping_add(JMP_LEN as u64))?;
    let key = (counters.hits != NO_COUNTER, counters.returns != NO_COUNTER, probe.code.len());
    let (size, insn_offset) = match shapes.get(&key) {
        Some(&s) => s,
        None => {
            let shape = assemble_body(d, site, counters, &probe.code)?;
            let s = ((shape.code.len() as u64).next_multiple_of(16), shape.insn_offset);
            shapes.insert(key, s);
            s
        }
    };
    let at = areas.alloc_near(site, size, 16, maps)?;
    let r = relocate(d, site, at + insn_offset)?;
    let mut asm = assemble_body(d, site, counters, &r.code)?;
    if asm.insn_offset != insn_offset || asm.code.len() as u64 > size {
        return Err(XolError::Relocate { insn: d.text(), why: "body size changed".into() });
    }
    // The frame rules along the body: the assembler's, the relocated instruction's in its range.
    let mut rows: Vec<(u32, CodeKind)> = Vec::with_capacity(asm.pushed.len() + r.rows.len());
    for &(off, pushed) in &asm.pushed {
        if off as u64 == asm.insn_offset {
            rows.extend(r.rows.iter().map(|&(o, k)| (asm.insn_offset as u32 + o, k)));
        } else {
            rows.push((off as u32, CodeKind::Site(i32::from(pushed))));
        }
    }
    let note = cfi::Note {
        lo: at,
        hi: at + asm.code_end as u64,
        site,
        site_len: d.len as u8,
        rows: &rows,
        what: cfi::What::Body,
    };
    areas.cfi.note(note, maps);
    // Up to the allocation's end: bodies allocated one after the other are written as one run.
    asm.code.resize(size as usize, 0xcc);
    areas.stage(at, &asm.code);
    let insn = at + asm.insn_offset;
    let slot = SlotMap {
        start: insn,
        len: r.insn_len as u32,
        site,
        site_len: d.len as u32,
        tail: (r.code.len() - r.insn_len) as u32,
        syscall: r.syscall,
    };
    Ok(Body {
        count: at + asm.count,
        full: at + asm.full,
        ret: at + asm.ret,
        ret_timed: at + asm.ret_timed,
        insn,
        slot,
        counters,
    })
}

/// An assembled body: its code, its labels' offsets, and what it pushed from each offset on.
type Finished = (Vec<u8>, [usize; LABELS], Vec<(usize, u16)>);

struct Assembled {
    code: Vec<u8>,
    /// Bytes pushed below the program's rsp from each offset on (the relocated instruction's
    /// range aside), and where the code ends (the constants after it are not run).
    pushed: Vec<(usize, u16)>,
    code_end: usize,
    /// Offsets of the entries and of the relocated instruction.
    count: u64,
    full: u64,
    ret: u64,
    ret_timed: u64,
    insn_offset: u64,
}

/// Labels of a body.
#[derive(Clone, Copy)]
enum L {
    Count,
    Insn,
    CountSlow,
    Common,
    Full,
    Ret,
    RetPush,
    RetSlow,
    FullPtr,
    Guard,
    RetTimed,
    RetTimedPush,
    RetTimedSlow,
}

/// How many labels a body has.
const LABELS: usize = 13;

/// A tiny assembler for the bodies: fixed encodings (rel32 branches, disp32 where a constant
/// varies), so that a body's layout depends only on its shape. (iced's block encoder builds its
/// tables on first use: half a millisecond of each process's setup.)
struct Asm {
    code: Vec<u8>,
    labels: [Option<usize>; LABELS],
    /// (offset of a rel32 field, the label it reaches)
    fixups: Vec<(usize, L)>,
    /// How many bytes the code has pushed below the program's rsp, from each offset on: the frame
    /// rules of the body are the site's, that much further from the CFA (see `xol::cfi`).
    pushed: Vec<(usize, u16)>,
}

impl Asm {
    fn new() -> Asm {
        Asm {
            code: Vec::with_capacity(256),
            labels: [None; LABELS],
            fixups: Vec::new(),
            pushed: Vec::with_capacity(24),
        }
    }

    /// From here on, `n` bytes are pushed below the program's rsp.
    fn pushed(&mut self, n: u16) {
        match self.pushed.last_mut() {
            Some(last) if last.0 == self.code.len() => last.1 = n,
            Some(last) if last.1 == n => {}
            _ => self.pushed.push((self.code.len(), n)),
        }
    }

    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn d32(&mut self, v: i32) -> &mut Self {
        self.b(&v.to_le_bytes())
    }

    fn q64(&mut self, v: u64) -> &mut Self {
        self.b(&v.to_le_bytes())
    }

    fn label(&mut self, l: L) {
        self.labels[l as usize] = Some(self.code.len());
    }

    /// A rel32 to `l`, the last field of its instruction.
    fn rel(&mut self, l: L) -> &mut Self {
        self.fixups.push((self.code.len(), l));
        self.d32(0)
    }

    fn jmp(&mut self, l: L) {
        self.b(&[0xe9]).rel(l);
    }

    fn jcc(&mut self, cc: u8, l: L) {
        self.b(&[0x0f, 0x80 | cc]).rel(l);
    }

    /// `lea rsp, [rsp-128]; push rax; seto al; lahf; push rax`: the red zone stepped over, rax
    /// and the flags (OF in al, the rest in ah) saved.
    fn save(&mut self) {
        self.b(&[0x48, 0x8d, 0x64, 0x24, 0x80]).pushed(128);
        self.b(&[0x50]).pushed(136);
        self.b(&[0x0f, 0x90, 0xc0, 0x9f, 0x50]).pushed(144);
    }

    /// `pop rax; add al, 0x7f; sahf; pop rax`: the flags back (OF from al's bit 0), then rax.
    fn restore(&mut self) {
        self.b(&[0x58]).pushed(136);
        self.b(&[0x04, 0x7f, 0x9e, 0x58]).pushed(128);
    }

    /// `lea rsp, [rsp+128]` (disp32: +128 is not a disp8).
    fn leave_red_zone(&mut self) {
        self.b(&[0x48, 0x8d, 0xa4, 0x24]).d32(128).pushed(0);
    }

    /// `lea rsp, [rsp-128]`.
    fn enter_red_zone(&mut self) {
        self.b(&[0x48, 0x8d, 0x64, 0x24, 0x80]).pushed(128);
    }

    /// `push rcx; push rdx; push rsi` after [`Asm::save`], and the pops back.
    fn push3(&mut self) {
        self.b(&[0x51]).pushed(152);
        self.b(&[0x52]).pushed(160);
        self.b(&[0x56]).pushed(168);
    }

    fn pop3(&mut self) {
        self.b(&[0x5e]).pushed(160);
        self.b(&[0x5a]).pushed(152);
        self.b(&[0x59]).pushed(144);
    }

    /// `mov rax, qword ptr fs:[tls]` (absolute, not RIP-relative).
    fn load_block(&mut self, tls: i32) {
        self.b(&[0x64, 0x48, 0x8b, 0x04, 0x25]).d32(tls);
    }

    /// `mov rax, qword ptr fs:[0x28]; cmp rax, qword ptr [rip + guard]; jne to`: a thread whose
    /// TLS is not glibc's (its canary is not glibc's) goes to `to` without libuprobe reading
    /// anything below its `fs` (see `sigsafe::thread::foreign`).
    fn check_tls(&mut self, to: L) {
        self.b(&[0x64, 0x48, 0x8b, 0x04, 0x25]).d32(0x28);
        self.b(&[0x48, 0x3b, 0x05]).rel(L::Guard);
        self.jcc(JNE, to);
    }

    fn finish(mut self) -> Option<Finished> {
        let mut at = [0; LABELS];
        for (i, l) in self.labels.iter().enumerate() {
            at[i] = (*l)?;
        }
        for &(field, l) in &self.fixups {
            let rel = at[l as usize] as i64 - (field as i64 + 4);
            self.code[field..field + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        Some((self.code, at, self.pushed))
    }
}

const JZ: u8 = 0x4;
const JNE: u8 = 0x5;
const JAE: u8 = 0x3;
const JBE: u8 = 0x6;

fn assemble_body(
    d: &Decoded,
    site: u64,
    counters: Counters,
    relocated: &[u8],
) -> Result<Assembled, XolError> {
    let tls = i32::try_from(thread::tls_offset())
        .map_err(|_| XolError::Relocate { insn: d.text(), why: "TLS out of reach".into() })?;
    let counter_at = |c: u32| (COUNTERS_AT + c as u64 * 8) as i32;
    let mut a = Asm::new();
    a.label(L::Count);
    a.pushed(0);
    if counters.hits != NO_COUNTER {
        a.save();
        a.check_tls(L::CountSlow);
        a.load_block(tls);
        a.b(&[0x48, 0x85, 0xc0]); // test rax, rax
        a.jcc(JZ, L::CountSlow);
        a.b(&[0x48, 0xff, 0x80]).d32(counter_at(counters.hits)); // inc qword ptr [rax+disp32]
        a.restore();
        a.leave_red_zone();
    } else {
        a.jmp(L::Full);
    }
    a.label(L::Insn);
    a.pushed(0); // (the relocated instruction's own rules are the caller's to add)
    a.b(relocated);
    a.label(L::CountSlow);
    a.pushed(144);
    a.restore();
    a.label(L::Common);
    a.pushed(128);
    a.b(&[0x50]).pushed(136); // push rax
    a.b(&[0x48, 0xb8]).q64(site); // mov rax, site
                                  // call qword ptr [rip + full_ptr], which returns with `ret 8`
    a.b(&[0xff, 0x15]).rel(L::FullPtr).pushed(128);
    a.leave_red_zone();
    a.jmp(L::Insn);
    a.label(L::Full);
    a.pushed(0);
    a.enter_red_zone();
    a.jmp(L::Common);
    ret_entry(&mut a, site, counters, tls, false);
    ret_entry(&mut a, site, counters, tls, true);
    let code_end = a.code.len();
    a.label(L::FullPtr);
    a.q64(jump::full_entry());
    a.label(L::Guard);
    a.q64(thread::STACK_GUARD.load(core::sync::atomic::Ordering::Relaxed));
    let (code, labels, pushed) = a
        .finish()
        .ok_or_else(|| XolError::Relocate { insn: d.text(), why: "body label".into() })?;
    let off = |l: L| labels[l as usize] as u64;
    Ok(Assembled {
        count: off(L::Count),
        full: off(L::Full),
        ret: off(L::Ret),
        ret_timed: off(L::RetTimed),
        insn_offset: off(L::Insn),
        code,
        pushed,
        code_end,
    })
}

/// A return probe's entry: push the thread's frame and hijack the return address; with `timed`,
/// the entry's time-stamp counter goes into the frame (durations, see `sigsafe::clock`). Anything
/// else (no block, a full return stack, a pending frame below) takes the full entry.
fn ret_entry(a: &mut Asm, site: u64, counters: Counters, tls: i32, timed: bool) {
    let counter_at = |c: u32| (COUNTERS_AT + c as u64 * 8) as i32;
    let (entry, push, slow) = if timed {
        (L::RetTimed, L::RetTimedPush, L::RetTimedSlow)
    } else {
        (L::Ret, L::RetPush, L::RetSlow)
    };
    a.label(entry);
    a.pushed(0);
    if counters.returns == NO_COUNTER {
        a.jmp(L::Full);
        a.label(push);
        a.label(slow);
    } else {
        a.save();
        a.push3();
        a.check_tls(slow);
        a.load_block(tls);
        a.b(&[0x48, 0x85, 0xc0]); // test rax, rax
        a.jcc(JZ, slow);
        a.b(&[0x8b, 0x88]).d32(RET_DEPTH_AT); // mov ecx, dword ptr [rax + ret_depth]
        a.b(&[0x81, 0xf9]).d32(thread::RET_STACK as i32); // cmp ecx, RET_STACK
        a.jcc(JAE, slow);
        // lea rsi, [rsp + 168]: the program's rsp (5 pushes and the red zone)
        a.b(&[0x48, 0x8d, 0xb4, 0x24]).d32(168);
        a.b(&[0x85, 0xc9]); // test ecx, ecx
        a.jcc(JZ, push);
        // A pending frame at or below this one (a longjmp abandoned it, or a tail call chains
        // to it) is the full entry's to sort out.
        a.b(&[0x48, 0x8d, 0x14, 0x89]); // lea rdx, [rcx + rcx*4]
                                        // cmp qword ptr [rax + rdx*8 + frames - frame], rsi
        a.b(&[0x48, 0x39, 0xb4, 0xd0]).d32(FRAMES_AT - FRAME_SIZE);
        a.jcc(JBE, slow);
        a.label(push);
        a.b(&[0x48, 0x8d, 0x14, 0x89]); // lea rdx, [rcx + rcx*4]
        a.b(&[0x48, 0x8d, 0x94, 0xd0]).d32(FRAMES_AT); // lea rdx, [rax + rdx*8 + frames]
                                                       // A signal handler may run a return-probed function anywhere in here: the frame is
                                                       // taken (depth + 1) with a slot above every stack first, so that a nested hijack
                                                       // neither overwrites it nor takes it for abandoned; its slot is written last.
        a.b(&[0x48, 0xc7, 0x02]).d32(-1); // mov qword ptr [rdx], -1
        a.b(&[0xff, 0x80]).d32(RET_DEPTH_AT); // inc dword ptr [rax + ret_depth]
        a.b(&[0x48, 0x8b, 0x0e]); // mov rcx, qword ptr [rsi]
        a.b(&[0x48, 0x89, 0x4a, 0x08]); // mov qword ptr [rdx+8], rcx: the real return address
        a.b(&[0x48, 0xb9]).q64(site); // mov rcx, site
        a.b(&[0x48, 0x89, 0x4a, 0x10]); // mov qword ptr [rdx+16], rcx: the site
        if timed {
            // The entry's time-stamp counter in entry_ns (rax, the block, parked there while
            // rdtsc takes eax and edx), then counter and flags (durations, in ticks).
            a.b(&[0x48, 0x89, 0xd1]); // mov rcx, rdx
            a.b(&[0x48, 0x89, 0x41, 0x18]); // mov qword ptr [rcx+24], rax
            a.b(&[0x0f, 0x31]); // rdtsc
            a.b(&[0x48, 0xc1, 0xe2, 0x20]); // shl rdx, 32
            a.b(&[0x48, 0x09, 0xd0]); // or rax, rdx
            a.b(&[0x48, 0x89, 0xc2]); // mov rdx, rax
            a.b(&[0x48, 0x8b, 0x41, 0x18]); // mov rax, qword ptr [rcx+24]
            a.b(&[0x48, 0x89, 0x51, 0x18]); // mov qword ptr [rcx+24], rdx
            a.b(&[0x48, 0x89, 0xca]); // mov rdx, rcx
            a.b(&[0xc7, 0x42, 0x20]).d32(counters.returns as i32); // mov dword ptr [rdx+32], counter
            a.b(&[0xc7, 0x42, 0x24]).d32((thread::FRAME_SLOW | thread::FRAME_TSC) as i32);
        // flags
        } else {
            a.b(&[0x48, 0xc7, 0x42, 0x18]).d32(0); // mov qword ptr [rdx+24], 0: no entry_ns here
                                                   // mov qword ptr [rdx+32], counter (flags 0)
            a.b(&[0x48, 0xc7, 0x42, 0x20]).d32(counters.returns as i32);
        }
        a.b(&[0x48, 0x89, 0x32]); // mov qword ptr [rdx], rsi: the slot
        if counters.hits != NO_COUNTER {
            a.b(&[0x48, 0xff, 0x80]).d32(counter_at(counters.hits)); // inc qword ptr [rax+disp32]
        }
        a.b(&[0x48, 0xb9]).q64(ret::trampoline()); // mov rcx, trampoline
        a.b(&[0x48, 0x89, 0x0e]); // mov qword ptr [rsi], rcx
        a.pop3();
        a.restore();
        a.leave_red_zone();
        a.jmp(L::Insn);
        a.label(slow);
        a.pushed(168);
        a.pop3();
        a.restore();
        a.jmp(L::Common);
    }
}

/// Offsets in a thread's block (see `sigsafe::thread::Block`).
const RET_DEPTH_AT: i32 = core::mem::offset_of!(thread::Block, ret_depth) as i32;
const FRAMES_AT: i32 = core::mem::offset_of!(thread::Block, ret_frames) as i32;
const FRAME_SIZE: i32 = core::mem::size_of::<thread::RetFrame>() as i32;
const _: () = assert!(FRAME_SIZE == 40);
const _: () = assert!(core::mem::offset_of!(thread::RetFrame, counter) == 32);

/// Write the stub of `d` at `site` and allocate its pointer.
fn write_stub(
    areas: &mut Areas,
    d: &Decoded,
    site: u64,
    bytes: &[u8; 16],
    maps: &[MapEntry],
) -> Result<Stub, String> {
    let after = site.wrapping_add(JMP_LEN as u64);
    let (class, len, stub) = if d.len >= JMP_LEN {
        let stub = areas.alloc_near(site, 16, 16, maps).map_err(|e| e.to_string())?;
        (1, JMP_LEN, stub)
    } else {
        // rel32's high bytes are the pinned bytes; the instruction's own bytes after the opcode
        // are free.
        let free = d.len - 1;
        let mut rel = [0u8; 4];
        rel[free..].copy_from_slice(&bytes[d.len..JMP_LEN]);
        let lo = after.wrapping_add(i32::from_le_bytes(rel) as i64 as u64);
        let hi = lo.wrapping_add(1 << (8 * free));
        // The first place in the window where the diverted stubs fit too (a few tries: a place
        // given up keeps its bytes taken, unused).
        let boundaries = boundaries_after(bytes, site, d.len);
        let mut from = lo;
        let mut tries = 0;
        let stub = loop {
            let Some(stub) = areas.stub_in(from, hi, STUB_LEN, maps) else {
                return Err(format!(
                    "no room for a punned jump: the {} byte(s) after this {}-byte instruction \
                     fix its target to {lo:#x}..{hi:#x}, which is taken or out of bounds",
                    JMP_LEN - d.len,
                    d.len
                ));
            };
            match write_diverted(areas, site, stub, &boundaries, maps) {
                Ok(()) => break stub,
                Err(e) if tries == 8 || stub + 1 >= hi => return Err(e),
                Err(_) => (from, tries) = (stub + 1, tries + 1),
            }
        };
        (2, d.len, stub)
    };
    let pointer = areas.alloc_data_near(stub, maps).map_err(|e| e.to_string())?;
    let disp = pointer.wrapping_sub(stub + STUB_LEN) as i64;
    let disp = i32::try_from(disp).map_err(|_| "stub pointer out of reach".to_string())?;
    let mut code = vec![0xff, 0x25];
    code.extend_from_slice(&disp.to_le_bytes());
    if class == 1 {
        code.resize(16, 0xcc); // the whole allocation, so that runs of code are written at once
    }
    areas.stage(stub, &code);
    let note = cfi::Note {
        lo: stub,
        hi: stub + STUB_LEN,
        site,
        site_len: d.len as u8,
        rows: &[(0, CodeKind::Site(0))],
        what: cfi::What::Stub,
    };
    areas.cfi.note(note, maps);
    let rel = (stub.wrapping_sub(after) as i64) as i32;
    let mut jmp = [0u8; JMP_LEN];
    jmp[0] = 0xe9;
    jmp[1..].copy_from_slice(&rel.to_le_bytes());
    // A punned jump's high bytes must be the pinned bytes as they are.
    if jmp[len..] != bytes[len..JMP_LEN] {
        return Err("punned jump does not match the bytes after the instruction".into());
    }
    Ok(Stub { class, len: len as u8, bytes: jmp, pointer })
}

/// The instruction boundaries among a punned jump's pinned bytes (offsets from the site, in
/// `len..5`): where another tool may put a breakpoint. Where the bytes do not decode, every
/// pinned byte is taken for one.
fn boundaries_after(bytes: &[u8; 16], site: u64, len: usize) -> Vec<usize> {
    let mut at = Vec::new();
    let mut o = len;
    while o < JMP_LEN {
        at.push(o);
        match super::decode::decode(&bytes[o..], site + o as u64) {
            Ok(d) => o += d.len,
            Err(_) => return (len..JMP_LEN).collect(),
        }
    }
    at
}

/// A breakpoint that another tool writes on an instruction a punned jump's rel32 covers (a
/// kernel uprobe on the next instruction: `0xcc` over one pinned byte) turns the jump elsewhere,
/// at once. Each such place gets a stub of its own that goes on to the site's stub: the hit is
/// counted as usual, its instruction runs out of line and returns to the next one, where the
/// other tool's breakpoint is taken by the other tool. The site stays exact beside it, and is
/// its jump again when the other tool puts its byte back.
fn write_diverted(
    areas: &mut Areas,
    site: u64,
    stub: u64,
    boundaries: &[usize],
    maps: &[MapEntry],
) -> Result<(), String> {
    let after = site.wrapping_add(JMP_LEN as u64);
    let rel = (stub.wrapping_sub(after) as i64) as i32;
    for &o in boundaries {
        let mut rel = rel.to_le_bytes();
        rel[o - 1] = 0xcc;
        let to = after.wrapping_add(i32::from_le_bytes(rel) as i64 as u64);
        if to == stub {
            continue;
        }
        // `jmp rel32` to the site's stub where it reaches, else `jmp [rip]` and its address.
        let code = match i32::try_from(stub.wrapping_sub(to + JMP_LEN as u64) as i64) {
            Ok(back) => [&[0xe9][..], &back.to_le_bytes()].concat(),
            Err(_) => [&[0xff, 0x25, 0, 0, 0, 0][..], &stub.to_le_bytes()].concat(),
        };
        if areas.stub_in(to, to + 1, code.len() as u64, maps).is_none() {
            return Err(format!(
                "no room for a punned jump beside a breakpoint: a breakpoint on the instruction at \
                 +{o} (a kernel uprobe's) would turn the jump to {to:#x}, which is taken"
            ));
        }
        areas.stage(to, &code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xol::decode::decode;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(code: &[u8], at: u64) -> Vec<String> {
        let mut dec = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = Vec::new();
        while dec.can_decode() {
            let i = dec.decode();
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(format!("{:x}: {s}", i.ip() - at));
        }
        out
    }

    #[test]
    fn body_layout() {
        let maps = crate::objects::read_maps().unwrap();
        let site = body_layout as *const () as u64;
        let mut bytes = [0x90u8; 16];
        bytes[..2].copy_from_slice(&[0xeb, 0x07]);
        let d = decode(&bytes, site).unwrap();
        let mut areas = Areas::default();
        let counters = Counters { hits: 3, returns: 4 };
        let b = write_body(&mut areas, &mut FastMap::default(), &d, site, counters, &maps).unwrap();
        let (at, code) = areas.staged().into_iter().next().unwrap();
        let text = disasm(&code, at);
        let line = |off: u64| {
            text.iter().find(|l| l.starts_with(&format!("{off:x}: "))).cloned().unwrap_or_default()
        };
        assert_eq!(b.count, at);
        assert!(line(0).starts_with("0: lea rsp,[rsp-80h]"), "{text:#?}");
        // The counter of the thread's own block: HEADER + 3 * 8.
        assert!(text.iter().any(|l| l.contains("inc qword ptr [rax+2018h]")), "{text:#?}");
        // The relocated instruction is the `jmp`, where the trap path resumes too.
        assert!(line(b.insn - at).contains(": jmp"), "{text:#?}");
        assert!(line(b.full - at).contains("lea rsp,[rsp-80h]"), "{text:#?}");
        assert!(line(b.ret - at).contains("lea rsp,[rsp-80h]"), "{text:#?}");
        // The return entry stores the return counter in the frame.
        assert!(text.iter().any(|l| l.contains("mov qword ptr [rdx+20h],4")), "{text:#?}");
        assert_eq!(b.slot.start, b.insn);
    }

    /// The body as iced's code assembler built it before the fixed encodings: the reference.
    fn iced_body(
        d: &Decoded,
        site: u64,
        counters: Counters,
        at: u64,
        relocated: &[u8],
    ) -> Result<Assembled, XolError> {
        use iced_x86::code_asm::*;
        use iced_x86::BlockEncoderOptions;
        let err =
            |e: iced_x86::IcedError| XolError::Relocate { insn: d.text(), why: e.to_string() };
        let tls = i32::try_from(thread::tls_offset())
            .map_err(|_| XolError::Relocate { insn: d.text(), why: "TLS out of reach".into() })?;
        // mov rax, qword ptr fs:[tls] (fixed encoding: absolute, not RIP-relative).
        let mut load_block = vec![0x64, 0x48, 0x8b, 0x04, 0x25];
        load_block.extend_from_slice(&tls.to_le_bytes());
        let counter_at = |c: u32| (COUNTERS_AT + c as u64 * 8) as i32;
        let mut a = CodeAssembler::new(64).map_err(err)?;
        let mut count = a.create_label();
        let mut insn = a.create_label();
        let mut count_slow = a.create_label();
        let mut common = a.create_label();
        let mut full = a.create_label();
        let mut ret = a.create_label();
        let mut ret_push = a.create_label();
        let mut ret_slow = a.create_label();
        let mut full_ptr = a.create_label();
        let mut guard = a.create_label();
        let mut ret_t = a.create_label();
        let mut ret_t_push = a.create_label();
        let mut ret_t_slow = a.create_label();
        let save = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
            a.lea(rsp, ptr(rsp - 128))?;
            a.push(rax)?;
            a.seto(al)?;
            a.lahf()?;
            a.push(rax)
        };
        let restore = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
            a.pop(rax)?;
            a.add(al, 0x7f)?;
            a.sahf()?;
            a.pop(rax)
        };
        (|| -> Result<(), iced_x86::IcedError> {
            a.set_label(&mut count)?;
            if counters.hits != NO_COUNTER {
                save(&mut a)?;
                a.mov(rax, qword_ptr(0x28).fs())?;
                a.cmp(rax, qword_ptr(guard))?;
                a.jne(count_slow)?;
                a.db(&load_block)?;
                a.test(rax, rax)?;
                a.jz(count_slow)?;
                a.inc(qword_ptr(rax + counter_at(counters.hits)))?;
                restore(&mut a)?;
                a.lea(rsp, ptr(rsp + 128))?;
            } else {
                a.jmp(full)?;
            }
            a.set_label(&mut insn)?;
            a.db(relocated)?;
            a.set_label(&mut count_slow)?;
            restore(&mut a)?;
            a.set_label(&mut common)?;
            a.push(rax)?;
            a.mov(rax, site)?;
            a.call(qword_ptr(full_ptr))?;
            a.lea(rsp, ptr(rsp + 128))?;
            a.jmp(insn)?;
            a.set_label(&mut full)?;
            a.lea(rsp, ptr(rsp - 128))?;
            a.jmp(common)?;
            // A return probe's entry (see `ret_entry`), untimed and timed.
            let ret_block = |a: &mut CodeAssembler,
                             timed: bool,
                             entry: &mut CodeLabel,
                             push: &mut CodeLabel,
                             slow: &mut CodeLabel|
             -> Result<(), iced_x86::IcedError> {
                a.set_label(entry)?;
                if counters.returns == NO_COUNTER {
                    a.jmp(full)?;
                } else {
                    save(a)?;
                    a.push(rcx)?;
                    a.push(rdx)?;
                    a.push(rsi)?;
                    a.mov(rax, qword_ptr(0x28).fs())?;
                    a.cmp(rax, qword_ptr(guard))?;
                    a.jne(*slow)?;
                    a.db(&load_block)?;
                    a.test(rax, rax)?;
                    a.jz(*slow)?;
                    a.mov(ecx, dword_ptr(rax + RET_DEPTH_AT))?;
                    a.cmp(ecx, thread::RET_STACK as u32)?;
                    a.jae(*slow)?;
                    a.lea(rsi, ptr(rsp + 168))?; // the program's rsp: 5 pushes and the red zone
                    a.test(ecx, ecx)?;
                    a.jz(*push)?;
                    // A pending frame at or below this one (a longjmp abandoned it, or a tail call
                    // chains to it) is the full entry's to sort out.
                    a.lea(rdx, ptr(rcx + rcx * 4))?;
                    a.cmp(qword_ptr(rax + rdx * 8 + (FRAMES_AT - FRAME_SIZE)), rsi)?;
                    a.jbe(*slow)?;
                    a.set_label(push)?;
                    a.lea(rdx, ptr(rcx + rcx * 4))?;
                    a.lea(rdx, ptr(rax + rdx * 8 + FRAMES_AT))?;
                    // A signal handler may run a return-probed function anywhere in here: the frame is
                    // taken (depth + 1) with a slot above every stack first, so that a nested hijack
                    // neither overwrites it nor takes it for abandoned; its slot is written last.
                    a.mov(qword_ptr(rdx), -1)?;
                    a.inc(dword_ptr(rax + RET_DEPTH_AT))?;
                    a.mov(rcx, qword_ptr(rsi))?;
                    a.mov(qword_ptr(rdx + 8), rcx)?; // real return address
                    a.mov(rcx, site)?;
                    a.mov(qword_ptr(rdx + 16), rcx)?; // site
                    if timed {
                        a.mov(rcx, rdx)?;
                        a.mov(qword_ptr(rcx + 24), rax)?;
                        a.rdtsc()?;
                        a.shl(rdx, 32)?;
                        a.or(rax, rdx)?;
                        a.mov(rdx, rax)?;
                        a.mov(rax, qword_ptr(rcx + 24))?;
                        a.mov(qword_ptr(rcx + 24), rdx)?; // entry_ns: the time-stamp counter
                        a.mov(rdx, rcx)?;
                        a.mov(dword_ptr(rdx + 32), counters.returns)?; // counter
                        a.mov(dword_ptr(rdx + 36), thread::FRAME_SLOW | thread::FRAME_TSC)?;
                    // flags
                    } else {
                        a.mov(qword_ptr(rdx + 24), 0)?; // entry_ns: no durations here
                        a.mov(qword_ptr(rdx + 32), counters.returns as i32)?; // counter, flags 0
                    }
                    a.mov(qword_ptr(rdx), rsi)?; // slot
                    if counters.hits != NO_COUNTER {
                        a.inc(qword_ptr(rax + counter_at(counters.hits)))?;
                    }
                    a.mov(rcx, ret::trampoline())?;
                    a.mov(qword_ptr(rsi), rcx)?;
                    a.pop(rsi)?;
                    a.pop(rdx)?;
                    a.pop(rcx)?;
                    restore(a)?;
                    a.lea(rsp, ptr(rsp + 128))?;
                    a.jmp(insn)?;
                    a.set_label(slow)?;
                    a.pop(rsi)?;
                    a.pop(rdx)?;
                    a.pop(rcx)?;
                    restore(a)?;
                    a.jmp(common)?;
                }
                Ok(())
            };
            ret_block(&mut a, false, &mut ret, &mut ret_push, &mut ret_slow)?;
            ret_block(&mut a, true, &mut ret_t, &mut ret_t_push, &mut ret_t_slow)?;
            a.set_label(&mut full_ptr)?;
            a.db(&jump::full_entry().to_le_bytes())?;
            a.set_label(&mut guard)?;
            a.db(&thread::STACK_GUARD.load(core::sync::atomic::Ordering::Relaxed).to_le_bytes())
        })()
        .map_err(err)?;
        let res = a
            .assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .map_err(err)?;
        let off = |l: &CodeLabel| res.label_ip(l).map(|ip| ip - at).map_err(err);
        Ok(Assembled {
            count: off(&count)?,
            full: off(&full)?,
            ret: off(&ret)?,
            ret_timed: off(&ret_t)?,
            insn_offset: off(&insn)?,
            code: res.inner.code_buffer,
            pushed: Vec::new(), // not compared
            code_end: 0,
        })
    }

    /// The instructions of a body (not its final pointer), with each branch's target and each
    /// RIP-relative operand named by the index of the instruction it reaches.
    fn listing(code: &[u8]) -> Vec<String> {
        let code = &code[..code.len() - 16];
        let insns: Vec<_> =
            Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).into_iter().collect();
        let index = |ip: u64| {
            insns.iter().position(|i| i.ip() == ip).map_or("data".to_string(), |n| format!("#{n}"))
        };
        let mut f = IntelFormatter::new();
        insns
            .iter()
            .map(|i| {
                let mut s = String::new();
                f.format(i, &mut s);
                if i.is_jmp_short_or_near() || i.is_jcc_short_or_near() {
                    s = format!("{:?} {}", i.mnemonic(), index(i.near_branch_target()));
                } else if i.is_ip_rel_memory_operand() {
                    s = format!("{:?} [rip -> {}]", i.code(), index(i.ip_rel_memory_address()));
                }
                s
            })
            .collect()
    }

    /// The fixed-encoding body is, instruction for instruction, the body iced assembled.
    #[test]
    fn bodies_match_the_assembled_reference() {
        let site = 0x5555_0000_1234u64;
        let d = decode(
            &[
                0x48, 0x89, 0xe5, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
                0x90, 0x90,
            ],
            site,
        )
        .unwrap();
        let relocated = [0x48, 0x89, 0xe5, 0xe9, 1, 2, 3, 4];
        for (hits, returns) in
            [(3, NO_COUNTER), (NO_COUNTER, 4), (3, 4), (NO_COUNTER, NO_COUNTER), (700, 9)]
        {
            let counters = Counters { hits, returns };
            let ours = assemble_body(&d, site, counters, &relocated).unwrap();
            let theirs = iced_body(&d, site, counters, 0x1000, &relocated).unwrap();
            let (a, b) = (listing(&ours.code), listing(&theirs.code));
            assert_eq!(a, b, "counters {hits} {returns}");
            assert!(a.len() > 10);
            // The entries are the same instructions.
            let nth = |code: &[u8], off: u64| {
                Decoder::with_ip(64, code, 0, DecoderOptions::NONE)
                    .into_iter()
                    .position(|i| i.ip() == off)
            };
            for (x, y) in [
                (ours.count, theirs.count),
                (ours.full, theirs.full),
                (ours.ret, theirs.ret),
                (ours.ret_timed, theirs.ret_timed),
                (ours.insn_offset, theirs.insn_offset),
            ] {
                assert_eq!(nth(&ours.code, x), nth(&theirs.code, y), "counters {hits} {returns}");
            }
            assert_eq!(ours.code[ours.code.len() - 16..], theirs.code[theirs.code.len() - 16..]);
        }
    }
}
