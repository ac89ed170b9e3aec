//! The VMM seam: one narrow trait, one module per VMM.
//!
//! [`crate::vm::Vm`] owns the process, its run dir, host cgroup, deadline and
//! the agent protocol; a backend only says how *its* VMM is started and
//! reached ([`Vmm`]). Two implementations sit side by side:
//! - [`qemu`]: QEMU `microvm` (KVM or TCG), the agent on a virtio-serial
//!   port over an inherited socketpair.
//! - [`firecracker`]: Firecracker (KVM only), configured over its API socket,
//!   the agent on hybrid vsock.
//!
//! [`select`] picks one for `vmm = "auto" | "qemu" | "firecracker"`, by
//! probe: the binary must exist and, for Firecracker, KVM must work.
//! The shape follows Kata Containers' runtime-rs `hypervisor` crate (one
//! trait, a module per VMM) at a fraction of its width, and the probing
//! choice cloud-hypervisor's `hypervisor` crate makes between KVM and MSHV.

pub mod firecracker;
pub mod qemu;
pub mod qmp;

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixStream;
use tvm_config::{Accel, Settings, VmmChoice};

use crate::jail::{ConfineVmmError, HostPath, VmmFiles};
use crate::kernel::Kernel;
use crate::spec::{AgentTransport, VmSpec};

/// Bytes of console and VMM log kept for diagnostics (the tail).
pub const CONSOLE_KEEP: usize = 16 << 10;

/// Which VMM a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU `microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
}

impl VmmKind {
    /// `qemu` or `firecracker`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        }
    }

    /// How to get the binary, for error messages.
    pub fn install_hint(self) -> &'static str {
        match self {
            VmmKind::Qemu => "install it with `apt-get install qemu-system-x86`",
            VmmKind::Firecracker => {
                "install the official release binary from github.com/firecracker-microvm/firecracker/releases"
            }
        }
    }
}

/// The bounded tail of a VM's serial console and VMM log, shared between the
/// threads or tasks that drain them and the `Vm` that reports it.
#[derive(Debug, Clone, Default)]
pub struct Console(Arc<Mutex<VecDeque<u8>>>);

impl Console {
    /// Appends bytes, keeping only the last [`CONSOLE_KEEP`].
    pub fn push(&self, bytes: &[u8]) {
        if let Ok(mut c) = self.0.lock() {
            c.extend(bytes);
            let excess = c.len().saturating_sub(CONSOLE_KEEP);
            c.drain(..excess);
        }
    }

    fn text(&self) -> String {
        let buf = self.0.lock().map(|b| b.iter().copied().collect::<Vec<u8>>()).unwrap_or_default();
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The guest kernel's panic line, if the console shows one. The kernel
    /// prints it at KERN_EMERG, so it appears even with `quiet loglevel=1`.
    pub fn kernel_panic(&self) -> Option<String> {
        let text = self.text();
        text.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().chars().take(300).collect())
    }

    /// The last dozen non-empty lines, joined with ` | `.
    pub fn tail(&self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(12)..].join(" | ");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// Copies `r` into the console until end of file (a thread per pipe:
    /// it ends when the writer, the VMM, is gone).
    pub fn drain(&self, mut r: impl std::io::Read) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.push(&buf[..n]);
        }
    }
}

/// Why a backend could not start its VMM or reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The VMM's descriptors or confinement could not be prepared.
    #[error(transparent)]
    Confine(#[from] ConfineVmmError),
    /// A file or directory of the VM could not be prepared.
    #[error("cannot prepare {what} for the VMM")]
    Prepare {
        /// What (the agent socketpair, the API socket dir, a log pipe).
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's API refused a request (Firecracker: `400 {"fault_message"}`).
    #[error("{vmm} refused {method} {path} ({status}): {fault}")]
    ApiRefused {
        /// The VMM.
        vmm: &'static str,
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The VMM's `fault_message` (or the body, bounded).
        fault: String,
    },
    /// Talking to the VMM's API failed (socket, HTTP, deadline).
    #[error("{vmm} API {path}: {message}")]
    Api {
        /// The VMM.
        vmm: &'static str,
        /// Request path (or the socket).
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The agent channel could not be connected.
    #[error("cannot connect to the guest agent: {0}")]
    AgentConnect(String),
    /// A feature this backend does not offer was asked for.
    #[error("{vmm} does not support {what}")]
    Unsupported {
        /// The VMM.
        vmm: &'static str,
        /// The feature.
        what: &'static str,
    },
}

/// Where a VM's files live on the host while it runs.
#[derive(Debug, Clone, Copy)]
pub struct LaunchContext<'a> {
    /// The VM id.
    pub id: &'a str,
    /// The VM's run dir (`<runtime_dir>/vm-<id>`, removed with the `Vm`).
    pub run_dir: &'a Path,
}

/// What to spawn for one VM, as [`Vmm::launch`] prepared it.
#[derive(Debug)]
pub struct Launch<P> {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Descriptors the VMM inherits (dropped by the caller once spawned).
    pub files: Option<VmmFiles>,
    /// A directory the VMM must own (sockets, pipes), inside the run dir,
    /// held open: the VMM inherits it and reaches it as `/proc/self/fd/N/`,
    /// since its uid may not traverse the root-owned run dir above it.
    pub own_dir: Option<OwnDir>,
    /// Start the VMM in a new, empty network namespace (no interface up).
    pub new_netns: bool,
    /// Whether TVM's confinement (per-VM uid, Landlock, host cgroup)
    /// applies; `false` when a jailer confines the VMM itself.
    pub confine: bool,
    /// Host paths outside the run dir this VM creates (a jailer's chroot and
    /// cgroups): recorded for the startup reaper, removed by `cleanup`.
    pub leftovers: Vec<PathBuf>,
    /// Released after the VMM is reaped (a jailer's chroot and cgroups).
    pub cleanup: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    /// Backend state for [`Vmm::agent_channel`].
    pub pending: P,
}

/// A directory handed to the VMM (see [`Launch::own_dir`]).
#[derive(Debug)]
pub struct OwnDir {
    /// Its real path (for TVM's side: connecting sockets, Landlock rules).
    pub path: PathBuf,
    /// The descriptor the VMM inherits.
    pub fd: std::os::fd::OwnedFd,
}

impl OwnDir {
    /// Creates `path` (mode 0700) and opens it.
    ///
    /// # Errors
    /// [`LaunchError::Prepare`] if it cannot be created or opened.
    pub fn create(path: PathBuf) -> Result<Self, LaunchError> {
        use std::os::unix::fs::DirBuilderExt;
        let prep = |source| LaunchError::Prepare { what: "the VMM's directory", source };
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(prep)?;
        let fd = std::fs::File::open(&path).map_err(prep)?.into();
        Ok(Self { path, fd })
    }

    /// How the VMM names `name` inside it: `/proc/self/fd/N/name`.
    pub fn vmm_path(&self, name: &str) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd())
    }
}

/// The connected agent channel, and whatever must live as long as it.
#[derive(Debug)]
pub struct AgentChannel {
    /// The byte stream to the agent.
    pub stream: UnixStream,
    /// Held by the `Vm` until it is dropped (log drains, API connection).
    pub keep: Option<Box<dyn Keep>>,
}

/// Backend state a `Vm` holds while it lives; the backend that made it can
/// get it back by type (Firecracker: the API connection, for snapshots).
pub trait Keep: std::fmt::Debug + Send + Sync + 'static {
    /// `self` as `Any`, for downcasting.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<T: std::fmt::Debug + Send + Sync + 'static> Keep for T {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A VMM backend: the narrow part of starting a VM that differs per VMM.
pub trait Vmm: std::fmt::Debug + Send + Sync {
    /// State carried from [`Vmm::launch`] to [`Vmm::agent_channel`].
    type Pending: Send + 'static;

    /// Which VMM this is.
    fn kind(&self) -> VmmKind;

    /// The VMM binary (as configured: a path or a name in PATH).
    fn binary(&self) -> &Path;

    /// The kernel image this VMM boots (bzImage or ELF vmlinux).
    fn boot_image<'k>(&self, kernel: &'k Kernel) -> &'k Path;

    /// How the guest ends the VM: the kernel's `reboot=` method.
    fn reboot(&self) -> char;

    /// How the host reaches the agent.
    fn transport(&self) -> AgentTransport;

    /// Host paths the VMM's confinement must allow beyond system files.
    fn host_paths(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Vec<HostPath>;

    /// What to spawn for `spec` (program, arguments, inherited descriptors).
    ///
    /// # Errors
    /// [`LaunchError`] if a file, descriptor or directory cannot be prepared.
    fn launch(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Result<Launch<Self::Pending>, LaunchError>;

    /// Brings the spawned VMM to a running guest and connects the agent
    /// channel, by `deadline`. The caller races this against the VMM's exit.
    ///
    /// # Errors
    /// [`LaunchError::ApiRefused`] / [`LaunchError::Api`] when configuring
    /// the VMM fails, [`LaunchError::AgentConnect`] when the channel cannot
    /// be made before `deadline`.
    fn agent_channel(
        &self,
        pending: Self::Pending,
        console: Console,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<AgentChannel, LaunchError>> + Send;

    /// Whether KVM runs guests under this VMM: `Ok(ms)` with the probe's
    /// duration, or why not. May boot `kernel`; blocking, seconds at most.
    fn probe_kvm(&self, kernel: &Kernel) -> Result<u64, String>;
}

/// The chosen backend.
#[derive(Debug, Clone)]
pub enum Backend {
    /// QEMU `microvm`.
    Qemu(qemu::Qemu),
    /// Firecracker (or its stand-in).
    Firecracker(firecracker::Firecracker),
}

impl Backend {
    /// Which VMM.
    pub fn kind(&self) -> VmmKind {
        match self {
            Backend::Qemu(q) => q.kind(),
            Backend::Firecracker(f) => f.kind(),
        }
    }

    /// Why this backend cannot make templates at all, if it cannot: the
    /// Firecracker stand-in refuses every snapshot (its QEMU 7.2 will not
    /// migrate `vhost-user-vsock-device`), so every build would fail.
    pub fn templates_unsupported(&self) -> Option<&'static str> {
        match self {
            Backend::Firecracker(f) if f.standin() => {
                Some("the Firecracker stand-in cannot snapshot (its QEMU 7.2 will not migrate vhost-user-vsock-device)")
            }
            _ => None,
        }
    }
}

/// The backend chosen for this host and why.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The backend.
    pub backend: Backend,
    /// Why it was chosen (for `tvm doctor` and the startup log).
    pub reason: String,
}

/// Why the configured VMM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SelectVmmError {
    /// `vmm = "firecracker"` but no binary.
    #[error("vmm = \"firecracker\" but {0}; install Firecracker or set vmm = \"qemu\" (TVM_VMM=qemu, --vmm qemu)")]
    FirecrackerMissing(String),
    /// `vmm = "firecracker"` but KVM does not work here.
    #[error("vmm = \"firecracker\" needs KVM, which does not work here ({0}); run on a host with KVM (bare metal or nested virtualization enabled, /dev/kvm read-write) or set vmm = \"qemu\" (TVM_VMM=qemu, --vmm qemu)")]
    FirecrackerNeedsKvm(String),
    /// `vmm = "firecracker"` with `accel = "tcg"`.
    #[error("vmm = \"firecracker\" runs on KVM only, but accel = \"tcg\" is configured; set accel = \"auto\" or vmm = \"qemu\"")]
    FirecrackerWithTcg,
}

/// What `select` found out about Firecracker, for `tvm doctor`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FirecrackerProbe {
    /// The binary, resolved.
    pub binary: Option<PathBuf>,
    /// `firecracker --version`'s first line.
    pub version: Option<String>,
    /// The binary is TVM's test stand-in (`firecracker-standin`), not Firecracker.
    pub standin: bool,
    /// KVM state: `Ok` or why not.
    pub kvm: Result<(), String>,
}

/// Probes the configured Firecracker binary and KVM.
pub fn probe_firecracker(settings: &Settings) -> FirecrackerProbe {
    let binary = crate::cache::which_path(&settings.firecracker);
    let version = binary.as_deref().and_then(firecracker::version_of);
    let standin = version.as_deref().is_some_and(firecracker::is_standin);
    FirecrackerProbe { binary, version, standin, kvm: firecracker::kvm_usable() }
}

/// Picks the backend for `settings.vmm`: `auto` takes Firecracker when its
/// binary exists and KVM works (never the stand-in, which must be asked for),
/// QEMU otherwise. `qemu_sandbox`: whether QEMU accepts `-sandbox`.
///
/// # Errors
/// [`SelectVmmError`] when `vmm = "firecracker"` cannot run here: one line
/// with the reason and the fix.
pub fn select(settings: &Settings, qemu_sandbox: bool) -> Result<Selection, SelectVmmError> {
    let qemu = || Backend::Qemu(qemu::Qemu::new(&settings.qemu, qemu_sandbox).with_arch(settings.guest_arch));
    let fc = |standin: bool| Backend::Firecracker(firecracker::Firecracker::new(settings, standin));
    if settings.vmm == VmmChoice::Qemu {
        return Ok(Selection { backend: qemu(), reason: "configured (vmm = \"qemu\")".into() });
    }
    let host = tvm_config::GuestArch::host();
    if settings.guest_arch != host {
        // Only emulation runs another architecture's guests; Firecracker is KVM only.
        let why = format!("{} guests on a {host} host need emulation (QEMU TCG)", settings.guest_arch);
        if settings.vmm == VmmChoice::Firecracker {
            return Err(SelectVmmError::FirecrackerNeedsKvm(why));
        }
        return Ok(Selection { backend: qemu(), reason: format!("auto: QEMU, because {why}") });
    }
    let p = probe_firecracker(settings);
    let missing = || format!("no firecracker binary at {} (PATH searched)", settings.firecracker.display());
    match settings.vmm {
        VmmChoice::Firecracker => {
            if p.binary.is_none() {
                return Err(SelectVmmError::FirecrackerMissing(missing()));
            }
            if p.standin {
                return Ok(Selection {
                    backend: fc(true),
                    reason: format!(
                        "configured (vmm = \"firecracker\"); {} is TVM's test stand-in, which serves Firecracker's API and boots QEMU microvm under TCG: figures are the stand-in's, not Firecracker's",
                        settings.firecracker.display()
                    ),
                });
            }
            if settings.accel == Accel::Tcg {
                return Err(SelectVmmError::FirecrackerWithTcg);
            }
            match &p.kvm {
                Ok(()) => {
                    Ok(Selection { backend: fc(false), reason: "configured (vmm = \"firecracker\"), KVM works".into() })
                }
                Err(why) => Err(SelectVmmError::FirecrackerNeedsKvm(why.clone())),
            }
        }
        _ => {
            let why_not = match (&p.binary, p.standin, &p.kvm, settings.accel) {
                (None, _, _, _) => missing(),
                (Some(b), true, _, _) => {
                    format!("{} is the test stand-in, used only with vmm = \"firecracker\"", b.display())
                }
                (Some(_), false, _, Accel::Tcg) => "accel = \"tcg\" is configured and Firecracker needs KVM".into(),
                (Some(b), false, Err(why), _) => format!("{} found but KVM does not work ({why})", b.display()),
                (Some(b), false, Ok(()), _) => {
                    return Ok(Selection {
                        backend: fc(false),
                        reason: format!("auto: {} found and KVM works", b.display()),
                    })
                }
            };
            Ok(Selection { backend: qemu(), reason: format!("auto: QEMU, because {why_not}") })
        }
    }
}

/// Longest a KVM probe boot may take: a guest that cannot even reach its root
/// mount in this time is no use under this accelerator.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a KVM probe boot and judges it: `command(scratch)` returns the VMM
/// command booting the guest kernel alone (no initramfs, no drive) under KVM;
/// it may write its configuration into the private `scratch` dir. The guest
/// must reach the kernel's "VFS: Unable to mount root" panic and the VMM must
/// exit (`panic=-1`, the backend's reboot method) within 10 s. The VMM is
/// killed with tvm (`PR_SET_PDEATHSIG`) and at the deadline; the scratch dir
/// and its console log are removed on return.
///
/// # Errors
/// Why KVM did not prove usable, as text for `tvm doctor` and the accelerator
/// decision: the VMM could not start, died with a KVM internal error, missed
/// the deadline, or ended without the expected panic.
pub(crate) fn probe_boot(
    vmm: VmmKind,
    command: impl FnOnce(&Path) -> Result<std::process::Command, String>,
) -> Result<u64, String> {
    use std::os::unix::process::CommandExt;
    let scratch =
        tempfile::Builder::new().prefix("tvm-kvm-probe-").tempdir().map_err(|e| format!("probe scratch dir: {e}"))?;
    let log_path = scratch.path().join("console.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("probe log: {e}"))?;
    let mut cmd = command(scratch.path())?;
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone().map_err(|e| format!("probe log: {e}"))?).stderr(log);
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    let binary = cmd.get_program().to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {binary}: {e}"))?;
    let finished = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break true;
        }
        if started.elapsed() > PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let console = std::fs::read_to_string(&log_path).unwrap_or_default();
    let result = judge_probe(&console, finished, ms);
    tracing::info!(vmm = vmm.as_str(), ok = result.is_ok(), ms, "KVM probe boot");
    result
}

/// The verdict on a probe boot's console output (see [`probe_boot`]).
fn judge_probe(console: &str, finished: bool, ms: u64) -> Result<u64, String> {
    if console.contains("KVM internal error") {
        Err("probe boot died with a KVM internal error".to_string())
    } else if !finished {
        Err(format!("probe boot did not finish within {} s", PROBE_TIMEOUT.as_secs()))
    } else if console.contains("Kernel panic") && console.contains("VFS") {
        Ok(ms)
    } else {
        Err(format!("probe boot ended unexpectedly: {}", console.lines().last().unwrap_or("no output")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_boot_passes_only_on_the_root_mount_panic_in_time() {
        let panic = "[    0.9] VFS: Unable to mount root fs on unknown-block(0,0)\n[    0.9] Kernel panic - not syncing: VFS: Unable to mount root fs";
        assert_eq!(judge_probe(panic, true, 900), Ok(900));
        assert!(judge_probe(panic, false, 10_000).unwrap_err().contains("did not finish within 10 s"));
        assert!(judge_probe("KVM internal error. Suberror: 1", true, 5).unwrap_err().contains("KVM internal error"));
        let odd = judge_probe("booting\nsomething else", true, 5).unwrap_err();
        assert!(odd.ends_with("something else"), "{odd}");
        assert!(judge_probe("", true, 5).unwrap_err().ends_with("no output"));
    }

    #[test]
    fn console_keeps_a_bounded_tail_and_finds_panics() {
        let c = Console::default();
        assert_eq!(c.tail(), "(empty)");
        c.push(&vec![b'x'; CONSOLE_KEEP * 2]);
        c.push(b"\n[ 1.0] Kernel panic - not syncing: VFS\n");
        assert!(c.0.lock().unwrap().len() <= CONSOLE_KEEP);
        assert_eq!(c.kernel_panic().as_deref(), Some("[ 1.0] Kernel panic - not syncing: VFS"));
        assert!(c.tail().ends_with("Kernel panic - not syncing: VFS"));
    }

    fn settings(vmm: VmmChoice, firecracker: &Path) -> Settings {
        Settings { vmm, firecracker: firecracker.to_path_buf(), ..Settings::default() }
    }

    #[test]
    fn qemu_is_chosen_when_configured_or_when_firecracker_is_missing() {
        let missing = Path::new("/nonexistent/firecracker");
        let s = select(&settings(VmmChoice::Qemu, missing), true).unwrap();
        assert_eq!(s.backend.kind(), VmmKind::Qemu);
        assert!(s.reason.contains("configured"), "{}", s.reason);
        let s = select(&settings(VmmChoice::Auto, missing), true).unwrap();
        assert_eq!(s.backend.kind(), VmmKind::Qemu);
        assert!(s.reason.contains("no firecracker binary at /nonexistent/firecracker"), "{}", s.reason);
    }

    #[test]
    fn firecracker_without_a_binary_or_kvm_is_one_line_with_the_fix() {
        let err = select(&settings(VmmChoice::Firecracker, Path::new("/nonexistent/fc")), true).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SelectVmmError::FirecrackerMissing(_)), "{msg}");
        assert!(msg.contains("set vmm = \"qemu\"") && !msg.contains('\n'), "{msg}");
        // A binary that is not the stand-in counts as the real Firecracker, which needs KVM.
        let real = Path::new("/bin/true");
        match (firecracker::kvm_usable(), select(&settings(VmmChoice::Firecracker, real), true)) {
            (Ok(()), Ok(s)) => assert_eq!(s.backend.kind(), VmmKind::Firecracker),
            (Err(why), Err(e)) => {
                let msg = e.to_string();
                assert!(matches!(e, SelectVmmError::FirecrackerNeedsKvm(_)), "{msg}");
                assert!(msg.contains(&why) && msg.contains("needs KVM") && !msg.contains('\n'), "{msg}");
            }
            (kvm, sel) => panic!("KVM {kvm:?} but selection {sel:?}"),
        }
        let tcg = Settings { accel: Accel::Tcg, ..settings(VmmChoice::Firecracker, real) };
        assert!(matches!(select(&tcg, true), Err(SelectVmmError::FirecrackerWithTcg)));
        // Auto never fails: it says why it fell back.
        let s = select(&Settings { accel: Accel::Tcg, ..settings(VmmChoice::Auto, real) }, true).unwrap();
        assert_eq!(s.backend.kind(), VmmKind::Qemu);
        assert!(s.reason.contains("accel = \"tcg\""), "{}", s.reason);
    }
}
