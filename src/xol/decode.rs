//! Decoding the instruction at a site, and deciding how it resumes: copied out of line, or
//! emulated (control flow), or refused with a message that names it.

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, OpKind,
    Register,
};

use crate::sigsafe::plan::{Cond, Emu, Greg, IndirectOperand, LoopKind, NO_REG};
use crate::sigsafe::sys;

/// Why an instruction cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XolError {
    /// The bytes are not a valid x86-64 instruction.
    #[error("no valid instruction at {at:#x}")]
    Invalid { at: u64 },
    /// A valid instruction that libuprobe refuses to displace.
    #[error("cannot probe `{insn}`: {why}")]
    Refused { insn: String, why: &'static str },
    /// The instruction could not be re-encoded at its slot's address.
    #[error("cannot relocate `{insn}` out of line: {why}")]
    Relocate { insn: String, why: String },
    /// No memory for code within reach of the object.
    #[error("no memory for libuprobe's code could be mapped within 1 GiB of {near:#x}: {errno}")]
    NoArea { near: u64, errno: sys::Errno },
}

/// One decoded instruction at a probe site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Where it sits.
    pub ip: u64,
    pub len: usize,
    /// What to do with it; `None` means "copy to a slot".
    pub emu: Option<Emu>,
    /// The instruction's bytes (`len` of them).
    pub bytes: [u8; 15],
    /// Where its RIP-relative disp32 is, in `bytes`, if it has one.
    pub rip_disp_at: Option<u8>,
    /// The address its RIP-relative operand refers to (with `rip_disp_at`).
    pub rip_target: u64,
    /// The RIP-relative operand is EIP-relative (a 0x67 prefix: 32-bit address arithmetic).
    pub eip: bool,
    /// `syscall`, which leaves the address of the next instruction in rcx.
    pub syscall: bool,
    /// A near call, direct or indirect.
    pub call: bool,
    /// How many bytes it moves rsp down (`push`: 8, `pop`: -8, `sub rsp, 40`: 40), or None when
    /// it sets rsp some other way (`leave`, `mov rsp, rbp`, `and rsp, -16`): the frame rules of
    /// its copy's way back (`xol::cfi`).
    pub pushed: Option<i32>,
}

impl Decoded {
    /// The instruction in Intel syntax, for messages.
    pub fn text(&self) -> String {
        format_insn(&self.insn())
    }

    /// iced's view of the instruction, decoded again. (Only an indirect branch's operands and
    /// messages need it; see [`decode`] for why sites keep no `Instruction`.)
    pub fn insn(&self) -> Instruction {
        Decoder::with_ip(64, &self.bytes[..self.len], self.ip, DecoderOptions::NONE).decode()
    }

    /// The instruction's bytes for running at `at` instead of its own address: the same bytes,
    /// with a RIP-relative displacement made to reach the same target from there. (No
    /// re-encoding: iced's encoder builds its tables on first use, half a millisecond of every
    /// process's setup, and the original encoding is the one the program ran.)
    pub fn moved_to(&self, at: u64) -> Result<([u8; 15], usize), XolError> {
        let mut out = self.bytes;
        if let Some(i) = self.rip_disp_at {
            let i = i as usize;
            let end = at.wrapping_add(self.len as u64);
            let target = self.rip_target;
            let disp = if self.eip {
                // 32-bit address arithmetic: any displacement reaches, modulo 4 GiB.
                (target as u32).wrapping_sub(end as u32) as i32
            } else {
                i32::try_from(target.wrapping_sub(end) as i64).map_err(|_| XolError::Relocate {
                    insn: self.text(),
                    why: "its RIP-relative operand is out of reach from the copy".into(),
                })?
            };
            out[i..i + 4].copy_from_slice(&disp.to_le_bytes());
        }
        Ok((out, self.len))
    }
}

pub fn format_insn(insn: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

/// Decode the instruction at runtime address `ip` from `bytes` (at least 15 bytes when available)
/// and decide how it is resumed.
///
/// The forms most function entries begin with are recognised by [`decode_common`] first: iced
/// builds its decoder tables (twenty thousand allocations, half a millisecond) on its first
/// decode, and a process with one probe, or only the loader's link-map hook, need not pay it.
pub fn decode(bytes: &[u8], ip: u64) -> Result<Decoded, XolError> {
    match decode_common(bytes, ip) {
        Some(d) => Ok(d),
        None => decode_with_iced(bytes, ip),
    }
}

/// A few common forms, decoded by hand: `endbr64`; `ret`; `push r64`; `mov r32, imm32`; `mov`,
/// `test` and the ALU operations between registers, or with a RIP-relative memory operand; the ALU
/// operations with an immediate on a register; `lea r64, [rip + disp32]`; `cmp byte [rip +
/// disp32], imm8` (and the other ALU operations of that form). No legacy prefix but `endbr64`'s;
/// one optional REX. Anything else is `None`, for iced. (The test `common_forms_decode_as_iced_does`
/// compares every form accepted here, under every REX and ModRM byte, with iced's result.)
fn decode_common(b: &[u8], ip: u64) -> Option<Decoded> {
    let at = |i: usize| b.get(i).copied();
    if b.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        return plain(b, ip, 4, None);
    }
    let rex = at(0).filter(|r| r & 0xf0 == 0x40);
    let o = usize::from(rex.is_some()); // the opcode's index
    let w = rex.is_some_and(|r| r & 8 != 0);
    // A ModRM byte at `o + 1`: register-direct, or RIP-relative (mod 00, rm 101).
    let modrm = |imm: usize| -> Option<(usize, Option<usize>)> {
        let m = at(o + 1)?;
        match m >> 6 {
            3 => Some((o + 2 + imm, None)),
            0 if m & 7 == 5 => Some((o + 6 + imm, Some(o + 2))),
            _ => None,
        }
    };
    let op = at(o)?;
    let (len, disp) = match op {
        0xc3 if rex.is_none() => {
            let mut d = plain(b, ip, 1, None)?;
            d.emu = Some(Emu::Ret { pop: 0 });
            d.pushed = Some(-8);
            return Some(d);
        }
        0x50..=0x57 if rex.is_none() || rex == Some(0x41) => (o + 1, None),
        0xb8..=0xbf if !w => (o + 5, None),
        // add, or, adc, sbb, and, sub, xor, cmp (r/m, r and r, r/m), test, mov: 32 or 64 bits.
        0x01 | 0x03 | 0x09 | 0x0b | 0x11 | 0x13 | 0x19 | 0x1b | 0x21 | 0x23 | 0x29 | 0x2b
        | 0x31 | 0x33 | 0x39 | 0x3b | 0x85 | 0x89 | 0x8b => modrm(0)?,
        // The same ALU operations with an immediate: imm32, imm8.
        0x81 => modrm(4)?,
        0x83 => modrm(1)?,
        // ... on a byte: only the RIP-relative form (`cmp byte [rip + disp32], imm8`).
        0x80 => match modrm(1)? {
            (len, Some(disp)) => (len, Some(disp)),
            _ => return None,
        },
        0x8d if w => match modrm(0)? {
            (len, Some(disp)) => (len, Some(disp)),
            _ => return None, // lea with a register operand is invalid
        },
        _ => return None,
    };
    let mut d = plain(b, ip, len, disp)?;
    d.pushed = pushed_common(op, rex.unwrap_or(0), at(o + 1).unwrap_or(0), &d.bytes[..len]);
    Some(d)
}

/// What a form [`decode_common`] accepts does to rsp, as [`pushed_by`] says of iced's decoding:
/// `op` its opcode, `rex` its REX (0: none), `m` the byte after the opcode (ModRM, where it has
/// one), `insn` its bytes.
fn pushed_common(op: u8, rex: u8, m: u8, insn: &[u8]) -> Option<i32> {
    let (w, r, b) = (rex & 8 != 0, (rex >> 2) & 1, rex & 1);
    let (reg, rm, direct) = ((m >> 3) & 7 | r << 3, m & 7 | b << 3, m >> 6 == 3);
    // The first operand, when it is a register: rsp (esp) moved some way but a push.
    let first_is_sp = match op {
        0x50..=0x57 => return Some(8),
        0xb8..=0xbf => (op & 7 | b << 3) == 4,
        0x03 | 0x0b | 0x13 | 0x1b | 0x23 | 0x2b | 0x33 | 0x3b | 0x8b | 0x8d => reg == 4,
        _ => direct && rm == 4,
    };
    if !first_is_sp {
        return Some(0);
    }
    let value = match (op, insn) {
        (0x83, [.., i]) => *i as i8 as i32,
        (0x81, [.., a, b, c, d]) => i32::from_le_bytes([*a, *b, *c, *d]),
        _ => return None,
    };
    match (w, (m >> 3) & 7) {
        (true, 5) => Some(value),         // sub rsp, imm
        (true, 0) => value.checked_neg(), // add rsp, imm
        _ => None,
    }
}

/// A `Decoded` of `len` bytes that runs in a slot, with a RIP-relative disp32 at `disp`.
fn plain(b: &[u8], ip: u64, len: usize, disp: Option<usize>) -> Option<Decoded> {
    let mut bytes = [0u8; 15];
    bytes[..len].copy_from_slice(b.get(..len)?);
    let next = ip.wrapping_add(len as u64);
    let rip_target = disp.map_or(0, |i| {
        let d = i32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        next.wrapping_add(d as i64 as u64)
    });
    Some(Decoded {
        ip,
        len,
        emu: None,
        bytes,
        rip_disp_at: disp.map(|i| i as u8),
        rip_target,
        eip: false,
        syscall: false,
        call: false,
        pushed: Some(0),
    })
}

fn decode_with_iced(bytes: &[u8], ip: u64) -> Result<Decoded, XolError> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(XolError::Invalid { at: ip });
    }
    let len = insn.len();
    let mut raw = [0u8; 15];
    raw[..len].copy_from_slice(&bytes[..len]);
    let rip_disp_at = if insn.is_ip_rel_memory_operand() {
        let offsets = decoder.get_constant_offsets(&insn);
        if offsets.displacement_size() != 4 {
            return Err(XolError::Refused {
                insn: format_insn(&insn),
                why: "a RIP-relative operand without a 32-bit displacement",
            });
        }
        Some(offsets.displacement_offset() as u8)
    } else {
        None
    };
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
    let ip_rel = rip_disp_at.is_some();
    Ok(Decoded {
        ip,
        len,
        emu,
        bytes: raw,
        rip_disp_at,
        rip_target: if ip_rel { insn.ip_rel_memory_address() } else { 0 },
        eip: ip_rel && insn.memory_base() == Register::EIP,
        syscall: insn.code() == Code::Syscall,
        call: insn.is_call_near() || insn.is_call_near_indirect(),
        pushed: pushed_by(&insn),
    })
}

/// See [`Decoded::pushed`].
fn pushed_by(insn: &Instruction) -> Option<i32> {
    use iced_x86::{Mnemonic, OpKind};
    let inc = insn.stack_pointer_increment();
    let writes_rsp = insn.op_count() > 0
        && insn.op0_kind() == OpKind::Register
        && matches!(insn.op0_register(), Register::RSP | Register::ESP | Register::SP);
    if inc != 0 {
        // `push rsp` pushes; `pop rsp` and `leave` set rsp from memory.
        let sets =
            insn.mnemonic() == Mnemonic::Leave || (writes_rsp && insn.mnemonic() != Mnemonic::Push);
        return (!sets).then_some(-inc);
    }
    if !writes_rsp {
        return Some(0);
    }
    let imm = || match insn.op1_kind() {
        OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8 => {
            i32::try_from(insn.immediate(1) as i64).ok()
        }
        _ => None,
    };
    match insn.mnemonic() {
        Mnemonic::Sub if insn.op0_register() == Register::RSP => imm(),
        Mnemonic::Add if insn.op0_register() == Register::RSP => imm().map(|v| -v),
        Mnemonic::Lea
            if insn.op0_register() == Register::RSP
                && insn.memory_base() == Register::RSP
                && insn.memory_index() == Register::None =>
        {
            i32::try_from(insn.memory_displacement64() as i64).ok().map(|v| -v)
        }
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(bytes: &[u8]) -> Result<Decoded, XolError> {
        dec_at(bytes, 0x1000)
    }

    /// `bytes` (padded with nops to 16) decoded at `ip`.
    fn dec_at(bytes: &[u8], ip: u64) -> Result<Decoded, XolError> {
        let mut b = bytes.to_vec();
        b.resize(16, 0x90);
        decode(&b, ip)
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

    /// A moved copy reads what the instruction read, at the same length and with the same code,
    /// wherever its RIP-relative displacement sits (before an immediate, in VEX and EVEX forms).
    #[test]
    fn a_moved_copy_reaches_the_same_bytes() {
        let site = 0x7f00_1000_0000u64;
        let cases: [&[u8]; 7] = [
            &[0x48, 0x8b, 0x05, 0x10, 0x20, 0x30, 0x00], // mov rax, [rip+...]
            &[0x83, 0x3d, 0xf0, 0xff, 0xff, 0xff, 0x05], // cmp dword [rip-16], 5
            &[0x48, 0x8d, 0x3d, 0x00, 0x00, 0x00, 0x80], // lea rdi, [rip-2 GiB]
            &[0xc5, 0xfe, 0x6f, 0x05, 0x44, 0x33, 0x22, 0x11], // vmovdqu ymm0, [rip+...]
            &[0x62, 0xf1, 0xfe, 0x48, 0x6f, 0x05, 0x40, 0, 0, 0], // vmovdqu32 zmm0, [rip+64]
            &[0xff, 0x25, 0x08, 0x00, 0x00, 0x00],       // jmp [rip+8]
            &[0x48, 0x89, 0xe5],                         // mov rbp, rsp: as it is
        ];
        for bytes in cases {
            let d = dec_at(bytes, site).unwrap();
            for at in [site + 0x1000, site - 0x4000_0000, site + 0x7000_0000] {
                let Ok((moved, n)) = d.moved_to(at) else {
                    // Only a target out of rel32 reach from `at` is refused.
                    let target = d.rip_target;
                    assert!(target.abs_diff(at) > 0x7fff_0000, "{bytes:x?} at {at:#x}");
                    continue;
                };
                assert_eq!(n, d.len);
                let copy = decode(&moved[..n], at).unwrap();
                assert_eq!(copy.insn().code(), d.insn().code(), "{bytes:x?}");
                if d.rip_disp_at.is_some() {
                    assert_eq!(
                        copy.insn().ip_rel_memory_address(),
                        d.insn().ip_rel_memory_address()
                    );
                    assert_eq!(copy.rip_target, d.rip_target);
                } else {
                    assert_eq!(moved[..n], bytes[..n]);
                }
                assert_eq!(copy.insn().immediate8(), d.insn().immediate8());
            }
        }
    }

    /// Every instruction `decode_common` accepts decodes as iced decodes it, field for field:
    /// each REX byte (or none) before each opcode, with each ModRM byte, and random bytes after;
    /// and random byte strings. Common prologue instructions are among those it accepts.
    #[test]
    fn common_forms_decode_as_iced_does() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let ip = 0x7f12_3456_7000u64;
        let mut accepted = 0;
        let mut check = |b: &[u8; 16]| {
            if let Some(fast) = decode_common(b, ip) {
                let slow = decode_with_iced(b, ip)
                    .unwrap_or_else(|e| panic!("{b:02x?}: accepted by hand, refused by iced: {e}"));
                assert_eq!(fast, slow, "{b:02x?} ({})", slow.text());
                accepted += 1;
            }
        };
        for rex in (0x40..=0x4f).map(Some).chain([None]) {
            for op in 0..=255u8 {
                for m in 0..=255u8 {
                    let mut b = [0u8; 16];
                    for x in b.chunks_mut(8) {
                        x.copy_from_slice(&random().to_le_bytes());
                    }
                    let mut i = 0;
                    if let Some(r) = rex {
                        b[0] = r;
                        i = 1;
                    }
                    (b[i], b[i + 1]) = (op, m);
                    check(&b);
                }
            }
        }
        for _ in 0..200_000 {
            let mut b = [0u8; 16];
            for x in b.chunks_mut(8) {
                x.copy_from_slice(&random().to_le_bytes());
            }
            check(&b);
        }
        assert!(accepted > 50_000, "only {accepted} accepted");
        // What malloc, free, read, the loader's _dl_debug_state and most entries begin with.
        for common in [
            &[0x41, 0x54][..],                           // push r12
            &[0x55],                                     // push rbp
            &[0xc3],                                     // ret
            &[0xf3, 0x0f, 0x1e, 0xfa],                   // endbr64
            &[0x48, 0x85, 0xff],                         // test rdi, rdi
            &[0x48, 0x89, 0xe5],                         // mov rbp, rsp
            &[0x48, 0x81, 0xec, 0xd8, 0, 0, 0],          // sub rsp, 0xd8
            &[0x80, 0x3d, 0x91, 0x32, 0x0e, 0x00, 0x00], // cmp byte [rip+...], 0
            &[0x48, 0x8b, 0x05, 0xd1, 0x3c, 0x13, 0x00], // mov rax, [rip+...]
            &[0x48, 0x8d, 0x15, 0x82, 0xab, 0x00, 0x00], // lea rdx, [rip+...]
            &[0xb8, 0x01, 0, 0, 0],                      // mov eax, 1
        ] {
            let mut b = [0x90u8; 16];
            b[..common.len()].copy_from_slice(common);
            let d = decode_common(&b, ip).unwrap_or_else(|| panic!("{common:02x?} not by hand"));
            assert_eq!(d.len, common.len());
        }
    }
}
