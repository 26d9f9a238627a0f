//! What libuprobe must leave exactly as it was: privilege drops, namespaces, orphans, failed
//! execs, signal masks, faults, constructors and destructors, libraries replaced on disk. Each
//! test names the defect it guards (docs and the issue tracker say more).

mod common;
use common::*;

use serde_json::Value;
use std::collections::BTreeMap;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run `defects MODE ARGS` with every process's report in its own file; (stdout, status, every
/// summary by pid).
fn run_defects(
    args: &[&str],
    specs: &str,
    env: &[(&str, &str)],
) -> (String, std::process::ExitStatus, BTreeMap<i64, Vec<Value>>) {
    let dir = scratch("defects");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new(fixture("defects"));
    cmd.args(args)
        .env("LD_PRELOAD", lib())
        .env("UPROBES", specs)
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", dir.join("report-%p.jsonl"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (stdout, _, status) = run_command(cmd);
    let mut summaries: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["type"] == "summary" {
                summaries.entry(v["pid"].as_i64().unwrap()).or_default().push(v);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    (stdout, status, summaries)
}

fn hits(summary: &Value, spec: &str) -> u64 {
    let p = summary["probes"].as_array().unwrap().iter().find(|p| p["spec"] == spec);
    p.unwrap_or_else(|| panic!("no probe {spec} in {summary}"))["hits"].as_u64().unwrap()
}

/// Defect: every preloaded process hung in setuid (glibc waits for every thread to answer
/// SIGSETXID, which libuprobe's threads blocked).
#[test]
fn dropping_privileges_does_not_hang() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let plain = run_plain("defects", &["ids"]);
    assert_eq!(plain.stdout, "ids: uid 65534 euid 65534 gid 65534\n");
    for (specs, trace) in [("", "0"), ("defects:f", "0"), ("defects:f", "1")] {
        let probed = run_probed_env("defects", &["ids"], specs, &[("UPROBES_TRACE", trace)]);
        assert_same_behaviour(&plain, &probed);
        if !specs.is_empty() {
            assert_eq!(probed.hits("f"), 5, "{specs} trace={trace}");
        }
    }
}

/// Defect: libuprobe's always-on thread made every process multithreaded, so
/// `unshare(CLONE_NEWUSER)` and `setns` into a user namespace failed with EINVAL.
#[test]
fn user_namespaces_can_be_entered() {
    for mode in ["userns", "setns"] {
        let plain = run_plain("defects", &[mode]);
        if plain.status.code() != Some(0) {
            eprintln!(
                "skipped {mode}: this machine refuses it without libuprobe: {}",
                plain.stdout
            );
            continue;
        }
        for specs in ["", "defects:f"] {
            let probed = run_probed("defects", &[mode], specs);
            assert_same_behaviour(&plain, &probed);
            if !specs.is_empty() {
                assert_eq!(probed.hits("f"), 2 - (mode == "setns") as u64, "{mode}");
            }
        }
    }
}

/// Defect: a child decided it owned the runtime with getppid(), so an orphan (its parent gone)
/// and the first process of a new pid namespace (getppid() is 0) counted nothing.
#[test]
fn orphans_and_the_first_child_of_a_pid_namespace_count() {
    let (stdout, status, summaries) = run_defects(&["orphan", "7"], "defects:f", &[]);
    assert_eq!((stdout.as_str(), status.code()), ("orphan: 7 calls\n", Some(0)));
    let mut counts: Vec<u64> = summaries.values().map(|s| hits(&s[0], "defects:f")).collect();
    counts.sort();
    assert_eq!(counts, [0, 7], "the parent made no call; its orphaned child made 7");

    if !is_root() {
        eprintln!("skipped pidns: a new pid namespace needs root");
        return;
    }
    let (stdout, status, summaries) = run_defects(&["pidns", "9"], "defects:f", &[]);
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("child pid 1 ppid 0"), "{stdout}");
    let counts: Vec<u64> = summaries.values().flatten().map(|s| hits(s, "defects:f")).collect();
    assert!(counts.contains(&9), "the namespace's first process counted its calls: {counts:?}");
}

/// Defect: a failed execve (a shell searching PATH) wrote an early summary, deleted the control
/// socket and stopped the runtime.
#[test]
fn a_failed_exec_changes_nothing() {
    let dir = scratch("execfail");
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("r-%p.jsonl");
    // dash tries /x/true and /y/true (ENOENT) before /usr/bin/true: 2 images, 2 summaries.
    let mut cmd = std::process::Command::new("dash");
    cmd.args(["-c", "exec true"])
        .env("PATH", "/x:/y:/usr/bin:/bin")
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "libc.so.6:malloc")
        .env("UPROBES_FORMAT", "json")
        .env("UPROBES_OUTPUT", &report);
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let mut summaries = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        summaries += text.lines().filter(|l| l.contains("\"type\":\"summary\"")).count();
    }
    assert_eq!(summaries, 2, "one summary for dash's image, one for true's");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Defect: an image that ended with `_exit` (every shell does: `dash -c 'exit 3'`; a forked child
/// by convention; a daemon's SIGTERM handler) wrote no summary and left its socket behind. The
/// summary is written at `_exit` as at `exit`, also from a signal handler that interrupted
/// `malloc`; a vfork child's `_exit` (which shares the parent's memory) writes none.
#[test]
fn an_image_that_ends_with_exit_writes_its_summary() {
    for how in ["signal", "main"] {
        let plain = run_plain("defects", &["exits", how]);
        assert_eq!(
            (plain.stdout.as_str(), plain.status.code()),
            ("exits: child status 2\nexits: parent 5 calls\n", Some(3))
        );
        let sockets = scratch("exits-sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let (stdout, status, summaries) = run_defects(
            &["exits", how],
            "defects:f",
            &[("UPROBES_SOCKET", sockets.join("%p.sock").to_str().unwrap())],
        );
        assert_eq!((stdout.as_str(), status.code()), (plain.stdout.as_str(), Some(3)), "{how}");
        let mut counts: Vec<(u64, usize)> =
            summaries.values().map(|s| (hits(&s[0], "defects:f"), s.len())).collect();
        counts.sort();
        assert_eq!(counts, [(4, 1), (5, 1)], "{how}: the fork child and the parent, once each");
        let left: Vec<_> = std::fs::read_dir(&sockets).unwrap().collect();
        assert!(left.is_empty(), "{how}: sockets left behind: {left:?}");
        std::fs::remove_dir_all(&sockets).unwrap();
    }
    // A shell: its `exit` is `_exit`.
    let mut cmd = std::process::Command::new("dash");
    cmd.args(["-c", "echo hi; exit 3"])
        .env("LD_PRELOAD", lib())
        .env("UPROBES", "libc.so.6:getpid")
        .env("UPROBES_SOCKET", "none");
    let (out, err, status) = run_command(cmd);
    assert_eq!((out.as_str(), status.code()), ("hi\n", Some(3)));
    assert!(err.contains("libuprobe: pid") && err.contains("libc.so.6:getpid"), "{err}");
}

/// Defect: the program's signal masks could still block SIGTRAP (sigsuspend, ppoll, pselect,
/// epoll_pwait, a context's mask, a handler's uc_sigmask), and a probe hit there was fatal.
#[test]
fn no_mask_the_program_sets_blocks_a_probe() {
    for mode in ["sigsuspend", "ppoll", "pselect", "epoll", "swapcontext", "ucmask"] {
        let plain = run_plain("defects", &["masks", mode]);
        assert_eq!(plain.status.code(), Some(0), "{mode}: {}", plain.stdout);
        let probed = run_probed("defects", &["masks", mode], "defects:f");
        assert_same_behaviour(&plain, &probed);
        // A call in the handler (or the context), one after; swapcontext's handler calls too.
        let want = if mode == "swapcontext" { 3 } else { 2 };
        assert_eq!(probed.hits("f"), want, "{mode}");
    }
}

/// Defect: a fault in a displaced instruction was shown at the copy's address (out of line) or
/// inside libuprobe's handler (emulated), and a handler that left with siglongjmp left the
/// thread uncounted for good. Single-stepping through a probed instruction was shifted too.
#[test]
fn faults_and_single_steps_are_where_the_program_expects_them() {
    let plain = run_plain("faults", &[]);
    assert!(plain.stdout.contains("SIGSEGV at fl_load_insn+0"), "{}", plain.stdout);
    let specs = "faults:fl_load_insn faults:fl_div_insn faults:fl_call_insn faults:fl_step_a \
                 faults:probed_after";
    let probed = run_probed("faults", &[], specs);
    assert_same_behaviour(&plain, &probed);
    for (symbol, n) in
        [("fl_load_insn", 2), ("fl_div_insn", 2), ("fl_call_insn", 1), ("fl_step_a", 1)]
    {
        assert_eq!(probed.hits(symbol), n, "{symbol}");
    }
    assert_eq!(probed.hits("probed_after"), 5, "counting goes on after the siglongjmp");
}

/// Defect: a probed `popfq` that sets the trap flag took its single step one instruction early,
/// on both paths (the step came after libuprobe's jump back, not after the program's next
/// instruction). It stays a trap, and the trap path emulates it when it sets the flag.
#[test]
fn a_probed_popfq_steps_where_it_would() {
    let plain = run_plain("faults", &[]);
    assert!(plain.stdout.contains("single steps at: +4 +9 "), "{}", plain.stdout);
    for path in ["jump", "trap"] {
        let probed =
            run_probed_env("faults", &[], "faults:fl_step_popf", &[("UPROBES_PATH", path)]);
        assert_same_behaviour(&plain, &probed);
        assert_eq!(probed.hits("fl_step_popf"), 1, "{path}");
        assert_eq!(probed.probe("fl_step_popf")["path"], "trap", "{path}");
    }
}

/// Defect: a probe on a function that returns with `ret imm16` aborted the program under
/// `%return`.
#[test]
fn a_return_probe_on_a_function_that_pops_its_arguments() {
    let plain = run_plain("defects", &["ret16", "10"]);
    assert_eq!(plain.stdout, "ret16: 55\n");
    let probed = run_probed("defects", &["ret16", "10"], "defects:ret16_fn%return");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("ret16_fn"), 10);
}

/// Defect: a pending probe on an IFUNC crashed the dlopen that loaded its object (the rescan
/// resolved the IFUNC before the object was relocated).
#[test]
fn a_pending_probe_on_an_ifunc_waits_for_relocation() {
    let lib = fixture("libifunc.so").display().to_string();
    let plain = run_plain("defects", &["ifunc", &lib, "100"]);
    assert_eq!(plain.stdout, "ifunc: 9900\n");
    let probed = run_probed("defects", &["ifunc", &lib, "100"], "libifunc.so:pick");
    assert_same_behaviour(&plain, &probed);
    let p = probed.probe("pick");
    assert_eq!((p["state"].as_str(), p["hits"].as_u64()), (Some("active"), Some(100)), "{p}");
}

/// Defect: a rescan while a probed page was briefly not executable forgot the probe, and its
/// int3 stayed: the next hit killed the process with SIGTRAP.
#[test]
fn a_page_briefly_not_executable_keeps_its_probe() {
    let lib = fixture("libcounted.so").display().to_string();
    let plain = run_plain("defects", &["mprot", &lib]);
    assert_eq!(plain.stdout, "mprot: loaded, 5\n");
    let probed = run_probed("defects", &["mprot", &lib], "defects:pagef");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("pagef"), 2);
}

/// Defect: calls made by other libraries' constructors (before libuprobe's) and destructors
/// (after the summary) were missed.
#[test]
fn constructors_and_destructors_of_other_libraries_count() {
    let plain = run_plain("ctor", &[]);
    assert_eq!(plain.stdout, "ctor: 5\n");
    let probed = run_probed("ctor", &[], "libctor.so:ctor_work");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("ctor_work"), 5 + 2 + 3, "constructor, main, destructor");
}

/// Defects: a posix_spawn child (also behind system()) runs glibc code with every signal blocked
/// (and resets the handlers of blocked signals): any probe hit there killed it, whatever the
/// function. And a probe on wait4 killed the parent when the child's exec failed (ENOEXEC).
#[test]
fn probes_in_code_a_posix_spawn_child_runs() {
    let specs = "libc.so.6:strlen libc.so.6:getenv libc.so.6:strchr libc.so.6:strchrnul \
                 libc.so.6:mempcpy libc.so.6:getuid libc.so.6:getgid libc.so.6:__libc_sigaction \
                 libc.so.6:sigprocmask libc.so.6:dup2 libc.so.6:wait4 libc.so.6:waitpid \
                 libc.so.6:_exit libc.so.6:execve";
    let not_exec = scratch("noexec");
    std::fs::write(&not_exec, b"not a program\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&not_exec).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&not_exec, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let not_exec = not_exec.display().to_string();
    for args in [
        vec!["spawn", "fa", "true"],
        vec!["spawn", "resetids", "true"],
        vec!["spawn", "noexec", &not_exec],
        vec!["spawn", "system", "exit 3"],
    ] {
        let plain = run_plain("defects", &args);
        let probed = run_probed("defects", &args, specs);
        assert_same_behaviour(&plain, &probed);
        assert!(probed.errors().is_empty(), "{args:?}: {:?}", probed.errors());
    }
    std::fs::remove_file(not_exec).unwrap();
}

/// Defect: `%return` on vfork killed the program; on _Unwind_RaiseException it turned every C++
/// throw into std::terminate; on dlsym it broke dlsym(RTLD_NEXT). They are refused, with why.
#[test]
fn return_probes_that_would_break_the_program_are_refused() {
    let plain = run_plain("exc", &[]);
    let probed = run_probed("exc", &[], "libgcc_s.so.1:*%return");
    assert_same_behaviour(&plain, &probed);
    let refused: Vec<&Value> = probed.probes().iter().filter(|p| p["state"] == "failed").collect();
    assert!(
        refused.iter().any(|p| p["symbol"] == "_Unwind_RaiseException"
            && p["error"].as_str().unwrap().contains("unwinder starts from its own return")),
        "{refused:#?}"
    );
    for (spec, why) in [
        ("libc.so.6:vfork%return", "returns twice"),
        ("libc.so.6:dlsym%return", "its own return address"),
        ("libc.so.6:_setjmp%return", "returns twice"),
    ] {
        let probed = run_probed("counts", &[], spec);
        let p = &probed.probes()[0];
        assert_eq!(p["state"], "failed", "{spec}");
        assert!(p["error"].as_str().unwrap().contains(why), "{spec}: {p}");
    }
}

/// A coroutine that suspends inside a return-probed function on one thread and returns on
/// another: its return is found in the first thread's return stack.
#[test]
fn a_coroutine_returning_on_another_thread() {
    let plain = run_plain("defects", &["coro"]);
    assert_eq!(plain.stdout, "coro: 42\n");
    let probed = run_probed("defects", &["coro"], "defects:co_f%return");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.hits("co_f"), 1);
}

/// Defect: when a return cannot be matched to any call (a stack switch libuprobe did not see),
/// libuprobe stops the program rather than jump anywhere; its message was not a line of its own
/// (no newline), and ran into the next output.
#[test]
fn a_return_nobody_called_stops_the_program_with_a_message_of_its_own() {
    let probed = run_probed("defects", &["lostret"], "defects:grab%return");
    assert_eq!(probed.signal(), Some(libc::SIGABRT), "{}", probed.stderr);
    assert!(probed.stdout.starts_with("lostret: returning into it\n"), "{}", probed.stdout);
    let line = probed.stderr.lines().find(|l| l.contains("returned on a stack")).unwrap();
    assert!(line.starts_with("libuprobe: ") && line.ends_with("aborting"), "{:?}", probed.stderr);
    assert!(probed.stderr.contains("aborting\n"), "{:?}", probed.stderr);
}

/// CPU ticks (user + system) the thread of process `pid` named `name` has used.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        total += fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// Defect: the control socket and its eventfd took descriptors 3 and 4 (the program's first
/// `open` got 5), and after a daemon's `closerange(3, ~0)` libuprobe's thread accepted the
/// program's own TCP client, read 8 of 16 bytes from its pipe, and spun on a regular file put
/// where its listener was. Its descriptors are now high, checked before each use, and made again
/// elsewhere when the program took them: the program's own are never touched.
#[test]
fn the_programs_descriptors_stay_its_own() {
    use common::served::Served;
    let mut s = Served::start_program("fds", &[], &[("UPROBES", "fds:target")]);
    assert_eq!(s.tell("first"), "first 3");
    assert_eq!(s.tell("daemon"), "daemon pipe 16 tcp 16");
    assert_eq!(s.tell("first"), "first 3");
    // The server notices at its next round (a poll in flight keeps a closed descriptor's file).
    let answered = |s: &Served| {
        use std::io::{BufRead, Write};
        let start = std::time::Instant::now();
        loop {
            let answer =
                std::os::unix::net::UnixStream::connect(&s.socket).ok().and_then(|mut c| {
                    c.write_all(b"list\n").ok()?;
                    let mut line = String::new();
                    std::io::BufReader::new(c).read_line(&mut line).ok()?;
                    serde_json::from_str::<serde_json::Value>(&line).ok()
                });
            if answer.is_some_and(|v| v["ok"] == true) {
                return;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "the socket was not served again"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    answered(&s);
    let before = thread_ticks(s.child.id(), "uprobe-ctl");
    assert_eq!(s.tell("squat"), "squat offset 0", "libuprobe read the program's file");
    let spent = thread_ticks(s.child.id(), "uprobe-ctl") - before;
    assert!(spent < 50, "the server used {spent} ticks in 2.5 seconds: it spun");
    answered(&s);
    assert_eq!(s.tell("call 1000"), "done 1000");
    let report = s.quit();
    let summary = report.iter().find(|v| v["type"] == "summary").unwrap();
    assert_eq!(summary["probes"][0]["hits"], 1000, "{summary}");
}

/// Defect: a program's signal handler that `siglongjmp`ed out of a hit it interrupted (with
/// `%stack`, most of each call is libuprobe's) left that hit's hold on the published table for
/// good: the next `dlopen` waited forever for it, with the program's signals blocked (SIGTERM no
/// longer ended it). Writers now wait a bounded time and give that reader up (the tables it may
/// hold are never freed).
#[test]
fn a_siglongjmp_out_of_a_hit_leaves_no_writer_waiting() {
    let lib_path = fixture("libcounted.so");
    let lib_arg = lib_path.to_str().unwrap();
    let plain = run_plain("longjmp", &["300", lib_arg]);
    assert_eq!(plain.stdout, "longjmp: 300 jumps, then a library loaded\n");
    for spec in ["longjmp:visit%stack", "longjmp:visit"] {
        let probed = run_probed_env("longjmp", &["300", lib_arg], spec, &[("UPROBES_TRACE", "1")]);
        assert_same_behaviour(&plain, &probed);
        assert!(probed.hits("visit") > 300, "{spec}");
    }
}

/// Defect: a raw `clone(CLONE_SETTLS)` thread whose `fs` points into a block of the program's:
/// probed hits wrote 8 to 10 bytes below `fs`, into the block, and with the block filled (0x41)
/// the process died of SIGSEGV, on both paths. libuprobe reads nothing below such an `fs` (its
/// canary is not glibc's): the thread's hits count through the shared counters, its return
/// probes' calls are `missed`, its events lost (and said so).
#[test]
fn a_foreign_tls_is_left_alone_and_still_counted() {
    let plain = run_plain("rawtls", &["1000"]);
    assert_eq!(plain.stdout, "rawtls: child 1000000 main 1000000 block intact\n");
    for path in ["jump", "trap"] {
        let probed = run_probed_env("rawtls", &["1000"], "rawtls:work", &[("UPROBES_PATH", path)]);
        assert_same_behaviour(&plain, &probed);
        assert_eq!(probed.hits("work"), 2000, "{path}");
        let ret =
            run_probed_env("rawtls", &["1000"], "rawtls:work%return", &[("UPROBES_PATH", path)]);
        assert_same_behaviour(&plain, &ret);
        let p = ret.probe("work");
        assert_eq!(
            (p["hits"].as_u64(), p["missed"].as_u64()),
            (Some(1000), Some(1000)),
            "{path}: {p}"
        );
    }
}
