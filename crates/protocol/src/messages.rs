//! Message types exchanged between the host and the guest agent.

use serde::{Deserialize, Serialize};

/// Bytes carried as base64 inside JSON.
pub mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises bytes as a base64 string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    /// Parses a base64 string into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// The records of [`GuestMessage::OutputRecords`], in order: `(stream,
/// bytes)`. Built with [`OutputRecords::push`] (which merges consecutive
/// bytes of one stream into one record); read with [`OutputRecords::parse`],
/// which treats the blob as hostile (it comes from the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRecords {
    blob: Vec<u8>,
    /// Where the newest record's header starts, if any.
    last: Option<usize>,
    bytes: usize,
}

/// A record header: stream byte and big-endian `u32` length.
const RECORD_HEADER: usize = 5;

impl OutputRecords {
    /// An empty set with room for `capacity` bytes of records.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { blob: Vec::with_capacity(capacity), last: None, bytes: 0 }
    }

    /// Appends `bytes` of `stream`, into the newest record if it is of the same stream.
    pub fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let tag = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        };
        let at = match self.last {
            Some(at) if self.blob[at] == tag => at,
            _ => {
                let at = self.blob.len();
                self.blob.extend_from_slice(&[tag, 0, 0, 0, 0]);
                self.last = Some(at);
                at
            }
        };
        self.blob.extend_from_slice(bytes);
        let len = u32::try_from(self.blob.len() - at - RECORD_HEADER).expect("records stay far below 4 GiB");
        self.blob[at + 1..at + RECORD_HEADER].copy_from_slice(&len.to_be_bytes());
        self.bytes += bytes.len();
    }

    /// Output bytes held (headers not counted).
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether no output is held.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The wire form, for [`GuestMessage::OutputRecords`].
    pub fn into_blob(self) -> Vec<u8> {
        self.blob
    }

    /// The records of a wire form, in order.
    ///
    /// # Errors
    /// A one-line reason when the blob is not a sequence of whole records.
    pub fn parse(blob: &[u8]) -> Result<Vec<(Stream, &[u8])>, &'static str> {
        let mut out = Vec::new();
        let mut rest = blob;
        while !rest.is_empty() {
            let [tag, a, b, c, d, tail @ ..] = rest else {
                return Err("an output record cut inside its header");
            };
            let stream = match tag {
                0 => Stream::Stdout,
                1 => Stream::Stderr,
                _ => return Err("an output record of an unknown stream"),
            };
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            if tail.len() < len {
                return Err("an output record longer than its frame");
            }
            out.push((stream, &tail[..len]));
            rest = &tail[len..];
        }
        Ok(out)
    }
}

/// Host → guest.
// One `Run` per VM, serialised at once: boxing the job would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// The one job this VM will ever run.
    Run(Job),
    /// Template build only: run this warm-up command (as the job user, in a
    /// throwaway cgroup and work dir), wipe what it left in RAM, answer
    /// [`GuestMessage::Warmed`] and wait for the next message. The host then
    /// pauses the VM and saves it as a template.
    Prewarm(Command),
    /// This VM was just restored from a template: apply the fresh entropy and
    /// clock, then answer [`GuestMessage::Ready`] again (the restored guest's
    /// proof of life) and wait for [`HostMessage::Run`].
    Resume(Uniqueness),
    /// Interactive jobs only ([`Job::interactive`]): bytes for the run
    /// stage's standard input (at most [`STDIN_CHUNK`]). Sent any time after
    /// `Run`; what arrives before the run stage starts (or faster than it
    /// reads) is buffered by the agent up to [`MAX_STDIN_PENDING`] bytes.
    Stdin {
        /// Raw bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Interactive jobs only: close the run stage's standard input once
    /// everything sent before it is written.
    StdinEof,
    /// Interactive jobs only: deliver this signal number (1 to 31) to every
    /// process of the stage that is running (as a terminal's Ctrl-C reaches
    /// the foreground process group). Ignored between stages.
    Signal {
        /// Signal number, e.g. 2 for SIGINT.
        signal: i32,
    },
}

/// Largest stdin chunk in one [`HostMessage::Stdin`] (before base64).
pub const STDIN_CHUNK: usize = 64 << 10;

/// Most stdin bytes the agent holds for a program that has not read them
/// yet; a host that sends more loses the excess (the host bounds a
/// session's stdin well below this, so only a broken host hits it).
pub const MAX_STDIN_PENDING: usize = 4 << 20;

/// Largest host frame the agent accepts while an interactive job runs: a
/// [`STDIN_CHUNK`] in base64 plus the JSON around it.
pub const MAX_SESSION_FRAME: usize = STDIN_CHUNK * 4 / 3 + 1024;

/// What makes a VM restored from a shared template unique: fresh entropy for
/// the kernel's CRNG and the host's wall clock (a restored guest's clock
/// says when the template was saved). Follows Firecracker's guidance for
/// clones (`docs/snapshotting/random-for-clones.md`): reseed before any
/// user code runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uniqueness {
    /// Random bytes from the host (at most [`MAX_ENTROPY_BYTES`]); the agent
    /// adds them to the input pool (`RNDADDENTROPY`) and forces a CRNG reseed
    /// (`RNDRESEEDCRNG`).
    #[serde(with = "b64")]
    pub entropy: Vec<u8>,
    /// The host's wall clock when the message was sent, nanoseconds since the
    /// Unix epoch; the agent sets `CLOCK_REALTIME` to it.
    pub unix_time_ns: u64,
}

/// Most entropy bytes the agent accepts in one [`Uniqueness`].
pub const MAX_ENTROPY_BYTES: usize = 512;

/// Entropy bytes the host sends with every job and resume.
pub const ENTROPY_BYTES: usize = 64;

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// The agent is up and waiting for its job.
    Ready {
        /// [`crate::PROTOCOL_VERSION`] the agent speaks.
        protocol: u32,
        /// Agent build version, for diagnostics.
        agent_version: String,
        /// Guest uptime when the agent became ready (kernel boot + agent setup).
        uptime_ms: u64,
    },
    /// Output of both streams of a stage in the order it was written, as
    /// records (see [`OutputRecords`]), sent as it is produced: a program
    /// that alternates stdout and stderr costs frames by the byte, not by
    /// the switch. At most [`crate::OUTPUT_CHUNK`] bytes of output.
    OutputRecords {
        /// Which stage produced it.
        stage: Stage,
        /// The records, `[stream u8 (0 stdout, 1 stderr)][length u32 BE][bytes]` each.
        #[serde(with = "b64")]
        records: Vec<u8>,
    },
    /// The job is finished; the VM powers off next.
    Done(JobResult),
    /// Answer to [`HostMessage::Prewarm`]: the warm-up ran and its traces
    /// are wiped; the agent waits for the next message.
    Warmed {
        /// How the warm-up command ended (anything but `ok` means the
        /// template is not warmed; the host then does not keep it).
        status: StageStatus,
        /// Its exit code, when it exited.
        exit_code: Option<i32>,
        /// Its wall time in milliseconds.
        wall_ms: u64,
    },
    /// Interactive jobs only: a stage is about to start (output of that
    /// stage follows).
    StageStarted {
        /// Which stage.
        stage: Stage,
    },
    /// Interactive jobs only: a stage ended (its full result follows in
    /// `Done`); sent after the stage's last output chunk.
    StageExited {
        /// Which stage.
        stage: Stage,
        /// How it ended.
        status: StageStatus,
        /// Its exit code, when it exited.
        exit_code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    /// One test of a job with [`Job::tests`] finished (sent in test order,
    /// before `Done`). Test runs stream no `Output`: the result carries it.
    TestDone {
        /// The test's index in [`Job::tests`].
        index: u32,
        /// How its run ended.
        result: StageResult,
    },
    /// The agent could not run the job at all (bad job, setup failure).
    Failed {
        /// One-line reason.
        message: String,
    },
}

/// A stage of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The runtime's compile step.
    Compile,
    /// The program itself.
    Run,
}

impl Stage {
    /// Stable snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Compile => "compile",
            Stage::Run => "run",
        }
    }
}

/// An output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A file written into the work dir before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct File {
    /// Relative path inside the work dir (validated by host and agent).
    pub path: String,
    /// Content.
    #[serde(with = "b64")]
    pub content: Vec<u8>,
    /// Whether to set the executable bit.
    #[serde(default)]
    pub executable: bool,
}

/// One command to run as the unprivileged user, under limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// argv; `argv[0]` is resolved through `PATH` in `env`.
    pub argv: Vec<String>,
    /// The complete environment (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    /// Limits for this command.
    pub limits: Limits,
}

/// Limits enforced by the agent for one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock limit in milliseconds.
    pub wall_ms: u64,
    /// CPU-time limit in milliseconds (all processes of the stage).
    pub cpu_ms: u64,
    /// Memory limit in bytes (cgroup `memory.max`, swap off).
    pub memory_bytes: u64,
    /// Maximum number of processes and threads (cgroup `pids.max`).
    pub pids: u64,
    /// Cap on captured bytes per stream; more output ends the stage.
    pub output_bytes: u64,
    /// Largest file the program may write (`RLIMIT_FSIZE`).
    pub file_size_bytes: u64,
    /// Maximum open files (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

/// Everything the agent needs to run one execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Files for the work dir.
    pub files: Vec<File>,
    /// Optional compile step; a failure stops the job with `compile_error`.
    pub compile: Option<Command>,
    /// The run step.
    pub run: Command,
    /// Fed to the run step's standard input, then closed.
    #[serde(with = "b64", default)]
    pub stdin: Vec<u8>,
    /// Size of the tmpfs work dir in bytes.
    pub workdir_bytes: u64,
    /// Fresh entropy and the host clock, applied before any stage runs (a VM
    /// restored from a template shares its RNG state and clock with every
    /// other clone until then). Absent from hosts before protocol 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uniqueness: Option<Uniqueness>,
    /// An interactive session (protocol 3): the run stage's stdin is a pipe
    /// fed by [`HostMessage::Stdin`] (after `stdin` above) until
    /// [`HostMessage::StdinEof`]; the agent accepts [`HostMessage::Signal`]
    /// and reports stage starts and exits as they happen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interactive: bool,
    /// Compile once, run many: when not empty, `run` and `stdin` are not run
    /// as such; after a successful compile each test runs `run`'s
    /// environment and limits with its own argv and stdin, in a fresh work
    /// dir holding a copy of the compiled work dir, once every process of
    /// the previous test is gone. Each result comes as a
    /// [`GuestMessage::TestDone`]; the final [`JobResult`] then has no `run`.
    /// At most [`MAX_TESTS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestRun>,
}

/// Most tests in one [`Job`].
pub const MAX_TESTS: usize = 64;

/// One run of a compile-once-run-many job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRun {
    /// The complete argv (the runtime's run command plus the test's arguments).
    pub argv: Vec<String>,
    /// Fed to the run's standard input, then closed.
    #[serde(with = "b64", default)]
    pub stdin: Vec<u8>,
}

/// How a stage ended, as observed by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Exited with status 0.
    Ok,
    /// Exited non-zero or was killed by a signal it did not ask for.
    Failed,
    /// Exceeded the wall or CPU limit.
    TimeLimitExceeded,
    /// The cgroup's OOM killer fired.
    MemoryLimitExceeded,
    /// Wrote more than the output cap.
    OutputLimitExceeded,
}

/// Observations for one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageResult {
    /// How it ended.
    pub status: StageStatus,
    /// Exit code when it exited.
    pub exit_code: Option<i32>,
    /// Terminating signal when it was killed.
    pub signal: Option<i32>,
    /// Captured standard output (at most the cap); from the guest, empty
    /// when [`StageResult::streamed`].
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Captured standard error (at most the cap); as `stdout`.
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// From the guest: the stage's output went to the host as it was
    /// produced ([`GuestMessage::OutputRecords`] of this stage) and is not
    /// repeated here; the host fills `stdout` and `stderr` from those
    /// frames. Keeping a second copy in the guest cost the writing program
    /// ~10 ns per byte under TCG, a fresh guest page for every 4 KiB
    /// (docs/performance.md, "Output relay"). `false` for tests, whose
    /// output streams nowhere and travels in their results.
    #[serde(default)]
    pub streamed: bool,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Wall-clock time.
    pub wall_ms: u64,
    /// CPU time of every process of the stage (user + system).
    pub cpu_ms: u64,
    /// Peak memory of the stage's cgroup.
    pub peak_memory_bytes: u64,
}

/// The verdict of an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Compiled (if needed), ran, exited 0.
    Ok,
    /// The compile step failed.
    CompileError,
    /// Non-zero exit or killed by a signal.
    RuntimeError,
    /// Wall or CPU limit exceeded.
    TimeLimitExceeded,
    /// Memory limit exceeded.
    MemoryLimitExceeded,
    /// Output cap exceeded.
    OutputLimitExceeded,
    /// TVM itself failed (VM, agent, protocol); not the program's fault.
    InternalError,
}

impl Verdict {
    /// Stable snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::CompileError => "compile_error",
            Verdict::RuntimeError => "runtime_error",
            Verdict::TimeLimitExceeded => "time_limit_exceeded",
            Verdict::MemoryLimitExceeded => "memory_limit_exceeded",
            Verdict::OutputLimitExceeded => "output_limit_exceeded",
            Verdict::InternalError => "internal_error",
        }
    }

    /// Derives the verdict from the stages that ran. A compile stage that did
    /// not succeed is a compile error whatever the reason (a compiler that
    /// times out is still the submission's problem).
    pub fn from_stages(compile: Option<&StageResult>, run: Option<&StageResult>) -> Verdict {
        if let Some(c) = compile {
            if c.status != StageStatus::Ok {
                return Verdict::CompileError;
            }
        }
        match run.map(|r| r.status) {
            None => Verdict::InternalError,
            Some(StageStatus::Ok) => Verdict::Ok,
            Some(StageStatus::Failed) => Verdict::RuntimeError,
            Some(StageStatus::TimeLimitExceeded) => Verdict::TimeLimitExceeded,
            Some(StageStatus::MemoryLimitExceeded) => Verdict::MemoryLimitExceeded,
            Some(StageStatus::OutputLimitExceeded) => Verdict::OutputLimitExceeded,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a job as reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// Overall verdict ([`Verdict::from_stages`]).
    pub verdict: Verdict,
    /// The compile stage, if the runtime has one.
    pub compile: Option<StageResult>,
    /// The run stage, unless compilation failed.
    pub run: Option<StageResult>,
    /// Where the agent's time went: one mark per step, in order (at most
    /// [`MAX_TRACE_MARKS`]). Empty from agents that predate it, so old and
    /// new agents and hosts interoperate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<TraceMark>,
}

/// Most marks a [`JobResult::trace`] carries; the agent stops marking there.
pub const MAX_TRACE_MARKS: usize = 32;

/// One step of the agent's work on a job, for benchmarks (`tvm bench --api`,
/// `tvm serve --trace`): the step just finished and when, in µs since the agent
/// decoded the job frame (guest monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceMark {
    /// Step name, `<stage>.<step>` inside a stage (e.g. `run.spawned`).
    pub step: String,
    /// µs since the job frame was decoded.
    pub at_us: u64,
}

/// Checks a submitted file path: relative, normal components only, no NUL,
/// bounded depth and length. Shared by host (to reject early with a clear
/// error) and agent (which trusts nothing).
pub fn validate_file_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("file name is empty".into());
    }
    if path.len() > 255 {
        return Err(format!("file name {path:?} is longer than 255 bytes"));
    }
    if path.contains('\0') {
        return Err("file name contains a NUL byte".into());
    }
    if path.starts_with('/') {
        return Err(format!("file name {path:?} is absolute"));
    }
    if path.contains('\\') {
        return Err(format!("file name {path:?} contains a backslash"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 8 {
        return Err(format!("file name {path:?} has more than 8 path parts (directories and the file)"));
    }
    for p in parts {
        if p.is_empty() || p == "." || p == ".." {
            return Err(format!("file name {path:?} escapes or is not normal (empty, '.' or '..' component)"));
        }
        if p.chars().any(|c| c.is_control()) {
            return Err(format!("file name {path:?} contains a control character"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_validation() {
        for ok in ["main.py", "pkg/mod.py", "a/b/c.txt", ".hidden"] {
            assert_eq!(validate_file_path(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\0b", "a\\b", "a/b/c/d/e/f/g/h/i", "x\n"] {
            assert!(validate_file_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn verdict_derivation() {
        let st = |status| StageResult {
            status,
            exit_code: None,
            signal: None,
            stdout: vec![],
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            streamed: false,
            wall_ms: 0,
            cpu_ms: 0,
            peak_memory_bytes: 0,
        };
        assert_eq!(Verdict::from_stages(None, Some(&st(StageStatus::Ok))), Verdict::Ok);
        assert_eq!(Verdict::from_stages(Some(&st(StageStatus::Failed)), None), Verdict::CompileError);
        assert_eq!(
            Verdict::from_stages(Some(&st(StageStatus::Ok)), Some(&st(StageStatus::TimeLimitExceeded))),
            Verdict::TimeLimitExceeded
        );
        assert_eq!(Verdict::from_stages(None, None), Verdict::InternalError);
        assert_eq!(serde_json::to_string(&Verdict::MemoryLimitExceeded).unwrap(), "\"memory_limit_exceeded\"");
    }

    #[test]
    fn bytes_travel_as_base64() {
        let f = File { path: "a".into(), content: vec![0, 255, 10], executable: false };
        let j = serde_json::to_string(&f).unwrap();
        assert!(j.contains("\"AP8K\""), "{j}");
        assert_eq!(serde_json::from_str::<File>(&j).unwrap(), f);
    }
}
