//! `pyrovm`: the microVM manager of TVM.
//!
//! It owns everything between "run this job" and a result: the guest kernel
//! ([`kernel`]), runtime images ([`image`]), the agent's initramfs
//! ([`initrd`]), choosing the VMM ([`backend`]: QEMU `microvm` or
//! Firecracker) and KVM or TCG ([`accel`]), starting guests ([`vm`]) and
//! cleaning up after crashes ([`reaper`]).
//! [`Pyrovm`] is the small facade the CLI and the HTTP gateway use: a fresh
//! VM per execution, destroyed afterwards, never reused.

pub mod accel;
pub mod backend;
pub mod cache;
pub mod doctor;
pub mod hostcg;
pub mod image;
pub mod initrd;
pub mod jail;
pub mod kernel;
pub mod plan;
pub mod progress;
pub mod reaper;
pub mod spec;
pub mod vm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, info_span, warn, Instrument};
use tvm_config::{Catalog, Runtime, Settings};
use tvm_protocol::{JobResult, Stage, Stream};

pub use accel::AccelDecision;
pub use backend::{Backend, Selection, VmmKind};
pub use cache::{BuildCancel, CancelOnDrop};
pub use plan::{plan, ExecutionRequest, LimitRequest, Plan, PlanError, SourceFile};
pub use plan::{
    MAX_ARGS, MAX_ARG_BYTES, MAX_FILES, MAX_FILES_BYTES, MAX_FILE_NAME_BYTES, MAX_FILE_NAME_PARTS, MAX_STDIN_BYTES,
};
pub use progress::Progress;
pub use vm::{RunJobError, StartVmError, Vm, VmmHost};

/// Why the VM manager could not get ready.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The guest kernel is missing or failed to build.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelBuildError),
    /// The agent initramfs could not be made.
    #[error(transparent)]
    Initrd(#[from] initrd::InitrdError),
    /// KVM was demanded and does not work.
    #[error(transparent)]
    Accel(#[from] accel::KvmUnusable),
    /// The configured VMM cannot run here.
    #[error(transparent)]
    Vmm(#[from] backend::SelectVmmError),
    /// The guest kernel is not built and building was not allowed.
    #[error("guest kernel not built; run `tvm kernel build`")]
    KernelNotBuilt,
    /// A blocking task panicked.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Why an execution produced no result.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The request is invalid (the caller's fault).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The runtime's image is missing and could not be built.
    #[error("image for {runtime}: {source}")]
    Image {
        /// Runtime id.
        runtime: String,
        /// Why.
        #[source]
        source: image::ImageBuildError,
    },
    /// The VM did not reach agent-ready.
    #[error(transparent)]
    Start(#[from] StartVmError),
    /// The VM failed while running the job.
    #[error(transparent)]
    Run(#[from] RunJobError),
    /// A blocking task panicked.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// A finished execution with host-side measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    /// VM id (log correlation).
    pub vm_id: String,
    /// Runtime id.
    pub runtime: String,
    /// VMM used (`qemu` or `firecracker`).
    pub vmm: &'static str,
    /// Accelerator used.
    pub accel: &'static str,
    /// Agent's result.
    #[serde(flatten)]
    pub result: JobResult,
    /// VMM start to agent-ready.
    pub boot_ms: u64,
    /// Whole execution as seen by the host, boot included.
    pub total_ms: u64,
}

/// `tvm doctor` lines on host-side isolation: `(name, ok, detail)`. Host
/// cgroups are optional (VMs run without them), QEMU's sandbox is expected.
pub fn isolation_checks(qemu: &std::path::Path, vmm_uid_base: u32) -> Vec<(String, bool, String)> {
    let cgroups = match hostcg::HostCgroups::detect() {
        Ok(cgs) => format!("used: {}", cgs.describe()),
        Err(e) => format!("not used: {}", error_chain(&e)),
    };
    let sandbox = backend::qemu::sandbox_supported(qemu);
    let jail = jail::ConfinementReport::detect(vmm_uid_base);
    vec![
        ("vmm confinement".into(), jail.landlock_abi > 0 || jail.own_user, jail.describe()),
        ("host cgroups".into(), true, cgroups),
        (
            "qemu sandbox".into(),
            sandbox,
            if sandbox {
                format!("-sandbox {}", backend::qemu::SANDBOX)
            } else {
                "QEMU rejects -sandbox (no seccomp)".into()
            },
        ),
    ]
}

/// `tvm doctor` lines on the VMM backend: `(name, ok, detail)`: which
/// backend and why, binary versions, KVM state and the jailer.
pub fn vmm_checks(settings: &Settings) -> Vec<(String, bool, String)> {
    let sandbox = backend::qemu::sandbox_supported(&settings.qemu);
    let fc = backend::probe_firecracker(settings);
    let mut checks = Vec::new();
    match backend::select(settings, sandbox) {
        Ok(sel) => checks.push(("vmm".into(), true, format!("{}: {}", sel.backend.kind().as_str(), sel.reason))),
        Err(e) => checks.push(("vmm".into(), false, e.to_string())),
    }
    let qemu_version = cache::which_path(&settings.qemu)
        .and_then(|q| std::process::Command::new(q).arg("--version").output().ok())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string));
    checks.push((
        "qemu version".into(),
        true,
        qemu_version.unwrap_or_else(|| format!("{}: not found", settings.qemu.display())),
    ));
    let fc_detail = match (&fc.binary, &fc.version) {
        (Some(b), Some(v)) => format!("{v} ({})", b.display()),
        (Some(b), None) => format!("{}: does not answer --version", b.display()),
        (None, _) => format!("{}: not found", settings.firecracker.display()),
    };
    checks.push(("firecracker version".into(), true, fc_detail));
    checks.push((
        "kvm".into(),
        true,
        match &fc.kvm {
            Ok(()) => "usable: /dev/kvm opens, API 12, KVM_CREATE_VM works".into(),
            Err(why) => format!("not usable: {why}"),
        },
    ));
    if fc.binary.is_some() {
        let f = backend::firecracker::Firecracker::new(settings, fc.standin);
        let detail = match f.jailer() {
            backend::firecracker::JailerUse::Jailer(j) => format!("used: {}", j.display()),
            backend::firecracker::JailerUse::Skipped(why) => format!("skipped: {why}"),
        };
        checks.push(("firecracker jailer".into(), true, detail));
    }
    checks
}

/// The accelerator decision for the VMM `settings` select (QEMU when the
/// configured VMM cannot run here, so `tvm doctor` still reports one).
///
/// # Errors
/// [`accel::KvmUnusable`] when `accel = "kvm"` and the probe fails.
pub fn accel_for(settings: &Settings, kernel: &kernel::Kernel) -> Result<AccelDecision, accel::KvmUnusable> {
    let sandbox = backend::qemu::sandbox_supported(&settings.qemu);
    let backend = backend::select(settings, sandbox)
        .map(|s| s.backend)
        .unwrap_or_else(|_| Backend::Qemu(backend::qemu::Qemu::new(&settings.qemu, sandbox)));
    match &backend {
        Backend::Qemu(q) => accel::resolve(settings.accel, q, kernel, &settings.cache_dir),
        Backend::Firecracker(f) => accel::resolve(settings.accel, f, kernel, &settings.cache_dir),
    }
}

/// An error and its causes on one line, for logs.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Finds the guest agent binary: configured path, next to the running
/// executable, or the workspace's static build output.
pub fn agent_path(settings: &Settings) -> PathBuf {
    if let Some(p) = &settings.agent_bin {
        return p.clone();
    }
    if let Some(sibling) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("tvm-agent"))) {
        if sibling.exists() && initrd::is_static_elf(&std::fs::read(&sibling).unwrap_or_default()) {
            return sibling;
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/agent/x86_64-unknown-linux-gnu/release/tvm-agent"))
}

/// The VM manager: kernel, agent and accelerator resolved once, then any
/// number of executions, each in its own fresh VM.
#[derive(Debug, Clone)]
pub struct Pyrovm {
    settings: Settings,
    catalog: Catalog,
    kernel: kernel::Kernel,
    initrd: PathBuf,
    accel: AccelDecision,
    host_cgroups: Option<hostcg::HostCgroups>,
    vmm: Selection,
}

impl Pyrovm {
    /// Reaps leftovers of crashed predecessors, picks the VMM, finds (or, if
    /// `build`, builds) the kernel, packs the agent and decides the accelerator.
    ///
    /// # Errors
    /// [`PrepareError`]: kernel, initramfs, VMM selection or demanded KVM.
    pub async fn prepare(settings: Settings, catalog: Catalog, build: bool) -> Result<Self, PrepareError> {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || Self::prepare_blocking(s, catalog, build))
            .await
            .map_err(|e| PrepareError::Task(e.to_string()))?
    }

    fn prepare_blocking(settings: Settings, catalog: Catalog, build: bool) -> Result<Self, PrepareError> {
        reaper::reap(&settings.runtime_dir);
        let host_cgroups = match hostcg::HostCgroups::detect() {
            Ok(cgs) => {
                cgs.reap();
                let missing = cgs.missing_controllers();
                if missing.is_empty() {
                    info!(cgroups = %cgs.describe(), "VMMs run in host cgroups");
                } else {
                    warn!(cgroups = %cgs.describe(), ?missing,
                        "host cgroup controllers unavailable: VMMs are grouped and killed as a whole, but these limits are not enforced");
                }
                Some(cgs)
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "host cgroups unusable: VMM processes run without host memory/pids/CPU caps");
                None
            }
        };
        let qemu_sandbox = backend::qemu::sandbox_supported(&settings.qemu);
        let vmm = backend::select(&settings, qemu_sandbox)?;
        info!(vmm = vmm.backend.kind().as_str(), reason = %vmm.reason, "VMM chosen");
        if !qemu_sandbox && vmm.backend.kind() == VmmKind::Qemu {
            warn!(qemu = %settings.qemu.display(), "QEMU rejects -sandbox (built without seccomp?): VMMs run without it");
        }
        if let Backend::Firecracker(fc) = &vmm.backend {
            match fc.jailer() {
                backend::firecracker::JailerUse::Jailer(j) => {
                    info!(jailer = %j.display(), "firecracker runs through the jailer")
                }
                backend::firecracker::JailerUse::Skipped(why) => info!(reason = %why, "firecracker jailer skipped"),
            }
        }
        let jail = jail::ConfinementReport::detect(settings.vmm_uid_base);
        info!(confinement = %jail.describe(), "VMM confinement");
        let kernel = match kernel::find_kernel(&settings)? {
            Some(k) => k,
            None if build => kernel::ensure_kernel(&settings, &Progress::spinner("building guest kernel"))?,
            None => return Err(PrepareError::KernelNotBuilt),
        };
        let initrd = initrd::ensure_initrd(&agent_path(&settings), &settings.cache_dir.join("initrd"))?;
        let accel = match &vmm.backend {
            Backend::Qemu(q) => accel::resolve(settings.accel, q, &kernel, &settings.cache_dir)?,
            Backend::Firecracker(f) => accel::resolve(settings.accel, f, &kernel, &settings.cache_dir)?,
        };
        info!(accel = ?accel.kind, reason = %accel.reason, "accelerator chosen");
        Ok(Self { settings, catalog, kernel, initrd, accel, host_cgroups, vmm })
    }

    /// The host cgroup parent VMMs run under, if host cgroups are usable.
    pub fn host_cgroups(&self) -> Option<&hostcg::HostCgroups> {
        self.host_cgroups.as_ref()
    }

    /// Whether VMMs run under QEMU's `-sandbox` (false under Firecracker,
    /// which applies its own seccomp filters).
    pub fn qemu_sandbox(&self) -> bool {
        matches!(&self.vmm.backend, Backend::Qemu(q) if q.sandbox())
    }

    /// The VMM backend and why it was chosen.
    pub fn vmm(&self) -> &Selection {
        &self.vmm
    }

    /// The accelerator decision.
    pub fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    /// The runtime catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The guest kernel.
    pub fn kernel(&self) -> &kernel::Kernel {
        &self.kernel
    }

    /// Finds or builds the image of `runtime`. Dropping the future mid-build
    /// (Ctrl-C) cancels the build, which then removes its scratch directory on
    /// its blocking thread.
    pub async fn ensure_image(&self, runtime: &Runtime, progress: Progress) -> Result<image::Image, ExecuteError> {
        self.ensure_image_cancellable(runtime, progress, BuildCancel::new()).await
    }

    /// [`ensure_image`](Self::ensure_image) that `cancel` stops: the build's
    /// tools are killed and its scratch directory and mounts removed before
    /// the future resolves (to [`image::ImageBuildError::Cancelled`]), so a
    /// caller that awaits it after cancelling knows the cleanup is done.
    ///
    /// # Errors
    /// [`ExecuteError::Plan`] for a runtime without an image recipe,
    /// [`ExecuteError::Image`] when the build fails or is cancelled.
    pub async fn ensure_image_cancellable(
        &self,
        runtime: &Runtime,
        progress: Progress,
        cancel: BuildCancel,
    ) -> Result<image::Image, ExecuteError> {
        let recipe = runtime.image.clone().ok_or_else(|| {
            ExecuteError::Plan(PlanError::RuntimeUnavailable {
                id: runtime.id.clone(),
                reason: runtime.unavailable.clone().unwrap_or_default(),
            })
        })?;
        let settings = self.settings.clone();
        let id = runtime.id.clone();
        let on_drop = CancelOnDrop::new(cancel.clone());
        let built = tokio::task::spawn_blocking(move || {
            image::ensure_image_cancellable(&settings, &recipe, &progress, &cancel)
        })
        .await
        .map_err(|e| ExecuteError::Task(e.to_string()))?
        .map_err(|source| ExecuteError::Image { runtime: id, source });
        on_drop.disarm();
        built
    }

    /// Boots a fresh VM for `runtime` with `memory_mib` of RAM, up to agent-ready.
    pub async fn boot(&self, runtime: &Runtime, memory_mib: u64) -> Result<Vm, ExecuteError> {
        // A spinner only when there is something to build: a cache hit prints nothing.
        let progress = match &runtime.image {
            Some(recipe) if image::find_image(&self.settings, recipe).is_none() => {
                Progress::spinner(&format!("building image for {}", runtime.id))
            }
            _ => Progress::hidden(),
        };
        let image = self.ensure_image(runtime, progress).await?;
        let spec = |b: &dyn Fn(&kernel::Kernel) -> PathBuf, agent| spec::VmSpec {
            kernel: b(&self.kernel),
            initrd: Some(self.initrd.clone()),
            rootfs: Some(image.path.clone()),
            memory_mib,
            vcpus: self.settings.vcpus,
            accel: self.accel.kind(),
            agent: Some(agent),
            debug: std::env::var_os("TVM_GUEST_DEBUG").is_some(),
            extra_cmdline: self.settings.kernel_args.clone(),
        };
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let timeout = Duration::from_millis(self.settings.boot_timeout_ms);
        let host = vm::VmmHost {
            runtime_dir: &self.settings.runtime_dir,
            host_cgroups: self.host_cgroups.as_ref(),
            uid_base: self.settings.vmm_uid_base,
        };
        use backend::Vmm as _;
        let vm = match &self.vmm.backend {
            Backend::Qemu(q) => {
                let spec = spec(&|k| q.boot_image(k).to_path_buf(), q.transport());
                Vm::boot(&id, &host, q, &spec, timeout).await?
            }
            Backend::Firecracker(f) => {
                let spec = spec(&|k| f.boot_image(k).to_path_buf(), f.transport());
                Vm::boot(&id, &host, f, &spec, timeout).await?
            }
        };
        Ok(vm)
    }

    /// Runs one request in a fresh VM; `on_output` sees output as it streams.
    pub async fn execute(
        &self,
        req: &ExecutionRequest,
        on_output: impl FnMut(Stage, Stream, &[u8]),
    ) -> Result<Execution, ExecuteError> {
        let plan = plan::plan(&self.catalog, req, self.settings.vm_overhead_mib)?;
        let started = Instant::now();
        let vm = self.boot(&plan.runtime, plan.vm_memory_mib).await?;
        let vm_id = vm.id().to_string();
        let boot_ms = vm.boot_time().as_millis() as u64;
        let span = info_span!("execute", vm = %vm_id, runtime = %plan.runtime.id);
        let result = vm.execute(&plan.job, on_output).instrument(span).await?;
        let total_ms = started.elapsed().as_millis() as u64;
        info!(vm = %vm_id, verdict = %result.verdict, boot_ms, total_ms, "execution finished");
        Ok(Execution {
            vm_id,
            runtime: plan.runtime.id,
            vmm: self.vmm.backend.kind().as_str(),
            accel: self.accel.kind().as_str(),
            result,
            boot_ms,
            total_ms,
        })
    }
}
