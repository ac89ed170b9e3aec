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
mod fc_start;
#[cfg(target_os = "linux")]
pub mod hostcg;
#[cfg(target_os = "linux")]
pub mod image;
#[cfg(target_os = "linux")]
pub mod image_oci;
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
#[cfg(target_os = "linux")]
pub mod registry;
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

#[cfg(target_os = "linux")]
/// The accelerator decision for the VMM `settings` select (QEMU when the
/// configured VMM cannot run here, so `tvm doctor` still reports one).
///
/// # Errors
/// [`accel::KvmUnusable`] when `accel = "kvm"` and the probe fails.
pub fn accel_for(settings: &Settings, kernel: &kernel::Kernel) -> Result<AccelDecision, accel::KvmUnusable> {
    let sandbox = backend::qemu::sandbox_supported(&settings.qemu);
    let backend = backend::select(settings, sandbox).map(|s| s.backend).unwrap_or_else(|_| {
        Backend::Qemu(backend::qemu::Qemu::new(&settings.qemu, sandbox).with_arch(settings.guest_arch))
    });
    match &backend {
        Backend::Qemu(q) => accel::resolve(settings.accel, q, kernel, &settings.cache_dir),
        Backend::Firecracker(f) => accel::resolve(settings.accel, f, kernel, &settings.cache_dir),
    }
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
        let templates = Arc::new(
            Templates::new(&settings.cache_dir).with_max_bytes(settings.template_cache_mib.saturating_mul(1 << 20)),
        );
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
        })
    }

    /// Turns starting from templates on or off (`Settings::templates`).
    pub fn with_templates(mut self, on: bool) -> Self {
        self.settings.templates = on;
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
    /// [`ExecuteError::Image`] when the build fails or is cancelled.
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
        let (id, host, timeout) = (new_vm_id(), self.vmm_host(), self.boot_timeout());
        let (vm, note) = match &self.vmm.backend {
            Backend::Qemu(q) => {
                let note = if self.settings.templates {
                    match self.restore(q, runtime, &image, &spec).await {
                        Ok(vm) => return Ok(StartedVm { vm, note: None }),
                        Err(reason) => Some(reason),
                    }
                } else {
                    None
                };
                return Ok(StartedVm { vm: Vm::boot(&id, &host, q, &spec, timeout).await?, note });
            }
            Backend::Firecracker(f) => {
                // Templates are Firecracker snapshots here (`fc_start`).
                let note = if self.settings.templates {
                    match self.restore_firecracker(f, runtime, &image, &spec).await {
                        Ok(vm) => return Ok(StartedVm { vm, note: None }),
                        Err(reason) => Some(reason),
                    }
                } else {
                    None
                };
                (Vm::boot(&id, &host, f, &spec, timeout).await?, note)
            }
        };
        Ok(StartedVm { vm, note })
    }

    /// Restores a VM from the template for (`runtime`, `image`, `spec`), or
    /// says why not. Missing: built inline (then restored) or in the
    /// background (`Err`: cold boot now). Corrupt: removed, then rebuilt in
    /// the background (server) or by the next start (CLI). A failed restore
    /// removes the template (a broken one must not fail every start) and
    /// schedules a rebuild.
    async fn restore(
        &self,
        qemu: &backend::qemu::Qemu,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> Result<Vm, String> {
        let inputs = self.template_inputs(runtime, image, spec);
        let key = inputs.key();
        let template = match self.templates.find(&key) {
            Ok(t) => t,
            Err(TemplateError::Missing(_)) if self.template_builds == TemplateBuilds::Inline => {
                if let Some(why) = self.templates.recent_failure(&key) {
                    return Err(format!("template build failed recently: {why}"));
                }
                let req = self.build_request(qemu, runtime, inputs.clone(), spec);
                match self.templates.build(req).await {
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
                    self.rebuild_in_background(qemu, runtime, inputs, spec);
                }
                return Err(error_chain(&e));
            }
        };
        let state = match self.templates.open_state(&template) {
            Ok(state) => state,
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
        let launch = template::restore_launch(state);
        let restored = Vm::launch(&new_vm_id(), &self.vmm_host(), qemu, spec, self.boot_timeout(), launch).await;
        restored.map_err(|e| {
            let e = TemplateError::Vm(e);
            self.templates.count_restore_failure();
            warn!(runtime = %runtime.id, key, error = %error_chain(&e), "restore from template failed; removed, cold boot");
            let _ = self.templates.remove(&key);
            // Like a failed build: a template that builds but never restores
            // must not cost every start a build and a failed restore.
            self.templates.note_failure(&key, &format!("restore failed: {}", error_chain(&e)));
            if self.template_builds == TemplateBuilds::Background {
                self.rebuild_in_background(qemu, runtime, inputs, spec);
            }
            format!("restore failed: {}", error_chain(&e))
        })
    }

    /// Builds the template for `runtime` at `memory_mib` unless it exists
    /// (`tvm image build`, benchmarks).
    ///
    /// # Errors
    /// The image or the template could not be built.
    pub async fn ensure_template(
        &self,
        runtime: &Runtime,
        memory_mib: u64,
    ) -> Result<template::Template, ExecuteError> {
        let qemu = match &self.vmm.backend {
            Backend::Qemu(q) => q,
            Backend::Firecracker(f) => return self.ensure_template_firecracker(f, runtime, memory_mib).await,
        };
        let image = self.ensure_image(runtime, Progress::hidden()).await?;
        let spec = self.vm_spec(&image, memory_mib);
        let inputs = self.template_inputs(runtime, &image, &spec);
        let req = self.build_request(qemu, runtime, inputs, &spec);
        self.templates.build(req).await.map_err(|source| ExecuteError::Template { runtime: runtime.id.clone(), source })
    }

    /// The template key inputs of a VM for `runtime` from `spec`.
    fn template_inputs(
        &self,
        runtime: &Runtime,
        image: &image::Image,
        spec: &spec::VmSpec,
    ) -> template::TemplateInputs {
        template::TemplateInputs::new(spec, &self.settings.qemu, &self.kernel.key, &image.key, warmup_command(runtime))
    }

    fn build_request(
        &self,
        qemu: &backend::qemu::Qemu,
        runtime: &Runtime,
        inputs: template::TemplateInputs,
        spec: &spec::VmSpec,
    ) -> template::BuildRequest<'_> {
        template::BuildRequest {
            runtime: runtime.id.clone(),
            inputs,
            spec: spec.clone(),
            host: self.vmm_host(),
            qemu: qemu.clone(),
            boot_timeout: self.boot_timeout(),
        }
    }

    /// Starts one background build of the template (none if one runs already).
    fn rebuild_in_background(
        &self,
        qemu: &backend::qemu::Qemu,
        runtime: &Runtime,
        inputs: template::TemplateInputs,
        spec: &spec::VmSpec,
    ) {
        let key = inputs.key();
        if self.templates.recent_failure(&key).is_some() || !self.templates.claim_build(&key) {
            return;
        }
        let this = self.clone();
        let runtime = runtime.clone();
        let spec = spec.clone();
        let qemu = qemu.clone();
        let span = info_span!("template", key = %key, runtime = %runtime.id);
        tokio::spawn(
            async move {
                let req = this.build_request(&qemu, &runtime, inputs, &spec);
                if let Err(e) = this.templates.build(req).await {
                    warn!(error = %error_chain(&e), "background template build failed");
                }
                this.templates.release_build(&key);
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
