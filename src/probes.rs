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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::objects::{self, ElfInfo, FileId, LoadedObject, MapEntry};
use crate::spec::{self, Spec, Target};
use crate::trap::{self, Consumer, Table, TableEntry};
use crate::xol::{self, Resume, XolAreas};
use crate::{fork_hook, sys};

pub type ProbeId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// Breakpoints are in every mapping of the site.
    Active,
    /// Its object is not loaded (yet, or any more).
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
    /// For an entry probe, hits; for a return probe (`%return`), returns.
    pub hits: u64,
    pub ret: bool,
    /// Return probes: calls not followed to their return (nested too deep).
    pub missed: u64,
    /// Return probes: the durations of the calls.
    pub latency: Option<LatencyInfo>,
}

/// Durations of a return probe's calls, in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct LatencyInfo {
    pub calls: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Upper bounds of the buckets holding the 50th and 99th percentile (within 1/8).
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Power-of-two buckets with calls: (low, high inclusive, calls), as bpftrace's `hist()`.
    pub histogram: Vec<(u64, u64, u64)>,
}

impl LatencyInfo {
    fn of(l: &trap::Latency) -> LatencyInfo {
        let counts: Vec<u64> = l.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let calls: u64 = counts.iter().sum();
        if calls == 0 {
            return LatencyInfo::default();
        }
        let (min_ns, max_ns) = (l.min_ns.load(Ordering::Relaxed), l.max_ns.load(Ordering::Relaxed));
        let percentile = |q: f64| {
            let want = ((calls as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    let high =
                        if i + 1 < counts.len() { trap::bucket_low(i + 1) - 1 } else { u64::MAX };
                    return high.clamp(min_ns, max_ns);
                }
            }
            max_ns
        };
        let mut histogram: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let low = trap::bucket_low(i);
            let p2 = if low == 0 { 0 } else { 1u64 << (63 - low.leading_zeros()) };
            let high = if p2 == 0 { 0 } else { p2.saturating_mul(2) - 1 };
            match histogram.last_mut() {
                Some(last) if last.0 == p2 => last.2 += c,
                _ => histogram.push((p2, high, c)),
            }
        }
        let total_ns = l.total_ns.load(Ordering::Relaxed);
        LatencyInfo {
            calls,
            total_ns,
            mean_ns: total_ns / calls,
            min_ns,
            max_ns,
            p50_ns: percentile(0.50),
            p99_ns: percentile(0.99),
            histogram,
        }
    }
}

/// A probe as the user registered it: resolved to a site, still waiting for its object (`spec`
/// kept to resolve it when the object appears), or failed.
struct Probe {
    id: ProbeId,
    spec: String,
    object: String,
    symbol: String,
    failed: Option<String>,
    site: Option<SiteKey>,
    /// While the object is not loaded: the parsed spec, resolved at every rescan.
    pending: Option<Spec>,
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
    /// Every current mapping of the site's file that holds it. Empty while the file is unmapped
    /// (after dlclose): the site and its counts live on, and are installed again when it returns.
    installs: Vec<Install>,
    /// libuprobe's own breakpoint on the loader's `r_brk` (see dl_hook.rs).
    link_map_hook: bool,
}

impl Site {
    fn wanted(&self) -> bool {
        !self.consumers.is_empty() || self.link_map_hook
    }
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

/// Objects may have changed while the registry was busy (or on the trap path): the registry's
/// holder rescans before it lets go.
pub fn want_rescan() {
    trap::RESCAN_WANTED.store(true, Ordering::SeqCst);
}

fn run_locked<R>(
    guard: &mut MutexGuard<'_, Option<Registry>>,
    f: impl FnOnce(&mut Registry) -> R,
) -> R {
    let reg = guard.get_or_insert_with(Registry::default);
    let r = f(reg);
    while trap::RESCAN_WANTED.swap(false, Ordering::SeqCst) {
        reg.rescan(false);
    }
    r
}

/// Run `f` with the registry locked. The only way to reach it; never called on the trap path.
/// `None` in a process that does not own the runtime (a child made by a raw clone, which ran no
/// atfork handler: its copy of the lock may be held by a thread that does not exist).
pub fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    if !fork_hook::owns_runtime() {
        return None;
    }
    let mut guard = REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Some(run_locked(&mut guard, f))
}

/// As [`with_registry`], but gives up at once when the registry is busy, asking its holder to
/// rescan instead. For the link-map hook, which runs with the loader's lock held: waiting for a
/// registry holder that is itself waiting for the loader would deadlock.
pub fn try_rescan(in_loader: bool) {
    if !fork_hook::owns_runtime() {
        return;
    }
    match REGISTRY.try_lock() {
        Ok(mut guard) => drop(run_locked(&mut guard, |r| r.rescan(in_loader))),
        Err(std::sync::TryLockError::Poisoned(p)) => {
            drop(run_locked(&mut p.into_inner(), |r| r.rescan(in_loader)))
        }
        Err(std::sync::TryLockError::WouldBlock) => want_rescan(),
    }
}

/// The registry lock held across fork (pthread_atfork), so that no child inherits it held by a
/// thread that does not exist there.
static FORK_GUARD: Mutex<()> = Mutex::new(());
static mut HELD_ACROSS_FORK: Option<MutexGuard<'static, Option<Registry>>> = None;

pub fn lock_for_fork() {
    let _serialize = FORK_GUARD.lock();
    let guard = REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // SAFETY: written only here and in unlock_after_fork, both by the forking thread between the
    // prepare and the parent/child handlers of one fork.
    unsafe { *core::ptr::addr_of_mut!(HELD_ACROSS_FORK) = Some(guard) };
}

/// In the parent and in the child after fork. In the child, also: counts start at zero.
pub fn unlock_after_fork(child: bool) {
    // SAFETY: as in lock_for_fork.
    let guard = unsafe { (*core::ptr::addr_of_mut!(HELD_ACROSS_FORK)).take() };
    if let Some(mut guard) = guard {
        if child {
            if let Some(reg) = guard.as_mut() {
                for p in &reg.probes {
                    p.consumer.hits.store(0, Ordering::Relaxed);
                }
            }
        }
        drop(guard);
    }
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

/// Why a spec could not be resolved against an object now.
enum NotYet {
    /// It needs an IFUNC resolved, which must wait until the object is relocated.
    Ifunc,
    Error(String),
}

impl From<String> for NotYet {
    fn from(s: String) -> Self {
        NotYet::Error(s)
    }
}

impl Registry {
    /// Register every probe `text` names. Returns the ids created (failed and pending ones
    /// included) and the problems found, each with a message for the user.
    pub fn register(&mut self, text: &str) -> (Vec<ProbeId>, Vec<ProbeError>) {
        let spec = match spec::parse(text) {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                let id = self.new_probe(text, "", "", None, Some(msg.clone()));
                return (vec![id], vec![ProbeError { spec: text.trim().into(), message: msg }]);
            }
        };
        if spec.ret {
            let refused = if sys::shadow_stack_enabled() {
                Some("return probes are refused: the CPU's shadow stack is enabled for this process, and a hijacked return would fault".to_string())
            } else {
                trap::ensure_return_trampoline()
                    .err()
                    .map(|e| format!("cannot map the return trampoline: {e}"))
            };
            if let Some(msg) = refused {
                let id = self.new_probe(
                    &spec.text,
                    &spec.object,
                    &spec.symbol_text(),
                    None,
                    Some(msg.clone()),
                );
                return (vec![id], vec![ProbeError { spec: spec.text.clone(), message: msg }]);
            }
        }
        let maps = objects::read_maps().unwrap_or_default();
        let objects = objects::loaded_objects(&maps);
        let matching = self.matching_objects(&spec.object, &objects);
        if matching.is_empty() {
            let id = self.new_probe(&spec.text, &spec.object, &spec.symbol_text(), None, None);
            self.probe_mut(id).pending = Some(spec);
            return (vec![id], vec![]);
        }
        let (ids, errors, _) = self.attach_spec(&spec, &matching, &maps, None, false);
        (ids, errors)
    }

    /// Resolve `spec` in `matching` objects and attach a probe to each site. `reuse` is a pending
    /// probe that becomes the first of them. With `in_loader`, a spec that needs an IFUNC resolved
    /// is left alone (returns false) until its object is relocated.
    fn attach_spec(
        &mut self,
        spec: &Spec,
        matching: &[LoadedObject],
        maps: &[MapEntry],
        mut reuse: Option<ProbeId>,
        in_loader: bool,
    ) -> (Vec<ProbeId>, Vec<ProbeError>, bool) {
        let mut ids = Vec::new();
        let mut errors = Vec::new();
        // (object, symbol, message) of each probe that could not be set up.
        let mut failed: Vec<(String, String, String)> = Vec::new();
        let mut resolved = Vec::new();
        for obj in matching {
            if obj.is_self {
                failed.push((
                    obj.path.clone(),
                    spec.symbol_text(),
                    "libuprobe does not probe itself".into(),
                ));
                continue;
            }
            match self.resolve(spec, obj, maps, in_loader) {
                Ok(outcomes) => {
                    for o in outcomes {
                        match o {
                            Ok(r) => resolved.push(r),
                            Err(u) => failed.push((obj.path.clone(), u.symbol, u.message)),
                        }
                    }
                }
                Err(NotYet::Ifunc) => return (ids, errors, false),
                Err(NotYet::Error(message)) => {
                    failed.push((obj.path.clone(), spec.symbol_text(), message))
                }
            }
        }
        let mut new_installs = Vec::new();
        for r in resolved {
            let planned = if self.sites.contains_key(&r.key) {
                Ok(Vec::new())
            } else {
                self.plan_site(r.key, maps)
            };
            match planned {
                Ok(installs) => {
                    let id = match reuse.take() {
                        Some(id) => {
                            let p = self.probe_mut(id);
                            (p.object, p.symbol, p.pending) =
                                (r.path.clone(), r.symbol.clone(), None);
                            id
                        }
                        None => self.new_probe(&spec.text, &r.path, &r.symbol, None, None),
                    };
                    let consumer = Arc::new(Consumer {
                        id,
                        args: spec.args.clone(),
                        ret: spec.ret,
                        latency: spec.ret.then(Box::default),
                        ..Default::default()
                    });
                    let p = self.probe_mut(id);
                    p.site = Some(r.key);
                    p.consumer = consumer.clone();
                    let site = self.sites.entry(r.key).or_insert_with(|| Site {
                        consumers: Vec::new(),
                        installs: Vec::new(),
                        link_map_hook: false,
                    });
                    site.consumers.push((id, consumer));
                    for i in &installs {
                        self.tombstones.remove(&i.addr);
                    }
                    site.installs.extend_from_slice(&installs);
                    new_installs.push((r.key, installs));
                    ids.push(id);
                }
                Err(message) => failed.push((r.path, r.symbol, message)),
            }
        }
        for (object, symbol, message) in failed {
            let id = match reuse.take() {
                Some(id) => {
                    let p = self.probe_mut(id);
                    (p.object, p.symbol, p.pending, p.failed) =
                        (object, symbol, None, Some(message.clone()));
                    id
                }
                None => self.new_probe(&spec.text, &object, &symbol, None, Some(message.clone())),
            };
            ids.push(id);
            errors.push(ProbeError { spec: spec.text.clone(), message });
        }
        errors.extend(self.install(new_installs, &spec.text));
        (ids, errors, true)
    }

    /// Publish sites with new installs, then write their breakpoints; a site whose writes fail is
    /// undone entirely and its probes marked failed.
    fn install(
        &mut self,
        new_installs: Vec<(SiteKey, Vec<Install>)>,
        spec: &str,
    ) -> Vec<ProbeError> {
        self.publish();
        let mut errors = Vec::new();
        let mut undone = false;
        for (key, installs) in new_installs {
            if let Err(message) = write_breakpoints(&installs) {
                let site = self.sites.get_mut(&key).expect("site present");
                site.installs.retain(|i| !installs.iter().any(|n| n.addr == i.addr));
                if site.installs.is_empty() {
                    let site = self.sites.remove(&key).expect("site present");
                    for (id, _) in site.consumers {
                        let p = self.probe_mut(id);
                        (p.site, p.failed) = (None, Some(message.clone()));
                    }
                }
                errors.push(ProbeError { spec: spec.to_string(), message });
                undone = true;
            }
        }
        if undone {
            self.publish();
        }
        errors
    }

    /// Bring the breakpoints in line with what is mapped now (the kernel's mmap and munmap hooks):
    /// forget installs whose mapping vanished, install every site in mappings that appeared, and
    /// resolve pending probes whose object appeared. All under the registry lock, so a probe
    /// unregistered meanwhile is simply not there to install.
    pub fn rescan(&mut self, in_loader: bool) -> Vec<ProbeError> {
        let maps = objects::read_maps().unwrap_or_default();
        let still_mapped = |key: &SiteKey, addr: u64| {
            maps.iter().any(|m| {
                m.file == Some(key.file) && m.is_exec() && m.addr_of(key.offset) == Some(addr)
            })
        };
        let mut changed = false;
        for (key, site) in self.sites.iter_mut() {
            let before = site.installs.len();
            site.installs.retain(|i| still_mapped(key, i.addr));
            changed |= site.installs.len() != before;
        }
        let before = self.tombstones.len();
        self.tombstones
            .retain(|&addr, _| maps.iter().any(|m| m.is_exec() && m.start <= addr && addr < m.end));
        changed |= self.tombstones.len() != before;
        self.resumes.retain(|&(addr, _), _| maps.iter().any(|m| m.start <= addr && addr < m.end));

        // Sites in mappings that appeared (a dlopen again, a second namespace, an mmap).
        let mut errors = Vec::new();
        let mut new_installs = Vec::new();
        let keys: Vec<SiteKey> = self.sites.keys().copied().collect();
        for key in keys {
            let known: Vec<u64> = self.sites[&key].installs.iter().map(|i| i.addr).collect();
            for m in maps.iter().filter(|m| m.file == Some(key.file) && m.is_exec()) {
                let Some(addr) = m.addr_of(key.offset) else { continue };
                if known.contains(&addr) {
                    continue;
                }
                match self.plan_install(key, m, addr) {
                    Ok(i) => {
                        self.tombstones.remove(&i.addr);
                        self.sites.get_mut(&key).expect("site").installs.push(i);
                        new_installs.push((key, vec![i]));
                    }
                    Err(message) => errors.push(ProbeError {
                        spec: format!("{}+{:#x}", m.path, key.offset),
                        message,
                    }),
                }
            }
        }
        if !new_installs.is_empty() {
            errors.extend(self.install(new_installs, "rescan"));
        } else if changed {
            self.publish();
        }

        // Pending probes whose object appeared.
        let pending: Vec<(ProbeId, Spec)> =
            self.probes.iter().filter_map(|p| p.pending.clone().map(|s| (p.id, s))).collect();
        if !pending.is_empty() {
            let objects = objects::loaded_objects(&maps);
            for (id, spec) in pending {
                let matching = self.matching_objects(&spec.object, &objects);
                if matching.is_empty() {
                    continue;
                }
                let (_, errs, done) =
                    self.attach_spec(&spec, &matching, &maps, Some(id), in_loader);
                if !done {
                    want_rescan();
                }
                errors.extend(errs);
            }
        }
        errors
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
                if !site.wanted() {
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

    /// Put libuprobe's own breakpoint on the loader's `r_brk` (`_dl_debug_state`), which the loader
    /// calls on every change to the link map, whoever asked for it.
    pub fn install_link_map_hook(&mut self, r_brk: u64) -> Result<(), String> {
        let maps = objects::read_maps().map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
        let m = maps
            .iter()
            .find(|m| m.start <= r_brk && r_brk < m.end && m.is_exec() && m.file.is_some())
            .ok_or_else(|| format!("r_brk {r_brk:#x} is not in an executable file mapping"))?;
        let key = SiteKey { file: m.file.expect("checked"), offset: r_brk - m.start + m.offset };
        if let Some(site) = self.sites.get_mut(&key) {
            site.link_map_hook = true;
            self.publish();
            return Ok(());
        }
        let install = self.plan_install(key, m, r_brk)?;
        if !trap::can_hijack(install.resume) {
            return Err(
                "the loader's r_brk starts with an instruction the hook cannot resume".into()
            );
        }
        self.sites.insert(
            key,
            Site { consumers: Vec::new(), installs: vec![install], link_map_hook: true },
        );
        let errors = self.install(vec![(key, vec![install])], "link-map hook");
        errors.into_iter().next().map_or(Ok(()), |e| Err(e.message))
    }

    /// Every probe, in id order, with its hits now.
    pub fn snapshot(&self) -> Vec<ProbeInfo> {
        self.probes
            .iter()
            .map(|p| {
                let installed =
                    p.site.and_then(|k| self.sites.get(&k)).is_some_and(|s| !s.installs.is_empty());
                let state = match (&p.failed, installed) {
                    (Some(_), _) => ProbeState::Failed,
                    (None, true) => ProbeState::Active,
                    (None, false) => ProbeState::Pending,
                };
                let c = &p.consumer;
                ProbeInfo {
                    id: p.id,
                    spec: p.spec.clone(),
                    object: p.object.clone(),
                    symbol: p.symbol.clone(),
                    offset: p.site.map(|k| k.offset),
                    state,
                    error: p.failed.clone(),
                    hits: c.hits.load(Ordering::Relaxed),
                    ret: c.ret || p.pending.as_ref().is_some_and(|s| s.ret),
                    missed: c.missed.load(Ordering::Relaxed),
                    latency: c.latency.as_deref().map(LatencyInfo::of),
                }
            })
            .collect()
    }

    /// Symbol and argument types of probe `id`, for formatting its events.
    pub fn event_meta(&self, id: ProbeId) -> Option<(String, Vec<spec::ArgType>)> {
        let p = self.probes.iter().find(|p| p.id == id)?;
        Some((p.symbol.clone(), p.consumer.args.clone()))
    }

    /// Every count back to zero (`stats reset`).
    pub fn reset_counts(&self) {
        for p in &self.probes {
            p.consumer.hits.store(0, Ordering::Relaxed);
            p.consumer.missed.store(0, Ordering::Relaxed);
            if let Some(l) = &p.consumer.latency {
                l.reset();
            }
        }
    }

    /// Sites with breakpoints or waiting for their file, libuprobe's own hook included.
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Bytes of XOL memory mapped so far.
    pub fn xol_bytes(&self) -> u64 {
        self.xol.mapped_bytes()
    }

    fn new_probe(
        &mut self,
        spec: &str,
        object: &str,
        symbol: &str,
        site: Option<SiteKey>,
        failed: Option<String>,
    ) -> ProbeId {
        self.next_id += 1;
        self.probes.push(Probe {
            id: self.next_id,
            spec: spec.trim().to_string(),
            object: object.to_string(),
            symbol: symbol.to_string(),
            failed,
            site,
            pending: None,
            consumer: Arc::new(Consumer::default()),
        });
        self.next_id
    }

    fn probe_mut(&mut self, id: ProbeId) -> &mut Probe {
        self.probes.iter_mut().find(|p| p.id == id).expect("probe id")
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
        in_loader: bool,
    ) -> Result<Vec<Result<Resolved, Unresolved>>, NotYet> {
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
                    return Err(format!("no function matching `{pattern}` in {}", obj.path).into());
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
                    if f.ifunc && in_loader {
                        return Err(NotYet::Ifunc);
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
            if let Some(addr) = m.addr_of(key.offset) {
                installs.push(self.plan_install(key, m, addr)?);
            }
        }
        if installs.is_empty() {
            return Err(format!("file offset {:#x} is not mapped executable", key.offset));
        }
        Ok(installs)
    }

    /// Decide how the instruction of `key` at `addr`, in mapping `m`, resumes.
    fn plan_install(&mut self, key: SiteKey, m: &MapEntry, addr: u64) -> Result<Install, String> {
        debug_assert_eq!(m.addr_of(key.offset), Some(addr));
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
                    None => {
                        Resume::Xol { slot: self.xol.install(&d, addr).map_err(|e| e.to_string())? }
                    }
                };
                self.resumes.insert((addr, bytes), r);
                r
            }
        };
        Ok(Install { addr, orig: bytes[0], prot: m.prot, resume })
    }

    /// Give the trap path a new table built from the current sites and tombstones.
    fn publish(&self) {
        let mut table = Table::default();
        for site in self.sites.values() {
            let first = table.consumers.len() as u32;
            table.consumers.extend(site.consumers.iter().map(|(_, c)| c.clone()));
            let count = site.consumers.len() as u32;
            let link_map_hook = site.link_map_hook;
            for i in &site.installs {
                table.entries.push(TableEntry {
                    addr: i.addr,
                    resume: i.resume,
                    first,
                    count,
                    link_map_hook,
                });
            }
        }
        for (&addr, &resume) in &self.tombstones {
            table.entries.push(TableEntry {
                addr,
                resume,
                first: 0,
                count: 0,
                link_map_hook: false,
            });
        }
        table.entries.sort_by_key(|e| (e.addr, e.count == 0 && !e.link_map_hook));
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
    // the posix_spawn child (also behind system() and popen()), before it restores the mask:
    // dispositions, attributes, file actions
    "__libc_sigaction",
    "sigprocmask",
    "pthread_sigmask",
    "setsid",
    "setpgid",
    "sched_setparam",
    "sched_setscheduler",
    "__close_nocancel",
    "dup2",
    "chdir",
    "fchdir",
    "close_range",
    "tcsetpgrp",
    // ... and, after it reset every signal handler to SIG_DFL (ours included), the exec itself
    // and the _exit that follows a failed one
    "execve",
    "_exit",
    // the posix_spawn parent, between blocking everything and restoring its mask
    "munmap",
    "waitpid",
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
