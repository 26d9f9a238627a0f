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
pub struct Decoded {
    pub insn: Instruction,
    pub len: usize,
    /// What to do with it; `None` means "copy to a slot".
    pub emu: Option<Emu>,
    /// The instruction's bytes (`len` of them).
    pub bytes: [u8; 15],
    /// Where its RIP-relative disp32 is, in `bytes`, if it has one.
    pub rip_disp_at: Option<u8>,
}

impl Decoded {
    /// The instruction in Intel syntax, for messages.
    pub fn text(&self) -> String {
        format_insn(&self.insn)
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
            let target = self.insn.ip_rel_memory_address();
            let disp = if self.insn.memory_base() == Register::EIP {
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
pub fn decode(bytes: &[u8], ip: u64) -> Result<Decoded, XolError> {
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
    Ok(Decoded { insn, len, emu, bytes: raw, rip_disp_at })
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
                    let target = d.insn.ip_rel_memory_address();
                    assert!(target.abs_diff(at) > 0x7fff_0000, "{bytes:x?} at {at:#x}");
                    continue;
                };
                assert_eq!(n, d.len);
                let copy = decode(&moved[..n], at).unwrap();
                assert_eq!(copy.insn.code(), d.insn.code(), "{bytes:x?}");
                if d.rip_disp_at.is_some() {
                    assert_eq!(copy.insn.ip_rel_memory_address(), d.insn.ip_rel_memory_address());
                } else {
                    assert_eq!(moved[..n], bytes[..n]);
                }
                assert_eq!(copy.insn.immediate8(), d.insn.immediate8());
            }
        }
    }
}
