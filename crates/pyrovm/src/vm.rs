//! One microVM: started, driven to agent-ready, given one job, destroyed.
//!
//! [`Vm`] owns every resource of a guest, whichever backend
//! ([`crate::backend::Vmm`]) started it: the VMM process (killed and reaped
//! on drop, and killed by the kernel via `PR_SET_PDEATHSIG` if `tvm` itself
//! dies), its host cgroups, its run directory, the agent channel and the
//! console reader. A `Vm` runs one job at most: [`Vm::execute`] consumes it.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tracing::{debug, info_span, warn, Instrument};
use tvm_protocol::{
    read_frame_async, write_frame_async, FrameDecoder, FrameError, GuestMessage, HostMessage, Job, JobResult, Stage,
    StageResult, Stream, Uniqueness, ENTROPY_BYTES, MAX_GUEST_FRAME, PROTOCOL_VERSION,
};

use crate::backend::{Console, LaunchContext, LaunchError, Vmm, VmmKind};
use crate::hostcg::{HostCgroups, VmCgroup, VmmLimits, VMM_OVERHEAD_MIB, VMM_PIDS};
use crate::jail::{ConfineVmmError, Confinement};
use crate::reaper::RunDir;
use crate::spec::VmSpec;

#[path = "session.rs"]
mod session;
pub use session::{SessionEvent, SessionInput};

/// Fresh entropy ([`ENTROPY_BYTES`] from the host's RNG) and the host clock
/// (Unix ns) for one job or resume: a VM restored from a template shares
/// both with its siblings until the agent applies these.
///
/// # Panics
/// If the host's random number generator fails: a VM that would run with
/// its template's RNG state must not start.
pub fn uniqueness() -> Uniqueness {
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    getrandom::fill(&mut entropy).expect("the host's random number generator works");
    let unix_time_ns =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    Uniqueness { entropy, unix_time_ns }
}

/// Why a VM could not be brought to agent-ready.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// The run directory or agent socketpair could not be created.
    #[error("cannot prepare VM run dir")]
    RunDir(#[source] std::io::Error),
    /// The VMM's host cgroup could not be created.
    #[error(transparent)]
    Cgroup(#[from] crate::hostcg::HostCgroupError),
    /// The VMM's descriptors or confinement could not be prepared.
    #[error(transparent)]
    Confine(#[from] ConfineVmmError),
    /// The backend could not prepare, configure or reach its VMM.
    #[error(transparent)]
    Backend(#[from] LaunchError),
    /// The VMM binary could not be started.
    #[error("cannot start {vmm} ({hint})")]
    Spawn {
        /// Binary.
        vmm: String,
        /// How to install it.
        hint: &'static str,
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
    #[error("guest broke the protocol")]
    Protocol(#[source] FrameError),
    /// The guest sent more output than any honest agent would.
    #[error("guest sent {0} output bytes, more than the caps allow; VM killed")]
    OutputFlood(u64),
    /// The agent reported it could not run the job.
    #[error("guest agent failed: {0}")]
    AgentFailed(String),
    /// Sending the job failed.
    #[error("cannot send job to guest")]
    Send(#[source] FrameError),
}

/// The host side of booting a VM: where run dirs live and how the VMM is
/// contained (the VMM itself is the backend passed to [`Vm::boot`]).
#[derive(Debug, Clone, Copy)]
pub struct VmmHost<'a> {
    /// Parent of the per-VM run dirs.
    pub runtime_dir: &'a Path,
    /// Host cgroups, when usable.
    pub host_cgroups: Option<&'a HostCgroups>,
    /// `Settings::vmm_uid_base` (0: the VMM keeps the invoking uid).
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
    vmm: VmmKind,
    // Backend resources that live as long as the channel (log drains).
    keep: Option<Box<dyn crate::backend::Keep>>,
    // Backend resources released after the VMM is reaped (a jailer's chroot).
    _cleanup: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    // After the VMM is reaped (Drop below), anything left in its cgroup is
    // killed and the cgroup removed.
    _cgroup: Option<VmCgroup>,
    // Dropped last: the socket lives inside it.
    _dir: RunDir,
}

impl Vm {
    /// Starts a VM under `backend` and waits until its agent reports ready.
    /// With host cgroups, the VMM runs in a cgroup of its own, capped at the
    /// guest's RAM plus [`VMM_OVERHEAD_MIB`]; it is confined as
    /// [`crate::jail`] says (unless the backend's jailer does it).
    ///
    /// # Errors
    /// [`StartVmError`]: run dir, cgroup, backend, spawn, boot timeout,
    /// kernel panic, early exit or a protocol mismatch.
    pub async fn boot<V: Vmm>(
        id: &str,
        host: &VmmHost<'_>,
        backend: &V,
        spec: &VmSpec,
        boot_timeout: Duration,
    ) -> Result<Vm, StartVmError> {
        Self::launch(id, host, backend, spec, boot_timeout, StartExtras::cold()).await
    }

    /// [`Vm::boot`] with the additions of `extras` (templates).
    pub(crate) async fn launch<V: Vmm>(
        id: &str,
        host: &VmmHost<'_>,
        backend: &V,
        spec: &VmSpec,
        boot_timeout: Duration,
        extras: StartExtras,
    ) -> Result<Vm, StartVmError> {
        let span = info_span!("vm", vm = %id, vmm = backend.kind().as_str(), accel = spec.accel.as_str(),
                              start = extras.kind().as_str());
        Self::boot_inner(id, host, backend, spec, boot_timeout, extras).instrument(span).await
    }

    async fn boot_inner<V: Vmm>(
        id: &str,
        host: &VmmHost<'_>,
        backend: &V,
        spec: &VmSpec,
        boot_timeout: Duration,
        extras: StartExtras,
    ) -> Result<Vm, StartVmError> {
        let start = extras.kind();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + boot_timeout;
        let dir = RunDir::create(host.runtime_dir, id).map_err(StartVmError::RunDir)?;
        let ctx = LaunchContext { id, run_dir: dir.path() };
        let mut launch = backend.launch(spec, &ctx)?;
        if !extras.fds.is_empty() || !extras.args.is_empty() {
            // Template additions name inherited descriptors by number.
            let files = launch.files.as_mut().ok_or(LaunchError::Unsupported {
                vmm: backend.kind().as_str(),
                what: "template descriptors (the VMM inherits none)",
            })?;
            files.inherit(extras.fds);
            launch.args.extend(extras.args);
        }
        if let Err(e) = dir.record_leftovers(&launch.leftovers) {
            warn!(error = %e, "cannot record the VM's leftovers for the reaper");
        }
        let cgroup = match host.host_cgroups.filter(|_| launch.confine) {
            Some(cgs) => {
                let limits = VmmLimits {
                    memory_bytes: (spec.memory_mib + VMM_OVERHEAD_MIB) << 20,
                    pids: VMM_PIDS,
                    // The vCPUs plus one for the VMM's main loop and I/O.
                    cpus: Some(spec.vcpus + 1),
                };
                Some(cgs.create_vm(id, limits)?)
            }
            None => None,
        };
        let confinement = if launch.confine {
            let paths = backend.host_paths(spec, &ctx);
            let files = launch.files.as_ref();
            let own = launch.own_dir.as_ref().map(|d| &d.fd);
            Some(Confinement::prepare(files, &paths, own, spec.accel, host.uid_base)?)
        } else {
            None
        };

        let mut cmd = std::process::Command::new(&launch.program);
        cmd.args(&launch.args)
            // Nothing of tvm's environment (API keys, tokens) reaches the
            // process a guest attacks first; only the run dir, which lets
            // operators and tests attribute a VMM (`/proc/PID/environ`).
            .env_clear()
            .env(crate::reaper::RUN_DIR_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let join = cgroup.as_ref().map(|c| c.joiner());
        let new_netns = launch.new_netns;
        // SAFETY: only async-signal-safe calls (open/write/close of the
        // prepared cgroup path, unshare, fcntl, fchown, set*id, prctl, setpgid,
        // getppid, landlock_restrict_self) between fork and exec.
        unsafe {
            let parent = std::process::id() as libc::pid_t;
            cmd.pre_exec(move || {
                // Joined before exec (and while still root), so no VMM thread ever runs outside its caps.
                if let Some(join) = &join {
                    join.join_self()?;
                }
                if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(c) = &confinement {
                    c.enter()?;
                }
                // After the uid change, which clears it. The VMM dies with us, even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent {
                    return Err(std::io::Error::other("parent died before exec"));
                }
                // Own process group: a terminal's Ctrl-C reaches tvm, which then tears down in order.
                libc::setpgid(0, 0);
                match &confinement {
                    Some(c) => c.lock(),
                    None => Ok(()),
                }
            });
        }
        let child = cmd.spawn().map_err(|source| StartVmError::Spawn {
            vmm: launch.program.display().to_string(),
            hint: backend.kind().install_hint(),
            source,
        })?;
        // The VMM holds its own copies now; ours of its end must go, so its exit reads as EOF.
        drop(cmd);
        let crate::backend::Launch { files, own_dir, cleanup, pending, .. } = launch;
        drop((files, own_dir));
        let mut vm_guard = PartialVm { child: Some(child), cleanup };
        let child = vm_guard.child.as_mut().expect("child present");
        if let Err(e) = dir.record_vmm(child.id()) {
            warn!(error = %e, "cannot record VMM pid for the reaper");
        }
        let console = Console::default();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            // A thread per pipe: it ends at EOF, i.e. when the VMM is gone.
            std::thread::spawn(move || console.drain(pipe));
        }

        // The backend configures its VMM and connects the agent channel; a
        // VMM that exits meanwhile ends the wait at once.
        let channel = {
            let connect = backend.agent_channel(pending, console.clone(), deadline);
            let exited = wait_exit(vm_guard.child.as_mut().expect("child present"));
            tokio::select! {
                c = tokio::time::timeout_at(deadline, connect) => match c {
                    Ok(c) => c?,
                    Err(_) => return Err(StartVmError::BootTimeout {
                        ms: boot_timeout.as_millis() as u64,
                        console: console.tail(),
                    }),
                },
                () = exited => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Err(match console.kernel_panic() {
                        Some(line) => StartVmError::KernelPanic { line },
                        None => StartVmError::Exited { console: console.tail() },
                    });
                }
            }
        };
        let mut stream = channel.stream;
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
                        console: console.tail(),
                    })
                }
            }
        }
        let ready =
            tokio::time::timeout_at(deadline, read_frame_async::<GuestMessage, _>(&mut stream, MAX_GUEST_FRAME));
        let guest_uptime_ms = match ready.await {
            Err(_) => {
                return Err(StartVmError::BootTimeout { ms: boot_timeout.as_millis() as u64, console: console.tail() })
            }
            Ok(Ok(None)) => {
                // Give the console reader a moment to collect the last words (a panic message).
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(match console.kernel_panic() {
                    Some(line) => StartVmError::KernelPanic { line },
                    None => StartVmError::Exited { console: console.tail() },
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
            vmm: backend.kind(),
            keep: channel.keep,
            _cleanup: vm_guard.cleanup.take(),
            _cgroup: cgroup,
            _dir: dir,
        })
    }

    /// The backend's state for this VM, if it is a `T` (see [`crate::backend::Keep`]).
    pub(crate) fn backend_state<T: 'static>(&mut self) -> Option<&mut T> {
        self.keep.as_deref_mut()?.as_any_mut().downcast_mut::<T>()
    }

    /// The VM id (also its run dir name and the VMM's instance name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VMM that runs this VM.
    pub fn vmm(&self) -> VmmKind {
        self.vmm
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
        self.console.tail()
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
        self,
        job: &Job,
        on_output: impl FnMut(Stage, Stream, &[u8]),
    ) -> Result<JobResult, RunJobError> {
        self.execute_each(job, on_output, |_, _| {}).await
    }

    /// [`Vm::execute`] for a job with [`Job::tests`] too: `on_test` sees each
    /// test's result (index, result) as it arrives, in order. The deadline
    /// grows with the number of tests.
    ///
    /// # Errors
    /// As [`Vm::execute`]; a test result out of order or beyond the job's
    /// tests is a protocol error.
    pub async fn execute_each(
        mut self,
        job: &Job,
        on_output: impl FnMut(Stage, Stream, &[u8]),
        on_test: impl FnMut(u32, StageResult),
    ) -> Result<JobResult, RunJobError> {
        self.run_job(job, on_output, on_test).await
    }

    /// [`Vm::execute_each`] without destroying the VM at the end: the caller
    /// drops it, e.g. off its response path (the server's `tear_down`). The
    /// VM has served its one job either way: never send it another.
    ///
    /// # Errors
    /// As [`Vm::execute_each`].
    pub async fn run_job(
        &mut self,
        job: &Job,
        mut on_output: impl FnMut(Stage, Stream, &[u8]),
        mut on_test: impl FnMut(u32, StageResult),
    ) -> Result<JobResult, RunJobError> {
        let span = info_span!("vm", vm = %self.id);
        async move {
            let tests = job.tests.len();
            let mut next_test: u32 = 0;
            let SentJob { deadline, deadline_ms, cap, mut decoder } =
                send_job(&mut self.stream, job, job.interactive).await?;
            let mut buf = vec![0u8; 64 << 10];
            let mut received: u64 = 0;
            let mut streamed = StreamedOutput::new(job);
            loop {
                while let Some(msg) = decoder.next_frame::<GuestMessage>().map_err(RunJobError::Protocol)? {
                    match msg {
                        GuestMessage::OutputRecords { stage, records } => {
                            each_record(&records, &mut received, cap, |stream, data| {
                                streamed.push(stage, stream, data);
                                on_output(stage, stream, data)
                            })?
                        }
                        GuestMessage::TestDone { index, result } => {
                            if index != next_test || index as usize >= tests {
                                return Err(RunJobError::Protocol(FrameError::Io(std::io::Error::other(format!(
                                    "test result {index} out of order (expected {next_test} of {tests})"
                                )))));
                            }
                            next_test += 1;
                            on_test(index, result);
                        }
                        GuestMessage::Done(mut result) => {
                            streamed.fill(&mut result);
                            return Ok(result);
                        }
                        GuestMessage::Failed { message } => return Err(RunJobError::AgentFailed(message)),
                        // Only interactive jobs report stages; this one is not.
                        GuestMessage::StageStarted { .. } | GuestMessage::StageExited { .. } => {}
                        GuestMessage::Ready { .. } | GuestMessage::Warmed { .. } => {
                            return Err(RunJobError::Protocol(FrameError::Io(std::io::Error::other(
                                "unexpected second ready (or warm-up report) during a job",
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
                    return Err(vm_gone(&self.console).await);
                }
                decoder.push(&buf[..n]);
            }
        }
        .instrument(span)
        .await
    }
}

/// The output of a job's stages as its frames carried it, for the results
/// of streamed stages, which do not repeat it (protocol 6,
/// [`StageResult::streamed`]). Each stream keeps at most its stage's cap,
/// whatever a guest sends.
#[derive(Debug)]
pub(super) struct StreamedOutput {
    /// `[compile, run]` × `[stdout, stderr]`.
    bytes: [[Vec<u8>; 2]; 2],
    /// Per-stream cap (bytes) of `[compile, run]`.
    caps: [u64; 2],
}

impl StreamedOutput {
    pub(super) fn new(job: &Job) -> Self {
        let compile = job.compile.as_ref().map_or(0, |c| c.limits.output_bytes);
        Self { bytes: Default::default(), caps: [compile, job.run.limits.output_bytes] }
    }

    fn stage_index(stage: Stage) -> usize {
        match stage {
            Stage::Compile => 0,
            Stage::Run => 1,
        }
    }

    /// Appends `data` of `stage`'s `stream`, up to the stage's cap.
    pub(super) fn push(&mut self, stage: Stage, stream: Stream, data: &[u8]) {
        let i = Self::stage_index(stage);
        let buf = &mut self.bytes[i][usize::from(stream == Stream::Stderr)];
        let room = usize::try_from(self.caps[i].saturating_sub(buf.len() as u64)).unwrap_or(usize::MAX);
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Gives each streamed stage of `result` the output its frames carried.
    pub(super) fn fill(mut self, result: &mut JobResult) {
        for (i, stage) in [&mut result.compile, &mut result.run].into_iter().enumerate() {
            if let Some(stage) = stage.as_mut().filter(|s| s.streamed) {
                let [stdout, stderr] = std::mem::take(&mut self.bytes[i]);
                stage.stdout = stdout;
                stage.stderr = stderr;
            }
        }
    }
}

/// Calls `each(stream, bytes)` for the records of a
/// [`GuestMessage::OutputRecords`] frame, in order, counting their bytes
/// into `received`.
///
/// # Errors
/// [`RunJobError::Protocol`] when the records are malformed,
/// [`RunJobError::OutputFlood`] when `received` goes past `cap`.
pub(super) fn each_record(
    records: &[u8],
    received: &mut u64,
    cap: u64,
    mut each: impl FnMut(Stream, &[u8]),
) -> Result<(), RunJobError> {
    let records =
        tvm_protocol::OutputRecords::parse(records).map_err(|why| RunJobError::Protocol(FrameError::Raw(why)))?;
    for (stream, data) in records {
        *received += data.len() as u64;
        if *received > cap {
            return Err(RunJobError::OutputFlood(*received));
        }
        each(stream, data);
    }
    Ok(())
}

/// A job sent to the agent: what the host needs to read its answer.
pub(super) struct SentJob {
    /// When the host gives up on the job, whatever the guest does.
    pub deadline: tokio::time::Instant,
    /// That deadline, ms after sending (for [`RunJobError::Deadline`]).
    pub deadline_ms: u64,
    /// Most output bytes the host accepts for the job.
    pub cap: u64,
    /// Decoder for the guest's frames, sized from the job's own caps.
    pub decoder: FrameDecoder,
}

/// Sends `job` over `wr` with fresh uniqueness (and `interactive` as
/// given), and sizes the host's side of it: a deadline of twice the stages'
/// and tests' wall limits plus 15 s, an output cap of twice the stages'
/// output caps plus 1 MiB, and a frame limit that fits a `Done` repeating
/// that output.
///
/// # Errors
/// [`RunJobError::Send`] when the frame cannot be written.
pub(super) async fn send_job(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    job: &Job,
    interactive: bool,
) -> Result<SentJob, RunJobError> {
    let stages = job.compile.iter().chain(std::iter::once(&job.run));
    let tests_wall = job.tests.len() as u64 * job.run.limits.wall_ms;
    let wall: u64 = stages.clone().map(|c| c.limits.wall_ms).sum::<u64>() + tests_wall;
    // Generous slack over the guest's own limits: under TCG the guest clock runs slow.
    let deadline_ms = wall * 2 + 15_000;
    let cap: u64 = stages.map(|c| c.limits.output_bytes * 2).sum::<u64>() + (1 << 20);
    // Fresh entropy and clock for every job: a VM restored from a
    // template shares both with its siblings until the agent applies these.
    let mut job = job.clone();
    job.interactive = interactive;
    job.uniqueness = Some(uniqueness());
    write_frame_async(wr, &HostMessage::Run(job)).await.map_err(RunJobError::Send)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(deadline_ms);
    // `Done` repeats the captured output (base64), so its frame may exceed the chunk-sized
    // limit; size the limit from this job's own caps, never from anything the guest says.
    let max_frame = MAX_GUEST_FRAME.max(cap as usize * 4 / 3 + (64 << 10));
    Ok(SentJob { deadline, deadline_ms, cap, decoder: FrameDecoder::new(max_frame) })
}

/// Why the guest hung up mid-job: a kernel panic on the console, else the
/// console's tail (after a moment, so the last lines have arrived).
pub(super) async fn vm_gone(console: &Console) -> RunJobError {
    tokio::time::sleep(Duration::from_millis(100)).await;
    match console.kernel_panic() {
        Some(line) => RunJobError::KernelPanic { line },
        None => RunJobError::Exited { console: console.tail() },
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let t = Instant::now();
        kill_and_reap(&mut self.child);
        debug!(vm = %self.id, kill_us = t.elapsed().as_micros() as u64, "VMM killed and reaped");
    }
}

/// Holds the child during boot so every early return kills it (and then
/// releases the backend's resources).
struct PartialVm {
    child: Option<std::process::Child>,
    cleanup: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
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

/// Resolves when `child` has exited (polled: a boot lasts seconds at most).
async fn wait_exit(child: &mut std::process::Child) {
    while let Ok(None) = child.try_wait() {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage_result(stdout: &[u8], streamed: bool) -> StageResult {
        StageResult {
            status: tvm_protocol::StageStatus::Ok,
            exit_code: Some(0),
            signal: None,
            stdout: stdout.to_vec(),
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            streamed,
            wall_ms: 1,
            cpu_ms: 1,
            peak_memory_bytes: 1,
        }
    }

    /// Protocol 6: a streamed stage's result is what its frames carried,
    /// each stream at most its stage's cap whatever the guest sends; a stage
    /// that did not stream (tests) keeps the bytes of its result.
    #[test]
    fn streamed_stages_get_their_output_from_the_frames_within_the_caps() {
        let limits = |output_bytes| tvm_protocol::Limits {
            wall_ms: 1000,
            cpu_ms: 1000,
            memory_bytes: 1 << 20,
            pids: 8,
            output_bytes,
            file_size_bytes: 1 << 20,
            open_files: 64,
        };
        let command =
            |output_bytes| tvm_protocol::Command { argv: vec!["x".into()], env: vec![], limits: limits(output_bytes) };
        let job = Job {
            files: vec![],
            compile: Some(command(4)),
            run: command(10),
            stdin: vec![],
            workdir_bytes: 1 << 20,
            uniqueness: None,
            interactive: false,
            tests: vec![],
        };
        let mut out = StreamedOutput::new(&job);
        out.push(Stage::Run, Stream::Stdout, b"hello ");
        out.push(Stage::Compile, Stream::Stderr, b"warning: x\n");
        out.push(Stage::Run, Stream::Stderr, b"e");
        out.push(Stage::Run, Stream::Stdout, b"world, and more than the cap");
        let mut result = JobResult {
            verdict: tvm_protocol::Verdict::Ok,
            compile: Some(stage_result(b"", true)),
            run: Some(stage_result(b"", true)),
            trace: vec![],
        };
        out.fill(&mut result);
        let (compile, run) = (result.compile.unwrap(), result.run.unwrap());
        assert_eq!((compile.stdout.as_slice(), compile.stderr.as_slice()), (&b""[..], &b"warn"[..]));
        assert_eq!((run.stdout.as_slice(), run.stderr.as_slice()), (&b"hello worl"[..], &b"e"[..]));

        let mut tests_job = JobResult {
            verdict: tvm_protocol::Verdict::Ok,
            compile: None,
            run: Some(stage_result(b"from the result", false)),
            trace: vec![],
        };
        let mut out = StreamedOutput::new(&job);
        out.push(Stage::Run, Stream::Stdout, b"stray frame");
        out.fill(&mut tests_job);
        assert_eq!(tests_job.run.unwrap().stdout, b"from the result");
    }

    #[test]
    fn uniqueness_is_fresh_each_time() {
        let (a, b) = (uniqueness(), uniqueness());
        assert_eq!(a.entropy.len(), ENTROPY_BYTES);
        assert_ne!(a.entropy, b.entropy);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert!(now.abs_diff(a.unix_time_ns) < 5_000_000_000);
    }
}
