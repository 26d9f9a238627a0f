//! Builds the C fixtures the tests and the benchmark run under the preloaded library. Each fixture is
//! an executable or shared library built from an explicit list of sources with the C compiler the `cc`
//! crate finds; their directory reaches the tests as the `UPROBE_FIXTURES` environment variable.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Fixture {
    out: &'static str,
    sources: &'static [&'static str],
    flags: &'static [&'static str],
}

/// C++ fixtures, built with the C++ compiler.
const CPP_FIXTURES: &[Fixture] = &[Fixture { out: "exc", sources: &["exc.cc"], flags: &[] }];

/// Shared libraries first: executables link against them.
const FIXTURES: &[Fixture] = &[
    Fixture { out: "libcounted.so", sources: &["counted.c"], flags: &["-shared", "-fPIC"] },
    Fixture {
        out: "libstk.so",
        sources: &["stk_lib.c"],
        flags: &["-shared", "-fPIC", "-O2", "-fomit-frame-pointer"],
    },
    Fixture {
        out: "stacks",
        sources: &["stacks.c"],
        flags: &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-L{out}",
            "-lstk",
            "-Wl,-rpath,$ORIGIN",
        ],
    },
    // The same library and program with every FDE's CIE pointer damaged (see `damage_eh_frame`).
    Fixture {
        out: "libstkbad.so",
        sources: &["stk_lib.c"],
        flags: &["-shared", "-fPIC", "-O2", "-fomit-frame-pointer"],
    },
    Fixture {
        out: "stacks_bad",
        sources: &["stacks.c"],
        flags: &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-L{out}",
            "-lstkbad",
            "-Wl,-rpath,$ORIGIN",
        ],
    },
    Fixture {
        out: "counts",
        sources: &["counts.c"],
        flags: &["-L{out}", "-lcounted", "-Wl,-rpath,$ORIGIN"],
    },
    Fixture { out: "zoo", sources: &["zoo.S", "zoo_main.c"], flags: &[] },
    Fixture {
        out: "attached",
        sources: &["attached.c"],
        flags: &["-pthread", "-L{out}", "-lcounted", "-Wl,-rpath,$ORIGIN"],
    },
    Fixture { out: "threads", sources: &["threads.c"], flags: &["-pthread"] },
    Fixture { out: "workload", sources: &["workload.c"], flags: &["-pthread", "-fno-builtin"] },
    Fixture { out: "own_trap", sources: &["own_trap.c"], flags: &[] },
    Fixture { out: "bench", sources: &["bench.c"], flags: &["-O2"] },
    Fixture { out: "dl", sources: &["dl.c"], flags: &["-ldl"] },
    Fixture { out: "forks", sources: &["forks.c"], flags: &["-pthread", "-ldl"] },
    Fixture { out: "serve", sources: &["serve.c"], flags: &["-pthread"] },
    Fixture { out: "args", sources: &["args.c"], flags: &["-pthread"] },
    Fixture { out: "ret", sources: &["ret.c"], flags: &["-pthread", "-rdynamic"] },
    Fixture { out: "libifunc.so", sources: &["ifunc.c"], flags: &["-shared", "-fPIC"] },
    Fixture {
        out: "libcounted2.so",
        sources: &["counted.c"],
        flags: &["-shared", "-fPIC", "-DPAD"],
    },
    Fixture { out: "libctor.so", sources: &["ctor.c"], flags: &["-shared", "-fPIC"] },
    Fixture {
        out: "ctor",
        sources: &["ctor_main.c"],
        flags: &["-L{out}", "-lctor", "-Wl,-rpath,$ORIGIN"],
    },
    Fixture {
        out: "defects",
        sources: &["defects.c", "ret16.S"],
        flags: &["-pthread", "-ldl", "-rdynamic"],
    },
    Fixture { out: "faults", sources: &["faults.S", "faults_main.c"], flags: &[] },
    Fixture { out: "jumps", sources: &["jumps.S", "jumps_main.c"], flags: &["-pthread"] },
    Fixture { out: "secure", sources: &["secure.c"], flags: &[] },
    Fixture { out: "creds", sources: &["creds.c"], flags: &["-pthread"] },
    Fixture { out: "fds", sources: &["fds.c"], flags: &[] },
    Fixture { out: "longjmp", sources: &["longjmp.c"], flags: &["-ldl"] },
    Fixture { out: "rawtls", sources: &["rawtls.c"], flags: &[] },
    Fixture { out: "jit", sources: &["jit.c"], flags: &[] },
    Fixture {
        out: "sample",
        sources: &["sample.c"],
        flags: &["-O2", "-fomit-frame-pointer", "-rdynamic", "-ldl"],
    },
];

/// Point every FDE of `lib`'s `.eh_frame` at a CIE far before the section (its CIE pointer made
/// huge): an unwinder that trusts it reads outside the section (tests/stacks.rs).
fn damage_eh_frame(lib: &Path) {
    let mut b = std::fs::read(lib).expect("read the library to damage");
    let u = |b: &[u8], at: usize, n: usize| -> u64 {
        b[at..at + n].iter().rev().fold(0, |v, &x| (v << 8) | x as u64)
    };
    let (shoff, shentsize, shnum, shstrndx) = (
        u(&b, 0x28, 8) as usize,
        u(&b, 0x3a, 2) as usize,
        u(&b, 0x3c, 2) as usize,
        u(&b, 0x3e, 2) as usize,
    );
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u(&b, sh(shstrndx) + 0x18, 8) as usize;
    let eh = (0..shnum)
        .find(|&i| {
            let name = strtab + u(&b, sh(i), 4) as usize;
            b[name..].starts_with(b".eh_frame\0")
        })
        .expect("an .eh_frame section");
    let (off, size) = (u(&b, sh(eh) + 0x18, 8) as usize, u(&b, sh(eh) + 0x20, 8) as usize);
    let mut at = off;
    let mut damaged = 0;
    while at + 8 <= off + size {
        let len = u(&b, at, 4) as usize;
        if len == 0 {
            break;
        }
        if u(&b, at + 4, 4) != 0 {
            // An FDE: its CIE pointer counts back from here.
            b[at + 4..at + 8].copy_from_slice(&0x4000_0000u32.to_le_bytes());
            damaged += 1;
        }
        at += 4 + len;
    }
    assert!(damaged > 0, "no FDE to damage in {}", lib.display());
    std::fs::write(lib, b).expect("write the damaged library");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fixtures");
    std::fs::create_dir_all(&out).expect("create fixtures dir");
    let c = cc::Build::new().cargo_metadata(false).get_compiler();
    let cpp = cc::Build::new().cargo_metadata(false).cpp(true).get_compiler();
    let src = Path::new("c_fixtures");
    println!("cargo:rerun-if-changed=build.rs");
    let all = FIXTURES.iter().map(|f| (f, &c)).chain(CPP_FIXTURES.iter().map(|f| (f, &cpp)));
    for (f, compiler) in all {
        let mut cmd = Command::new(compiler.path());
        cmd.args(["-O1", "-g", "-Wall", "-fno-omit-frame-pointer"]);
        for s in f.sources {
            println!("cargo:rerun-if-changed={}", src.join(s).display());
            cmd.arg(src.join(s));
        }
        for flag in f.flags {
            cmd.arg(flag.replace("{out}", &out.display().to_string()));
        }
        cmd.arg("-o").arg(out.join(f.out));
        let result =
            cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", compiler.path()));
        if !result.status.success() {
            panic!(
                "building fixture {} failed:\n{:?}\n{}",
                f.out,
                cmd,
                String::from_utf8_lossy(&result.stderr)
            );
        }
    }
    damage_eh_frame(&out.join("libstkbad.so"));
    println!("cargo:rustc-env=UPROBE_FIXTURES={}", out.display());
    // libuprobe's constructor runs before every other object's (DF_1_INITFIRST), so that the calls
    // other libraries' constructors make are counted.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,initfirst");
    // Never unloaded (its exit handler and trampolines must stay mapped).
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
