//! Hostile and unusual input: probes where glibc blocks every signal, addresses that are not
//! instruction boundaries, instructions decoded among other probes, specs of any length and bytes,
//! environment variables that cannot be used.

mod common;
use common::*;

use iced_x86::{Decoder, DecoderOptions};

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

/// (vaddr, instruction offsets) of a function of an ELF file, decoded from the file.
fn instructions(path: &str, name: &str) -> (u64, Vec<u64>) {
    let bytes = std::fs::read(path).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    let sym = elf
        .dynsyms
        .iter()
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some(name) && s.st_size > 0)
        .unwrap_or_else(|| panic!("{name} in {path}"));
    let ph = elf
        .program_headers
        .iter()
        .find(|p| p.p_type == goblin::elf::program_header::PT_LOAD && p.is_executable())
        .unwrap();
    let off = (sym.st_value - ph.p_vaddr + ph.p_offset) as usize;
    let code = &bytes[off..off + sym.st_size as usize];
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        out.push(d.ip());
        let _ = d.decode();
    }
    (sym.st_value, out)
}

/// Defect: probes where glibc runs with every signal blocked were refused by name only, and the
/// list was far from complete: `pthread_create+0x555` killed `/bin/true` (libuprobe starts a
/// thread of its own), an address spec skipped the name check (`libc.so.6:0x35360`, the refused
/// __ctype_init). Now SIGTRAP is never blocked: every instruction of pthread_create is probed at
/// once while threads start and exit.
#[test]
fn every_instruction_of_pthread_create_while_threads_come_and_go() {
    let (_, offsets) = instructions(LIBC, "pthread_create");
    assert!(offsets.len() > 200, "{}", offsets.len());
    let specs: Vec<String> =
        offsets.iter().map(|o| format!("libc.so.6:pthread_create+{o:#x}")).collect();
    let plain = run_plain("threads", &["4", "1000"]);
    let probed = run_probed("threads", &["4", "1000"], &specs.join(" "));
    assert_same_behaviour(&plain, &probed);
    assert!(probed.probes().iter().all(|p| p["state"] == "active"));
    assert_eq!(probed.probe_by_spec("libc.so.6:pthread_create+0x0")["hits"], 4);

    let (ctype_init, _) = instructions(LIBC, "__ctype_init");
    let spec = format!("libc.so.6:{ctype_init:#x} libc.so.6:pthread_create+0x555");
    let probed = run_probed("threads", &["4", "1000"], &spec);
    assert_same_behaviour(&plain, &probed);
    let p = probed.probe_by_spec(&format!("libc.so.6:{ctype_init:#x}"));
    assert_eq!(p["hits"], 4, "each new thread runs __ctype_init, every signal blocked: {p}");
    let mut cmd = std::process::Command::new("/bin/true");
    cmd.env("LD_PRELOAD", lib()).env("UPROBES", "libc.so.6:pthread_create+0x555");
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// Defect: an address that is not an instruction boundary, outside every symbol (inside a PLT
/// entry), was accepted and corrupted the code (SIGILL).
#[test]
fn an_address_outside_every_symbol_is_checked_by_decoding_its_section() {
    let bytes = std::fs::read(fixture("counts")).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    let plt = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".plt"))
        .expect("a .plt section")
        .sh_addr;
    let plain = run_plain("counts", &[]);
    let inside = format!("counts:{:#x}", plt + 0x11);
    let probed = run_probed("counts", &[], &inside);
    assert_same_behaviour(&plain, &probed);
    let p = &probed.probes()[0];
    assert_eq!(p["state"], "failed", "{p}");
    assert!(p["error"].as_str().unwrap().contains("not a known instruction boundary"), "{p}");
    let entry = format!("counts:{:#x}", plt + 0x10);
    let probed = run_probed("counts", &[], &entry);
    assert_same_behaviour(&plain, &probed);
    assert_eq!(probed.probes()[0]["state"], "active");
}

/// Defect: boundaries were decoded from memory, where another probe's int3 (and the mapping
/// split it caused) misled the decoder: `crc32_z` then `crc32_z+0x332` refused the second. Every
/// instruction of crc32_z and of inflate (which spans several pages), at once.
#[test]
fn every_instruction_of_a_function_is_a_boundary_among_probes() {
    let libz = "/usr/lib/x86_64-linux-gnu/libz.so.1";
    if !std::path::Path::new(libz).exists() {
        return eprintln!("skipped: {libz} is not installed");
    }
    let mut specs = Vec::new();
    for f in ["crc32_z", "inflate"] {
        let (_, offsets) = instructions(libz, f);
        specs.extend(offsets.iter().map(|o| format!("libz.so.1:{f}+{o:#x}")));
    }
    let plain = run_plain("defects", &["zlib", "200"]);
    let probed = run_probed("defects", &["zlib", "200"], &specs.join(" "));
    assert_same_behaviour(&plain, &probed);
    let refused: Vec<_> = probed.probes().iter().filter(|p| p["state"] != "active").collect();
    assert!(
        refused.is_empty(),
        "{} of {} refused: {}",
        refused.len(),
        specs.len(),
        short(&refused)
    );
    assert_eq!(probed.probe_by_spec("libz.so.1:crc32_z+0x0")["hits"], 200);
}

/// Defect: a spec longer than 65,535 characters made the report writer panic at exit (stdout lost,
/// exit 134).
#[test]
fn a_spec_of_any_length_is_a_failed_probe_not_a_crash() {
    let plain = run_plain("counts", &[]);
    for spec in [
        format!("counts:{}", "x".repeat(70_000)),
        "a".repeat(100_000),
        format!("{}:leaf", "o".repeat(70_000)),
        format!("counts:leaf({})", "int,".repeat(20_000)),
    ] {
        let probed = run_probed("counts", &[], &format!("{spec} counts:leaf"));
        assert_same_behaviour(&plain, &probed);
        assert_eq!(probed.probe_by_spec("counts:leaf")["hits"], 1000);
        assert_eq!(probed.probes().len(), 2);
        // The text summary, to stderr, too.
        let mut cmd = std::process::Command::new(fixture("counts"));
        cmd.env("LD_PRELOAD", lib()).env("UPROBES", format!("{spec} counts:leaf"));
        let (stdout, stderr, status) = run_command(cmd);
        assert_eq!((stdout.as_str(), status.code()), (plain.stdout.as_str(), Some(7)));
        assert!(stderr.contains("counts:leaf"), "{}", short(&stderr));
    }
}

/// Defect: invalid UTF-8 in UPROBES was ignored silently, and an UPROBES_OUTPUT that cannot be
/// opened fell back to stderr silently.
#[test]
fn unusable_environment_variables_are_said_once() {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.env("LD_PRELOAD", lib())
        .env("UPROBES", std::ffi::OsStr::from_bytes(b"counts:leaf\xff\xfe"));
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(7));
    assert_eq!(stderr.matches("UPROBES is not valid UTF-8").count(), 1, "{stderr}");

    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.env("LD_PRELOAD", lib())
        .env("UPROBES", "counts:leaf")
        .env("UPROBES_OUTPUT", "/nonexistent/dir/report.txt");
    let (_, stderr, status) = run_command(cmd);
    assert_eq!(status.code(), Some(7));
    assert_eq!(stderr.matches("cannot write the report to UPROBES_OUTPUT").count(), 1, "{stderr}");
    assert!(stderr.contains("counts:leaf"), "the report still reaches stderr: {stderr}");
}
