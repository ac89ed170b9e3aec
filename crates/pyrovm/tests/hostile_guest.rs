//! A guest that attacks the host side of the VM boundary. The "VMM" here is
//! a small Python script that speaks for a compromised guest agent over the
//! same agent socket QEMU would connect: it floods, stalls, sends garbage or
//! oversized frames, or dies. Each case checks the host kills the VMM,
//! reports a clear error, and leaves no process, run dir or host cgroup.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyrovm::hostcg::HostCgroups;
use pyrovm::qemu::{AccelKind, VmSpec};
use pyrovm::{RunJobError, Vm};
use tvm_protocol::{Command, Job, Limits};

/// The fake VMM: connects to the agent socket named on its command line
/// (as QEMU's `-chardev socket,path=`), says Ready, reads the job frame,
/// then misbehaves as `MODE` says. Its pid goes to `pidfile` so the test can
/// check it is gone.
const FAKE_VMM: &str = r#"
import json, os, socket, struct, sys, time
MODE = "@MODE@"
args = sys.argv[1:]
path = next(a.split("path=")[1].split(",")[0] for a in args if a.startswith("socket,id=agent"))
open("@PIDFILE@", "w").write(str(os.getpid()))
s = socket.socket(socket.AF_UNIX); s.connect(path)
def frame(obj):
    body = json.dumps(obj).encode(); s.sendall(struct.pack(">I", len(body)) + body)
frame({"type": "ready", "protocol": @PROTOCOL@, "agent_version": "evil", "uptime_ms": 1})
n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
s.recv(n, socket.MSG_WAITALL)
if MODE == "flood":
    chunk = {"type": "output", "stage": "run", "stream": "stdout", "data": "eHh4" * 10000}
    while True: frame(chunk)
elif MODE == "garbage":
    s.sendall(struct.pack(">I", 11) + b"not json!!!"); time.sleep(60)
elif MODE == "oversized":
    s.sendall(struct.pack(">I", 0xFFFFFFF0)); time.sleep(60)
elif MODE == "stall":
    time.sleep(600)
elif MODE == "dribble":
    # A frame that never completes, one byte at a time.
    s.sendall(struct.pack(">I", 1000))
    while True: s.sendall(b" "); time.sleep(0.5)
elif MODE == "second_ready":
    frame({"type": "ready", "protocol": @PROTOCOL@, "agent_version": "evil", "uptime_ms": 1}); time.sleep(60)
elif MODE == "die":
    os._exit(0)
"#;

struct Case {
    _dir: tempfile::TempDir,
    script: PathBuf,
    pidfile: PathBuf,
    runtime_dir: PathBuf,
}

fn case(mode: &str) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("vmm.pid");
    let script = dir.path().join("fake-vmm");
    let body = FAKE_VMM
        .replace("@MODE@", mode)
        .replace("@PIDFILE@", &pidfile.to_string_lossy())
        .replace("@PROTOCOL@", &tvm_protocol::PROTOCOL_VERSION.to_string());
    std::fs::write(&script, format!("#!/usr/bin/env python3\n{body}")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runtime_dir = dir.path().join("run");
    Case { _dir: dir, script, pidfile, runtime_dir }
}

fn spec() -> VmSpec {
    VmSpec {
        kernel: "/nonexistent/bzImage".into(),
        initrd: None,
        rootfs: None,
        memory_mib: 64,
        vcpus: 1,
        accel: AccelKind::Tcg,
        debug: false,
        sandbox: false,
        extra_cmdline: None,
    }
}

fn job(wall_ms: u64) -> Job {
    let limits = Limits {
        wall_ms,
        cpu_ms: wall_ms,
        memory_bytes: 64 << 20,
        pids: 16,
        output_bytes: 64 << 10,
        file_size_bytes: 1 << 20,
        open_files: 64,
    };
    Job {
        files: vec![],
        compile: None,
        run: Command { argv: vec!["true".into()], env: vec![], limits },
        stdin: vec![],
        workdir_bytes: 1 << 20,
    }
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone: it holds no resources but its pid.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Boots the fake VMM, runs the job, and returns the error with how long it took.
async fn attack(mode: &str, wall_ms: u64) -> (RunJobError, Duration) {
    let c = case(mode);
    let cgroups = HostCgroups::detect().ok();
    let id = format!("h{}-{}", std::process::id(), mode.replace('_', ""));
    let vm = Vm::boot(&id, &c.script, &c.runtime_dir, &spec(), Duration::from_secs(20), cgroups.as_ref())
        .await
        .unwrap_or_else(|e| panic!("{mode}: fake VMM did not get ready: {e}"));
    let pid: i32 = std::fs::read_to_string(&c.pidfile).unwrap().trim().parse().unwrap();
    let vm_cgroup: Option<PathBuf> = cgroups.as_ref().map(|cg| {
        let found = pyrovm::hostcg::vm_cgroups(cg.parent())
            .into_iter()
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("vm-{id}.")))
            .expect("the VMM runs in its own host cgroup");
        let procs = std::fs::read_to_string(found.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l.trim() == pid.to_string()), "{mode}: VMM {pid} not in {found:?}: {procs}");
        found
    });
    let started = Instant::now();
    let err = vm.execute(&job(wall_ms), |_, _, _| {}).await.expect_err("a hostile guest yields no result");
    let took = started.elapsed();
    assert!(!alive(pid), "{mode}: the VMM {pid} was killed and reaped");
    assert!(std::fs::read_dir(&c.runtime_dir).map(|d| d.count()).unwrap_or(0) == 0, "{mode}: run dir removed");
    if let Some(p) = vm_cgroup {
        assert!(!p.exists(), "{mode}: host cgroup {p:?} removed");
    }
    (err, took)
}

/// Attack: a guest streams output without end. Defence: the host's own
/// output cap (twice the job's caps) kills the VM.
#[tokio::test]
async fn output_flood_is_cut_off() {
    let (err, took) = attack("flood", 1000).await;
    assert!(matches!(err, RunJobError::OutputFlood(n) if n > 128 << 10), "{err}");
    assert!(err.to_string().contains("VM killed"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// Attack: a guest sends a frame that is not JSON. Defence: the frame
/// decoder rejects it and the VM is killed.
#[tokio::test]
async fn garbage_frame_is_a_protocol_error() {
    let (err, _) = attack("garbage", 1000).await;
    assert!(matches!(err, RunJobError::Protocol(tvm_protocol::FrameError::Malformed(_))), "{err}");
    assert!(err.to_string().contains("guest broke the protocol"), "{err}");
}

/// Attack: a guest announces a 4 GiB frame to make the host buffer it.
/// Defence: the length is checked against the job-derived cap before any
/// byte is buffered.
#[tokio::test]
async fn oversized_frame_is_refused_before_buffering() {
    let (err, took) = attack("oversized", 1000).await;
    assert!(matches!(err, RunJobError::Protocol(tvm_protocol::FrameError::TooLarge { .. })), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// Attack: a guest goes silent (hung agent, stopped VM). Defence: the host
/// deadline (2 × wall + 15 s) kills the VM.
#[tokio::test]
async fn stalled_guest_hits_the_host_deadline() {
    let (err, took) = attack("stall", 100).await;
    assert!(matches!(err, RunJobError::Deadline { ms: 15_200 }), "{err}");
    assert!(took >= Duration::from_millis(15_200) && took < Duration::from_secs(25), "{took:?}");
}

/// Attack: a guest keeps a frame open forever, one byte at a time, so no
/// read ever times out. Defence: the deadline is for the whole job, not per
/// read.
#[tokio::test]
async fn dribbling_guest_hits_the_host_deadline() {
    let (err, _) = attack("dribble", 100).await;
    assert!(matches!(err, RunJobError::Deadline { .. }), "{err}");
}

/// Attack: a guest replays the handshake. Defence: anything but output and
/// one final message is a protocol error.
#[tokio::test]
async fn second_ready_is_a_protocol_error() {
    let (err, _) = attack("second_ready", 1000).await;
    assert!(err.to_string().contains("unexpected second ready"), "{err}");
}

/// A guest that disappears without a result is reported as such.
#[tokio::test]
async fn vanishing_guest_is_reported() {
    let (err, _) = attack("die", 1000).await;
    assert!(matches!(err, RunJobError::Exited { .. }), "{err}");
}
