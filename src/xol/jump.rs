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
use crate::sigsafe::{jump, thread};

/// Length of `jmp rel32`.
pub const JMP_LEN: usize = 5;
/// Length of a stub: `jmp qword ptr [rip + disp32]`.
const STUB_LEN: u64 = 6;
/// The body's counting part, before the relocated instruction.
const COUNT_PART: u64 = 45;
/// Offset of a thread's counters in its block (see `sigsafe::thread`).
const COUNTERS_AT: u64 = thread::HEADER as u64;

/// A site's body.
#[derive(Clone, Copy, Debug)]
pub struct Body {
    /// Where a count-only hit enters (the same as `full` when the site has no counter).
    pub count: u64,
    /// Where a hit that needs the Rust side enters.
    pub full: u64,
    /// The relocated instruction: where a trap at the site resumes, too.
    pub insn: u64,
    pub slot: SlotMap,
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
    bodies: HashMap<(u64, [u8; 16], u32), Body>,
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
        counter: u32,
        maps: &[MapEntry],
    ) -> Result<Jump, String> {
        let body = match self.bodies.get(&(site, bytes, counter)) {
            Some(b) => *b,
            None => {
                let b = write_body(areas, d, site, counter, maps).map_err(|e| e.to_string())?;
                self.bodies.insert((site, bytes, counter), b);
                b
            }
        };
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

    /// Every body's relocated instruction, for the fault translation.
    pub fn slots(&self) -> impl Iterator<Item = SlotMap> + '_ {
        self.bodies.values().map(|b| b.slot)
    }
}

/// Write the body of `d` at `site`.
fn write_body(
    areas: &mut Areas,
    d: &Decoded,
    site: u64,
    counter: u32,
    maps: &[MapEntry],
) -> Result<Body, XolError> {
    let counted = counter != NO_COUNTER;
    // The relocated instruction's length depends on where it goes; measure it once somewhere in
    // reach (its length does not change within rel32 reach).
    let probe_at = site.wrapping_add(JMP_LEN as u64);
    let reloc_len = relocate(d, site, probe_at)?.code.len() as u64;
    let count_part = if counted { COUNT_PART } else { 0 };
    let size = (count_part + reloc_len + 5 + 30 + 7 + 8 + 8).next_multiple_of(16);
    let at = areas.alloc_near(site, size, 16, maps)?;
    let insn = at + count_part;
    let r = relocate(d, site, insn)?;
    let mut c = Vec::with_capacity(size as usize);
    if counted {
        let tls = i32::try_from(thread::tls_offset())
            .map_err(|_| XolError::Relocate { insn: d.text(), why: "TLS out of reach".into() })?;
        let counter_at = COUNTERS_AT + counter as u64 * 8;
        c.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]); // lea rsp, [rsp - 128]
        c.extend_from_slice(&[0x50, 0x0f, 0x90, 0xc0, 0x9f, 0x50]); // push rax; seto al; lahf; push rax
        c.extend_from_slice(&[0x64, 0x48, 0x8b, 0x04, 0x25]); // mov rax, fs:[tls]
        c.extend_from_slice(&tls.to_le_bytes());
        c.extend_from_slice(&[0x48, 0x85, 0xc0]); // test rax, rax
        c.extend_from_slice(&[0x74, (20 + r.code.len()) as u8]); // jz slow
        c.extend_from_slice(&[0x48, 0xff, 0x80]); // inc qword ptr [rax + disp32]
        c.extend_from_slice(&(counter_at as u32).to_le_bytes());
        c.extend_from_slice(&[0x58, 0x04, 0x7f, 0x9e, 0x58]); // pop rax; add al, 0x7f; sahf; pop rax
        c.extend_from_slice(&[0x48, 0x8d, 0xa4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp + 128]
        debug_assert_eq!(c.len() as u64, COUNT_PART);
    }
    c.extend_from_slice(&r.code);
    if counted {
        c.extend_from_slice(&[0x58, 0x04, 0x7f, 0x9e, 0x58]); // slow: restore, fall into common
    }
    let common = at + c.len() as u64;
    c.push(0x50); // push rax
    c.extend_from_slice(&[0x48, 0xb8]); // movabs rax, site
    c.extend_from_slice(&site.to_le_bytes());
    let call_at = c.len();
    c.extend_from_slice(&[0xff, 0x15, 0, 0, 0, 0]); // call qword ptr [rip + full]
    c.extend_from_slice(&[0x48, 0x8d, 0xa4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp + 128]
    c.push(0xe9); // jmp insn
    let back = insn.wrapping_sub(at + c.len() as u64 + 4) as i32;
    c.extend_from_slice(&back.to_le_bytes());
    let full = at + c.len() as u64;
    c.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]); // lea rsp, [rsp - 128]
    c.push(0xeb); // jmp common
    c.push(common.wrapping_sub(at + c.len() as u64 + 1) as u8);
    while c.len() % 8 != 0 {
        c.push(0xcc);
    }
    let ptr_at = c.len();
    c.extend_from_slice(&jump::full_entry().to_le_bytes());
    let disp = (ptr_at - (call_at + 6)) as u32;
    c[call_at + 2..call_at + 6].copy_from_slice(&disp.to_le_bytes());
    if c.len() as u64 > size {
        return Err(XolError::Relocate { insn: d.text(), why: "body too long".into() });
    }
    // Up to the allocation's end: bodies allocated one after the other are written as one run.
    c.resize(size as usize, 0xcc);
    areas.stage(at, &c);
    let slot = SlotMap {
        start: insn,
        len: r.insn_len as u32,
        site,
        site_len: d.len as u32,
        tail: (r.code.len() - r.insn_len) as u32,
        syscall: r.syscall,
    };
    Ok(Body { count: if counted { at } else { full }, full, insn, slot })
}

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
        let b = write_body(&mut areas, &d, site, 3, &maps).unwrap();
        let (at, code) = areas.staged().into_iter().next().unwrap();
        let text = disasm(&code, at);
        eprintln!("{}", text.join("\n"));
        assert_eq!(b.count, at);
        // The short jump to the slow path lands right after the relocated `jmp` (5 bytes).
        let jz = text.iter().find(|l| l.starts_with("17: je short")).unwrap();
        assert!(jz.ends_with(&format!("{:X}h", at + 0x32)), "{jz}");
        assert!(text.iter().any(|l| l.starts_with("2d: jmp")), "{text:?}");
        assert!(text.iter().any(|l| l.starts_with("32: pop rax")), "{text:?}");
    }
}
