//! The async-signal-safe core, checked in the machine code of the release build: everything the
//! signal handlers and the trampolines can reach (by direct calls and jumps) is libuprobe's own
//! code, and none of it is a panic path or a call into libc.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;

/// Entry points that run in a signal handler, a trampoline or the return trampoline.
const ROOTS: &[&str] = &[
    "uprobe::sigsafe::trap::on_sigtrap",
    "uprobe::sigsafe::trap::on_fault",
    "uprobe::sigsafe::ret::on_return",
    "uprobe_return_trampoline",
    "uprobe::sigsafe::jump::on_jump_hit",
    "uprobe_jump_full",
];

/// Names no reachable function may have: panics, formatting, and their helpers.
const FORBIDDEN: &[&str] =
    &["panic", "unwrap_failed", "expect_failed", "slice_index", "_fail", "core::fmt", "alloc::"];

fn release_lib() -> std::path::PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--lib", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --release --lib");
    assert!(status.success());
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libuprobe.so")
}

fn objdump(args: &[&str], lib: &Path) -> String {
    let out = Command::new("objdump").args(args).arg(lib).output().expect("objdump (binutils)");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GOT slot -> what it holds: a function of the library (by address), or an imported symbol.
fn got_slots(lib: &Path) -> BTreeMap<u64, Result<u64, String>> {
    let mut slots = BTreeMap::new();
    for line in objdump(&["-R"], lib).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [off, ty, value] = f[..] else { continue };
        let Ok(off) = u64::from_str_radix(off, 16) else { continue };
        match ty {
            "R_X86_64_RELATIVE" => {
                let addend = value.trim_start_matches("*ABS*+0x");
                if let Ok(a) = u64::from_str_radix(addend, 16) {
                    slots.insert(off, Ok(a));
                }
            }
            "R_X86_64_GLOB_DAT" | "R_X86_64_JUMP_SLOT" => {
                slots.insert(off, Err(format!("{value}@got")));
            }
            _ => {}
        }
    }
    slots
}

/// Function name -> the names it calls or jumps to, directly or through the GOT (`@plt` and
/// `@got` for imported functions).
fn call_graph(lib: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let text = objdump(&["-d", "--no-show-raw-insn", "-C"], lib);
    let got = got_slots(lib);
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some((addr, name)) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                names.insert(a, name.to_string());
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")).map(|x| x.1) {
            current = name.to_string();
            graph.entry(current.clone()).or_default();
            continue;
        }
        let is_branch = line.contains("\tcall ") || line.contains("\tjmp ") || line.contains("\tj");
        if !is_branch {
            continue;
        }
        // `call *0x1234(%rip)  # 17cdb0 <...>`: through a GOT slot.
        if let Some(slot) = line.split_once("# ").and_then(|(_, r)| r.split_whitespace().next()) {
            if line.contains("*0x") {
                let target = u64::from_str_radix(slot, 16).ok().and_then(|s| got.get(&s));
                let name = match target {
                    Some(Ok(a)) => names.get(a).cloned().unwrap_or_else(|| format!("{a:#x}")),
                    Some(Err(import)) => import.clone(),
                    None => format!("indirect through {slot}"),
                };
                graph.entry(current.clone()).or_default().insert(name);
                continue;
            }
        }
        let Some(target) = line.rsplit_once(" <").map(|x| x.1.trim_end_matches('>')) else {
            continue;
        };
        // `name+0x1c` is a jump within (or into) function `name`.
        let target = target.split('+').next().unwrap_or(target);
        if target != current {
            graph.entry(current.clone()).or_default().insert(target.to_string());
        }
    }
    graph
}

fn reachable(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = VecDeque::new();
    for root in ROOTS {
        let name = graph
            .keys()
            .find(|k| k.as_str() == *root)
            .unwrap_or_else(|| panic!("root {root} is not in the release build"));
        seen.insert(name.clone(), String::new());
        queue.push_back(name.clone());
    }
    while let Some(f) = queue.pop_front() {
        for callee in graph.get(&f).into_iter().flatten() {
            if !seen.contains_key(callee) {
                seen.insert(callee.clone(), f.clone());
                queue.push_back(callee.clone());
            }
        }
    }
    seen
}

/// The chain of callers from a root to `f`.
fn path_to(seen: &BTreeMap<String, String>, f: &str) -> String {
    let mut chain = vec![f.to_string()];
    let mut at = f.to_string();
    while let Some(parent) = seen.get(&at).filter(|p| !p.is_empty()) {
        chain.push(parent.clone());
        at = parent.clone();
    }
    chain.reverse();
    chain.join(" -> ")
}

#[test]
fn the_handlers_reach_no_panic_and_no_libc() {
    let graph = call_graph(&release_lib());
    let seen = reachable(&graph);
    assert!(seen.len() > 10, "the handlers reach their helpers: {seen:?}");
    let bad: Vec<String> = seen
        .keys()
        .filter(|f| {
            f.contains("@plt") || f.contains("@got") || FORBIDDEN.iter().any(|p| f.contains(p))
        })
        .map(|f| path_to(&seen, f))
        .collect();
    let shown: Vec<&String> = bad.iter().take(5).collect();
    assert!(
        bad.is_empty(),
        "{} forbidden functions reachable from a signal handler or trampoline, e.g.:\n{shown:#?}",
        bad.len()
    );
}
