//! VM templates: every execution starts from a restored snapshot of a booted,
//! prewarmed VM instead of a cold kernel boot.
//!
//! A template is made once per set of inputs ([`TemplateInputs`]: backend and
//! VMM binary, accelerator, kernel, agent initramfs, runtime image, VM shape,
//! kernel arguments, warm-up command): boot a VM, wait for the agent, run the
//! runtime's warm-up (`catalog/runtimes.toml`, `warmup`) as the job user and
//! wipe its traces ([`tvm_protocol::HostMessage::Prewarm`]), pause the VM and
//! save its state to the cache (QEMU: `stop`, `getfd`, `migrate fd:` over QMP).
//! Each execution then starts a new VMM process that loads that state
//! (`-incoming fd:N`) and sends `Resume` with fresh entropy and the host's
//! clock; the agent reseeds its CRNG, sets the clock and answers `Ready`.
//! The template never ran user code, and each clone still serves one job and
//! is destroyed.
//!
//! Layout: `<cache>/templates/<key>/{state,meta.json,verified.json}`. The
//! state's sha256 is recorded at build time and checked before first use;
//! `verified.json` remembers the file identity (inode, size, mtime, ctime)
//! that passed, so later processes re-hash only when the file changed (any
//! write moves its ctime, which no caller can set back). Templates are a
//! cache: deleting them loses nothing but time.
//!
//! The QMP channel and the state file reach QEMU as inherited descriptors
//! like everything else ([`crate::jail`]): QEMU still opens no TVM path.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, info};
use tvm_protocol::{
    read_frame_async, write_frame_async, Command, GuestMessage, HostMessage, StageStatus, Uniqueness, ENTROPY_BYTES,
    MAX_GUEST_FRAME,
};

pub mod firecracker;

use crate::backend::qemu::Qemu;
use crate::cache::Cache;
use crate::spec::VmSpec;
use crate::vm::{StartExtras, StartVmError, Vm, VmmHost};

mod lru;

/// Bumped when the layout or the meaning of a template changes.
pub const FORMAT: u32 = 1;

/// How long a template's VM may take to save its state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// After a failed build, how long starts cold boot without trying again
/// (a warm-up that fails would otherwise cost every CLI run a futile build).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(600);

/// Longest QMP reply line accepted (QEMU's replies here are a few hundred bytes).
const MAX_QMP_LINE: usize = 64 << 10;

/// Fresh entropy and the host clock for one job or resume.
pub fn uniqueness() -> Uniqueness {
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    // The OS RNG failing is not recoverable in any useful way; a VM that
    // would run with its template's RNG state must not start.
    getrandom::fill(&mut entropy).expect("the host's random number generator works");
    let unix_time_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    Uniqueness { entropy, unix_time_ns }
}

/// Why no template could be used or made. None of these fail an execution:
/// the caller cold boots instead.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template with this key exists yet.
    #[error("no template {0} yet")]
    Missing(String),
    /// The state file does not match its recorded sha256 or size, or the
    /// metadata is unreadable; the template is removed.
    #[error("template {key} is corrupt: {reason}")]
    Corrupt {
        /// Template key.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// Cache I/O failed (lock, scratch dir, state file, metadata).
    #[error("template {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The template's VM did not boot (or a restored VM did not resume).
    #[error("template VM")]
    Vm(#[source] StartVmError),
    /// The chosen VMM backend has no templates (they are QEMU snapshots).
    #[error("templates are not implemented for the {0} backend")]
    Unsupported(&'static str),
    /// The warm-up did not succeed in the template's VM.
    #[error("template warm-up {0}")]
    Warmup(String),
    /// QMP (pause, hand over the state file, migrate) failed.
    #[error("saving the template VM over QMP: {0}")]
    Qmp(String),
    /// The VMM's API did not pause or snapshot the template VM (Firecracker:
    /// `PATCH /vm`, `PUT /snapshot/create`).
    #[error("saving the template VM through the VMM's API")]
    Snapshot(#[source] crate::backend::LaunchError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { action, path, source }
}

/// Everything a template depends on; its key is their hash, so a change to
/// any of them makes a new template (and the old one unused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInputs {
    /// [`FORMAT`].
    pub format: u32,
    /// VMM backend (`qemu`).
    pub backend: String,
    /// The VMM binary: resolved path, size and mtime (saved state is only
    /// guaranteed to load into the same VMM build).
    pub vmm: String,
    /// Accelerator the state was saved under (`kvm`, `tcg`).
    pub accel: String,
    /// Guest kernel key.
    pub kernel: String,
    /// Agent initramfs file name (`initrd-<agent hash>.cpio`).
    pub initrd: String,
    /// Runtime image key.
    pub image: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Verbose guest logs (a kernel command-line difference).
    pub debug: bool,
    /// Extra kernel arguments.
    pub kernel_args: Option<String>,
    /// The warm-up run in the template (argv, environment, limits).
    pub warmup: Option<Command>,
}

impl TemplateInputs {
    /// The inputs of a VM made from `spec`, with `image_key` and `warmup`.
    pub fn new(spec: &VmSpec, vmm: &Path, kernel_key: &str, image_key: &str, warmup: Option<Command>) -> Self {
        let initrd = spec
            .initrd
            .as_deref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            format: FORMAT,
            backend: "qemu".into(),
            vmm: vmm_identity(vmm),
            accel: spec.accel.as_str().into(),
            kernel: kernel_key.into(),
            initrd,
            image: image_key.into(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            debug: spec.debug,
            kernel_args: spec.extra_cmdline.clone(),
            warmup,
        }
    }

    /// The template key: 24 hex digits of the inputs' sha256.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("inputs serialize");
        hex::encode(&Sha256::digest(json)[..12])
    }
}

fn vmm_identity(vmm: &Path) -> String {
    crate::accel::which(vmm)
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some(format!("{}:{}:{}", p.display(), m.len(), m.mtime()))
        })
        .unwrap_or_else(|| vmm.display().to_string())
}

/// What is recorded next to each template's state (`meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// The template key.
    pub key: String,
    /// The runtime it was built for (informational: the inputs decide).
    pub runtime: String,
    /// Everything it depends on.
    pub inputs: TemplateInputs,
    /// sha256 of the state file, hex.
    pub state_sha256: String,
    /// Size of the state file.
    pub state_bytes: u64,
    /// When the build finished (Unix seconds).
    pub created_unix: u64,
    /// Cold boot of the template VM to agent-ready, ms.
    pub boot_ms: u64,
    /// Warm-up wall time in the guest, ms.
    pub warmup_ms: u64,
    /// Pause and save of the state, ms.
    pub save_ms: u64,
}

/// The file identity that last matched the recorded sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// A usable template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its key.
    pub key: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: TemplateMeta,
}

impl Template {
    /// The saved VM state.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// What happened to templates in this process, counted since it started:
/// the server exports these as Prometheus counters (a restore that fails is
/// not an error to the caller, so without a count it would show only in logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TemplateCounts {
    /// Templates built and published.
    pub built: u64,
    /// Builds that failed (boot, warm-up or save).
    pub build_failures: u64,
    /// Templates found corrupt (metadata, size or sha256) and removed.
    pub corrupt: u64,
    /// Restores whose VMM did not resume the saved VM to agent-ready.
    pub restore_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    built: AtomicU64,
    build_failures: AtomicU64,
    corrupt: AtomicU64,
    restore_failures: AtomicU64,
}

/// The template store in the cache, plus which builds are running in this
/// process (so a busy server starts one background build per key, not one
/// per request).
#[derive(Debug)]
pub struct Templates {
    cache: Cache,
    building: Mutex<HashSet<String>>,
    verified: Mutex<HashMap<String, Identity>>,
    counters: Counters,
    /// Size cap of the store in bytes, 0 for none ([`lru`]).
    max_bytes: AtomicU64,
}

impl Templates {
    /// The store under `cache_dir/templates`.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            cache: Cache::new(cache_dir),
            building: Mutex::default(),
            verified: Mutex::default(),
            counters: Counters::default(),
            max_bytes: AtomicU64::new(0),
        }
    }

    /// The counts so far (see [`TemplateCounts`]).
    pub fn counts(&self) -> TemplateCounts {
        let c = &self.counters;
        TemplateCounts {
            built: c.built.load(Ordering::Relaxed),
            build_failures: c.build_failures.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            restore_failures: c.restore_failures.load(Ordering::Relaxed),
        }
    }

    /// Counts a restore whose VM did not resume (the caller cold boots).
    pub fn count_restore_failure(&self) {
        self.counters.restore_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// `<cache>/templates`.
    pub fn dir(&self) -> PathBuf {
        self.cache.root().join("templates")
    }

    fn template_dir(&self, key: &str) -> PathBuf {
        self.dir().join(key)
    }

    /// The template `key`, checked: metadata present and matching, state file
    /// matching its recorded size and sha256 (re-hashed only when the file's
    /// identity differs from the one last verified).
    ///
    /// # Errors
    /// [`TemplateError::Missing`] when there is none; [`TemplateError::Corrupt`]
    /// when it does not check out (the caller removes it).
    pub fn find(&self, key: &str) -> Result<Template, TemplateError> {
        let found = self.find_unchecked(key);
        if matches!(found, Err(TemplateError::Corrupt { .. })) {
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn find_unchecked(&self, key: &str) -> Result<Template, TemplateError> {
        let dir = self.template_dir(key);
        let meta_path = dir.join("meta.json");
        let bytes = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TemplateError::Missing(key.into())),
            Err(e) => return Err(io_err("reading", &meta_path)(e)),
        };
        let corrupt = |reason: String| TemplateError::Corrupt { key: key.into(), reason };
        let meta: TemplateMeta = serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("meta.json: {e}")))?;
        if meta.key != key || meta.inputs.key() != key {
            return Err(corrupt("meta.json names other inputs".into()));
        }
        let template = Template { key: key.into(), dir, meta };
        let state = template.state_path();
        let m = match std::fs::metadata(&state) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt("the state file is missing".into()))
            }
            Err(e) => return Err(io_err("reading", &state)(e)),
        };
        self.verify(&template, Identity::of(&m))?;
        Ok(template)
    }

    /// Checks the state file whose identity is `id` against the metadata.
    fn verify(&self, t: &Template, id: Identity) -> Result<(), TemplateError> {
        let corrupt = |reason: String| TemplateError::Corrupt { key: t.key.clone(), reason };
        if id.size != t.meta.state_bytes {
            return Err(corrupt(format!("state is {} bytes, {} recorded", id.size, t.meta.state_bytes)));
        }
        if self.verified.lock().map(|v| v.get(&t.key) == Some(&id)).unwrap_or(false) {
            return Ok(());
        }
        let stamp_path = t.dir.join("verified.json");
        let stamped = std::fs::read(&stamp_path).ok().and_then(|b| serde_json::from_slice::<Identity>(&b).ok());
        if stamped != Some(id) {
            let started = Instant::now();
            let state = t.state_path();
            let sha = sha256_file(&state).map_err(io_err("hashing", &state))?;
            if sha != t.meta.state_sha256 {
                return Err(corrupt(format!("state sha256 {sha}, {} recorded", t.meta.state_sha256)));
            }
            debug!(key = %t.key, ms = started.elapsed().as_millis() as u64, "template state verified");
            // Best effort: without the stamp the next process hashes again.
            let _ = write_atomic(&stamp_path, &serde_json::to_vec(&id).unwrap_or_default());
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert(t.key.clone(), id);
        }
        Ok(())
    }

    /// Opens the state of `t` for one restore (a descriptor of its own, so
    /// concurrent restores do not share a file offset), checking that the
    /// file opened is the one verified.
    ///
    /// # Errors
    /// I/O errors, or [`TemplateError::Corrupt`] if the file changed.
    pub fn open_state(&self, t: &Template) -> Result<OwnedFd, TemplateError> {
        let path = t.state_path();
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TemplateError::Missing(t.key.clone()),
            _ => io_err("opening", &path)(e),
        })?;
        let m = file.metadata().map_err(io_err("reading", &path))?;
        if let Err(e) = self.verify(t, Identity::of(&m)) {
            if matches!(e, TemplateError::Corrupt { .. }) {
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        self.mark_used(t);
        Ok(file.into())
    }

    /// Removes template `key`. Returns whether it existed.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub fn remove(&self, key: &str) -> Result<bool, TemplateError> {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        if let Ok(mut v) = self.verified.lock() {
            v.remove(key);
        }
        let dir = self.template_dir(key);
        if !dir.exists() {
            return Ok(false);
        }
        // Renamed aside first, so a concurrent reader sees it whole or not at all.
        let scratch = self.cache.scratch("template-rm").map_err(io_err("creating a scratch dir in", &self.dir()))?;
        match std::fs::rename(&dir, scratch.join("gone")) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }

    /// Every template with readable metadata, newest first.
    pub fn list(&self) -> Vec<TemplateMeta> {
        let Ok(entries) = std::fs::read_dir(self.dir()) else { return Vec::new() };
        let mut all: Vec<TemplateMeta> = entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("meta.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        all.sort_by(|a: &TemplateMeta, b| b.created_unix.cmp(&a.created_unix).then_with(|| a.key.cmp(&b.key)));
        all
    }

    /// Marks `key` as being built in this process; `false` if it already is.
    pub fn claim_build(&self, key: &str) -> bool {
        self.building.lock().map(|mut b| b.insert(key.to_string())).unwrap_or(false)
    }

    /// Ends the mark of [`Templates::claim_build`].
    pub fn release_build(&self, key: &str) {
        if let Ok(mut b) = self.building.lock() {
            b.remove(key);
        }
    }

    /// Builds the template for `inputs` unless another process built it
    /// meanwhile (the cache lock `template-<key>` serializes builders).
    ///
    /// # Errors
    /// Any [`TemplateError`]; nothing is published then.
    pub async fn build(&self, req: BuildRequest<'_>) -> Result<Template, TemplateError> {
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
        let result = self.build_locked(&key, &req).await;
        match &result {
            Ok(_) => {
                self.counters.built.fetch_add(1, Ordering::Relaxed);
                let _ = std::fs::remove_file(self.failure_marker(&key));
                self.evict_to_fit(&key);
            }
            Err(e) => {
                self.counters.build_failures.fetch_add(1, Ordering::Relaxed);
                self.note_failure(&key, &crate::error_chain(e))
            }
        }
        result
    }

    /// Records that `key` failed (build or restore): for
    /// [`RETRY_AFTER_FAILURE`], starts cold boot without trying it again.
    pub fn note_failure(&self, key: &str, why: &str) {
        let _ = std::fs::create_dir_all(self.dir());
        let _ = std::fs::write(self.failure_marker(key), why);
    }

    fn failure_marker(&self, key: &str) -> PathBuf {
        self.dir().join(format!("{key}.failed"))
    }

    /// Why the last build of `key` failed, if it failed less than
    /// [`RETRY_AFTER_FAILURE`] ago.
    pub fn recent_failure(&self, key: &str) -> Option<String> {
        let marker = self.failure_marker(key);
        let age = std::fs::metadata(&marker).ok()?.modified().ok()?.elapsed().unwrap_or_default();
        (age < RETRY_AFTER_FAILURE).then(|| std::fs::read_to_string(&marker).unwrap_or_default())
    }

    async fn build_locked(&self, key: &str, req: &BuildRequest<'_>) -> Result<Template, TemplateError> {
        let key = key.to_string();
        let scratch = self.cache.scratch("template").map_err(io_err("creating a scratch dir in", &self.dir()))?;
        let staged = scratch.join(&key);
        std::fs::create_dir(&staged).map_err(io_err("creating", &staged))?;
        let meta = save_template(&staged, &key, req).await?;
        std::fs::write(staged.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap_or_default())
            .map_err(io_err("writing", &staged.join("meta.json")))?;
        let dir = self.template_dir(&key);
        scratch.publish(&staged, &dir).map_err(io_err("publishing", &dir))?;
        info!(key, runtime = %meta.runtime, state_bytes = meta.state_bytes, boot_ms = meta.boot_ms,
            warmup_ms = meta.warmup_ms, save_ms = meta.save_ms, "template built");
        self.find(&key)
    }
}

/// What [`Templates::build`] needs.
#[derive(Debug)]
pub struct BuildRequest<'a> {
    /// Runtime id (for the metadata and logs).
    pub runtime: String,
    /// The key inputs (must describe `spec`).
    pub inputs: TemplateInputs,
    /// The VM to boot.
    pub spec: VmSpec,
    /// VMM host settings.
    pub host: VmmHost<'a>,
    /// The QEMU backend the template VM runs under.
    pub qemu: Qemu,
    /// Boot timeout.
    pub boot_timeout: Duration,
}

/// QEMU arguments of a VM that can be saved: a QMP monitor on inherited
/// descriptor `qmp_fd` (the VM's device model is unchanged, so its state
/// loads into a VMM started without it). The saved stream carries no run
/// state: the VM is paused for the save, and a restored VM must start
/// running on its own as soon as the state is loaded, without a monitor.
pub fn save_args(qmp_fd: i32) -> Vec<String> {
    let mut a = qmp_args(qmp_fd);
    a.extend(["-global".into(), "migration.store-global-state=off".into()]);
    a
}

/// A QMP monitor on inherited descriptor `qmp_fd`.
fn qmp_args(qmp_fd: i32) -> Vec<String> {
    vec!["-chardev".into(), format!("socket,id=qmp,fd={qmp_fd}"), "-mon".into(), "chardev=qmp,mode=control".into()]
}

/// QEMU arguments of a VM restored from the state on inherited descriptor
/// `state_fd`; QEMU runs the guest as soon as the state is loaded.
pub fn incoming_args(state_fd: i32) -> Vec<String> {
    vec!["-incoming".into(), format!("fd:{state_fd}")]
}

/// A [`StartExtras`] that restores the state on `state`.
pub(crate) fn restore_launch(state: OwnedFd) -> StartExtras {
    let args = incoming_args(state.as_raw_fd());
    StartExtras { fds: vec![state], args, resume: Some(uniqueness()) }
}

/// Boots the template VM, warms it, saves it into `dir/state`.
async fn save_template(dir: &Path, key: &str, req: &BuildRequest<'_>) -> Result<TemplateMeta, TemplateError> {
    let state_path = dir.join("state");
    // 0600: guest memory is nobody else's business (it holds no user data:
    // the template never ran any).
    let state = std::os::unix::fs::OpenOptionsExt::mode(File::options().write(true).create_new(true), 0o600)
        .open(&state_path)
        .map_err(io_err("creating", &state_path))?;
    let (qmp, theirs) = StdUnixStream::pair().map_err(io_err("creating the QMP socketpair for", dir))?;
    let theirs = OwnedFd::from(theirs);
    let launch = StartExtras { args: save_args(theirs.as_raw_fd()), fds: vec![theirs], resume: None };
    let id = format!("tpl{}", &uuid::Uuid::new_v4().simple().to_string()[..9]);
    let mut vm =
        Vm::launch(&id, &req.host, &req.qemu, &req.spec, req.boot_timeout, launch).await.map_err(TemplateError::Vm)?;
    let boot_ms = vm.boot_time().as_millis() as u64;

    let warmup_ms = match &req.inputs.warmup {
        Some(command) => prewarm(&mut vm, command).await?,
        None => 0,
    };

    let started = Instant::now();
    let qmp_result = tokio::task::spawn_blocking(move || {
        let mut qmp = Qmp::connect(qmp)?;
        qmp.save(&state)?;
        Ok::<File, TemplateError>(state)
    })
    .await
    .map_err(|e| TemplateError::Qmp(format!("QMP task: {e}")))?;
    let state = match qmp_result {
        Ok(state) => state,
        Err(e) => {
            debug!(console = %vm.console(), "template VM console");
            return Err(e);
        }
    };
    let save_ms = started.elapsed().as_millis() as u64;
    drop(vm);
    state.sync_all().map_err(io_err("syncing", &state_path))?;
    drop(state);
    let state_bytes = std::fs::metadata(&state_path).map_err(io_err("reading", &state_path))?.len();
    let state_sha256 = sha256_file(&state_path).map_err(io_err("hashing", &state_path))?;
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

/// Sends the warm-up and waits (bounded) for its report.
async fn prewarm(vm: &mut Vm, command: &Command) -> Result<u64, TemplateError> {
    let timeout = Duration::from_millis(command.limits.wall_ms * 2 + 30_000);
    let exchange = async {
        write_frame_async(&mut vm.stream, &HostMessage::Prewarm(command.clone()))
            .await
            .map_err(|e| TemplateError::Warmup(format!("could not be sent: {e}")))?;
        read_frame_async::<GuestMessage, _>(&mut vm.stream, MAX_GUEST_FRAME)
            .await
            .map_err(|e| TemplateError::Warmup(format!("report unreadable: {e}")))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(TemplateError::Warmup(format!("did not finish within {} ms", timeout.as_millis()))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Some(GuestMessage::Warmed { status: StageStatus::Ok, wall_ms, .. }))) => Ok(wall_ms),
        Ok(Ok(Some(GuestMessage::Warmed { status, exit_code, .. }))) => {
            Err(TemplateError::Warmup(format!("ended {status:?} (exit code {exit_code:?})")))
        }
        Ok(Ok(Some(GuestMessage::Failed { message }))) => {
            Err(TemplateError::Warmup(format!("agent failed: {message}")))
        }
        Ok(Ok(Some(other))) => Err(TemplateError::Warmup(format!("unexpected reply {other:?}"))),
        Ok(Ok(None)) => Err(TemplateError::Warmup(format!("VM exited; console: {}", vm.console()))),
    }
}

/// A minimal QMP client on the VMM's monitor socket: line-delimited JSON,
/// one command at a time, every read bounded in size and time.
struct Qmp {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Qmp {
    fn connect(stream: StdUnixStream) -> Result<Self, TemplateError> {
        let err = |e: std::io::Error| TemplateError::Qmp(format!("socket: {e}"));
        stream.set_read_timeout(Some(SAVE_TIMEOUT)).map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(TemplateError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None, None)?;
        Ok(qmp)
    }

    /// Pauses the guest and migrates its state into `state`, waiting until
    /// QEMU reports the migration completed.
    fn save(&mut self, state: &File) -> Result<(), TemplateError> {
        self.execute("stop", None, None)?;
        // QEMU 7.2 takes an outgoing migration fd only by name (`getfd`, the
        // descriptor riding along as SCM_RIGHTS); a `file:` URI needs 8.2.
        self.execute("getfd", Some(serde_json::json!({"fdname": "state"})), Some(state.as_raw_fd()))?;
        self.execute("migrate", Some(serde_json::json!({"uri": "fd:state"})), None)?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let info = self.execute("query-migrate", None, None)?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(TemplateError::Qmp(format!("migration {}", info.get("error-desc").unwrap_or(&info))))
                }
                _ if Instant::now() > deadline => {
                    return Err(TemplateError::Qmp(format!("migration not done within {} s", SAVE_TIMEOUT.as_secs())))
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Runs one command and returns its `return` value; events are skipped.
    fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
        fd: Option<i32>,
    ) -> Result<serde_json::Value, TemplateError> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        let sent = match fd {
            Some(fd) => send_with_fd(&self.writer, &line, fd),
            None => self.writer.write_all(&line),
        };
        sent.map_err(|e| TemplateError::Qmp(format!("sending {command}: {e}")))?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(TemplateError::Qmp(format!("{command}: {e}")));
            }
        }
    }

    fn read_message(&mut self) -> Result<serde_json::Value, TemplateError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_QMP_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| TemplateError::Qmp(format!("reading: {e}")))?;
        if n == 0 {
            return Err(TemplateError::Qmp("the VMM closed its monitor".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(TemplateError::Qmp(format!("reply longer than {MAX_QMP_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| TemplateError::Qmp(format!("unparsable reply: {e}")))
    }
}

/// Writes `data` with `fd` attached as SCM_RIGHTS (QMP `getfd`).
fn send_with_fd(stream: &StdUnixStream, data: &[u8], fd: i32) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    if n != data.len() {
        // The descriptor went with the first part; the rest is plain data.
        (&*stream).write_all(&data[n..])?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{AccelKind, AgentTransport};
    use tvm_protocol::Limits;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k".into(),
            initrd: Some("/cache/initrd/initrd-abc.cpio".into()),
            rootfs: Some("/img".into()),
            memory_mib: 480,
            vcpus: 1,
            accel: AccelKind::Tcg,
            agent: Some(AgentTransport::VirtioSerial),
            debug: false,
            extra_cmdline: None,
        }
    }

    fn warmup() -> Command {
        let limits = Limits {
            wall_ms: 10_000,
            cpu_ms: 10_000,
            memory_bytes: 256 << 20,
            pids: 64,
            output_bytes: 1 << 20,
            file_size_bytes: 1 << 20,
            open_files: 64,
        };
        Command { argv: vec!["python3".into(), "-c".into(), "pass".into()], env: vec![], limits }
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = TemplateInputs::new(&spec(), Path::new("qemu-system-x86_64"), "k1", "i1", Some(warmup()));
        assert_eq!(base.key(), base.clone().key());
        assert_eq!(base.initrd, "initrd-abc.cpio");
        let other_agent = TemplateInputs { initrd: "initrd-def.cpio".into(), ..base.clone() };
        let variants = [
            other_agent,
            TemplateInputs { kernel: "k2".into(), ..base.clone() },
            TemplateInputs { image: "i2".into(), ..base.clone() },
            TemplateInputs { memory_mib: 512, ..base.clone() },
            TemplateInputs { vcpus: 2, ..base.clone() },
            TemplateInputs { accel: "kvm".into(), ..base.clone() },
            TemplateInputs { kernel_args: Some("x".into()), ..base.clone() },
            TemplateInputs { warmup: None, ..base.clone() },
            TemplateInputs { vmm: "other".into(), ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.key(), base.key(), "{v:?}");
        }
    }

    #[test]
    fn uniqueness_is_fresh_each_time() {
        let (a, b) = (uniqueness(), uniqueness());
        assert_eq!(a.entropy.len(), ENTROPY_BYTES);
        assert_ne!(a.entropy, b.entropy);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert!(now.abs_diff(a.unix_time_ns) < 5_000_000_000);
    }

    fn fake_template(store: &Templates, content: &[u8]) -> String {
        let inputs = TemplateInputs::new(&spec(), Path::new("q"), "k", "i", None);
        let key = inputs.key();
        let dir = store.template_dir(&key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), content).unwrap();
        let meta = TemplateMeta {
            key: key.clone(),
            runtime: "r".into(),
            inputs,
            state_sha256: hex::encode(Sha256::digest(content)),
            state_bytes: content.len() as u64,
            created_unix: 1,
            boot_ms: 0,
            warmup_ms: 0,
            save_ms: 0,
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        key
    }

    #[test]
    fn a_changed_state_file_is_corrupt_and_removable() {
        let cache = tempfile::tempdir().unwrap();
        let store = Templates::new(cache.path());
        assert!(matches!(store.find("abc"), Err(TemplateError::Missing(_))));
        let key = fake_template(&store, b"state bytes");
        let t = store.find(&key).unwrap();
        assert!(t.dir.join("verified.json").exists(), "a verified identity is remembered");
        drop(store.open_state(&t).unwrap());
        // Same size, other bytes: caught by the hash because the ctime moved.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(t.state_path(), b"STATE BYTES").unwrap();
        let fresh = Templates::new(cache.path());
        assert!(matches!(fresh.find(&key), Err(TemplateError::Corrupt { .. })));
        assert!(matches!(store.open_state(&t), Err(TemplateError::Corrupt { .. })));
        std::fs::write(t.state_path(), b"short").unwrap();
        assert!(matches!(fresh.find(&key), Err(TemplateError::Corrupt { .. })));
        assert_eq!(fresh.list().len(), 1);
        assert!(fresh.remove(&key).unwrap());
        assert!(!fresh.remove(&key).unwrap());
        assert!(!fresh.remove("../x").unwrap());
        assert!(matches!(fresh.find(&key), Err(TemplateError::Missing(_))));
        assert!(fresh.list().is_empty());
    }

    #[test]
    fn restore_and_save_arguments_name_their_descriptors() {
        assert_eq!(incoming_args(9), ["-incoming", "fd:9"]);
        let save = save_args(5).join(" ");
        assert!(save.starts_with("-chardev socket,id=qmp,fd=5 -mon chardev=qmp,mode=control"), "{save}");
        assert!(save.ends_with("-global migration.store-global-state=off"), "{save}");
    }

    /// The QMP save path against the installed QEMU (a machine without a
    /// guest, so no kernel is needed): capabilities, stop, `getfd` with the
    /// descriptor over SCM_RIGHTS, `migrate fd:`, and a second QEMU that
    /// loads the state with `-incoming fd:N`, both under TVM's `-sandbox`.
    /// A QEMU a failing assertion must not leave running.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn qmp_saves_into_a_passed_descriptor_and_qemu_restores_it() {
        use std::os::unix::process::CommandExt;
        let qemu = "qemu-system-x86_64";
        if std::process::Command::new(qemu).arg("-version").output().is_err() {
            eprintln!("no {qemu} here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let state = File::create(&path).unwrap();
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        let theirs = OwnedFd::from(theirs);
        let fd = theirs.as_raw_fd();
        let base = ["-M", "none", "-nodefaults", "-display", "none", "-sandbox", crate::backend::qemu::SANDBOX];
        let mut cmd = std::process::Command::new(qemu);
        cmd.args(base).args(save_args(fd));
        // SAFETY: fcntl on an fd we own, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = Reaped(cmd.spawn().unwrap());
        drop(theirs);
        let mut qmp = Qmp::connect(ours).unwrap();
        qmp.save(&state).unwrap();
        assert!(qmp.execute("no-such-command", None, None).is_err(), "QMP errors are errors");
        qmp.execute("quit", None, None).unwrap();
        child.0.wait().unwrap();
        drop(state);
        assert!(std::fs::metadata(&path).unwrap().len() > 0, "QEMU wrote its state");

        let input = File::open(&path).unwrap();
        let fd = input.as_raw_fd();
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        let theirs = OwnedFd::from(theirs);
        let qfd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(qemu);
        cmd.args(base).args(qmp_args(qfd)).args(incoming_args(fd));
        // SAFETY: as above.
        unsafe {
            cmd.pre_exec(move || {
                for f in [fd, qfd] {
                    if libc::fcntl(f, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = Reaped(cmd.spawn().unwrap());
        drop(theirs);
        let mut qmp = Qmp::connect(ours).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = qmp.execute("query-migrate", None, None).unwrap();
            if m.get("status").and_then(|s| s.as_str()) == Some("completed") {
                break;
            }
            assert!(Instant::now() < deadline, "incoming migration never completed: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = qmp.execute("query-status", None, None).unwrap();
        assert_eq!(status["status"], "running", "{status}");
        qmp.execute("quit", None, None).unwrap();
        child.0.wait().unwrap();
    }

    #[test]
    fn claims_are_exclusive_until_released() {
        let cache = tempfile::tempdir().unwrap();
        let store = Templates::new(cache.path());
        assert!(store.claim_build("k"));
        assert!(!store.claim_build("k"));
        store.release_build("k");
        assert!(store.claim_build("k"));
    }
}
