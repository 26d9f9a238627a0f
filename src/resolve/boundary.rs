//! Is an offset an instruction boundary? Decided from the file's bytes (never from memory, where
//! other probes' bytes would mislead the decoder), by decoding forward from a point known to be a
//! boundary: the function's start, or, for code outside every symbol (a PLT entry, static code
//! without a symbol), the start of its section or the nearest symbol before it, as `objdump -d`
//! does. What cannot be proven is refused.

use iced_x86::{Decoder, DecoderOptions};

use crate::error::ProbeError;
use crate::objects::ElfFile;

/// Is `offset` into the function at file offset `start` (of `size` bytes, 0 if unknown) an
/// instruction boundary?
pub fn check(
    elf: &ElfFile,
    start: u64,
    size: u64,
    offset: u64,
    name: &str,
) -> Result<(), ProbeError> {
    if offset == 0 {
        return Ok(());
    }
    if size != 0 && offset >= size {
        return Err(ProbeError::PastEnd { symbol: name.to_string(), offset, size });
    }
    let len = if size != 0 { size } else { offset + 16 };
    let code = elf.bytes_at(start, len as usize)?;
    let not = |detail: String| ProbeError::NotBoundary { symbol: name.to_string(), offset, detail };
    match sweep(code, offset) {
        Sweep::Found => Ok(()),
        Sweep::Between(prev, at) => Err(not(format!("the nearest are +{prev:#x} and +{at:#x}"))),
        Sweep::Invalid(at) => Err(not(format!("the bytes at +{at:#x} do not decode"))),
        Sweep::End(prev) => Err(not(format!("the last instruction starts at +{prev:#x}"))),
    }
}

/// Is file virtual address `vaddr`, outside every function symbol, an instruction boundary?
pub fn check_outside_symbols(elf: &ElfFile, vaddr: u64, path: &str) -> Result<(), ProbeError> {
    let unproven =
        |why: String| ProbeError::Unproven { addr: vaddr, object: path.to_string(), why };
    let Some(section) = elf.section_containing(vaddr) else {
        return Err(unproven(
            "it is in no executable section (the file has no section headers?)".into(),
        ));
    };
    // Start at the nearest known boundary before it: the end of the last function before it in
    // the same section (the padding after a function decodes as instructions), else the section.
    let from = elf
        .funcs
        .iter()
        .filter(|f| f.vaddr >= section.vaddr && f.vaddr <= vaddr && f.size > 0)
        .map(|f| f.vaddr)
        .max()
        .unwrap_or(section.vaddr);
    let off = section.offset + (from - section.vaddr);
    let len = (section.vaddr + section.size - from).min(vaddr - from + 16) as usize;
    let code = elf.bytes_at(off, len)?;
    match sweep(code, vaddr - from) {
        Sweep::Found => Ok(()),
        Sweep::Between(prev, at) => Err(unproven(format!(
            "decoding {} from {from:#x} gives instructions at {:#x} and {:#x}, not here",
            section.name,
            from + prev,
            from + at
        ))),
        Sweep::Invalid(at) => Err(unproven(format!(
            "decoding {} from {from:#x} meets bytes that are not an instruction at {:#x}",
            section.name,
            from + at
        ))),
        Sweep::End(_) => Err(unproven(format!("it is past the end of {}", section.name))),
    }
}

enum Sweep {
    Found,
    /// The previous and the next instruction start.
    Between(u64, u64),
    /// Invalid bytes at this offset, before the target.
    Invalid(u64),
    /// The code ended; the last instruction started here.
    End(u64),
}

/// Decode `code` from its start until `target`.
fn sweep(code: &[u8], target: u64) -> Sweep {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut prev = 0u64;
    while decoder.can_decode() {
        let at = decoder.ip();
        if at == target {
            return Sweep::Found;
        }
        if at > target {
            return Sweep::Between(prev, at);
        }
        prev = at;
        if decoder.decode().is_invalid() {
            return Sweep::Invalid(at);
        }
    }
    if decoder.ip() == target && target < code.len() as u64 {
        return Sweep::Found;
    }
    Sweep::End(prev)
}
