//! Relocation: an instruction rewritten as code that does exactly what it did at its own address,
//! but runs elsewhere (a jump body), and then goes on where the instruction would have gone.
//!
//! The trap path emulates control flow in its handler (`sigsafe::emulate`); a jump body has no
//! handler around it, so here control flow becomes equivalent code:
//!
//! | instruction | relocated as |
//! | --- | --- |
//! | anything that does not branch | copied, a RIP-relative displacement changed to reach the same bytes, then `jmp` back |
//! | `syscall` | itself, `lea rcx, [rip + …]` (the address the kernel would have left there), `jmp` back |
//! | `jmp rel` | `jmp rel32` to the same target |
//! | `jcc rel` | `jcc rel32` to the target, `jmp rel32` to the next instruction |
//! | `loop*`, `jrcxz` | itself with a short displacement over a `jmp` to the next instruction, then a `jmp` to the target |
//! | `call rel32` | the return address (the original next instruction) written below rsp, `lea rsp, [rsp - 8]`, `jmp` to the target |
//! | `call reg` | the same, then `jmp reg` |
//! | `call [mem]` | `push [mem]` (reads the target first, as `call` does), a copy of it one slot lower, the return address written over the first, `jmp [rsp - 8]` |
//! | `jmp reg`, `jmp [mem]`, `ret`, `ret imm16` | copied as they are (a RIP-relative `jmp [mem]` as above) |
//!
//! Every rewrite writes the stack only below rsp, at most 16 bytes: the kernel never puts a signal
//! frame in the 128 bytes below rsp, and the bytes the original instruction would write hold the
//! same value at the end. An operand read that faults, faults at the first instruction of the
//! copy, before anything changed: the fault is shown to the program at the original instruction.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

use super::decode::{Decoded, XolError};
use crate::sigsafe::plan::{Cond, Emu, IndirectOperand, LoopKind};
use crate::sigsafe::unwind::CodeKind;

/// A relocated instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocated {
    pub code: Vec<u8>,
    /// Bytes of `code` that stand for the instruction itself (a fault there is the instruction's);
    /// the rest is the way back.
    pub insn_len: usize,
    /// The copy is a `syscall` followed by the `rcx` fix-up.
    pub syscall: bool,
    /// The frame rules along `code`, from each offset on (see `xol::cfi`).
    pub rows: Vec<(u32, CodeKind)>,
}

/// The longest relocated instruction: a 15-byte instruction, a 7-byte `lea rcx` fix-up, a 5-byte
/// `jmp` back; or an indirect call's 34 bytes.
pub const MAX_RELOCATED: usize = 40;

/// Relocate `d`, which sits at `site`, to run at `at`.
pub fn relocate(d: &Decoded, site: u64, at: u64) -> Result<Relocated, XolError> {
    let next = site.wrapping_add(d.len as u64);
    let mut c = Code64 { buf: Vec::with_capacity(MAX_RELOCATED), at, d };
    let mut syscall = false;
    // The site's rules until the instruction is done; then those after it, for the way back,
    // unless it was a call (its callee's first instruction's, while it jumps there).
    let mut rows = vec![(0, CodeKind::Site(0))];
    let insn_len = match d.emu {
        None => {
            c.copy()?;
            let n = c.buf.len();
            if d.syscall {
                syscall = true;
                c.raw(&[0x48, 0x8d, 0x0d]); // lea rcx, [rip + disp32]
                c.rel32_to(next, 4)?;
            }
            c.jmp(next)?;
            n
        }
        Some(Emu::Jmp { target }) => {
            c.jmp(target)?;
            c.buf.len()
        }
        Some(Emu::Jcc { cond, target, .. }) => {
            c.raw(&[0x0f, 0x80 | cc(cond)]);
            c.rel32_to(target, 4)?;
            let n = c.buf.len();
            c.jmp(next)?;
            n
        }
        Some(Emu::Loop { kind, target, .. }) => {
            c.raw(&[loop_opcode(kind), 5]);
            let n = c.buf.len();
            c.jmp(next)?;
            c.jmp(target)?;
            n
        }
        Some(Emu::Jrcxz { addr32, target, .. }) => {
            if addr32 {
                c.raw(&[0x67]);
            }
            c.raw(&[0xe3, 5]);
            let n = c.buf.len();
            c.jmp(next)?;
            c.jmp(target)?;
            n
        }
        Some(Emu::Call { target, .. }) => {
            c.push_return_address(next);
            let n = c.buf.len();
            rows.push((n as u32, CodeKind::Entry));
            c.jmp(target)?;
            n
        }
        Some(Emu::CallIndirect { op: IndirectOperand::Reg(r), .. }) => {
            if r as i32 == libc::REG_RSP {
                return Err(c.refuse("`call rsp` moves its own target"));
            }
            c.push_return_address(next);
            let n = c.buf.len();
            rows.push((n as u32, CodeKind::Entry));
            // jmp reg: the original instruction's operand, re-encoded as a jump.
            let reg = d.insn().op0_register();
            c.encode(&Instruction::with1(Code::Jmp_rm64, reg).map_err(|e| c.cannot(e))?)?;
            n
        }
        Some(Emu::CallIndirect { op: IndirectOperand::Mem { .. }, .. }) => {
            // push [mem]: the target, read first (a bad pointer faults here, before any change).
            let push = Instruction::with1(Code::Push_rm64, memory_operand(&d.insn()))
                .map_err(|e| c.cannot(e))?;
            c.encode(&push)?;
            let n = c.buf.len();
            rows.push((n as u32, CodeKind::Site(8)));
            c.raw(&[0xff, 0x34, 0x24]); // push qword ptr [rsp]: the target, one slot lower
            rows.push((c.buf.len() as u32, CodeKind::Site(16)));
            c.raw(&[0x48, 0x8d, 0x64, 0x24, 0x08]); // lea rsp, [rsp + 8]
            rows.push((c.buf.len() as u32, CodeKind::Site(8)));
            c.mov_dwords_at_rsp(next, 0);
            rows.push((c.buf.len() as u32, CodeKind::Entry));
            c.raw(&[0xff, 0x64, 0x24, 0xf8]); // jmp qword ptr [rsp - 8]
            n
        }
        Some(Emu::JmpIndirect { .. }) | Some(Emu::Ret { .. }) => {
            c.copy()?;
            c.buf.len()
        }
    };
    if c.buf.len() > MAX_RELOCATED {
        return Err(c.refuse("its relocated form is too long"));
    }
    let falls_through = match d.emu {
        None | Some(Emu::Jcc { .. } | Emu::Loop { .. } | Emu::Jrcxz { .. }) => true,
        Some(_) => false,
    };
    if falls_through && insn_len < c.buf.len() {
        // The way back: the site's rules with what the instruction pushed (popped), when that
        // is known from the instruction; else its function's rules after it.
        let kind = match d.emu {
            None => d.pushed.map_or(CodeKind::Next, CodeKind::Site),
            _ => CodeKind::Site(0),
        };
        if kind != CodeKind::Site(0) {
            rows.push((insn_len as u32, kind));
        }
    }
    Ok(Relocated { code: c.buf, insn_len, syscall, rows })
}

/// The memory operand of `insn`, as iced builds one for another instruction (RIP-relative
/// operands keep their absolute target, which the encoder turns into a new displacement).
fn memory_operand(insn: &Instruction) -> MemoryOperand {
    let base = insn.memory_base();
    let displ = if base == Register::RIP {
        insn.ip_rel_memory_address() as i64
    } else {
        insn.memory_displacement64() as i64
    };
    MemoryOperand::new(
        base,
        insn.memory_index(),
        insn.memory_index_scale(),
        displ,
        if base == Register::RIP { 8 } else { insn.memory_displ_size().max(1) },
        false,
        insn.segment_prefix(),
    )
}

struct Code64<'a> {
    buf: Vec<u8>,
    at: u64,
    d: &'a Decoded,
}

impl Code64<'_> {
    fn here(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn refuse(&self, why: &'static str) -> XolError {
        XolError::Refused { insn: self.d.text(), why }
    }

    fn cannot(&self, e: impl std::fmt::Display) -> XolError {
        XolError::Relocate { insn: self.d.text(), why: e.to_string() }
    }

    /// The instruction itself, moved here (see [`Decoded::moved_to`]).
    fn copy(&mut self) -> Result<(), XolError> {
        let (bytes, n) = self.d.moved_to(self.here())?;
        self.raw(&bytes[..n]);
        Ok(())
    }

    fn encode(&mut self, insn: &Instruction) -> Result<(), XolError> {
        let mut enc = Encoder::new(64);
        let ip = self.here();
        enc.encode(insn, ip).map_err(|e| self.cannot(e))?;
        self.buf.extend_from_slice(&enc.take_buffer());
        Ok(())
    }

    /// A rel32 field (this many bytes, the last of the instruction) that reaches `to`.
    fn rel32_to(&mut self, to: u64, field_len: u64) -> Result<(), XolError> {
        let end = self.here() + field_len;
        let rel = i32::try_from(to.wrapping_sub(end) as i64)
            .map_err(|_| self.cannot("its target is out of rel32 reach"))?;
        self.raw(&rel.to_le_bytes());
        Ok(())
    }

    fn jmp(&mut self, to: u64) -> Result<(), XolError> {
        self.raw(&[0xe9]);
        self.rel32_to(to, 4)
    }

    /// `mov dword ptr [rsp + disp], lo32(value)` and `[rsp + disp + 4]`, hi32.
    fn mov_dwords_at_rsp(&mut self, value: u64, disp: i8) {
        for (i, half) in [value as u32, (value >> 32) as u32].into_iter().enumerate() {
            self.raw(&[0xc7, 0x44, 0x24, (disp as u8).wrapping_add(4 * i as u8)]);
            self.raw(&half.to_le_bytes());
        }
    }

    /// What `call` pushes, without changing the flags: the return address written below rsp
    /// (safe there, see the module documentation), then rsp moved over it.
    fn push_return_address(&mut self, ret: u64) {
        self.mov_dwords_at_rsp(ret, -8);
        self.raw(&[0x48, 0x8d, 0x64, 0x24, 0xf8]); // lea rsp, [rsp - 8]
    }
}

fn cc(c: Cond) -> u8 {
    match c {
        Cond::O => 0x0,
        Cond::No => 0x1,
        Cond::B => 0x2,
        Cond::Ae => 0x3,
        Cond::E => 0x4,
        Cond::Ne => 0x5,
        Cond::Be => 0x6,
        Cond::A => 0x7,
        Cond::S => 0x8,
        Cond::Ns => 0x9,
        Cond::P => 0xa,
        Cond::Np => 0xb,
        Cond::L => 0xc,
        Cond::Ge => 0xd,
        Cond::Le => 0xe,
        Cond::G => 0xf,
    }
}

fn loop_opcode(k: LoopKind) -> u8 {
    match k {
        LoopKind::Loopne => 0xe0,
        LoopKind::Loope => 0xe1,
        LoopKind::Loop => 0xe2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xol::decode::decode;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    const SITE: u64 = 0x40_1000;
    const AT: u64 = 0x7000_0000;

    fn relocated(bytes: &[u8]) -> Relocated {
        let mut b = bytes.to_vec();
        b.resize(16, 0x90);
        let d = decode(&b, SITE).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
        relocate(&d, SITE, AT).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
    }

    /// The relocated code as Intel text, one instruction a line, branch targets absolute.
    fn text(r: &Relocated) -> Vec<String> {
        let mut dec = Decoder::with_ip(64, &r.code, AT, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        f.options_mut().set_hex_prefix("0x");
        f.options_mut().set_hex_suffix("");
        f.options_mut().set_rip_relative_addresses(false);
        f.options_mut().set_branch_leading_zeros(false);
        f.options_mut().set_uppercase_hex(false);
        f.options_mut().set_space_after_operand_separator(true);
        let mut out = Vec::new();
        while dec.can_decode() {
            let i = dec.decode();
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn ordinary_and_rip_relative() {
        // mov rax, [rip + 0x100]: reads 0x401107 from anywhere.
        let r = relocated(&[0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(text(&r), ["mov rax, [0x401107]", "jmp 0x401007"]);
        assert_eq!(r.insn_len, 7);
        let r = relocated(&[0x55]);
        assert_eq!(text(&r), ["push rbp", "jmp 0x401001"]);
    }

    #[test]
    fn control_flow() {
        let cases: &[(&[u8], &[&str])] = &[
            (&[0xeb, 0x10], &["jmp 0x401012"]),
            (&[0x74, 0x10], &["je 0x401012", "jmp 0x401002"]),
            (&[0x0f, 0x8c, 0, 1, 0, 0], &["jl 0x401106", "jmp 0x401006"]),
            (
                &[0xe8, 0, 1, 0, 0],
                &[
                    "mov dword ptr [rsp-8], 0x401005",
                    "mov dword ptr [rsp-4], 0",
                    "lea rsp, [rsp-8]",
                    "jmp 0x401105",
                ],
            ),
            (
                &[0xff, 0xd0],
                &[
                    "mov dword ptr [rsp-8], 0x401002",
                    "mov dword ptr [rsp-4], 0",
                    "lea rsp, [rsp-8]",
                    "jmp rax",
                ],
            ),
            (
                &[0xff, 0x54, 0x24, 0x10],
                &[
                    "push qword ptr [rsp+0x10]",
                    "push qword ptr [rsp]",
                    "lea rsp, [rsp+8]",
                    "mov dword ptr [rsp], 0x401004",
                    "mov dword ptr [rsp+4], 0",
                    "jmp qword ptr [rsp-8]",
                ],
            ),
            (
                &[0xff, 0x15, 0x10, 0, 0, 0],
                &[
                    "push qword ptr [0x401016]",
                    "push qword ptr [rsp]",
                    "lea rsp, [rsp+8]",
                    "mov dword ptr [rsp], 0x401006",
                    "mov dword ptr [rsp+4], 0",
                    "jmp qword ptr [rsp-8]",
                ],
            ),
            (&[0xff, 0x25, 0x10, 0, 0, 0], &["jmp qword ptr [0x401016]"]),
            (&[0xe2, 0xfe], &["loop 0x70000007", "jmp 0x401002", "jmp 0x401000"]),
            (&[0xe3, 0x04], &["jrcxz 0x70000007", "jmp 0x401002", "jmp 0x401006"]),
            (&[0xc3], &["ret"]),
            (&[0xc2, 0x08, 0x00], &["ret 8"]),
            (&[0x0f, 0x05], &["syscall", "lea rcx, [0x401002]", "jmp 0x401002"]),
        ];
        for (bytes, want) in cases {
            let r = relocated(bytes);
            assert_eq!(text(&r), *want, "{bytes:02x?}");
        }
    }

    #[test]
    fn refuses_call_rsp() {
        let mut b = vec![0xff, 0xd4];
        b.resize(16, 0x90);
        let d = decode(&b, SITE).unwrap();
        assert!(relocate(&d, SITE, AT).is_err());
    }
}
