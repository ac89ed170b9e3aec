//! One microVM: started, driven to agent-ready, given one job, destroyed.
//!
//! [`Vm`] owns every resource of a guest: the VMM process (killed and reaped
//! on drop, and killed by the kernel via `PR_SET_PDEATHSIG` if `tvm` itself
//! dies), its host cgroups, its run directory, the agent channel (a
//! socketpair) and the console reader.
//! A `Vm` runs one job at most: [`Vm::execute`] consumes it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tracing::{debug, info_span, warn, Instrument};
use tvm_protocol::{
    read_frame_async, write_frame_async, FrameDecoder, FrameError, GuestMessage, HostMessage, Job, JobResult, Stage,
    Stream, Uniqueness, MAX_GUEST_FRAME, PROTOCOL_VERSION,
};

use crate::hostcg::{HostCgroups, VmCgroup, VmmLimits, VMM_PIDS};
use crate::jail::{ConfineVmmError, Confinement, VmmFiles};
use crate::qemu::{qemu_args, VmSpec};
use crate::reaper::RunDir;

/// Host memory a VMM may use beyond its guest's RAM: QEMU itself, device
/// buffers and, under TCG, the translation cache (measured at ~100 MiB for
/// a Python job; the rest is margin, the cap is against runaways).
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// Bytes of serial console kept for diagnostics (the tail).
const CONSOLE_KEEP: usize = 16 << 10;

/// Why a VM could not be brought to agent-ready.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// The run directory or agent socketpair could not be created.
    #[error("cannot prepare VM run dir: {0}")]
    RunDir(#[source] std::io::Error),
    /// The VMM's host cgroup could not be created.
    #[error(transparent)]
    Cgroup(#[from] crate::hostcg::HostCgroupError),
    /// The VMM's descriptors or confinement could not be prepared.
    #[error(transparent)]
    Confine(#[from] ConfineVmmError),
    /// The VMM binary could not be started.
    #[error("cannot start {vmm}: {source} (install it with `apt-get install qemu-system-x86`)")]
    Spawn {
        /// Binary.
        vmm: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not report ready in time.
    #[error("guest did not become ready within {ms} ms; console: {console}")]
    BootTimeout {
        /// Timeout.
        ms: u64,
        /// Console tail.
        console: String,
    },
    /// The guest kernel panicked before the agent was ready.
    #[error("guest kernel panicked during boot: {line}")]
    KernelPanic {
        /// The panic line from the console.
        line: String,
    },
    /// The VMM exited or the guest hung up before ready.
    #[error("VM exited during boot; console: {console}")]
    Exited {
        /// Console tail.
        console: String,
    },
    /// The agent spoke, but not the expected protocol.
    #[error("guest agent protocol error during boot: {0}")]
    Protocol(String),
}

/// Why a job did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum RunJobError {
    /// The host-side deadline passed; the VM was killed.
    #[error("guest did not finish within the host deadline of {ms} ms; VM killed")]
    Deadline {
        /// Deadline.
        ms: u64,
    },
    /// The guest kernel panicked (the VM is gone).
    #[error("guest kernel panicked: {line}")]
    KernelPanic {
        /// The panic line from the console.
        line: String,
    },
    /// The VM went away before reporting a result.
    #[error("VM exited before reporting a result; console: {console}")]
    Exited {
        /// Console tail.
        console: String,
    },
    /// The guest sent something malformed or oversized.
    #[error("guest broke the protocol: {0}")]
    Protocol(#[source] FrameError),
    /// The guest sent more output than any honest agent would.
    #[error("guest sent {0} output bytes, more than the caps allow; VM killed")]
    OutputFlood(u64),
    /// The agent reported it could not run the job.
    #[error("guest agent failed: {0}")]
    AgentFailed(String),
    /// Sending the job failed.
    #[error("cannot send job to guest: {0}")]
    Send(#[source] FrameError),
}

type Console = Arc<Mutex<VecDeque<u8>>>;

/// The guest kernel's panic line, if the console shows one. The kernel prints
/// it at KERN_EMERG, so it appears even with `quiet loglevel=1`.
fn kernel_panic(c: &Console) -> Option<String> {
    let buf = c.lock().map(|b| b.iter().copied().collect::<Vec<u8>>()).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().chars().take(300).collect())
}

fn console_tail(c: &Console) -> String {
    let buf = c.lock().map(|b| b.iter().copied().collect::<Vec<u8>>()).unwrap_or_default();
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(12)..].join(" | ");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// The host side of booting a VM: which VMM binary, where run dirs live,
/// and how the VMM is contained.
#[derive(Debug, Clone, Copy)]
pub struct VmmHost<'a> {
    /// The VMM binary (`qemu-system-x86_64`).
    pub vmm: &'a Path,
    /// Parent of the per-VM run dirs.
    pub runtime_dir: &'a Path,
    /// Host cgroups, when usable.
    pub host_cgroups: Option<&'a HostCgroups>,
    /// `Settings::vmm_uid_base` (0: QEMU keeps the invoking uid).
    pub uid_base: u32,
}

/// How a VM came to agent-ready (`--json`, metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// Booted the kernel from scratch.
    Cold,
    /// Restored from a template (a snapshot of a booted, prewarmed VM).
    Template,
    /// Taken from the warm pool (itself restored or booted ahead of time).
    Pool,
}

impl StartKind {
    /// `cold`, `template` or `pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Template => "template",
            StartKind::Pool => "pool",
        }
    }
}

/// What a start adds to a plain cold boot (see [`crate::template`]): more
/// inherited descriptors with the VMM arguments naming them, and for a
/// restore the `Resume` handshake that replaces waiting for the boot's `Ready`.
#[derive(Debug)]
pub(crate) struct StartExtras {
    /// Descriptors the VMM inherits; `args` names them by number.
    pub fds: Vec<OwnedFd>,
    /// Appended to the VMM's arguments.
    pub args: Vec<String>,
    /// `Some`: a restore; send `Resume` with this, then wait for `Ready`.
    pub resume: Option<Uniqueness>,
}

impl StartExtras {
    /// A plain cold boot.
    pub fn cold() -> Self {
        Self { fds: Vec::new(), args: Vec::new(), resume: None }
    }

    fn kind(&self) -> StartKind {
        if self.resume.is_some() {
            StartKind::Template
        } else {
            StartKind::Cold
        }
    }
}

/// A running guest whose agent is ready for its one job.
#[derive(Debug)]
pub struct Vm {
    id: String,
    child: std::process::Child,
    pub(crate) stream: UnixStream,
    console: Console,
    started: Instant,
    boot: Duration,
    guest_uptime_ms: u64,
    start: StartKind,
    // After the VMM is reaped (Drop below), anything left in its cgroup is
    // killed and the cgroup removed.
    _cgroup: Option<VmCgroup>,
    // Dropped last: the socket lives inside it.
    _dir: RunDir,
}

impl Vm {
    /// Starts a VM and waits until its agent reports ready. With host
    /// cgroups, the VMM runs in a cgroup of its own, capped at the guest's
    /// RAM plus [`VMM_OVERHEAD_MIB`]; it is confined as [`crate::jail`] says.
    pub async fn boot(id: &str, host: &VmmHost<'_>, spec: &VmSpec, boot_timeout: Duration) -> Result<Vm, StartVmError> {
        Self::launch(id, host, spec, boot_timeout, StartExtras::cold()).await
    }

    /// [`Vm::boot`] with the additions of `extras` (templates).
    pub(crate) async fn launch(
        id: &str,
        host: &VmmHost<'_>,
        spec: &VmSpec,
        boot_timeout: Duration,
        extras: StartExtras,
    ) -> Result<Vm, StartVmError> {
        let span = info_span!("vm", vm = %id, accel = spec.accel.as_str(), start = extras.kind().as_str());
        Self::boot_inner(id, host, spec, boot_timeout, extras).instrument(span).await
    }

    async fn boot_inner(
        id: &str,
        host: &VmmHost<'_>,
        spec: &VmSpec,
        boot_timeout: Duration,
        extras: StartExtras,
    ) -> Result<Vm, StartVmError> {
        let start = extras.kind();
        let started = Instant::now();
        let dir = RunDir::create(host.runtime_dir, id).map_err(StartVmError::RunDir)?;
        let cgroup = match host.host_cgroups {
            Some(cgs) => {
                let limits = VmmLimits {
                    memory_bytes: (spec.memory_mib + VMM_OVERHEAD_MIB) << 20,
                    pids: VMM_PIDS,
                    // The vCPUs plus one for QEMU's main loop and I/O.
                    cpus: Some(spec.vcpus + 1),
                };
                Some(cgs.create_vm(id, limits)?)
            }
            None => None,
        };
        // The agent channel is a connected socketpair: QEMU inherits one end,
        // so there is no socket file to race for, guess or leave behind.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartVmError::RunDir)?;
        ours.set_nonblocking(true).map_err(StartVmError::RunDir)?;
        let stream = UnixStream::from_std(ours).map_err(StartVmError::RunDir)?;
        let mut files = VmmFiles::open(spec, Some(theirs.into()))?;
        files.inherit(extras.fds);
        let confinement = Confinement::prepare(&files, host.vmm, spec.accel, host.uid_base)?;

        let mut cmd = std::process::Command::new(host.vmm);
        cmd.args(qemu_args(spec, &files.io()))
            .args(&extras.args)
            .arg("-name")
            .arg(format!("tvm-{id}"))
            // Nothing of tvm's environment (API keys, tokens) reaches the
            // process a guest attacks first; only the run dir, which lets
            // operators and tests attribute a VMM (`/proc/PID/environ`).
            .env_clear()
            .env(crate::reaper::RUN_DIR_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let join = cgroup.as_ref().map(|c| c.joiner());
        // SAFETY: only async-signal-safe calls (open/write/close of the
        // prepared cgroup path, fcntl, set*id, prctl, setpgid, getppid,
        // landlock_restrict_self) between fork and exec.
        unsafe {
            let parent = std::process::id() as libc::pid_t;
            cmd.pre_exec(move || {
                // Joined before exec (and while still root), so no QEMU thread ever runs outside its caps.
                if let Some(join) = &join {
                    join.join_self()?;
                }
                confinement.enter()?;
                // After the uid change, which clears it. The VMM dies with us, even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent {
                    return Err(std::io::Error::other("parent died before exec"));
                }
                // Own process group: a terminal's Ctrl-C reaches tvm, which then tears down in order.
                libc::setpgid(0, 0);
                confinement.lock()
            });
        }
        let mut child =
            cmd.spawn().map_err(|source| StartVmError::Spawn { vmm: host.vmm.display().to_string(), source })?;
        // QEMU holds its own copies now; ours of its end must go, so its exit reads as EOF.
        drop(cmd);
        drop(files);
        if let Err(e) = dir.record_vmm(child.id()) {
            warn!(error = %e, "cannot record VMM pid for the reaper");
        }
        let console: Console = Arc::new(Mutex::new(VecDeque::with_capacity(CONSOLE_KEEP)));
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            // A thread per pipe: it ends at EOF, i.e. when the VMM is gone.
            std::thread::spawn(move || drain_into(pipe, &console));
        }
        let mut vm_guard = PartialVm { child: Some(child) };

        let deadline = tokio::time::Instant::now() + boot_timeout;
        let mut stream = stream;
        if let Some(fresh) = extras.resume {
            // Queued in the socket until the restored guest runs and reads it.
            let msg = HostMessage::Resume(fresh);
            let resume = write_frame_async(&mut stream, &msg);
            match tokio::time::timeout_at(deadline, resume).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartVmError::Protocol(format!("sending resume: {e}"))),
                Err(_) => {
                    return Err(StartVmError::BootTimeout {
                        ms: boot_timeout.as_millis() as u64,
                        console: console_tail(&console),
                    })
                }
            }
        }
        let ready =
            tokio::time::timeout_at(deadline, read_frame_async::<GuestMessage, _>(&mut stream, MAX_GUEST_FRAME));
        let guest_uptime_ms = match ready.await {
            Err(_) => {
                return Err(StartVmError::BootTimeout {
                    ms: boot_timeout.as_millis() as u64,
                    console: console_tail(&console),
                })
            }
            Ok(Ok(None)) => {
                // Give the console reader a moment to collect the last words (a panic message).
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(match kernel_panic(&console) {
                    Some(line) => StartVmError::KernelPanic { line },
                    None => StartVmError::Exited { console: console_tail(&console) },
                });
            }
            Ok(Err(e)) => return Err(StartVmError::Protocol(e.to_string())),
            Ok(Ok(Some(GuestMessage::Ready { protocol, uptime_ms, .. }))) => {
                if protocol != PROTOCOL_VERSION {
                    return Err(StartVmError::Protocol(format!(
                        "agent speaks protocol {protocol}, host {PROTOCOL_VERSION}; rebuild the agent"
                    )));
                }
                uptime_ms
            }
            Ok(Ok(Some(other))) => return Err(StartVmError::Protocol(format!("expected ready, got {other:?}"))),
        };
        let boot = started.elapsed();
        debug!(boot_ms = boot.as_millis() as u64, guest_uptime_ms, "agent ready");
        Ok(Vm {
            id: id.to_string(),
            child: vm_guard.child.take().expect("child present"),
            stream,
            console,
            started,
            boot,
            guest_uptime_ms,
            start,
            _cgroup: cgroup,
            _dir: dir,
        })
    }

    /// The VM id (also its run dir name and QEMU `-name`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Time from VMM start to agent-ready (for a restore: restore-to-ready).
    pub fn boot_time(&self) -> Duration {
        self.boot
    }

    /// How this VM came to agent-ready.
    pub fn start_kind(&self) -> StartKind {
        self.start
    }

    /// The VMM's pid (host RSS figures in `tvm bench`).
    pub fn vmm_pid(&self) -> u32 {
        self.child.id()
    }

    /// The console tail, for diagnostics.
    pub(crate) fn console(&self) -> String {
        console_tail(&self.console)
    }

    /// Guest uptime when the agent was ready (kernel boot + agent setup).
    pub fn guest_uptime_ms(&self) -> u64 {
        self.guest_uptime_ms
    }

    /// How long this VM has existed.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs `job`, calling `on_output` for every output chunk as it arrives,
    /// and destroys the VM. The host enforces its own deadline and output cap
    /// whatever the guest does.
    pub async fn execute(
        mut self,
        job: &Job,
        mut on_output: impl FnMut(Stage, Stream, &[u8]),
    ) -> Result<JobResult, RunJobError> {
        let span = info_span!("vm", vm = %self.id);
        async move {
            let stages = job.compile.iter().chain(std::iter::once(&job.run));
            let wall: u64 = stages.clone().map(|c| c.limits.wall_ms).sum();
            // Generous slack over the guest's own limits: under TCG the guest clock runs slow.
            let deadline_ms = wall * 2 + 15_000;
            let cap: u64 = stages.map(|c| c.limits.output_bytes * 2).sum::<u64>() + (1 << 20);
            // Fresh entropy and clock for every job: a VM restored from a
            // template shares both with its siblings until the agent applies these.
            let mut job = job.clone();
            job.uniqueness = Some(crate::template::uniqueness());
            write_frame_async(&mut self.stream, &HostMessage::Run(job)).await.map_err(RunJobError::Send)?;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(deadline_ms);
            // `Done` repeats the captured output (base64), so its frame may exceed the chunk-sized
            // limit; size the limit from this job's own caps, never from anything the guest says.
            let max_frame = MAX_GUEST_FRAME.max(cap as usize * 4 / 3 + (64 << 10));
            let mut decoder = FrameDecoder::new(max_frame);
            let mut buf = vec![0u8; 64 << 10];
            let mut received: u64 = 0;
            loop {
                while let Some(msg) = decoder.next_frame::<GuestMessage>().map_err(RunJobError::Protocol)? {
                    match msg {
                        GuestMessage::Output { stage, stream, data } => {
                            received += data.len() as u64;
                            if received > cap {
                                return Err(RunJobError::OutputFlood(received));
                            }
                            on_output(stage, stream, &data);
                        }
                        GuestMessage::Done(result) => return Ok(result),
                        GuestMessage::Failed { message } => return Err(RunJobError::AgentFailed(message)),
                        GuestMessage::Ready { .. } | GuestMessage::Warmed { .. } => {
                            return Err(RunJobError::Protocol(FrameError::Io(std::io::Error::other(
                                "unexpected ready or warm-up report during a job",
                            ))))
                        }
                    }
                }
                let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                    Err(_) => return Err(RunJobError::Deadline { ms: deadline_ms }),
                    Ok(Err(e)) => return Err(RunJobError::Protocol(FrameError::Io(e))),
                    Ok(Ok(n)) => n,
                };
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Err(match kernel_panic(&self.console) {
                        Some(line) => RunJobError::KernelPanic { line },
                        None => RunJobError::Exited { console: console_tail(&self.console) },
                    });
                }
                decoder.push(&buf[..n]);
            }
        }
        .instrument(span)
        .await
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Holds the child during boot so every early return kills it.
struct PartialVm {
    child: Option<std::process::Child>,
}

impl Drop for PartialVm {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill_and_reap(c);
        }
    }
}

fn kill_and_reap(child: &mut std::process::Child) {
    let _ = child.kill();
    // SIGKILL cannot be caught: this wait is short and leaves no zombie.
    let _ = child.wait();
}

fn drain_into(mut r: Box<dyn std::io::Read + Send>, console: &Console) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Ok(mut c) = console.lock() {
            c.extend(&buf[..n]);
            let excess = c.len().saturating_sub(CONSOLE_KEEP);
            c.drain(..excess);
        }
    }
}
