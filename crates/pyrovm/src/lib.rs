//! `pyrovm`: the microVM manager of TVM.
//!
//! It owns everything between "run this job" and a result: the guest kernel
//! ([`kernel`]), runtime images ([`image`]), the agent's initramfs
//! ([`initrd`]), choosing the VMM ([`backend`]: QEMU `microvm` or
//! Firecracker) and KVM or TCG ([`accel`]), starting guests ([`vm`]) and
//! cleaning up after crashes ([`reaper`]).
//! [`Pyrovm`] is the small facade the CLI and the HTTP gateway use: a fresh
//! VM per execution, destroyed afterwards, never reused.
//!
//! Only [`plan`] (requests, their validation and limits) and [`java`] build on
//! every OS: the client side of `tvm` (`tvm run --server`, `tvm lima`) on
//! macOS and Windows uses them. Everything that starts or manages VMs uses
//! Linux-only interfaces (KVM, cgroups, namespaces, Landlock, vsock) and is
//! compiled for `target_os = "linux"` only.

#[cfg(target_os = "linux")]
pub mod accel;
#[cfg(target_os = "linux")]
pub mod backend;
#[cfg(target_os = "linux")]
pub mod cache;
#[cfg(target_os = "linux")]
pub mod doctor;
#[cfg(target_os = "linux")]
pub mod hostcg;
#[cfg(target_os = "linux")]
pub mod image;
#[cfg(target_os = "linux")]
pub mod initrd;
#[cfg(target_os = "linux")]
pub mod jail;
pub mod java;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod plan;
#[cfg(target_os = "linux")]
pub mod progress;
#[cfg(target_os = "linux")]
pub mod reaper;
/// OCI registry reachability, part of [`image`] (its OCI sources); here too
/// for the callers that probe before asking for runtime states.
#[cfg(target_os = "linux")]
pub use image::registry;
#[cfg(target_os = "linux")]
pub mod spec;
#[cfg(target_os = "linux")]
pub mod template;
#[cfg(target_os = "linux")]
pub mod vm;

#[cfg(target_os = "linux")]
use std::path::PathBuf;
#[cfg(target_os = "linux")]
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use serde::Serialize;
#[cfg(target_os = "linux")]
use tracing::{info, info_span, warn, Instrument};
#[cfg(target_os = "linux")]
use tvm_config::{Catalog, Runtime, Settings};
#[cfg(target_os = "linux")]
use tvm_protocol::{JobResult, Stage, Stream};

#[cfg(target_os = "linux")]
pub use accel::AccelDecision;
#[cfg(target_os = "linux")]
pub use backend::{Backend, Selection, VmmKind};
#[cfg(target_os = "linux")]
pub use cache::{BuildCancel, CancelOnDrop};
pub use plan::{
    add_tests, default_vm_memory_mib, limit_minimum, plan, ExecutionRequest, LimitRequest, Plan, PlanError, SourceFile,
    TestRequest,
};
pub use plan::{
    MAX_ARGS, MAX_ARG_BYTES, MAX_FILES, MAX_FILES_BYTES, MAX_FILE_NAME_BYTES, MAX_FILE_NAME_PARTS, MAX_STDIN_BYTES,
    MIN_MEMORY_BYTES,
};
#[cfg(target_os = "linux")]
pub use progress::{MultiProgress, Progress};
#[cfg(target_os = "linux")]
pub use template::{TemplateCounts, TemplateError, Templates};
#[cfg(target_os = "linux")]
pub use vm::{RunJobError, SessionEvent, SessionInput, StartKind, StartVmError, Vm, VmmHost};

#[cfg(target_os = "linux")]
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

#[cfg(target_os = "linux")]
/// Why an execution produced no result.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The request is invalid (the caller's fault).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The runtime's catalog entry does not list the guests' architecture,
    /// so no image of it can be built or booted here: the answer before
    /// any kernel, image or template work ([`check_guest_arch`]).
    #[error(
        "runtime {runtime} is unavailable: not supported on {arch} guests (architectures: {architectures}); \
         `tvm runtimes` shows what runs on {arch} guests"
    )]
    UnsupportedArch {
        /// Runtime id.
        runtime: String,
        /// The guests' architecture (`guest_arch`, `TVM_GUEST_ARCH`).
        arch: tvm_config::GuestArch,
        /// The architectures the entry lists, comma-separated.
        architectures: String,
    },
    /// The runtime's image is missing and could not be built.
    #[error("image for {runtime}")]
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
    /// A template could not be built (only where one is asked for
    /// explicitly: executions fall back to a cold boot instead).
    #[error("template for {runtime}")]
    Template {
        /// Runtime id.
        runtime: String,
        /// Why.
        #[source]
        source: TemplateError,
    },
    /// A blocking task panicked.
    #[error("internal task failed: {0}")]
    Task(String),
}

#[cfg(target_os = "linux")]
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
    /// How the VM started: `cold`, `template` or `pool`.
    pub start: StartKind,
    /// Why a template was not used, when templates are on and it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_note: Option<String>,
    /// VMM start to agent-ready (for a restore: restore-to-ready).
    pub boot_ms: u64,
    /// Whole execution as seen by the host, boot included.
    pub total_ms: u64,
}

#[cfg(target_os = "linux")]
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

#[cfg(target_os = "linux")]
/// `tvm doctor` lines on the VMM backend: `(name, ok, detail)`: which
/// backend and why (after the probe boot when the guest `kernel` is built,
/// as [`choose_vmm`] decides), binary versions, KVM state and the jailer.
pub fn vmm_checks(settings: &Settings, kernel: Option<&kernel::Kernel>) -> Vec<(String, bool, String)> {
    let sandbox = backend::qemu::sandbox_supported(&settings.qemu);
    let fc = backend::probe_firecracker(settings);
    let mut checks = Vec::new();
    let chosen = match kernel {
        Some(k) => choose_vmm(settings, sandbox, k).map(|(sel, _)| sel).map_err(|e| error_chain(&e)),
        None => backend::select(settings, sandbox).map_err(|e| error_chain(&e)),
    };
    match chosen {
        Ok(sel) => checks.push(("vmm".into(), true, format!("{}: {}", sel.backend.kind().as_str(), sel.reason))),
        Err(e) => checks.push(("vmm".into(), false, e)),
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

#[cfg(target_os = "linux")]
/// The accelerator decision for the VMM `settings` choose (QEMU when the
/// configured VMM cannot run here, so `tvm doctor` still reports one).
///
/// # Errors
/// [`accel::KvmUnusable`] when `accel = "kvm"` and the probe fails.
pub fn accel_for(settings: &Settings, kernel: &kernel::Kernel) -> Result<AccelDecision, accel::KvmUnusable> {
    let sandbox = backend::qemu::sandbox_supported(&settings.qemu);
    match choose_vmm(settings, sandbox, kernel) {
        Ok((_, accel)) => Ok(accel),
        Err(ChooseVmmError::Accel(e)) => Err(e),
        Err(ChooseVmmError::Select(_)) => {
            let q = backend::qemu::Qemu::new(&settings.qemu, sandbox).with_arch(settings.guest_arch);
            accel::resolve(settings.accel, &q, kernel, &settings.cache_dir)
        }
    }
}

/// Why no VMM and accelerator could be chosen ([`choose_vmm`]).
#[derive(Debug, thiserror::Error)]
pub enum ChooseVmmError {
    /// The configured VMM cannot run here.
    #[error(transparent)]
    Select(#[from] backend::SelectVmmError),
    /// `accel = "kvm"` and the chosen VMM's probe boot failed.
    #[error(transparent)]
    Accel(#[from] accel::KvmUnusable),
}

impl From<ChooseVmmError> for PrepareError {
    fn from(e: ChooseVmmError) -> Self {
        match e {
            ChooseVmmError::Select(e) => PrepareError::Vmm(e),
            ChooseVmmError::Accel(e) => PrepareError::Accel(e),
        }
    }
}

#[cfg(target_os = "linux")]
/// The backend and accelerator for `settings` on this host:
/// [`backend::select`], then [`accel::resolve`] by the backend's probe boot
/// (cached per kernel, VMM binary and host boot). With `vmm = "auto"`,
/// Firecracker is kept only when its probe boot proves that KVM runs a guest
/// (a nested, paravirtualised KVM may create VMs and still not run one);
/// otherwise QEMU is chosen and the selection's reason says why. With
/// `vmm = "firecracker"` a failed probe boot is an error.
///
/// # Errors
/// [`ChooseVmmError::Select`] when the configured VMM cannot run here (for
/// Firecracker: also when its probe boot fails),
/// [`ChooseVmmError::Accel`] when `accel = "kvm"` and the probe boot fails.
pub fn choose_vmm(
    settings: &Settings,
    qemu_sandbox: bool,
    kernel: &kernel::Kernel,
) -> Result<(backend::Selection, AccelDecision), ChooseVmmError> {
    let sel = backend::select(settings, qemu_sandbox)?;
    let accel = match &sel.backend {
        Backend::Qemu(q) => accel::resolve(settings.accel, q, kernel, &settings.cache_dir)?,
        // The stand-in boots QEMU under TCG by design; its accelerator is TCG.
        Backend::Firecracker(f) if f.standin() => accel::resolve(settings.accel, f, kernel, &settings.cache_dir)?,
        Backend::Firecracker(f) => match accel::probe(f, kernel, &settings.cache_dir) {
            Ok(_) => accel::resolve(settings.accel, f, kernel, &settings.cache_dir)?,
            Err(why) if settings.vmm == tvm_config::VmmChoice::Auto => {
                let q = backend::qemu::Qemu::new(&settings.qemu, qemu_sandbox).with_arch(settings.guest_arch);
                let accel = accel::resolve(settings.accel, &q, kernel, &settings.cache_dir)?;
                let reason = format!("auto: QEMU, because Firecracker's KVM probe boot failed ({why})");
                return Ok((backend::Selection { backend: Backend::Qemu(q), reason }, accel));
            }
            Err(why) => return Err(backend::SelectVmmError::FirecrackerNeedsKvm(why).into()),
        },
    };
    Ok((sel, accel))
}

/// An error and its causes on one line (`what failed: why: deeper why`), for
/// logs, API messages and CLI output. Error messages never repeat their
/// `#[source]`, so wherever an error is shown as text it goes through here
/// (or anyhow's `{:#}` at the binary's edge), or its cause is lost.
/// A cause whose text already ends the line is skipped: some libraries
/// (oci-client, reqwest) repeat their source's text in their own message.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(target_os = "linux")]
/// Refuses `runtime` when its catalog entry does not list the guests'
/// architecture ([`image::runtime_state`] calls it unavailable for the same
/// reason). Reads nothing but the catalog entry and settings, so callers run
/// it before [`Pyrovm::prepare`]: an aarch64 guest kernel built for a
/// runtime that cannot run on it is minutes wasted.
///
/// # Errors
/// [`ExecuteError::UnsupportedArch`].
pub fn check_guest_arch(settings: &Settings, runtime: &Runtime) -> Result<(), ExecuteError> {
    if runtime.architectures.contains(&settings.guest_arch) {
        return Ok(());
    }
    Err(ExecuteError::UnsupportedArch {
        runtime: runtime.id.clone(),
        arch: settings.guest_arch,
        architectures: tvm_config::matrix::architectures_of(runtime),
    })
}

#[cfg(target_os = "linux")]
/// A new VM id (run dir name, QEMU `-name`, log field).
fn new_vm_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

#[cfg(target_os = "linux")]
/// The warm-up of `runtime` as a job-user command: its `warmup` argv with the
/// runtime's environment, under the compile limits if it compiles (warm-ups
/// of compiled languages run the compiler) and the run limits otherwise, so
/// it fits the VM sized for the runtime's jobs.
pub fn warmup_command(runtime: &Runtime) -> Option<tvm_protocol::Command> {
    let argv = runtime.warmup.clone()?;
    let limits = if runtime.compile.is_some() { runtime.compile_limits } else { runtime.run_limits };
    Some(tvm_protocol::Command { argv, env: runtime.env.clone(), limits })
}

#[cfg(target_os = "linux")]
/// Finds the guest agent binary for `settings.guest_arch`: configured path,
/// next to the running executable (if built for that architecture), or the
/// workspace's static build output (`target/agent/<rust target>/release`).
pub fn agent_path(settings: &Settings) -> PathBuf {
    if let Some(p) = &settings.agent_bin {
        return p.clone();
    }
    if let Some(sibling) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("tvm-agent"))) {
        let bytes = std::fs::read(&sibling).unwrap_or_default();
        // Only an agent for the guest's architecture (an x86_64 host running
        // aarch64 guests keeps its x86_64 agent beside `tvm` as well).
        if initrd::is_static_elf(&bytes) && initrd::elf_arch(&bytes) == Some(settings.guest_arch) {
            return sibling;
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/agent"))
        .join(settings.guest_arch.rust_target())
        .join("release/tvm-agent")
}

#[cfg(target_os = "linux")]
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
    templates: Arc<Templates>,
    template_builds: TemplateBuilds,
    /// Templates were asked for, but the backend cannot make them (and
    /// why): every VM cold boots, and says so, without a build attempt.
    templates_unsupported: Option<&'static str>,
}

#[cfg(target_os = "linux")]
/// When a missing template is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateBuilds {
    /// Before the VM that needed it, which is then restored from it (one
    /// slower first start; the CLI, whose process ends with its execution).
    Inline,
    /// In the background while the VM that needed it cold boots (a server:
    /// no request waits for a template build).
    Background,
}

#[cfg(target_os = "linux")]
/// A VM fresh from [`Pyrovm::start_vm`], with why it was not restored from a
/// template if it was not.
#[derive(Debug)]
pub struct StartedVm {
    /// The VM at agent-ready.
    pub vm: Vm,
    /// `Some(reason)` when templates are on but this VM cold booted.
    pub note: Option<String>,
}

#[cfg(target_os = "linux")]
impl Pyrovm {
    /// Reaps leftovers of crashed predecessors, finds (or, if `build`, builds)
    /// the kernel, packs the agent and decides the accelerator.
    /// Dropping the future (a signal ends `tvm run`) cancels a kernel build
    /// in progress, which then removes its scratch directory.
    pub async fn prepare(settings: Settings, catalog: Catalog, build: bool) -> Result<Self, PrepareError> {
        let s = settings.clone();
        let cancel = BuildCancel::new();
        let on_drop = CancelOnDrop::new(cancel.clone());
        let prepared = tokio::task::spawn_blocking(move || Self::prepare_blocking(s, catalog, build, &cancel))
            .await
            .map_err(|e| PrepareError::Task(e.to_string()))?;
        on_drop.disarm();
        prepared
    }

    fn prepare_blocking(
        settings: Settings,
        catalog: Catalog,
        build: bool,
        cancel: &BuildCancel,
    ) -> Result<Self, PrepareError> {
        reaper::reap(&settings.runtime_dir);
        // A template build of a killed `tvm` (each CLI run and server may
        // build one) leaves its scratch directory in the cache.
        cache::Cache::new(&settings.cache_dir).sweep_stale_scratch();
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
        // Fails early on a configured VMM that cannot run here, before any kernel build.
        backend::select(&settings, qemu_sandbox)?;
        let jail = jail::ConfinementReport::detect(settings.vmm_uid_base);
        info!(confinement = %jail.describe(), "VMM confinement");
        let kernel = match kernel::find_kernel(&settings)? {
            Some(k) => k,
            None if build => kernel::ensure_kernel(&settings, &Progress::spinner("building guest kernel"), cancel)?,
            None => return Err(PrepareError::KernelNotBuilt),
        };
        let initrd = initrd::ensure_initrd(&agent_path(&settings), &settings.cache_dir.join("initrd"))?;
        let (vmm, accel) = choose_vmm(&settings, qemu_sandbox, &kernel)?;
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
        info!(accel = ?accel.kind, reason = %accel.reason, "accelerator chosen");
        let templates = Arc::new(
            Templates::new(&settings.cache_dir).with_max_bytes(settings.template_cache_mib.saturating_mul(1 << 20)),
        );
        // The cap holds from the start, not only after this process's first build: a
        // lowered `template_cache_mib`, or templates left by builds of other versions.
        templates.evict_to_fit("");
        let templates_unsupported = vmm.backend.templates_unsupported().filter(|_| settings.templates);
        let mut settings = settings;
        if let (Some(why), true) = (templates_unsupported, settings.templates) {
            // Said once here; each start then names it, and nothing retries.
            info!(reason = why, "templates off for this VMM: every VM cold boots");
            settings.templates = false;
        }
        Ok(Self {
            settings,
            catalog,
            kernel,
            initrd,
            accel,
            host_cgroups,
            vmm,
            templates,
            template_builds: TemplateBuilds::Inline,
            templates_unsupported,
        })
    }

    /// Turns starting from templates on or off (`Settings::templates`); a
    /// backend that cannot make them ([`Backend::templates_unsupported`])
    /// stays off.
    pub fn with_templates(mut self, on: bool) -> Self {
        self.settings.templates = on && self.vmm.backend.templates_unsupported().is_none();
        self
    }

    /// Chooses when missing templates are built (default: inline).
    pub fn with_template_builds(mut self, builds: TemplateBuilds) -> Self {
        self.template_builds = builds;
        self
    }

    /// The template store.
    pub fn templates(&self) -> &Templates {
        &self.templates
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
    /// [`ExecuteError::UnsupportedArch`] for one the guests' architecture
    /// lacks, [`ExecuteError::Image`] when the build fails or is cancelled.
    pub async fn ensure_image_cancellable(
        &self,
        runtime: &Runtime,
        progress: Progress,
        cancel: BuildCancel,
    ) -> Result<image::Image, ExecuteError> {
        if runtime.image.is_none() {
            return Err(ExecuteError::Plan(PlanError::RuntimeUnavailable {
                id: runtime.id.clone(),
                reason: runtime.unavailable.clone().unwrap_or_default(),
            }));
        }
        // Every image, template and VM start passes here: none of them for an
        // architecture the entry does not list (its recipe was never verified there).
        check_guest_arch(&self.settings, runtime)?;
        let settings = self.settings.clone();
        let id = runtime.id.clone();
        let rt = runtime.clone();
        let on_drop = CancelOnDrop::new(cancel.clone());
        let built = tokio::task::spawn_blocking(move || {
            image::ensure_runtime_image(&settings, &rt, image::Tags::Recorded, &progress, &cancel)
        })
        .await
        .map_err(|e| ExecuteError::Task(e.to_string()))?
        .map_err(|source| ExecuteError::Image { runtime: id, source });
        on_drop.disarm();
        built
    }

    /// Boots a fresh VM for `runtime` with `memory_mib` of RAM, up to agent-ready.
    pub async fn boot(&self, runtime: &Runtime, memory_mib: u64) -> Result<Vm, ExecuteError> {
        Ok(self.start_vm(runtime, memory_mib).await?.vm)
    }

    /// A fresh VM for `runtime` with `memory_mib` of RAM at agent-ready:
    /// restored from the matching template when templates are on (building
    /// it first, inline or in the background as configured), otherwise, or
    /// when anything about the template fails, cold booted. A template
    /// problem is never the caller's error: it is logged, noted in
    /// [`StartedVm::note`], and the VM cold boots.
    ///
    /// # Errors
    /// The image cannot be built, or the cold boot fails.
    pub async fn start_vm(&self, runtime: &Runtime, memory_mib: u64) -> Result<StartedVm, ExecuteError> {
        // A spinner only when there is something to build: a cache hit prints nothing.
        let progress = match &runtime.image {
            Some(recipe) if image::find_image(&self.settings, recipe).is_none() => {
                Progress::spinner(&format!("building image for {}", runtime.id))
            }
            _ => Progress::hidden(),
        };
        let image = self.ensure_image(runtime, progress).await?;
        let spec = self.vm_spec(&image, memory_mib);
        match &self.vmm.backend {
            Backend::Qemu(q) => self.start_under(q, runtime, &image, &spec).await,
            Backend::Firecracker(f) => self.start_under(f, runtime, &image, &spec).await,
        }
    }

    /// [`Pyrovm::start_vm`] under the backend `vmm`: the one start flow for
    /// every VMM (what differs per VMM is behind [`template::TemplateVmm`]).
    async fn start_under<B: template::TemplateVmm>(
        &self,
        vmm: &B,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> Result<StartedVm, ExecuteError> {
        let note = if self.settings.templates {
            match self.restore(vmm, runtime, image, spec).await {
                Ok(vm) => return Ok(StartedVm { vm, note: None }),
                Err(reason) => Some(reason),
            }
        } else {
            self.templates_unsupported.map(|why| format!("templates unsupported: {why}"))
        };
        let vm = Vm::boot(&new_vm_id(), &self.vmm_host(), vmm, spec, self.boot_timeout()).await?;
        Ok(StartedVm { vm, note })
    }

    /// Restores a VM from the template for (`runtime`, `image`, `spec`)
    /// under `vmm`, or says why not. Missing: built inline (then restored)
    /// or in the background (`Err`: cold boot now). Corrupt: removed, then
    /// rebuilt in the background (server) or by the next start (CLI). A
    /// failed restore removes the template (a broken one must not fail every
    /// start) and schedules a rebuild. A VMM whose API refuses to snapshot
    /// is a failed build like any other; a backend known never to snapshot
    /// (the Firecracker stand-in, [`Backend::templates_unsupported`]) never
    /// gets here: templates are off for it from the start.
    async fn restore<B: template::TemplateVmm>(
        &self,
        vmm: &B,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> Result<Vm, String> {
        let inputs = vmm.template_inputs(spec, &self.kernel.key, &image.key, warmup_command(runtime));
        let key = inputs.key();
        let template = match self.templates.find(&key) {
            Ok(t) => t,
            Err(TemplateError::Missing(_)) if self.template_builds == TemplateBuilds::Inline => {
                if let Some(why) = self.templates.recent_failure(&key) {
                    return Err(format!("template build failed recently: {why}"));
                }
                let req = self.build_request(vmm, runtime, inputs.clone(), spec);
                // Once per runtime and VM shape: without a word the first run would seem to hang.
                let progress = Progress::spinner(&format!("building the VM template of {} (once)", runtime.id));
                progress.set_message(format!("building the VM template of {} (once)", runtime.id));
                let built = self.templates.build(req).await;
                progress.clear();
                match built {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template build failed; cold boot");
                        return Err(format!("template build failed: {}", error_chain(&e)));
                    }
                }
            }
            Err(e) => {
                if matches!(e, TemplateError::Corrupt { .. }) {
                    warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template unusable; removed, cold boot");
                    let _ = self.templates.remove(&key);
                }
                // Inline builds (the CLI) rebuild on the next start: a task
                // spawned here would die with the process at the end of this
                // execution, leaving its half-booted template VM and scratch
                // directory for the reaper and costing this run a core.
                if self.template_builds == TemplateBuilds::Background {
                    self.rebuild_in_background(vmm, runtime, inputs, spec);
                }
                return Err(error_chain(&e));
            }
        };
        let (restoring, extras) = match vmm.restore_launch(&self.templates, &template) {
            Ok(launch) => launch,
            Err(e) => {
                // Deleted or rewritten since `find`: no VM ran from it, so
                // nothing to mark as failing; a changed file is removed.
                warn!(runtime = %runtime.id, key, error = %error_chain(&e), "template vanished or changed; cold boot");
                if matches!(e, TemplateError::Corrupt { .. }) {
                    let _ = self.templates.remove(&key);
                }
                return Err(error_chain(&e));
            }
        };
        let restored = Vm::launch(&new_vm_id(), &self.vmm_host(), &restoring, spec, self.boot_timeout(), extras).await;
        restored.map_err(|e| {
            let e = TemplateError::Vm(e);
            self.templates.count_restore_failure();
            warn!(runtime = %runtime.id, key, error = %error_chain(&e), "restore from template failed; removed, cold boot");
            let _ = self.templates.remove(&key);
            // Like a failed build: a template that builds but never restores
            // must not cost every start a build and a failed restore.
            self.templates.note_failure(&key, &format!("restore failed: {}", error_chain(&e)));
            if self.template_builds == TemplateBuilds::Background {
                self.rebuild_in_background(vmm, runtime, inputs, spec);
            }
            format!("restore failed: {}", error_chain(&e))
        })
    }

    /// Builds the template for `runtime` at `memory_mib` (MiB of guest RAM)
    /// under the chosen backend unless it exists (`tvm image build`,
    /// benchmarks).
    ///
    /// # Errors
    /// [`ExecuteError::Image`] / [`ExecuteError::Plan`] when the image cannot
    /// be had, [`ExecuteError::Template`] when the template cannot be built.
    pub async fn ensure_template(
        &self,
        runtime: &Runtime,
        memory_mib: u64,
    ) -> Result<template::Template, ExecuteError> {
        let image = self.ensure_image(runtime, Progress::hidden()).await?;
        let spec = self.vm_spec(&image, memory_mib);
        let built = match &self.vmm.backend {
            Backend::Qemu(q) => self.build_template(q, runtime, &image, &spec).await,
            Backend::Firecracker(f) => self.build_template(f, runtime, &image, &spec).await,
        };
        built.map_err(|source| ExecuteError::Template { runtime: runtime.id.clone(), source })
    }

    async fn build_template<B: template::TemplateVmm>(
        &self,
        vmm: &B,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> Result<template::Template, TemplateError> {
        let inputs = vmm.template_inputs(spec, &self.kernel.key, &image.key, warmup_command(runtime));
        self.templates.build(self.build_request(vmm, runtime, inputs, spec)).await
    }

    fn build_request<B: template::TemplateVmm>(
        &self,
        vmm: &B,
        runtime: &Runtime,
        inputs: template::TemplateInputs,
        spec: &spec::VmSpec,
    ) -> template::BuildRequest<'_, B> {
        template::BuildRequest {
            runtime: runtime.id.clone(),
            inputs,
            spec: spec.clone(),
            host: self.vmm_host(),
            vmm: vmm.clone(),
            boot_timeout: self.boot_timeout(),
        }
    }

    /// Starts one background build of the template (none if one of it is
    /// claimed already or one failed recently); it waits for the process's
    /// one background build slot ([`Templates::background_slot`]).
    fn rebuild_in_background<B: template::TemplateVmm>(
        &self,
        vmm: &B,
        runtime: &Runtime,
        inputs: template::TemplateInputs,
        spec: &spec::VmSpec,
    ) {
        let key = inputs.key();
        if self.templates.recent_failure(&key).is_some() {
            return;
        }
        let Some(claim) = self.templates.claim_build(&key) else { return };
        let this = self.clone();
        let (runtime, spec, vmm) = (runtime.clone(), spec.clone(), vmm.clone());
        let span = info_span!("template", key = %key, runtime = %runtime.id, vmm = vmm.kind().as_str());
        tokio::spawn(
            async move {
                let _slot = this.templates.background_slot().await;
                let req = this.build_request(&vmm, &runtime, inputs, &spec);
                if let Err(e) = this.templates.build(req).await {
                    warn!(error = %error_chain(&e), "background template build failed");
                }
                drop(claim);
            }
            .instrument(span),
        );
    }

    /// The VM a job of `image` with `memory_mib` of RAM runs in, in the
    /// kernel format and with the agent transport of the chosen backend.
    fn vm_spec(&self, image: &image::Image, memory_mib: u64) -> spec::VmSpec {
        use backend::Vmm as _;
        let (kernel, agent) = match &self.vmm.backend {
            Backend::Qemu(q) => (q.boot_image(&self.kernel).to_path_buf(), q.transport()),
            Backend::Firecracker(f) => (f.boot_image(&self.kernel).to_path_buf(), f.transport()),
        };
        spec::VmSpec {
            kernel,
            initrd: Some(self.initrd.clone()),
            rootfs: Some(image.path.clone()),
            memory_mib,
            vcpus: self.settings.vcpus,
            accel: self.accel.kind(),
            agent: Some(agent),
            debug: std::env::var_os("TVM_GUEST_DEBUG").is_some(),
            extra_cmdline: self.settings.kernel_args.clone(),
        }
    }

    fn vmm_host(&self) -> VmmHost<'_> {
        vm::VmmHost {
            runtime_dir: &self.settings.runtime_dir,
            host_cgroups: self.host_cgroups.as_ref(),
            uid_base: self.settings.vmm_uid_base,
        }
    }

    fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.boot_timeout_ms)
    }

    /// Runs `runtime`'s warm-up in `vm`, a VM that waits for its job (a warm
    /// pool's), as a template build does: as the job user in a throwaway
    /// cgroup and work dir, everything it left in RAM wiped afterwards
    /// ([`tvm_protocol::HostMessage::Prewarm`]). No user code has run in the
    /// VM, and none runs here: it is still a fresh VM for its one job.
    ///
    /// Why: under TCG each QEMU process translates guest code the first time
    /// it runs, and a restored VM starts with an empty translation cache, so
    /// the agent's job path and the runtime's start-up would be translated
    /// on the job's time (a python-3.13 hello: about half its run). A pool VM
    /// has idle time to pay that in advance. Under KVM it only warms the page
    /// cache further, at the cost of the warm-up's CPU time.
    ///
    /// Returns the warm-up's guest wall time in ms, `None` when the runtime
    /// declares no warm-up (nothing is sent).
    ///
    /// # Errors
    /// [`TemplateError::Warmup`] when the warm-up fails, times out (twice
    /// its wall limit plus 30 s) or the VM dies: do not give that VM a job.
    pub async fn warm_up(&self, vm: &mut Vm, runtime: &Runtime) -> Result<Option<u64>, TemplateError> {
        match warmup_command(runtime) {
            Some(command) => template::prewarm(vm, &command).await.map(Some),
            None => Ok(None),
        }
    }

    /// Runs one request in a fresh VM; `on_output` sees output as it streams.
    pub async fn execute(
        &self,
        req: &ExecutionRequest,
        on_output: impl FnMut(Stage, Stream, &[u8]),
    ) -> Result<Execution, ExecuteError> {
        let plan = plan::plan(&self.catalog, req, self.settings.vm_overhead_mib)?;
        let started = Instant::now();
        let StartedVm { vm, note } = self.start_vm(&plan.runtime, plan.vm_memory_mib).await?;
        let vm_id = vm.id().to_string();
        let boot_ms = vm.boot_time().as_millis() as u64;
        let start = vm.start_kind();
        let span = info_span!("execute", vm = %vm_id, runtime = %plan.runtime.id, start = start.as_str());
        let result = vm.execute(&plan.job, on_output).instrument(span).await?;
        let total_ms = started.elapsed().as_millis() as u64;
        info!(vm = %vm_id, verdict = %result.verdict, start = start.as_str(), boot_ms, total_ms, "execution finished");
        Ok(Execution {
            vm_id,
            runtime: plan.runtime.id,
            vmm: self.vmm.backend.kind().as_str(),
            accel: self.accel.kind().as_str(),
            result,
            start,
            start_note: note,
            boot_ms,
            total_ms,
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Text(String, #[source] Option<Box<Text>>);

    /// Every `.rs` file under `dir`, recursively.
    fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The identifier at the start of `s` (after spaces).
    fn ident(s: &str) -> &str {
        let s = s.trim_start();
        let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
        &s[..end]
    }

    /// The crate-level modules each top-level module of `src` names through
    /// `crate::` paths (`crate::a::b`, `use crate::{a, b::c}`), comments
    /// dropped. A file below `src/x/`, or included with `#[path]` from
    /// `x.rs`, belongs to `x`; `lib.rs` (the facade on top) is left out.
    fn module_graph(src: &std::path::Path) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let top = |f: &PathBuf| -> String {
            let rel = f.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            first.trim_end_matches(".rs").to_string()
        };
        // `#[path = "y.rs"] mod m;` in x.rs: y belongs to x.
        let mut owner: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for part in text.split("#[path = \"").skip(1) {
                let included = part.split('"').next().unwrap().trim_end_matches(".rs").to_string();
                owner.insert(included, top(f));
            }
        }
        let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
        for f in &files {
            let mut module = top(f);
            while let Some(o) = owner.get(&module) {
                module = o.clone();
            }
            if module == "lib" {
                continue;
            }
            let text: String = std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| l.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            let mut named = std::collections::BTreeSet::new();
            for after in text.split("crate::").skip(1) {
                match after.strip_prefix('{') {
                    // A group: the first identifier of each top-level item.
                    Some(group) => {
                        let mut depth = 0;
                        let mut item_start = true;
                        for (i, c) in group.char_indices() {
                            if item_start && depth == 0 && !c.is_whitespace() {
                                named.insert(ident(&group[i..]).to_string());
                                item_start = false;
                            }
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => break,
                                '}' => depth -= 1,
                                ',' if depth == 0 => item_start = true,
                                _ => {}
                            }
                        }
                    }
                    None => {
                        named.insert(ident(after).to_string());
                    }
                }
            }
            named.remove(&module);
            graph.entry(module).or_default().extend(named);
        }
        let modules: std::collections::BTreeSet<String> = graph.keys().cloned().collect();
        for deps in graph.values_mut() {
            deps.retain(|d| modules.contains(d));
        }
        graph
    }

    /// A circle in `graph` (`a → b → … → a`), if there is one.
    fn find_circle(
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ) -> Option<Vec<String>> {
        fn visit(
            m: &str,
            graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|p| p == m) {
                let mut circle = path[i..].to_vec();
                circle.push(m.to_string());
                return Some(circle);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_string());
            for d in graph.get(m).into_iter().flatten() {
                if let Some(c) = visit(d, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_string());
            None
        }
        let mut done = std::collections::BTreeSet::new();
        graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
    }

    /// pyrovm's modules import each other in one direction only (issue #11):
    /// `spec` at the bottom, the backends, `vm` and `template` above, the
    /// `Pyrovm` facade on top; a circle would make every layer depend on all.
    #[test]
    fn modules_import_no_circle() {
        let graph = module_graph(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
        assert!(graph.get("vm").is_some_and(|d| d.contains("backend")), "the scan sees imports: {graph:?}");
        assert!(
            !graph.contains_key("image_oci") && !graph.contains_key("session"),
            "#[path] files belong to their owner"
        );
        if let Some(circle) = find_circle(&graph) {
            panic!("pyrovm modules import each other in a circle: {}", circle.join(" → "));
        }
        // The checker finds one where there is one.
        let mut with_circle = graph.clone();
        with_circle.get_mut("spec").unwrap().insert("vm".into());
        assert!(find_circle(&with_circle).is_some());
    }

    #[test]
    fn causes_are_printed_once_even_when_a_message_repeats_its_source() {
        let inner = Text("bad digest".into(), None);
        let repeating = Text("Digest error: bad digest".into(), Some(Box::new(inner)));
        let outer = Text("pulling x failed".into(), Some(Box::new(repeating)));
        assert_eq!(error_chain(&outer), "pulling x failed: Digest error: bad digest");
        let plain = Text("a".into(), Some(Box::new(Text("b".into(), None))));
        assert_eq!(error_chain(&plain), "a: b");
    }

    /// The class of fault: a message that also prints its `#[source]` shows
    /// the cause twice wherever the chain is rendered (`tvm: cannot read
    /// config file X: No such file…: No such file…`). Each error type that
    /// wraps an OS or parse error names it exactly once in its chain.
    #[test]
    fn every_wrapped_cause_is_named_once() {
        let io = || std::io::Error::from_raw_os_error(2);
        let path = PathBuf::from("/nowhere");
        let image = || image::ImageBuildError::Io { action: "reading", path: path.clone(), source: io() };
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(tvm_config::SettingsError::Read { path: path.clone(), source: io() }),
            Box::new(tvm_config::CatalogError::Read { path: "/nowhere".into(), source: io() }),
            Box::new(image()),
            Box::new(ExecuteError::Image { runtime: "python".into(), source: image() }),
            Box::new(kernel::KernelBuildError::Io { action: "reading", path: path.clone(), source: io() }),
            Box::new(initrd::InitrdError::Io { path: path.clone(), source: io() }),
            Box::new(vm::StartVmError::RunDir(io())),
            Box::new(vm::RunJobError::Protocol(tvm_protocol::FrameError::Io(io()))),
            Box::new(vm::RunJobError::Send(tvm_protocol::FrameError::Io(io()))),
        ];
        for e in &errors {
            let chain = error_chain(e.as_ref());
            assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
        }
        let toml_err = toml::from_str::<toml::Value>("a = ").unwrap_err();
        let e = tvm_config::SettingsError::Parse { path, source: toml_err };
        let chain = error_chain(&e);
        assert!(chain.starts_with("config file /nowhere is not valid: "), "{chain}");
        assert_eq!(chain.matches("line 1").count(), 1, "{chain}");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod choose_tests {
    use super::*;

    /// `vmm = "auto"` with a Firecracker binary present: `/bin/true` passes
    /// for one (it exits at once, as a Firecracker on a KVM that cannot run a
    /// guest would end its probe boot without the expected panic).
    #[test]
    fn auto_keeps_firecracker_only_after_a_probe_boot() {
        let cache = tempfile::tempdir().unwrap();
        let settings = Settings {
            vmm: tvm_config::VmmChoice::Auto,
            firecracker: "/bin/true".into(),
            cache_dir: cache.path().to_path_buf(),
            ..Settings::default()
        };
        let kernel = kernel::Kernel {
            key: "probe-test".into(),
            bzimage: cache.path().join("bzImage"),
            vmlinux: cache.path().join("vmlinux"),
            config: cache.path().join("config"),
        };
        let (sel, accel) = choose_vmm(&settings, false, &kernel).unwrap();
        assert_eq!(sel.backend.kind(), VmmKind::Qemu, "{}", sel.reason);
        assert_eq!(accel.kind(), spec::AccelKind::Tcg, "no kernel to boot: {}", accel.reason);
        match backend::firecracker::kvm_usable() {
            // KVM_CREATE_VM works (as on this nested host): select took Firecracker, its probe boot refused it.
            Ok(()) => assert!(
                sel.reason.starts_with("auto: QEMU, because Firecracker's KVM probe boot failed (probe boot ended"),
                "{}",
                sel.reason
            ),
            Err(why) => assert!(sel.reason.contains(&why), "{}", sel.reason),
        }
        // Asked for by name, the same Firecracker is a one-line error naming the probe and the fix.
        if backend::firecracker::kvm_usable().is_ok() {
            let explicit = Settings { vmm: tvm_config::VmmChoice::Firecracker, ..settings.clone() };
            let msg = error_chain(&choose_vmm(&explicit, false, &kernel).unwrap_err());
            assert!(
                msg.contains("needs KVM") && msg.contains("probe boot ended") && msg.contains("vmm = \"qemu\""),
                "{msg}"
            );
        }
        // The vmm line of `tvm doctor` says the same.
        let doctor = vmm_checks(&settings, Some(&kernel));
        assert!(doctor.iter().any(|(n, ok, d)| n == "vmm" && *ok && d.starts_with("qemu: auto: QEMU")), "{doctor:?}");
    }
}
