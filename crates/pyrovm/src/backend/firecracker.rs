//! The Firecracker backend: `firecracker --api-sock`, configured over its
//! HTTP API, the agent on hybrid vsock.
//!
//! Per VM: the process starts with nothing but an API socket in a directory
//! of its own inside the run dir; TVM then sends, per Firecracker's API
//! (`third_party/firecracker/firecracker-api.yaml`, v1.16.1), `PUT /logger`
//! and `PUT /metrics` (named pipes TVM drains into bounded buffers),
//! `PUT /boot-source` (ELF vmlinux, initramfs, `reboot=k`),
//! `PUT /drives/rootfs` (read-only), `PUT /machine-config`, `PUT /entropy`,
//! `PUT /vsock` (guest CID 3, `uds_path`) and `PUT /actions InstanceStart`.
//! Every body is a typed struct mirroring the spec's definitions; unit tests
//! validate each against the spec's JSON schemas. A `400` answer becomes
//! [`LaunchError::ApiRefused`] carrying Firecracker's `fault_message`.
//!
//! The agent channel is Firecracker's host-initiated hybrid vsock: connect
//! to `uds_path`, send `CONNECT 1024\n`, read `OK <port>\n` byte by byte;
//! then the stream is the guest's vsock port 1024 ([`tvm_protocol::VSOCK_PORT`]).
//!
//! Confinement: when `tvm` is root and the `jailer` binary exists,
//! Firecracker starts through it (chroot holding hard links of the kernel,
//! initramfs and image, its own uid/gid, cgroups, a fresh network namespace
//! with no interface); otherwise TVM's own confinement applies as for any
//! VMM ([`crate::jail`]), and [`Firecracker::jailer`] says why the jailer was
//! skipped. A binary whose `--version` names itself a stand-in is TVM's test
//! stand-in (`crates/firecracker-standin`), which serves the same API and
//! boots QEMU under TCG; it needs no KVM and is never run through the jailer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tracing::{debug, info};
use tvm_config::Settings;

use super::{AgentChannel, Console, Launch, LaunchContext, LaunchError, OwnDir, Vmm, VmmKind};
use crate::jail::{install_prefix, HostPath, VmmFiles};
use crate::kernel::Kernel;
use crate::spec::{kernel_cmdline, AgentTransport, VmSpec};

/// The guest's vsock context id (any value >= 3; one VM per device).
pub const GUEST_CID: u32 = 3;

/// Largest API response body read (Firecracker's are a few hundred bytes).
const MAX_API_RESPONSE: usize = 64 << 10;

/// Longest `OK <port>\n` line accepted on the vsock socket.
const MAX_VSOCK_ACK: usize = 32;

/// Bytes of Firecracker's metrics kept (the newest flush; they are not reported).
const METRICS_KEEP: usize = 4 << 10;

/// `PUT /boot-source` (spec: `BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Host path of the kernel (ELF vmlinux on x86_64).
    pub kernel_image_path: String,
    /// Host path of the initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` for a virtio-block drive (spec: `Drive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// The drive id, also the path parameter.
    pub drive_id: String,
    /// Host path of the image.
    pub path_on_host: String,
    /// Whether the guest boots from it (TVM's root comes from the initramfs: no).
    pub is_root_device: bool,
    /// Read-only to the guest.
    pub is_read_only: bool,
}

/// `PUT /machine-config` (spec: `MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// vCPUs (1..=32).
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (off: one thread per vCPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
}

/// `PUT /vsock` (spec: `Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// Guest CID (>= 3).
    pub guest_cid: u32,
    /// Host Unix socket Firecracker listens on for host-initiated connections.
    pub uds_path: String,
}

/// `PUT /logger` (spec: `Logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// Named pipe the log goes to.
    pub log_path: String,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    pub level: String,
    /// Prefix lines with their level.
    pub show_level: bool,
    /// Prefix lines with their source location.
    pub show_log_origin: bool,
}

/// `PUT /metrics` (spec: `Metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Named pipe the JSON metrics go to.
    pub metrics_path: String,
}

/// `PUT /entropy` (spec: `EntropyDevice`): a virtio-rng device, no rate limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {}

/// `PUT /actions` (spec: `InstanceActionInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// `FlushMetrics`, `InstanceStart` or `SendCtrlAltDel`.
    pub action_type: String,
}

/// Firecracker's error body (spec: `Error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub fault_message: String,
}

/// One API request of the boot sequence: method, path, JSON body, and the
/// spec definition the body must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: &'static str,
    /// Path.
    pub path: String,
    /// The spec definition of the body (`BootSource`, `Drive`, ...).
    pub definition: &'static str,
    /// The body.
    pub body: serde_json::Value,
}

impl ApiRequest {
    fn put<T: Serialize>(path: impl Into<String>, definition: &'static str, body: &T) -> Self {
        Self::with_body("PUT", path, definition, body)
    }

    fn with_body<T: Serialize>(
        method: &'static str,
        path: impl Into<String>,
        definition: &'static str,
        body: &T,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            definition,
            body: serde_json::to_value(body).expect("plain structs serialize"),
        }
    }
}

/// The host paths a Firecracker process is told about, as it sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcPaths {
    /// Kernel (ELF vmlinux).
    pub kernel: String,
    /// Initramfs.
    pub initrd: Option<String>,
    /// Root image.
    pub rootfs: Option<String>,
    /// vsock `uds_path`.
    pub vsock: String,
    /// Logger pipe.
    pub log: String,
    /// Metrics pipe.
    pub metrics: String,
}

/// The boot sequence for `spec`, in the order Firecracker's docs give it.
pub fn boot_requests(spec: &VmSpec, paths: &FcPaths) -> Vec<ApiRequest> {
    let mut r = vec![
        ApiRequest::put(
            "/logger",
            "Logger",
            &Logger {
                log_path: paths.log.clone(),
                level: if spec.debug { "Debug" } else { "Warning" }.into(),
                show_level: true,
                show_log_origin: false,
            },
        ),
        ApiRequest::put("/metrics", "Metrics", &Metrics { metrics_path: paths.metrics.clone() }),
        ApiRequest::put(
            "/boot-source",
            "BootSource",
            &BootSource {
                kernel_image_path: paths.kernel.clone(),
                initrd_path: paths.initrd.clone(),
                boot_args: Some(kernel_cmdline(spec.debug, 'k', spec.extra_cmdline.as_deref())),
            },
        ),
    ];
    if let Some(rootfs) = &paths.rootfs {
        let drive = Drive {
            drive_id: "rootfs".into(),
            path_on_host: rootfs.clone(),
            is_root_device: false,
            is_read_only: true,
        };
        r.push(ApiRequest::put("/drives/rootfs", "Drive", &drive));
    }
    r.push(ApiRequest::put(
        "/machine-config",
        "MachineConfiguration",
        &MachineConfiguration { vcpu_count: spec.vcpus, mem_size_mib: spec.memory_mib, smt: Some(false) },
    ));
    r.push(ApiRequest::put("/entropy", "EntropyDevice", &EntropyDevice::default()));
    if spec.agent.is_some() {
        r.push(ApiRequest::put("/vsock", "Vsock", &Vsock { guest_cid: GUEST_CID, uds_path: paths.vsock.clone() }));
    }
    r.push(ApiRequest::put(
        "/actions",
        "InstanceActionInfo",
        &InstanceActionInfo { action_type: "InstanceStart".into() },
    ));
    r
}

/// Firecracker's `--config-file` for the KVM probe boot (the `VmmConfig`
/// document: one key per API resource, e.g. `boot-source` holding the
/// `PUT /boot-source` body): the guest kernel alone on 1 vCPU and 128 MiB, no
/// drive, no vsock, so the guest panics at its root mount and, with
/// `panic=-1 reboot=k`, Firecracker exits.
pub fn probe_config(vmlinux: &Path) -> serde_json::Value {
    serde_json::json!({
        "boot-source": BootSource {
            kernel_image_path: vmlinux.to_string_lossy().into_owned(),
            initrd_path: None,
            boot_args: Some(kernel_cmdline(false, 'k', None)),
        },
        "drives": [],
        "machine-config": MachineConfiguration { vcpu_count: 1, mem_size_mib: 128, smt: Some(false) },
    })
}

/// Whether and how Firecracker runs through the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailerUse {
    /// Through this jailer binary.
    Jailer(PathBuf),
    /// Not used, and why.
    Skipped(String),
}

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    binary: PathBuf,
    standin: bool,
    jailer: JailerUse,
    uid_base: u32,
    runtime_dir: PathBuf,
    /// The root image at [`snapshot::ROOTFS_PIN`] (template VMs and restores).
    pin_rootfs: bool,
    /// Restore from this snapshot instead of booting.
    restore: Option<snapshot::RestoreFrom>,
}

impl Firecracker {
    /// The backend for `settings.firecracker`; `standin` when the binary is
    /// TVM's test stand-in. Decides about the jailer here (see [`Self::jailer`]).
    pub fn new(settings: &Settings, standin: bool) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let jailer = match crate::cache::which_path(&settings.jailer) {
            None => JailerUse::Skipped(format!(
                "no jailer binary at {} (PATH searched); TVM's own confinement applies",
                settings.jailer.display()
            )),
            Some(_) if !root => JailerUse::Skipped(
                "tvm is not root (the jailer needs root for chroot, uid change and cgroups); TVM's own confinement applies"
                    .into(),
            ),
            Some(_) if standin => JailerUse::Skipped(
                "the stand-in runs QEMU and vhost-device-vsock, which a jailer chroot does not hold; TVM's own confinement applies"
                    .into(),
            ),
            Some(_) if settings.vmm_uid_base == 0 => {
                JailerUse::Skipped("vmm_uid_base = 0 leaves no uid range for jailed VMMs".into())
            }
            Some(j) => JailerUse::Jailer(j),
        };
        Self {
            binary: settings.firecracker.clone(),
            standin,
            jailer,
            uid_base: settings.vmm_uid_base,
            runtime_dir: settings.runtime_dir.clone(),
            pin_rootfs: false,
            restore: None,
        }
    }

    /// This backend for a VM that will be snapshotted: its root image has
    /// the path every restored VM will find it at (see [`snapshot`]).
    pub fn for_snapshot(&self) -> Self {
        Self { pin_rootfs: true, restore: None, ..self.clone() }
    }

    /// This backend restoring `from` instead of booting (the restored VM
    /// sees its image where the snapshotted one did).
    pub fn restoring(&self, from: snapshot::RestoreFrom) -> Self {
        Self { pin_rootfs: true, restore: Some(from), ..self.clone() }
    }

    /// Whether VMs run through the jailer (their snapshots name chroot paths).
    pub fn jailed(&self) -> bool {
        matches!(self.jailer, JailerUse::Jailer(_))
    }

    /// Whether the binary is TVM's test stand-in.
    pub fn standin(&self) -> bool {
        self.standin
    }

    /// Whether the jailer is used, or why not.
    pub fn jailer(&self) -> &JailerUse {
        &self.jailer
    }
}

/// `binary --version`'s first line, or `None` if it cannot be run (bounded: 5 s).
pub fn version_of(binary: &Path) -> Option<String> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take()?.take(4096).read_to_string(&mut out).ok()?;
    out.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string)
}

/// Whether a `--version` line is the stand-in's (it says so).
pub fn is_standin(version: &str) -> bool {
    version.contains("stand-in")
}

/// Whether KVM can create a VM here, the way Firecracker uses it: `/dev/kvm`
/// opens read-write, speaks API version 12 and `KVM_CREATE_VM` succeeds.
///
/// # Errors
/// Why not, in words.
pub fn kvm_usable() -> Result<(), String> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: argument-less KVM ioctls on an fd we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        return Err(format!("/dev/kvm speaks KVM API {version}, Firecracker needs 12"));
    }
    // SAFETY: as above; the returned fd is owned at once.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(format!("KVM_CREATE_VM failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: vm is a fresh descriptor returned by the kernel.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// What [`Firecracker::launch`] hands to [`Firecracker::agent_channel`].
#[derive(Debug)]
pub struct Pending {
    api_sock: PathBuf,
    vsock: Option<PathBuf>,
    log_fifo: PathBuf,
    metrics_fifo: PathBuf,
    requests: Vec<ApiRequest>,
    files_dir: FilesDir,
}

/// A directory the VMM may create files in, as it and as TVM name it (its
/// own directory in the run dir, or the jailer chroot's root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesDir {
    /// How the VMM names it (`/proc/self/fd/N`, or empty for the chroot root).
    pub vmm: String,
    /// Its path on the host.
    pub host: PathBuf,
}

impl FilesDir {
    /// `name` inside it, as the VMM names it.
    pub fn vmm_path(&self, name: &str) -> String {
        format!("{}/{name}", self.vmm)
    }

    /// `name` inside it, on the host.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.host.join(name)
    }
}

/// Things that live as long as the VM: the API connection and the pipe drains.
#[derive(Debug)]
pub struct Live {
    /// The API connection, kept for later requests.
    pub api: ApiClient,
    /// Where the VMM may write files (snapshots).
    pub files_dir: FilesDir,
    // Aborted on drop: the log and metrics pipes are drained while the VM lives.
    _drains: Vec<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Vmm for Firecracker {
    type Pending = Pending;

    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    fn boot_image<'k>(&self, kernel: &'k Kernel) -> &'k Path {
        // Firecracker on x86_64 loads an uncompressed ELF kernel.
        &kernel.vmlinux
    }

    fn reboot(&self) -> char {
        // Firecracker emulates an i8042 only to end the VM on its reset command.
        'k'
    }

    fn transport(&self) -> AgentTransport {
        AgentTransport::Vsock
    }

    fn host_paths(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Vec<HostPath> {
        let mut p: Vec<HostPath> = install_prefix(&self.binary).into_iter().map(HostPath::read).collect();
        // Sockets and pipes live in its own directory.
        p.push(HostPath::read_write(own_dir(ctx)));
        // Firecracker reopens the image through /proc/self/fd, which Landlock
        // checks against the image's real path (memfds are exempt); so too
        // a template's state and memory files.
        p.extend(spec.rootfs.iter().map(HostPath::read));
        if let Some(from) = &self.restore {
            p.extend([HostPath::read(&from.snapshot), HostPath::read(&from.mem)]);
        }
        p
    }

    fn launch(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Result<Launch<Pending>, LaunchError> {
        match &self.jailer {
            JailerUse::Jailer(jailer) => self.launch_jailed(jailer, spec, ctx),
            JailerUse::Skipped(_) => self.launch_plain(spec, ctx),
        }
    }

    async fn agent_channel(
        &self,
        pending: Pending,
        console: Console,
        deadline: tokio::time::Instant,
    ) -> Result<AgentChannel, LaunchError> {
        let drains = vec![
            drain_fifo(&pending.log_fifo, console.clone(), "log")?,
            drain_fifo(&pending.metrics_fifo, Console::default(), "metrics")?,
        ];
        let mut api = ApiClient::connect(&pending.api_sock, deadline).await?;
        for req in &pending.requests {
            api.send(req, deadline).await?;
        }
        debug!("firecracker configured and started");
        let stream = match &pending.vsock {
            Some(uds) => connect_vsock(uds, tvm_protocol::VSOCK_PORT, deadline).await?,
            None => return Err(LaunchError::AgentConnect("no vsock device configured".into())),
        };
        Ok(AgentChannel { stream, keep: Some(Box::new(Live { api, files_dir: pending.files_dir, _drains: drains })) })
    }

    /// `KVM_CREATE_VM` working proves little (a nested, paravirtualised KVM
    /// passes it and then cannot run a guest), so this boots the guest kernel
    /// under Firecracker itself: `--no-api --config-file` ([`probe_config`]).
    fn probe_kvm(&self, kernel: &Kernel) -> Result<u64, String> {
        if self.standin {
            return Err("the Firecracker stand-in runs QEMU under TCG".into());
        }
        kvm_usable()?;
        super::probe_boot(VmmKind::Firecracker, |scratch| {
            let config = scratch.join("vm-config.json");
            let body = serde_json::to_vec(&probe_config(&kernel.vmlinux)).map_err(|e| format!("probe config: {e}"))?;
            std::fs::write(&config, body).map_err(|e| format!("probe config: {e}"))?;
            let mut cmd = std::process::Command::new(&self.binary);
            cmd.arg("--no-api").arg("--config-file").arg(&config).args(["--level", "Error"]);
            Ok(cmd)
        })
    }
}

fn own_dir(ctx: &LaunchContext<'_>) -> PathBuf {
    ctx.run_dir.join("fc")
}

/// A named pipe TVM reads and the VMM writes. Writable by others: the VMM
/// runs as its own uid, and only that uid (and root) can reach the pipe,
/// through the VMM's own 0700 directory.
fn mkfifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(std::io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o622))
}

impl Firecracker {
    fn launch_plain(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Result<Launch<Pending>, LaunchError> {
        let prep = |what| move |source| LaunchError::Prepare { what, source };
        let own = OwnDir::create(own_dir(ctx))?;
        let dir = own.path.clone();
        let (log_fifo, metrics_fifo) = (dir.join("log.fifo"), dir.join("metrics.fifo"));
        mkfifo(&log_fifo).map_err(prep("the log pipe"))?;
        mkfifo(&metrics_fifo).map_err(prep("the metrics pipe"))?;
        let mut files = VmmFiles::open(spec, None)?;
        if self.pin_rootfs {
            files.pin_rootfs(snapshot::ROOTFS_PIN);
        }
        let io = files.io();
        let rootfs_fd = if self.pin_rootfs { io.rootfs_fd.map(|_| snapshot::ROOTFS_PIN) } else { io.rootfs_fd };
        // Firecracker sees its files as inherited descriptors and its own
        // directory through one (its uid cannot traverse the run dir).
        let paths = FcPaths {
            kernel: io.kernel.clone(),
            initrd: io.initrd.clone(),
            rootfs: rootfs_fd.map(|fd| format!("/proc/self/fd/{fd}")),
            vsock: own.vmm_path("vsock.sock"),
            log: own.vmm_path("log.fifo"),
            metrics: own.vmm_path("metrics.fifo"),
        };
        let requests = match &self.restore {
            None => boot_requests(spec, &paths),
            Some(from) => {
                let (state, mem) = from.fds.ok_or(LaunchError::Unsupported {
                    vmm: "firecracker",
                    what: "a restore without the template's descriptors",
                })?;
                let from = snapshot::RestorePaths {
                    snapshot: format!("/proc/self/fd/{state}"),
                    mem: format!("/proc/self/fd/{mem}"),
                };
                snapshot::restore_requests(spec.debug, &paths, &from)
            }
        };
        let files_dir = FilesDir { vmm: own.vmm_path("").trim_end_matches('/').to_string(), host: dir.clone() };
        let args = vec!["--api-sock".into(), own.vmm_path("api.sock"), "--id".into(), format!("tvm-{}", ctx.id)];
        let api_sock = dir.join("api.sock");
        Ok(Launch {
            program: self.binary.clone(),
            args,
            files: Some(files),
            own_dir: Some(own),
            new_netns: false,
            confine: true,
            leftovers: Vec::new(),
            cleanup: None,
            pending: Pending {
                api_sock,
                vsock: spec.agent.map(|_| dir.join("vsock.sock")),
                log_fifo,
                metrics_fifo,
                requests,
                files_dir,
            },
        })
    }
}

/// Opens a named pipe for reading without waiting for its writer (read-write
/// open: a pipe with us as a writer never reports end of file while
/// Firecracker reopens it) and copies it into `sink` until aborted.
fn drain_fifo(path: &Path, sink: Console, what: &'static str) -> Result<AbortOnDrop, LaunchError> {
    let rx = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_receiver(path).map_err(|source| {
        LaunchError::Prepare { what: if what == "log" { "the log pipe" } else { "the metrics pipe" }, source }
    })?;
    let keep = if what == "log" { usize::MAX } else { METRICS_KEEP };
    let task = tokio::spawn(async move {
        let mut rx = rx;
        let mut buf = vec![0u8; 4096];
        let mut seen = 0usize;
        while let Ok(n) = rx.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen += n;
            if seen <= keep {
                sink.push(&buf[..n]);
            }
        }
    });
    Ok(AbortOnDrop(task.abort_handle()))
}

/// An HTTP/1 connection to a Firecracker API socket.
#[derive(Debug)]
pub struct ApiClient {
    sender: SendRequest<Full<Bytes>>,
    _conn: AbortOnDrop,
}

impl ApiClient {
    /// Connects to `sock`, retrying until it exists and accepts (the VMM
    /// creates it a few milliseconds after start) or `deadline` passes.
    ///
    /// # Errors
    /// [`LaunchError::Api`] when no connection is made by `deadline`.
    pub async fn connect(sock: &Path, deadline: tokio::time::Instant) -> Result<Self, LaunchError> {
        let err = |message: String| LaunchError::Api { vmm: "firecracker", path: sock.display().to_string(), message };
        let stream = loop {
            match UnixStream::connect(sock).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(err(format!("API socket not reachable: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(format!("HTTP handshake: {e}")))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, _conn: AbortOnDrop(task.abort_handle()) })
    }

    /// Sends one request and expects `2xx`; the body read is bounded.
    ///
    /// # Errors
    /// [`LaunchError::ApiRefused`] with Firecracker's `fault_message` for a
    /// non-2xx answer, [`LaunchError::Api`] for transport failures or when
    /// `deadline` passes.
    pub async fn send(&mut self, req: &ApiRequest, deadline: tokio::time::Instant) -> Result<Bytes, LaunchError> {
        let err = |message: String| LaunchError::Api {
            vmm: "firecracker",
            path: format!("{} {}", req.method, req.path),
            message,
        };
        let body = serde_json::to_vec(&req.body).map_err(|e| err(e.to_string()))?;
        let request = hyper::Request::builder()
            .method(req.method)
            // Origin-form, as Firecracker's own clients send it.
            .uri(req.path.as_str())
            .header("Host", "localhost")
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| err(e.to_string()))?;
        let exchange = async {
            self.sender.ready().await.map_err(|e| err(format!("connection lost: {e}")))?;
            let resp = self.sender.send_request(request).await.map_err(|e| err(format!("no answer: {e}")))?;
            let status = resp.status();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_API_RESPONSE);
            let bytes = limited.collect().await.map_err(|e| err(format!("reading the answer: {e}")))?.to_bytes();
            Ok::<_, LaunchError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| err("no answer before the boot deadline".into()))??;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(LaunchError::ApiRefused {
            vmm: "firecracker",
            method: req.method,
            path: req.path.clone(),
            status: status.as_u16(),
            fault: fault_message(&bytes),
        })
    }
}

/// The `fault_message` of an error body, or the body itself (bounded, lossy).
pub fn fault_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => e.fault_message.chars().take(1000).collect(),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(1000)]).trim().to_string(),
    }
}

/// Host-initiated hybrid vsock: connects to `uds`, asks for guest `port` and
/// reads the `OK <host_port>\n` answer one byte at a time (anything after it
/// belongs to the guest). Until the guest listens, Firecracker closes the
/// connection; this retries until `deadline`.
///
/// # Errors
/// [`LaunchError::AgentConnect`] with the last failure when `deadline` passes.
pub async fn connect_vsock(uds: &Path, port: u32, deadline: tokio::time::Instant) -> Result<UnixStream, LaunchError> {
    let mut last = String::from("not tried");
    // Backing off: every refused attempt costs the vsock device a connection
    // request and a reset; a slow boot must not turn into a storm of them.
    let mut pause = Duration::from_millis(20);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, vsock_handshake(uds, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => break,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    Err(LaunchError::AgentConnect(format!("vsock {} port {port}: {last}", uds.display())))
}

async fn vsock_handshake(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| format!("send CONNECT: {e}"))?;
    let mut line = Vec::with_capacity(MAX_VSOCK_ACK);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) => return Err("closed before OK (guest not listening yet)".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_VSOCK_ACK => return Err("answer too long".into()),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ").map(|p| p.trim().parse::<u32>()) {
        Some(Ok(_)) => Ok(s),
        _ => Err(format!("unexpected answer {text:?}")),
    }
}

// --- the jailer -------------------------------------------------------------

/// Where jailed VMs live (`--chroot-base-dir`).
const JAIL_BASE: &str = "/srv/jailer";

/// The parent cgroup of jailed VMMs (`--parent-cgroup`).
const JAIL_CGROUP_PARENT: &str = "tvm-firecracker";

/// Removes a jailed VM's chroot, cgroup and uid claim after the VMM is reaped.
#[derive(Debug)]
struct JailCleanup {
    paths: Vec<PathBuf>,
}

impl Drop for JailCleanup {
    fn drop(&mut self) {
        for p in &self.paths {
            crate::reaper::remove_leftover(p);
        }
    }
}

/// Claims a uid for a jailed VMM: `base + n`, unique among live VMs through
/// an exclusively created claim file in the runtime dir (removed with the VM).
fn claim_uid(runtime_dir: &Path, base: u32, id: &str) -> std::io::Result<(u32, PathBuf)> {
    let dir = runtime_dir.join("jail-uids");
    std::fs::create_dir_all(&dir)?;
    let start = id.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into())) % (1 << 22);
    for i in 0..(1u32 << 22) {
        let n = (start + i) % (1 << 22);
        let path = dir.join(n.to_string());
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => return Ok((base + (1 << 22) + n, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free uid for a jailed VMM"))
}

/// The jailer's argv (without the binary), per Firecracker's jailer docs.
pub fn jailer_args(exec_file: &Path, id: &str, uid: u32, gid: u32, memory_bytes: u64, pids: u64) -> Vec<String> {
    vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        exec_file.display().to_string(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        gid.to_string(),
        "--chroot-base-dir".into(),
        JAIL_BASE.into(),
        "--cgroup-version".into(),
        "2".into(),
        "--parent-cgroup".into(),
        JAIL_CGROUP_PARENT.into(),
        "--cgroup".into(),
        format!("memory.max={memory_bytes}"),
        "--cgroup".into(),
        format!("pids.max={pids}"),
        "--".into(),
        "--api-sock".into(),
        "/run/api.sock".into(),
        "--id".into(),
        id.into(),
    ]
}

impl Firecracker {
    /// Through the jailer: the chroot `<base>/firecracker/<id>/root` holds
    /// hard links (copies across filesystems) of the kernel, initramfs and
    /// image, owned by root and readable; the sockets and pipes are made by
    /// or for the jailed uid inside it. The jailer unshares a mount and pid
    /// view and drops to the uid; TVM adds a fresh network namespace.
    fn launch_jailed(
        &self,
        jailer: &Path,
        spec: &VmSpec,
        ctx: &LaunchContext<'_>,
    ) -> Result<Launch<Pending>, LaunchError> {
        let prep = |what| move |source| LaunchError::Prepare { what, source };
        let id = format!("tvm-{}", ctx.id);
        let exec =
            crate::cache::which_path(&self.binary).and_then(|p| std::fs::canonicalize(p).ok()).ok_or_else(|| {
                LaunchError::Prepare { what: "the firecracker binary", source: std::io::ErrorKind::NotFound.into() }
            })?;
        let name = exec.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "firecracker".into());
        let jail_dir = Path::new(JAIL_BASE).join(&name).join(&id);
        let root = jail_dir.join("root");
        let (uid, claim) = claim_uid(&self.runtime_dir, self.uid_base, ctx.id).map_err(prep("a uid for the jailer"))?;
        let cgroup = Path::new("/sys/fs/cgroup").join(JAIL_CGROUP_PARENT).join(&id);
        let cleanup = JailCleanup { paths: vec![jail_dir.clone(), cgroup.clone(), claim.clone()] };
        std::fs::create_dir_all(root.join("run")).map_err(prep("the jailer chroot"))?;
        let place = |src: &Path, name: &str| -> Result<String, LaunchError> {
            let dst = root.join(name);
            if std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst).map_err(prep("a file in the jailer chroot"))?;
            }
            Ok(format!("/{name}"))
        };
        let kernel = place(&spec.kernel, "vmlinux")?;
        let initrd = spec.initrd.as_deref().map(|p| place(p, "initrd.cpio")).transpose()?;
        let rootfs = spec.rootfs.as_deref().map(|p| place(p, "rootfs.erofs")).transpose()?;
        // A snapshot names these chroot paths, the same in every jail.
        let restore = match &self.restore {
            Some(from) => Some(snapshot::RestorePaths {
                snapshot: place(&from.snapshot, "template.vmstate")?,
                mem: place(&from.mem, "template.mem")?,
            }),
            None => None,
        };
        let (log_fifo, metrics_fifo) = (root.join("log.fifo"), root.join("metrics.fifo"));
        for f in [&log_fifo, &metrics_fifo] {
            mkfifo(f).map_err(prep("a jailer log pipe"))?;
            nix::unistd::chown(f, Some(uid.into()), Some(uid.into()))
                .map_err(|e| prep("a jailer log pipe")(e.into()))?;
        }
        nix::unistd::chown(&root.join("run"), Some(uid.into()), Some(uid.into()))
            .map_err(|e| prep("the jailer chroot")(e.into()))?;
        nix::unistd::chown(&root, Some(uid.into()), Some(uid.into()))
            .map_err(|e| prep("the jailer chroot")(e.into()))?;
        let paths = FcPaths {
            kernel,
            initrd,
            rootfs,
            vsock: "/vsock.sock".into(),
            log: "/log.fifo".into(),
            metrics: "/metrics.fifo".into(),
        };
        let requests = match &restore {
            None => boot_requests(spec, &paths),
            Some(from) => snapshot::restore_requests(spec.debug, &paths, from),
        };
        let files_dir = FilesDir { vmm: String::new(), host: root.clone() };
        let memory = (spec.memory_mib + crate::hostcg::VMM_OVERHEAD_MIB) << 20;
        let args = jailer_args(&exec, &id, uid, uid, memory, crate::hostcg::VMM_PIDS);
        info!(jail = %jail_dir.display(), uid, "firecracker runs through the jailer");
        Ok(Launch {
            program: jailer.to_path_buf(),
            args,
            // The jailer closes inherited descriptors: everything is in the chroot.
            files: None,
            own_dir: None,
            new_netns: true,
            // The jailer confines (chroot, uid, cgroups, namespaces); it needs root to do so.
            confine: false,
            leftovers: cleanup.paths.clone(),
            cleanup: Some(Box::new(cleanup)),
            pending: Pending {
                api_sock: root.join("run/api.sock"),
                vsock: spec.agent.map(|_| root.join("vsock.sock")),
                log_fifo,
                metrics_fifo,
                requests,
                files_dir,
            },
        })
    }
}

pub mod snapshot;

#[cfg(test)]
mod tests;
