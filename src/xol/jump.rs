//! The jump path's code: for a site, a `jmp rel32` over the probed instruction, a stub it lands
//! on, and a body the stub goes to through a pointer.
//!
//! ```text
//!  site:  jmp stub            stub:  jmp [pointer]        pointer (read-write data)
//!                                                          -> body.count or body.full
//!  body.count:  lea rsp, [rsp-128]; push rax; seto al; lahf; push rax
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::area::Areas;
use super::decode::{Decoded, XolError};
use super::reloc::relocate;
use crate::objects::MapEntry;
use crate::sigsafe::table::SlotMap;
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
    bodies: HashMap<(u64, [u8; 16], Counters), Body>,
    templates: HashMap<(bool, bool, usize), Template>,
    stubs: HashMap<(u64, [u8; 16]), Stub>,
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
        let b = write_body(areas, &mut self.templates, d, site, counters, maps)?;
        self.bodies.insert((site, bytes, counters), b);
        Ok(b)
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
    templates: &mut HashMap<(bool, bool, usize), Template>,
    d: &Decoded,
    site: u64,
    counters: Counters,
    maps: &[MapEntry],
) -> Result<Body, XolError> {
    // Bodies of one shape (which counters, how long the relocated instruction) differ only by
    // constants: assembled once, then copied and filled in.
    let probe = relocate(d, site, site.wrapping_add(JMP_LEN as u64))?;
    let key = (counters.hits != NO_COUNTER, counters.returns != NO_COUNTER, probe.code.len());
    let t = match templates.get(&key) {
        Some(t) => t,
        None => {
            let t = Template::new(d, key)?;
            templates.entry(key).or_insert(t)
        }
    };
    let size = (t.asm.code.len() as u64).next_multiple_of(16);
    let at = areas.alloc_near(site, size, 16, maps)?;
    let r = relocate(d, site, at + t.asm.insn_offset)?;
    if r.code.len() != probe.code.len() {
        return Err(XolError::Relocate { insn: d.text(), why: "body size changed".into() });
    }
    let mut code = t.fill(site, counters, &r.code);
    // Up to the allocation's end: bodies allocated one after the other are written as one run.
    code.resize(size as usize, 0xcc);
    areas.stage(at, &code);
    let insn = at + t.asm.insn_offset;
    let slot = SlotMap {
        start: insn,
        len: r.insn_len as u32,
        site,
        site_len: d.len as u32,
        tail: (r.code.len() - r.insn_len) as u32,
        syscall: r.syscall,
    };
    let asm = &t.asm;
    Ok(Body { count: at + asm.count, full: at + asm.full, ret: at + asm.ret, insn, slot, counters })
}

/// A body assembled with marker constants, and where the markers are.
pub struct Template {
    asm: Assembled,
    site_at: Vec<usize>,
    hits_at: Vec<usize>,
    returns_at: Vec<usize>,
}

const SITE_MARK: u64 = 0x5a17_e5a1_7e5a_17e5;
const HITS_MARK: u32 = 0x6d6d_6d68; // HEADER + 8 * index: a multiple of 8
const RETURNS_MARK: u32 = 0x5b5b_5b5b;

impl Template {
    fn new(d: &Decoded, (hits, returns, len): (bool, bool, usize)) -> Result<Template, XolError> {
        let hits_index = (HITS_MARK as u64 - COUNTERS_AT) / 8;
        let counters = Counters {
            hits: if hits { hits_index as u32 } else { NO_COUNTER },
            returns: if returns { RETURNS_MARK } else { NO_COUNTER },
        };
        let asm = assemble_body(d, SITE_MARK, counters, 0x1000_0000, &vec![0x90; len])?;
        let find = |pat: &[u8]| -> Vec<usize> {
            asm.code
                .windows(pat.len())
                .enumerate()
                .filter(|(_, w)| *w == pat)
                .map(|(i, _)| i)
                .collect()
        };
        let t = Template {
            site_at: find(&SITE_MARK.to_le_bytes()),
            hits_at: if hits { find(&HITS_MARK.to_le_bytes()) } else { Vec::new() },
            returns_at: if returns { find(&RETURNS_MARK.to_le_bytes()) } else { Vec::new() },
            asm,
        };
        let expected =
            (1 + returns as usize, hits as usize * (1 + returns as usize), returns as usize);
        if (t.site_at.len(), t.hits_at.len(), t.returns_at.len()) != expected {
            return Err(XolError::Relocate { insn: d.text(), why: "body template".into() });
        }
        Ok(t)
    }

    fn fill(&self, site: u64, counters: Counters, relocated: &[u8]) -> Vec<u8> {
        let mut code = self.asm.code.clone();
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = code.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        for &at in &self.site_at {
            put(at, &site.to_le_bytes());
        }
        let hits_disp = (COUNTERS_AT + counters.hits as u64 * 8) as u32;
        for &at in &self.hits_at {
            put(at, &hits_disp.to_le_bytes());
        }
        for &at in &self.returns_at {
            put(at, &counters.returns.to_le_bytes());
        }
        put(self.asm.insn_offset as usize, relocated);
        code
    }
}

struct Assembled {
    code: Vec<u8>,
    /// Offsets of the entries and of the relocated instruction.
    count: u64,
    full: u64,
    ret: u64,
    insn_offset: u64,
}

fn assemble_body(
    d: &Decoded,
    site: u64,
    counters: Counters,
    at: u64,
    relocated: &[u8],
) -> Result<Assembled, XolError> {
    use iced_x86::code_asm::*;
    use iced_x86::BlockEncoderOptions;
    let err = |e: iced_x86::IcedError| XolError::Relocate { insn: d.text(), why: e.to_string() };
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
        a.set_label(&mut ret)?;
        if counters.returns == NO_COUNTER {
            a.jmp(full)?;
        } else {
            save(&mut a)?;
            a.push(rcx)?;
            a.push(rdx)?;
            a.push(rsi)?;
            a.db(&load_block)?;
            a.test(rax, rax)?;
            a.jz(ret_slow)?;
            a.mov(ecx, dword_ptr(rax + RET_DEPTH_AT))?;
            a.cmp(ecx, thread::RET_STACK as u32)?;
            a.jae(ret_slow)?;
            a.lea(rsi, ptr(rsp + 168))?; // the program's rsp: 5 pushes and the red zone
            a.test(ecx, ecx)?;
            a.jz(ret_push)?;
            // A pending frame at or below this one (a longjmp abandoned it, or a tail call
            // chains to it) is the full entry's to sort out.
            a.lea(rdx, ptr(rcx + rcx * 4))?;
            a.cmp(qword_ptr(rax + rdx * 8 + (FRAMES_AT - FRAME_SIZE)), rsi)?;
            a.jbe(ret_slow)?;
            a.set_label(&mut ret_push)?;
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
            a.mov(qword_ptr(rdx + 24), 0)?; // entry_ns: no durations here
            a.mov(qword_ptr(rdx + 32), counters.returns as i32)?; // counter, flags 0
            a.mov(qword_ptr(rdx), rsi)?; // slot
            if counters.hits != NO_COUNTER {
                a.inc(qword_ptr(rax + counter_at(counters.hits)))?;
            }
            a.mov(rcx, ret::trampoline())?;
            a.mov(qword_ptr(rsi), rcx)?;
            a.pop(rsi)?;
            a.pop(rdx)?;
            a.pop(rcx)?;
            restore(&mut a)?;
            a.lea(rsp, ptr(rsp + 128))?;
            a.jmp(insn)?;
            a.set_label(&mut ret_slow)?;
            a.pop(rsi)?;
            a.pop(rdx)?;
            a.pop(rcx)?;
            restore(&mut a)?;
            a.jmp(common)?;
        }
        a.set_label(&mut full_ptr)?;
        a.db(&jump::full_entry().to_le_bytes())
    })()
    .map_err(err)?;
    let res =
        a.assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).map_err(err)?;
    let off = |l: &CodeLabel| res.label_ip(l).map(|ip| ip - at).map_err(err);
    Ok(Assembled {
        count: off(&count)?,
        full: off(&full)?,
        ret: off(&ret)?,
        insn_offset: off(&insn)?,
        code: res.inner.code_buffer,
    })
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
        let Some(stub) = areas.stub_in(lo, hi, STUB_LEN, maps) else {
            return Err(format!(
                "no room for a punned jump: the {} byte(s) after this {}-byte instruction fix \
                 its target to {lo:#x}..{hi:#x}, which is taken or out of bounds",
                JMP_LEN - d.len,
                d.len
            ));
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
        let b = write_body(&mut areas, &mut HashMap::new(), &d, site, counters, &maps).unwrap();
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
}
