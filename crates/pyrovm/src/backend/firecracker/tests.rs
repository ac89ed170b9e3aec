//! Contract tests: every request the Firecracker backend sends is validated
//! against Firecracker's own API spec (v1.16.1, JSON schemas), and the
//! client's answers to Firecracker's errors and the hybrid vsock handshake
//! are exercised against local peers that behave as Firecracker documents.

use super::*;
use crate::spec::AccelKind;
use firecracker_standin::{ApiSpec, ContractError};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spec() -> VmSpec {
    VmSpec {
        kernel: "/k/vmlinux".into(),
        initrd: Some("/k/initrd".into()),
        rootfs: Some("/img.erofs".into()),
        memory_mib: 384,
        vcpus: 2,
        accel: AccelKind::Kvm,
        agent: Some(AgentTransport::Vsock),
        debug: false,
        extra_cmdline: Some("mitigations=off".into()),
    }
}

fn paths() -> FcPaths {
    FcPaths {
        kernel: "/proc/self/fd/5".into(),
        initrd: Some("/proc/self/fd/6".into()),
        rootfs: Some("/proc/self/fd/7".into()),
        vsock: "/run/tvm/vm-x/fc/vsock.sock".into(),
        log: "/run/tvm/vm-x/fc/log.fifo".into(),
        metrics: "/run/tvm/vm-x/fc/metrics.fifo".into(),
    }
}

#[test]
fn every_boot_request_matches_the_spec() {
    let api = ApiSpec::load().unwrap();
    let reqs = boot_requests(&spec(), &paths());
    let order: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        order,
        ["/logger", "/metrics", "/boot-source", "/drives/rootfs", "/machine-config", "/entropy", "/vsock", "/actions"]
    );
    for r in &reqs {
        let def = api.route(r.method, &r.path).unwrap_or_else(|e| panic!("{}: {e}", r.path));
        assert_eq!(def, Some(r.definition), "{} takes {def:?}", r.path);
        api.validate(r.definition, &r.body).unwrap_or_else(|e| panic!("{} {}: {e}", r.path, r.body));
        // The wire bytes, too.
        api.check(r.method, &r.path, &serde_json::to_vec(&r.body).unwrap()).unwrap();
    }
    let by_path = |p: &str| reqs.iter().find(|r| r.path == p).unwrap().body.clone();
    assert_eq!(by_path("/drives/rootfs")["is_read_only"], json!(true));
    assert_eq!(by_path("/drives/rootfs")["is_root_device"], json!(false));
    assert_eq!(by_path("/actions"), json!({"action_type": "InstanceStart"}));
    assert_eq!(by_path("/vsock"), json!({"guest_cid": 3, "uds_path": "/run/tvm/vm-x/fc/vsock.sock"}));
    assert_eq!(by_path("/machine-config"), json!({"vcpu_count": 2, "mem_size_mib": 384, "smt": false}));
    let args = by_path("/boot-source")["boot_args"].as_str().unwrap().to_string();
    assert!(args.contains("reboot=k") && args.contains("console=ttyS0") && args.ends_with("mitigations=off"), "{args}");
}

#[test]
fn a_kernel_only_probe_sends_no_drive_and_no_vsock() {
    let api = ApiSpec::load().unwrap();
    let probe = VmSpec { initrd: None, rootfs: None, agent: None, ..spec() };
    let p = FcPaths { initrd: None, rootfs: None, ..paths() };
    let reqs = boot_requests(&probe, &p);
    assert!(reqs.iter().all(|r| r.path != "/vsock" && !r.path.starts_with("/drives/")));
    let boot = &reqs.iter().find(|r| r.path == "/boot-source").unwrap().body;
    assert!(boot.get("initrd_path").is_none(), "absent, not null: {boot}");
    for r in &reqs {
        api.validate(r.definition, &r.body).unwrap();
    }
}

#[test]
fn the_spec_refuses_what_firecracker_refuses() {
    // Error paths of the contract: the same schemas reject out-of-range or
    // incomplete bodies, so a backend bug would fail here, not on a KVM host.
    let api = ApiSpec::load().unwrap();
    let zero_vcpus = VmSpec { vcpus: 0, ..spec() };
    let mc = boot_requests(&zero_vcpus, &paths()).into_iter().find(|r| r.path == "/machine-config").unwrap();
    let e = api.validate(mc.definition, &mc.body).unwrap_err();
    assert!(matches!(&e, ContractError::Schema { errors, .. } if errors.contains("vcpu_count")), "{e}");
    let too_many = json!({"vcpu_count": 33, "mem_size_mib": 128});
    assert!(api.validate("MachineConfiguration", &too_many).is_err());
    assert!(api.validate("Vsock", &json!({"guest_cid": 2, "uds_path": "/x"})).is_err(), "CID 2 is the host's");
    assert!(api.validate("BootSource", &json!({"boot_args": "x"})).is_err(), "kernel_image_path is required");
    assert!(api.validate("Drive", &json!({"drive_id": "rootfs"})).is_err(), "is_root_device is required");
    assert!(api.validate("Logger", &json!({"level": "Loud"})).is_err());
    assert!(api.validate("InstanceActionInfo", &json!({"action_type": "Reboot"})).is_err());
    assert!(matches!(api.route("PUT", "/drive/rootfs"), Err(ContractError::NoRoute { .. })));
}

#[test]
fn jailer_arguments_follow_the_jailer_docs() {
    let a = jailer_args(Path::new("/usr/bin/firecracker"), "tvm-abc", 2004194305, 2004194305, 640 << 20, 256);
    let s = a.join(" ");
    assert!(s.starts_with("--id tvm-abc --exec-file /usr/bin/firecracker --uid 2004194305 --gid 2004194305"));
    assert!(s.contains("--chroot-base-dir /srv/jailer --cgroup-version 2 --parent-cgroup tvm-firecracker"));
    assert!(s.contains("--cgroup memory.max=671088640 --cgroup pids.max=256"));
    // Firecracker's own arguments follow `--`, with paths inside the chroot.
    assert!(s.ends_with("-- --api-sock /run/api.sock --id tvm-abc"), "{s}");
}

#[test]
fn jailer_uids_are_claimed_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let (a, pa) = claim_uid(dir.path(), 1000, "same").unwrap();
    let (b, pb) = claim_uid(dir.path(), 1000, "same").unwrap();
    assert_ne!(a, b);
    assert!(a > 1000 + (1 << 22) && b > 1000 + (1 << 22), "above the per-pid range");
    assert!(crate::reaper::remove_leftover(&pa) && crate::reaper::remove_leftover(&pb));
    assert_eq!(claim_uid(dir.path(), 1000, "same").unwrap().0, a, "a released uid is reused");
}

#[test]
fn the_jailer_is_skipped_with_a_reason() {
    let s = Settings { jailer: "/nonexistent/jailer".into(), ..Settings::default() };
    match Firecracker::new(&s, false).jailer() {
        JailerUse::Skipped(why) => assert!(why.contains("no jailer binary at /nonexistent/jailer"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A present jailer is still not used for the stand-in (or without root).
    let s = Settings { jailer: "/bin/true".into(), ..Settings::default() };
    match Firecracker::new(&s, true).jailer() {
        JailerUse::Skipped(why) => assert!(why.contains("stand-in") || why.contains("not root"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn versions_identify_the_stand_in() {
    assert!(is_standin("Firecracker v1.16.1 (stand-in: firecracker-standin, QEMU microvm under TCG)"));
    assert!(!is_standin("Firecracker v1.16.1"));
    assert_eq!(version_of(Path::new("/nonexistent/fc")), None);
    assert!(fault_message(br#"{"fault_message": "Invalid kernel command line"}"#) == "Invalid kernel command line");
    assert_eq!(fault_message(b"  plain text  "), "plain text");
}

/// A one-connection HTTP peer answering every request with `answer`,
/// returning the requests it saw.
async fn api_peer(sock: PathBuf, answer: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 8192];
        let mut pending = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return seen;
            }
            pending.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&pending).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if pending.len() >= end + 4 + len {
                    seen.push(text[..end + 4 + len].to_string());
                    pending.clear();
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
            }
        }
    })
}

fn deadline(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(ms)
}

#[tokio::test]
async fn a_400_becomes_a_clean_error_with_the_fault_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let body = r#"{"fault_message":"Invalid kernel command line: too long"}"#;
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let peer = api_peer(sock.clone(), answer).await;
    let mut api = ApiClient::connect(&sock, deadline(2000)).await.unwrap();
    let req = &boot_requests(&spec(), &paths())[2];
    let err = api.send(req, deadline(2000)).await.unwrap_err();
    assert_eq!(err.to_string(), "firecracker refused PUT /boot-source (400): Invalid kernel command line: too long");
    drop(api);
    let seen = peer.await.unwrap();
    assert!(seen[0].starts_with("PUT /boot-source HTTP/1.1\r\n"), "origin-form: {seen:?}");
    assert!(seen[0].contains("\"kernel_image_path\":\"/proc/self/fd/5\""), "{seen:?}");
}

#[tokio::test]
async fn a_204_is_success_and_a_silent_vmm_hits_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let peer = api_peer(sock.clone(), "HTTP/1.1 204 No Content\r\n\r\n").await;
    let mut api = ApiClient::connect(&sock, deadline(2000)).await.unwrap();
    for r in boot_requests(&spec(), &paths()) {
        api.send(&r, deadline(2000)).await.unwrap();
    }
    drop(api);
    assert_eq!(peer.await.unwrap().len(), 8);
    // Nobody listening: connect gives up at the deadline with the reason.
    let err = ApiClient::connect(&dir.path().join("none.sock"), deadline(100)).await.unwrap_err();
    assert!(err.to_string().contains("API socket not reachable"), "{err}");
    // A VMM that accepts and never answers.
    let mute = dir.path().join("mute.sock");
    let listener = tokio::net::UnixListener::bind(&mute).unwrap();
    let hold = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    let mut api = ApiClient::connect(&mute, deadline(2000)).await.unwrap();
    let err = api.send(&boot_requests(&spec(), &paths())[0], deadline(200)).await.unwrap_err();
    assert!(err.to_string().contains("no answer before the boot deadline"), "{err}");
    drop(hold);
}

#[tokio::test]
async fn hybrid_vsock_retries_until_the_guest_listens_then_reads_ok_byte_by_byte() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let peer = tokio::spawn(async move {
        // First attempt: the guest is not listening yet, Firecracker hangs up.
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
        // Second: OK, immediately followed by the guest's first bytes.
        let (mut s, _) = listener.accept().await.unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        assert_eq!(line, b"CONNECT 1024");
        s.write_all(b"OK 1073741824\nREADY").await.unwrap();
        s
    });
    let mut stream = connect_vsock(&uds, 1024, deadline(3000)).await.unwrap();
    let mut rest = [0u8; 5];
    stream.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"READY", "nothing after the OK line was swallowed");
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn hybrid_vsock_refuses_garbage_and_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = tokio::net::UnixListener::bind(&uds).unwrap();
    let peer = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"NOPE\n").await;
        }
    });
    let err = connect_vsock(&uds, 1024, deadline(300)).await.unwrap_err();
    assert!(err.to_string().contains("unexpected answer \"NOPE\""), "{err}");
    peer.abort();
    let err = connect_vsock(&dir.path().join("missing.sock"), 1024, deadline(100)).await.unwrap_err();
    assert!(err.to_string().contains("connect:"), "{err}");
}

#[test]
fn the_probe_boot_config_file_holds_spec_bodies_and_no_device() {
    let api = ApiSpec::load().unwrap();
    let cfg = probe_config(Path::new("/cache/kernel/k/vmlinux"));
    api.validate("BootSource", &cfg["boot-source"]).unwrap();
    api.validate("MachineConfiguration", &cfg["machine-config"]).unwrap();
    assert_eq!(cfg["drives"], serde_json::json!([]), "no root device: the guest must panic at its root mount");
    assert!(cfg.get("vsock").is_none() && cfg["boot-source"].get("initrd_path").is_none(), "{cfg}");
    let args = cfg["boot-source"]["boot_args"].as_str().unwrap();
    assert!(args.contains("panic=-1") && args.contains("reboot=k"), "the VMM must exit after the panic: {args}");
}
