//! The global probe tree, keyed like the kernel's: (device, inode, file offset) of the probed
//! instruction. One site per key, however many probes (consumers) ask for it and whatever name they
//! used; each site keeps the original byte and the resume plan of every mapping it is installed in.
//!
//! All writers go through one mutex ([`with_registry`]); the trap path never takes it and sees the
//! sites only through the table published by [`Registry::publish`].
//!
//! Order of operations (see DESIGN.md, "Invariants"):
//! - register: publish the site in the table first, then write `int3` (a trap must always find its
//!   site); if any write fails, restore every byte this call wrote and unpublish;
//! - unregister of the last consumer: restore the original bytes first, then republish. The address
//!   stays in the table as a tombstone (no consumers), so that a thread that trapped just before the
//!   restore still knows the trap was ours; it finds the original instruction and re-executes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::objects::{self, ElfInfo, FileId, LoadedObject, MapEntry};
use crate::spec::{self, Spec, Target};
use crate::sys;
use crate::trap::{self, Consumer, Table, TableEntry};
use crate::xol::{self, Resume, XolAreas};

pub type ProbeId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// Breakpoints are in every mapping of the site.
    Active,
    /// Its object is not loaded (yet).
    Pending,
    /// Could not be set up; `error` says why.
    Failed,
}

impl ProbeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeState::Active => "active",
            ProbeState::Pending => "pending",
            ProbeState::Failed => "failed",
        }
    }
}

/// What the user sees of a probe.
#[derive(Clone, Debug)]
pub struct ProbeInfo {
    pub id: ProbeId,
    pub spec: String,
    pub object: String,
    pub symbol: String,
    /// File offset of the probed instruction.
    pub offset: Option<u64>,
    pub state: ProbeState,
    pub error: Option<String>,
    pub hits: u64,
}

struct Probe {
    id: ProbeId,
    spec: String,
    object: String,
    symbol: String,
    state: ProbeState,
    error: Option<String>,
    site: Option<SiteKey>,
    consumer: Arc<Consumer>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SiteKey {
    file: FileId,
    offset: u64,
}

/// A breakpoint in one mapping.
#[derive(Clone, Copy)]
struct Install {
    addr: u64,
    orig: u8,
    prot: i32,
    resume: Resume,
}

struct Site {
    consumers: Vec<(ProbeId, Arc<Consumer>)>,
    installs: Vec<Install>,
}

/// A failure to set up one probe, with the message the user sees.
#[derive(Clone, Debug)]
pub struct ProbeError {
    pub spec: String,
    pub message: String,
}

#[derive(Default)]
pub struct Registry {
    probes: Vec<Probe>,
    sites: BTreeMap<SiteKey, Site>,
    /// Removed breakpoints, by address: kept in the table so that a late trap resumes correctly.
    tombstones: BTreeMap<u64, Resume>,
    /// Resume plans by (address, original bytes): re-registering a site reuses its XOL slot, so
    /// add/remove cycles do not consume slots.
    resumes: HashMap<(u64, [u8; 16]), Resume>,
    xol: XolAreas,
    elf: HashMap<FileId, Arc<ElfInfo>>,
    next_id: ProbeId,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// Run `f` with the registry locked. The only way to reach it; never called on the trap path.
pub fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut guard: MutexGuard<'_, Option<Registry>> =
        REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(Registry::default))
}

/// A function a spec matched that cannot be probed, and why.
struct Unresolved {
    symbol: String,
    message: String,
}

/// One resolved place to probe, before it has a site.
struct Resolved {
    symbol: String,
    key: SiteKey,
    path: String,
}

impl Registry {
    /// Register every probe `text` names. Returns the ids created (failed and pending ones
    /// included) and the problems found, each with a message for the user.
    pub fn register(&mut self, text: &str) -> (Vec<ProbeId>, Vec<ProbeError>) {
        let spec = match spec::parse(text) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                let id = self.add_probe(text, "", "", ProbeState::Failed, Some(msg.clone()), None);
                return (vec![id], vec![ProbeError { spec: text.trim().into(), message: msg }]);
            }
        };
        let maps = objects::read_maps().unwrap_or_default();
        let objects = objects::loaded_objects(&maps);
        let matching = self.matching_objects(&spec.object, &objects);
        if matching.is_empty() {
            let id = self.add_probe(
                &spec.text,
                &spec.object,
                &spec.symbol_text(),
                ProbeState::Pending,
                None,
                None,
            );
            return (vec![id], vec![]);
        }
        let mut ids = Vec::new();
        let mut errors = Vec::new();
        // (object, symbol, message) of each probe that could not be set up.
        let mut failed: Vec<(String, String, String)> = Vec::new();
        let mut resolved = Vec::new();
        for obj in &matching {
            if obj.is_self {
                failed.push((
                    obj.path.clone(),
                    spec.symbol_text(),
                    "libuprobe does not probe itself".into(),
                ));
                continue;
            }
            match self.resolve(&spec, obj, &maps) {
                Ok(outcomes) => {
                    for o in outcomes {
                        match o {
                            Ok(r) => resolved.push(r),
                            Err(u) => failed.push((obj.path.clone(), u.symbol, u.message)),
                        }
                    }
                }
                Err(message) => failed.push((obj.path.clone(), spec.symbol_text(), message)),
            }
        }
        // Plan every new site, publish them all at once, then write the breakpoints.
        let mut planned = Vec::new();
        for r in resolved {
            let site_known = self.sites.contains_key(&r.key);
            let plan = if site_known { Ok(None) } else { self.plan_site(r.key, &maps).map(Some) };
            match plan {
                Ok(installs) => {
                    let consumer = Arc::new(Consumer::default());
                    let id = self.add_probe(
                        &spec.text,
                        &r.path,
                        &r.symbol,
                        ProbeState::Active,
                        None,
                        Some((r.key, consumer.clone())),
                    );
                    let site = self.sites.entry(r.key).or_insert_with(|| Site {
                        consumers: Vec::new(),
                        installs: installs.clone().unwrap_or_default(),
                    });
                    site.consumers.push((id, consumer));
                    if let Some(installs) = installs {
                        for i in &installs {
                            self.tombstones.remove(&i.addr);
                        }
                        planned.push((id, r.key, installs));
                    }
                    ids.push(id);
                }
                Err(message) => failed.push((r.path, r.symbol, message)),
            }
        }
        for (object, symbol, message) in failed {
            ids.push(self.add_probe(
                &spec.text,
                &object,
                &symbol,
                ProbeState::Failed,
                Some(message.clone()),
                None,
            ));
            errors.push(ProbeError { spec: spec.text.clone(), message });
        }
        if !planned.is_empty() || !ids.is_empty() {
            self.publish();
        }
        let mut undone = false;
        for (id, key, installs) in planned {
            if let Err(message) = write_breakpoints(&installs) {
                self.sites.remove(&key);
                if let Some(p) = self.probes.iter_mut().find(|p| p.id == id) {
                    p.state = ProbeState::Failed;
                    p.error = Some(message.clone());
                    p.site = None;
                }
                errors.push(ProbeError { spec: spec.text.clone(), message });
                undone = true;
            }
        }
        if undone {
            self.publish();
        }
        (ids, errors)
    }

    /// Unregister probe `id`. When it was the last consumer of its site, the original bytes are back
    /// in every mapping when this returns.
    pub fn unregister(&mut self, id: ProbeId) -> bool {
        let Some(pos) = self.probes.iter().position(|p| p.id == id) else {
            return false;
        };
        let probe = self.probes.remove(pos);
        if let Some(key) = probe.site {
            if let Some(site) = self.sites.get_mut(&key) {
                site.consumers.retain(|(cid, _)| *cid != id);
                if site.consumers.is_empty() {
                    let site = self.sites.remove(&key).expect("site present");
                    restore_breakpoints(&site.installs);
                    for i in &site.installs {
                        self.tombstones.insert(i.addr, i.resume);
                    }
                }
            }
            self.publish();
        }
        true
    }

    /// Every probe, in id order, with its hits now.
    pub fn snapshot(&self) -> Vec<ProbeInfo> {
        self.probes
            .iter()
            .map(|p| ProbeInfo {
                id: p.id,
                spec: p.spec.clone(),
                object: p.object.clone(),
                symbol: p.symbol.clone(),
                offset: p.site.map(|k| k.offset),
                state: p.state,
                error: p.error.clone(),
                hits: p.consumer.hits.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect()
    }

    /// Bytes of XOL memory mapped so far.
    pub fn xol_bytes(&self) -> u64 {
        self.xol.mapped_bytes()
    }

    fn add_probe(
        &mut self,
        spec: &str,
        object: &str,
        symbol: &str,
        state: ProbeState,
        error: Option<String>,
        site: Option<(SiteKey, Arc<Consumer>)>,
    ) -> ProbeId {
        self.next_id += 1;
        let (site, consumer) = match site {
            Some((k, c)) => (Some(k), c),
            None => (None, Arc::new(Consumer::default())),
        };
        self.probes.push(Probe {
            id: self.next_id,
            spec: spec.trim().to_string(),
            object: object.to_string(),
            symbol: symbol.to_string(),
            state,
            error,
            site,
            consumer,
        });
        self.next_id
    }

    fn elf_info(&mut self, obj: &LoadedObject) -> Result<Arc<ElfInfo>, String> {
        if let Some(e) = self.elf.get(&obj.id) {
            return Ok(e.clone());
        }
        let e = Arc::new(ElfInfo::load(&obj.path)?);
        self.elf.insert(obj.id, e.clone());
        Ok(e)
    }

    fn matching_objects(&mut self, pattern: &str, objects: &[LoadedObject]) -> Vec<LoadedObject> {
        let by_name: Vec<_> = objects
            .iter()
            .filter(|o| objects::object_matches(pattern, &o.path, None))
            .cloned()
            .collect();
        if !by_name.is_empty() {
            return by_name;
        }
        objects
            .iter()
            .filter(|o| {
                let soname = self.elf_info(o).ok().and_then(|e| e.soname.clone());
                soname.is_some() && objects::object_matches(pattern, &o.path, soname.as_deref())
            })
            .cloned()
            .collect()
    }

    /// The sites `spec` names in `obj`.
    fn resolve(
        &mut self,
        spec: &Spec,
        obj: &LoadedObject,
        maps: &[MapEntry],
    ) -> Result<Vec<Result<Resolved, Unresolved>>, String> {
        let elf = self.elf_info(obj)?;
        let site = |offset| SiteKey { file: obj.id, offset };
        match &spec.target {
            Target::Address(vaddr) => {
                let off = elf.file_offset(*vaddr).ok_or_else(|| {
                    format!("{vaddr:#x} is not in an executable segment of {}", obj.path)
                })?;
                let symbol = match elf.func_containing(*vaddr) {
                    Some(f) => {
                        let start = elf.file_offset(f.vaddr).unwrap_or(off);
                        self.check_boundary(obj, maps, start, f.size, off - start, &f.name)?;
                        format!("{}+{:#x}", f.name, vaddr - f.vaddr)
                    }
                    None => format!("{vaddr:#x}"),
                };
                Ok(vec![Ok(Resolved { symbol, key: site(off), path: obj.path.clone() })])
            }
            Target::Symbol { pattern, offset } => {
                let matches: Vec<_> =
                    elf.funcs.iter().filter(|f| symbol_matches(pattern, f)).collect();
                if matches.is_empty() {
                    return Err(format!("no function matching `{pattern}` in {}", obj.path));
                }
                // Aliases (malloc, __libc_malloc, ...) share an address: one site, one name.
                let mut by_addr: BTreeMap<u64, Vec<&objects::FuncSym>> = BTreeMap::new();
                for f in matches {
                    by_addr.entry(f.vaddr).or_default().push(f);
                }
                let mut out: Vec<Result<Resolved, Unresolved>> = Vec::new();
                for (_, mut names) in by_addr {
                    names.sort_by_key(|f| {
                        (
                            f.name != *pattern,
                            !f.global,
                            f.name.starts_with('_'),
                            f.name.len(),
                            f.name.clone(),
                        )
                    });
                    let f = names[0];
                    if let Some(e) = refused_in_libc(obj, &names) {
                        out.push(Err(Unresolved { symbol: f.name.clone(), message: e }));
                        continue;
                    }
                    match self.resolve_function(obj, &elf, f, *offset, maps) {
                        Ok(r) if out.iter().any(|o| o.as_ref().is_ok_and(|o| o.key == r.key)) => {}
                        Ok(r) => out.push(Ok(r)),
                        Err(message) => {
                            out.push(Err(Unresolved { symbol: f.name.clone(), message }))
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    fn resolve_function(
        &mut self,
        obj: &LoadedObject,
        elf: &ElfInfo,
        f: &objects::FuncSym,
        offset: u64,
        maps: &[MapEntry],
    ) -> Result<Resolved, String> {
        let (file, path, start, size) = if f.ifunc {
            // Probe the implementation the process actually calls, not the resolver.
            let addr = resolve_ifunc(obj, f)
                .ok_or_else(|| format!("cannot resolve IFUNC `{}` in {}", f.name, obj.path))?;
            let m = maps.iter().find(|m| m.start <= addr && addr < m.end);
            let m = match m {
                Some(m) if m.file.is_some() => m,
                Some(m) => {
                    return Err(format!(
                        "IFUNC `{}` resolves to {addr:#x} in {}, which is not a file: only files can be probed",
                        f.name,
                        if m.path.is_empty() { "anonymous memory" } else { m.path.as_str() }
                    ))
                }
                None => return Err(format!("IFUNC `{}` resolved to unmapped {addr:#x}", f.name)),
            };
            let off = addr - m.start + m.offset;
            // The implementation's size, when its own symbol is known.
            let impl_elf = if m.file == Some(obj.id) { Some(elf) } else { None };
            let size = impl_elf
                .and_then(|e| {
                    e.funcs
                        .iter()
                        .find(|g| !g.ifunc && e.file_offset(g.vaddr) == Some(off))
                        .map(|g| g.size)
                })
                .unwrap_or(0);
            (m.file.expect("checked"), m.path.clone(), off, size)
        } else {
            let off = elf.file_offset(f.vaddr).ok_or_else(|| {
                format!("`{}` is not in an executable segment of {}", f.name, obj.path)
            })?;
            (obj.id, obj.path.clone(), off, f.size)
        };
        let fobj = LoadedObject { id: file, path: path.clone(), is_main: false, is_self: false };
        if offset != 0 {
            self.check_boundary(&fobj, maps, start, size, offset, &f.name)?;
        }
        let symbol = if offset == 0 { f.name.clone() } else { format!("{}+{offset:#x}", f.name) };
        Ok(Resolved { symbol, key: SiteKey { file, offset: start + offset }, path })
    }

    /// Check that `offset` into the function at file offset `start` is an instruction boundary,
    /// decoding from the function's start.
    fn check_boundary(
        &self,
        obj: &LoadedObject,
        maps: &[MapEntry],
        start: u64,
        size: u64,
        offset: u64,
        name: &str,
    ) -> Result<(), String> {
        if offset == 0 {
            return Ok(());
        }
        if size != 0 && offset >= size {
            return Err(format!(
                "offset {offset:#x} is past the end of `{name}` ({size:#x} bytes)"
            ));
        }
        let m = maps
            .iter()
            .find(|m| m.file == Some(obj.id) && m.is_exec() && m.addr_of(start).is_some())
            .ok_or_else(|| format!("`{name}` is not mapped executable"))?;
        let addr = m.addr_of(start).expect("checked");
        let len = (if size != 0 { size } else { offset + 16 }).min(m.end - addr);
        let code = self.clean_read(addr, len as usize);
        let mut decoder = iced_x86::Decoder::with_ip(64, &code, 0, iced_x86::DecoderOptions::NONE);
        let mut prev = 0u64;
        while decoder.can_decode() {
            let at = decoder.ip();
            if at == offset {
                return Ok(());
            }
            if at > offset {
                return Err(format!(
                    "offset {offset:#x} is not an instruction boundary of `{name}`: the nearest are +{prev:#x} and +{at:#x}"
                ));
            }
            prev = at;
            let _ = decoder.decode();
        }
        Err(format!("offset {offset:#x} is not an instruction boundary of `{name}`: the last instruction starts at +{prev:#x}"))
    }

    /// Read program text with our own breakpoints replaced by the bytes they displaced.
    fn clean_read(&self, addr: u64, len: usize) -> Vec<u8> {
        // SAFETY: callers pass a range inside one readable, executable mapping.
        let mut v = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        for site in self.sites.values() {
            for i in &site.installs {
                if i.addr >= addr && i.addr < addr + len as u64 {
                    v[(i.addr - addr) as usize] = i.orig;
                }
            }
        }
        v
    }

    /// Decide how the instruction at `key` resumes in every mapping of its file.
    fn plan_site(&mut self, key: SiteKey, maps: &[MapEntry]) -> Result<Vec<Install>, String> {
        let mut installs = Vec::new();
        for m in maps.iter().filter(|m| m.file == Some(key.file) && m.is_exec()) {
            let Some(addr) = m.addr_of(key.offset) else {
                continue;
            };
            if m.shared {
                return Err(format!(
                    "{} is mapped shared at {:#x}: a breakpoint would be written to the file",
                    m.path, m.start
                ));
            }
            if m.prot & libc::PROT_READ == 0 {
                return Err(format!("{} is mapped execute-only at {:#x}", m.path, m.start));
            }
            let avail = (m.end - addr).min(16) as usize;
            let mut bytes = [0u8; 16];
            bytes[..avail].copy_from_slice(&self.clean_read(addr, avail));
            if bytes[0] == 0xcc {
                return Err(format!(
                    "there is already an int3 at {addr:#x} (the program's own breakpoint?)"
                ));
            }
            let resume = match self.resumes.get(&(addr, bytes)) {
                Some(r) => *r,
                None => {
                    let d = xol::decode(&bytes[..avail], addr).map_err(|e| e.to_string())?;
                    let r = match d.emu {
                        Some(emu) => Resume::Emulate(emu),
                        None => Resume::Xol {
                            slot: self.xol.install(&d, addr).map_err(|e| e.to_string())?,
                        },
                    };
                    self.resumes.insert((addr, bytes), r);
                    r
                }
            };
            installs.push(Install { addr, orig: bytes[0], prot: m.prot, resume });
        }
        if installs.is_empty() {
            return Err(format!("file offset {:#x} is not mapped executable", key.offset));
        }
        Ok(installs)
    }

    /// Give the trap path a new table built from the current sites and tombstones.
    fn publish(&self) {
        let mut table = Table::default();
        for site in self.sites.values() {
            let first = table.consumers.len() as u32;
            table.consumers.extend(site.consumers.iter().map(|(_, c)| c.clone()));
            let count = site.consumers.len() as u32;
            for i in &site.installs {
                table.entries.push(TableEntry { addr: i.addr, resume: i.resume, first, count });
            }
        }
        for (&addr, &resume) in &self.tombstones {
            table.entries.push(TableEntry { addr, resume, first: 0, count: 0 });
        }
        table.entries.sort_by_key(|e| (e.addr, e.count == 0));
        table.entries.dedup_by_key(|e| e.addr);
        trap::publish(table);
    }
}

/// Functions that glibc itself calls while every signal is blocked by a raw system call (a new
/// thread before `start_thread` restores its mask; a `posix_spawn` child before it execs). A
/// breakpoint there is fatal: the kernel kills a process whose synchronous SIGTRAP is blocked.
const RUN_WITH_SIGNALS_BLOCKED: &[&str] = &[
    // start_thread, before the new thread's mask is restored
    "__ctype_init",
    "_setjmp",
    "__sigsetjmp",
    // start_thread's exit path, after it blocks every signal again
    "__getpagesize",
    "__madvise",
    // lock slow paths taken in both windows when contended
    "__lll_lock_wait_private",
    "__lll_lock_wake_private",
    // the posix_spawn child resets dispositions with every signal blocked
    "__libc_sigaction",
];

fn refused_in_libc(obj: &LoadedObject, names: &[&objects::FuncSym]) -> Option<String> {
    let libc = obj
        .path
        .rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"));
    let f = names.iter().find(|f| RUN_WITH_SIGNALS_BLOCKED.contains(&f.name.as_str()))?;
    libc.then(|| {
        format!(
            "`{}` is refused: glibc runs it with every signal blocked, where a breakpoint would kill the process",
            f.name
        )
    })
}

fn symbol_matches(pattern: &str, f: &objects::FuncSym) -> bool {
    if pattern.contains('@') {
        let Some(v) = &f.versioned else { return false };
        // `name@V` also matches the default version `name@@V`.
        return spec::glob_match(pattern, v)
            || spec::glob_match(pattern, &v.replacen("@@", "@", 1));
    }
    spec::glob_match(pattern, &f.name)
}

/// The address an IFUNC resolves to in this process, as the dynamic linker would bind it.
fn resolve_ifunc(obj: &LoadedObject, f: &objects::FuncSym) -> Option<u64> {
    let path = std::ffi::CString::new(obj.path.as_str()).ok()?;
    let name = std::ffi::CString::new(f.name.as_str()).ok()?;
    // SAFETY: RTLD_NOLOAD only returns a handle to an object that is already loaded; dlsym and
    // dlclose are called with that handle and NUL-terminated names.
    unsafe {
        let h = if obj.is_main {
            libc::dlopen(core::ptr::null(), libc::RTLD_LAZY)
        } else {
            libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD)
        };
        if h.is_null() {
            return None;
        }
        let version = f
            .versioned
            .as_deref()
            .and_then(|v| v.split('@').next_back())
            .map(|v| std::ffi::CString::new(v).ok());
        let p = match version {
            Some(Some(v)) if !v.as_bytes().is_empty() => {
                let p = libc::dlvsym(h, name.as_ptr(), v.as_ptr());
                if p.is_null() {
                    libc::dlsym(h, name.as_ptr())
                } else {
                    p
                }
            }
            _ => libc::dlsym(h, name.as_ptr()),
        };
        libc::dlclose(h);
        (!p.is_null()).then_some(p as u64)
    }
}

/// Write `int3` at every install; on failure, restore those already written.
fn write_breakpoints(installs: &[Install]) -> Result<(), String> {
    for (n, i) in installs.iter().enumerate() {
        if let Err(e) = poke(i.addr, 0xcc, i.prot) {
            restore_breakpoints(&installs[..n]);
            return Err(format!("cannot write a breakpoint at {:#x}: mprotect: {e}", i.addr));
        }
    }
    Ok(())
}

fn restore_breakpoints(installs: &[Install]) {
    for i in installs {
        let _ = poke(i.addr, i.orig, i.prot);
    }
}

/// Write one byte of text: the page is made writable (keeping PROT_EXEC, since other threads may be
/// running on it) only for the write, then given back its original protection.
fn poke(addr: u64, byte: u8, prot: i32) -> Result<(), sys::Errno> {
    let page = sys::page_size() as u64;
    let start = (addr & !(page - 1)) as usize;
    // SAFETY: the page belongs to a private, executable mapping of a probed object; only the
    // protection changes, and only by adding PROT_WRITE, which is removed again below.
    unsafe {
        sys::mprotect(start, page as usize, prot | libc::PROT_WRITE)?;
        core::ptr::write_volatile(addr as *mut u8, byte);
        sys::mprotect(start, page as usize, prot)?;
    }
    Ok(())
}
