//! Templates under the Firecracker backend: Firecracker snapshots.
//!
//! Built like QEMU's (boot, agent ready, warm-up), then saved through
//! Firecracker's API: `PATCH /vm {"state": "Paused"}` and `PUT
//! /snapshot/create` (full) into the VMM's own directory, moved into the
//! template. A template holds `state` (the guest memory file: the large one,
//! size- and sha256-checked like QEMU's state, through
//! [`Templates::find`] / [`Templates::open_state`]) and `vmstate` (the
//! microVM state, its sha256 in `vmstate.sha256`, re-hashed at every
//! restore: it is small). Both are mode 0644: the restored VMM runs as a uid
//! of its own and reopens them through `/proc/self/fd`, which checks the
//! file's mode (the cache directory above keeps other users out by path).
//! A clone is a fresh Firecracker restoring them with `PUT /snapshot/load`
//! ([`crate::backend::firecracker::snapshot`]).
//!
//! Firecracker's snapshot names the root drive by path, so template VMs and
//! clones pin the image descriptor to one number (or use the jailer's fixed
//! chroot path); the inputs key says whether the jailer was used.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::debug;
use tvm_protocol::Command;

use super::{
    boot_and_warm, io_err, sha256_file, BuildRequest, Template, TemplateError, TemplateInputs, TemplateMeta,
    TemplateVmm, Templates, WarmVm,
};
use crate::backend::firecracker::{snapshot, Firecracker, Live};
use crate::backend::{LaunchError, Vmm};
use crate::spec::VmSpec;
use crate::vm::{uniqueness, StartExtras};

/// The microVM state file in a Firecracker template.
pub const VMSTATE: &str = "vmstate";

/// Its sha256 (hex), written at build time.
const VMSTATE_SUM: &str = "vmstate.sha256";

/// Largest microVM state file accepted (Firecracker's are tens of KiB).
const MAX_VMSTATE: u64 = 64 << 20;

/// How long pausing and snapshotting may take (the memory file is written in full).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `backend` of a Firecracker template's inputs: snapshots name the
/// root drive by a path that differs with and without the jailer.
pub fn backend_name(fc: &Firecracker) -> &'static str {
    if fc.jailed() {
        "firecracker-jailer"
    } else {
        "firecracker"
    }
}

impl TemplateVmm for Firecracker {
    /// As QEMU's, with `backend` naming whether the jailer is used ([`backend_name`]).
    fn template_inputs(
        &self,
        spec: &VmSpec,
        kernel_key: &str,
        image_key: &str,
        warmup: Option<Command>,
    ) -> TemplateInputs {
        let mut inputs = TemplateInputs::new(spec, self.binary(), kernel_key, image_key, warmup);
        inputs.backend = backend_name(self).into();
        inputs
    }

    async fn save(dir: &Path, key: &str, req: &BuildRequest<'_, Self>) -> Result<TemplateMeta, TemplateError> {
        save_snapshot(dir, key, req).await
    }

    /// This backend restoring the template's files, and the descriptors
    /// it inherits (none through the jailer, which gets hard links in its
    /// chroot instead).
    fn restore_launch(&self, templates: &Templates, t: &Template) -> Result<(Self, StartExtras), TemplateError> {
        let mem = templates.open_state(t)?;
        let vmstate = templates.open_vmstate(t)?;
        let jailed = self.jailed();
        let fds = (!jailed).then(|| {
            use std::os::fd::AsRawFd;
            (vmstate.as_raw_fd(), mem.as_raw_fd())
        });
        let from = snapshot::RestoreFrom { snapshot: t.dir.join(VMSTATE), mem: t.state_path(), fds };
        let extras = StartExtras {
            fds: if jailed { Vec::new() } else { vec![vmstate, mem] },
            args: Vec::new(),
            resume: Some(uniqueness()),
        };
        Ok((self.restoring(from), extras))
    }
}

impl Templates {
    /// The microVM state file of a Firecracker template, opened and checked
    /// against its recorded sha256 (a mismatch removes nothing: the caller
    /// treats it as corrupt).
    ///
    /// # Errors
    /// [`TemplateError::Corrupt`] when it is missing, too large or changed;
    /// [`TemplateError::Io`] when it cannot be read.
    pub fn open_vmstate(&self, t: &Template) -> Result<OwnedFd, TemplateError> {
        let path = t.dir.join(VMSTATE);
        let corrupt = |reason: String| TemplateError::Corrupt { key: t.key.clone(), reason };
        let want =
            std::fs::read_to_string(t.dir.join(VMSTATE_SUM)).map_err(|e| corrupt(format!("no {VMSTATE_SUM}: {e}")))?;
        let file = File::open(&path).map_err(|e| corrupt(format!("no {VMSTATE}: {e}")))?;
        let len = file.metadata().map_err(io_err("reading", &path))?.len();
        if len > MAX_VMSTATE {
            return Err(corrupt(format!("{VMSTATE} is {len} bytes, at most {MAX_VMSTATE}")));
        }
        // Hashed through the descriptor the VMM inherits: what was checked is what loads.
        let got = sha256_file(Path::new(&format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file))))
            .map_err(io_err("hashing", &path))?;
        if got != want.trim() {
            return Err(corrupt(format!("{VMSTATE} sha256 {got}, recorded {}", want.trim())));
        }
        Ok(file.into())
    }
}

/// Boots the template VM under Firecracker, warms it, pauses it and saves
/// its snapshot into `dir`.
async fn save_snapshot(
    dir: &Path,
    key: &str,
    req: &BuildRequest<'_, Firecracker>,
) -> Result<TemplateMeta, TemplateError> {
    let WarmVm { mut vm, boot_ms, warmup_ms } =
        boot_and_warm(req, &req.vmm.for_snapshot(), StartExtras::cold()).await?;
    let started = Instant::now();
    let live = vm.backend_state::<Live>().ok_or(TemplateError::Snapshot(LaunchError::Unsupported {
        vmm: "firecracker",
        what: "snapshots without its API",
    }))?;
    let (vmstate_at, mem_at) = (live.files_dir.host_path(VMSTATE), live.files_dir.host_path("mem"));
    let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
    let saved = async {
        live.api.send(&snapshot::pause_request(), deadline).await?;
        let create = snapshot::create_request(&live.files_dir.vmm_path(VMSTATE), &live.files_dir.vmm_path("mem"));
        live.api.send(&create, deadline).await
    };
    if let Err(e) = saved.await {
        debug!(console = %vm.console(), "template VM console");
        return Err(TemplateError::Snapshot(e));
    }
    let save_ms = started.elapsed().as_millis() as u64;
    // Out of the VM's directory before the VM (and the directory) goes.
    let (state_path, vmstate_path) = (dir.join("state"), dir.join(VMSTATE));
    move_file(&mem_at, &state_path)?;
    move_file(&vmstate_at, &vmstate_path)?;
    drop(vm);
    let vmstate_sha256 = sha256_file(&vmstate_path).map_err(io_err("hashing", &vmstate_path))?;
    let sum = dir.join(VMSTATE_SUM);
    std::fs::write(&sum, vmstate_sha256).map_err(io_err("writing", &sum))?;
    TemplateMeta::saved(key, req, (&state_path, None), (boot_ms, warmup_ms), save_ms)
}

/// Moves a file the VMM wrote into the template (a copy across file
/// systems), owned by us, mode 0644, synced.
fn move_file(from: &Path, to: &Path) -> Result<(), TemplateError> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).map_err(io_err("copying the snapshot into", to))?;
        let _ = std::fs::remove_file(from);
    }
    let f = File::options().write(true).open(to).map_err(io_err("opening", to))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io_err("setting the mode of", to))?;
    nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        Some(nix::unistd::geteuid()),
        Some(nix::unistd::getegid()),
    )
    .map_err(|e| TemplateError::Io { action: "owning", path: to.to_path_buf(), source: e.into() })?;
    f.sync_all().map_err(io_err("syncing", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM shape for key tests (nothing boots).
    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k".into(),
            initrd: None,
            rootfs: None,
            memory_mib: 256,
            vcpus: 1,
            accel: crate::spec::AccelKind::Kvm,
            agent: None,
            debug: false,
            extra_cmdline: None,
        }
    }

    #[test]
    fn a_changed_vmstate_is_corrupt() {
        let cache = tempfile::tempdir().unwrap();
        let store = Templates::new(cache.path());
        let dir = store.dir().join("k1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(VMSTATE), b"microvm state").unwrap();
        let sum = sha256_file(&dir.join(VMSTATE)).unwrap();
        std::fs::write(dir.join(VMSTATE_SUM), sum).unwrap();
        let meta = TemplateMeta {
            key: "k1".into(),
            runtime: "python-3.13".into(),
            inputs: TemplateInputs::new(&spec(), Path::new("/nonexistent/firecracker"), "kern", "img", None),
            state_sha256: String::new(),
            state_bytes: 0,
            ram: None,
            created_unix: 0,
            boot_ms: 0,
            warmup_ms: 0,
            save_ms: 0,
        };
        let t = Template { key: "k1".into(), dir: dir.clone(), meta };
        store.open_vmstate(&t).expect("the recorded state opens");
        std::fs::write(dir.join(VMSTATE), b"microvm statE").unwrap();
        let e = store.open_vmstate(&t).unwrap_err();
        assert!(matches!(&e, TemplateError::Corrupt { reason, .. } if reason.contains("sha256")), "{e}");
        std::fs::remove_file(dir.join(VMSTATE_SUM)).unwrap();
        assert!(matches!(store.open_vmstate(&t), Err(TemplateError::Corrupt { .. })));
    }

    #[test]
    fn jailed_and_plain_templates_have_different_keys() {
        let settings = tvm_config::Settings { jailer: "/nonexistent/jailer".into(), ..Default::default() };
        let fc = Firecracker::new(&settings, true);
        assert_eq!(backend_name(&fc), "firecracker");
        let fc_inputs = fc.template_inputs(&spec(), "k", "i", None);
        let mut jailed = fc_inputs.clone();
        jailed.backend = "firecracker-jailer".into();
        assert_ne!(fc_inputs.key(), jailed.key());
        let qemu = TemplateInputs::new(&spec(), Path::new("/nonexistent/firecracker"), "k", "i", None);
        assert_ne!(fc_inputs.key(), qemu.key(), "a QEMU template never loads into Firecracker");
    }
}
