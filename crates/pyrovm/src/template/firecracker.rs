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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use super::{io_err, prewarm, sha256_file, Template, TemplateError, TemplateInputs, TemplateMeta, Templates};
use crate::backend::firecracker::{snapshot, Firecracker, Live};
use crate::backend::{LaunchError, Vmm};
use crate::spec::VmSpec;
use crate::vm::{StartExtras, Vm, VmmHost};

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

/// The template inputs of a Firecracker VM made from `spec`.
pub fn inputs(
    fc: &Firecracker,
    spec: &VmSpec,
    kernel_key: &str,
    image_key: &str,
    warmup: Option<tvm_protocol::Command>,
) -> TemplateInputs {
    let mut inputs = TemplateInputs::new(spec, fc.binary(), kernel_key, image_key, warmup);
    inputs.backend = backend_name(fc).into();
    inputs
}

/// What [`Templates::build_firecracker`] needs.
#[derive(Debug)]
pub struct FcBuildRequest<'a> {
    /// Runtime id (for the metadata and logs).
    pub runtime: String,
    /// The key inputs (must describe `spec`, see [`inputs`]).
    pub inputs: TemplateInputs,
    /// The VM to boot.
    pub spec: VmSpec,
    /// VMM host settings.
    pub host: VmmHost<'a>,
    /// The Firecracker backend the template VM runs under.
    pub fc: Firecracker,
    /// Boot timeout.
    pub boot_timeout: Duration,
}

impl Templates {
    /// Builds the Firecracker template for `req.inputs` unless another
    /// process built it meanwhile (the cache lock `template-<key>`
    /// serializes builders), as [`Templates::build`] does for QEMU.
    ///
    /// # Errors
    /// Any [`TemplateError`] (a VMM that cannot snapshot:
    /// [`TemplateError::Snapshot`]); nothing is published then.
    pub async fn build_firecracker(&self, req: FcBuildRequest<'_>) -> Result<Template, TemplateError> {
        let key = req.inputs.key();
        let cache = self.cache.clone();
        let lock_name = format!("template-{key}");
        let lock_path = cache.root().join("locks").join(&lock_name);
        let _lock = tokio::task::spawn_blocking(move || cache.lock(&lock_name))
            .await
            .map_err(|e| TemplateError::Io {
                action: "locking",
                path: lock_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err("locking", &lock_path))?;
        match self.find(&key) {
            Ok(t) => return Ok(t),
            Err(TemplateError::Corrupt { .. }) => {
                self.remove(&key)?;
            }
            Err(_) => {}
        }
        let result = self.build_locked_firecracker(&key, &req).await;
        match &result {
            Ok(_) => {
                self.counters.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = std::fs::remove_file(self.failure_marker(&key));
                self.evict_to_fit(&key);
            }
            Err(e) => {
                self.counters.build_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.note_failure(&key, &crate::error_chain(e))
            }
        }
        result
    }

    async fn build_locked_firecracker(&self, key: &str, req: &FcBuildRequest<'_>) -> Result<Template, TemplateError> {
        let scratch = self.cache.scratch("template").map_err(io_err("creating a scratch dir in", &self.dir()))?;
        let staged = scratch.join(key);
        std::fs::create_dir(&staged).map_err(io_err("creating", &staged))?;
        let meta = save(&staged, key, req).await?;
        std::fs::write(staged.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap_or_default())
            .map_err(io_err("writing", &staged.join("meta.json")))?;
        let dir = self.template_dir(key);
        scratch.publish(&staged, &dir).map_err(io_err("publishing", &dir))?;
        info!(key, runtime = %meta.runtime, state_bytes = meta.state_bytes, boot_ms = meta.boot_ms,
            warmup_ms = meta.warmup_ms, save_ms = meta.save_ms, "firecracker template built");
        self.find(key)
    }

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

/// How a clone of `t` starts under `fc`: the backend restoring the
/// template's files, and the descriptors it inherits (none through the
/// jailer, which gets hard links in its chroot instead).
///
/// # Errors
/// [`TemplateError`] when the template's files cannot be opened or fail their checks.
pub(crate) fn restore_launch(
    templates: &Templates,
    t: &Template,
    fc: &Firecracker,
) -> Result<(Firecracker, StartExtras), TemplateError> {
    let mem = templates.open_state(t)?;
    let vmstate = templates.open_vmstate(t)?;
    let jailed = fc.jailed();
    let fds = (!jailed).then(|| {
        use std::os::fd::AsRawFd;
        (vmstate.as_raw_fd(), mem.as_raw_fd())
    });
    let from = snapshot::RestoreFrom { snapshot: t.dir.join(VMSTATE), mem: t.state_path(), fds };
    let extras = StartExtras {
        fds: if jailed { Vec::new() } else { vec![vmstate, mem] },
        args: Vec::new(),
        resume: Some(super::uniqueness()),
    };
    Ok((fc.restoring(from), extras))
}

/// Boots the template VM under Firecracker, warms it, pauses it and saves
/// its snapshot into `dir`.
async fn save(dir: &Path, key: &str, req: &FcBuildRequest<'_>) -> Result<TemplateMeta, TemplateError> {
    let id = format!("tpl{}", &uuid::Uuid::new_v4().simple().to_string()[..9]);
    let fc = req.fc.for_snapshot();
    let mut vm = Vm::launch(&id, &req.host, &fc, &req.spec, req.boot_timeout, StartExtras::cold())
        .await
        .map_err(TemplateError::Vm)?;
    let boot_ms = vm.boot_time().as_millis() as u64;
    let warmup_ms = match &req.inputs.warmup {
        Some(command) => prewarm(&mut vm, command).await?,
        None => 0,
    };
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
    let state_bytes = std::fs::metadata(&state_path).map_err(io_err("reading", &state_path))?.len();
    let state_sha256 = sha256_file(&state_path).map_err(io_err("hashing", &state_path))?;
    let vmstate_sha256 = sha256_file(&vmstate_path).map_err(io_err("hashing", &vmstate_path))?;
    let sum = dir.join(VMSTATE_SUM);
    std::fs::write(&sum, vmstate_sha256).map_err(io_err("writing", &sum))?;
    Ok(TemplateMeta {
        key: key.into(),
        runtime: req.runtime.clone(),
        inputs: req.inputs.clone(),
        state_sha256,
        state_bytes,
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        boot_ms,
        warmup_ms,
        save_ms,
    })
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
            inputs: TemplateInputs::new(
                &crate::spec::VmSpec {
                    kernel: "/k".into(),
                    initrd: None,
                    rootfs: None,
                    memory_mib: 256,
                    vcpus: 1,
                    accel: crate::spec::AccelKind::Kvm,
                    agent: None,
                    debug: false,
                    extra_cmdline: None,
                },
                Path::new("/nonexistent/firecracker"),
                "kern",
                "img",
                None,
            ),
            state_sha256: String::new(),
            state_bytes: 0,
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
        let spec = crate::spec::VmSpec {
            kernel: "/k".into(),
            initrd: None,
            rootfs: None,
            memory_mib: 256,
            vcpus: 1,
            accel: crate::spec::AccelKind::Kvm,
            agent: None,
            debug: false,
            extra_cmdline: None,
        };
        let fc_inputs = inputs(&fc, &spec, "k", "i", None);
        let mut jailed = fc_inputs.clone();
        jailed.backend = "firecracker-jailer".into();
        assert_ne!(fc_inputs.key(), jailed.key());
        let qemu = TemplateInputs::new(&spec, Path::new("/nonexistent/firecracker"), "k", "i", None);
        assert_ne!(fc_inputs.key(), qemu.key(), "a QEMU template never loads into Firecracker");
    }
}
