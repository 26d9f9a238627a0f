//! The objects mapped in this process, and what their files say.
//!
//! An object is a file with at least one executable mapping, identified as the kernel does it: by
//! device and inode, never by name (the same file reached through another path, or mapped twice,
//! is one object). Names only serve to match what the user typed: soname, file name, full path, or
//! the short name (`libc` for `libc.so.6`).

pub mod cache;
pub mod elf;
pub mod loader;
pub mod maps;
pub mod unwind;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

pub use elf::{ElfError, ElfFile, FuncSym};
pub use maps::{read_maps, MapEntry};

use crate::runtime::fs;
use crate::sigsafe::sys;

/// A file's identity: (device, inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A file mapped with execute permission somewhere in this process.
#[derive(Clone, Debug)]
pub struct LoadedObject {
    pub id: FileId,
    pub path: String,
    pub is_main: bool,
    /// libuprobe.so itself: never probed.
    pub is_self: bool,
}

/// The distinct objects in `maps`, in address order of first appearance.
pub fn loaded_objects(maps: &[MapEntry]) -> Vec<LoadedObject> {
    let exe = fs::read_link("/proc/self/exe").ok();
    let me = self_file(maps);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| m.is_exec()) {
        let Some(id) = m.file else { continue };
        if !m.path.starts_with('/') || !seen.insert(id) {
            continue;
        }
        let path = m.path.trim_end_matches(" (deleted)").to_string();
        out.push(LoadedObject {
            id,
            is_main: exe.as_deref() == Some(path.as_str()),
            is_self: Some(id) == me,
            path,
        });
    }
    out
}

/// The file libuprobe itself was loaded from.
pub fn self_file(maps: &[MapEntry]) -> Option<FileId> {
    let here = self_file as *const () as u64;
    maps::find(maps, here).and_then(|m| m.file)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Does the OBJECT part of a spec name this object? Full path, file name, soname, or short name
/// (`libc` matches `libc.so.6` and `libc-2.31.so`, not `libcrypto.so`).
pub fn object_matches(pattern: &str, path: &str, soname: Option<&str>) -> bool {
    if pattern.contains('/') {
        return pattern == path || canonical(pattern).is_some_and(|p| p == path);
    }
    let name = file_name(path);
    if pattern == name || soname == Some(pattern) {
        return true;
    }
    [name, soname.unwrap_or("")].iter().any(|n| {
        n.strip_prefix(pattern).is_some_and(|rest| rest.starts_with(".so") || rest.starts_with('-'))
    })
}

/// The names the main program was started as, when they are not its file's: the file name of
/// the path given to `execve` (`AT_EXECFN`), when that path is a symbolic link to the program
/// (Debian's `redis-server` is a link to `redis-check-rdb`). Read once.
pub fn main_aliases() -> &'static [String] {
    static ALIASES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALIASES.get_or_init(|| {
        // SAFETY: getauxval cannot fail; AT_EXECFN is a NUL-terminated string the kernel put on
        // the initial stack, there for the life of the process (or 0).
        let p = unsafe { libc::getauxval(libc::AT_EXECFN) } as *const core::ffi::c_char;
        if p.is_null() {
            return Vec::new();
        }
        // SAFETY: as above.
        let execfn = unsafe { core::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned();
        let exe = fs::read_link("/proc/self/exe").ok();
        let name = file_name(&execfn).to_string();
        let same_file = exe
            .as_deref()
            .is_some_and(|e| canonical(&execfn).as_deref() == Some(e) && file_name(e) != name);
        if same_file && !name.is_empty() {
            vec![name]
        } else {
            Vec::new()
        }
    })
}

/// The canonical path of `path` (through /proc/self/fd, without libc's realpath).
fn canonical(path: &str) -> Option<String> {
    let fd = fs::Fd::open(path, libc::O_PATH).ok()?;
    fs::read_link(&format!("/proc/self/fd/{}", fd.0)).ok()
}

/// Find `__vdso_clock_gettime` in the vDSO the kernel mapped, for timestamps without a system call.
pub fn find_vdso_clock() {
    // SAFETY: getauxval is always safe; AT_SYSINFO_EHDR is the vDSO's ELF header, or 0.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if base == 0 {
        return;
    }
    // The vDSO is mapped whole, its section headers last: its length is where they end. (Read
    // from its header, not from /proc/self/maps, and its dynamic symbols looked up directly: a
    // maps read and an ELF parser's allocations were a tenth of setting up one probe.)
    // SAFETY: the vDSO's ELF header (64 bytes) is mapped for the life of the process.
    let header = unsafe { core::slice::from_raw_parts(base as *const u8, 64) };
    let Some(shoff) = le(header, 0x28, 8) else { return };
    let (Some(shentsize), Some(shnum)) = (le(header, 0x3a, 2), le(header, 0x3c, 2)) else {
        return;
    };
    if &header[..4] != b"\x7fELF" || shentsize != 64 || shnum > 256 || shoff > 1 << 20 {
        return;
    }
    let len = (shoff + shentsize * shnum) as usize;
    // SAFETY: [base, base + len) is the vDSO's image, mapped for the life of the process.
    let image = unsafe { core::slice::from_raw_parts(base as *const u8, len) };
    if let Some(at) = vdso_symbol(image, b"__vdso_clock_gettime") {
        sys::VDSO_CLOCK_GETTIME.store(base + at as usize, Ordering::Release);
    }
}

/// The little-endian integer of `n` bytes at `at` in `b`.
pub(crate) fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(n)?)?;
    Some(s.iter().rev().fold(0, |v, &x| v << 8 | x as u64))
}

/// The offset from the image's start of the dynamic symbol `name` in the ELF image `image` (its
/// value less the first PT_LOAD's address).
fn vdso_symbol(image: &[u8], name: &[u8]) -> Option<u64> {
    let (phoff, phentsize, phnum) =
        (le(image, 0x20, 8)? as usize, le(image, 0x36, 2)? as usize, le(image, 0x38, 2)?);
    if phentsize != 56 || phoff > image.len() {
        return None;
    }
    let bias = (0..phnum as usize)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| le(image, ph, 4) == Some(1)) // PT_LOAD
        .and_then(|ph| le(image, ph + 0x10, 8))?;
    let (shoff, shentsize, shnum) =
        (le(image, 0x28, 8)? as usize, le(image, 0x3a, 2)? as usize, le(image, 0x3c, 2)?);
    let section = |i: usize| shoff + i * shentsize;
    // The dynamic symbol table (SHT_DYNSYM) and the string table it links to.
    let dynsym = (0..shnum as usize).map(section).find(|&sh| le(image, sh + 4, 4) == Some(11))?;
    let (symoff, symsize) = (le(image, dynsym + 0x18, 8)? as usize, le(image, dynsym + 0x20, 8)?);
    let strtab = section(le(image, dynsym + 0x28, 4)? as usize);
    let stroff = le(image, strtab + 0x18, 8)? as usize;
    for sym in (0..symsize as usize / 24).map_while(|i| symoff.checked_add(i * 24)) {
        let at = stroff.checked_add(le(image, sym, 4)? as usize)?;
        let s = image.get(at..)?;
        if s.len() > name.len() && s.starts_with(name) && s[name.len()] == 0 {
            return le(image, sym + 8, 8)?.checked_sub(bias);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::maps::parse_maps_line;
    use super::*;

    /// The vDSO's clock_gettime is found from its headers, where an ELF parser finds it too.
    #[test]
    fn finds_the_vdso_clock() {
        // SAFETY: getauxval is always safe.
        let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
        let maps = read_maps().unwrap();
        let m = maps.iter().find(|m| m.start as usize == base).expect("a vDSO");
        // SAFETY: the vDSO's mapping.
        let image =
            unsafe { core::slice::from_raw_parts(base as *const u8, (m.end - m.start) as usize) };
        let elf = goblin::elf::Elf::parse(image).unwrap();
        let sym = elf
            .dynsyms
            .iter()
            .find(|s| elf.dynstrtab.get_at(s.st_name) == Some("__vdso_clock_gettime"))
            .unwrap();
        let load = elf.program_headers.iter().find(|p| p.p_type == 1).unwrap();
        let want = base as u64 + sym.st_value - load.p_vaddr;
        find_vdso_clock();
        assert_eq!(sys::VDSO_CLOCK_GETTIME.load(Ordering::Acquire) as u64, want);
        assert_eq!(vdso_symbol(image, b"__vdso_clock_gettim"), None);
        assert_eq!(vdso_symbol(image, b"no_such_symbol"), None);
    }

    #[test]
    fn parses_maps_lines() {
        let cases = [
            (
                "7f1c2a428000-7f1c2a5bd000 r-xp 00028000 fd:01 1835113    /usr/lib/x86_64-linux-gnu/libc.so.6",
                Some((0x7f1c2a428000, 0x7f1c2a5bd000, libc::PROT_READ | libc::PROT_EXEC, 0x28000, Some(FileId { dev: 0xfd_0000_0001, ino: 1835113 }), "/usr/lib/x86_64-linux-gnu/libc.so.6")),
            ),
            (
                "7ffd1b7e1000-7ffd1b802000 rw-p 00000000 00:00 0                          [stack]",
                Some((0x7ffd1b7e1000, 0x7ffd1b802000, libc::PROT_READ | libc::PROT_WRITE, 0, None, "[stack]")),
            ),
            ("55d0c6a3e000-55d0c6a3f000 ---p 00000000 00:00 0", Some((0x55d0c6a3e000, 0x55d0c6a3f000, 0, 0, None, ""))),
            ("garbage", None),
        ];
        for (line, want) in cases {
            let got =
                parse_maps_line(line).map(|m| (m.start, m.end, m.prot, m.offset, m.file, m.path));
            assert_eq!(got, want.map(|w| (w.0, w.1, w.2, w.3, w.4, w.5.to_string())), "{line}");
        }
    }

    #[test]
    fn matches_object_names() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let cases = [
            ("libc.so.6", libc, Some("libc.so.6"), true),
            ("libc", libc, Some("libc.so.6"), true),
            (libc, libc, None, true),
            ("libcrypto", libc, Some("libc.so.6"), false),
            ("libc", "/usr/lib/libcrypto.so.3", Some("libcrypto.so.3"), false),
            ("libc", "/lib/libc-2.31.so", None, true),
            ("app", "/home/u/app", None, true),
            ("ap", "/home/u/app", None, false),
            ("libfoo.so", "/x/libfoo-1.so", Some("libfoo.so"), true),
        ];
        for (pat, path, soname, want) in cases {
            assert_eq!(object_matches(pat, path, soname), want, "{pat} vs {path}");
        }
    }
}
