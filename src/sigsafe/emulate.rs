//! Control-flow instructions applied to a saved context: what `call`, `jmp`, `jcc`, `loop`,
//! `jrcxz` and `ret` would have done at their original address.
//!
//! Memory the instruction reads (an indirect target, a return address) is read without risking a
//! fault here: if it is not readable, [`emulate`] says so, and the caller delivers the fault the
//! instruction would have raised, at the instruction's own address.

use super::plan::{Cond, Emu, IndirectOperand, LoopKind, NO_REG};
use super::sys;

pub type Gregs = [i64; 23];

const EFL_CF: u64 = 1 << 0;
const EFL_PF: u64 = 1 << 2;
const EFL_ZF: u64 = 1 << 6;
const EFL_SF: u64 = 1 << 7;
const EFL_OF: u64 = 1 << 11;

pub const RIP: usize = libc::REG_RIP as usize;
pub const RSP: usize = libc::REG_RSP as usize;
pub const RBP: usize = libc::REG_RBP as usize;
pub const RAX: usize = libc::REG_RAX as usize;
pub const RCX: usize = libc::REG_RCX as usize;
pub const EFL: usize = libc::REG_EFL as usize;

/// A general register of the context.
#[inline(always)]
pub fn get(g: &Gregs, i: usize) -> u64 {
    g.get(i).copied().unwrap_or(0) as u64
}

/// Set a general register of the context.
#[inline(always)]
pub fn set(g: &mut Gregs, i: usize, v: u64) {
    if let Some(r) = g.get_mut(i) {
        *r = v as i64;
    }
}

/// The six SysV integer argument registers.
pub fn args(g: &Gregs) -> [u64; 6] {
    [
        get(g, libc::REG_RDI as usize),
        get(g, libc::REG_RSI as usize),
        get(g, libc::REG_RDX as usize),
        get(g, libc::REG_RCX as usize),
        get(g, libc::REG_R8 as usize),
        get(g, libc::REG_R9 as usize),
    ]
}

#[inline(always)]
fn cond_holds(cond: Cond, fl: u64) -> bool {
    let f = |bit| fl & bit != 0;
    match cond {
        Cond::O => f(EFL_OF),
        Cond::No => !f(EFL_OF),
        Cond::B => f(EFL_CF),
        Cond::Ae => !f(EFL_CF),
        Cond::E => f(EFL_ZF),
        Cond::Ne => !f(EFL_ZF),
        Cond::Be => f(EFL_CF) || f(EFL_ZF),
        Cond::A => !f(EFL_CF) && !f(EFL_ZF),
        Cond::S => f(EFL_SF),
        Cond::Ns => !f(EFL_SF),
        Cond::P => f(EFL_PF),
        Cond::Np => !f(EFL_PF),
        Cond::L => f(EFL_SF) != f(EFL_OF),
        Cond::Ge => f(EFL_SF) == f(EFL_OF),
        Cond::Le => f(EFL_ZF) || f(EFL_SF) != f(EFL_OF),
        Cond::G => !f(EFL_ZF) && f(EFL_SF) == f(EFL_OF),
    }
}

#[inline(always)]
fn reg(g: &Gregs, r: u8) -> u64 {
    if r == NO_REG {
        0
    } else {
        get(g, r as usize)
    }
}

/// An address the instruction would have read, and could not.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub addr: u64,
}

#[inline(always)]
fn read(addr: u64) -> Result<u64, Fault> {
    sys::read_u64_safely(addr).ok_or(Fault { addr })
}

#[inline(always)]
fn indirect_target(op: IndirectOperand, g: &Gregs) -> Result<u64, Fault> {
    match op {
        IndirectOperand::Reg(r) => Ok(reg(g, r)),
        IndirectOperand::Mem { base, index, scale, disp } => {
            let addr = reg(g, base)
                .wrapping_add(reg(g, index).wrapping_mul(scale as u64))
                .wrapping_add(disp);
            read(addr)
        }
    }
}

/// Push a return address the way `call` does. The kernel put the signal frame below the red zone,
/// so the 8 bytes below the interrupted rsp are mapped and free.
#[inline(always)]
pub fn push(g: &mut Gregs, value: u64) {
    let sp = get(g, RSP).wrapping_sub(8);
    // SAFETY: the displaced call would write the same 8 bytes of the program's stack, which lie
    // above the signal frame the kernel just wrote.
    unsafe { core::ptr::write_volatile(sp as *mut u64, value) };
    set(g, RSP, sp);
}

/// Apply a control-flow instruction to the saved context. On `Err`, the context is unchanged.
#[inline(always)]
pub fn emulate(emu: Emu, g: &mut Gregs) -> Result<(), Fault> {
    let flags = get(g, EFL);
    let new_rip = match emu {
        Emu::Jmp { target } => target,
        Emu::Call { target, next } => {
            push(g, next);
            target
        }
        Emu::Jcc { cond, target, next } => {
            if cond_holds(cond, flags) {
                target
            } else {
                next
            }
        }
        Emu::Loop { kind, target, next } => {
            let count = get(g, RCX).wrapping_sub(1);
            set(g, RCX, count);
            let zf = flags & EFL_ZF != 0;
            let again = count != 0
                && match kind {
                    LoopKind::Loop => true,
                    LoopKind::Loope => zf,
                    LoopKind::Loopne => !zf,
                };
            if again {
                target
            } else {
                next
            }
        }
        Emu::Jrcxz { addr32, target, next } => {
            let rcx = get(g, RCX);
            let count = if addr32 { rcx as u32 as u64 } else { rcx };
            if count == 0 {
                target
            } else {
                next
            }
        }
        Emu::Ret { pop } => {
            let sp = get(g, RSP);
            let to = read(sp)?;
            set(g, RSP, sp.wrapping_add(8).wrapping_add(pop as u64));
            to
        }
        Emu::CallIndirect { op, next } => {
            // Operands are read before the push, as the CPU does.
            let target = indirect_target(op, g)?;
            push(g, next);
            target
        }
        Emu::JmpIndirect { op } => indirect_target(op, g)?,
    };
    set(g, RIP, new_rip);
    Ok(())
}
