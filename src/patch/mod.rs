//! The only code that writes the program's text (and libuprobe's own code areas).
//!
//! Writes go through `/proc/self/mem`, as debuggers do: the kernel breaks copy-on-write for the
//! page and writes the bytes, without ever making the page writable and without splitting the
//! mapping (after `add libc.so.6:*` and `remove`, libc's text is one mapping again, as the program
//! had it). Where `/proc/self/mem` cannot be written (a kernel built with `PROC_MEM_NO_FORCE`, no
//! /proc), the page is made writable with `mprotect` for the write only, keeping `PROT_EXEC`.
//!
//! Many sites are written at once ([`TextWriter::write_many`]): one write per page, covering the
//! page's changes and the bytes between them as they are (the same values, so no thread running
//! there sees anything else). Between the stages of a jump's installation every core is serialized
//! ([`Barrier`]): a CPU that fetched old bytes of a site must not run them with new ones.

use std::sync::atomic::{AtomicU8, Ordering};

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

const PAGE: u64 = sys::PAGE as u64;

impl TextWriter {
    pub fn new() -> TextWriter {
        let mem = Fd::open("/proc/self/mem", libc::O_RDWR).ok();
        TextWriter { mem, maps: None }
    }

    /// Write `bytes` at `addr` of the program's text.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        let Some(fd) = self.mem.as_ref().filter(|_| mem_writes_work()) else {
            return self.write_mprotect(addr, bytes);
        };
        // A write the kernel could not do at once (the file's page busy in another thread's
        // mmap or read) fails with EIO: try again a few times. EIO that stays means the memory
        // is not there (unmapped, or PROT_NONE while the loader maps an object).
        let mut last = Errno(libc::EIO);
        for _ in 0..4 {
            match sys::pwrite(fd.0, bytes, addr) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(_) => last = Errno(libc::EIO),
                Err(e) if e.0 == libc::EIO || e.0 == libc::EINTR => last = e,
                Err(e) => return Err(e),
            }
            sys::sched_yield();
        }
        Err(last)
    }

    /// Write every `(address, bytes)` (none crossing a page), one write per page where the bytes
    /// between them can be read. The result of each, in order.
    pub fn write_many(&mut self, writes: &[(u64, &[u8])]) -> Vec<Result<(), Errno>> {
        let mut results: Vec<Result<(), Errno>> = vec![Ok(()); writes.len()];
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].0);
        let mut i = 0;
        while i < order.len() {
            let page = writes[order[i]].0 & !(PAGE - 1);
            let mut j = i;
            while j < order.len() && writes[order[j]].0 & !(PAGE - 1) == page {
                j += 1;
            }
            let group = &order[i..j];
            let lo = writes[group[0]].0;
            let hi = group.iter().map(|&k| writes[k].0 + writes[k].1.len() as u64).max();
            let hi = hi.unwrap_or(lo).min(page + PAGE);
            let mut buf = vec![0u8; (hi - lo) as usize];
            let whole = group.len() > 1 && read(lo, &mut buf).is_ok();
            let written = whole && {
                for &k in group {
                    let (a, b) = writes[k];
                    let off = (a - lo) as usize;
                    let n = b.len().min(buf.len() - off);
                    buf[off..off + n].copy_from_slice(&b[..n]);
                }
                self.write(lo, &buf).is_ok()
            };
            if !written {
                for &k in group {
                    results[k] = self.write(writes[k].0, writes[k].1);
                }
            }
            i = j;
        }
        results
    }

    fn write_mprotect(&mut self, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        if self.maps.is_none() {
            self.maps = Some(maps::read_maps()?);
        }
        let maps = self.maps.as_deref().unwrap_or_default();
        let prot = maps::find(maps, addr).ok_or(Errno(libc::EFAULT))?.prot;
        let lo = addr & !(PAGE - 1);
        let hi = (addr + bytes.len() as u64 + PAGE - 1) & !(PAGE - 1);
        // SAFETY: the pages belong to a private executable mapping of a probed object (or to
        // libuprobe's code areas); only their protection changes, by adding PROT_WRITE (keeping
        // PROT_EXEC, since other threads may be running there), removed again right after.
        unsafe {
            sys::mprotect(lo as usize, (hi - lo) as usize, prot | libc::PROT_WRITE)?;
            for (i, b) in bytes.iter().enumerate() {
                core::ptr::write_volatile((addr + i as u64) as *mut u8, *b);
            }
            sys::mprotect(lo as usize, (hi - lo) as usize, prot)
        }
    }
}

/// Can this process write its own read-only memory through `/proc/self/mem`? Tried once, on a
/// page of its own: a kernel built with `PROC_MEM_NO_FORCE` (or a sandbox) says no, and then text
/// is written by making its page writable for the write instead. When it can, that fallback is
/// never used: a failed write then means the memory is gone, and forcing it writable would race
/// with whoever is remapping it (the loader).
fn mem_writes_work() -> bool {
    static WORKS: AtomicU8 = AtomicU8::new(0);
    match WORKS.load(Ordering::Acquire) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let works = (|| {
        let page = sys::mmap_anon(0, sys::PAGE, libc::PROT_READ, 0).ok()?;
        let fd = Fd::open("/proc/self/mem", libc::O_RDWR).ok();
        let ok = fd.is_some_and(|fd| sys::pwrite(fd.0, &[1], page as u64) == Ok(1));
        // SAFETY: our own page, used by nothing else.
        unsafe { sys::munmap(page, sys::PAGE) };
        Some(ok)
    })()
    .unwrap_or(false);
    WORKS.store(if works { 1 } else { 2 }, Ordering::Release);
    works
}

/// Read `buf.len()` bytes of the program's text at `addr`; an error if any is not mapped.
pub fn read(addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    if sys::FAULT_RECOVERY.load(Ordering::Relaxed) {
        return if sys::read_bytes_safely(addr, buf) { Ok(()) } else { Err(Errno(libc::EFAULT)) };
    }
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

/// Serializing every core that runs this process's threads, between the stages of writing a jump
/// over live code: `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` for the other threads'
/// CPUs, and an `iretq` for this one.
pub struct Barrier;

/// 0: not tried yet; 1: registered; 2: unavailable.
static MEMBARRIER: AtomicU8 = AtomicU8::new(0);

impl Barrier {
    /// Can every core be serialized? Registers with the kernel on first use. Without this, no
    /// jump is ever written (every site stays a trap).
    pub fn available() -> bool {
        match MEMBARRIER.load(Ordering::Acquire) {
            1 => true,
            2 => false,
            _ => {
                let ok = sys::membarrier(sys::MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE)
                    .is_ok();
                MEMBARRIER.store(if ok { 1 } else { 2 }, Ordering::Release);
                ok
            }
        }
    }

    /// Serialize every core running a thread of this process. False if the kernel refused.
    pub fn sync() -> bool {
        let cmd = sys::MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE;
        let mut ok = sys::membarrier(cmd).is_ok();
        if !ok {
            // A forked child may have to register again.
            ok = sys::membarrier(sys::MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).is_ok()
                && sys::membarrier(cmd).is_ok();
        }
        sys::serialize_self();
        ok
    }
}
