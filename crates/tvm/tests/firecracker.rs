//! TVM's Firecracker backend, end to end, against the Firecracker
//! **stand-in** (`firecracker-standin`): Firecracker cannot run on this host
//! (no KVM), so the stand-in serves Firecracker's API (validating every
//! request against Firecracker's spec), and boots the configured guest with
//! QEMU microvm under TCG plus `vhost-device-vsock`, which speaks
//! Firecracker's host-side hybrid vsock protocol. What runs for real here:
//! TVM's backend (API requests, `uds_path` + `CONNECT 1024`), the agent's
//! vsock side, limits, verdicts and cleanup. What does not: Firecracker
//! itself and its jailer (see docs/firecracker.md and
//! scripts/firecracker-smoke.sh). Every test checks nothing is left behind:
//! no run dir, no stand-in, QEMU or vhost-device-vsock process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::langs::LANGS;
use common::{lossy, Env};
use serde_json::Value;
use tvm_config::Catalog;

const STANDIN: &str = env!("CARGO_BIN_EXE_firecracker-standin");

/// A jailer path that does not exist, so the skip reason is predictable.
const NO_JAILER: &str = "/nonexistent/tvm-test-jailer";

/// `tvm` with the Firecracker backend and the stand-in as its binary.
/// Templates off, as a user of the stand-in would have them: it cannot
/// snapshot (see `a_vmm_that_cannot_snapshot_skips_templates_and_cold_boots`).
fn tvm_fc(env: &Env) -> Command {
    let mut c = env.tvm();
    c.env("TVM_VMM", "firecracker")
        .env("TVM_FIRECRACKER", STANDIN)
        .env("TVM_JAILER", NO_JAILER)
        .env("TVM_TEMPLATES", "0");
    c
}

fn run_json(env: &Env, cmd: &mut Command) -> (Value, std::process::Output) {
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): stdout={} stderr={}", lossy(&out.stdout), lossy(&out.stderr)));
    env.assert_clean();
    (v, out)
}

/// hello + stdin + args in the default runtime of every language.
#[test]
fn hello_and_stdin_in_each_languages_default_runtime() {
    let catalog = Catalog::builtin();
    let env = Env::new();
    for l in LANGS {
        let ext = l.entry.rsplit('.').next().unwrap();
        let runtime = catalog.for_extension(ext).unwrap_or_else(|| panic!("no default runtime for .{ext}"));
        let dir = tempfile::tempdir_in(env.work.path()).unwrap();
        let file = dir.path().join(l.entry);
        std::fs::write(&file, l.hello).unwrap();
        let stdin = dir.path().join("stdin.txt");
        std::fs::write(&stdin, "one\ntwo\n").unwrap();
        let (v, _) = run_json(
            &env,
            // A generous limit: the stand-in's guest runs under TCG on a shared host.
            tvm_fc(&env)
                .args(["run", "--json", "--time-limit", "60s", "--stdin"])
                .arg(&stdin)
                .arg(&file)
                .args(["--", "x", "y z"]),
        );
        assert_eq!(v["verdict"], "ok", "{}: {v}", runtime.id);
        assert_eq!(v["run"]["stdout"], "hello\nargs: x,y z\none\ntwo\n", "{}: {v}", runtime.id);
    }
}

/// The stand-in's guest runs under TCG, where it would count timer ticks a
/// loaded host loses (its clock, wall-time limits and timings stretched by
/// the load) unless it is given the host's TSC frequency, as the QEMU
/// backend's TCG guests are: so it keeps time with the TSC.
#[test]
fn the_standins_guest_keeps_time_with_the_host_tsc() {
    let env = Env::new();
    let file = env.file(
        "clock.py",
        "print(open('/sys/devices/system/clocksource/clocksource0/current_clocksource').read().strip())\n",
    );
    let (v, _) = run_json(&env, tvm_fc(&env).args(["run", "--json", "--time-limit", "60s"]).arg(&file));
    assert_eq!(v["verdict"], "ok", "{v}");
    match pyrovm::backend::qemu::tcg_tsc_cmdline() {
        // `tsc-early` until the kernel's refinement registers `tsc` (one
        // second of guest time after it starts: a fast boot reads it before);
        // both count the TSC, where a guest without the frequency falls back
        // to jiffies or hpet.
        Some(_) => assert!(matches!(v["run"]["stdout"].as_str(), Some("tsc\n" | "tsc-early\n")), "{v}"),
        // A host without an invariant TSC has no frequency to give: the guest picks its own clock.
        None => assert!(v["run"]["stdout"].as_str().is_some_and(|s| s.ends_with('\n') && s.len() > 1), "{v}"),
    }
}

/// Time, memory and output limits give their verdicts through this backend too.
#[test]
fn time_memory_and_output_limits() {
    let env = Env::new();
    let cases = [
        ("tle.py", "while True:\n    pass\n", "--time-limit", "2s", "time_limit_exceeded"),
        (
            "mle.py",
            "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
            "--memory-limit",
            "64M",
            "memory_limit_exceeded",
        ),
        (
            "ole.py",
            "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
            "--output-limit",
            "64K",
            "output_limit_exceeded",
        ),
    ];
    for (name, src, flag, value, verdict) in cases {
        let file = env.file(name, src);
        let (v, _) = run_json(&env, tvm_fc(&env).args(["run", "--json", flag, value]).arg(&file));
        assert_eq!(v["verdict"], verdict, "{name}: {v}");
    }
}

/// The stand-in (the VMM process, as Firecracker would be) is SIGKILLed
/// while the program runs: `tvm` reports an internal error, and its QEMU and
/// vhost-device-vsock die with it (PR_SET_PDEATHSIG).
#[test]
fn standin_killed_mid_run_is_an_internal_error_and_leaves_nothing() {
    let env = Env::new();
    let file = env.file("sleeper.py", "import time\nprint('up', flush=True)\ntime.sleep(600)\n");
    let mut child = tvm_fc(&env)
        .args(["run", "--time-limit", "60s"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "up\n", "the program runs");
    // The run dir names the VMM (the stand-in) as "pid starttime".
    let run_dir = std::fs::read_dir(env.runtime_dir.path()).unwrap().flatten().next().unwrap().path();
    let vmm: i32 =
        std::fs::read_to_string(run_dir.join("vmm")).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{vmm}/comm")).unwrap();
    assert!(comm.starts_with("firecracker-sta"), "the VMM is the stand-in: {comm}");
    assert!(common::vmm_processes(env.runtime_dir.path()).len() >= 3, "stand-in, QEMU, vhost-device-vsock");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), nix::sys::signal::Signal::SIGKILL).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "tvm did not notice the dead VMM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(70), "internal error exit status: {err}");
    assert!(err.contains("VM exited before reporting a result"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::vmm_processes(env.runtime_dir.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    env.assert_clean();
}

/// The stand-in refuses a request as Firecracker does (`400` with a
/// `fault_message`): here a kernel command line longer than Firecracker's
/// x86_64 limit. `tvm` reports the refusal, with the message, as an
/// internal error and leaves nothing behind.
#[test]
fn an_api_request_refused_with_400_is_a_clean_error() {
    let env = Env::new();
    let file = env.file("hello.py", "print('never')\n");
    let long = format!("tvm.pad={}", "x".repeat(2100));
    let (v, out) = run_json(&env, tvm_fc(&env).env("TVM_KERNEL_ARGS", long).args(["run", "--json"]).arg(&file));
    assert_eq!(v["verdict"], "internal_error", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("firecracker refused PUT /boot-source (400): Invalid kernel command line"), "{v}");
    assert_eq!(out.status.code(), Some(70));
}

/// `tvm doctor` names the backend, the stand-in, versions, KVM state, and
/// why the jailer was skipped.
#[test]
fn doctor_reports_the_backend_and_why_the_jailer_is_skipped() {
    let env = Env::new();
    let out = tvm_fc(&env).args(["doctor", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", lossy(&out.stdout)));
    let check = |name: &str| -> String {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {v}"))["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let jailer = check("firecracker jailer");
    assert_eq!(
        jailer,
        format!("skipped: no jailer binary at {NO_JAILER} (PATH searched); TVM's own confinement applies"),
        "{v}"
    );
    let vmm = check("vmm");
    assert!(vmm.starts_with("firecracker: configured") && vmm.contains("stand-in"), "{vmm}");
    assert!(check("firecracker version").contains("stand-in"), "{v}");
    assert!(check("kvm").starts_with("usable") || check("kvm").starts_with("not usable: "), "{v}");
    env.assert_clean();
}

/// Asking for Firecracker where it cannot run is one line with the reason
/// and the fix (here: a binary that is not the stand-in, so real Firecracker
/// rules apply, on a host whose KVM does not work).
#[test]
fn firecracker_without_kvm_is_a_one_line_error() {
    let env = Env::new();
    let file = env.file("hello.py", "print('hi')\n");
    let out = env
        .tvm()
        .env("TVM_VMM", "firecracker")
        .env("TVM_FIRECRACKER", "/bin/true")
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    let err = lossy(&out.stderr);
    // A configuration the caller must change: exit 2, as for bad input.
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = err.lines().find(|l| l.contains("needs KVM")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("set vmm = \"qemu\""), "{line}");
    match pyrovm::backend::firecracker::kvm_usable() {
        Err(why) => assert!(line.contains(&why), "{line}"),
        // Where KVM_CREATE_VM works (even nested), /bin/true passes that check as the real
        // Firecracker would; the probe boot then finds no guest panic.
        Ok(()) => assert!(line.contains("probe boot ended unexpectedly"), "{line}"),
    }
    let out = env
        .tvm()
        .env("TVM_VMM", "firecracker")
        .env("TVM_FIRECRACKER", "/nonexistent/fc")
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    assert!(lossy(&out.stderr).contains("no firecracker binary at /nonexistent/fc"), "{}", lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2));
    env.assert_clean();
}

/// Templates under Firecracker are snapshots, which the stand-in cannot
/// make (QEMU 7.2 will not migrate `vhost-user-vsock-device`; its refusal
/// of `PUT /snapshot/create` is tested below). With templates on, TVM knows
/// that up front: no template VM is booted and no build fails (which a
/// server would retry every 10 minutes), every execution cold boots and
/// says why, and nothing (stand-in, QEMU, vhost-device-vsock, run dir,
/// template, failure marker) is left behind.
#[test]
fn a_vmm_that_cannot_snapshot_skips_templates_and_cold_boots() {
    let env = Env::new();
    let cache = common::cache::Cache::new();
    let file = env.file("hello.py", "print('hello')\n");
    for _ in 0..2 {
        let (v, out) = run_json(
            &env,
            tvm_fc(&env)
                .env("TVM_TEMPLATES", "1")
                .env("TVM_CACHE_DIR", cache.dir.path())
                .args(["run", "--json", "--time-limit", "60s"])
                .arg(&file),
        );
        assert_eq!((v["verdict"].as_str(), v["run"]["stdout"].as_str()), (Some("ok"), Some("hello\n")), "{v}");
        assert_eq!(out.status.code(), Some(0), "{v}");
        assert_eq!(v["start"], "cold", "{v}");
        let note = v["start_note"].as_str().unwrap_or_default();
        assert!(note.starts_with("templates unsupported: the Firecracker stand-in cannot snapshot"), "{note}");
        assert!(!lossy(&out.stderr).contains("template build failed"), "{}", lossy(&out.stderr));
    }
    let left: Vec<_> =
        std::fs::read_dir(cache.templates()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "no template and no failure marker: {left:?}");
    cache.assert_no_scratch();
}

/// The stand-in answers the snapshot API as Firecracker's contract says:
/// every body validated against the spec (a malformed one is `400` naming
/// the schema), Firecracker's state rules (no pause or snapshot before
/// start, a load only in a fresh process), and a well-formed load refused
/// with the reason the stand-in has nothing to load.
#[test]
fn the_standin_validates_and_refuses_snapshot_requests() {
    use pyrovm::backend::firecracker::{snapshot, ApiRequest};
    use pyrovm::backend::LaunchError;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut standin = Command::new(STANDIN).arg("--api-sock").arg(&sock).stdin(Stdio::null()).spawn().unwrap();
    let (state, mem) = (dir.path().join("vmstate"), dir.path().join("mem"));
    std::fs::write(&state, b"not a snapshot").unwrap();
    std::fs::write(&mem, b"").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let faults = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut api = pyrovm::backend::firecracker::ApiClient::connect(&sock, deadline).await.unwrap();
        let paths = pyrovm::backend::firecracker::FcPaths {
            kernel: String::new(),
            initrd: None,
            rootfs: None,
            vsock: dir.path().join("vsock.sock").display().to_string(),
            log: String::new(),
            metrics: String::new(),
        };
        let from = snapshot::RestorePaths { snapshot: state.display().to_string(), mem: mem.display().to_string() };
        let load = snapshot::restore_requests(false, &paths, &from).pop().unwrap();
        let mut bad_load = load.clone();
        bad_load.body["mem_backend"]["backend_type"] = "Disk".into();
        let mut missing = load.clone();
        missing.body["snapshot_path"] = dir.path().join("nonexistent").display().to_string().into();
        let requests: [(&str, ApiRequest); 5] = [
            ("pause", snapshot::pause_request()),
            ("create", snapshot::create_request("/s", "/m")),
            ("bad load", bad_load),
            ("missing", missing),
            ("load", load),
        ];
        let mut faults = Vec::new();
        for (name, req) in requests {
            match api.send(&req, deadline).await {
                Err(LaunchError::ApiRefused { status: 400, fault, .. }) => faults.push((name, fault)),
                other => panic!("{name}: {other:?}"),
            }
        }
        faults
    });
    let _ = standin.kill();
    let _ = standin.wait();
    let fault = |name: &str| faults.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    assert!(fault("pause").contains("not supported before starting the microVM"), "{faults:?}");
    assert!(fault("create").contains("not supported before starting the microVM"), "{faults:?}");
    assert!(fault("bad load").contains("SnapshotLoadParams") && fault("bad load").contains("Disk"), "{faults:?}");
    assert!(fault("missing").contains("The snapshot file cannot be opened"), "{faults:?}");
    assert!(
        fault("load").contains("cannot load snapshots") && fault("load").contains("vhost-user-vsock"),
        "{faults:?}"
    );
}
