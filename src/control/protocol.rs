//! The protocol: one request per line, one JSON object per line in answer, `"ok"` first.

use serde_json::{json, Value};

use crate::registry::{self, ProbeId, ProbeState};
use crate::report::json as render;
use crate::runtime;
use crate::sigsafe::sys;
use crate::{consumers, spec};

fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

/// Answer one request line.
pub fn handle(line: &[u8]) -> Value {
    let Ok(text) = std::str::from_utf8(line) else {
        return error("the request is not valid UTF-8");
    };
    let text = text.trim();
    let (command, arg) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let arg = arg.trim();
    match command {
        "add" => add(arg),
        "remove" => remove(arg),
        "list" if arg.is_empty() => list(),
        "stats" if arg.is_empty() => stats(false),
        "stats" if arg == "reset" => stats(true),
        "help" => help(),
        "" => error("empty request; try `help`"),
        "list" | "stats" => {
            error(format!("`{command}` takes no argument `{}`; try `help`", spec::shorten(arg)))
        }
        other => error(format!("unknown command `{}`; try `help`", spec::shorten(other))),
    }
}

fn add(arg: &str) -> Value {
    if arg.is_empty() {
        return error("`add` needs a SPEC, e.g. `add libc.so.6:malloc`");
    }
    if let Err(e) = runtime::ensure_setup() {
        return error(e);
    }
    let result = registry::with_registry(|r| {
        let mut kept = Vec::new();
        let mut errors = Vec::new();
        for text in spec::split_specs(arg) {
            let (ids, problems) = r.register(text);
            errors.extend(problems.into_iter().map(|p| p.error.to_string()));
            let infos = r.snapshot();
            for id in ids {
                match infos.iter().find(|p| p.id == id) {
                    // A failed probe is not kept: the registry is as if it had never been asked.
                    Some(p) if p.state == ProbeState::Failed => {
                        r.unregister(id);
                    }
                    Some(p) => kept.push(render::probe(p)),
                    None => {}
                }
            }
        }
        (kept, errors)
    });
    match result {
        None => error("this process does not own the runtime"),
        Some((kept, errors)) if kept.is_empty() => error(errors.join("; ")),
        Some((kept, errors)) => json!({"ok": true, "probes": kept, "errors": errors}),
    }
}

fn remove(arg: &str) -> Value {
    if arg.is_empty() {
        return error("`remove` needs a probe ID or the SPEC it was added with");
    }
    let result = registry::with_registry(|r| {
        let ids: Vec<ProbeId> = match arg.parse::<ProbeId>() {
            Ok(id) => vec![id],
            Err(_) if arg == "all" => r.snapshot().iter().map(|p| p.id).collect(),
            Err(_) => r.snapshot().iter().filter(|p| p.spec == arg).map(|p| p.id).collect(),
        };
        ids.into_iter().filter(|&id| r.unregister(id)).collect::<Vec<_>>()
    });
    match result {
        None => error("this process does not own the runtime"),
        Some(removed) if removed.is_empty() && arg == "all" => json!({"ok": true, "removed": []}),
        Some(removed) if removed.is_empty() => match arg.parse::<u32>() {
            Ok(id) => error(format!("no probe with id {id}")),
            Err(_) => error(format!("no probe was added as `{}`", spec::shorten(arg))),
        },
        Some(removed) => json!({"ok": true, "removed": removed}),
    }
}

fn list() -> Value {
    match registry::with_registry(|r| r.snapshot()) {
        Some(probes) => {
            json!({"ok": true, "probes": probes.iter().map(render::probe).collect::<Vec<_>>()})
        }
        None => error("this process does not own the runtime"),
    }
}

fn stats(reset: bool) -> Value {
    let result = registry::with_registry(|r| {
        let snapshot = r.snapshot();
        if reset {
            r.reset_counts();
            consumers::stacks::reset();
        }
        (snapshot, r.site_count(), r.xol_bytes())
    });
    let Some((probes, sites, xol_bytes)) = result else {
        return error("this process does not own the runtime");
    };
    let total: u64 = probes.iter().map(|p| p.hits).sum();
    let (events, lost) = consumers::events::totals().unwrap_or((0, 0));
    let list: Vec<Value> = probes
        .iter()
        .map(|p| {
            let mut v = json!({
                "id": p.id, "spec": p.spec, "symbol": p.symbol, "state": p.state.as_str(),
                "hits": p.hits,
            });
            let full = render::probe(p);
            for k in ["path", "class", "path_reason", "missed", "latency"] {
                if !full[k].is_null() {
                    v[k] = full[k].clone();
                }
            }
            v
        })
        .collect();
    json!({
        "ok": true,
        "pid": sys::getpid(),
        "hits": total,
        "probes": list,
        "sites": sites,
        "xol_bytes": xol_bytes,
        "events": events,
        "lost": lost,
        "runtime_traps": crate::sigsafe::trap::RUNTIME_TRAPS.load(std::sync::atomic::Ordering::Relaxed),
        "reset": reset,
    })
}

fn help() -> Value {
    json!({"ok": true, "commands": [
        "add SPEC          register probes (UPROBES grammar; globs allowed)",
        "remove ID         unregister probe ID",
        "remove SPEC       unregister every probe added as SPEC",
        "remove all        unregister every probe (what `uprobe detach` does)",
        "events [text|json|chrome] from now on, this connection gets every event (tracing goes on)",
        "list              every probe: id, spec, object, symbol, offset, state, hits",
        "stats             hits per probe, total, sites, XOL memory",
        "stats reset       the same, then every count back to zero",
        "metrics           the counts in the Prometheus text format (0.0.4), ended by an empty line",
        "help              this list",
    ]})
}
