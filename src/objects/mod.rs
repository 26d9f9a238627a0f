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
    let Some(len) = read_maps().ok().and_then(|maps| {
        maps.iter().find(|m| m.start as usize == base).map(|m| (m.end - m.start) as usize)
    }) else {
        return;
    };
    // SAFETY: the vDSO mapping [base, base + len) is readable for the life of the process.
    let image = unsafe { core::slice::from_raw_parts(base as *const u8, len) };
    let Ok(elf) = goblin::elf::Elf::parse(image) else { return };
    let sym = elf
        .dynsyms
        .iter()
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some("__vdso_clock_gettime"));
    if let Some(sym) = sym {
        let first_load =
            elf.program_headers.iter().find(|p| p.p_type == goblin::elf::program_header::PT_LOAD);
        let bias = first_load.map_or(0, |p| p.p_vaddr) as usize;
        sys::VDSO_CLOCK_GETTIME.store(base + sym.st_value as usize - bias, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::maps::parse_maps_line;
    use super::*;

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
