//! The probe tree, keyed like the kernel's: (device, inode, file offset) of the probed
//! instruction. One site per key, however many probes (consumers) ask for it and whatever name
//! they used; each site keeps the original bytes and the resume plan of every mapping it is
//! installed in, and its hit counters.
//!
//! All writers go through one lock ([`with_registry`]); hits never take it and see the sites only
//! through the table published by [`Registry::publish`].
//!
//! Order of operations (see docs/DESIGN.md, "Invariants"):
//! - register: publish the site in the table first, then write `int3` (a trap must always find
//!   its site); if any write fails, restore every byte this call wrote and unpublish;
//! - unregister of the last consumer: restore the original bytes first, then republish. The
//!   address stays in the table as a tombstone (no consumers), so that a thread that trapped just
//!   before the restore still knows the trap was ours; it finds the original instruction and
//!   re-executes it.

pub mod info;
mod install;
mod maskfix;
mod publish;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use info::{LatencyInfo, ProbeId, ProbeInfo, ProbeState};
use install::Install;

use crate::error::ProbeError;
use crate::objects::{self, MapEntry};
use crate::resolve::{NotYet, Resolver, SiteKey};
use crate::runtime::{config, lock::Mutex, owner, InRuntime};
use crate::sigsafe::consumer::{ArgType, Consumer, Latency};
use crate::sigsafe::plan::Resume;
use crate::sigsafe::table::NO_COUNTER;
use crate::sigsafe::{sys, thread, trap};
use crate::spec::{self, Spec};
use crate::xol::area::Areas;
use crate::xol::jump::{Counters, Jumps};
use crate::xol::slot::Slots;

/// A probe as the user registered it: resolved to a site, still waiting for its object (`pending`
/// kept to resolve it when the object appears), or failed.
struct Probe {
    id: ProbeId,
    spec: String,
    object: String,
    symbol: String,
    // Boxed, as most probes have neither: a probe is 150 bytes instead of 300 (`libc.so.6:*` makes
    // two thousand).
    error: Option<Box<ProbeError>>,
    site: Option<SiteKey>,
    pending: Option<Box<Spec>>,
    consumer: Arc<Consumer>,
    /// The site counter's sum when this probe was attached (or reset): its hits are the rest.
    baseline: u64,
}

/// The internal probe of a raw system call that passes a signal set (see `maskfix.rs`).
#[derive(Clone, Copy, Debug)]
struct MaskFix {
    mask_reg: u8,
    size_reg: u8,
}

struct Site {
    consumers: Vec<(ProbeId, Arc<Consumer>)>,
    /// Every current mapping of the site's file that holds it. Empty while the file is unmapped
    /// (after dlclose): the site and its counts live on, and are installed again when it returns.
    installs: Vec<Install>,
    /// libuprobe's own breakpoint on the loader's `r_brk` (see hooks::dl).
    link_map_hook: bool,
    mask_fix: Option<MaskFix>,
    /// Hit counter and return counter (`sigsafe::table::NO_COUNTER` when none).
    counter: u32,
    ret_counter: u32,
}

impl Site {
    fn counters(&self) -> Counters {
        Counters { hits: self.counter, returns: self.ret_counter }
    }

    fn wanted(&self) -> bool {
        !self.consumers.is_empty() || self.link_map_hook || self.mask_fix.is_some()
    }
}

/// A probe that could not be set up, with the spec it came from.
#[derive(Clone, Debug)]
pub struct Problem {
    pub spec: String,
    pub error: ProbeError,
}

#[derive(Default)]
pub struct Registry {
    probes: Vec<Probe>,
    sites: BTreeMap<SiteKey, Site>,
    /// Removed breakpoints, by address: kept in the table so that a late trap resumes correctly.
    tombstones: BTreeMap<u64, Resume>,
    resolver: Resolver,
    areas: Areas,
    slots: Slots,
    jumps: Jumps,
    /// The bytes every install depends on, by address: its end (exclusive) and its site. A
    /// jump's are its five bytes (a punned jump's last ones belong to the next instructions,
    /// which must not change); a trap's, its first byte.
    occupied: BTreeMap<u64, (u64, SiteKey)>,
    /// Jumps to turn back into traps before the next writes (a new site lies in their bytes).
    demote: Vec<u64>,
    /// Why an install is a trap, by address (`path_reason`).
    trap_reasons: install::TrapReasons,
    /// Counter indexes by (site, is the return counter): kept when a site goes, so that it gets
    /// the same counter back (and its probes' baselines stay right).
    counters: crate::runtime::hash::FastMap<(SiteKey, bool), u32>,
    next_counter: u32,
    next_id: ProbeId,
    mask_fix: maskfix::State,
    /// A spec waits for an IFUNC to be resolvable (its object was being loaded).
    ifunc_pending: bool,
    /// Which pages of the mapping planned last still hold the file's bytes (until the next
    /// writes: see `install`).
    pristine: Option<objects::maps::Pristine>,
    /// Where the link-map hook goes (the loader's `r_brk`), once it was put there: it is taken
    /// away with the last probe, and put back with the next (see [`Registry::remove_own_sites`]).
    link_map_hook_at: Option<u64>,
    /// The link-map hook is away (no probe left).
    link_map_hook_away: bool,
    /// The addresses of the jump sites in memory, sorted, as of the last publish.
    watch_list: Vec<u64>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// Jump sites in memory, as of the last publish: what [`Registry::watch`] has to look at.
pub static WATCHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How often a runtime thread looks for other tools' breakpoints on jump sites, while there are
/// any (see [`Registry::watch`]).
pub const WATCH_NS: u64 = 20_000_000;

/// Look at the jump sites for other tools' breakpoints, unless the registry is busy; say what
/// was given up.
pub fn watch() -> Vec<(String, String)> {
    if WATCHED.load(Ordering::Relaxed) == 0 {
        return Vec::new();
    }
    // The kernel maps its `[uprobes]` page (where it runs its probes' instructions) at the top
    // of the address space at its first hit in a process. Until then, a kernel uprobe on a
    // site was never hit here: the sites are looked at every 25th time only (a look at
    // `libc.so.6:*`'s 2,200 sites costs about 0.1 ms).
    static ROUND: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    if round % 25 != 0 && !sys::page_mapped(KERNEL_XOL_PAGE) {
        return Vec::new();
    }
    try_with_registry(|r| {
        // A first look at the heads alone, in address order.
        let changed = r.watch_list.iter().any(|&a| {
            let mut b = [0u8];
            sys::read_bytes_safely(a, &mut b) && b[0] != 0xe9
        });
        if changed {
            r.watch()
        } else {
            Vec::new()
        }
    })
    .unwrap_or_default()
}

/// Where the kernel puts its uprobes' out-of-line page (`xol_add_vma`: the top page of the
/// user address space, when free).
const KERNEL_XOL_PAGE: u64 = 0x7fff_ffff_e000;

/// Bumped at every publish: the probes (or their sites) changed.
pub static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// As [`with_registry`], but None at once when the registry is busy.
pub fn try_with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    if !owner::owns() {
        return None;
    }
    let _rt = InRuntime::enter();
    let mut guard = REGISTRY.try_lock()?;
    Some(run_locked(&mut guard, false, f))
}

/// Objects may have changed while the registry was busy (or on the trap path): the registry's
/// holder rescans before it lets go.
pub fn want_rescan() {
    trap::RESCAN_WANTED.store(true, Ordering::SeqCst);
}

fn run_locked<R>(
    reg: &mut Option<Registry>,
    in_loader: bool,
    f: impl FnOnce(&mut Registry) -> R,
) -> R {
    let reg = reg.get_or_insert_with(Registry::default);
    let r = f(reg);
    while trap::RESCAN_WANTED.swap(false, Ordering::SeqCst) {
        reg.rescan(in_loader);
    }
    // The code written meanwhile, known to unwinders (libgcc's lock is a leaf: taking it with
    // the loader's held, in the link-map hook, cannot deadlock); at startup, once the program
    // runs (see `xol::cfi::defer`).
    // (Not while the loader is between the two halves of a change: a dlclose may be unmapping
    // the objects whose rules the emission reads; its hook's rescan comes next.)
    if !crate::xol::cfi::deferred() && objects::loader::consistent() {
        reg.areas.emit_cfi(None);
    }
    r
}

/// Run `f` with the registry locked. The only way to reach it; never called on a hit. `None` in
/// a process that does not own the runtime (a child made by a raw clone, whose copy of the lock
/// may be held by a thread that does not exist).
pub fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    if !owner::owns() {
        return None;
    }
    let _rt = InRuntime::enter();
    let mut guard = REGISTRY.lock();
    Some(run_locked(&mut guard, false, f))
}

/// As [`with_registry`] for a rescan, but gives up at once when the registry is busy, asking its
/// holder to rescan instead. `in_loader`: called with the loader's lock held (the link-map hook):
/// waiting for a registry holder that is itself waiting for the loader would deadlock, and objects
/// are not relocated yet.
pub fn try_rescan(in_loader: bool) -> Vec<Problem> {
    if !owner::owns() {
        return Vec::new();
    }
    let _rt = InRuntime::enter();
    match REGISTRY.try_lock() {
        Some(mut guard) => run_locked(&mut guard, in_loader, |r| r.rescan(in_loader)),
        None => {
            want_rescan();
            Vec::new()
        }
    }
}

/// Wait until no registry work is in flight (the loader's hook, before it unmaps objects: a
/// breakpoint write that started finishes before the memory goes).
pub fn wait_idle() {
    drop(REGISTRY.lock());
}

/// Is a rescan outside the loader wanted (an IFUNC probe waits for its object's relocation)?
pub fn ifunc_pending() -> bool {
    REGISTRY.try_lock().is_some_and(|g| g.as_ref().is_some_and(|r| r.ifunc_pending))
}

/// How many pieces of code wait for their unwind information.
pub fn cfi_pending() -> usize {
    with_registry(|r| r.areas.cfi.pending()).unwrap_or(0)
}

/// Emit the unwind information that waited for the end of startup, if it did: in turns of a
/// quarter of a millisecond, the registry free between them (an exit, a `dlopen` or a request
/// waits for one turn at most). `all`: without a turn's limit (no thread would come back to it).
pub fn emit_deferred_cfi(all: bool) {
    use crate::xol::cfi;
    const TURN_NS: u64 = 250_000;
    while cfi::deferred() && !cfi::abandoned() && !crate::runtime::threads::stopping() {
        let deadline = (!all).then(|| crate::sigsafe::sys::monotonic_ns() + TURN_NS);
        // Not while the loader is mid-change (see `run_locked`): this thread's next round comes
        // back; without one, whoever takes the registry next emits.
        let consistent = objects::loader::consistent;
        match with_registry(|r| consistent().then(|| r.areas.emit_cfi(deadline))) {
            Some(None) if !all => return,
            Some(Some(true)) => {}
            _ => {
                cfi::take_deferred();
                // What was noted while the last turn ran.
                with_registry(|r| consistent().then(|| r.areas.emit_cfi(None)));
            }
        }
    }
}

/// Fork: the registry lock is held across it (see runtime::fork).
pub fn lock_for_fork() {
    REGISTRY.lock_raw();
}

pub fn unlock_in_parent() {
    // SAFETY: taken by lock_for_fork on this thread.
    unsafe { REGISTRY.unlock_raw() };
}

/// In the child: every count starts at zero (the counters themselves were zeroed by
/// `thread::reset_after_fork`).
pub fn unlock_in_child() {
    // SAFETY: taken by lock_for_fork on the forking thread, which is this one; no other thread.
    if let Some(reg) = unsafe { REGISTRY.get_locked() }.as_mut() {
        for p in &mut reg.probes {
            p.baseline = 0;
            p.consumer.missed.store(0, Ordering::Relaxed);
            p.consumer.lost.store(0, Ordering::Relaxed);
            if let Some(l) = &p.consumer.latency {
                l.reset();
            }
        }
    }
    // SAFETY: as above.
    unsafe { REGISTRY.unlock_raw() };
}

impl Registry {
    /// Register every probe `text` names. Returns the ids created (failed and pending ones
    /// included) and the problems found.
    pub fn register(&mut self, text: &str) -> (Vec<ProbeId>, Vec<Problem>) {
        self.register_many(&[text])
    }

    /// Register the probes of several specs, reading the mappings once.
    pub fn register_many(&mut self, texts: &[&str]) -> (Vec<ProbeId>, Vec<Problem>) {
        let mut hook_problem = None;
        if self.link_map_hook_away {
            // The last probe took libuprobe's own hook away: this one brings it back.
            self.link_map_hook_away = false;
            if let Some(r_brk) = self.link_map_hook_at {
                if let Err(error) = self.install_link_map_hook(r_brk) {
                    hook_problem = Some(Problem { spec: "link-map hook".into(), error });
                }
            }
        }
        let maps = match objects::read_maps() {
            Ok(m) => m,
            Err(errno) => {
                let mut ids = Vec::new();
                let mut problems = Vec::new();
                for text in texts {
                    let e = ProbeError::Maps { source: errno };
                    ids.push(self.new_probe(text, "", "", Some(e.clone())));
                    problems.push(Problem { spec: spec::shorten(text.trim()).into(), error: e });
                }
                return (ids, problems);
            }
        };
        // The mask fixes keep SIGTRAP open wherever glibc blocks every signal; they matter only
        // where a trap may be hit. With one thread on the jump path (the constructor), every
        // site gets its final bytes at once and no thread runs them meanwhile: the mask fixes
        // (a third of setting up one probe) go in only if some site stays a trap.
        let lazy = Self::mask_fix_may_wait();
        if !lazy {
            self.ensure_mask_fix(&maps);
        }
        let loaded = objects::loaded_objects(&maps);
        let mut ids = Vec::new();
        let mut problems: Vec<Problem> = hook_problem.into_iter().collect();
        for text in texts {
            let (i, p) = self.register_in(text, &maps, &loaded);
            ids.extend(i);
            problems.extend(p);
        }
        if lazy && self.any_trap_site() {
            self.ensure_mask_fix(&maps);
        }
        (ids, problems)
    }

    fn register_in(
        &mut self,
        text: &str,
        maps: &[MapEntry],
        loaded: &[objects::LoadedObject],
    ) -> (Vec<ProbeId>, Vec<Problem>) {
        let spec = match spec::parse(text) {
            Ok(s) => s,
            Err(e) => {
                let e = ProbeError::Spec(e);
                let id = self.new_probe(text, "", "", Some(e.clone()));
                return (
                    vec![id],
                    vec![Problem { spec: spec::shorten(text.trim()).into(), error: e }],
                );
            }
        };
        if spec.stack || config::get().stacks {
            if let Err(e) = objects::unwind::enable(maps) {
                let e = ProbeError::Runtime { why: e };
                let id = self.new_probe(text, "", "", Some(e.clone()));
                return (
                    vec![id],
                    vec![Problem { spec: spec::shorten(text.trim()).into(), error: e }],
                );
            }
        }
        if spec.ret && sys::shadow_stack_enabled() {
            let e = ProbeError::ShadowStack;
            let id = self.new_probe(&spec.text, &spec.object, &spec.symbol_text(), Some(e.clone()));
            return (vec![id], vec![Problem { spec: spec.text.clone(), error: e }]);
        }
        let matching = self.resolver.matching_objects(&spec.object, loaded, maps);
        if matching.is_empty() {
            let id = self.new_probe(&spec.text, &spec.object, &spec.symbol_text(), None);
            self.probe_mut(id).pending = Some(Box::new(spec));
            return (vec![id], vec![]);
        }
        let (ids, problems, _) = self.attach_spec(&spec, &matching, maps, None, false);
        (ids, problems)
    }

    /// Resolve `spec` in `matching` objects and attach a probe to each site. `reuse` is a pending
    /// probe that becomes the first of them. With `in_loader`, a spec that needs an IFUNC resolved
    /// is left alone (returns false) until its object is relocated.
    fn attach_spec(
        &mut self,
        spec: &Spec,
        matching: &[objects::LoadedObject],
        maps: &[MapEntry],
        mut reuse: Option<ProbeId>,
        in_loader: bool,
    ) -> (Vec<ProbeId>, Vec<Problem>, bool) {
        // Pagemap is read afresh for each batch: pages written since are copies now.
        self.pristine = None;
        let mut ids = Vec::new();
        let mut problems = Vec::new();
        // (object, symbol, error) of each probe that could not be set up.
        let mut failed: Vec<(String, String, ProbeError)> = Vec::new();
        let mut resolved = Vec::new();
        for obj in matching {
            match self.resolver.resolve(spec, obj, maps, in_loader) {
                Ok(outcomes) => {
                    for o in outcomes {
                        match o {
                            Ok(r) => resolved.push(r),
                            Err(f) => failed.push((f.object, f.symbol, f.error)),
                        }
                    }
                }
                Err(NotYet::Ifunc) => {
                    self.ifunc_pending = true;
                    return (ids, problems, false);
                }
            }
        }
        let mut new_installs = Vec::with_capacity(resolved.len());
        let mut reused_counters = false;
        // `libc.so.6:*` is two thousand sites: the tables grow once, not a dozen times.
        self.counters.reserve(resolved.len());
        self.probes.reserve(resolved.len() + failed.len());
        self.jumps.reserve(resolved.len());
        for r in resolved {
            let counter = match self.counter_for(r.key, spec.ret) {
                Ok((c, reused)) => {
                    reused_counters |= reused;
                    c
                }
                Err(e) => {
                    failed.push((r.path, r.symbol, e));
                    continue;
                }
            };
            let planned = match self.sites.get(&r.key) {
                Some(_) => Ok(Vec::new()),
                None => {
                    let counters = if spec.ret {
                        Counters { hits: NO_COUNTER, returns: counter }
                    } else {
                        Counters { hits: counter, returns: NO_COUNTER }
                    };
                    self.plan_site(r.key, maps, counters, true)
                }
            };
            let installs = match planned {
                Ok(i) => i,
                // Its object is going away or still being mapped: the site waits for it.
                Err(e) if install::vanished(&e) => Vec::new(),
                Err(e) => {
                    failed.push((r.path, r.symbol, e));
                    continue;
                }
            };
            let id = match reuse.take() {
                Some(id) => {
                    let p = self.probe_mut(id);
                    (p.object, p.symbol, p.pending) = (r.path.clone(), r.symbol.clone(), None);
                    id
                }
                None => self.new_probe(&spec.text, &r.path, &r.symbol, None),
            };
            let latency = spec.ret && config::get().latency;
            let consumer = Arc::new(Consumer {
                id,
                args: spec.args.clone(),
                ret: spec.ret,
                stack: spec.stack || config::get().stacks,
                missed: Default::default(),
                lost: Default::default(),
                latency: latency.then(Latency::boxed),
            });
            let p = self.probe_mut(id);
            p.site = Some(r.key);
            p.consumer = consumer.clone();
            p.baseline = counter as u64;
            let site = self.sites.entry(r.key).or_insert_with(|| Site {
                consumers: Vec::new(),
                installs: Vec::new(),
                link_map_hook: false,
                mask_fix: None,
                counter: NO_COUNTER,
                ret_counter: NO_COUNTER,
            });
            let before = site.counters();
            if spec.ret {
                site.ret_counter = counter;
            } else {
                site.counter = counter;
            }
            let changed = site.counters() != before;
            site.consumers.push((id, consumer));
            for i in &installs {
                self.tombstones.remove(&i.addr);
                new_installs.push((r.key, i.addr));
            }
            let none = installs.is_empty();
            if site.installs.is_empty() {
                site.installs = installs; // as planned: room for one, usually all it needs
            } else {
                site.installs.extend(installs);
            }
            if changed && none {
                // An existing site gets a new counter (a return probe where there were entry
                // probes, or the reverse): new bodies for its jumps.
                self.rebody(r.key, maps);
            }
            ids.push(id);
        }
        // `baseline` held the counter index until here: the counters' sums now.
        self.set_baselines(&ids, reused_counters);
        // Probes added to sites that exist have nothing to write, but consumers (and maybe
        // bodies) to publish.
        let attached = !ids.is_empty();
        for (object, symbol, error) in failed {
            let id = match reuse.take() {
                Some(id) => {
                    let p = self.probe_mut(id);
                    (p.object, p.symbol, p.pending, p.error) =
                        (object, symbol, None, Some(Box::new(error.clone())));
                    id
                }
                None => self.new_probe(&spec.text, &object, &symbol, Some(error.clone())),
            };
            ids.push(id);
            problems.push(Problem { spec: spec.text.clone(), error });
        }
        if new_installs.is_empty() && self.demote.is_empty() {
            if attached {
                self.publish();
            }
        } else {
            problems.extend(self.install(new_installs, &spec.text));
        }
        (ids, problems, true)
    }

    /// The counter of `key` (its return counter with `ret`): the one it had, or a new one. True
    /// when it had one (its sum may not be zero).
    fn counter_for(&mut self, key: SiteKey, ret: bool) -> Result<(u32, bool), ProbeError> {
        if let Some(&c) = self.counters.get(&(key, ret)) {
            return Ok((c, true));
        }
        if self.next_counter as usize >= thread::MAX_COUNTERS {
            return Err(ProbeError::NoCounter { max: thread::MAX_COUNTERS });
        }
        let c = self.next_counter;
        self.next_counter += 1;
        self.counters.insert((key, ret), c);
        Ok((c, false))
    }

    /// The probes `ids` were just attached with `baseline` holding their counter's index: make
    /// it the counter's sum now.
    fn set_baselines(&mut self, ids: &[ProbeId], any_reused: bool) {
        let sums = if any_reused { self.sums() } else { Vec::new() };
        for id in ids {
            let p = self.probe_mut(*id);
            if p.error.is_none() {
                p.baseline = sums.get(p.baseline as usize).copied().unwrap_or(0);
            }
        }
    }

    /// Every counter's sum over every thread, living or gone.
    fn sums(&self) -> Vec<u64> {
        thread::reclaim(self.next_counter as usize);
        let mut sums = vec![0u64; self.next_counter as usize];
        thread::sum_into(&mut sums);
        sums
    }

    /// Bring the breakpoints in line with what is mapped now (the kernel's mmap and munmap
    /// hooks): forget installs whose mapping vanished, install every site in mappings that
    /// appeared, and resolve pending probes whose object appeared. All under the registry lock, so
    /// a probe unregistered meanwhile is simply not there to install.
    pub fn rescan(&mut self, in_loader: bool) -> Vec<Problem> {
        if !in_loader && !objects::loader::consistent() {
            // Another thread's dlopen or dlclose is mapping or unmapping: its hook, when it is
            // done, rescans.
            return Vec::new();
        }
        self.pristine = None;
        let Ok(maps) = objects::read_maps() else { return Vec::new() };
        objects::unwind::refresh(&maps);
        // Still mapped: the same file at the same place, whatever the protection is now (a
        // hot-patcher may have made the page briefly non-executable: the int3 is still there).
        let still_mapped = |key: &SiteKey, addr: u64| {
            maps.iter().any(|m| m.file == Some(key.file) && m.addr_of(key.offset) == Some(addr))
        };
        let mut changed = false;
        let mut gone = Vec::new();
        for (key, site) in self.sites.iter_mut() {
            let before = site.installs.len();
            site.installs.retain(|i| {
                let keep = still_mapped(key, i.addr);
                if !keep {
                    gone.push(i.addr);
                }
                keep
            });
            changed |= site.installs.len() != before;
        }
        for a in gone {
            self.occupied.remove(&a);
            self.trap_reasons.remove(&a);
        }
        let before = self.tombstones.len();
        self.tombstones.retain(|&addr, _| maps.iter().any(|m| m.start <= addr && addr < m.end));
        changed |= self.tombstones.len() != before;
        self.slots.forget_range(|addr| maps.iter().any(|m| m.start <= addr && addr < m.end));
        self.resolver.forget_unmapped(&maps);
        self.areas.cfi.forget_unmapped(&maps);

        // Sites in mappings that appeared (a dlopen again, a second namespace, an mmap).
        let mut problems = Vec::new();
        let mut new_installs = Vec::new();
        let keys: Vec<SiteKey> = self.sites.keys().copied().collect();
        for key in keys {
            let known: Vec<u64> = self.sites[&key].installs.iter().map(|i| i.addr).collect();
            for m in maps.iter().filter(|m| m.file == Some(key.file) && m.is_exec()) {
                let Some(addr) = m.addr_of(key.offset) else { continue };
                if known.contains(&addr) {
                    continue;
                }
                let (counters, jump_ok) = self
                    .sites
                    .get(&key)
                    .map_or((Counters::NONE, false), |s| (s.counters(), !s.link_map_hook));
                match self.plan_install(key, m, addr, &maps, counters, jump_ok) {
                    Ok(i) => {
                        self.tombstones.remove(&i.addr);
                        if let Some(s) = self.sites.get_mut(&key) {
                            s.installs.push(i);
                        }
                        new_installs.push((key, i.addr));
                    }
                    Err(error) if install::vanished(&error) => {}
                    Err(error) => problems
                        .push(Problem { spec: format!("{}+{:#x}", m.path, key.offset), error }),
                }
            }
        }
        if !new_installs.is_empty() {
            self.ensure_mask_fix(&maps);
            problems.extend(self.install(new_installs, "rescan"));
        } else if changed {
            self.publish();
        }

        // Pending probes whose object appeared.
        let pending: Vec<(ProbeId, Spec)> = self
            .probes
            .iter()
            .filter_map(|p| p.pending.as_deref().map(|s| (p.id, s.clone())))
            .collect();
        if !pending.is_empty() {
            self.ensure_mask_fix(&maps);
            let loaded = objects::loaded_objects(&maps);
            self.ifunc_pending = false;
            for (id, spec) in pending {
                let matching = self.resolver.matching_objects(&spec.object, &loaded, &maps);
                if matching.is_empty() {
                    continue;
                }
                let (_, p, _) = self.attach_spec(&spec, &matching, &maps, Some(id), in_loader);
                problems.extend(p);
            }
        }
        problems
    }

    /// Can the mask fixes wait for a site that needs a trap (jump path, one thread)? Then the
    /// program's sites go first, in one batch: their stubs and bodies are written straight into
    /// fresh memory, not through `/proc/self/mem` into areas that the mask fixes' batch made
    /// executable first. A jump that a mask fix then lies in becomes a trap, as it would have
    /// had the mask fix been first.
    fn mask_fix_may_wait() -> bool {
        config::get().path == config::PathMode::Jump && install::single_threaded()
    }

    /// The mask fixes now, unless they may wait for `UPROBES`'s sites (see
    /// [`Registry::register_many`]).
    pub fn ensure_mask_fix_unless_lazy(&mut self, maps: &[MapEntry]) {
        if !Self::mask_fix_may_wait() {
            self.ensure_mask_fix(maps);
        }
    }

    /// Does a site of the user's take hits by trap (not the link-map hook, which the loader
    /// runs, never with every signal blocked)?
    fn any_trap_site(&self) -> bool {
        self.sites.values().any(|s| {
            !s.link_map_hook && s.mask_fix.is_none() && s.installs.iter().any(|i| i.jump.is_none())
        })
    }

    /// The site `key` has new counters: its jumps go to bodies that count into them (the pointer
    /// is set at the next publish; the old bodies stay, for threads still in them).
    fn rebody(&mut self, key: SiteKey, maps: &[MapEntry]) {
        let Some(site) = self.sites.get(&key) else { return };
        let counters = site.counters();
        let mut bodies = Vec::new();
        for i in site.installs.iter().filter(|i| i.jump.is_some()) {
            let Ok(d) = crate::xol::decode(&i.orig, i.addr) else { continue };
            // On failure the old body stays: its full entry counts through the table, correctly.
            if let Ok(b) = self.jumps.body(&mut self.areas, &d, i.addr, i.orig, counters, maps) {
                bodies.push((i.addr, b));
            }
        }
        if let Some(site) = self.sites.get_mut(&key) {
            for (addr, b) in bodies {
                let jump = site.installs.iter_mut().find(|i| i.addr == addr);
                if let Some(j) = jump.and_then(|i| i.jump.as_mut()) {
                    j.body = b;
                }
            }
        }
    }

    /// Unregister probe `id`. When it was the last consumer of its site, the original bytes are
    /// back in every mapping when this returns.
    pub fn unregister(&mut self, id: ProbeId) -> bool {
        let Some(pos) = self.probes.iter().position(|p| p.id == id) else {
            return false;
        };
        let probe = self.probes.remove(pos);
        if let Some(key) = probe.site {
            if let Some(site) = self.sites.get_mut(&key) {
                site.consumers.retain(|(cid, _)| *cid != id);
                if !site.wanted() {
                    if let Some(site) = self.sites.remove(&key) {
                        install::restore(&mut crate::patch::TextWriter::new(), &site.installs);
                        for i in &site.installs {
                            self.tombstones.insert(i.addr, i.resume);
                            self.occupied.remove(&i.addr);
                            self.trap_reasons.remove(&i.addr);
                        }
                    }
                }
            }
            self.publish();
        }
        if self.probes.is_empty() {
            self.remove_own_sites();
        }
        true
    }

    /// No probe is left: libuprobe's own sites go too (the mask fixes, which matter only where a
    /// probe traps, and the link-map hook, which follows objects for probes), so that every byte
    /// of every object is its file's again. The next probe brings them back.
    fn remove_own_sites(&mut self) {
        let own: Vec<SiteKey> = self
            .sites
            .iter()
            .filter(|(_, s)| s.consumers.is_empty() && (s.link_map_hook || s.mask_fix.is_some()))
            .map(|(k, _)| *k)
            .collect();
        if own.is_empty() {
            return;
        }
        let _quiet = own.iter().any(|k| self.sites[k].mask_fix.is_some()).then(maskfix::quiet);
        let mut writer = crate::patch::TextWriter::new();
        for key in own {
            let Some(site) = self.sites.remove(&key) else { continue };
            if site.link_map_hook {
                self.link_map_hook_away = true;
            }
            install::restore(&mut writer, &site.installs);
            for i in &site.installs {
                self.tombstones.insert(i.addr, i.resume);
                self.occupied.remove(&i.addr);
                self.trap_reasons.remove(&i.addr);
            }
        }
        self.mask_fix = maskfix::State::NotYet;
        self.pristine = None;
        self.publish();
    }

    /// Jump sites whose first byte another tool changed: a kernel uprobe (bpftrace, perf probe,
    /// a profiler) put its `int3` there, or put the file's byte back when it went. The kernel
    /// runs the file's instruction for a hit of its own and goes on after it, which is sound
    /// while the jump's other bytes are there; but taking its breakpoint away leaves the file's
    /// first byte before the jump's others, which is no instruction at all. So such a site is
    /// given up to that tool: its other bytes become the file's (kernel order: the `int3` at
    /// its head already, then every core serialized around the write), the probe is `lost` from
    /// then on, and libuprobe never writes there again. (A breakpoint on an instruction a
    /// punned jump covers needs nothing: see `xol::jump`'s diverted stubs.) Called by a runtime
    /// thread (see [`watch`]) when a head is not `e9`; returns what to say, one line a site.
    pub fn watch(&mut self) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        for (key, site) in &self.sites {
            for (n, i) in site.installs.iter().enumerate() {
                if i.jump.is_some()
                    && !i.yielded
                    && crate::patch::read_byte(i.addr).is_some_and(|b| b != 0xe9)
                {
                    seen.push((*key, n));
                }
            }
        }
        if seen.is_empty() || !objects::loader::consistent() {
            return Vec::new();
        }
        let mut said = Vec::new();
        let mut writer = crate::patch::TextWriter::new();
        for (key, n) in seen {
            let Some(i) = self.sites.get(&key).and_then(|s| s.installs.get(n)) else { continue };
            let Some(j) = i.jump else { continue };
            let len = j.len as usize;
            let mut mem = [0u8; 16];
            if crate::patch::read(i.addr, &mut mem).is_err() {
                continue;
            }
            // The rest must be the file's (another tool's int3 aside), or this is not the code
            // the site was written in (an object mapped there since): not touched.
            let rest_is_file =
                (len..16).all(|k| mem[k] == i.orig[k] || mem[k] == crate::patch::INT3);
            let ours = mem[1..len] == j.bytes[1..len];
            let why = match mem[0] {
                crate::patch::INT3 if rest_is_file && ours => {
                    if let Some(t) = install::tail_of_orig(i) {
                        crate::patch::Barrier::sync();
                        let _ = writer.write(t.0, t.1);
                        crate::patch::Barrier::sync();
                    }
                    "another tool put a breakpoint on its first byte (a kernel uprobe?): the \
                     site is that tool's now"
                }
                b if b == i.orig[0] && rest_is_file && ours => {
                    // Taken away again before this look: the site is as whole as the program
                    // runs it; the file's bytes, in the kernel's order.
                    install::restore(&mut writer, std::slice::from_ref(i));
                    "another tool put a breakpoint on its first byte and took it away (a kernel \
                     uprobe?): the site is the file's again"
                }
                _ => "another tool wrote over its first byte: left as it is",
            };
            let addr = i.addr;
            if let Some(i) = self.sites.get_mut(&key).and_then(|s| s.installs.get_mut(n)) {
                i.yielded = true;
            }
            for p in self.probes.iter().filter(|p| p.site == Some(key)) {
                said.push((p.spec.clone(), format!("lost at {addr:#x}: {why}")));
            }
        }
        self.publish();
        said
    }

    /// Every probe, in id order, with its hits now.
    pub fn snapshot(&self) -> Vec<ProbeInfo> {
        let sums = self.sums();
        self.probes
            .iter()
            .map(|p| {
                let site = p.site.and_then(|k| self.sites.get(&k));
                let installed = site.is_some_and(|s| !s.installs.is_empty());
                let lost = site.is_some_and(|s| s.installs.iter().any(|i| i.is_lost()));
                let state = match (&p.error, installed, lost) {
                    (Some(_), _, _) => ProbeState::Failed,
                    (None, true, true) => ProbeState::Lost,
                    (None, true, false) => ProbeState::Active,
                    (None, false, _) => ProbeState::Pending,
                };
                let c = &p.consumer;
                let counter = site.map(|s| if c.ret { s.ret_counter } else { s.counter });
                let total =
                    counter.and_then(|i| sums.get(i as usize)).copied().unwrap_or(p.baseline);
                let hits = total.wrapping_sub(p.baseline);
                ProbeInfo {
                    id: p.id,
                    spec: p.spec.clone(),
                    object: p.object.clone(),
                    symbol: p.symbol.clone(),
                    offset: p.site.map(|k| k.offset),
                    state,
                    error: p.error.as_deref().cloned(),
                    hits,
                    ret: c.ret || p.pending.as_ref().is_some_and(|s| s.ret),
                    missed: c.missed.load(Ordering::Relaxed),
                    // A probe not hit has an empty table: not read (its pages were never touched).
                    latency: c.latency.as_deref().map(|l| {
                        if hits == 0 {
                            LatencyInfo::default()
                        } else {
                            LatencyInfo::of(l)
                        }
                    }),
                    path: site.filter(|_| installed).map(|s| {
                        if s.installs.iter().all(|i| i.jump.is_some()) {
                            "jump"
                        } else {
                            "trap"
                        }
                    }),
                    path_reason: site.and_then(|s| {
                        s.installs.iter().find_map(|i| self.trap_reasons.get(&i.addr).cloned())
                    }),
                    class: site.filter(|_| installed).and_then(|s| {
                        s.installs.iter().map(|i| i.jump.map(|j| j.class)).min().flatten()
                    }),
                }
            })
            .collect()
    }

    /// Symbol and argument types of probe `id`, for formatting its events.
    /// Every probe's consumer (its lost events are read by the event stream), by id.
    pub fn consumers(&self) -> Vec<(ProbeId, Arc<Consumer>)> {
        self.probes.iter().map(|p| (p.id, p.consumer.clone())).collect()
    }

    pub fn event_meta(&self, id: ProbeId) -> Option<(String, Vec<ArgType>, bool)> {
        let p = self.probes.iter().find(|p| p.id == id)?;
        Some((p.symbol.clone(), p.consumer.args.clone(), p.consumer.ret))
    }

    /// Point every jump at the body entry its consumers need now (after recording was turned on
    /// or off).
    pub fn retarget(&mut self) {
        self.publish();
    }

    /// Every count back to zero (`stats reset`).
    pub fn reset_counts(&mut self) {
        let sums = self.sums();
        for p in &mut self.probes {
            if let Some(site) = p.site.and_then(|k| self.sites.get(&k)) {
                let c = if p.consumer.ret { site.ret_counter } else { site.counter };
                p.baseline = sums.get(c as usize).copied().unwrap_or(0);
            }
            p.consumer.missed.store(0, Ordering::Relaxed);
            p.consumer.lost.store(0, Ordering::Relaxed);
            if let Some(l) = &p.consumer.latency {
                l.reset();
            }
        }
    }

    /// Sites with breakpoints or waiting for their file, libuprobe's own included.
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Bytes of code memory (XOL slots) mapped so far.
    pub fn xol_bytes(&self) -> u64 {
        self.areas.mapped_bytes()
    }

    /// Are there probes the user asked for (pending and failed ones included)?
    pub fn has_probes(&self) -> bool {
        !self.probes.is_empty()
    }

    fn new_probe(
        &mut self,
        spec: &str,
        object: &str,
        symbol: &str,
        error: Option<ProbeError>,
    ) -> ProbeId {
        self.next_id += 1;
        self.probes.push(Probe {
            id: self.next_id,
            spec: spec.trim().to_string(),
            object: object.to_string(),
            symbol: symbol.to_string(),
            error: error.map(Box::new),
            site: None,
            pending: None,
            consumer: Arc::new(Consumer {
                id: self.next_id,
                args: Vec::new(),
                ret: false,
                stack: false,
                missed: Default::default(),
                lost: Default::default(),
                latency: None,
            }),
            baseline: 0,
        });
        self.next_id
    }

    fn probe_mut(&mut self, id: ProbeId) -> &mut Probe {
        // Probes are kept in id order (ids only grow; removal keeps the order). The one just
        // made, the usual case, is the last.
        let last = self.probes.len() - 1;
        let i = if self.probes[last].id == id {
            last
        } else {
            self.probes.binary_search_by_key(&id, |p| p.id).unwrap_or(last)
        };
        &mut self.probes[i]
    }
}
