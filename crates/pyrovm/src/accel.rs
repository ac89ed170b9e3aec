//! Choosing the accelerator: KVM only when a real probe proves it works.
//!
//! `/dev/kvm` existing proves nothing: a nested, paravirtualised KVM may
//! accept the VM and then crawl or die in its instruction emulator. The
//! backend's [`Vmm::probe_kvm`] decides (QEMU boots the guest kernel without
//! a root device and expects the "cannot mount root" panic within seconds).
//! The verdict is cached per kernel, VMM binary and host boot.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tvm_config::Accel;

use crate::backend::Vmm;
use crate::kernel::Kernel;
use crate::spec::AccelKind;

pub use crate::cache::which_path as which;

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

/// Decides the accelerator for `choice` under `vmm`, probing KVM when needed.
///
/// # Errors
/// [`KvmUnusable`] when `choice` is `kvm` and the probe fails.
pub fn resolve<V: Vmm>(
    choice: Accel,
    vmm: &V,
    kernel: &Kernel,
    cache_dir: &Path,
) -> Result<AccelDecision, KvmUnusable> {
    let tcg = |reason: String| AccelDecision { kind: AccelKindName::Tcg, reason };
    if choice == Accel::Tcg {
        return Ok(tcg("TCG forced by configuration".into()));
    }
    match (probe(vmm, kernel, cache_dir), choice) {
        (Ok(ms), _) => Ok(AccelDecision {
            kind: AccelKindName::Kvm,
            reason: format!("{} KVM probe passed in {ms} ms", vmm.kind().as_str()),
        }),
        (Err(why), Accel::Kvm) => Err(KvmUnusable(why)),
        (Err(why), _) => Ok(tcg(format!("KVM unusable ({why}); using TCG software emulation"))),
    }
}

/// Whether KVM runs `kernel` under `vmm`: `/dev/kvm` opens read-write and the
/// backend's probe boot passes (cached per kernel, VMM binary and host boot
/// in `cache_dir/probe`).
///
/// # Errors
/// Why not, as one line of text.
pub fn probe<V: Vmm>(vmm: &V, kernel: &Kernel, cache_dir: &Path) -> Result<u64, String> {
    kvm_device_usable()?;
    cached_probe(vmm, kernel, cache_dir)
}

fn kvm_device_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

/// Part of every cached verdict's key: bump it when a backend's probe changes
/// what it proves, or a verdict of the old probe answers for the new one
/// (2: Firecracker boots the kernel, where 1 only called `KVM_CREATE_VM`).
const PROBE_METHOD: u32 = 2;

#[derive(Serialize, Deserialize)]
struct ProbeRecord {
    ok: bool,
    detail: String,
    ms: u64,
}

fn cached_probe<V: Vmm>(vmm: &V, kernel: &Kernel, cache_dir: &Path) -> Result<u64, String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let vmm_id = which(vmm.binary())
        .and_then(|p| std::fs::metadata(&p).ok().map(|m| format!("{}:{}", p.display(), m.len())))
        .unwrap_or_default();
    let key = hex::encode(&Sha256::digest(format!("{PROBE_METHOD}|{}|{vmm_id}|{}", kernel.key, boot_id.trim()))[..12]);
    let path = cache_dir.join("probe").join(format!("kvm-{key}.json"));
    if let Some(r) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok()) {
        return if r.ok { Ok(r.ms) } else { Err(r.detail) };
    }
    let result = vmm.probe_kvm(kernel);
    let rec = match &result {
        Ok(ms) => ProbeRecord { ok: true, detail: String::new(), ms: *ms },
        Err(d) => ProbeRecord { ok: false, detail: d.clone(), ms: 0 },
    };
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(cache_dir));
    let _ = std::fs::write(&path, serde_json::to_vec(&rec).unwrap_or_default());
    result
}
