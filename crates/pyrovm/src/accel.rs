//! Choosing the accelerator: KVM only when a real probe boot proves it works.
//!
//! `/dev/kvm` existing proves nothing: a nested, paravirtualised KVM may
//! accept the VM and then crawl or die in its instruction emulator. The probe
//! boots the guest kernel without a root device under KVM; reaching the
//! "cannot mount root" panic (and exiting via the reboot) within a few
//! seconds means the kernel ran to the end of its boot. The verdict is cached
//! per kernel, VMM binary and host boot.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;
use tvm_config::Accel;

use crate::qemu::{qemu_args, AccelKind, VmSpec};

/// How long a KVM probe boot may take; a working KVM needs well under a second.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    /// `kvm` or `tcg`.
    pub kind: AccelKindName,
    /// Human-readable reason, shown by `tvm doctor` and logged at startup.
    pub reason: String,
}

/// Serializable mirror of [`AccelKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKindName {
    /// KVM.
    Kvm,
    /// TCG.
    Tcg,
}

impl AccelDecision {
    /// The accelerator.
    pub fn kind(&self) -> AccelKind {
        match self.kind {
            AccelKindName::Kvm => AccelKind::Kvm,
            AccelKindName::Tcg => AccelKind::Tcg,
        }
    }
}

/// Why KVM was demanded but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("accel = \"kvm\" is configured but KVM cannot run the guest: {0} (set accel = \"auto\" to fall back to TCG)")]
pub struct KvmUnusable(pub String);

/// Decides the accelerator for `choice`, probing KVM when needed.
pub fn resolve(
    choice: Accel,
    qemu: &Path,
    kernel: &Path,
    kernel_key: &str,
    cache_dir: &Path,
) -> Result<AccelDecision, KvmUnusable> {
    let tcg = |reason: String| AccelDecision { kind: AccelKindName::Tcg, reason };
    if choice == Accel::Tcg {
        return Ok(tcg("TCG forced by configuration".into()));
    }
    let probe = match kvm_device_usable() {
        Err(why) => Err(why),
        Ok(()) => cached_probe(qemu, kernel, kernel_key, cache_dir),
    };
    match (probe, choice) {
        (Ok(ms), _) => Ok(AccelDecision {
            kind: AccelKindName::Kvm,
            reason: format!("KVM probe boot reached the end of kernel boot in {ms} ms"),
        }),
        (Err(why), Accel::Kvm) => Err(KvmUnusable(why)),
        (Err(why), _) => Ok(tcg(format!("KVM unusable ({why}); using TCG software emulation"))),
    }
}

fn kvm_device_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

#[derive(Serialize, Deserialize)]
struct ProbeRecord {
    ok: bool,
    detail: String,
    ms: u64,
}

fn cached_probe(qemu: &Path, kernel: &Path, kernel_key: &str, cache_dir: &Path) -> Result<u64, String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let qemu_id = which(qemu)
        .and_then(|p| std::fs::metadata(&p).ok().map(|m| format!("{}:{}", p.display(), m.len())))
        .unwrap_or_default();
    let key = hex::encode(&Sha256::digest(format!("{kernel_key}|{qemu_id}|{}", boot_id.trim()))[..12]);
    let path = cache_dir.join("probe").join(format!("kvm-{key}.json"));
    if let Some(r) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok()) {
        return if r.ok { Ok(r.ms) } else { Err(r.detail) };
    }
    let result = probe_kvm(qemu, kernel);
    let rec = match &result {
        Ok(ms) => ProbeRecord { ok: true, detail: String::new(), ms: *ms },
        Err(d) => ProbeRecord { ok: false, detail: d.clone(), ms: 0 },
    };
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(cache_dir));
    let _ = std::fs::write(&path, serde_json::to_vec(&rec).unwrap_or_default());
    result
}

/// Boots `kernel` under KVM with no root device; Ok(ms) if it panics cleanly in time.
pub fn probe_kvm(qemu: &Path, kernel: &Path) -> Result<u64, String> {
    let spec = VmSpec {
        kernel: kernel.to_path_buf(),
        initrd: None,
        rootfs: None,
        memory_mib: 128,
        vcpus: 1,
        accel: AccelKind::Kvm,
        debug: false,
        // The probe decides about KVM only; no guest code of ours runs in it.
        sandbox: false,
        extra_cmdline: None,
    };
    let out = tempfile_path("kvm-probe");
    let file = std::fs::File::create(&out).map_err(|e| format!("probe log: {e}"))?;
    let started = Instant::now();
    let mut child = std::process::Command::new(qemu)
        // Our own kernel and no guest code: the probe needs no descriptor passing.
        .args(qemu_args(
            &spec,
            &crate::jail::VmmIo {
                kernel: kernel.to_string_lossy().into_owned(),
                initrd: None,
                rootfs_fd: None,
                agent_fd: None,
            },
        ))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if started.elapsed() > PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ms = started.elapsed().as_millis() as u64;
    let log = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let result = if log.contains("KVM internal error") {
        Err("probe boot died with a KVM internal error".to_string())
    } else if status.is_none() {
        Err(format!("probe boot did not finish within {} s", PROBE_TIMEOUT.as_secs()))
    } else if log.contains("Kernel panic") && log.contains("VFS") {
        Ok(ms)
    } else {
        Err(format!("probe boot ended unexpectedly: {}", log.lines().last().unwrap_or("no output")))
    };
    info!(ok = result.is_ok(), ms, "KVM probe");
    result
}

fn tempfile_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tvm-{tag}-{}-{}.log", std::process::id(), uuid::Uuid::new_v4().simple()))
}

/// Resolves a program name through PATH.
pub fn which(p: &Path) -> Option<std::path::PathBuf> {
    if p.components().count() > 1 {
        return p.exists().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(p)).find(|c| c.is_file())
}
