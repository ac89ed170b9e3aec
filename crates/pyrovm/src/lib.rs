//! `pyrovm`: the microVM manager of TVM.
//!
//! It owns everything between "run this job" and a result: the guest kernel
//! ([`kernel`]), runtime images ([`image`]), the agent's initramfs
//! ([`initrd`]), choosing KVM or TCG ([`accel`]), starting QEMU `microvm`
//! guests ([`qemu`], [`vm`]) and cleaning up after crashes ([`reaper`]).
//! [`Pyrovm`] is the small facade the CLI and the HTTP gateway use: a fresh
//! VM per execution, destroyed afterwards, never reused.

pub mod accel;
pub mod cache;
pub mod doctor;
pub mod hostcg;
pub mod image;
pub mod initrd;
pub mod jail;
pub mod kernel;
pub mod plan;
pub mod progress;
pub mod qemu;
pub mod reaper;
pub mod vm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, info_span, warn, Instrument};
use tvm_config::{Catalog, Runtime, Settings};
use tvm_protocol::{JobResult, Stage, Stream};

pub use accel::AccelDecision;
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
    let sandbox = qemu::sandbox_supported(qemu);
    let jail = jail::ConfinementReport::detect(vmm_uid_base);
    vec![
        ("vmm confinement".into(), jail.landlock_abi > 0 || jail.own_user, jail.describe()),
        ("host cgroups".into(), true, cgroups),
        (
            "qemu sandbox".into(),
            sandbox,
            if sandbox { format!("-sandbox {}", qemu::SANDBOX) } else { "QEMU rejects -sandbox (no seccomp)".into() },
        ),
    ]
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
    qemu_sandbox: bool,
}

impl Pyrovm {
    /// Reaps leftovers of crashed predecessors, finds (or, if `build`, builds)
    /// the kernel, packs the agent and decides the accelerator.
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
        let qemu_sandbox = qemu::sandbox_supported(&settings.qemu);
        if !qemu_sandbox {
            warn!(qemu = %settings.qemu.display(), "QEMU rejects -sandbox (built without seccomp?): VMMs run without it");
        }
        let jail = jail::ConfinementReport::detect(settings.vmm_uid_base);
        info!(confinement = %jail.describe(), "VMM confinement");
        let kernel = match kernel::find_kernel(&settings)? {
            Some(k) => k,
            None if build => kernel::ensure_kernel(&settings, &Progress::spinner("building guest kernel"))?,
            None => return Err(PrepareError::KernelNotBuilt),
        };
        let initrd = initrd::ensure_initrd(&agent_path(&settings), &settings.cache_dir.join("initrd"))?;
        let accel = accel::resolve(settings.accel, &settings.qemu, &kernel.bzimage, &kernel.key, &settings.cache_dir)?;
        info!(accel = ?accel.kind, reason = %accel.reason, "accelerator chosen");
        Ok(Self { settings, catalog, kernel, initrd, accel, host_cgroups, qemu_sandbox })
    }

    /// The host cgroup parent VMMs run under, if host cgroups are usable.
    pub fn host_cgroups(&self) -> Option<&hostcg::HostCgroups> {
        self.host_cgroups.as_ref()
    }

    /// Whether VMMs run under QEMU's `-sandbox`.
    pub fn qemu_sandbox(&self) -> bool {
        self.qemu_sandbox
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
        let spec = qemu::VmSpec {
            kernel: self.kernel.bzimage.clone(),
            initrd: Some(self.initrd.clone()),
            rootfs: Some(image.path.clone()),
            memory_mib,
            vcpus: self.settings.vcpus,
            accel: self.accel.kind(),
            debug: std::env::var_os("TVM_GUEST_DEBUG").is_some(),
            sandbox: self.qemu_sandbox,
            extra_cmdline: self.settings.kernel_args.clone(),
        };
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let timeout = Duration::from_millis(self.settings.boot_timeout_ms);
        let host = vm::VmmHost {
            vmm: &self.settings.qemu,
            runtime_dir: &self.settings.runtime_dir,
            host_cgroups: self.host_cgroups.as_ref(),
            uid_base: self.settings.vmm_uid_base,
        };
        Ok(Vm::boot(&id, &host, &spec, timeout).await?)
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
        Ok(Execution { vm_id, runtime: plan.runtime.id, accel: self.accel.kind().as_str(), result, boot_ms, total_ms })
    }
}
