//! How a thread that hit a site goes on: the plan the decoder (`xol`) makes at registration and the
//! trap handler applies. Plain `Copy` data, so that a published table can hold it.

/// Register numbers as indices into `ucontext_t.uc_mcontext.gregs`.
pub type Greg = u8;

/// No register in an [`IndirectOperand`].
pub const NO_REG: Greg = 0xff;

/// Where an indirect call or jump takes its target from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndirectOperand {
    Reg(Greg),
    /// `[base + index * scale + disp]`, 8 bytes. A RIP-relative operand has `base == NO_REG` and
    /// its absolute address in `disp`.
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
