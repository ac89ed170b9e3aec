//! Running one stage: spawn the command inside its cgroup, stream and cap
//! its output, enforce the wall and CPU limits, then kill whatever is left,
//! reap it and classify how the stage ended.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tvm_protocol::{Command, GuestMessage, OutputRecords, Stage, StageResult, StageStatus, Stream};

use crate::error::Error;
use crate::inbox::Inbox;
use crate::log::debug;
use crate::output::Capture;
use crate::relay::{Relay, OUTPUT_NODE, STREAM_NODES};
use crate::sandbox::{Cgroup, ChildSetup};

/// The job's working directory (a tmpfs owned by the runner).
pub const WORKDIR: &str = "/work";

/// Granularity of the supervision loop: how late a wall-clock kill or an
/// output-cap kill can be.
const TICK: Duration = Duration::from_millis(5);
/// How often `cpu.stat` is polled, so CPU burners spread over several
/// processes are stopped near the limit rather than at the end.
const CPU_POLL: Duration = Duration::from_millis(50);
/// How long a stage over its time limit gets between SIGTERM and SIGKILL.
/// Runtimes that buffer a stdout that is not a terminal (Ruby) flush it when terminated, so the
/// output printed before the limit is kept, as a terminal would have shown
/// it; a program that ignores SIGTERM only gains this much, and its verdict
/// stays `time_limit_exceeded`. The output cap kills at once (more output
/// is what it stops) and the OOM killer is the kernel's.
const TERM_GRACE: Duration = Duration::from_millis(500);
/// How long killed processes get to disappear. SIGKILL cannot be caught, so
/// only a task stuck in the kernel would take longer.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the output relay gets to drain the channel once every writer is
/// dead (then it sees end of file at once).
const READER_TIMEOUT: Duration = Duration::from_secs(2);

/// One stage to run.
#[derive(Debug)]
pub struct StageSpec<'a> {
    /// Which stage this is (labels the output).
    pub stage: Stage,
    /// Name of the stage's cgroup under the cgroup root.
    pub cgroup: &'a str,
    /// What to run, with its limits.
    pub command: &'a Command,
    /// Standard input; `None` gives the stage `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// Whether the host receives the output as it comes (the outbox reaches
    /// it): the result then does not repeat it ([`StageResult::streamed`]).
    /// `false` for tests, whose output streams nowhere.
    pub streamed: bool,
}

/// How the stage's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It was never reaped (stuck past [`KILL_TIMEOUT`]).
    Lost,
}

/// Checks a command before anything is spawned, so a bad job is reported as
/// such rather than as a failing program.
pub fn check_command(command: &Command) -> Result<(), Error> {
    if command.argv.is_empty() {
        return Err(Error::InvalidJob("a command has an empty argv".into()));
    }
    if command.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidJob("an argument contains a NUL byte".into()));
    }
    for (key, value) in &command.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(Error::InvalidJob(format!("invalid environment variable {key:?}")));
        }
    }
    Ok(())
}

/// Runs one stage to completion. Output chunks go to `outbox` as they are
/// produced; the returned result carries the capped output.
pub fn run(spec: StageSpec<'_>, outbox: &Sender<GuestMessage>) -> Result<StageResult, Error> {
    run_attached(spec, outbox, None)
}

/// [`run`] for an interactive job: the stage takes the host's signals from
/// `inbox`, and a run stage's stdin is the pipe the inbox feeds.
pub fn run_attached(
    spec: StageSpec<'_>,
    outbox: &Sender<GuestMessage>,
    inbox: Option<&Inbox>,
) -> Result<StageResult, Error> {
    check_command(spec.command)?;
    let cgroup = Cgroup::create(spec.cgroup, &spec.command.limits)?;
    mark(spec.stage, "cgroup");
    let result = supervise(spec, &cgroup, outbox, inbox);
    if let Some(inbox) = inbox {
        inbox.detach();
    }
    if result.is_err() {
        // Do not leave a job running behind an agent error.
        let _ = cgroup.kill();
    } else if let Err(e) = cgroup.remove() {
        debug!("keeping cgroup: {}", crate::error::chain(&e));
    }
    result
}

fn supervise(
    spec: StageSpec<'_>,
    cgroup: &Cgroup,
    outbox: &Sender<GuestMessage>,
    inbox: Option<&Inbox>,
) -> Result<StageResult, Error> {
    let limits = spec.command.limits;
    let session_stdin = inbox.is_some() && spec.stage == Stage::Run;
    let setup = ChildSetup::new(cgroup, &limits)?;
    let mut command = std::process::Command::new(&spec.command.argv[0]);
    command
        .args(&spec.command.argv[1..])
        .env_clear()
        .envs(spec.command.env.iter().map(|(k, v)| (k, v)))
        .current_dir(WORKDIR);
    // Our own pipe rather than Stdio::piped(): its mode must allow the job to
    // reopen it (`/dev/stdin`) before the program can start.
    let stdin_write = if spec.stdin.is_some() || session_stdin {
        let (read, write) = stdin_pipe()?;
        command.stdin(Stdio::from(read));
        Some(write)
    } else {
        command.stdin(Stdio::null());
        None
    };
    // Not Command::uid/gid: std applies those before pre_exec, and an
    // unprivileged child could no longer join the root-owned cgroup.
    // SAFETY: apply() makes only async-signal-safe system calls on data
    // prepared before the fork, as required in the child of a threaded process.
    unsafe {
        command.pre_exec(move || setup.apply());
    }

    // The relay runs before the program does: its thread waits in its read
    // when the program's first write comes (see `relay`).
    let Plumbing { relay, stdout_write, stderr_write } = Plumbing::take_spare().map_or_else(Plumbing::new, Ok)?;
    relay.configure(spec.stage, limits.output_bytes, outbox.clone(), !spec.streamed);
    command.stdout(Stdio::from(stdout_write)).stderr(Stdio::from(stderr_write));
    mark(spec.stage, "relay");

    if let Some(inbox) = inbox {
        inbox.begin_stage();
    }
    let started = Instant::now();
    let spawned = command.spawn();
    // The command holds the channel's writers: only the program may keep
    // them, or the relay would never see the end of its output.
    drop(command);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => return Ok(spawn_failure(&spec, &e, outbox)),
    };
    let main = Pid::from_raw(child.id() as i32);
    let exit_watch = ExitWatch::open(main);
    mark(spec.stage, "spawned");
    debug!("{:?} stage started as pid {main}", spec.stage);

    // The pipe is taken once, then given to the session's inbox or to a
    // writer thread (a tuple pattern with `take()` in it would drop the pipe,
    // closing stdin, whenever the pattern did not match).
    if let Some(pipe) = stdin_write {
        match inbox.filter(|_| session_stdin) {
            Some(inbox) => inbox.attach(pipe),
            None => {
                let data = spec.stdin.unwrap_or_default();
                let mut pipe = std::fs::File::from(pipe);
                // A thread, so a program that never reads its input cannot stall the
                // agent; dropping the pipe at the end sends EOF. Not joined: once the
                // stage's processes are dead its write fails with EPIPE and it ends.
                std::thread::Builder::new()
                    .name("stdin".into())
                    .spawn(move || {
                        let _ = pipe.write_all(&data);
                    })
                    .map_err(|e| Error::SpawnThread("stdin", e))?;
            }
        }
    }

    let wall_limit = Duration::from_millis(limits.wall_ms);
    let cpu_limit_us = limits.cpu_ms.saturating_mul(1000);
    // Why the stage is being stopped, since when, and whether SIGKILL is
    // still to come (it got SIGTERM and its grace).
    let mut killed: Option<(StageStatus, Instant, bool)> = None;
    let mut exit: Option<(Exit, Instant)> = None;
    let mut next_cpu_poll = started + CPU_POLL;
    loop {
        reap(main, &mut exit);
        if exit.is_some() {
            break;
        }
        if let Some(inbox) = inbox {
            for signal in inbox.take_signals() {
                debug!("{:?} stage: host sent signal {signal}", spec.stage);
                cgroup.signal(signal)?;
            }
        }
        let now = Instant::now();
        match killed {
            None => {
                let reason = if relay.overflowed() {
                    Some(StageStatus::OutputLimitExceeded)
                } else if now.duration_since(started) >= wall_limit {
                    Some(StageStatus::TimeLimitExceeded)
                } else if now >= next_cpu_poll {
                    next_cpu_poll = now + CPU_POLL;
                    (cgroup.cpu_usage_us()? > cpu_limit_us).then_some(StageStatus::TimeLimitExceeded)
                } else {
                    None
                };
                if let Some(status) = reason {
                    let graceful = status == StageStatus::TimeLimitExceeded;
                    // Out of time while held at the memory limit: the limit came first.
                    let status = if graceful && cgroup.held_at_memory_limit(limits.memory_bytes) {
                        StageStatus::MemoryLimitExceeded
                    } else {
                        status
                    };
                    debug!("{:?} stage: {status:?}, {}", spec.stage, if graceful { "terminating" } else { "killing" });
                    if graceful {
                        cgroup.signal(libc::SIGTERM)?;
                    } else {
                        cgroup.kill()?;
                    }
                    killed = Some((status, now, graceful));
                }
            }
            Some((status, at, true)) if now.duration_since(at) >= TERM_GRACE => {
                debug!("{:?} stage: still running after SIGTERM, killing", spec.stage);
                cgroup.kill()?;
                killed = Some((status, now, false));
            }
            Some((_, at, false)) if now.duration_since(at) > KILL_TIMEOUT => {
                debug!("{:?} stage: main process {main} did not die", spec.stage);
                exit = Some((Exit::Lost, now));
                break;
            }
            Some(_) => {}
        }
        exit_watch.sleep(TICK);
    }
    let (exit, ended) = exit.expect("the loop only ends with an exit");
    let wall_ms = ended.duration_since(started).as_millis() as u64;
    mark(spec.stage, "exited");

    // The main process is gone; anything it left behind (daemons, orphans
    // holding the output channel) goes with it.
    cgroup.kill()?;
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut scratch = None;
    // Reaping between waits: PID 1 inherits the stage's orphans.
    while !cgroup.wait_empty(TICK)? {
        reap(main, &mut scratch);
        if Instant::now() > deadline {
            debug!("{:?} stage: cgroup still populated after kill", spec.stage);
            break;
        }
    }
    reap(main, &mut scratch);
    mark(spec.stage, "emptied");

    // Every writer is dead: what the ring holds is all there will be.
    if !relay.wait_finished(READER_TIMEOUT) {
        debug!("{:?} stage: output relay not finished after {READER_TIMEOUT:?}", spec.stage);
    }
    mark(spec.stage, "drained");

    let cpu_us = cgroup.cpu_usage_us()?;
    // Output past the cap that the loop had not seen when the program
    // exited (the relay reads up to a window late) is past the cap all the
    // same: the verdict must not depend on that race.
    let killed =
        killed.map(|(status, _, _)| status).or_else(|| relay.overflowed().then_some(StageStatus::OutputLimitExceeded));
    let observed = Observed { killed, oom_kills: cgroup.oom_kills()?, cpu_us, cpu_limit_us, exit };
    let status = classify(&observed);
    let [(stdout, stdout_truncated), (stderr, stderr_truncated)] = relay.take();
    let result = StageResult {
        status,
        exit_code: match exit {
            Exit::Code(c) => Some(c),
            _ => None,
        },
        signal: match exit {
            Exit::Signal(s) => Some(s),
            _ => None,
        },
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        streamed: spec.streamed,
        wall_ms,
        cpu_ms: cpu_us / 1000,
        peak_memory_bytes: cgroup.memory_peak(),
    };
    mark(spec.stage, "accounted");
    debug!(
        "{:?} stage: {:?} exit={:?} wall={}ms cpu={}ms peak={}B",
        spec.stage, result.status, exit, result.wall_ms, result.cpu_ms, result.peak_memory_bytes
    );
    Ok(result)
}

/// A stage's output plumbing: a new output channel (its stdout and stderr
/// writers, for the program) and the relay whose thread waits in a read of
/// it (see [`Relay::spawn`]).
struct Plumbing {
    relay: Relay,
    stdout_write: OwnedFd,
    stderr_write: OwnedFd,
}

/// The plumbing made ahead of time ([`prepare_spare`]) for the next stage.
static SPARE: std::sync::Mutex<Option<Plumbing>> = std::sync::Mutex::new(None);

impl Plumbing {
    /// Opens a new channel: the reader first (which makes the channel the
    /// current one), then its two writers, which join it.
    fn new() -> Result<Self, Error> {
        use nix::fcntl::OFlag;
        let reader = open_node(OUTPUT_NODE, OFlag::O_RDONLY)?;
        let [stdout_write, stderr_write] = STREAM_NODES.map(|node| open_node(node, OFlag::O_WRONLY));
        let relay = Relay::spawn(reader)?;
        Ok(Self { relay, stdout_write: stdout_write?, stderr_write: stderr_write? })
    }

    fn take_spare() -> Option<Self> {
        SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Opens a node of the output channel, close-on-exec (the child's `dup2`
/// onto fd 1 or 2 clears the flag there only).
///
/// # Errors
/// [`Error::OutputChannel`] when the node cannot be opened (`ENOENT`: a guest
/// kernel without TVM's driver; `EMFILE`: the agent is out of descriptors).
fn open_node(node: &'static str, access: nix::fcntl::OFlag) -> Result<OwnedFd, Error> {
    use nix::fcntl::{open, OFlag};
    use std::os::fd::FromRawFd;
    let fd = open(node, access | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
        .map_err(|e| Error::OutputChannel(node, e))?;
    // SAFETY: a descriptor open(2) just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the next stage's output channel and relay thread now, while the agent waits
/// for its job (before `Ready`, and after a template's or a pool VM's
/// warm-up), so the job does not pay for a thread start and the relay's
/// start handshake (milliseconds under TCG). A template's clones inherit the
/// spare: its thread waits in its read in the saved state. Best effort:
/// a stage without a spare makes its own.
pub fn prepare_spare() {
    let mut spare = SPARE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if spare.is_none() {
        match Plumbing::new() {
            Ok(p) => *spare = Some(p),
            Err(e) => debug!("no spare output plumbing: {}", crate::error::chain(&e)),
        }
    }
}

/// A pidfd of a stage's main process: it becomes readable when the process
/// exits, so the supervisor wakes at the exit instead of at its next tick.
/// `None` when `pidfd_open(2)` is refused (then the supervisor just ticks).
struct ExitWatch(Option<OwnedFd>);

impl ExitWatch {
    fn open(pid: Pid) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        match libc::c_int::try_from(fd) {
            // SAFETY: a descriptor pidfd_open just returned, owned by nobody else.
            Ok(fd) if fd >= 0 => Self(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
            _ => {
                debug!(
                    "pidfd_open({pid}) failed: {}; exits are seen at the next tick",
                    std::io::Error::last_os_error()
                );
                Self(None)
            }
        }
    }

    /// Sleeps for `timeout`, or less if the process exits (or has exited).
    fn sleep(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        match &self.0 {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                // EINTR only shortens the sleep; the caller's loop checks again.
                let _ = poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX));
            }
            None => std::thread::sleep(timeout),
        }
    }
}

/// Marks the end of one of a stage's steps in the job's trace.
fn mark(stage: Stage, step: &str) {
    crate::trace::mark(&format!("{}.{step}", stage.as_str()));
}

/// The pipe for a stage's stdin, both ends close-on-exec (the child's
/// `dup2` onto fd 0 clears the flag there only): `(read end, write end)`.
///
/// The pipe's inode is made readable by the unprivileged job (`0444`), as a
/// pipe made by the user's own shell is: programs reopen `/dev/stdin`
/// (`/proc/self/fd/0`, which checks the inode's mode), and a root-owned
/// `0600` pipe answers them `EACCES`. Nobody else can reach the pipe: it
/// exists only as these descriptors.
///
/// # Errors
/// [`Error::StdinPipe`] when `pipe2(2)` fails (`EMFILE`/`ENFILE`: the agent
/// is out of descriptors) or its mode cannot be set.
fn stdin_pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    use nix::sys::stat::{fchmod, Mode};
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::StdinPipe)?;
    fchmod(read.as_raw_fd(), Mode::from_bits_truncate(0o444)).map_err(Error::StdinPipe)?;
    Ok((read, write))
}

/// Reaps every child that has exited. PID 1 inherits all orphans, so this
/// also collects the stage's grandchildren; the main process's status is
/// stored in `exit` when it comes by.
pub fn reap(main: Pid, exit: &mut Option<(Exit, Instant)>) {
    loop {
        // __WALL: also reap children created with clone() and an exit signal
        // other than SIGCHLD.
        match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => *exit = Some((Exit::Code(code), Instant::now())),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                *exit = Some((Exit::Signal(sig as i32), Instant::now()));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// What the agent saw of a stage, reduced to what decides its status.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    /// Why the agent killed the stage, if it did (first reason wins).
    pub killed: Option<StageStatus>,
    /// OOM kills in the stage's cgroup.
    pub oom_kills: u64,
    /// CPU time used by the stage.
    pub cpu_us: u64,
    /// Its CPU limit.
    pub cpu_limit_us: u64,
    /// How the main process ended.
    pub exit: Exit,
}

/// The stage's status. A kill by the agent names its own reason; otherwise
/// the OOM killer, then CPU overuse (cgroup accounting or the RLIMIT_CPU
/// signal), and only then the exit status count.
pub fn classify(o: &Observed) -> StageStatus {
    if let Some(status) = o.killed {
        return status;
    }
    if o.oom_kills > 0 {
        return StageStatus::MemoryLimitExceeded;
    }
    if o.cpu_us > o.cpu_limit_us || o.exit == Exit::Signal(libc::SIGXCPU) {
        return StageStatus::TimeLimitExceeded;
    }
    match o.exit {
        Exit::Code(0) => StageStatus::Ok,
        _ => StageStatus::Failed,
    }
}

/// The program could not be started at all (missing interpreter, not
/// executable...). Reported like a shell would: exit code 127 or 126 and a
/// message on standard error, since it is the job's command that is wrong.
fn spawn_failure(spec: &StageSpec<'_>, err: &std::io::Error, outbox: &Sender<GuestMessage>) -> StageResult {
    let code = if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    debug!("{:?} stage: cannot start {:?}: {err}", spec.stage, spec.command.argv[0]);
    let message = format!("tvm-agent: cannot start {:?}: {err}\n", spec.command.argv[0]);
    let mut capture = Capture::with(spec.command.limits.output_bytes, !spec.streamed);
    let kept = capture.push(message.as_bytes());
    if !kept.is_empty() {
        let mut records = OutputRecords::with_capacity(kept.len() + 8);
        records.push(Stream::Stderr, kept);
        let _ = outbox.send(GuestMessage::OutputRecords { stage: spec.stage, records: records.into_blob() });
    }
    let (stderr, stderr_truncated) = capture.take();
    StageResult {
        status: StageStatus::Failed,
        exit_code: Some(code),
        signal: None,
        stdout: Vec::new(),
        stderr,
        stdout_truncated: false,
        stderr_truncated,
        streamed: spec.streamed,
        wall_ms: 0,
        cpu_ms: 0,
        peak_memory_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tvm_protocol::Limits;

    fn observed(exit: Exit) -> Observed {
        Observed { killed: None, oom_kills: 0, cpu_us: 10_000, cpu_limit_us: 1_000_000, exit }
    }

    #[test]
    fn exit_status_decides_when_nothing_else_happened() {
        assert_eq!(classify(&observed(Exit::Code(0))), StageStatus::Ok);
        assert_eq!(classify(&observed(Exit::Code(1))), StageStatus::Failed);
        assert_eq!(classify(&observed(Exit::Signal(libc::SIGSEGV))), StageStatus::Failed);
        assert_eq!(classify(&observed(Exit::Lost)), StageStatus::Failed);
    }

    #[test]
    fn limits_outrank_the_exit_status() {
        let oom = Observed { oom_kills: 1, ..observed(Exit::Signal(libc::SIGKILL)) };
        assert_eq!(classify(&oom), StageStatus::MemoryLimitExceeded);
        let cpu = Observed { cpu_us: 1_000_001, ..observed(Exit::Code(0)) };
        assert_eq!(classify(&cpu), StageStatus::TimeLimitExceeded);
        assert_eq!(classify(&observed(Exit::Signal(libc::SIGXCPU))), StageStatus::TimeLimitExceeded);
        // The agent's own kill reason wins over what the kill caused.
        let killed =
            Observed { killed: Some(StageStatus::OutputLimitExceeded), oom_kills: 1, ..observed(Exit::Signal(9)) };
        assert_eq!(classify(&killed), StageStatus::OutputLimitExceeded);
    }

    #[test]
    fn commands_are_checked_before_spawning() {
        let limits = Limits {
            wall_ms: 1,
            cpu_ms: 1,
            memory_bytes: 1,
            pids: 1,
            output_bytes: 1,
            file_size_bytes: 1,
            open_files: 1,
        };
        let cmd = |argv: &[&str], env: &[(&str, &str)]| Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            limits,
        };
        assert!(check_command(&cmd(&["python3", "main.py"], &[("PATH", "/usr/bin"), ("EMPTY", "")])).is_ok());
        assert!(check_command(&cmd(&[], &[])).is_err());
        assert!(check_command(&cmd(&["a\0b"], &[])).is_err());
        assert!(check_command(&cmd(&["a"], &[("A=B", "c")])).is_err());
        assert!(check_command(&cmd(&["a"], &[("", "c")])).is_err());
        assert!(check_command(&cmd(&["a"], &[("A", "c\0")])).is_err());
    }
}
