//! VM templates with real VMs: executions restored from one template are
//! unique (CRNG, ASLR, clock), a broken or vanished template never fails an
//! execution (cold boot instead, then a rebuild), a changed agent makes a new
//! template, and nothing (VMM, run dir, scratch file, host cgroup) is left.
//!
//! Each test has a cache of its own whose kernel, images and initramfs are
//! links into the shared cache, so its templates are its own to corrupt and
//! delete while other tests run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::cache::Cache;
use common::{assert_no_cgroups_of, lossy, Env};
use serde_json::Value;

/// `tvm run --json` of `file` with this test's cache; the JSON and the pid
/// of the `tvm` process (host cgroups are named after their owner's pid).
fn run(env: &Env, cache: &Cache, file: &Path, extra_env: &[(&str, &str)]) -> (Value, u32) {
    let mut cmd = env.tvm();
    // On by default; explicit here, so these tests do not depend on the default.
    cmd.env("TVM_CACHE_DIR", cache.dir.path()).env("TVM_TEMPLATES", "1").envs(extra_env.iter().copied());
    cmd.arg("run").arg("--json").arg(file);
    let (out, pid) = output_with_pid(cmd);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): stdout={} stderr={}", lossy(&out.stdout), lossy(&out.stderr)));
    // Warnings (a corrupt template, a fallback) reach a pipe as plain text.
    assert!(!out.stderr.contains(&0x1b), "colour codes on a non-terminal stderr: {}", lossy(&out.stderr));
    env.assert_clean();
    assert_no_cgroups_of(pid);
    (v, pid)
}

fn output_with_pid(mut cmd: Command) -> (Output, u32) {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// The agent the debug `tvm` uses (as `pyrovm::agent_path` finds it).
fn agent_binary() -> PathBuf {
    let sibling = Path::new(env!("CARGO_BIN_EXE_tvm")).with_file_name("tvm-agent");
    if std::fs::read(&sibling).is_ok_and(|b| pyrovm::initrd::is_static_elf(&b)) {
        return sibling;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/agent/x86_64-unknown-linux-gnu/release/tvm-agent"))
}

fn start(v: &Value) -> &str {
    v["start"].as_str().unwrap_or_default()
}

fn stdout(v: &Value) -> String {
    v["run"]["stdout"].as_str().unwrap_or_default().to_string()
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Prints what two clones must not share: CRNG output through both
/// interfaces, the load addresses ASLR picked (stack, heap, vDSO, libc's
/// mmap base), the wall clock and the boot id. The executable's own address
/// is printed but not compared: Debian's python3 is not position-independent
/// (always 0x400000), so ASLR cannot move it in any VM, cloned or not.
const PROBE: &str = r#"
import json, os, time
maps = open('/proc/self/maps').read().splitlines()
def first(tag):
    return next(l.split('-')[0] for l in maps if l.endswith(tag))
print(json.dumps({
    "urandom": open('/dev/urandom', 'rb').read(32).hex(),
    "getrandom": os.getrandom(32).hex(),
    "exe": maps[0].split('-')[0],
    "stack": first('[stack]'),
    "heap": first('[heap]'),
    "vdso": first('[vdso]'),
    "libc": first('libc.so.6'),
    "time": time.time(),
    "boot_id": open('/proc/sys/kernel/random/boot_id').read().strip(),
}))
"#;

#[test]
fn clones_of_one_template_are_unique() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("probe.py", PROBE);
    let (first, _) = run(&env, &cache, &f, &[]);
    assert_eq!(first["verdict"], "ok", "{first}");
    assert_eq!(start(&first), "template", "built on first use, then restored: {first}");
    let template = cache.only();
    // Long enough that a clone still on the template's clock would be off by more than 2 s.
    std::thread::sleep(Duration::from_secs(3));
    let mut seen = Vec::new();
    for _ in 0..2 {
        let before = now_secs();
        let (v, _) = run(&env, &cache, &f, &[]);
        let after = now_secs();
        assert_eq!(v["verdict"], "ok", "{v}");
        assert_eq!(start(&v), "template", "{v}");
        let p: Value = serde_json::from_str(stdout(&v).trim()).unwrap();
        let guest = p["time"].as_f64().unwrap();
        assert!(guest > before - 2.0 && guest < after + 2.0, "guest clock {guest} vs host {before}..{after}");
        seen.push(p);
    }
    assert_eq!(cache.only(), template, "both restored from the same template");
    for key in ["urandom", "getrandom", "stack", "heap", "vdso", "libc", "boot_id"] {
        assert_ne!(seen[0][key], seen[1][key], "{key} is shared between clones: {seen:?}");
    }
    cache.assert_no_scratch();
}

#[test]
fn a_corrupt_template_means_a_cold_boot_then_a_rebuild() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("hello.py", "print('hello')");
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "hello\n"), "{v}");
    let dir = cache.only();

    // Same size, other bytes: only the recorded sha256 can tell.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4096] {
        *b ^= 0xa5;
    }
    std::fs::write(&state, &bytes).unwrap();
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((v["verdict"].as_str(), stdout(&v).as_str()), (Some("ok"), "hello\n"), "{v}");
    assert_eq!(start(&v), "cold", "{v}");
    assert!(v["start_note"].as_str().unwrap_or_default().contains("corrupt"), "{v}");
    assert!(cache.built().is_empty(), "the corrupt template is removed");

    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "hello\n"), "rebuilt: {v}");

    // The guest's RAM is a file of its own, checked like the state: one
    // page changed (same size) is a cold boot, the template removed, and
    // the next start rebuilds it whole.
    let dir = cache.only();
    let ram = std::fs::OpenOptions::new().write(true).open(dir.join("ram")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&ram, &[0xa5; 4096], 1 << 20).unwrap();
    drop(ram);
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((v["verdict"].as_str(), stdout(&v).as_str()), (Some("ok"), "hello\n"), "{v}");
    assert_eq!(start(&v), "cold", "{v}");
    assert!(v["start_note"].as_str().unwrap_or_default().contains("RAM sha256"), "{v}");
    assert!(cache.built().is_empty(), "the corrupt template is removed");
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "hello\n"), "rebuilt: {v}");
    cache.assert_no_scratch();
}

#[test]
fn a_template_that_does_not_restore_is_retried_cold() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("hello.py", "print('hello')");
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!(start(&v), "template", "{v}");
    let dir = cache.only();
    // A state that passes the integrity check but is no VM.
    common::cache::replace_state_keeping_checksums(&dir, &[0x42u8; 1 << 16]);

    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((v["verdict"].as_str(), stdout(&v).as_str()), (Some("ok"), "hello\n"), "{v}");
    assert_eq!(start(&v), "cold", "{v}");
    assert!(v["start_note"].as_str().unwrap_or_default().contains("restore failed"), "{v}");
    assert!(cache.built().is_empty(), "a template that does not restore is removed");
    cache.assert_no_scratch();
}

#[test]
fn a_template_deleted_mid_run_costs_nothing_but_a_rebuild() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("slow.py", "import time\ntime.sleep(3)\nprint('done')");
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!(start(&v), "template", "{v}");

    let mut cmd = env.tvm();
    cmd.env("TVM_CACHE_DIR", cache.dir.path()).env("TVM_TEMPLATES", "1").arg("run").arg("--json").arg(&f);
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    // Once its VM runs the program, the template goes away underneath it.
    let t = std::time::Instant::now();
    while common::vmm_processes(env.runtime_dir.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "VM never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    std::fs::remove_dir_all(cache.templates()).unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", lossy(&out.stderr)));
    assert_eq!((v["verdict"].as_str(), stdout(&v).as_str()), (Some("ok"), "done\n"), "{v}");
    env.assert_clean();
    assert_no_cgroups_of(pid);

    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "done\n"), "rebuilt: {v}");
    cache.assert_no_scratch();
}

#[test]
fn a_changed_agent_makes_a_new_template() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("hello.py", "print('hello')");
    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!(start(&v), "template", "{v}");
    let first = cache.only();

    // Same agent code, different bytes (a trailing note the loader ignores):
    // a different initramfs key, so a different template.
    let agent = std::fs::read(agent_binary()).unwrap();
    let changed = env.work.path().join("tvm-agent");
    std::fs::write(&changed, [agent.as_slice(), b"\0tvm-test: changed agent\0"].concat()).unwrap();
    let changed = changed.to_str().unwrap().to_string();
    let (v, _) = run(&env, &cache, &f, &[("TVM_AGENT_BIN", &changed)]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "hello\n"), "{v}");
    let built = cache.built();
    assert_eq!(built.len(), 2, "a second template for the changed agent: {built:?}");
    let meta = |d: &PathBuf| -> Value { serde_json::from_slice(&std::fs::read(d.join("meta.json")).unwrap()).unwrap() };
    let second = built.iter().find(|d| **d != first).unwrap();
    assert_ne!(meta(&first)["inputs"]["initrd"], meta(second)["inputs"]["initrd"]);
    assert_eq!(meta(&first)["inputs"]["image"], meta(second)["inputs"]["image"], "the image is not rebuilt");

    // Listed with what they take on disk (state plus the RAM's non-zero pages).
    let out = env.tvm().env("TVM_CACHE_DIR", cache.dir.path()).args(["template", "list"]).output().unwrap();
    let text = lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["KEY", "RUNTIME", "RAM", "SIZE", "BOOT", "WARMUP"], "{text}");
    let rows = text.lines().filter(|l| l.split_whitespace().next().is_some_and(|k| k.len() == 24));
    assert!(rows.clone().count() == 2 && rows.clone().all(|l| l.contains(" MiB ")), "{text}");

    // Templates are removable like images.
    let out = env.tvm().env("TVM_CACHE_DIR", cache.dir.path()).args(["template", "remove", "--all"]).output().unwrap();
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    assert!(cache.built().is_empty());
    cache.assert_no_scratch();
}

/// A `tvm` SIGKILLed while it builds a template (before its VM's execution)
/// cannot clean up: the template VM's VMM dies with it (PDEATHSIG), its run
/// dir, its host cgroups and the build's scratch directory in the cache stay.
/// `tvm reap` removes all three, nothing half-built was published, and the
/// next start builds the template whole.
#[test]
fn a_template_build_killed_midway_leaves_nothing_after_reap() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("hello.py", "print('hello')");
    let mut cmd = env.tvm();
    cmd.env("TVM_CACHE_DIR", cache.dir.path()).env("TVM_TEMPLATES", "1").arg("run").arg("--json").arg(&f);
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id();
    // The template's VM (run dir `vm-tpl…`) is running: the build is under way.
    let building = || {
        std::fs::read_dir(env.runtime_dir.path())
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vm-tpl")))
            .unwrap_or(false)
            && !common::vmm_processes(env.runtime_dir.path()).is_empty()
    };
    let t = std::time::Instant::now();
    while !building() {
        assert!(t.elapsed() < Duration::from_secs(120), "the template VM never started");
        assert!(child.try_wait().unwrap().is_none(), "tvm ended before building a template");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let t = std::time::Instant::now();
    while !common::vmm_processes(env.runtime_dir.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "the template VM's VMM survived its tvm");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cache.built().is_empty(), "nothing half-built is published");
    let scratch = std::fs::read_dir(cache.dir.path().join("tmp")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(scratch, 1, "a SIGKILLed build cannot remove its scratch directory");

    let out = env.tvm().env("TVM_CACHE_DIR", cache.dir.path()).arg("reap").output().unwrap();
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    assert!(lossy(&out.stdout).contains("1 scratch directories"), "{}", lossy(&out.stdout));
    env.assert_clean();
    cache.assert_no_scratch();
    assert_no_cgroups_of(pid);

    let (v, _) = run(&env, &cache, &f, &[]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("template", "hello\n"), "built whole: {v}");
    cache.assert_no_scratch();
}

#[test]
fn templates_can_be_turned_off() {
    let (env, cache) = (Env::new(), Cache::new());
    let f = env.file("hello.py", "print('hello')");
    let (v, _) = run(&env, &cache, &f, &[("TVM_TEMPLATES", "0")]);
    assert_eq!((start(&v), stdout(&v).as_str()), ("cold", "hello\n"), "{v}");
    assert!(v["start_note"].is_null(), "off is not a fallback: {v}");
    assert!(cache.built().is_empty(), "nothing built when off");
}
