//! From a spec and the mapped objects to sites: which objects the spec names, which functions (or
//! instructions) in them, at which file offsets; refusing, with a message, what cannot be probed
//! safely. Nothing here writes anything.

mod boundary;
mod ifunc;
pub mod refuse;

use std::sync::Arc;

use crate::error::ProbeError;
use crate::objects::{self, ElfError, ElfFile, FileId, FuncSym, LoadedObject, MapEntry};
use crate::spec::{self, Spec, Target};

/// A site's key, as the kernel's: (file, offset of the probed instruction in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteKey {
    pub file: FileId,
    pub offset: u64,
}

/// One place a spec resolved to.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// How the user sees it: `name`, or `name+0xOFF` inside a function, or the address.
    pub symbol: String,
    pub key: SiteKey,
    /// The path of the site's file.
    pub path: String,
}

/// A function (or instruction) a spec matched that cannot be probed, and why.
#[derive(Clone, Debug)]
pub struct Failure {
    pub object: String,
    pub symbol: String,
    pub error: ProbeError,
}

/// Why a spec cannot be resolved in an object yet.
pub enum NotYet {
    /// It needs an IFUNC resolved, which must wait until the object is relocated.
    Ifunc,
}

/// The resolver: the ELF files read so far, by identity.
#[derive(Default)]
pub struct Resolver {
    files: crate::runtime::hash::FastMap<FileId, Arc<ElfFile>>,
}

impl Resolver {
    /// The ELF file mapped as `obj`.
    pub fn elf(&mut self, obj: &LoadedObject, maps: &[MapEntry]) -> Result<Arc<ElfFile>, ElfError> {
        if let Some(e) = self.files.get(&obj.id) {
            return Ok(e.clone());
        }
        let e = Arc::new(ElfFile::open(&obj.path, obj.id, maps)?);
        self.files.insert(obj.id, e.clone());
        Ok(e)
    }

    /// The ELF file of `id`, if read already.
    pub fn cached(&self, id: FileId) -> Option<Arc<ElfFile>> {
        self.files.get(&id).cloned()
    }

    /// Forget files no longer mapped (a later mapping of the same inode reads it again).
    pub fn forget_unmapped(&mut self, maps: &[MapEntry]) {
        self.files.retain(|id, _| maps.iter().any(|m| m.file == Some(*id)));
    }

    /// The objects the OBJECT part of a spec names: by path or file name, else by soname.
    pub fn matching_objects(
        &mut self,
        pattern: &str,
        objects: &[LoadedObject],
        maps: &[MapEntry],
    ) -> Vec<LoadedObject> {
        // The main program also goes by the name it was started as (a symbolic link's).
        let named = |o: &LoadedObject| {
            objects::object_matches(pattern, &o.path, None)
                || (o.is_main
                    && !pattern.contains('/')
                    && objects::main_aliases()
                        .iter()
                        .any(|a| objects::object_matches(pattern, a, None)))
        };
        let by_name: Vec<_> = objects.iter().filter(|o| named(o)).cloned().collect();
        if !by_name.is_empty() {
            return by_name;
        }
        objects
            .iter()
            .filter(|o| {
                let soname = self.elf(o, maps).ok().and_then(|e| e.soname.clone());
                soname.is_some() && objects::object_matches(pattern, &o.path, soname.as_deref())
            })
            .cloned()
            .collect()
    }

    /// The sites `spec` names in `obj`. With `in_loader` (the loader is mapping objects and has
    /// not relocated them), a spec that needs an IFUNC resolved is left for later.
    pub fn resolve(
        &mut self,
        spec: &Spec,
        obj: &LoadedObject,
        maps: &[MapEntry],
        in_loader: bool,
    ) -> Result<Vec<Result<Resolved, Failure>>, NotYet> {
        let fail =
            |symbol: String, error: ProbeError| Failure { object: obj.path.clone(), symbol, error };
        if obj.is_self {
            return Ok(vec![Err(fail(spec.symbol_text(), ProbeError::SelfProbe))]);
        }
        let elf = match self.elf(obj, maps) {
            Ok(e) => e,
            Err(e) => return Ok(vec![Err(fail(spec.symbol_text(), e.into()))]),
        };
        let site = |offset| SiteKey { file: obj.id, offset };
        match &spec.target {
            Target::Address(vaddr) => {
                let r = self.resolve_address(spec, obj, &elf, *vaddr, maps);
                Ok(vec![r
                    .map(|(symbol, off)| Resolved {
                        symbol,
                        key: site(off),
                        path: obj.path.clone(),
                    })
                    .map_err(|e| fail(format!("{vaddr:#x}"), e))])
            }
            Target::Symbol { pattern, offset } => {
                let matches: Vec<FuncSym> =
                    elf.funcs.iter().filter(|f| symbol_matches(pattern, f)).collect();
                if matches.is_empty() {
                    let e = ProbeError::NoFunction {
                        pattern: spec::shorten(pattern).into_owned(),
                        object: obj.path.clone(),
                    };
                    return Ok(vec![Err(fail(pattern.clone(), e))]);
                }
                // Aliases (malloc, __libc_malloc, ...) share an address: one site, one name. The
                // symbols are sorted by address, so aliases are neighbours.
                let mut out: Vec<Result<Resolved, Failure>> = Vec::with_capacity(matches.len());
                // Two symbols may resolve to one site (an IFUNC and its implementation).
                let mut keys = std::collections::HashSet::with_capacity(matches.len());
                for names in matches.chunk_by(|a, b| a.vaddr == b.vaddr) {
                    // The name as typed first, then global ones, without underscores, short.
                    let Some(&f) = names.iter().min_by_key(|f| {
                        (
                            *f.name != **pattern,
                            !f.global,
                            f.name.starts_with('_'),
                            f.name.len(),
                            f.name,
                        )
                    }) else {
                        continue; // (a chunk is never empty)
                    };
                    if spec.ret {
                        let aliases: Vec<&str> = elf.funcs_at(f.vaddr).map(|g| g.name).collect();
                        if let Some(why) = refuse::return_refused(&aliases) {
                            let e = ProbeError::ReturnRefused { symbol: f.name.to_string(), why };
                            out.push(Err(fail(f.name.to_string(), e)));
                            continue;
                        }
                    }
                    if f.ifunc && in_loader {
                        return Err(NotYet::Ifunc);
                    }
                    match self.resolve_function(obj, &elf, &f, *offset, maps) {
                        Ok(r) if !keys.insert(r.key) => {}
                        Ok(r) => out.push(Ok(r)),
                        Err(e) => out.push(Err(fail(f.name.to_string(), e))),
                    }
                }
                Ok(out)
            }
        }
    }

    /// `OBJECT:0xADDRESS`: a file virtual address, on an instruction boundary.
    fn resolve_address(
        &mut self,
        spec: &Spec,
        obj: &LoadedObject,
        elf: &ElfFile,
        vaddr: u64,
        maps: &[MapEntry],
    ) -> Result<(String, u64), ProbeError> {
        let off = elf
            .file_offset(vaddr)
            .ok_or_else(|| ProbeError::NotExecutable { addr: vaddr, object: obj.path.clone() })?;
        match elf.func_containing(vaddr) {
            Some(f) => {
                let start = elf.file_offset(f.vaddr).unwrap_or(off);
                if spec.ret {
                    if vaddr != f.vaddr {
                        let place = format!("`{}`+{:#x}", f.name, vaddr - f.vaddr);
                        return Err(ProbeError::ReturnNotEntry { addr: vaddr, place });
                    }
                    let aliases: Vec<&str> = elf.funcs_at(vaddr).map(|g| g.name).collect();
                    if let Some(why) = refuse::return_refused(&aliases) {
                        return Err(ProbeError::ReturnRefused { symbol: f.name.to_string(), why });
                    }
                }
                boundary::check(elf, start, f.size, off - start, f.name)?;
                let _ = maps;
                Ok((format!("{}+{:#x}", f.name, vaddr - f.vaddr), off))
            }
            None => {
                if spec.ret {
                    let place = "outside every function symbol".to_string();
                    return Err(ProbeError::ReturnNotEntry { addr: vaddr, place });
                }
                boundary::check_outside_symbols(elf, vaddr, &obj.path)?;
                Ok((format!("{vaddr:#x}"), off))
            }
        }
    }

    fn resolve_function(
        &mut self,
        obj: &LoadedObject,
        elf: &ElfFile,
        f: &FuncSym,
        offset: u64,
        maps: &[MapEntry],
    ) -> Result<Resolved, ProbeError> {
        let (file, path, start, size, target_elf) = if f.ifunc {
            // Probe the implementation the process actually calls, not the resolver.
            let addr = ifunc::resolve(obj, elf, f, maps).ok_or_else(|| ProbeError::Ifunc {
                symbol: f.name.to_string(),
                object: obj.path.clone(),
            })?;
            let m = objects::maps::find(maps, addr);
            let m = match m {
                Some(m) if m.file.is_some() && m.path.starts_with('/') => m,
                Some(m) => {
                    let what = if m.path.is_empty() { "anonymous memory" } else { m.path.as_str() };
                    return Err(ProbeError::NotAFile {
                        symbol: f.name.to_string(),
                        addr,
                        what: what.to_string(),
                    });
                }
                None => {
                    return Err(ProbeError::NotAFile {
                        symbol: f.name.to_string(),
                        addr,
                        what: "unmapped memory".into(),
                    })
                }
            };
            let file = m.file.ok_or_else(|| ProbeError::Ifunc {
                symbol: f.name.to_string(),
                object: obj.path.clone(),
            })?;
            let off = m.offset_of(addr).unwrap_or(0);
            let impl_obj = LoadedObject {
                id: file,
                path: m.path.trim_end_matches(" (deleted)").to_string(),
                is_main: false,
                is_self: false,
            };
            let impl_elf = self.elf(&impl_obj, maps)?;
            // The implementation's size, when its own symbol is known.
            let size = impl_elf
                .vaddr_of(off)
                .and_then(|v| impl_elf.funcs_at(v).find(|g| !g.ifunc).map(|g| g.size))
                .unwrap_or(0);
            (file, impl_obj.path, off, size, impl_elf)
        } else {
            let off = elf.file_offset(f.vaddr).ok_or_else(|| ProbeError::SymbolNotExecutable {
                symbol: f.name.to_string(),
                object: obj.path.clone(),
            })?;
            (obj.id, obj.path.clone(), off, f.size, self.elf(obj, maps)?)
        };
        if offset != 0 {
            boundary::check(&target_elf, start, size, offset, f.name)?;
        }
        let symbol =
            if offset == 0 { f.name.to_string() } else { format!("{}+{offset:#x}", f.name) };
        Ok(Resolved { symbol, key: SiteKey { file, offset: start + offset }, path })
    }
}

fn symbol_matches(pattern: &str, f: &FuncSym) -> bool {
    if pattern.contains('@') {
        let Some(v) = f.versioned else { return false };
        // `name@V` also matches the default version `name@@V`.
        return spec::glob_match(pattern, v)
            || spec::glob_match(pattern, &v.replacen("@@", "@", 1));
    }
    spec::glob_match(pattern, f.name)
}
