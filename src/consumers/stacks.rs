//! The stacks counted at hits (`%stack`, `UPROBES_STACKS=1`), read and symbolized for the report:
//! each frame named by the function of its object's symbol table that holds it (a return
//! address by the call before it), with its file and line where the object has line tables
//! (addr2line), else `object+0xOFFSET`; each stack folded as `stackcollapse` and inferno read it:
//! `outermost;...;probed_function COUNT`.

use std::collections::BTreeMap;

use crate::runtime::hash::FastMap;
use std::sync::atomic::Ordering;

use crate::objects::elf::ElfFile;
use crate::objects::unwind::placed_at;
use crate::sigsafe::stacks::{self, ENTRIES};
use crate::sigsafe::unwind;

/// A probe's stacks, folded, with their counts (highest first).
pub type Folded = Vec<(String, u64)>;

/// Every stack counted so far, by probe id; and how many stacks found no room.
pub fn collect() -> (BTreeMap<u32, Folded>, u64) {
    let lost = stacks::LOST.load(Ordering::Relaxed);
    if stacks::TABLE.load(Ordering::Acquire).is_null() {
        return (BTreeMap::new(), lost);
    }
    // Raw stacks, the same one taken twice (two hits claiming entries at once) added together.
    let mut raw: FastMap<(u32, Vec<u64>), u64> = FastMap::default();
    for i in 0..ENTRIES {
        let Some(e) = stacks::entry(i) else { break };
        if !stacks::ready(e) {
            continue;
        }
        let count = e.count.load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        let depth = e.depth.load(Ordering::Relaxed) as usize;
        let frames: Vec<u64> =
            e.frames.iter().take(depth).map(|f| f.load(Ordering::Relaxed)).collect();
        *raw.entry((e.probe.load(Ordering::Relaxed), frames)).or_default() += count;
    }
    let mut names = Symbolizer::default();
    let mut by_probe: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
    for ((probe, frames), count) in raw {
        let folded: Vec<String> = frames
            .iter()
            .enumerate()
            .rev()
            .map(|(i, &pc)| {
                // A return address is named after its call; the first pc, and one a signal
                // interrupted (after the handler's return to the restorer), as they are.
                if unwind::is_sigreturn(pc) {
                    return "<signal handler called>".to_string();
                }
                let exact = i == 0 || unwind::is_sigreturn(frames[i - 1]);
                names.name(if exact { pc } else { pc.wrapping_sub(1) })
            })
            .collect();
        *by_probe.entry(probe).or_default().entry(folded.join(";")).or_default() += count;
    }
    let out = by_probe
        .into_iter()
        .map(|(probe, stacks)| {
            let mut v: Folded = stacks.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            (probe, v)
        })
        .collect();
    (out, lost)
}

/// Names of code addresses, with each object's symbols and debug information read once.
#[derive(Default)]
struct Symbolizer {
    files: FastMap<String, (Option<ElfFile>, Option<addr2line::Loader>)>,
}

impl Symbolizer {
    /// `function (file.c:LINE)` where the object has line tables, `function` where it has only
    /// symbols, `object+0xOFFSET` where it has neither; names demangled (C++, Rust).
    fn name(&mut self, addr: u64) -> String {
        let Some(p) = placed_at(addr) else {
            // libuprobe's own code, run for a probed instruction: named after it.
            if let Some(c) = crate::objects::unwind::code_at(addr) {
                return format!("[uprobe] {}", self.name(c.site));
            }
            return format!("{addr:#x}");
        };
        let (elf, lines) = self.files.entry(p.path.clone()).or_insert_with(|| {
            (ElfFile::open_path(&p.path).ok(), addr2line::Loader::new(&p.path).ok())
        });
        let svma = addr.wrapping_sub(p.bias);
        let short = p.path.rsplit('/').next().unwrap_or(&p.path);
        let mut name = match elf.as_ref().and_then(|f| f.func_containing(svma)) {
            Some(f) => addr2line::demangle_auto(f.name.into(), None).into_owned(),
            None => format!("{short}+{svma:#x}"),
        };
        let place = lines.as_ref().and_then(|l| l.find_location(svma).ok().flatten());
        if let Some((Some(file), Some(line))) = place.map(|l| (l.file, l.line)) {
            let file = file.rsplit('/').next().unwrap_or(file);
            name = format!("{name} ({file}:{line})");
        }
        // `;` separates frames in the folded format.
        name.replace(';', ",")
    }
}

/// `stats reset`: every stack's count back to zero.
pub fn reset() {
    for i in 0..ENTRIES {
        let Some(e) = stacks::entry(i) else { break };
        e.count.store(0, Ordering::Relaxed);
    }
    stacks::LOST.store(0, Ordering::Relaxed);
}
