//! Probes follow objects that appear and vanish after start: dlopen, dlclose, dlmopen, a hard link,
//! the program's own mmap, and loads that libc makes by itself.

mod common;
use common::*;

const N: u64 = 300;

fn lib() -> String {
    fixture("libcounted.so").display().to_string()
}

/// File offset of lib_add in libcounted.so, from its symbol table.
fn lib_add_offset() -> u64 {
    symbol_in_file("libcounted.so", "lib_add").1
}

#[test]
fn a_pending_probe_is_installed_when_its_library_is_loaded() {
    let n = N.to_string();
    let plain = run_plain("dl", &["late", &lib(), &n]);
    let probed = run_probed("dl", &["late", &lib(), &n], "libcounted.so:lib_add");
    assert_same_behaviour(&plain, &probed);
    assert!(probed.errors().is_empty(), "{:?}", probed.errors());
    let p = probed.probe("lib_add");
    assert_eq!((p["hits"].as_u64(), p["state"].as_str()), (Some(N), Some("active")));
    assert_eq!(p["offset"], lib_add_offset());
}

#[test]
fn counts_carry_on_across_dlclose_and_dlopen_again() {
    let n = N.to_string();
    let probed = run_probed("dl", &["reopen", &lib(), &n], "libcounted:lib_add");
    assert_same_behaviour(&run_plain("dl", &["reopen", &lib(), &n]), &probed);
    assert_eq!(probed.probes().len(), 1, "one probe across both loads");
    assert_eq!(probed.hits("lib_add"), 2 * N);
}

#[test]
fn the_same_file_mapped_three_times_is_one_site_in_three_mappings() {
    let link = scratch("libcounted-link.so");
    std::fs::hard_link(fixture("libcounted.so"), &link).unwrap();
    let n = N.to_string();
    let args = ["twice", &lib(), &n, link.to_str().unwrap()];
    let probed = run_probed("dl", &args, "libcounted.so:lib_add");
    assert_same_behaviour(&run_plain("dl", &args), &probed);
    assert_eq!(probed.hits("lib_add"), 3 * N, "dlopen, dlmopen(LM_ID_NEWLM) and a hard link");
    std::fs::remove_file(link).unwrap();
}

#[test]
fn an_executable_mapping_made_by_the_program_itself_gets_the_probes() {
    let n = N.to_string();
    let off = format!("{:#x}", lib_add_offset());
    let args = ["mmap", &lib(), &n, &off];
    let probed = run_probed("dl", &args, "libcounted.so:lib_add");
    assert_same_behaviour(&run_plain("dl", &args), &probed);
    let p = probed.probe("lib_add");
    assert_eq!(p["hits"], N);
    assert_eq!(p["state"], "pending", "the program unmapped it again before exit");
}

#[test]
fn a_library_that_libc_loads_by_itself_gets_its_probes() {
    // iconv_open makes libc load the gconv module ISO8859-2.so through its own __libc_dlopen, not
    // dlopen, and run its gconv_init at once: only the loader's debugger interface (r_brk) sees
    // the load, and only a hook that runs before the module's code counts gconv_init.
    let n = N.to_string();
    let specs = "ISO8859-2.so:gconv ISO8859-2.so:gconv_init";
    let probed = run_probed("dl", &["libc", "-", &n], specs);
    assert_same_behaviour(&run_plain("dl", &["libc", "-", &n]), &probed);
    assert_eq!(probed.hits("gconv_init"), 1);
    assert_eq!(probed.hits("gconv"), N);
}

#[test]
fn objects_that_never_load_are_reported_as_such() {
    let probed = run_probed("counts", &[], "libnothere.so:f nothere:g");
    assert!(probed.probes().iter().all(|p| p["state"] == "pending"));
    let mut cmd = std::process::Command::new(fixture("counts"));
    cmd.env("LD_PRELOAD", common::lib()).env("UPROBES", "libnothere.so:f");
    let (_, stderr, _) = run_command(cmd);
    assert!(stderr.contains("no object named by the specs was ever loaded"), "{stderr}");
}

/// What is learnt of a file (symbols, libc's mask-fix sites) is kept in a cache by the file's
/// identity: the next process reads it instead of parsing; a damaged entry is parsed again; the
/// cache changes no result.
#[test]
fn the_object_cache_changes_nothing_but_the_time() {
    let home = scratch("cache-home");
    std::fs::create_dir_all(&home).unwrap();
    let xdg = home.to_str().unwrap();
    let specs = "libc.so.6:malloc libc.so.6:free jumps:j_long";
    // Traps only: the mask fixes (whose sites the cache keeps) go in with the first probe; on
    // the jump path a process whose sites are all jumps does without them.
    let env = [("XDG_RUNTIME_DIR", xdg), ("UPROBES_SOCKET", "none"), ("UPROBES_PATH", "trap")];
    let plain = run_plain("jumps", &["classes", "100"]);
    let first = run_probed_env("jumps", &["classes", "100"], specs, &env);
    let dir = home.join("uprobe/cache");
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    assert!(entries.iter().any(|p| p.extension().is_some_and(|e| e == "maskfix")), "{entries:?}");
    assert!(entries.iter().filter(|p| p.extension().is_some_and(|e| e == "elf")).count() >= 2);
    let second = run_probed_env("jumps", &["classes", "100"], specs, &env);
    // Damaged entries: cut short, and garbage.
    for (i, p) in entries.iter().enumerate() {
        let data = std::fs::read(p).unwrap();
        let bad = if i % 2 == 0 { data[..data.len() / 2].to_vec() } else { vec![0x5a; data.len()] };
        std::fs::write(p, bad).unwrap();
    }
    let third = run_probed_env("jumps", &["classes", "100"], specs, &env);
    let off = run_probed_env(
        "jumps",
        &["classes", "100"],
        specs,
        &[env[0], env[1], ("UPROBES_CACHE", "0")],
    );
    for o in [&first, &second, &third, &off] {
        assert_same_behaviour(&plain, o);
        assert!(o.errors().is_empty(), "{:?}", o.errors());
        assert_eq!(o.hits("j_long"), 100);
        assert_eq!(o.probe("malloc")["state"], "active");
        assert_eq!(o.probe("malloc")["hits"], first.probe("malloc")["hits"]);
    }
    std::fs::remove_dir_all(&home).unwrap();
}
