//! Execute-out-of-line: what happens to the instructions a probe displaces.
//!
//! At registration (never on a hit) the instruction is decoded once ([`decode`]) and given a
//! `sigsafe::plan::Resume`:
//! - ordinary instructions are copied into an XOL slot ([`slot`]), re-encoded for the slot's
//!   address, and followed by a jump back;
//! - control flow (call/jmp rel, jcc, loop/loopcc, jrcxz, ret, ret imm16, call/jmp through a
//!   register or memory) is described by an `Emu` that the trap handler applies to the saved
//!   context, because running it elsewhere would push or compare the wrong address;
//! - anything else that depends on where it runs (int3/int n, far transfers, xbegin, ud2, 16-bit
//!   branches, 32-bit addressing of branch targets) is refused with a message that names it.
//!
//! Slots live in [`area`]s mapped within ±1 GiB of the object.

pub mod area;
pub mod cfi;
pub mod decode;
pub mod jump;
pub mod reloc;
pub mod slot;

pub use decode::{decode, Decoded, XolError};
