//! The objects mapped in this process, and the functions they define.
//!
//! An object is a file with at least one executable mapping, identified like the kernel does it: by
//! device and inode, never by name (the same file reached through another path, or mapped twice, is
//! one object). Names only serve to match what the user typed: soname, file name, full path, or the
//! short name (`libc` for `libc.so.6`).

use std::collections::BTreeMap;
use std::io;

use goblin::elf::{program_header::PT_LOAD, sym, Elf};

/// A file's identity: (device, inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

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

pub fn read_maps() -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(text.lines().filter_map(parse_maps_line).collect())
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
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let me = self_file(maps);
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| m.is_exec()) {
        let Some(id) = m.file else { continue };
        if !m.path.starts_with('/') || seen.insert(id, ()).is_some() {
            continue;
        }
        let path = m.path.trim_end_matches(" (deleted)").to_string();
        out.push(LoadedObject {
            id,
            is_main: exe.as_deref().is_some_and(|e| e.as_os_str() == path.as_str()),
            is_self: Some(id) == me,
            path,
        });
    }
    out
}

/// The file libuprobe itself was loaded from.
fn self_file(maps: &[MapEntry]) -> Option<FileId> {
    let here = self_file as *const () as u64;
    maps.iter().find(|m| m.start <= here && here < m.end).and_then(|m| m.file)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Does the OBJECT part of a spec name this object? Full path, file name, soname, or short name
/// (`libc` matches `libc.so.6` and `libc-2.31.so`, not `libcrypto.so`).
pub fn object_matches(pattern: &str, path: &str, soname: Option<&str>) -> bool {
    if pattern.contains('/') {
        return pattern == path
            || std::fs::canonicalize(pattern).is_ok_and(|p| p.as_os_str() == path);
    }
    let name = file_name(path);
    if pattern == name || soname == Some(pattern) {
        return true;
    }
    [name, soname.unwrap_or("")].iter().any(|n| {
        n.strip_prefix(pattern).is_some_and(|rest| rest.starts_with(".so") || rest.starts_with('-'))
    })
}

/// A function symbol.
#[derive(Clone, Debug)]
pub struct FuncSym {
    pub name: String,
    /// `name@VERSION` (or `name@@VERSION` for the default version), from .gnu.version.
    pub versioned: Option<String>,
    pub vaddr: u64,
    pub size: u64,
    pub ifunc: bool,
    pub global: bool,
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// What libuprobe needs of an ELF file.
#[derive(Debug, Default)]
pub struct ElfInfo {
    pub soname: Option<String>,
    pub funcs: Vec<FuncSym>,
    pub segments: Vec<Segment>,
}

impl ElfInfo {
    pub fn load(path: &str) -> Result<ElfInfo, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let elf = Elf::parse(&bytes).map_err(|e| format!("{path} is not a valid ELF file: {e}"))?;
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
        let version_names = version_names(&elf);
        let mut funcs = Vec::new();
        for (i, s) in elf.dynsyms.iter().enumerate() {
            let Some(name) = elf.dynstrtab.get_at(s.st_name) else {
                continue;
            };
            let Some(mut f) = func_sym(&s, name) else {
                continue;
            };
            if let Some(vs) = elf.versym.as_ref().and_then(|v| v.get_at(i)) {
                if let Some(v) = version_names.get(&vs.version()) {
                    let sep = if vs.is_hidden() { "@" } else { "@@" };
                    f.versioned = Some(format!("{name}{sep}{v}"));
                }
            }
            funcs.push(f);
        }
        for s in elf.syms.iter() {
            let Some(name) = elf.strtab.get_at(s.st_name) else {
                continue;
            };
            if let Some(f) = func_sym(&s, name) {
                if !funcs.iter().any(|g| g.name == f.name && g.vaddr == f.vaddr) {
                    funcs.push(f);
                }
            }
        }
        Ok(ElfInfo { soname: elf.soname.map(str::to_string), funcs, segments })
    }

    /// File offset of virtual address `vaddr` in an executable segment.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.exec && vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            .map(|s| vaddr - s.vaddr + s.offset)
    }

    /// The function containing `vaddr`, if any.
    pub fn func_containing(&self, vaddr: u64) -> Option<&FuncSym> {
        self.funcs.iter().find(|f| !f.ifunc && vaddr >= f.vaddr && vaddr < f.vaddr + f.size.max(1))
    }
}

fn func_sym(s: &sym::Sym, name: &str) -> Option<FuncSym> {
    let ty = s.st_type();
    let ifunc = ty == sym::STT_GNU_IFUNC;
    if !(ty == sym::STT_FUNC || ifunc) || s.st_shndx == 0 || s.st_value == 0 || name.is_empty() {
        return None;
    }
    Some(FuncSym {
        name: name.to_string(),
        versioned: None,
        vaddr: s.st_value,
        size: s.st_size,
        ifunc,
        global: s.st_bind() != sym::STB_LOCAL,
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
