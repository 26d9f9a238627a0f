//! The layout of the house (docs/DESIGN.md): no import circles between the parts, and the
//! async-signal-safe core imports nothing from the rest of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "bin") {
                sources(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`lib` for src/lib.rs).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The modules `text` refers to with `crate::NAME`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + 7..];
            let name: String =
                after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b::c}`
        if let Some(i) = code.find("crate::{") {
            for part in code[i + 8..].split([',', '}']) {
                let name: String =
                    part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let from = top_module(&src, &f);
        let text = std::fs::read_to_string(&f).unwrap();
        let to = g.entry(from.clone()).or_default();
        for r in crate_refs(&text) {
            if r != from {
                to.insert(r);
            }
        }
    }
    g
}

/// A cycle through `start`, if any.
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn dfs(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    dfs(g, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let g = graph();
    assert!(g.len() >= 12, "{g:?}");
    for m in g.keys().filter(|m| *m != "lib") {
        if let Some(c) = cycle_from(&g, m) {
            panic!("import circle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_signal_safe_core_imports_nothing_else() {
    let g = graph();
    assert_eq!(g["sigsafe"], BTreeSet::new(), "sigsafe imports: {:?}", g["sigsafe"]);
}

#[test]
fn the_layers_are_in_order() {
    // Each part may use only parts below it (the order of docs/DESIGN.md).
    let order = [
        "sigsafe",
        "runtime",
        "spec",
        "objects",
        "patch",
        "xol",
        "error",
        "resolve",
        "registry",
        "consumers",
        "report",
        "control",
        "hooks",
        "lib",
    ];
    let g = graph();
    for (i, m) in order.iter().enumerate() {
        for used in g.get(*m).into_iter().flatten() {
            let j = order.iter().position(|o| o == used).unwrap_or_else(|| panic!("{used}?"));
            assert!(j < i, "{m} uses {used}, which is above it");
        }
    }
}
