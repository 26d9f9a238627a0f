//! The mappings of this process, from `/proc/self/maps`.

use super::FileId;
use crate::runtime::fs;
use crate::sigsafe::sys::Errno;

/// One line of /proc/self/maps.
#[derive(Clone, Debug)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub offset: u64,
    /// MAP_SHARED: writing would reach the file.
    pub shared: bool,
    pub file: Option<FileId>,
    pub path: String,
}

impl MapEntry {
    pub fn is_exec(&self) -> bool {
        self.prot & libc::PROT_EXEC != 0
    }

    /// Runtime address of file offset `off`, if this mapping holds it.
    pub fn addr_of(&self, off: u64) -> Option<u64> {
        let len = self.end - self.start;
        (off >= self.offset && off - self.offset < len).then(|| self.start + (off - self.offset))
    }

    /// File offset of runtime address `addr`, if this mapping holds it.
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        (self.start <= addr && addr < self.end).then(|| addr - self.start + self.offset)
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Parse one line of /proc/PID/maps.
pub fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode: u64 = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let dev = (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?;
    let mut prot = 0;
    for (i, bit) in [libc::PROT_READ, libc::PROT_WRITE, libc::PROT_EXEC].into_iter().enumerate() {
        if perms.get(i).is_some_and(|&c| c != b'-') {
            prot |= bit;
        }
    }
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        prot,
        offset,
        shared: perms.get(3) == Some(&b's'),
        file: (inode != 0).then_some(FileId { dev, ino: inode }),
        path,
    })
}

/// The mappings of process `pid` ("self" for this one).
pub fn read_maps_of(pid: &str) -> Result<Vec<MapEntry>, Errno> {
    let text = fs::read_string(&format!("/proc/{pid}/maps"))?;
    Ok(text.lines().filter_map(parse_maps_line).collect())
}

pub fn read_maps() -> Result<Vec<MapEntry>, Errno> {
    read_maps_of("self")
}

/// The mapping holding `addr`.
pub fn find(maps: &[MapEntry], addr: u64) -> Option<&MapEntry> {
    let i = maps.partition_point(|m| m.end <= addr);
    maps.get(i).filter(|m| m.contains(addr))
}

/// Which pages of a private file mapping still hold the file's bytes, from `/proc/self/pagemap`:
/// a page not yet faulted in, or one that is the file's own page (`PM_FILE`), has the file's
/// bytes; a page that copy-on-write replaced (anything written to it: libuprobe's own patches,
/// a debugger's breakpoint, a kernel uprobe, another tool's hook) is anonymous and may not. The
/// code of a pristine page is the file's, read in place instead of from the file (reading
/// libc's two megabytes of code from the file was a twentieth of setting up `libc.so.6:*`).
pub struct Pristine {
    start: u64,
    entries: Vec<u64>,
}

impl Pristine {
    /// The pages of `m` (None if pagemap cannot be read: then nothing is taken for pristine).
    pub fn of(m: &MapEntry) -> Option<Pristine> {
        const PAGE: u64 = crate::sigsafe::sys::PAGE as u64;
        let pages = ((m.end - m.start) / PAGE) as usize;
        let fd = fs::Fd::open("/proc/self/pagemap", libc::O_RDONLY).ok()?;
        let mut raw = vec![0u8; pages * 8];
        let n = crate::sigsafe::sys::pread(fd.0, &mut raw, m.start / PAGE * 8).ok()?;
        if n != raw.len() {
            return None;
        }
        let entries = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Some(Pristine { start: m.start, entries })
    }

    /// Is this the pages of `m` (the same start and length)?
    pub fn covers(&self, m: &MapEntry) -> bool {
        self.start == m.start
            && self.entries.len() as u64 * crate::sigsafe::sys::PAGE as u64 == m.end - m.start
    }

    /// Do `[addr, addr + len)` lie in pages that hold the file's bytes?
    pub fn holds(&self, addr: u64, len: u64) -> bool {
        const PAGE: u64 = crate::sigsafe::sys::PAGE as u64;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE: u64 = 1 << 61;
        if addr < self.start || len == 0 {
            return false;
        }
        let (first, last) = ((addr - self.start) / PAGE, (addr + len - 1 - self.start) / PAGE);
        (first..=last).all(|p| match self.entries.get(p as usize) {
            Some(&e) if e & PRESENT != 0 => e & FILE != 0,
            Some(&e) => e & SWAPPED == 0,
            None => false,
        })
    }
}
