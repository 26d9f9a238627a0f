//! Real programs nobody here wrote, under broad probes: they print and exit exactly as without
//! libuprobe. A program that is not installed is skipped, saying so (`.ci/run` installs them).

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// What one run of a program gave.
struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    signal: Option<i32>,
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run `argv` in `dir` (plain when `specs` is None), with `env`.
fn run(argv: &[&str], dir: &Path, specs: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).current_dir(dir);
    if let Some(specs) = specs {
        cmd.env("LD_PRELOAD", lib()).env("UPROBES", specs).env("UPROBES_OUTPUT", "/dev/null");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (stdout, stderr, status) = run_command(cmd);
    use std::os::unix::process::ExitStatusExt;
    Run { stdout, stderr, code: status.code(), signal: status.signal() }
}

/// Run a program plain and under each spec: the same stdout, stderr and exit status.
fn same_under(argv: &[&str], dir: &Path, specs: &[&str], env: &[(&str, &str)]) {
    if !installed(argv[0]) {
        eprintln!("skipped {}: not installed", argv[0]);
        return;
    }
    let plain = run(argv, dir, None, env);
    assert_eq!(plain.signal, None, "{argv:?} plain: {}", plain.stderr);
    for spec in specs {
        let probed = run(argv, dir, Some(spec), env);
        assert_eq!(
            (probed.code, probed.signal),
            (plain.code, plain.signal),
            "{argv:?} under {spec}: {}",
            probed.stderr
        );
        assert_eq!(probed.stdout, plain.stdout, "{argv:?} under {spec}");
        assert_eq!(probed.stderr, plain.stderr, "{argv:?} under {spec}");
    }
}

fn workdir(tag: &str) -> std::path::PathBuf {
    let d = scratch(tag);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Defect: GNU make runs each recipe with posix_spawn and POSIX_SPAWN_RESETIDS; its child calls
/// getuid with every signal blocked: `make` under `libc.so.6:getuid` died of SIGTRAP.
#[test]
fn make_runs_its_recipes_under_getuid_and_all_of_libc() {
    let dir = workdir("make");
    std::fs::write(
        dir.join("Makefile"),
        "all: a b\n\ta=1; echo made $$a\na:\n\techo a > a\nb:\n\techo b > b\n",
    )
    .unwrap();
    same_under(&["make", "-s", "-B"], &dir, &["libc.so.6:getuid", "libc.so.6:*"], &[]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Defects: python3's os.posix_spawnp child died of SIGTRAP under `libc.so.6:strlen`; its
/// subprocess.run died under `libc.so.6:*%return` (vfork returned twice).
#[test]
fn python_spawns_and_runs_subprocesses() {
    let dir = workdir("python");
    let script = "import os, subprocess, sys\n\
                  pid = os.posix_spawnp('echo', ['echo', 'spawned'], os.environ)\n\
                  print(os.waitpid(pid, 0)[1])\n\
                  print(subprocess.run(['sh', '-c', 'echo run; exit 3']).returncode)\n\
                  print(sorted(x * 7 % 11 for x in range(20)))\n";
    std::fs::write(dir.join("t.py"), script).unwrap();
    same_under(
        &["python3", "t.py"],
        &dir,
        &["libc.so.6:strlen", "libc.so.6:*%return", "libc.so.6:*"],
        &[],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Defect: `tar czf` (which starts gzip with vfork) reported "Child died with signal 5" under
/// `libc.so.6:*%return`.
#[test]
fn tar_with_a_compressor_child() {
    let dir = workdir("tar");
    for i in 0..20 {
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}\n").repeat(100)).unwrap();
    }
    same_under(
        &["sh", "-c", "tar czf - f* | gzip -dc | tar tvf - | wc -l"],
        &dir,
        &["libc.so.6:*%return", "libc.so.6:*"],
        &[],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A program that finds the next definition of a function with dlsym(RTLD_NEXT): under
/// `libc.so.6:*%return`, dlsym is refused (it finds its caller from its return address).
#[test]
fn dlsym_rtld_next_under_every_return_probe() {
    let dir = workdir("rtldnext");
    let perl = "use POSIX; print POSIX::floor(3.7), \"\\n\"; print join(',', map { $_ * 2 } 1..5), \"\\n\"";
    same_under(&["perl", "-e", perl], &dir, &["libc.so.6:*%return"], &[]);
    let plain = run_plain("defects", &["rtldnext"]);
    let probed = run_probed("defects", &["rtldnext"], "libc.so.6:*%return");
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.stdout, "rtldnext: found malloc\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// sqlite3, a multithreaded compressor, git, a shell loop that starts children, and a
/// multithreaded fixture, under every function of libc (entries, then returns): on the jump path
/// these run at nearly their own speed, so the loop and the compressor do real work.
#[test]
fn sqlite_xz_git_a_shell_loop_and_threads_under_all_of_libc() {
    let dir = workdir("more");
    let sql = "create table t(a integer, b text); begin; \
               with recursive c(x) as (select 1 union all select x + 1 from c where x < 3000) \
               insert into t select x, printf('row %d', x) from c; commit; \
               select count(*), sum(a), max(length(b)) from t where b like '%7%';";
    let all = ["libc.so.6:*", "libc.so.6:*%return"];
    same_under(&["sqlite3", ":memory:", sql], &dir, &all, &[]);
    std::fs::write(dir.join("in.txt"), (0..50_000).map(|i| format!("{i}\n")).collect::<String>())
        .unwrap();
    same_under(&["sh", "-c", "xz -T2 -c in.txt | xz -dc | md5sum"], &dir, &all, &[]);
    same_under(
        &["dash", "-c", "i=0; while [ $i -lt 40 ]; do /bin/true; i=$((i+1)); done; echo $i"],
        &dir,
        &all,
        &[],
    );
    let repo = env!("CARGO_MANIFEST_DIR");
    same_under(&["git", "-C", repo, "rev-list", "--count", "HEAD"], &dir, &all, &[]);
    let plain = run_plain("threads", &["8", "20000"]);
    for spec in all {
        let probed = run_probed("threads", &["8", "20000"], spec);
        assert_same_behaviour(&plain, &probed);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
