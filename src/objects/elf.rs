//! What libuprobe reads of an ELF file: its function symbols, segments and executable sections,
//! and its code bytes, from the very file that is mapped (checked by device and inode: a file
//! replaced on disk since it was mapped is read through `/proc/self/map_files`, or refused).
//! Instructions are always decoded from these bytes, never from memory another probe may have
//! patched.

use std::collections::BTreeMap;

use goblin::elf::{program_header::PT_LOAD, section_header::SHF_EXECINSTR, sym, Elf};

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
/// libc's first mapping could find it).
type Bytes = Vec<u8>;

/// An ELF file as libuprobe needs it.
pub struct ElfFile {
    pub path: String,
    pub soname: Option<String>,
    /// Sorted by address.
    pub funcs: Vec<FuncSym>,
    pub segments: Vec<Segment>,
    pub exec_sections: Vec<Section>,
    bytes: Bytes,
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
        let (fd, _opened) = open_mapped(path, id, maps)?;
        let bytes =
            fd.read_to_end().map_err(|errno| ElfError::Read { path: path.to_string(), errno })?;
        Self::parse(path, bytes)
    }

    /// Read an ELF file by path (no identity check: for files that are not mapped).
    pub fn open_path(path: &str) -> Result<ElfFile, ElfError> {
        let read_err = |errno| ElfError::Read { path: path.to_string(), errno };
        let fd = Fd::open(path, libc::O_RDONLY).map_err(read_err)?;
        Self::parse(path, fd.read_to_end().map_err(read_err)?)
    }

    fn parse(path: &str, bytes: Bytes) -> Result<ElfFile, ElfError> {
        let data: &[u8] = &bytes;
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
            let Some(mut f) = func_sym(&s, name) else { continue };
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
        for s in elf.syms.iter() {
            let Some(name) = elf.strtab.get_at(s.st_name) else { continue };
            if let Some(f) = func_sym(&s, name) {
                if seen.insert((f.name.clone(), f.vaddr)) {
                    funcs.push(f);
                }
            }
        }
        funcs.sort_by(|a, b| a.vaddr.cmp(&b.vaddr).then_with(|| a.name.cmp(&b.name)));
        let soname = elf.soname.map(str::to_string);
        drop(elf);
        Ok(ElfFile { path: path.to_string(), soname, funcs, segments, exec_sections, bytes })
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        &self.bytes
    }

    /// Up to `len` bytes of the file at offset `off`.
    pub fn bytes_at(&self, off: u64, len: usize) -> &[u8] {
        let data = self.data();
        let start = (off as usize).min(data.len());
        &data[start..(start + len).min(data.len())]
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
    pub fn func_containing(&self, vaddr: u64) -> Option<&FuncSym> {
        let i = self.funcs.partition_point(|f| f.vaddr <= vaddr);
        self.funcs[..i]
            .iter()
            .rev()
            .take_while(|f| f.vaddr + 0x10_0000 > vaddr)
            .find(|f| !f.ifunc && vaddr >= f.vaddr && vaddr < f.vaddr + f.size.max(1))
    }

    /// Every function symbol at exactly `vaddr`.
    pub fn funcs_at(&self, vaddr: u64) -> impl Iterator<Item = &FuncSym> {
        let i = self.funcs.partition_point(|f| f.vaddr < vaddr);
        self.funcs[i..].iter().take_while(move |f| f.vaddr == vaddr)
    }

    /// The executable section holding `vaddr`.
    pub fn section_containing(&self, vaddr: u64) -> Option<&Section> {
        self.exec_sections.iter().find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.size)
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
