//! A guest that attacks the host side of the VM boundary. The "VMM" here is
//! a small Python script that speaks for a compromised guest agent over the
//! same agent channel QEMU inherits: it floods, stalls, sends garbage or
//! oversized frames, or dies; or, as a VMM taken over through an emulation
//! bug, it probes the host. Each case checks the host kills the VMM, reports
//! a clear error, and leaves no process, run dir or host cgroup. The fake
//! VMM is confined exactly as QEMU is (own uid, Landlock, inherited fds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyrovm::backend::qemu::Qemu;
use pyrovm::hostcg::HostCgroups;
use pyrovm::spec::{AccelKind, AgentTransport, VmSpec};
use pyrovm::{RunJobError, Vm, VmmHost};
use tvm_protocol::{Command, Job, Limits};

/// The fake VMM: takes the agent socket it inherits (as QEMU's
/// `-chardev socket,fd=`), says Ready, reads the job frame, then misbehaves
/// as `MODE` says.
const FAKE_VMM: &str = r#"
import json, os, socket, struct, sys, time
MODE = "@MODE@"
args = sys.argv[1:]
fd = int(next(a.split("fd=")[1].split(",")[0] for a in args if a.startswith("socket,id=agent")))
s = socket.socket(fileno=fd)
def frame(obj):
    body = json.dumps(obj).encode(); s.sendall(struct.pack(">I", len(body)) + body)
def output(data):
    # A binary records frame (bit 31 of the length): run stage, tag 2, one stdout record.
    body = bytes([1, 2]) + struct.pack(">BI", 0, len(data)) + data
    s.sendall(struct.pack(">I", 0x80000000 | len(body)) + body)
frame({"type": "ready", "protocol": @PROTOCOL@, "agent_version": "evil", "uptime_ms": 1})
n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
s.recv(n, socket.MSG_WAITALL)
if MODE == "flood":
    chunk = b"xxx" * 10000
    while True: output(chunk)
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
elif MODE == "snoop":
    # A VMM taken over by the guest looks around the host and reports back.
    found = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    for name in ["@SECRET@", "/etc/hostname", "/proc/1/environ", "/root", "@CACHE@"]:
        try:
            if os.path.isdir(name): os.listdir(name)
            else: open(name, "rb").read(1)
            found[name] = "read"
        except OSError as e: found[name] = e.strerror
    try:
        open("/var/tmp/tvm-hostile-write-@PID@", "w"); found["write"] = "written"
    except OSError as e: found["write"] = e.strerror
    try:
        c = socket.create_connection(("127.0.0.1", int("@PORT@")), timeout=2); found["tcp"] = "connected"
    except OSError as e: found["tcp"] = e.strerror or str(e)
    try:
        os.kill(os.getppid(), 0); found["signal"] = "sent"
    except OSError as e: found["signal"] = e.strerror
    output(json.dumps(found).encode())
    os._exit(0)
"#;

struct Case {
    dir: tempfile::TempDir,
    script: PathBuf,
    runtime_dir: PathBuf,
}

fn case(mode: &str, fill: &[(&str, String)]) -> Case {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The fake VMM runs as its own uid: it must be able to reach its script.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("fake-vmm");
    let mut body = FAKE_VMM
        .replace("@MODE@", mode)
        .replace("@PROTOCOL@", &tvm_protocol::PROTOCOL_VERSION.to_string())
        .replace("@PID@", &std::process::id().to_string());
    for (k, v) in fill {
        body = body.replace(k, v);
    }
    std::fs::write(&script, format!("#!/usr/bin/env python3\n{body}")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("bzImage"), b"not a kernel").unwrap();
    let runtime_dir = dir.path().join("run");
    Case { dir, script, runtime_dir }
}

fn spec(c: &Case) -> VmSpec {
    VmSpec {
        kernel: c.dir.path().join("bzImage"),
        initrd: None,
        rootfs: None,
        memory_mib: 64,
        vcpus: 1,
        accel: AccelKind::Tcg,
        agent: Some(AgentTransport::VirtioSerial),
        debug: false,
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
        uniqueness: None,
        tests: vec![],
        interactive: false,
    }
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone: it holds no resources but its pid.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// The default `vmm_uid_base`.
const UID_BASE: u32 = 2_000_000_000;

/// Boots the fake VMM, runs the job, and returns the error with how long it took.
async fn attack(mode: &str, wall_ms: u64) -> (RunJobError, Duration) {
    let (err, took, _) = attack_with(mode, wall_ms, &[]).await;
    (err, took)
}

/// As [`attack`], with placeholders of the script filled in, also returning
/// the output the fake VMM sent.
async fn attack_with(mode: &str, wall_ms: u64, fill: &[(&str, String)]) -> (RunJobError, Duration, Vec<u8>) {
    let c = case(mode, fill);
    let cgroups = HostCgroups::detect().ok();
    let id = format!("h{}-{}", std::process::id(), mode.replace('_', ""));
    let host = VmmHost { runtime_dir: &c.runtime_dir, host_cgroups: cgroups.as_ref(), uid_base: UID_BASE };
    // The fake VMM stands where QEMU's binary would, without QEMU's -sandbox.
    let backend = Qemu::new(&c.script, false);
    let vm = Vm::boot(&id, &host, &backend, &spec(&c), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{mode}: fake VMM did not get ready: {e}"));
    // The run dir records the VMM as "pid starttime" for the reaper.
    let record = std::fs::read_to_string(c.runtime_dir.join(format!("vm-{id}/vmm"))).unwrap();
    let pid: i32 = record.split_whitespace().next().unwrap().parse().unwrap();
    if nix::unistd::geteuid().is_root() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = UID_BASE + pid as u32;
        assert!(status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")), "{mode}: VMM runs as its own uid");
    }
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
    let mut output = Vec::new();
    let err = vm
        .execute(&job(wall_ms), |_, _, d| output.extend_from_slice(d))
        .await
        .expect_err("a hostile guest yields no result");
    let took = started.elapsed();
    assert!(!alive(pid), "{mode}: the VMM {pid} was killed and reaped");
    assert!(std::fs::read_dir(&c.runtime_dir).map(|d| d.count()).unwrap_or(0) == 0, "{mode}: run dir removed");
    if let Some(p) = vm_cgroup {
        assert!(!p.exists(), "{mode}: host cgroup {p:?} removed");
    }
    (err, took, output)
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
    // What the guest did is the cause (the source), not part of the message.
    let chain = pyrovm::error_chain(&err);
    assert!(chain.starts_with("guest broke the protocol: ") && chain.contains("unexpected second ready"), "{chain}");
}

/// A guest that disappears without a result is reported as such.
#[tokio::test]
async fn vanishing_guest_is_reported() {
    let (err, _) = attack("die", 1000).await;
    assert!(matches!(err, RunJobError::Exited { .. }), "{err}");
}

/// Attack: a guest takes over its VMM (an emulation bug) and looks around
/// the host. Defence: the VMM runs as a uid of its own with no groups, under
/// Landlock (read-only system files, no TCP, no signals out) and holds its
/// kernel, image and agent channel as descriptors: host files, other
/// processes, the network and `tvm` itself are out of reach.
#[tokio::test]
async fn a_taken_over_vmm_cannot_reach_the_host() {
    let secret_dir = PathBuf::from(format!("/var/tmp/tvm-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let secret = secret_dir.join("world-readable");
    std::fs::write(&secret, "host data").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let kernel = pyrovm::jail::landlock_abi();
    let fill = [
        ("@SECRET@", secret.display().to_string()),
        ("@PORT@", port.to_string()),
        ("@CACHE@", "/root/.cache".to_string()),
    ];
    let (err, _, output) = attack_with("snoop", 2000, &fill).await;
    let _ = std::fs::remove_dir_all(&secret_dir);
    assert!(matches!(err, RunJobError::Exited { .. }), "{err}");
    let found: serde_json::Value = serde_json::from_slice(&output).expect("the fake VMM reported");
    eprintln!("what a taken-over VMM saw: {found}");
    let denied = |key: &str| {
        let v = found[key].as_str().unwrap_or_default();
        assert!(v == "Permission denied" || v == "Operation not permitted", "{key}: {v} ({found})");
    };
    if nix::unistd::geteuid().is_root() {
        assert!(found["uid"].as_u64().unwrap() >= u64::from(UID_BASE), "{found}");
        assert_eq!(found["groups"], serde_json::json!([]), "no supplementary groups");
        denied("/proc/1/environ");
        denied("/root");
        denied("signal");
    }
    if kernel > 0 {
        denied(&secret.display().to_string());
        denied("/etc/hostname");
        denied("write");
        denied("tcp");
    }
    assert!(!PathBuf::from(format!("/var/tmp/tvm-hostile-write-{}", std::process::id())).exists());
}
