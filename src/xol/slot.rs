//! XOL slots: the displaced instruction copied out of line, its RIP-relative displacement (if any)
//! changed for its new address (so that the operand still reaches its target), followed by a
//! `jmp rel32` back to the next instruction: one trap per hit, no single-step. Slots are written
//! once and never reused for another instruction: a thread preempted inside a slot always finds
//! the bytes it started.

use super::area::Areas;
use super::decode::{Decoded, XolError};
use crate::objects::MapEntry;
use crate::sigsafe::table::SlotMap;

/// The longest slot: a 15-byte instruction, a 7-byte `lea rcx` fix-up (after `syscall`), a 5-byte
/// `jmp rel32`, padded.
pub const SLOT_SIZE: usize = 32;

/// The bytes of the slot at `slot` for instruction `d`, which sits at `site`: its relocation
/// (the instruction moved, `syscall`'s rcx fix-up, the jump back).
pub fn slot_code(d: &Decoded, site: u64, slot: u64) -> Result<Vec<u8>, XolError> {
    slot_relocated(d, site, slot).map(|r| r.code)
}

fn slot_relocated(d: &Decoded, site: u64, slot: u64) -> Result<super::reloc::Relocated, XolError> {
    debug_assert!(d.emu.is_none());
    let r = super::reloc::relocate(d, site, slot)?;
    if r.code.len() > SLOT_SIZE {
        return Err(XolError::Relocate { insn: d.text(), why: "slot too small".into() });
    }
    Ok(r)
}

/// Every XOL slot written so far, by (site address, original bytes): a site that is removed and
/// registered again gets its old slot back, so add/remove cycles do not consume slots.
#[derive(Default)]
pub struct Slots {
    written: crate::runtime::hash::FastMap<(u64, [u8; 16]), SlotMap>,
}

impl Slots {
    /// The slot for instruction `d` at `site` (whose first 16 bytes are `bytes`): an old one, or
    /// a new one written now.
    pub fn get_or_write(
        &mut self,
        areas: &mut Areas,
        d: &Decoded,
        site: u64,
        bytes: [u8; 16],
        maps: &[MapEntry],
    ) -> Result<SlotMap, XolError> {
        if let Some(m) = self.written.get(&(site, bytes)) {
            return Ok(*m);
        }
        let slot = areas.alloc_near(site, SLOT_SIZE as u64, 16, maps)?;
        let r = slot_relocated(d, site, slot)?;
        let note = super::cfi::Note {
            lo: slot,
            hi: slot + r.code.len() as u64,
            site,
            site_len: d.len as u8,
            rows: &r.rows,
            what: super::cfi::What::Slot,
        };
        areas.cfi.note(note, maps);
        let code = r.code;
        let len = d.len;
        let mut padded = code.clone();
        padded.resize(SLOT_SIZE, 0xcc); // the whole slot: consecutive slots are written at once
        areas.stage(slot, &padded);
        let m = SlotMap {
            start: slot,
            len: len as u32,
            site,
            site_len: d.len as u32,
            tail: (code.len() - len) as u32,
            syscall: d.syscall,
        };
        self.written.insert((site, bytes), m);
        Ok(m)
    }

    /// Forget the slots of sites in `[lo, hi)` (their mapping is gone; a new mapping there is new
    /// code). The slots themselves stay mapped: a thread may still be leaving one.
    pub fn forget_range(&mut self, keep: impl Fn(u64) -> bool) {
        self.written.retain(|&(addr, _), _| keep(addr));
    }

    /// Every slot, sorted by address (for the table's fault translation).
    pub fn maps(&self) -> Vec<SlotMap> {
        let mut v: Vec<SlotMap> = self.written.values().copied().collect();
        v.sort_by_key(|m| m.start);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xol::decode::decode;

    fn dec(bytes: &[u8]) -> Result<Decoded, XolError> {
        let mut b = bytes.to_vec();
        b.resize(16, 0x90);
        decode(&b, 0x1000)
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
