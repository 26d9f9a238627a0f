//! The only code that writes the program's text.
//!
//! Writes go through `/proc/self/mem`, as debuggers do: the kernel breaks copy-on-write for the
//! page and writes the bytes, without ever making the page writable and without splitting the
//! mapping (after `add libc.so.6:*` and `remove`, libc's text is one mapping again, as the program
//! had it). Where `/proc/self/mem` cannot be written (a kernel built with `PROC_MEM_NO_FORCE`, no
//! /proc), the page is made writable with `mprotect` for the write only, keeping `PROT_EXEC`.
//! Reads of text go through `process_vm_readv`: a page another thread unmapped meanwhile is an
//! error, never a fault.

use crate::objects::maps;
use crate::runtime::fs::Fd;
use crate::sigsafe::sys::{self, Errno};

/// The int3 instruction.
pub const INT3: u8 = 0xcc;

/// A batch of text writes.
pub struct TextWriter {
    mem: Option<Fd>,
    /// Protections of pages, for the mprotect fallback (read from /proc/self/maps on first need).
    maps: Option<Vec<maps::MapEntry>>,
}

impl Default for TextWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TextWriter {
    pub fn new() -> TextWriter {
        let mem = Fd::open("/proc/self/mem", libc::O_RDWR).ok();
        TextWriter { mem, maps: None }
    }

    /// Write `bytes` at `addr` of the program's text.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        if let Some(fd) = &self.mem {
            match sys::pwrite(fd.0, bytes, addr) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(_) | Err(Errno(libc::EIO | libc::EPERM | libc::EACCES)) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_mprotect(addr, bytes)
    }

    fn write_mprotect(&mut self, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        if self.maps.is_none() {
            self.maps = Some(maps::read_maps()?);
        }
        let maps = self.maps.as_deref().unwrap_or_default();
        let prot = maps::find(maps, addr).ok_or(Errno(libc::EFAULT))?.prot;
        let page = sys::PAGE as u64;
        let lo = addr & !(page - 1);
        let hi = (addr + bytes.len() as u64 + page - 1) & !(page - 1);
        // SAFETY: the pages belong to a private executable mapping of a probed object; only their
        // protection changes, by adding PROT_WRITE (keeping PROT_EXEC, since other threads may be
        // running there), which is removed again right after the write.
        unsafe {
            sys::mprotect(lo as usize, (hi - lo) as usize, prot | libc::PROT_WRITE)?;
            for (i, b) in bytes.iter().enumerate() {
                core::ptr::write_volatile((addr + i as u64) as *mut u8, *b);
            }
            sys::mprotect(lo as usize, (hi - lo) as usize, prot)
        }
    }
}

/// Read `buf.len()` bytes of the program's text at `addr`; an error if any is not mapped.
pub fn read(addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    match sys::read_memory_safely(sys::getpid(), addr, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(Errno(libc::EFAULT)),
    }
}

/// The byte at `addr`, if mapped.
pub fn read_byte(addr: u64) -> Option<u8> {
    let mut b = [0u8];
    read(addr, &mut b).ok().map(|_| b[0])
}
