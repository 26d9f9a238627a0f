//! Execute-out-of-line: what happens to the instruction a breakpoint displaced.
//!
//! At registration (never on the trap path) the instruction is decoded once and given a [`Resume`]:
//! - ordinary instructions are copied into an XOL slot, re-encoded for the slot's address (so that a
//!   RIP-relative operand still reaches its target), and followed by a `jmp rel32` back to the next
//!   instruction: one trap per hit, no single-step;
//! - control flow (call/jmp rel, jcc, loop/loopcc, jrcxz, ret, ret imm16, call/jmp through a register
//!   or memory) is described by an [`Emu`] that the trap handler applies to the saved context, because
//!   running it elsewhere would push or compare the wrong address;
//! - anything else that depends on where it runs (int3/int n, far transfers, xbegin, ud2, 16-bit
//!   branches, 32-bit addressing of branch targets) is refused with a message that names it.
//!
//! Slots live in [`XolArea`]s mapped within ±2 GiB of the object, are written once, and are never
//! reused for another instruction: a thread preempted inside a slot always finds the bytes it started.

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, Formatter, Instruction, IntelFormatter,
    OpKind, Register,
};

use crate::sys;

/// The longest slot: a 15-byte instruction, a 7-byte `lea rcx` fix-up (after `syscall`), a 5-byte
/// `jmp rel32`, padded.
pub const SLOT_SIZE: usize = 32;

/// Why an instruction cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XolError {
    /// The bytes are not a valid x86-64 instruction.
    Invalid { at: u64 },
    /// A valid instruction that libuprobe refuses to displace.
    Refused { insn: String, why: &'static str },
    /// The instruction could not be re-encoded at its slot's address.
    Relocate { insn: String, why: String },
    /// No memory for an XOL area within ±2 GiB of the object.
    NoArea { near: u64, errno: sys::Errno },
}

impl std::fmt::Display for XolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XolError::Invalid { at } => write!(f, "no valid instruction at {at:#x}"),
            XolError::Refused { insn, why } => write!(f, "cannot probe `{insn}`: {why}"),
            XolError::Relocate { insn, why } => {
                write!(f, "cannot relocate `{insn}` into an XOL slot: {why}")
            }
            XolError::NoArea { near, errno } => {
                write!(f, "no XOL area could be mapped within 2 GiB of {near:#x}: {errno}")
            }
        }
    }
}

impl std::error::Error for XolError {}

/// Register numbers as indices into `ucontext_t.uc_mcontext.gregs`.
pub type Greg = u8;

/// No register in an [`IndirectOperand`].
pub const NO_REG: Greg = 0xff;

/// Where an indirect call or jump takes its target from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndirectOperand {
    Reg(Greg),
    /// `[base + index * scale + disp]`, 8 bytes. A RIP-relative operand has `base == NO_REG` and its
    /// absolute address in `disp`.
    Mem {
        base: Greg,
        index: Greg,
        scale: u8,
        disp: u64,
    },
}

/// The condition of a `jcc`, evaluated on RFLAGS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    O,
    No,
    B,
    Ae,
    E,
    Ne,
    Be,
    A,
    S,
    Ns,
    P,
    Np,
    L,
    Ge,
    Le,
    G,
}

/// Which `loop` variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    Loop,
    Loope,
    Loopne,
}

/// A control-flow instruction, as the trap handler applies it to the saved context. Addresses are
/// absolute runtime addresses; `next` is the address of the following instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emu {
    Jmp { target: u64 },
    Call { target: u64, next: u64 },
    Jcc { cond: Cond, target: u64, next: u64 },
    Loop { kind: LoopKind, target: u64, next: u64 },
    Jrcxz { addr32: bool, target: u64, next: u64 },
    Ret { pop: u16 },
    CallIndirect { op: IndirectOperand, next: u64 },
    JmpIndirect { op: IndirectOperand },
}

/// How a thread that hit a breakpoint goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Jump to the slot: displaced instruction, then back.
    Xol { slot: u64 },
    /// Apply the instruction to the context.
    Emulate(Emu),
}

/// One decoded instruction at a probe site.
pub struct Decoded {
    pub insn: Instruction,
    pub len: usize,
    /// What to do with it; `None` means "copy to a slot".
    pub emu: Option<Emu>,
}

impl Decoded {
    /// The instruction in Intel syntax, for messages.
    pub fn text(&self) -> String {
        format_insn(&self.insn)
    }
}

pub fn format_insn(insn: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

/// Decode the instruction at runtime address `ip` from `bytes` (at least 15 bytes when available)
/// and decide how it is resumed.
pub fn decode(bytes: &[u8], ip: u64) -> Result<Decoded, XolError> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(XolError::Invalid { at: ip });
    }
    let len = insn.len();
    let next = ip.wrapping_add(len as u64);
    let refuse = |why| Err(XolError::Refused { insn: format_insn(&insn), why });
    let target = insn.near_branch_target();
    let emu = match insn.code() {
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => Some(Emu::Jmp { target }),
        Code::Call_rel32_64 => Some(Emu::Call { target, next }),
        Code::Loop_rel8_64_RCX | Code::Loope_rel8_64_RCX | Code::Loopne_rel8_64_RCX => {
            Some(Emu::Loop { kind: loop_kind(insn.code()), target, next })
        }
        Code::Loop_rel8_64_ECX | Code::Loope_rel8_64_ECX | Code::Loopne_rel8_64_ECX => {
            return refuse("loop with a 32-bit count register (0x67 prefix)");
        }
        Code::Jrcxz_rel8_64 => Some(Emu::Jrcxz { addr32: false, target, next }),
        Code::Jecxz_rel8_64 => Some(Emu::Jrcxz { addr32: true, target, next }),
        Code::Retnq => Some(Emu::Ret { pop: 0 }),
        Code::Retnq_imm16 => Some(Emu::Ret { pop: insn.immediate16() }),
        Code::Call_rm64 => Some(Emu::CallIndirect { op: indirect_operand(&insn)?, next }),
        Code::Jmp_rm64 => Some(Emu::JmpIndirect { op: indirect_operand(&insn)? }),
        // Not a transfer of control within the program: runs in the slot, rcx fixed up after.
        Code::Syscall => None,
        _ if insn.is_jcc_short_or_near() => {
            if insn.code_size() != iced_x86::CodeSize::Code64 || !is_64bit_jcc(insn.code()) {
                return refuse("16-bit branch");
            }
            Some(Emu::Jcc { cond: cond(insn.condition_code()), target, next })
        }
        _ => {
            use iced_x86::FlowControl as F;
            match insn.flow_control() {
                F::Next => None,
                F::Interrupt => return refuse("it raises an interrupt (int3, int n, into, int1)"),
                F::XbeginXabortXend => {
                    return refuse("transactional memory cannot run out of line")
                }
                F::Exception => return refuse("it raises an exception (ud0/ud1/ud2)"),
                F::Return => return refuse("far or interrupt return"),
                F::Call | F::IndirectCall => return refuse("far or 16-bit call"),
                F::UnconditionalBranch | F::IndirectBranch | F::ConditionalBranch => {
                    return refuse("far, 16-bit or 32-bit-address branch")
                }
            }
        }
    };
    Ok(Decoded { insn, len, emu })
}

fn is_64bit_jcc(code: Code) -> bool {
    format!("{code:?}").ends_with("_64")
}

fn loop_kind(code: Code) -> LoopKind {
    match code {
        Code::Loope_rel8_64_RCX => LoopKind::Loope,
        Code::Loopne_rel8_64_RCX => LoopKind::Loopne,
        _ => LoopKind::Loop,
    }
}

fn cond(cc: ConditionCode) -> Cond {
    match cc {
        ConditionCode::o => Cond::O,
        ConditionCode::no => Cond::No,
        ConditionCode::b => Cond::B,
        ConditionCode::ae => Cond::Ae,
        ConditionCode::e => Cond::E,
        ConditionCode::ne => Cond::Ne,
        ConditionCode::be => Cond::Be,
        ConditionCode::a => Cond::A,
        ConditionCode::s => Cond::S,
        ConditionCode::ns => Cond::Ns,
        ConditionCode::p => Cond::P,
        ConditionCode::np => Cond::Np,
        ConditionCode::l => Cond::L,
        ConditionCode::ge => Cond::Ge,
        ConditionCode::le => Cond::Le,
        ConditionCode::g | ConditionCode::None => Cond::G,
    }
}

fn indirect_operand(insn: &Instruction) -> Result<IndirectOperand, XolError> {
    let refuse = |why| Err(XolError::Refused { insn: format_insn(insn), why });
    match insn.op0_kind() {
        OpKind::Register => match greg(insn.op0_register()) {
            Some(r) => Ok(IndirectOperand::Reg(r)),
            None => refuse("branch through an unusual register"),
        },
        OpKind::Memory => {
            // fs/gs-relative targets would need the segment base, which the context does not hold.
            if matches!(insn.memory_segment(), Register::FS | Register::GS) {
                return refuse("branch through fs/gs-relative memory");
            }
            if insn.is_ip_rel_memory_operand() {
                return Ok(IndirectOperand::Mem {
                    base: NO_REG,
                    index: NO_REG,
                    scale: 1,
                    disp: insn.ip_rel_memory_address(),
                });
            }
            let reg = |r: Register| -> Result<Greg, XolError> {
                if r == Register::None {
                    Ok(NO_REG)
                } else {
                    greg(r).ok_or(XolError::Refused {
                        insn: format_insn(insn),
                        why: "branch through memory with 32-bit addressing",
                    })
                }
            };
            Ok(IndirectOperand::Mem {
                base: reg(insn.memory_base())?,
                index: reg(insn.memory_index())?,
                scale: insn.memory_index_scale() as u8,
                disp: insn.memory_displacement64(),
            })
        }
        _ => refuse("unexpected operand"),
    }
}

/// The `gregs` index of a 64-bit general-purpose register.
fn greg(r: Register) -> Option<Greg> {
    let i = match r {
        Register::R8 => libc::REG_R8,
        Register::R9 => libc::REG_R9,
        Register::R10 => libc::REG_R10,
        Register::R11 => libc::REG_R11,
        Register::R12 => libc::REG_R12,
        Register::R13 => libc::REG_R13,
        Register::R14 => libc::REG_R14,
        Register::R15 => libc::REG_R15,
        Register::RDI => libc::REG_RDI,
        Register::RSI => libc::REG_RSI,
        Register::RBP => libc::REG_RBP,
        Register::RBX => libc::REG_RBX,
        Register::RDX => libc::REG_RDX,
        Register::RAX => libc::REG_RAX,
        Register::RCX => libc::REG_RCX,
        Register::RSP => libc::REG_RSP,
        _ => return None,
    };
    Some(i as Greg)
}

/// The bytes of the slot at `slot` for instruction `d`, which sits at `site`.
pub fn slot_code(d: &Decoded, site: u64, slot: u64) -> Result<Vec<u8>, XolError> {
    debug_assert!(d.emu.is_none());
    let mut enc = Encoder::new(64);
    enc.encode(&d.insn, slot)
        .map_err(|e| XolError::Relocate { insn: d.text(), why: e.to_string() })?;
    let mut code = enc.take_buffer();
    let next = site.wrapping_add(d.len as u64);
    if d.insn.code() == Code::Syscall {
        // syscall leaves the address of the following instruction in rcx; make it the original one.
        let here = slot + code.len() as u64 + 7;
        code.extend_from_slice(&[0x48, 0x8d, 0x0d]); // lea rcx, [rip + disp32]
        code.extend_from_slice(&rel32(here, next, d)?.to_le_bytes());
    }
    let here = slot + code.len() as u64 + 5;
    code.push(0xe9); // jmp rel32
    code.extend_from_slice(&rel32(here, next, d)?.to_le_bytes());
    if code.len() > SLOT_SIZE {
        return Err(XolError::Relocate { insn: d.text(), why: "slot too small".into() });
    }
    Ok(code)
}

fn rel32(from: u64, to: u64, d: &Decoded) -> Result<i32, XolError> {
    i32::try_from(to.wrapping_sub(from) as i64)
        .map_err(|_| XolError::Relocate { insn: d.text(), why: "slot out of rel32 reach".into() })
}

/// A region of slots near one object.
struct XolArea {
    base: u64,
    len: u64,
    used: u64,
}

/// All XOL areas. Owned by the registry (under its mutex); slots are handed out, never taken back.
#[derive(Default)]
pub struct XolAreas {
    areas: Vec<XolArea>,
}

/// Size of one XOL area.
const AREA_SIZE: u64 = 64 * 1024;
/// How far from the site an area may be; well inside rel32 so that the site's own RIP-relative
/// targets (within its object) stay within reach too.
const MAX_DISTANCE: u64 = 1 << 30;

impl XolAreas {
    /// Write `d` into a new slot near `site` and return the slot's address.
    pub fn install(&mut self, d: &Decoded, site: u64) -> Result<u64, XolError> {
        let slot = self.alloc_near(site)?;
        let code = slot_code(d, site, slot)?;
        let page = sys::page_size() as u64;
        let start = slot & !(page - 1);
        let end = (slot + SLOT_SIZE as u64 + page - 1) & !(page - 1);
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        // SAFETY: [start, end) lies inside one of our XOL areas, which nothing else uses; other
        // threads may be executing older slots there, so PROT_EXEC stays on throughout.
        unsafe {
            sys::mprotect(start as usize, (end - start) as usize, rwx)
                .map_err(|errno| XolError::NoArea { near: site, errno })?;
            core::ptr::copy_nonoverlapping(code.as_ptr(), slot as *mut u8, code.len());
            let _ = sys::mprotect(
                start as usize,
                (end - start) as usize,
                libc::PROT_READ | libc::PROT_EXEC,
            );
        }
        Ok(slot)
    }

    fn alloc_near(&mut self, site: u64) -> Result<u64, XolError> {
        let near = |a: &XolArea| a.base.abs_diff(site) < MAX_DISTANCE;
        if let Some(area) = self.areas.iter_mut().find(|a| near(a) && a.used < a.len) {
            let slot = area.base + area.used;
            area.used += SLOT_SIZE as u64;
            return Ok(slot);
        }
        let base = map_area_near(site)?;
        self.areas.push(XolArea { base, len: AREA_SIZE, used: SLOT_SIZE as u64 });
        Ok(base)
    }

    /// Bytes of XOL memory mapped so far.
    pub fn mapped_bytes(&self) -> u64 {
        self.areas.iter().map(|a| a.len).sum()
    }
}

/// Map an area in the nearest free gap to `site`.
fn map_area_near(site: u64) -> Result<u64, XolError> {
    let maps = crate::objects::read_maps().unwrap_or_default();
    let mut gaps = Vec::new();
    let mut prev_end = 0x10000u64;
    for m in &maps {
        if m.start > prev_end {
            gaps.push((prev_end, m.start));
        }
        prev_end = prev_end.max(m.end);
    }
    // Candidates: the end of each gap's lower side and the start of its upper side, closest first.
    let mut candidates: Vec<u64> = Vec::new();
    for (lo, hi) in gaps {
        if hi - lo < AREA_SIZE {
            continue;
        }
        candidates.push(lo);
        candidates.push(hi - AREA_SIZE);
    }
    candidates.retain(|c| c.abs_diff(site) < MAX_DISTANCE && *c < 0x7fff_ffff_0000);
    candidates.sort_by_key(|c| c.abs_diff(site));
    let prot = libc::PROT_READ | libc::PROT_EXEC;
    let mut last = sys::Errno(libc::ENOMEM);
    for c in candidates {
        match sys::mmap_anon(c as usize, AREA_SIZE as usize, prot) {
            Ok(a) => return Ok(a as u64),
            Err(e) => last = e,
        }
    }
    Err(XolError::NoArea { near: site, errno: last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(bytes: &[u8]) -> Result<Decoded, XolError> {
        let mut b = bytes.to_vec();
        b.resize(16, 0x90);
        decode(&b, 0x1000)
    }

    #[test]
    fn classifies_control_flow() {
        let cases: &[(&[u8], Option<Emu>)] = &[
            (&[0xeb, 0x10], Some(Emu::Jmp { target: 0x1012 })),
            (&[0xe9, 0, 1, 0, 0], Some(Emu::Jmp { target: 0x1105 })),
            (&[0xe8, 0, 0, 0, 0], Some(Emu::Call { target: 0x1005, next: 0x1005 })),
            (&[0x75, 0xfe], Some(Emu::Jcc { cond: Cond::Ne, target: 0x1000, next: 0x1002 })),
            (
                &[0x0f, 0x84, 0, 0, 0, 0],
                Some(Emu::Jcc { cond: Cond::E, target: 0x1006, next: 0x1006 }),
            ),
            (&[0xe2, 0xfe], Some(Emu::Loop { kind: LoopKind::Loop, target: 0x1000, next: 0x1002 })),
            (&[0xe3, 0x02], Some(Emu::Jrcxz { addr32: false, target: 0x1004, next: 0x1002 })),
            (&[0xc3], Some(Emu::Ret { pop: 0 })),
            (&[0xc2, 0x10, 0x00], Some(Emu::Ret { pop: 16 })),
            (
                &[0xff, 0xd0],
                Some(Emu::CallIndirect {
                    op: IndirectOperand::Reg(libc::REG_RAX as u8),
                    next: 0x1002,
                }),
            ),
            (
                &[0xff, 0x25, 0x10, 0, 0, 0],
                Some(Emu::JmpIndirect {
                    op: IndirectOperand::Mem {
                        base: NO_REG,
                        index: NO_REG,
                        scale: 1,
                        disp: 0x1016,
                    },
                }),
            ),
            (&[0x55], None),
            (&[0xf3, 0x0f, 0x1e, 0xfa], None),
        ];
        for (bytes, want) in cases {
            let d = dec(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
            assert_eq!(d.emu, *want, "{bytes:02x?} ({})", d.text());
            assert_eq!(d.len, bytes.len());
        }
    }

    #[test]
    fn refuses_what_cannot_run_elsewhere() {
        for bytes in [&[0xcc][..], &[0xcd, 0x80], &[0x0f, 0x0b], &[0xc7, 0xf8, 0, 0, 0, 0], &[0xcb]]
        {
            let e = dec(bytes).err().unwrap_or_else(|| panic!("{bytes:02x?} accepted"));
            assert!(matches!(e, XolError::Refused { .. }), "{bytes:02x?}: {e}");
        }
        assert!(matches!(
            dec(&[0x0f, 0xff, 0xff]),
            Err(XolError::Invalid { .. }) | Err(XolError::Refused { .. })
        ));
    }

    #[test]
    fn relocates_rip_relative_and_jumps_back() {
        // mov rax, [rip + 0x100] at 0x1000 reads 0x1107.
        let d = dec(&[0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00]).unwrap();
        let code = slot_code(&d, 0x1000, 0x8000).unwrap();
        assert_eq!(&code[..3], &[0x48, 0x8b, 0x05]);
        let disp = i32::from_le_bytes(code[3..7].try_into().unwrap());
        assert_eq!(0x8007 + disp as i64, 0x1107);
        assert_eq!(code[7], 0xe9);
        let back = i32::from_le_bytes(code[8..12].try_into().unwrap());
        assert_eq!(0x800c + back as i64, 0x1007);
    }

    #[test]
    fn syscall_slot_restores_rcx() {
        let d = dec(&[0x0f, 0x05]).unwrap();
        let code = slot_code(&d, 0x1000, 0x8000).unwrap();
        assert_eq!(&code[..5], &[0x0f, 0x05, 0x48, 0x8d, 0x0d]);
        let disp = i32::from_le_bytes(code[5..9].try_into().unwrap());
        assert_eq!(0x8009 + disp as i64, 0x1002);
    }
}
