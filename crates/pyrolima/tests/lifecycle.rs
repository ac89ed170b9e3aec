//! `tvm lima up/status/down/delete` against the limactl stand-in
//! (`tests/fixtures/limactl-stand-in`): no real limactl can run where TVM's
//! CI does, so the stand-in records the calls and answers like limactl 2.x,
//! including its failure modes. The API's port forward is played by a local
//! listener answering `/readyz` like `tvm serve`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pyrolima::limayaml::Arch;
use pyrolima::{
    HostOs, HostPlatform, InstanceError, InstancePaths, Limactl, LocateError, Readiness, TemplateOptions, UpError,
    UpOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STAND_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/limactl-stand-in");

/// A stand-in limactl with its own state, a home for TVM's files, and x86_64 Linux "binaries".
struct Env {
    state: tempfile::TempDir,
    home: tempfile::TempDir,
    bins: tempfile::TempDir,
    limactl: Limactl,
}

impl Env {
    fn new() -> Self {
        let state = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let bins = tempfile::tempdir().unwrap();
        // Any x86_64 ELF passes the binary check; this test executable is one.
        let exe = std::env::current_exe().unwrap();
        for name in ["tvm", "tvm-agent"] {
            std::fs::copy(&exe, bins.path().join(name)).unwrap();
        }
        // The stand-in finds its state through the environment of the limactl process.
        std::env::set_var("LIMACTL_STANDIN_STATE", state.path());
        Env { state, home, bins, limactl: Limactl::at(STAND_IN) }
    }

    fn paths(&self, name: &str) -> InstancePaths {
        InstancePaths::new(self.home.path(), name)
    }

    fn options(&self, name: &str, port: u16) -> UpOptions {
        let host = HostPlatform { os: HostOs::Linux, arch: Arch::X86_64, macos_major: None, apple_chip: None };
        let mut template = TemplateOptions::new(host, String::new());
        template.port = port;
        UpOptions {
            name: name.into(),
            template,
            bin_dir: self.bins.path().into(),
            paths: self.paths(name),
            ready_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(50),
        }
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.path().join("calls")).unwrap_or_default().lines().map(String::from).collect()
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.state.path().join("instances").join(name)
    }

    /// What the guest would answer (`/var/log/tvm-lima/progress`, `tvm doctor --json`).
    fn guest_file(&self, name: &str, file: &str, content: &str) {
        std::fs::write(self.instance_dir(name).join(file), content).unwrap();
    }
}

/// Serializes the tests: the stand-in's state directory travels in a process-wide variable.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A listener answering `GET /readyz` like `tvm serve` (status line and JSON body given).
async fn api(status: &'static str, body: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

const READY: &str = r#"{"ready":true,"draining":false,"images_not_ready":[],"pools_not_warm":[]}"#;
const BUILDING: &str =
    r#"{"ready":false,"draining":false,"images_not_ready":["python-3.9 building"],"pools_not_warm":[]}"#;

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn up_creates_the_instance_and_returns_the_forwarded_url() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("200 OK", READY).await;
    let mut lines = Vec::new();
    let report =
        pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |l: &str| lines.push(l.to_string())).await.unwrap();
    assert!(report.created);
    assert_eq!(report.url, format!("http://127.0.0.1:{port}"));
    assert_eq!(report.api, Readiness::Ready);
    let paths = env.paths("tvm");
    let calls = env.calls();
    assert_eq!(calls[0], "list --json");
    assert_eq!(calls[1], format!("start --name=tvm --tty=false {}", paths.template.display()));
    // Lima's own progress lines reach the user.
    assert!(lines.iter().any(|l| l.contains("READY")), "{lines:?}");
    // The template the instance was made from mounts only the staging directory, read-only.
    let yaml = std::fs::read_to_string(&paths.template).unwrap();
    assert!(yaml.contains(&format!("location: {}", paths.share.display())), "{yaml}");
    assert!(yaml.contains("writable: false"));
    for bin in ["tvm", "tvm-agent"] {
        assert!(paths.share.join("bin").join(bin).is_file());
    }
}

#[tokio::test]
async fn up_again_reuses_a_running_instance_and_starts_a_stopped_one() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("503 Service Unavailable", BUILDING).await;
    let opts = env.options("tvm", port);
    pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap();
    let again = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap();
    assert!(!again.created);
    // Serving while other versions' images build counts as usable.
    assert_eq!(again.api, Readiness::Serving { images_not_ready: vec!["python-3.9 building".into()] });
    assert_eq!(env.calls().iter().filter(|c| c.starts_with("start")).count(), 1);

    assert!(pyrolima::down(&env.limactl, "tvm").await.unwrap());
    let restarted = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap();
    assert!(!restarted.created);
    assert!(env.calls().contains(&"start --tty=false tvm".to_string()), "{:?}", env.calls());
}

#[tokio::test]
async fn up_returns_when_limactl_exits_even_if_a_child_holds_its_stderr() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    std::fs::write(env.state.path().join("linger"), "").unwrap();
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    // up returned while the child still holds the pipe: it did not wait for EOF.
    let pid = std::fs::read_to_string(env.state.path().join("linger.pid")).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    assert!(proc_dir.exists(), "the lingering child is still running");
    std::process::Command::new("kill").arg(pid.trim()).status().unwrap();
}

#[tokio::test]
async fn an_existing_instance_keeps_its_port() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    let mut lines = Vec::new();
    let other = env.options("tvm", 9999);
    let report = pyrolima::up(&env.limactl, &other, &mut |l: &str| lines.push(l.to_string())).await.unwrap();
    assert_eq!(report.url, format!("http://127.0.0.1:{port}"));
    assert!(lines.iter().any(|l| l.contains(&format!("port {port}"))), "{lines:?}");
}

#[tokio::test]
async fn a_foreign_instance_of_the_same_name_is_left_alone() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let dir = env.instance_dir("tvm");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("status"), "Stopped").unwrap();
    std::fs::write(dir.join("config.json"), r##"{"provision":[{"mode":"system","script":"#!/bin/sh\necho docker"}]}"##)
        .unwrap();
    let err = pyrolima::up(&env.limactl, &env.options("tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::NotTvm(ref n) if n == "tvm"), "{err}");
    assert!(err.to_string().contains("pick another --name"));
    assert!(!env.calls().iter().any(|c| c.starts_with("start")), "{:?}", env.calls());
}

#[tokio::test]
async fn a_failed_start_is_reported_and_leaves_a_broken_instance() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let fatal = r#"time="2026-11-30T12:00:00Z" level=fatal msg="exiting, status={Running:false Degraded:false Exiting:true Errors:[] SSHLocalPort:0}""#;
    std::fs::write(env.state.path().join("fail-start"), fatal).unwrap();
    let err = pyrolima::up(&env.limactl, &env.options("tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    let UpError::Start { ref name, ref source } = err else { panic!("{err}") };
    assert_eq!(name, "tvm");
    assert!(source.to_string().contains("exiting, status="), "{source}");
    assert!(err.to_string().contains("provision.log"), "{err}");
    // The next `up` does not pretend: the instance is Broken and must be deleted.
    std::fs::remove_file(env.state.path().join("fail-start")).unwrap();
    let err = pyrolima::up(&env.limactl, &env.options("tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Broken { ref status, .. } if status == "Broken"), "{err}");
    assert!(err.to_string().contains("tvm lima delete"));
}

#[tokio::test]
async fn limactl_saying_already_exists_is_named() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    // Another limactl created the name between our list and our start.
    std::fs::write(env.state.path().join("fail-start"), "level=fatal msg=\"instance \\\"tvm\\\" already exists\"")
        .unwrap();
    let err = pyrolima::up(&env.limactl, &env.options("tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Exists(ref n) if n == "tvm"), "{err}");
}

/// An Apple silicon Mac (macOS 15, M3): its Lima VM is aarch64.
fn arm64_mac(opts: &mut UpOptions) {
    opts.template.host =
        HostPlatform { os: HostOs::Macos, arch: Arch::Aarch64, macos_major: Some(15), apple_chip: Some(3) };
}

/// Replaces the x86_64 test binaries with files whose ELF header says AArch64
/// (the check reads only the header; nothing runs them here).
fn aarch64_binaries(env: &Env) {
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
    elf.extend_from_slice(&183u16.to_le_bytes());
    elf.resize(64, 0);
    for name in ["tvm", "tvm-agent"] {
        std::fs::write(env.bins.path().join(name), &elf).unwrap();
    }
}

#[tokio::test]
async fn an_arm64_host_with_x86_64_binaries_is_told_how_to_build_aarch64_ones_and_nothing_is_created() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let mut opts = env.options("tvm", 8080);
    arm64_mac(&mut opts);
    let err = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Binaries { arch: Arch::Aarch64, .. }), "{err}");
    let msg = err.to_string();
    for needed in ["aarch64", "x86_64", "--bin-dir", "glibc <= 2.36", "scripts/build-agent-aarch64.sh"] {
        assert!(msg.contains(needed), "{needed}: {msg}");
    }
    assert!(!env.calls().iter().any(|c| c.starts_with("start")), "{:?}", env.calls());
    assert!(!opts.paths.template.exists());
}

#[tokio::test]
async fn an_arm64_host_with_aarch64_binaries_gets_an_aarch64_instance() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    aarch64_binaries(&env);
    let port = api("200 OK", READY).await;
    let mut opts = env.options("tvm", port);
    arm64_mac(&mut opts);
    let report = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap();
    assert!(report.created);
    assert_eq!(report.api, Readiness::Ready);
    let yaml = std::fs::read_to_string(&opts.paths.template).unwrap();
    assert!(yaml.contains("arch: aarch64"), "{yaml}");
    assert!(yaml.contains("nestedVirtualization: true"), "M3 on macOS 15 gets KVM inside: {yaml}");
    for bin in ["tvm", "tvm-agent"] {
        assert_eq!(std::fs::read(opts.paths.share.join("bin").join(bin)).unwrap()[18], 183);
    }
    // The same aarch64 binaries are refused for an x86_64 VM.
    let err = pyrolima::up(&env.limactl, &env.options("tvm-x86", port), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Binaries { arch: Arch::X86_64, .. }), "{err}");
    assert!(err.to_string().contains("an ELF file for aarch64, not for x86_64"), "{err}");
}

#[tokio::test]
async fn binaries_that_are_not_linux_executables_are_refused() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    std::fs::write(env.bins.path().join("tvm-agent"), "#!/bin/sh\n").unwrap();
    let err = pyrolima::up(&env.limactl, &env.options("tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Binaries { ref path, .. } if path.ends_with("tvm-agent")), "{err}");
    assert!(err.to_string().contains("--bin-dir"));
    assert!(!env.calls().iter().any(|c| c.starts_with("start")));
    let mut opts = env.options("tvm", 8080);
    opts.bin_dir = env.bins.path().join("nowhere");
    let err = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[tokio::test]
async fn bad_names_and_sizes_fail_before_limactl() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let err = pyrolima::up(&env.limactl, &env.options("../tvm", 8080), &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::Name(_)), "{err}");
    let mut opts = env.options("tvm", 8080);
    opts.template.memory = "1GiB".into();
    let err = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap_err();
    assert!(err.to_string().contains("--memory"), "{err}");
    assert_eq!(env.calls(), Vec::<String>::new());
}

#[tokio::test]
async fn an_api_that_never_answers_times_out_with_the_step_inside() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = closed_port().await;
    let opts = env.options("tvm", port);
    let err = pyrolima::up(&env.limactl, &opts, &mut |_: &str| {}).await.unwrap_err();
    assert!(matches!(err, UpError::NotReady { progress: ref p, .. } if p == "unknown"), "{err}");
    // Restarted, with the guest reporting its step.
    pyrolima::down(&env.limactl, "tvm").await.unwrap();
    env.guest_file("tvm", "progress", "[5/7] guest kernel (first boot: ~5 min)\n");
    let mut lines = Vec::new();
    let err = pyrolima::up(&env.limactl, &opts, &mut |l: &str| lines.push(l.to_string())).await.unwrap_err();
    let UpError::NotReady { url, progress, .. } = &err else { panic!("{err}") };
    assert_eq!(url, &format!("http://127.0.0.1:{port}"));
    assert_eq!(progress, "[5/7] guest kernel (first boot: ~5 min)");
    assert!(lines.iter().any(|l| l == "inside the VM: [5/7] guest kernel (first boot: ~5 min)"), "{lines:?}");
}

#[tokio::test]
async fn status_says_tcg_plainly_and_shows_readiness() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    env.guest_file(
        "tvm",
        "doctor.json",
        r#"{"healthy":false,"accel":{"kind":"tcg","reason":"KVM unusable (cannot open /dev/kvm: No such file or directory (os error 2)); using TCG software emulation"},"checks":[]}"#,
    );
    // doctor exits 1 when a check fails; its JSON still counts.
    env.guest_file("tvm", "doctor.exit", "1");
    env.guest_file("tvm", "progress", "ready: TVM serves on 127.0.0.1:8080 in the VM\n");
    let share = env.paths("tvm").share;
    let s = pyrolima::status(&env.limactl, "tvm", Some(&share)).await.unwrap();
    assert_eq!(s.state, "Running");
    assert!(s.tvm_instance);
    assert_eq!(s.url, Some(format!("http://127.0.0.1:{port}")));
    assert_eq!(s.api, Some(Readiness::Ready));
    assert_eq!(s.accelerator.as_ref().map(|a| a.kind.as_str()), Some("tcg"));
    assert!(s.notes.iter().any(|n| n.contains("TCG") && n.contains("/dev/kvm")), "{:?}", s.notes);
    assert_eq!(s.provision.as_deref(), Some("ready: TVM serves on 127.0.0.1:8080 in the VM"));
    assert_eq!(s.mounts, vec![format!("{} -> /mnt/tvm-host (ro)", share.display())]);
    assert!(!s.notes.iter().any(|n| n.contains("mounted")), "{:?}", s.notes);
    // The JSON form carries the same facts.
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["accelerator"]["kind"], "tcg");
    assert_eq!(v["api"]["state"], "ready");
}

#[tokio::test]
async fn status_with_kvm_has_no_tcg_note_and_flags_foreign_mounts() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    env.guest_file(
        "tvm",
        "doctor.json",
        r#"{"accel":{"kind":"kvm","reason":"KVM probe boot reached the end of kernel boot in 240 ms"}}"#,
    );
    // As if Lima's _config/default.yaml had added the home directory.
    let cfg = std::fs::read_to_string(env.instance_dir("tvm").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["mounts"].as_array_mut().unwrap().push(serde_json::json!({"location": "/Users/me", "writable": true}));
    std::fs::write(env.instance_dir("tvm").join("config.json"), v.to_string()).unwrap();
    let s = pyrolima::status(&env.limactl, "tvm", Some(&env.paths("tvm").share)).await.unwrap();
    assert_eq!(s.accelerator.unwrap().kind, "kvm");
    assert!(!s.notes.iter().any(|n| n.contains("TCG")), "{:?}", s.notes);
    assert!(s.notes.iter().any(|n| n.contains("/Users/me -> /Users/me (rw)")), "{:?}", s.notes);
}

#[tokio::test]
async fn status_of_stopped_and_missing_instances() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let err = pyrolima::status(&env.limactl, "tvm", None).await.unwrap_err();
    assert!(matches!(err, InstanceError::NotFound(_)));
    assert!(err.to_string().contains("tvm lima up"));
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    pyrolima::down(&env.limactl, "tvm").await.unwrap();
    let s = pyrolima::status(&env.limactl, "tvm", None).await.unwrap();
    assert_eq!(s.state, "Stopped");
    assert_eq!((s.accelerator, s.api), (None, None));
    // No shell into a stopped VM was attempted.
    assert!(!env.calls().iter().any(|c| c.starts_with("shell")), "{:?}", env.calls());
}

#[tokio::test]
async fn down_and_delete() {
    let _g = LOCK.lock().await;
    let env = Env::new();
    let port = api("200 OK", READY).await;
    pyrolima::up(&env.limactl, &env.options("tvm", port), &mut |_: &str| {}).await.unwrap();
    assert!(pyrolima::down(&env.limactl, "tvm").await.unwrap());
    assert!(!pyrolima::down(&env.limactl, "tvm").await.unwrap(), "already stopped");
    assert_eq!(env.calls().iter().filter(|c| *c == "stop tvm").count(), 1);
    let paths = env.paths("tvm");
    assert!(paths.root.exists());
    pyrolima::delete(&env.limactl, "tvm", &paths).await.unwrap();
    assert!(env.calls().contains(&"delete --force tvm".to_string()));
    assert!(!paths.root.exists());
    assert!(!env.instance_dir("tvm").exists());
    assert!(matches!(pyrolima::delete(&env.limactl, "tvm", &paths).await, Err(InstanceError::NotFound(_))));
    assert!(matches!(pyrolima::down(&env.limactl, "tvm").await, Err(InstanceError::NotFound(_))));
}

#[test]
fn limactl_not_installed_is_one_line_with_the_install_command() {
    let empty = tempfile::tempdir().unwrap();
    let err = Limactl::locate_in(None, Some(empty.path().as_os_str().to_owned())).unwrap_err();
    assert!(matches!(err, LocateError::NotInstalled { .. }));
    let msg = err.to_string();
    assert!(!msg.contains('\n'));
    assert!(msg.contains("limactl not found") && msg.contains(pyrolima::limactl::install_hint()), "{msg}");
    let err = Limactl::locate_in(None, None).unwrap_err();
    assert!(matches!(err, LocateError::NotInstalled { .. }));
    // Found on PATH, or named by TVM_LIMACTL.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(STAND_IN, dir.path().join("limactl")).unwrap();
    let path = std::env::join_paths([empty.path(), dir.path()]).unwrap();
    assert_eq!(Limactl::locate_in(None, Some(path)).unwrap().program(), dir.path().join("limactl"));
    let named = Limactl::locate_in(Some(STAND_IN.into()), None).unwrap();
    assert_eq!(named.program(), Path::new(STAND_IN));
    let err = Limactl::locate_in(Some("/nonexistent/limactl".into()), None).unwrap_err();
    assert!(matches!(err, LocateError::Override(_)), "{err}");
}
