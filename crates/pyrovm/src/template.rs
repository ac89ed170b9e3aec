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
//! Layout: `<cache>/templates/<key>/{state,ram,meta.json,verified.json}`
//! (`ram`: QEMU only, the guest's RAM, see [`ram`]; `state` then holds the
//! device state alone). The files' sha256 digests are recorded at build time
//! and checked before first use; `verified.json` remembers the file
//! identities (inode, size, mtime, ctime) that passed, so later processes
//! re-hash only when a file changed (any write moves its ctime, which no
//! caller can set back). Templates are a cache: deleting them loses nothing
//! but time.
//!
//! The QMP channel, the state file and the RAM (a sealed memfd) reach QEMU
//! as inherited descriptors like everything else ([`crate::jail`]): QEMU
//! still opens no TVM path.
//!
//! What differs per VMM is behind one trait, [`TemplateVmm`] (how inputs are
//! named, how a template VM is saved, how a clone is started), with one
//! module per VMM beside the backends: [`qemu`] (the migration stream above)
//! and [`firecracker`] (Firecracker snapshots). The store, the build lock
//! and the policy around them ([`crate::Pyrovm::start_vm`]: find or build,
//! restore, on failure remove, rebuild and cold boot) are written once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, info};
use tvm_protocol::{
    read_frame_async, write_frame_async, Command, GuestMessage, HostMessage, StageStatus, MAX_GUEST_FRAME,
};

pub mod firecracker;
pub mod qemu;
pub mod ram;

use crate::backend::Vmm;
use crate::cache::Cache;
use crate::spec::VmSpec;
use crate::vm::{StartExtras, StartVmError, Vm, VmmHost};

mod lru;

/// Bumped when the layout or the meaning of a template changes.
/// 2: QEMU templates keep the guest's RAM in a file of their own ([`ram`]),
/// `state` holds device state only (`x-ignore-shared`).
/// 3: x86_64 guests under TCG run on [`crate::backend::qemu::TCG_X86_64_CPU`]
/// (a guest booted with ERMS keeps using `rep movsb` after a restore).
pub const FORMAT: u32 = 3;

/// At most this many bytes of template RAM (non-zero pages) are kept in
/// sealed memfds by one process ([`Templates::open_ram`]); past it the least
/// recently restored are dropped (their clones keep their mappings).
pub const RAM_COPIES_MAX_BYTES: u64 = 1 << 30;

/// After a failed build, how long starts cold boot without trying again
/// (a warm-up that fails would otherwise cost every CLI run a futile build).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(600);

/// A VMM backend templates work under: the part of making and using a
/// template that differs per VMM. Implemented once per VMM, in
/// [`qemu`] and [`firecracker`]; everything else about templates (the store,
/// the build lock, the find/build/restore/fall-back policy) is written once
/// against this trait.
pub(crate) trait TemplateVmm: Vmm + Clone + 'static {
    /// The inputs (and so the key) of a template of a VM made from `spec`
    /// under this backend: its name and binary identity among them, so a
    /// template never loads into another VMM.
    fn template_inputs(
        &self,
        spec: &VmSpec,
        kernel_key: &str,
        image_key: &str,
        warmup: Option<Command>,
    ) -> TemplateInputs;

    /// Boots the template VM of `req` (under `req.vmm`), runs its warm-up and
    /// saves it into the staging directory `dir`: the guest's memory/state
    /// as `dir/state` (size- and sha256-checked by [`Templates::find`]) plus
    /// whatever else the VMM's restore needs. The template VM is gone when
    /// this returns.
    ///
    /// # Errors
    /// [`TemplateError::Vm`] (boot), [`TemplateError::Warmup`], the VMM's
    /// save failing ([`TemplateError::Qmp`], [`TemplateError::Snapshot`]) or
    /// [`TemplateError::Io`] writing `dir`.
    fn save(
        dir: &Path,
        key: &str,
        req: &BuildRequest<'_, Self>,
    ) -> impl Future<Output = Result<TemplateMeta, TemplateError>> + Send;

    /// How a clone of `t` starts: the backend to launch it under and what
    /// the launch adds to a cold boot (inherited descriptors, arguments, the
    /// `Resume` handshake). Opens and checks the template's files.
    ///
    /// # Errors
    /// [`TemplateError::Missing`] / [`TemplateError::Corrupt`] when the files
    /// vanished or changed since [`Templates::find`], [`TemplateError::Io`]
    /// when they cannot be read.
    fn restore_launch(&self, templates: &Templates, t: &Template) -> Result<(Self, StartExtras), TemplateError>;
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
    /// The warm-up did not succeed in the template's VM.
    #[error("template warm-up {0}")]
    Warmup(String),
    /// QMP (pause, hand over the state file, migrate) failed.
    #[error("saving the template VM over QMP")]
    Qmp(#[source] crate::backend::qmp::QmpError),
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
    crate::cache::which_path(vmm)
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
    /// The guest's RAM file, when the VMM saves RAM apart from the state
    /// (QEMU, [`ram`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<ram::RamMeta>,
    /// When the build finished (Unix seconds).
    pub created_unix: u64,
    /// Cold boot of the template VM to agent-ready, ms.
    pub boot_ms: u64,
    /// Warm-up wall time in the guest, ms.
    pub warmup_ms: u64,
    /// Pause and save of the state, ms.
    pub save_ms: u64,
}

/// The identities of a template's files that last matched the recorded
/// digests (`verified.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    state: Identity,
    ram: Option<Identity>,
}

/// The identity of one file: any write changes it (the ctime moves).
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

    /// The guest's RAM, when saved apart ([`TemplateMeta::ram`]).
    pub fn ram_path(&self) -> PathBuf {
        self.dir.join(ram::RAM_FILE)
    }
}

/// A sealed copy of one template's RAM held by this process
/// ([`Templates::open_ram`]).
#[derive(Debug)]
struct RamCopy {
    key: String,
    /// The RAM file it was copied from.
    from: Identity,
    fd: OwnedFd,
    data_bytes: u64,
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
    /// Background builds claimed and not yet finished, waiting for their
    /// turn or running (a gauge, not a count: [`Templates::claim_build`]
    /// until its [`BuildClaim`] drops). One runs at a time
    /// ([`Templates::background_slot`]), holding an extra VMM process, run
    /// dir and host cgroup.
    pub running: u64,
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
    verified: Mutex<HashMap<String, Stamp>>,
    /// Sealed RAM copies, least recently restored first.
    rams: Mutex<Vec<RamCopy>>,
    counters: Counters,
    /// Size cap of the store in bytes, 0 for none ([`lru`]).
    max_bytes: AtomicU64,
    /// One background build at a time ([`Templates::background_slot`]).
    background: tokio::sync::Semaphore,
}

impl Templates {
    /// The store under `cache_dir/templates`.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            cache: Cache::new(cache_dir),
            building: Mutex::default(),
            verified: Mutex::default(),
            rams: Mutex::default(),
            counters: Counters::default(),
            max_bytes: AtomicU64::new(0),
            background: tokio::sync::Semaphore::new(1),
        }
    }

    /// Waits until no other background build of this process runs, and
    /// holds that slot until the permit drops. Each background build is a VM
    /// outside a server's admission control (`--max-vms`, memory budget),
    /// so a burst of missing templates (a pool of several runtimes filling
    /// at startup) adds one VM at a time, not one per template. (`None`
    /// only if the semaphore were closed, which nothing does.)
    pub async fn background_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.background.acquire().await.ok()
    }

    /// The counts so far (see [`TemplateCounts`]).
    pub fn counts(&self) -> TemplateCounts {
        let c = &self.counters;
        TemplateCounts {
            built: c.built.load(Ordering::Relaxed),
            build_failures: c.build_failures.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            restore_failures: c.restore_failures.load(Ordering::Relaxed),
            running: self.building.lock().map(|b| b.len() as u64).unwrap_or(0),
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
        let state = identity(key, &template.state_path(), "state")?;
        let stamp = Stamp { state, ram: self.ram_identity(&template)? };
        self.verify(&template, stamp)?;
        Ok(template)
    }

    /// The identity of `t`'s RAM file, if it has one.
    fn ram_identity(&self, t: &Template) -> Result<Option<Identity>, TemplateError> {
        t.meta.ram.as_ref().map(|_| identity(&t.key, &t.ram_path(), "RAM")).transpose()
    }

    /// Checks the files whose identities are `stamp` against the metadata:
    /// sizes always, digests when the identities differ from those last
    /// verified (in this process, or by any process: `verified.json`).
    fn verify(&self, t: &Template, stamp: Stamp) -> Result<(), TemplateError> {
        let corrupt = |reason: String| TemplateError::Corrupt { key: t.key.clone(), reason };
        if stamp.state.size != t.meta.state_bytes {
            return Err(corrupt(format!("state is {} bytes, {} recorded", stamp.state.size, t.meta.state_bytes)));
        }
        match (&t.meta.ram, stamp.ram) {
            (Some(ram), Some(id)) if id.size != ram.bytes => {
                return Err(corrupt(format!("RAM is {} bytes, {} recorded", id.size, ram.bytes)))
            }
            (Some(_), None) => return Err(corrupt("the RAM file is missing".into())),
            _ => {}
        }
        if self.verified.lock().map(|v| v.get(&t.key) == Some(&stamp)).unwrap_or(false) {
            return Ok(());
        }
        let stamp_path = t.dir.join("verified.json");
        let stamped = std::fs::read(&stamp_path).ok().and_then(|b| serde_json::from_slice::<Stamp>(&b).ok());
        if stamped != Some(stamp) {
            let started = Instant::now();
            let state = t.state_path();
            let sha = sha256_file(&state).map_err(io_err("hashing", &state))?;
            if sha != t.meta.state_sha256 {
                return Err(corrupt(format!("state sha256 {sha}, {} recorded", t.meta.state_sha256)));
            }
            if let Some(recorded) = &t.meta.ram {
                let path = t.ram_path();
                let sha = File::open(&path).and_then(|f| ram::digest(&f)).map_err(io_err("hashing", &path))?;
                if sha != recorded.sha256 {
                    return Err(corrupt(format!("RAM sha256 {sha}, {} recorded", recorded.sha256)));
                }
            }
            debug!(key = %t.key, ms = started.elapsed().as_millis() as u64, "template files verified");
            // Best effort: without the stamp the next process hashes again.
            let _ = write_atomic(&stamp_path, &serde_json::to_vec(&stamp).unwrap_or_default());
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert(t.key.clone(), stamp);
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
        let stamp = self.ram_identity(t).map(|ram| Stamp { state: Identity::of(&m), ram });
        if let Err(e) = stamp.and_then(|stamp| self.verify(t, stamp)) {
            self.count_if_corrupt(&e);
            return Err(e);
        }
        self.mark_used(t);
        Ok(file.into())
    }

    fn count_if_corrupt(&self, e: &TemplateError) {
        if matches!(e, TemplateError::Corrupt { .. }) {
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The guest RAM of `t` for one restore: a descriptor of this process's
    /// sealed copy of its RAM file ([`ram::sealed_copy`]), made on the
    /// first restore of `t` (reading its non-zero pages, tens of MiB) and
    /// shared by every later one, so clones share the pages they only read.
    /// The file copied is checked to be the one verified, before and after.
    /// Copies past [`RAM_COPIES_MAX_BYTES`] are dropped least recently used.
    ///
    /// # Errors
    /// [`TemplateError::Missing`] when `t` has no RAM file (or it vanished),
    /// [`TemplateError::Corrupt`] when it changed since verified,
    /// [`TemplateError::Io`] reading it or making the copy.
    pub fn open_ram(&self, t: &Template) -> Result<OwnedFd, TemplateError> {
        let result = self.open_ram_unchecked(t);
        if let Err(e) = &result {
            self.count_if_corrupt(e);
        }
        result
    }

    fn open_ram_unchecked(&self, t: &Template) -> Result<OwnedFd, TemplateError> {
        let Some(recorded) = &t.meta.ram else { return Err(TemplateError::Missing(format!("{} RAM", t.key))) };
        let path = t.ram_path();
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TemplateError::Missing(t.key.clone()),
            _ => io_err("opening", &path)(e),
        })?;
        let of_file = |file: &File| file.metadata().map(|m| Identity::of(&m)).map_err(io_err("reading", &path));
        let from = of_file(&file)?;
        let dup = |c: &RamCopy| c.fd.try_clone().map_err(io_err("duplicating the RAM copy of", &path));
        {
            let mut rams = self.rams.lock().map_err(|_| io_err("locking the RAM copies of", &path)(poisoned()))?;
            if let Some(i) = rams.iter().position(|c| c.key == t.key && c.from == from) {
                let copy = rams.remove(i);
                let fd = dup(&copy);
                rams.push(copy);
                return fd;
            }
        }
        let state = identity(&t.key, &t.state_path(), "state")?;
        self.verify(t, Stamp { state, ram: Some(from) })?;
        let started = Instant::now();
        let fd = ram::sealed_copy(&file, recorded.bytes).map_err(io_err("copying", &path))?;
        if of_file(&file)? != from {
            return Err(TemplateError::Corrupt {
                key: t.key.clone(),
                reason: "the RAM file changed while read".into(),
            });
        }
        debug!(key = %t.key, ms = started.elapsed().as_millis() as u64, data_bytes = recorded.data_bytes,
            "template RAM copied into a sealed memfd");
        let copy = RamCopy { key: t.key.clone(), from, fd, data_bytes: recorded.data_bytes };
        let fd = dup(&copy)?;
        if let Ok(mut rams) = self.rams.lock() {
            rams.retain(|c| c.key != t.key);
            rams.push(copy);
            let mut total: u64 = rams.iter().map(|c| c.data_bytes).sum();
            while total > RAM_COPIES_MAX_BYTES && rams.len() > 1 {
                total -= rams.remove(0).data_bytes;
            }
        }
        Ok(fd)
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
        if let Ok(mut rams) = self.rams.lock() {
            rams.retain(|c| c.key != key);
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

    /// Marks `key` as being built in the background by this process until
    /// the returned claim is dropped; `None` if it already is.
    pub fn claim_build(self: &Arc<Self>, key: &str) -> Option<BuildClaim> {
        let claimed = self.building.lock().map(|mut b| b.insert(key.to_string())).unwrap_or(false);
        claimed.then(|| BuildClaim { templates: self.clone(), key: key.to_string() })
    }

    /// Builds the template for `req.inputs` under `req.vmm` unless another
    /// process built it meanwhile (the cache lock `template-<key>`
    /// serializes builders); a failure is noted ([`Templates::recent_failure`]).
    ///
    /// # Errors
    /// Any [`TemplateError`]; nothing is published then.
    pub(crate) async fn build<B: TemplateVmm>(&self, req: BuildRequest<'_, B>) -> Result<Template, TemplateError> {
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

    async fn build_locked<B: TemplateVmm>(
        &self,
        key: &str,
        req: &BuildRequest<'_, B>,
    ) -> Result<Template, TemplateError> {
        let scratch = self.cache.scratch("template").map_err(io_err("creating a scratch dir in", &self.dir()))?;
        let staged = scratch.join(key);
        std::fs::create_dir(&staged).map_err(io_err("creating", &staged))?;
        let meta = B::save(&staged, key, req).await?;
        std::fs::write(staged.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap_or_default())
            .map_err(io_err("writing", &staged.join("meta.json")))?;
        let dir = self.template_dir(key);
        scratch.publish(&staged, &dir).map_err(io_err("publishing", &dir))?;
        info!(key, runtime = %meta.runtime, vmm = req.vmm.kind().as_str(), state_bytes = meta.state_bytes,
            boot_ms = meta.boot_ms, warmup_ms = meta.warmup_ms, save_ms = meta.save_ms, "template built");
        self.find(key)
    }
}

/// A background build of one template, claimed in this process
/// ([`Templates::claim_build`]): while it lives no second background build
/// of the key starts and [`TemplateCounts::running`] counts it. Dropping it
/// (the build ended, or its task was dropped at shutdown) ends the claim.
#[derive(Debug)]
pub struct BuildClaim {
    templates: Arc<Templates>,
    key: String,
}

impl Drop for BuildClaim {
    fn drop(&mut self) {
        if let Ok(mut b) = self.templates.building.lock() {
            b.remove(&self.key);
        }
    }
}

/// What [`Templates::build`] needs.
#[derive(Debug)]
pub struct BuildRequest<'a, B> {
    /// Runtime id (for the metadata and logs).
    pub runtime: String,
    /// The key inputs (must describe `spec` under `vmm`:
    /// [`TemplateVmm::template_inputs`]).
    pub inputs: TemplateInputs,
    /// The VM to boot.
    pub spec: VmSpec,
    /// VMM host settings.
    pub host: VmmHost<'a>,
    /// The backend the template VM runs under.
    pub vmm: B,
    /// How long the template VM may take to boot to agent-ready.
    pub boot_timeout: Duration,
}

/// A template VM at agent-ready with its warm-up done, and what that took.
struct WarmVm {
    vm: Vm,
    /// Cold boot to agent-ready, ms.
    boot_ms: u64,
    /// The warm-up's wall time in the guest, ms (0 without a warm-up).
    warmup_ms: u64,
}

/// Boots the template VM of `req` under `vmm` (`req.vmm`, or the variant of
/// it a VMM saves from) with `extras`, and runs the warm-up.
///
/// # Errors
/// [`TemplateError::Vm`] when it does not reach agent-ready,
/// [`TemplateError::Warmup`] when the warm-up fails.
async fn boot_and_warm<B, V: Vmm>(
    req: &BuildRequest<'_, B>,
    vmm: &V,
    extras: StartExtras,
) -> Result<WarmVm, TemplateError> {
    let id = format!("tpl{}", &uuid::Uuid::new_v4().simple().to_string()[..9]);
    let mut vm =
        Vm::launch(&id, &req.host, vmm, &req.spec, req.boot_timeout, extras).await.map_err(TemplateError::Vm)?;
    let boot_ms = vm.boot_time().as_millis() as u64;
    let warmup_ms = match &req.inputs.warmup {
        Some(command) => prewarm(&mut vm, command).await?,
        None => 0,
    };
    Ok(WarmVm { vm, boot_ms, warmup_ms })
}

impl TemplateMeta {
    /// The metadata of template `key` built for `req` by a VM that took
    /// `boot_ms` and `warmup_ms`, whose complete state file `state` (its
    /// size and sha256 are read now) and RAM file `ram` (if saved apart)
    /// were saved in `save_ms`.
    ///
    /// # Errors
    /// [`TemplateError::Io`] when the state file cannot be read.
    fn saved<B>(
        key: &str,
        req: &BuildRequest<'_, B>,
        (state, ram): (&Path, Option<ram::RamMeta>),
        (boot_ms, warmup_ms): (u64, u64),
        save_ms: u64,
    ) -> Result<Self, TemplateError> {
        let state_bytes = std::fs::metadata(state).map_err(io_err("reading", state))?.len();
        let state_sha256 = sha256_file(state).map_err(io_err("hashing", state))?;
        Ok(TemplateMeta {
            key: key.into(),
            runtime: req.runtime.clone(),
            inputs: req.inputs.clone(),
            state_sha256,
            state_bytes,
            ram,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            boot_ms,
            warmup_ms,
            save_ms,
        })
    }
}

/// Sends the warm-up and waits (bounded) for its report: the guest wall of
/// the warm-up, ms.
pub(crate) async fn prewarm(vm: &mut Vm, command: &Command) -> Result<u64, TemplateError> {
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

/// The identity of template `key`'s file `path` (its `what`, for the error).
fn identity(key: &str, path: &Path, what: &str) -> Result<Identity, TemplateError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Identity::of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(TemplateError::Corrupt { key: key.into(), reason: format!("the {what} file is missing") })
        }
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("a thread panicked holding the lock")
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
            ram: None,
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
    fn claims_are_exclusive_until_released() {
        let cache = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Templates::new(cache.path()));
        let claim = store.claim_build("k").expect("the first claim");
        assert!(store.claim_build("k").is_none(), "one build per key");
        assert_eq!(store.counts().running, 1);
        drop(claim);
        assert_eq!(store.counts().running, 0);
        assert!(store.claim_build("k").is_some(), "claimable again once dropped");
    }
}
