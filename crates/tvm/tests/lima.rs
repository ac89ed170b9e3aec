//! `tvm lima …` end to end through the binary, against the limactl stand-in
//! (`crates/pyrolima/tests/fixtures/limactl-stand-in`; no real limactl can
//! run where TVM's CI does). The forwarded API is played by a local listener
//! answering `/readyz` like `tvm serve`. The template's schema check of this
//! binary's output is in scripts/tests.d/50-lima.sh.

use std::io::{Read, Write};
use std::process::{Command, Output};

const STAND_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pyrolima/tests/fixtures/limactl-stand-in");

struct Lima {
    state: tempfile::TempDir,
    home: tempfile::TempDir,
    bins: tempfile::TempDir,
}

impl Lima {
    fn new() -> Self {
        let bins = tempfile::tempdir().unwrap();
        // The VM needs x86_64 Linux binaries; this tvm is one.
        for name in ["tvm", "tvm-agent"] {
            std::fs::copy(env!("CARGO_BIN_EXE_tvm"), bins.path().join(name)).unwrap();
        }
        Lima { state: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap(), bins }
    }

    fn tvm(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tvm"))
            .arg("lima")
            .args(args)
            .env("TVM_LIMACTL", STAND_IN)
            .env("LIMACTL_STANDIN_STATE", self.state.path())
            .env("TVM_LIMA_HOME", self.home.path())
            .env_remove("TVM_LOG")
            .output()
            .unwrap()
    }

    fn instance_file(&self, name: &str, file: &str, content: &str) {
        std::fs::write(self.state.path().join("instances").join(name).join(file), content).unwrap();
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.state.path().join("calls")).unwrap_or_default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A listener answering every request with `/readyz`'s "ready" document.
fn ready_api() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let body = r#"{"ready":true,"draining":false,"images_not_ready":[],"pools_not_warm":[]}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    port
}

#[test]
fn template_follows_flags_and_host() {
    let lima = Lima::new();
    let out = lima.tvm(&["template", "--port", "9090", "--cpus", "6", "--memory", "12GiB"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    for needed in ["hostPort: 9090", "cpus: 6", "memory: 12GiB", "hostIP: 127.0.0.1", "mountPoint: /mnt/tvm-host"] {
        assert!(yaml.contains(needed), "{needed} missing:\n{yaml}");
    }
    let share = lima.home.path().join("tvm").join("share");
    assert!(yaml.contains(&format!("location: {}", share.display())), "{yaml}");
    let m3 = lima.tvm(&[
        "template",
        "--host-os",
        "macos",
        "--host-arch",
        "aarch64",
        "--macos-version",
        "15",
        "--apple-chip",
        "3",
    ]);
    let m3 = text(&m3.stdout);
    assert!(
        m3.contains("vmType: vz") && m3.contains("nestedVirtualization: true") && m3.contains("arch: aarch64"),
        "{m3}"
    );
    let win = text(&lima.tvm(&["template", "--host-os", "windows", "--host-arch", "x86_64"]).stdout);
    assert!(win.contains("vmType: wsl2") && win.contains("mountType: wsl2"), "{win}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let lima = Lima::new();
    for args in [
        &["template", "--memory", "1GiB"][..],
        &["template", "--host-os", "linux", "--vm-type", "vz"],
        &["up", "--name", "../x"],
        &["up", "--bin-dir", "/nonexistent"],
    ] {
        let out = lima.tvm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("tvm: "), "{err}");
    }
    assert!(!lima.calls().contains("start"), "{}", lima.calls());
}

/// Host flags that cannot be true together are refused before anything is
/// rendered, each with one line that says the fix; consistent ones render.
#[test]
fn contradicting_host_flags_are_refused_with_the_fix() {
    let lima = Lima::new();
    for (args, fix) in [
        (&["template", "--host-os", "macos", "--host-arch", "x86_64", "--apple-chip", "3"][..], "--host-arch aarch64"),
        (&["template", "--host-arch", "x86_64", "--apple-chip", "3"], "implies an arm64 host"),
        (&["template", "--host-os", "macos", "--host-arch", "aarch64", "--apple-chip", "0"], "start at 1"),
        (&["template", "--host-os", "macos", "--macos-version", "0"], "start at 10"),
        // This host is Linux: macOS facts need --host-os macos.
        (&["template", "--apple-chip", "3"], "add --host-os macos --host-arch aarch64"),
        (&["template", "--host-os", "windows", "--macos-version", "15"], "add --host-os macos"),
        (&["template", "--host-os", "macos", "--macos-version", "12", "--vm-type", "vz"], "--vm-type qemu"),
    ] {
        let out = lima.tvm(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("tvm: ") && err.contains(fix), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing rendered");
    }
    for ok in [
        &["template", "--host-os", "macos", "--host-arch", "aarch64", "--apple-chip", "1"][..],
        &["template", "--host-os", "macos", "--host-arch", "x86_64", "--macos-version", "13", "--vm-type", "vz"],
    ] {
        let out = lima.tvm(ok);
        assert!(out.status.success(), "{ok:?}: {}", text(&out.stderr));
    }
}

#[test]
fn up_status_shell_down_delete() {
    let lima = Lima::new();
    let port = ready_api().to_string();
    let bins = lima.bins.path().to_str().unwrap().to_string();
    let out = lima.tvm(&["up", "--port", &port, "--bin-dir", &bins, "--wait", "10s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("TVM is ready: tvm run --server http://127.0.0.1:{port} file.py\n"));
    assert!(text(&out.stderr).contains("READY"), "Lima's progress is shown: {}", text(&out.stderr));
    // No `tvm doctor` answer from this guest: up says the accelerator is unknown rather than guess.
    assert!(text(&out.stderr).contains("note: the accelerator inside is unknown"), "{}", text(&out.stderr));

    lima.instance_file(
        "tvm",
        "doctor.json",
        r#"{"accel":{"kind":"tcg","reason":"KVM unusable (cannot open /dev/kvm: No such file or directory (os error 2)); using TCG software emulation"}}"#,
    );
    let out = lima.tvm(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["state"], "Running");
    assert_eq!(s["api"]["state"], "ready");
    assert_eq!(s["accelerator"]["kind"], "tcg");
    assert_eq!(s["url"], format!("http://127.0.0.1:{port}"));
    let human = text(&lima.tvm(&["status"]).stdout);
    assert!(human.contains("accelerator  TCG: KVM unusable"), "{human}");
    assert!(human.contains("note         TVM runs its microVMs under TCG"), "{human}");
    assert!(human.contains(&format!("ready at http://127.0.0.1:{port}")), "{human}");

    lima.instance_file("tvm", "shell.exit", "3");
    let out = lima.tvm(&["shell", "--", "uname", "-a"]);
    assert_eq!(out.status.code(), Some(3), "exit status passes through");
    assert!(lima.calls().contains("shell tvm -- uname -a"), "{}", lima.calls());

    let out = lima.tvm(&["down"]);
    assert_eq!(text(&out.stdout), "tvm stopped\n", "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&lima.tvm(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["state"], "Stopped");

    let out = lima.tvm(&["delete"]);
    assert_eq!(text(&out.stdout), "tvm deleted\n", "{}", text(&out.stderr));
    assert!(!lima.home.path().join("tvm").exists());
    let out = lima.tvm(&["status"]);
    assert_eq!(out.status.code(), Some(70));
    assert!(text(&out.stderr).contains("no Lima instance named \"tvm\""), "{}", text(&out.stderr));
}

#[test]
fn a_failed_start_says_where_to_look() {
    let lima = Lima::new();
    std::fs::write(
        lima.state.path().join("fail-start"),
        "level=fatal msg=\"exiting, status={Running:false Degraded:false Exiting:true}\"",
    )
    .unwrap();
    let bins = lima.bins.path().to_str().unwrap().to_string();
    let out = lima.tvm(&["up", "--bin-dir", &bins]);
    assert_eq!(out.status.code(), Some(70));
    let err = text(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("tvm: starting instance \"tvm\" failed"), "{err}");
    assert!(last.contains("provision.log") && last.contains("exiting, status="), "{err}");
}

#[test]
fn limactl_not_installed_is_one_line_with_the_install_command() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tvm"))
        .args(["lima", "status"])
        .env("PATH", empty.path())
        .env_remove("TVM_LIMACTL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "unavailable, as README's exit table says");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tvm: limactl not found on PATH: install Lima first: "), "{err}");
    assert!(err.contains("lima-vm/lima/releases") || err.contains("brew install lima"), "{err}");
}
