//! What libuprobe reads of an ELF file: its function symbols, segments and executable sections,
//! and its code bytes, from the very file that is mapped (checked by device and inode: a file
//! replaced on disk since it was mapped is read through `/proc/self/map_files`, or refused).
//! Instructions are always decoded from these bytes, never from memory another probe may have
//! patched.

use std::collections::BTreeMap;

use goblin::elf::{program_header::PT_LOAD, section_header::SHF_EXECINSTR, sym, Elf};

use super::cache;
use super::maps::MapEntry;
use super::FileId;
use crate::runtime::fs::Fd;
use crate::sigsafe::sys::{self, Errno};

/// Why an object's file could not be read.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {errno}")]
    Read { path: String, errno: Errno },
    #[error(
        "{path} is not the file that is mapped (it was replaced on disk since it was loaded, \
         and /proc/self/map_files cannot be read): its symbols would not match the code"
    )]
    Replaced { path: String },
    #[error("{path} is not a valid ELF file: {why}")]
    Parse { path: String, why: String },
}

/// A function symbol, read in place from its file's [`Funcs`].
#[derive(Clone, Copy, Debug)]
pub struct FuncSym<'a> {
    pub name: &'a str,
    /// `name@VERSION` (or `name@@VERSION` for the default version), from .gnu.version.
    pub versioned: Option<&'a str>,
    pub vaddr: u64,
    pub size: u64,
    pub ifunc: bool,
    pub global: bool,
}

/// A function symbol as a parse finds it, before it joins its file's [`Funcs`].
struct RawSym {
    name: String,
    versioned: Option<String>,
    vaddr: u64,
    size: u64,
    ifunc: bool,
    global: bool,
    /// Where it came from: the symbol table ([`DYNSYM`] or [`SYMTAB`]) and its index there, so
    /// that a record read back from the cache can be checked against the file.
    table: u8,
    index: u32,
}

/// A record's table: `.dynsym`.
const DYNSYM: u8 = 1;
/// A record's table: `.symtab`.
const SYMTAB: u8 = 2;

/// A file's function symbols, sorted by address (then name): fixed-size records followed by the
/// names, in one buffer. It is the form the cache keeps, so that reading a library's symbols
/// back checks each name in place: decoded into a vector of strings, libc's three thousand were
/// six thousand allocations and a third of setting up one probe.
pub struct Funcs {
    buf: Vec<u8>,
    /// Where the records start in `buf` (names' offsets count from there too).
    at: usize,
    n: usize,
}

/// vaddr, size (u64); name offset, name length, versioned offset, versioned length (u32, a
/// length of 0 for none); flags (bit 0 IFUNC, bit 1 global); the symbol table it came from
/// ([`DYNSYM`], [`SYMTAB`]); its index there (u32); padding.
const REC: usize = 40;

/// Record fields (records are whole: checked in `view`, made whole in `build`).
fn le_u64(rec: &[u8], at: usize) -> u64 {
    super::le(rec, at, 8).unwrap_or(0)
}

fn le_u32(rec: &[u8], at: usize) -> usize {
    super::le(rec, at, 4).unwrap_or(0) as usize
}

impl Funcs {
    /// The records and names of `raw`.
    fn build(mut raw: Vec<RawSym>) -> Funcs {
        raw.sort_by(|a, b| a.vaddr.cmp(&b.vaddr).then_with(|| a.name.cmp(&b.name)));
        let names: usize =
            raw.iter().map(|r| r.name.len() + r.versioned.as_ref().map_or(0, |v| v.len())).sum();
        let mut buf = vec![0u8; raw.len() * REC];
        buf.reserve(names);
        for (i, r) in raw.iter().enumerate() {
            let name_at = buf.len();
            buf.extend_from_slice(r.name.as_bytes());
            let ver_at = buf.len();
            let ver = r.versioned.as_deref().unwrap_or("");
            buf.extend_from_slice(ver.as_bytes());
            let rec = &mut buf[i * REC..(i + 1) * REC];
            rec[0..8].copy_from_slice(&r.vaddr.to_le_bytes());
            rec[8..16].copy_from_slice(&r.size.to_le_bytes());
            for (k, v) in [name_at, r.name.len(), ver_at, ver.len()].into_iter().enumerate() {
                rec[16 + 4 * k..20 + 4 * k].copy_from_slice(&(v as u32).to_le_bytes());
            }
            rec[32] = r.ifunc as u8 | (r.global as u8) << 1;
            rec[33] = r.table;
            rec[34..38].copy_from_slice(&r.index.to_le_bytes());
        }
        Funcs { buf, at: 0, n: raw.len() }
    }

    /// `n` records at `at` in `buf`, and their names, if they are whole, valid UTF-8 and sorted.
    fn view(buf: Vec<u8>, at: usize, n: usize) -> Option<Funcs> {
        let recs = buf.get(at..at.checked_add(n.checked_mul(REC)?)?)?;
        let names = &buf[at..];
        let mut last = 0;
        for rec in recs.chunks_exact(REC) {
            let vaddr = le_u64(rec, 0);
            for k in [16, 24] {
                let (from, len) = (le_u32(rec, k), le_u32(rec, k + 4));
                core::str::from_utf8(names.get(from..from.checked_add(len)?)?).ok()?;
            }
            if vaddr < last || le_u32(rec, 20) == 0 {
                return None;
            }
            last = vaddr;
        }
        Some(Funcs { buf, at, n })
    }

    /// The records and names, as [`Funcs::view`] reads them.
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn vaddr(&self, i: usize) -> u64 {
        le_u64(&self.buf, self.at + i * REC)
    }

    /// Record `i`'s bytes.
    fn record(&self, i: usize) -> &[u8] {
        &self.buf[self.at + i * REC..self.at + (i + 1) * REC]
    }

    pub fn get(&self, i: usize) -> FuncSym<'_> {
        let names = &self.buf[self.at..];
        let rec = &names[i * REC..(i + 1) * REC];
        let text = |k: usize| {
            let (from, len) = (le_u32(rec, k), le_u32(rec, k + 4));
            // SAFETY: checked to be UTF-8 when the records were read (`view`) or made from
            // strings (`build`); the buffer is not written after.
            unsafe { core::str::from_utf8_unchecked(&names[from..from + len]) }
        };
        let versioned = text(24);
        FuncSym {
            name: text(16),
            versioned: (!versioned.is_empty()).then_some(versioned),
            vaddr: le_u64(rec, 0),
            size: le_u64(rec, 8),
            ifunc: rec[32] & 1 != 0,
            global: rec[32] & 2 != 0,
        }
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = FuncSym<'_>> + '_ {
        (0..self.n).map(|i| self.get(i))
    }

    /// The first index whose address is not `before` (the addresses where `before` holds come
    /// first).
    fn partition_point(&self, before: impl Fn(u64) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if before(self.vaddr(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// An executable section (`.text`, `.plt`, `.init`, ...).
#[derive(Clone, Debug)]
pub struct Section {
    pub name: String,
    pub vaddr: u64,
    pub offset: u64,
    pub size: u64,
}

/// The file's bytes, read into libuprobe's own memory (not mapped from the file: a mapping of
/// the program's libc by libuprobe would show in /proc/self/maps, where a program looking for
/// libc's first mapping could find it), and read when first needed: the headers and symbol tables
/// at once, code by 64 KiB chunks as sites are decoded (a probe on `malloc` reads a few pages of
/// libc's code, not 2 MiB).
struct Bytes {
    /// An anonymous mapping the size of the file: zero where not read yet.
    base: usize,
    len: usize,
    /// The open file (numbered high, close-on-exec), reopened if the program closed it.
    fd: core::sync::atomic::AtomicI32,
    id: FileId,
    opened: String,
    loaded: Vec<core::sync::atomic::AtomicBool>,
    lock: crate::runtime::lock::Mutex<()>,
}

const CHUNK: usize = 64 * 1024;

// SAFETY: the mapping is written only under `lock`, in chunks no reader has been given yet.
unsafe impl Sync for Bytes {}
// SAFETY: as above; the mapping belongs to this value.
unsafe impl Send for Bytes {}

impl Bytes {
    fn new(fd: Fd, id: FileId, opened: String) -> Result<Bytes, Errno> {
        let len = sys::fstat(fd.0)?.st_size.max(0) as usize;
        let base = if len == 0 {
            0
        } else {
            sys::mmap_far(
                len.next_multiple_of(sys::PAGE),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_NORESERVE,
            )?
        };
        let high =
            sys::dup_cloexec_at_least(fd.0, crate::runtime::fs::high_fd_floor()).unwrap_or(-1);
        let fd = if high >= 0 { high } else { core::mem::replace(&mut { fd }.0, -1) };
        let chunks = len.div_ceil(CHUNK);
        Ok(Bytes {
            base,
            len,
            fd: core::sync::atomic::AtomicI32::new(fd),
            id,
            opened,
            loaded: (0..chunks).map(|_| core::sync::atomic::AtomicBool::new(false)).collect(),
            lock: crate::runtime::lock::Mutex::new(()),
        })
    }

    /// A placeholder (no memory, no descriptor), replaced right away by the real one.
    fn empty_like(b: &Bytes) -> Bytes {
        Bytes {
            base: 0,
            len: 0,
            fd: core::sync::atomic::AtomicI32::new(-1),
            id: b.id,
            opened: String::new(),
            loaded: Vec::new(),
            lock: crate::runtime::lock::Mutex::new(()),
        }
    }

    /// `[off, off + len)` of the file (cut at its end), read now if it was not yet.
    fn get(&self, off: usize, len: usize) -> Result<&[u8], Errno> {
        let start = off.min(self.len);
        let end = off.saturating_add(len).min(self.len);
        if end > start {
            for c in start / CHUNK..=(end - 1) / CHUNK {
                self.load(c)?;
            }
        }
        // SAFETY: [start, end) lies in our mapping, and every chunk of it is loaded: written
        // once, never again.
        Ok(unsafe { core::slice::from_raw_parts((self.base + start) as *const u8, end - start) })
    }

    /// The whole file as it is now: zero where not read.
    ///
    /// # Safety
    /// No chunk may be loaded while the view is alive.
    unsafe fn unread_view(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: our mapping of `len` bytes; the caller keeps loads away.
        unsafe { core::slice::from_raw_parts(self.base as *const u8, self.len) }
    }

    fn load(&self, c: usize) -> Result<(), Errno> {
        use core::sync::atomic::Ordering;
        let Some(flag) = self.loaded.get(c) else { return Ok(()) };
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.lock.lock();
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(self.len));
        // The chunk's pages at once (one call, instead of a fault a page when the file's bytes
        // are copied in). Over our own reservation, which nothing else uses.
        let _ = sys::map_fixed_anon(
            self.base + lo,
            (hi - lo).next_multiple_of(sys::PAGE),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_POPULATE,
        );
        // SAFETY: the chunk lies in our mapping and no reader has been given any of it.
        let buf = unsafe { core::slice::from_raw_parts_mut((self.base + lo) as *mut u8, hi - lo) };
        if self.read_at(buf, lo).is_err() {
            // The program may have closed our descriptor: open the file again (the same one).
            self.reopen()?;
            self.read_at(buf, lo)?;
        }
        flag.store(true, Ordering::Release);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], off: usize) -> Result<(), Errno> {
        let fd = self.fd.load(core::sync::atomic::Ordering::Relaxed);
        if file_id(fd)? != self.id {
            return Err(Errno(libc::EBADF));
        }
        let mut done = 0;
        while done < buf.len() {
            match sys::pread(fd, &mut buf[done..], (off + done) as u64) {
                Ok(0) => return Err(Errno(libc::EIO)),
                Ok(n) => done += n,
                Err(Errno(libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reopen(&self) -> Result<(), Errno> {
        let fd = Fd::open(&self.opened, libc::O_RDONLY | libc::O_CLOEXEC)?;
        if file_id(fd.0)? != self.id {
            return Err(Errno(libc::ESTALE));
        }
        let high = sys::dup_cloexec_at_least(fd.0, crate::runtime::fs::high_fd_floor())?;
        // The old number is not ours any more (the program closed it, maybe reused it).
        self.fd.store(high, core::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if self.base != 0 {
            // SAFETY: our own mapping; nothing borrows from it once the file is dropped.
            unsafe { sys::munmap(self.base, self.len.next_multiple_of(sys::PAGE)) };
        }
        let fd = self.fd.load(core::sync::atomic::Ordering::Relaxed);
        if fd >= 0 && file_id(fd).ok() == Some(self.id) {
            sys::close(fd);
        }
    }
}

/// An ELF file as libuprobe needs it.
pub struct ElfFile {
    pub path: String,
    pub soname: Option<String>,
    pub funcs: Funcs,
    pub segments: Vec<Segment>,
    pub exec_sections: Vec<Section>,
    bytes: Bytes,
}

/// Read what the ELF parser needs, and nothing of the code: the headers, and every chunk that is
/// not entirely inside a section of program bits (code, read-only data) or of zeros. Without
/// section headers, everything.
fn load_metadata(b: &Bytes) -> Result<(), Errno> {
    let u = |d: &[u8], at: usize, n: usize| -> u64 {
        d.get(at..at + n).map_or(0, |s| s.iter().rev().fold(0, |v, &x| (v << 8) | x as u64))
    };
    let head = b.get(0, 64)?;
    let (phoff, shoff) = (u(head, 0x20, 8) as usize, u(head, 0x28, 8) as usize);
    let (phentsize, phnum) = (u(head, 0x36, 2) as usize, u(head, 0x38, 2) as usize);
    let (shentsize, shnum) = (u(head, 0x3a, 2) as usize, u(head, 0x3c, 2) as usize);
    b.get(phoff, phentsize * phnum)?;
    let shdrs = b.get(shoff, shentsize * shnum)?;
    if shnum == 0 || shentsize < 0x28 || shdrs.len() < shentsize * shnum {
        b.get(0, b.len)?;
        return Ok(());
    }
    // Chunks wholly inside PROGBITS or NOBITS sections need not be read.
    let mut skip = vec![false; b.loaded.len()];
    let mut need = vec![false; b.loaded.len()];
    for i in 0..shnum {
        let sh = &shdrs[i * shentsize..];
        let (ty, off, size) = (u(sh, 4, 4), u(sh, 0x18, 8) as usize, u(sh, 0x20, 8) as usize);
        if size == 0 || off >= b.len {
            continue;
        }
        let (first, last) = (off / CHUNK, (off + size - 1).min(b.len - 1) / CHUNK);
        let bulk = ty == 1 || ty == 8; // SHT_PROGBITS, SHT_NOBITS
        for c in first..=last {
            let whole = c * CHUNK >= off && (c + 1) * CHUNK <= off + size;
            if bulk && whole {
                skip[c] = true;
            } else if !bulk {
                need[c] = true;
            }
        }
    }
    for c in 0..b.loaded.len() {
        if need[c] || !skip[c] {
            b.load(c)?;
        }
    }
    Ok(())
}

/// The (dev, inode) of an open file, in /proc/self/maps' encoding.
fn file_id(fd: i32) -> Result<FileId, Errno> {
    let st = sys::fstat(fd)?;
    let (major, minor) = (libc::major(st.st_dev) as u64, libc::minor(st.st_dev) as u64);
    Ok(FileId { dev: (major << 32) | minor, ino: st.st_ino })
}

/// Open the file that is mapped as `want`: its path if that still is the same file, else the
/// mapping's `/proc/self/map_files` entry.
fn open_mapped(path: &str, want: FileId, maps: &[MapEntry]) -> Result<(Fd, String), ElfError> {
    let read_err = |errno| ElfError::Read { path: path.to_string(), errno };
    match Fd::open(path, libc::O_RDONLY) {
        Ok(fd) if file_id(fd.0).map_err(read_err)? == want => return Ok((fd, path.to_string())),
        Ok(_) | Err(Errno(libc::ENOENT)) => {}
        Err(e) => return Err(read_err(e)),
    }
    for m in maps.iter().filter(|m| m.file == Some(want)) {
        let alt = format!("/proc/self/map_files/{:x}-{:x}", m.start, m.end);
        if let Ok(fd) = Fd::open(&alt, libc::O_RDONLY) {
            if file_id(fd.0).ok() == Some(want) {
                return Ok((fd, alt));
            }
        }
    }
    Err(ElfError::Replaced { path: path.to_string() })
}

impl ElfFile {
    /// Read the file mapped as `id` (named `path` in /proc/self/maps).
    pub fn open(path: &str, id: FileId, maps: &[MapEntry]) -> Result<ElfFile, ElfError> {
        let (fd, opened) = open_mapped(path, id, maps)?;
        let read_err = |errno| ElfError::Read { path: path.to_string(), errno };
        Self::parse(path, Bytes::new(fd, id, opened).map_err(read_err)?)
    }

    /// Read an ELF file by path (no identity check: for files that are not mapped).
    pub fn open_path(path: &str) -> Result<ElfFile, ElfError> {
        let read_err = |errno| ElfError::Read { path: path.to_string(), errno };
        let fd = Fd::open(path, libc::O_RDONLY).map_err(read_err)?;
        let id = file_id(fd.0).map_err(read_err)?;
        Self::parse(path, Bytes::new(fd, id, path.to_string()).map_err(read_err)?)
    }

    fn parse(path: &str, bytes: Bytes) -> Result<ElfFile, ElfError> {
        let key = cache::Key::of(bytes.fd.load(core::sync::atomic::Ordering::Relaxed));
        if let Some(cached) = key.and_then(|k| cache::get(&k, "elf")) {
            if let Some(e) = Self::decode(path, cached, &bytes) {
                // What the entry says decides where code is written: it must be what the file
                // says (else the file is parsed, and the entry written again).
                if e.verify_cached(&bytes).is_some() {
                    return Ok(ElfFile { bytes, ..e });
                }
            }
        }
        let e = Self::parse_file(path, bytes)?;
        if let Some(k) = key {
            cache::put(&k, "elf", &e.encode());
        }
        Ok(e)
    }

    /// The cached entry of this file of `kind` (see `objects::cache`), if any.
    pub fn cached(&self, kind: &str) -> Option<Vec<u8>> {
        cache::get(
            &cache::Key::of(self.bytes.fd.load(core::sync::atomic::Ordering::Relaxed))?,
            kind,
        )
    }

    /// Keep `data` as this file's entry of `kind`.
    pub fn cache(&self, kind: &str, data: &[u8]) {
        if let Some(k) = cache::Key::of(self.bytes.fd.load(core::sync::atomic::Ordering::Relaxed)) {
            cache::put(&k, kind, data);
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = cache::Writer::default();
        w.opt_str(self.soname.as_deref());
        w.u64(self.segments.len() as u64);
        for s in &self.segments {
            w.u64(s.vaddr);
            w.u64(s.offset);
            w.u64(s.filesz);
            w.u8(s.exec as u8);
        }
        w.u64(self.exec_sections.len() as u64);
        for s in &self.exec_sections {
            w.str(&s.name);
            w.u64(s.vaddr);
            w.u64(s.offset);
            w.u64(s.size);
        }
        // Last: read back in place (see `Funcs`).
        w.u64(self.funcs.len() as u64);
        w.0.extend_from_slice(self.funcs.bytes());
        w.0
    }

    /// An ElfFile from a cache entry (with an empty `bytes`, which the caller replaces).
    fn decode(path: &str, data: Vec<u8>, bytes: &Bytes) -> Option<ElfFile> {
        let mut r = cache::Reader(&data);
        let soname = r.opt_str()?;
        let n = r.count(25)?;
        let mut segments = Vec::with_capacity(n);
        for _ in 0..n {
            let (vaddr, offset, filesz, exec) = (r.u64()?, r.u64()?, r.u64()?, r.u8()? != 0);
            segments.push(Segment { vaddr, offset, filesz, exec });
        }
        let n = r.count(32)?;
        let mut exec_sections = Vec::with_capacity(n);
        for _ in 0..n {
            let (name, vaddr, offset, size) = (r.str()?, r.u64()?, r.u64()?, r.u64()?);
            exec_sections.push(Section { name, vaddr, offset, size });
        }
        let n = r.count(REC)?;
        let at = data.len() - r.0.len();
        let funcs = Funcs::view(data, at, n)?;
        Some(ElfFile {
            path: path.to_string(),
            soname,
            funcs,
            segments,
            exec_sections,
            bytes: Bytes::empty_like(bytes),
        })
    }

    /// Check a decoded cache entry against the file's own bytes: its segments, executable
    /// sections and soname, and each function record against the symbol it names (its table and
    /// index: address, size, type, binding, name). Some(()) if everything holds. (A record's
    /// `name@VERSION` is not checked: it only chooses between symbols that are.)
    fn verify_cached(&self, b: &Bytes) -> Option<()> {
        let u = |d: &[u8], at: usize, n: usize| super::le(d, at, n);
        let head = b.get(0, 64).ok()?;
        if head.get(..4)? != b"\x7fELF" || head[4] != 2 || u(head, 0x12, 2)? != 62 {
            return None;
        }
        let (phoff, shoff) = (u(head, 0x20, 8)? as usize, u(head, 0x28, 8)? as usize);
        let (phentsize, phnum) = (u(head, 0x36, 2)? as usize, u(head, 0x38, 2)? as usize);
        let (shentsize, shnum) = (u(head, 0x3a, 2)? as usize, u(head, 0x3c, 2)? as usize);
        let shstrndx = u(head, 0x3e, 2)? as usize;
        if phentsize < 56 || shentsize < 64 {
            return None;
        }
        // Segments: every PT_LOAD, in order.
        let phdrs = b.get(phoff, phentsize.checked_mul(phnum)?).ok()?;
        let mut segs = self.segments.iter();
        for ph in phdrs.chunks_exact(phentsize) {
            if u(ph, 0, 4)? != 1 {
                continue;
            }
            let s = segs.next()?;
            let exec = u(ph, 4, 4)? & 1 != 0;
            if (s.vaddr, s.offset, s.filesz, s.exec)
                != (u(ph, 0x10, 8)?, u(ph, 8, 8)?, u(ph, 0x20, 8)?, exec)
            {
                return None;
            }
        }
        if segs.next().is_some() {
            return None;
        }
        let shdrs = b.get(shoff, shentsize.checked_mul(shnum)?).ok()?;
        let shdr = |i: usize| shdrs.get(i.checked_mul(shentsize)?..(i + 1).checked_mul(shentsize)?);
        // (type, flags, addr, offset, size, link) of section `i`.
        let sec = |i: usize| -> Option<(u64, u64, u64, u64, u64, u64)> {
            let h = shdr(i)?;
            Some((
                u(h, 4, 4)?,
                u(h, 8, 8)?,
                u(h, 0x10, 8)?,
                u(h, 0x18, 8)?,
                u(h, 0x20, 8)?,
                u(h, 0x28, 4)?,
            ))
        };
        // A NUL-terminated string at `at` in section `i` equals `want`.
        let string_is = |i: usize, at: u64, want: &str| -> Option<bool> {
            let (_, _, _, off, size, _) = sec(i)?;
            if at.checked_add(want.len() as u64)? >= size {
                return Some(false);
            }
            let bytes = b.get(off.checked_add(at)? as usize, want.len() + 1).ok()?;
            Some(bytes.get(..want.len())? == want.as_bytes() && bytes.get(want.len()) == Some(&0))
        };
        // Executable sections, in order.
        let mut execs = self.exec_sections.iter();
        for i in 0..shnum {
            let (_, flags, addr, off, size, _) = sec(i)?;
            if flags & SHF_EXECINSTR as u64 == 0 || size == 0 {
                continue;
            }
            let s = execs.next()?;
            let name_at = u(shdr(i)?, 0, 4)?;
            if (s.vaddr, s.offset, s.size) != (addr, off, size)
                || !string_is(shstrndx, name_at, &s.name)?
            {
                return None;
            }
        }
        if execs.next().is_some() {
            return None;
        }
        // The soname, from the dynamic section.
        let dynamic = (0..shnum).find(|&i| sec(i).is_some_and(|s| s.0 == 6));
        let mut soname = None;
        if let Some(d) = dynamic {
            let (_, _, _, off, size, link) = sec(d)?;
            let entries = b.get(off as usize, size as usize).ok()?;
            for e in entries.chunks_exact(16) {
                match u(e, 0, 8)? {
                    0 => break,
                    14 => soname = Some((link as usize, u(e, 8, 8)?)),
                    _ => {}
                }
            }
        }
        match (&self.soname, soname) {
            (None, None) => {}
            (Some(name), Some((strtab, at))) if string_is(strtab, at, name)? => {}
            _ => return None,
        }
        // Every function record.
        let table_of = |ty: u64| (0..shnum).find(|&i| sec(i).is_some_and(|s| s.0 == ty));
        let (dynsym, symtab) = (table_of(11), table_of(2));
        for i in 0..self.funcs.len() {
            let rec = self.funcs.record(i);
            let (table, index) = (rec[33], le_u32(rec, 34) as u64);
            let t = match table {
                DYNSYM => dynsym?,
                SYMTAB => symtab?,
                _ => return None,
            };
            let (_, _, _, off, size, link) = sec(t)?;
            if index.checked_add(1)?.checked_mul(24)? > size {
                return None;
            }
            let sym = b.get((off + index * 24) as usize, 24).ok()?;
            let f = self.funcs.get(i);
            let (info, shndx) = (sym[4], u(sym, 6, 2)?);
            let ty = info & 0xf;
            let global = info >> 4 != sym::STB_LOCAL;
            if u(sym, 8, 8)? != f.vaddr
                || u(sym, 16, 8)? != f.size
                || shndx == 0
                || global != f.global
                || (ty == sym::STT_GNU_IFUNC) != f.ifunc
                || !(ty == sym::STT_FUNC || ty == sym::STT_GNU_IFUNC)
                || !string_is(link as usize, u(sym, 0, 4)?, f.name)?
            {
                return None;
            }
        }
        Some(())
    }

    fn parse_file(path: &str, bytes: Bytes) -> Result<ElfFile, ElfError> {
        let read_err = |errno| ElfError::Read { path: path.to_string(), errno };
        load_metadata(&bytes).map_err(read_err)?;
        // SAFETY: nothing else holds `bytes` yet, and nothing loads into it while `data` lives.
        let data: &[u8] = unsafe { bytes.unread_view() };
        let parse_err = |why: String| ElfError::Parse { path: path.to_string(), why };
        let elf = Elf::parse(data).map_err(|e| parse_err(e.to_string()))?;
        if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
            return Err(parse_err("not an x86-64 ELF file".into()));
        }
        let segments = elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == PT_LOAD)
            .map(|ph| Segment {
                vaddr: ph.p_vaddr,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                exec: ph.is_executable(),
            })
            .collect();
        let exec_sections = elf
            .section_headers
            .iter()
            .filter(|sh| sh.sh_flags & SHF_EXECINSTR as u64 != 0 && sh.sh_size > 0)
            .map(|sh| Section {
                name: elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("").to_string(),
                vaddr: sh.sh_addr,
                offset: sh.sh_offset,
                size: sh.sh_size,
            })
            .collect();
        let version_names = version_names(&elf);
        let mut funcs = Vec::new();
        for (i, s) in elf.dynsyms.iter().enumerate() {
            let Some(name) = elf.dynstrtab.get_at(s.st_name) else { continue };
            let Some(mut f) = func_sym(&s, name, DYNSYM, i) else { continue };
            if let Some(vs) = elf.versym.as_ref().and_then(|v| v.get_at(i)) {
                if let Some(v) = version_names.get(&vs.version()) {
                    let sep = if vs.is_hidden() { "@" } else { "@@" };
                    f.versioned = Some(format!("{name}{sep}{v}"));
                }
            }
            funcs.push(f);
        }
        let mut seen: std::collections::HashSet<(String, u64)> =
            funcs.iter().map(|f| (f.name.clone(), f.vaddr)).collect();
        for (i, s) in elf.syms.iter().enumerate() {
            let Some(name) = elf.strtab.get_at(s.st_name) else { continue };
            if let Some(f) = func_sym(&s, name, SYMTAB, i) {
                if seen.insert((f.name.clone(), f.vaddr)) {
                    funcs.push(f);
                }
            }
        }
        let funcs = Funcs::build(funcs);
        let soname = elf.soname.map(str::to_string);
        drop(elf);
        Ok(ElfFile { path: path.to_string(), soname, funcs, segments, exec_sections, bytes })
    }

    /// Up to `len` bytes of the file at offset `off` (fewer at its end).
    pub fn bytes_at(&self, off: u64, len: usize) -> Result<&[u8], ElfError> {
        self.bytes
            .get(off as usize, len)
            .map_err(|errno| ElfError::Read { path: self.path.clone(), errno })
    }

    /// File offset of virtual address `vaddr` in an executable segment.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.exec && vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            .map(|s| vaddr - s.vaddr + s.offset)
    }

    /// Virtual address of file offset `off` in an executable segment.
    pub fn vaddr_of(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.exec && off >= s.offset && off - s.offset < s.filesz)
            .map(|s| off - s.offset + s.vaddr)
    }

    /// The function containing `vaddr`, if any (not an IFUNC resolver's symbol).
    pub fn func_containing(&self, vaddr: u64) -> Option<FuncSym<'_>> {
        let i = self.funcs.partition_point(|v| v <= vaddr);
        (0..i)
            .rev()
            .map(|i| self.funcs.get(i))
            .take_while(|f| f.vaddr.saturating_add(0x10_0000) > vaddr)
            .find(|f| !f.ifunc && vaddr >= f.vaddr && vaddr - f.vaddr < f.size.max(1))
    }

    /// Every function symbol at exactly `vaddr`.
    pub fn funcs_at(&self, vaddr: u64) -> impl Iterator<Item = FuncSym<'_>> {
        let i = self.funcs.partition_point(|v| v < vaddr);
        (i..self.funcs.len()).map(|i| self.funcs.get(i)).take_while(move |f| f.vaddr == vaddr)
    }

    /// The executable section holding `vaddr`.
    pub fn section_containing(&self, vaddr: u64) -> Option<&Section> {
        self.exec_sections.iter().find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.size)
    }
}

fn func_sym(s: &sym::Sym, name: &str, table: u8, index: usize) -> Option<RawSym> {
    let ty = s.st_type();
    let ifunc = ty == sym::STT_GNU_IFUNC;
    if !(ty == sym::STT_FUNC || ifunc) || s.st_shndx == 0 || s.st_value == 0 || name.is_empty() {
        return None;
    }
    Some(RawSym {
        name: name.to_string(),
        versioned: None,
        vaddr: s.st_value,
        size: s.st_size,
        ifunc,
        global: s.st_bind() != sym::STB_LOCAL,
        table,
        index: u32::try_from(index).ok()?,
    })
}

/// Version index -> version name, from .gnu.version_d.
fn version_names(elf: &Elf) -> BTreeMap<u16, String> {
    let mut out = BTreeMap::new();
    if let Some(verdef) = &elf.verdef {
        for vd in verdef.iter() {
            if let Some(aux) = vd.iter().next() {
                if let Some(name) = elf.dynstrtab.get_at(aux.vda_name) {
                    out.insert(vd.vd_ndx, name.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, versioned: Option<&str>, vaddr: u64) -> RawSym {
        RawSym {
            name: name.into(),
            versioned: versioned.map(Into::into),
            vaddr,
            size: vaddr / 2,
            ifunc: name.contains("ifunc"),
            global: !name.starts_with('_'),
            table: DYNSYM,
            index: vaddr as u32,
        }
    }

    fn all(f: &Funcs) -> Vec<(String, Option<String>, u64, u64, bool, bool)> {
        f.iter()
            .map(|s| {
                let v = s.versioned.map(str::to_string);
                (s.name.to_string(), v, s.vaddr, s.size, s.ifunc, s.global)
            })
            .collect()
    }

    /// Symbols made into records come back sorted, whole, and the same after a trip through the
    /// bytes the cache keeps; damaged bytes are refused, not read.
    #[test]
    fn function_records_read_back_in_place() {
        let f = Funcs::build(vec![
            raw("zeta", None, 0x300),
            raw("malloc", Some("malloc@@GLIBC_2.2.5"), 0x100),
            raw("_alias", None, 0x100),
            raw("strlen_ifunc", Some("strlen@GLIBC_2.2.5"), 0x200),
            raw("é_utf8", None, 0x400),
        ]);
        let want = vec![
            ("_alias".to_string(), None, 0x100, 0x80, false, false),
            ("malloc".into(), Some("malloc@@GLIBC_2.2.5".to_string()), 0x100, 0x80, false, true),
            ("strlen_ifunc".into(), Some("strlen@GLIBC_2.2.5".into()), 0x200, 0x100, true, true),
            ("zeta".into(), None, 0x300, 0x180, false, true),
            ("é_utf8".into(), None, 0x400, 0x200, false, true),
        ];
        assert_eq!(all(&f), want);
        assert_eq!(f.partition_point(|v| v < 0x200), 2);
        assert_eq!(f.partition_point(|v| v <= 0x400), 5);
        let mut cached = b"header".to_vec();
        cached.extend_from_slice(f.bytes());
        let back = Funcs::view(cached.clone(), 6, 5).expect("valid records");
        assert_eq!(all(&back), want);
        // Too many records for the bytes; a name not UTF-8; names out of order by address.
        assert!(Funcs::view(cached.clone(), 6, 6 + cached.len() / REC).is_none());
        let name_at = 6 + le_u32(&cached[6 + 4 * REC..], 16);
        let mut bad = cached.clone();
        bad[name_at] = 0xff; // the first byte of "é"
        assert!(Funcs::view(bad, 6, 5).is_none());
        let mut unsorted = cached.clone();
        unsorted[6..14].copy_from_slice(&0x999u64.to_le_bytes());
        assert!(Funcs::view(unsorted, 6, 5).is_none());
        let mut long = cached;
        long[6 + 20..6 + 24].copy_from_slice(&0x10000u32.to_le_bytes());
        assert!(Funcs::view(long, 6, 5).is_none());
    }

    /// A cache entry decides where code is written only if the file says the same: libc's entry
    /// passes; with one function moved by 12 bytes (still a well-formed entry: the move keeps the
    /// order), or a segment or section changed, it is refused.
    #[test]
    fn a_cache_entry_is_checked_against_the_file() {
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let parsed = ElfFile::open_path(path).unwrap();
        let good = parsed.encode();
        let back = ElfFile::decode(path, good.clone(), &parsed.bytes).unwrap();
        assert!(back.verify_cached(&parsed.bytes).is_some());
        // The records start after the segments and sections; find malloc's.
        let at = good.len() - parsed.funcs.bytes().len();
        let i = (0..parsed.funcs.len()).find(|&i| parsed.funcs.get(i).name == "malloc").unwrap();
        let (vaddr, next) = (parsed.funcs.vaddr(i), parsed.funcs.vaddr(i + 1));
        assert!(vaddr + 12 <= next, "malloc is followed by a function within 12 bytes");
        let mut moved = good.clone();
        moved[at + i * REC..at + i * REC + 8].copy_from_slice(&(vaddr + 12).to_le_bytes());
        let back = ElfFile::decode(path, moved, &parsed.bytes).expect("a well-formed entry");
        assert!(back.verify_cached(&parsed.bytes).is_none(), "a moved function was believed");
        // A segment's offset (the first u64 after the soname and the count).
        let mut seg = good.clone();
        let soname_len = 1 + 8 + parsed.soname.as_ref().map_or(0, |s| s.len());
        seg[soname_len + 8 + 8] ^= 0x10;
        let back = ElfFile::decode(path, seg, &parsed.bytes).unwrap();
        assert!(back.verify_cached(&parsed.bytes).is_none(), "a moved segment was believed");
        // A record's table index pointing at another symbol.
        let mut idx = good;
        idx[at + i * REC + 34] ^= 1;
        let back = ElfFile::decode(path, idx, &parsed.bytes).unwrap();
        assert!(
            back.verify_cached(&parsed.bytes).is_none(),
            "a record of another symbol was believed"
        );
    }

    /// libc's symbols read from the cache's form are the ones its parse found.
    #[test]
    fn a_cache_entry_holds_every_symbol() {
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let parsed = ElfFile::open_path(path).unwrap();
        let back = ElfFile::decode(path, parsed.encode(), &parsed.bytes).unwrap();
        assert!(parsed.funcs.len() > 1000);
        assert_eq!(all(&back.funcs), all(&parsed.funcs));
        let malloc = back.funcs.iter().find(|f| f.name == "malloc").unwrap();
        assert!(malloc.global && malloc.versioned.is_some_and(|v| v.starts_with("malloc@")));
        assert!(back.funcs_at(malloc.vaddr).any(|f| f.name == "malloc"));
        assert_eq!(back.func_containing(malloc.vaddr + 1).map(|f| f.vaddr), Some(malloc.vaddr));
    }
}
