//! The wire types of API v1 and their mapping to `pyrovm`.
//!
//! [`ExecutionBody`] is what clients send; it converts to and from the shared
//! [`pyrovm::ExecutionRequest`], so the CLI (`tvm run --server`) and the API
//! submit the same job. [`ExecutionResult`] is what they get back, whether
//! the program succeeded, failed, or TVM failed underneath it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use pyrovm::{ExecutionRequest, LimitRequest, SourceFile, TestRequest};
use serde::{Deserialize, Serialize};
use tvm_config::Catalog;
use tvm_protocol::{Limits, StageResult, StageStatus, Verdict};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::wire;

/// How a text field is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The string is the content.
    #[default]
    Utf8,
    /// The string is standard base64 (with padding) of the content.
    Base64,
}

/// A source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileBody {
    /// Path relative to the work dir: at most 255 bytes and 8 parts separated by `/`;
    /// no leading `/`, no empty, `.` or `..` part, no backslash or control character;
    /// no file may be a directory of another (`x` and `x/y`).
    #[schema(example = "main.py")]
    pub name: String,
    /// Content, encoded as `encoding` says.
    #[schema(example = "print('hello')")]
    pub content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
}

/// Per-stage limits; omitted fields keep the runtime's default. Each must be
/// between 1 and the operator's maximum (see `GET /v1/runtimes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    /// Wall-clock time, ms.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub wall_time_ms: Option<u64>,
    /// CPU time of all the stage's processes, ms.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub cpu_time_ms: Option<u64>,
    /// Memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub processes: Option<u64>,
    /// Captured bytes per output stream; more ends the stage.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub output_bytes: Option<u64>,
    /// Largest file the program may write, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "wire::opt_integral")]
    pub file_size_bytes: Option<u64>,
}

impl LimitsBody {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl From<LimitsBody> for LimitRequest {
    fn from(l: LimitsBody) -> Self {
        LimitRequest {
            wall_time_ms: l.wall_time_ms,
            cpu_time_ms: l.cpu_time_ms,
            memory_bytes: l.memory_bytes,
            processes: l.processes,
            output_bytes: l.output_bytes,
            file_size_bytes: l.file_size_bytes,
        }
    }
}

impl From<LimitRequest> for LimitsBody {
    fn from(l: LimitRequest) -> Self {
        LimitsBody {
            wall_time_ms: l.wall_time_ms,
            cpu_time_ms: l.cpu_time_ms,
            memory_bytes: l.memory_bytes,
            processes: l.processes,
            output_bytes: l.output_bytes,
            file_size_bytes: l.file_size_bytes,
        }
    }
}

/// An execution request. Name the runtime either by `runtime` (id or alias)
/// or by `language` (+ optional `version`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutionBody {
    /// Runtime id or alias, e.g. `python-3.11` or `python`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "python")]
    pub runtime: Option<String>,
    /// Language, e.g. `python`; instead of `runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Version of `language`, e.g. `3.11`; the catalog's preferred one when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Source files (1 to 64, 16 MiB of content in total).
    #[serde(deserialize_with = "wire::files")]
    pub files: Vec<FileBody>,
    /// Entry file name; the first file when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Standard input of the run stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Encoding of `stdin`.
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub stdin_encoding: Encoding,
    /// Program arguments (at most 256, each at most 4096 bytes, no NUL).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "wire::args")]
    pub args: Vec<String>,
    /// Limits of the compile stage (compiled runtimes only).
    #[serde(default, skip_serializing_if = "LimitsBody::is_empty", deserialize_with = "wire::object")]
    pub compile_limits: LimitsBody,
    /// Limits of the run stage.
    #[serde(default, skip_serializing_if = "LimitsBody::is_empty", deserialize_with = "wire::object")]
    pub run_limits: LimitsBody,
    /// Ask for network access. Refused (422) unless the operator enabled it; guests have no network yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// Compile once, run many (1 to 64 tests): compile once, then run each
    /// test in its own fresh work dir holding the compiled files, after every
    /// process of the previous test is gone. With `tests`, leave the
    /// top-level `stdin` and `args` out. Results come in `tests` and
    /// `summary` of the result; its `run` is then absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestBody>,
}

/// One test of a compile-once-run-many request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    /// Standard input of this run (all tests together: at most 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Encoding of `stdin`.
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub stdin_encoding: Encoding,
    /// Program arguments of this run (bounded as `args`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "wire::args")]
    pub args: Vec<String>,
    /// When given, a run that exits 0 is `accepted` if its stdout equals this
    /// under the rule `trailing_whitespace` (each line's trailing whitespace and
    /// trailing blank lines ignored, as Judge0 compares), else `wrong_answer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_output: Option<String>,
}

/// A test's expected stdout, when it has one.
pub type Expected = Option<Vec<u8>>;

/// The name of the only output comparison rule (see [`TestBody::expected_output`]).
pub const COMPARISON_RULE: &str = "trailing_whitespace";

/// Verdict of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestVerdict {
    /// Exited 0, and its stdout matched `expected_output` when one was given.
    Accepted,
    /// Exited 0 with an stdout that does not match `expected_output`.
    WrongAnswer,
    /// Non-zero exit or killed by a signal.
    RuntimeError,
    /// Wall or CPU limit exceeded.
    TimeLimitExceeded,
    /// Memory limit exceeded.
    MemoryLimitExceeded,
    /// Output cap exceeded.
    OutputLimitExceeded,
}

impl TestVerdict {
    /// The verdict of a test run, comparing stdout with `expected` when given.
    pub fn judge(run: &StageResult, expected: Option<&[u8]>) -> Self {
        match run.status {
            StageStatus::Ok => match expected {
                Some(e) if same_output(&run.stdout, e) => TestVerdict::Accepted,
                Some(_) => TestVerdict::WrongAnswer,
                None => TestVerdict::Accepted,
            },
            StageStatus::Failed => TestVerdict::RuntimeError,
            StageStatus::TimeLimitExceeded => TestVerdict::TimeLimitExceeded,
            StageStatus::MemoryLimitExceeded => TestVerdict::MemoryLimitExceeded,
            StageStatus::OutputLimitExceeded => TestVerdict::OutputLimitExceeded,
        }
    }
}

/// [`COMPARISON_RULE`]: equal once trailing whitespace is cut from every line
/// and trailing blank lines are dropped (Judge0's `strip_output`).
pub fn same_output(actual: &[u8], expected: &[u8]) -> bool {
    fn strip(b: &[u8]) -> Vec<&[u8]> {
        let mut lines: Vec<&[u8]> = b.split(|c| *c == b'\n').map(|l| l.trim_ascii_end()).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }
    strip(actual) == strip(expected)
}

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TestResultBody {
    /// The test's index in the request's `tests`.
    pub index: u32,
    /// The test's verdict.
    pub verdict: TestVerdict,
    /// The comparison rule applied (`trailing_whitespace`), when the test had an `expected_output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<String>,
    /// The run, as a stage (exit code, signal, output, times, memory).
    pub run: StageBody,
}

/// Counts over the tests of an execution.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TestSummary {
    /// Tests requested.
    pub total: u32,
    /// Tests that ran (fewer than `total` after a compile error or a TVM failure).
    pub ran: u32,
    /// Tests `accepted`.
    pub accepted: u32,
    /// Tests with any other verdict.
    pub failed: u32,
    /// Largest wall time of a test, ms.
    pub max_wall_time_ms: u64,
    /// Largest CPU time of a test, ms.
    pub max_cpu_time_ms: u64,
    /// Largest peak memory of a test, bytes.
    pub max_peak_memory_bytes: u64,
}

impl TestSummary {
    /// The summary of `results` out of `total` tests.
    pub fn of(total: usize, results: &[TestResultBody]) -> Self {
        let accepted = results.iter().filter(|t| t.verdict == TestVerdict::Accepted).count() as u32;
        TestSummary {
            total: total as u32,
            ran: results.len() as u32,
            accepted,
            failed: results.len() as u32 - accepted,
            max_wall_time_ms: results.iter().map(|t| t.run.wall_time_ms).max().unwrap_or(0),
            max_cpu_time_ms: results.iter().map(|t| t.run.cpu_time_ms).max().unwrap_or(0),
            max_peak_memory_bytes: results.iter().map(|t| t.run.peak_memory_bytes).max().unwrap_or(0),
        }
    }
}

fn is_utf8(e: &Encoding) -> bool {
    *e == Encoding::Utf8
}

fn decode(text: &str, enc: Encoding, field: String) -> Result<Vec<u8>, ApiError> {
    match enc {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => B64
            .decode(text.as_bytes())
            .map_err(|e| ApiError::invalid("bad_base64", format!("{field} is not valid base64: {e}"), field)),
    }
}

impl ExecutionBody {
    /// Resolves the runtime name and decodes contents into the shared request
    /// type; `pyrovm::plan` does every other check.
    pub fn into_request(self, catalog: &Catalog, allow_network: bool) -> Result<ExecutionRequest, ApiError> {
        if self.network && !allow_network {
            return Err(ApiError::invalid("network_disabled", "network access is disabled by the operator", "network"));
        }
        let runtime = resolve_runtime(catalog, &self)?;
        let files = self
            .files
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let content = decode(&f.content, f.encoding, format!("files[{i}].content"))?;
                Ok(SourceFile { name: f.name, content })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let stdin = match &self.stdin {
            Some(s) => decode(s, self.stdin_encoding, "stdin".into())?,
            None => Vec::new(),
        };
        Ok(ExecutionRequest {
            runtime,
            files,
            entry: self.entry,
            stdin,
            args: self.args,
            run_limits: self.run_limits.into(),
            compile_limits: self.compile_limits.into(),
        })
    }

    /// Takes `tests` out of the body, decoded: what each run gets, and what
    /// its stdout is compared with.
    ///
    /// # Errors
    /// Bad base64 in a test's `stdin` (422, field `tests[i].stdin`).
    pub fn take_tests(&mut self) -> Result<(Vec<TestRequest>, Vec<Expected>), ApiError> {
        let mut runs = Vec::with_capacity(self.tests.len());
        let mut expected = Vec::with_capacity(self.tests.len());
        for (i, t) in std::mem::take(&mut self.tests).into_iter().enumerate() {
            let stdin = match &t.stdin {
                Some(s) => decode(s, t.stdin_encoding, format!("tests[{i}].stdin"))?,
                None => Vec::new(),
            };
            runs.push(TestRequest { stdin, args: t.args });
            expected.push(t.expected_output.map(String::into_bytes));
        }
        Ok((runs, expected))
    }

    /// The body a client sends for `req` (files and stdin as base64, so any bytes survive).
    pub fn from_request(req: &ExecutionRequest) -> Self {
        ExecutionBody {
            runtime: Some(req.runtime.clone()),
            files: req
                .files
                .iter()
                .map(|f| FileBody { name: f.name.clone(), content: B64.encode(&f.content), encoding: Encoding::Base64 })
                .collect(),
            entry: req.entry.clone(),
            stdin: (!req.stdin.is_empty()).then(|| B64.encode(&req.stdin)),
            stdin_encoding: if req.stdin.is_empty() { Encoding::Utf8 } else { Encoding::Base64 },
            args: req.args.clone(),
            run_limits: req.run_limits.into(),
            compile_limits: req.compile_limits.into(),
            ..Default::default()
        }
    }
}

/// `runtime`, or `language` + optional `version`, to a runtime id or alias for `plan`.
fn resolve_runtime(catalog: &Catalog, body: &ExecutionBody) -> Result<String, ApiError> {
    if body.version.is_some() && body.language.is_none() {
        return Err(ApiError::invalid("bad_runtime", "`version` goes with `language`, not alone", "version"));
    }
    match (&body.runtime, &body.language) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "bad_runtime",
            "give either `runtime` or `language` (+ `version`), not both",
            "runtime",
        )),
        (Some(r), None) => Ok(r.clone()),
        (None, Some(lang)) => {
            let mut candidates = catalog.runtimes().iter().filter(|r| r.language.eq_ignore_ascii_case(lang));
            let found = match &body.version {
                Some(v) => candidates.find(|r| r.version.eq_ignore_ascii_case(v)),
                // Catalog order is preference; skip versions that cannot run here.
                None => candidates.find(|r| r.unavailable.is_none()),
            };
            found.map(|r| r.id.clone()).ok_or_else(|| {
                let what = match &body.version {
                    Some(v) => format!("{lang} {v}"),
                    None => lang.clone(),
                };
                ApiError::Plan(pyrovm::PlanError::UnknownRuntime(what))
            })
        }
        (None, None) => Err(ApiError::invalid("bad_runtime", "name a `runtime` or a `language`", "runtime")),
    }
}

/// Observations of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StageBody {
    /// How the stage ended.
    #[schema(schema_with = stage_status_schema)]
    pub status: StageStatus,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
    /// Standard output as UTF-8 (invalid sequences replaced; see `stdout_base64`).
    pub stdout: String,
    /// Standard error as UTF-8 (invalid sequences replaced; see `stderr_base64`).
    pub stderr: String,
    /// The exact stdout bytes, present only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    /// The exact stderr bytes, present only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    /// Whether stdout was cut at `output_bytes`.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at `output_bytes`.
    pub stderr_truncated: bool,
    /// Wall-clock time, ms.
    pub wall_time_ms: u64,
    /// CPU time (user + system, all processes), ms.
    pub cpu_time_ms: u64,
    /// Peak memory of the stage, bytes.
    pub peak_memory_bytes: u64,
}

fn text_and_exact(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), Some(B64.encode(bytes))),
    }
}

impl From<&StageResult> for StageBody {
    fn from(s: &StageResult) -> Self {
        let (stdout, stdout_base64) = text_and_exact(&s.stdout);
        let (stderr, stderr_base64) = text_and_exact(&s.stderr);
        StageBody {
            status: s.status,
            exit_code: s.exit_code,
            signal: s.signal,
            stdout,
            stderr,
            stdout_base64,
            stderr_base64,
            stdout_truncated: s.stdout_truncated,
            stderr_truncated: s.stderr_truncated,
            wall_time_ms: s.wall_ms,
            cpu_time_ms: s.cpu_ms,
            peak_memory_bytes: s.peak_memory_bytes,
        }
    }
}

impl StageBody {
    /// The exact stdout bytes.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        exact(&self.stdout, self.stdout_base64.as_deref())
    }

    /// The exact stderr bytes.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        exact(&self.stderr, self.stderr_base64.as_deref())
    }
}

fn exact(text: &str, b64: Option<&str>) -> Vec<u8> {
    b64.and_then(|b| B64.decode(b).ok()).unwrap_or_else(|| text.as_bytes().to_vec())
}

/// The outcome of an execution. Failures of TVM itself (a VM that would not
/// boot, a guest that broke the protocol) are reported here with verdict
/// `internal_error` and `error` set, with HTTP 200: the request was valid and
/// was tried, and clients handle one shape for every outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecutionResult {
    /// Execution id (also in the server's logs).
    pub id: String,
    /// The verdict.
    #[schema(schema_with = verdict_schema)]
    pub verdict: Verdict,
    /// Runtime id that ran it.
    pub runtime: String,
    /// The compile stage, for compiled runtimes.
    pub compile: Option<StageBody>,
    /// The run stage, unless compilation failed or TVM failed.
    pub run: Option<StageBody>,
    /// What went wrong when `verdict` is `internal_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VM start to agent-ready, ms. For a pooled VM this happened before the request arrived.
    pub boot_ms: u64,
    /// Time spent waiting for capacity, ms.
    pub queue_ms: u64,
    /// From admission to result, ms; excludes the boot of a pooled VM.
    pub total_ms: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Whether a pre-booted VM from the warm pool ran it.
    pub pooled: bool,
    /// How the VM that ran it started: `template` (restored from a snapshot
    /// of a prewarmed VM), `cold` (booted; a template was missing, broken or
    /// off) or `pool` (taken from the warm pool).
    #[serde(default)]
    pub start: String,
    /// Per-test outcomes of a compile-once-run-many request, in test order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<Vec<TestResultBody>>,
    /// Counts over `tests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<TestSummary>,
    /// Why the VM cold booted although templates are on (the template was
    /// missing, corrupt, failed to build or failed to restore); absent when
    /// it was restored, pooled, or templates are off. Set by `tvm run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_note: Option<String>,
    /// Where the time went, when the server runs with `trace = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<ExecutionTrace>,
}

/// Where an execution's time went (server option `trace = true`; used by
/// `tvm bench --api`). Host figures are the host's monotonic
/// clock, agent marks the guest's: compare durations, not instants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecutionTrace {
    /// Host: from sending the job to the agent until its result was read,
    /// µs (covers the whole agent trace plus the frames' transport both
    /// ways; for a session also the VM's teardown, which a plain execution
    /// does off the response path).
    pub execute_us: u64,
    /// The agent's steps in order: `{step, at_us}`, µs since it decoded the
    /// job frame (see the agent's `trace` module for the step names).
    #[schema(value_type = Vec<Object>)]
    pub agent: Vec<tvm_protocol::TraceMark>,
}

impl ExecutionResult {
    /// The API shape of a local execution (`tvm run --json` can print the
    /// same document the server returns).
    #[cfg(target_os = "linux")]
    pub fn from_execution(exec: &pyrovm::Execution) -> Self {
        ExecutionResult {
            id: exec.vm_id.clone(),
            verdict: exec.result.verdict,
            runtime: exec.runtime.clone(),
            compile: exec.result.compile.as_ref().map(StageBody::from),
            run: exec.result.run.as_ref().map(StageBody::from),
            error: None,
            boot_ms: exec.boot_ms,
            queue_ms: 0,
            total_ms: exec.total_ms,
            accel: exec.accel.to_string(),
            pooled: false,
            start: exec.start.as_str().to_string(),
            tests: None,
            summary: None,
            start_note: exec.start_note.clone(),
            trace: None,
        }
    }

    /// The document of an execution TVM itself could not complete: verdict
    /// `internal_error`, `error` saying why, no stages.
    pub fn internal_error(id: String, runtime: String, accel: &str, error: String) -> Self {
        ExecutionResult {
            id,
            verdict: Verdict::InternalError,
            runtime,
            compile: None,
            run: None,
            error: Some(error),
            boot_ms: 0,
            queue_ms: 0,
            total_ms: 0,
            accel: accel.to_string(),
            pooled: false,
            start: String::new(),
            tests: None,
            summary: None,
            start_note: None,
            trace: None,
        }
    }
}

/// Limits in force for one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LimitsInfo {
    /// Wall-clock time, ms.
    pub wall_time_ms: u64,
    /// CPU time, ms.
    pub cpu_time_ms: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub processes: u64,
    /// Captured bytes per output stream.
    pub output_bytes: u64,
    /// Largest file written, bytes.
    pub file_size_bytes: u64,
    /// Stack, bytes: always the memory limit (there is no separate
    /// `RLIMIT_STACK`; the stack is memory like any other), so a deep
    /// recursion may use all of it, as on the judges.
    #[serde(default)]
    pub stack_bytes: u64,
}

impl From<&Limits> for LimitsInfo {
    fn from(l: &Limits) -> Self {
        LimitsInfo {
            wall_time_ms: l.wall_ms,
            cpu_time_ms: l.cpu_ms,
            memory_bytes: l.memory_bytes,
            processes: l.pids,
            output_bytes: l.output_bytes,
            file_size_bytes: l.file_size_bytes,
            stack_bytes: l.memory_bytes,
        }
    }
}

/// State of a runtime's image on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageStateName {
    /// Built; executions can run.
    Ready,
    /// Being built now.
    Building,
    /// Not built (and not being built).
    Missing,
    /// The last build failed (see `reason`).
    Failed,
    /// The runtime cannot run on this host (see `reason`).
    Unavailable,
}

/// Image state with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// State.
    pub state: ImageStateName,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Default limits of a runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DefaultLimits {
    /// Run stage.
    pub run: LimitsInfo,
    /// Compile stage, for compiled runtimes.
    pub compile: Option<LimitsInfo>,
}

/// Warm pool of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolInfo {
    /// Configured size (after fitting into capacity).
    pub target: usize,
    /// VMs waiting at agent-ready now.
    pub idle: usize,
    /// Guest RAM of each pool VM, MiB; requests needing more boot on demand.
    pub memory_mib: u64,
}

/// One runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuntimeInfo {
    /// Stable id, e.g. `python-3.11`.
    pub id: String,
    /// Language, e.g. `python`.
    pub language: String,
    /// Version, e.g. `3.11`.
    pub version: String,
    /// Other names accepted as `runtime`.
    pub aliases: Vec<String>,
    /// File extensions of the language.
    pub extensions: Vec<String>,
    /// Whether there is a compile stage.
    pub compiled: bool,
    /// Default entry file name.
    pub entry: String,
    /// Image state.
    pub image: ImageInfo,
    /// Default limits.
    pub default_limits: DefaultLimits,
    /// Warm pool.
    pub pool: PoolInfo,
    /// Where the catalog entry was defined: `built-in`, the catalog file, or
    /// the overlay file (of `runtimes_dir`) that added or last changed it.
    #[serde(default = "builtin_origin")]
    pub source: String,
}

/// What older servers' entries were: built in.
fn builtin_origin() -> String {
    tvm_config::BUILTIN_ORIGIN.to_string()
}

/// `GET /v1/runtimes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuntimesBody {
    /// Every runtime of the catalog, in preference order.
    pub runtimes: Vec<RuntimeInfo>,
    /// The operator's maximum for any limit of any stage.
    pub maximum_limits: LimitsInfo,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthBody {
    /// Always `ok` when answered.
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReadyBody {
    /// Whether this instance should get traffic.
    pub ready: bool,
    /// Whether it is shutting down.
    pub draining: bool,
    /// Runtimes whose image is not ready, with their state.
    pub images_not_ready: Vec<String>,
    /// Runtimes whose pool has not yet reached its target since startup, as `id idle/target`.
    pub pools_not_warm: Vec<String>,
}

/// A chunk of output in the event stream (`stdout` and `stderr` events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutputEvent {
    /// `compile` or `run`.
    #[schema(schema_with = stage_schema)]
    pub stage: tvm_protocol::Stage,
    /// The text (UTF-8 sequences split across chunks are joined; invalid bytes replaced).
    pub data: String,
}

fn string_enum(values: &[&str], description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .into()
}

fn verdict_schema() -> RefOr<Schema> {
    string_enum(
        &[
            "ok",
            "compile_error",
            "runtime_error",
            "time_limit_exceeded",
            "memory_limit_exceeded",
            "output_limit_exceeded",
            "internal_error",
        ],
        "Overall outcome; `internal_error` means TVM failed, not the program.",
    )
}

fn stage_status_schema() -> RefOr<Schema> {
    string_enum(
        &["ok", "failed", "time_limit_exceeded", "memory_limit_exceeded", "output_limit_exceeded"],
        "How the stage ended.",
    )
}

fn stage_schema() -> RefOr<Schema> {
    string_enum(&["compile", "run"], "Stage.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> ExecutionBody {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn integers_may_be_written_as_integral_numbers_and_only_objects_are_objects() {
        let b = wire::parse::<ExecutionBody>(
            br#"{"runtime":"py","files":[{"name":"a","content":""}],"run_limits":{"wall_time_ms":64.0,"cpu_time_ms":1e3}}"#,
        )
        .unwrap();
        assert_eq!((b.run_limits.wall_time_ms, b.run_limits.cpu_time_ms), (Some(64), Some(1000)));
        for bad in [
            r#"{"runtime":"py","files":[],"run_limits":{"wall_time_ms":1.5}}"#,
            r#"{"runtime":"py","files":[],"run_limits":{"wall_time_ms":-1}}"#,
            r#"{"runtime":"py","files":[],"run_limits":{"wall_time_ms":1e30}}"#,
            r#"{"runtime":"py","files":[],"run_limits":[1]}"#,
            r#"{"runtime":"py","files":[["a",""]]}"#,
            r#"["py",[]]"#,
        ] {
            let e = wire::parse::<ExecutionBody>(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_request", "{bad}: {e}");
        }
    }

    #[test]
    fn counts_and_sizes_are_refused_while_parsing() {
        let files: Vec<_> = (0..65).map(|i| serde_json::json!({"name": format!("f{i}"), "content": ""})).collect();
        let j = serde_json::json!({"runtime": "py", "files": files}).to_string();
        let e = wire::parse::<ExecutionBody>(j.as_bytes()).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code(), e.field().as_deref()), (422, "too_many_files", Some("files")));
        let j = serde_json::json!({"runtime": "py", "files": [], "args": vec![""; 257]}).to_string();
        let e = wire::parse::<ExecutionBody>(j.as_bytes()).unwrap_err();
        assert_eq!((e.code(), e.field().as_deref()), ("bad_args", Some("args")));
        let j = serde_json::json!({"runtime": "py", "files": [], "args": ["x".repeat(4097)]}).to_string();
        assert_eq!(wire::parse::<ExecutionBody>(j.as_bytes()).unwrap_err().code(), "bad_args");
        let j = serde_json::json!({"runtime": "py", "files": [], "args": vec!["y".repeat(4096); 256]}).to_string();
        assert_eq!(wire::parse::<ExecutionBody>(j.as_bytes()).unwrap().args.len(), 256);
    }

    #[test]
    fn request_converts_with_decoding_and_limits() {
        let cat = Catalog::builtin();
        let b = body(serde_json::json!({
            "language": "python",
            "files": [{"name": "a.py", "content": "print(1)"}, {"name": "b.bin", "content": "AP8=", "encoding": "base64"}],
            "stdin": "aGk=", "stdin_encoding": "base64",
            "args": ["x"],
            "run_limits": {"wall_time_ms": 1000, "memory_bytes": 134217728},
        }));
        let r = b.into_request(&cat, false).unwrap();
        assert_eq!(r.runtime, "python-3.13");
        assert_eq!(r.files[0].content, b"print(1)");
        assert_eq!(r.files[1].content, vec![0, 255]);
        assert_eq!(r.stdin, b"hi");
        assert_eq!(r.run_limits.wall_time_ms, Some(1000));
        assert_eq!(r.run_limits.memory_bytes, Some(128 << 20));
        assert_eq!(r.compile_limits, LimitRequest::default());
    }

    #[test]
    fn runtime_selection() {
        let cat = Catalog::builtin();
        let rt = |j: serde_json::Value| resolve_runtime(&cat, &body(j));
        assert_eq!(rt(serde_json::json!({"runtime": "py", "files": []})).unwrap(), "py");
        assert_eq!(rt(serde_json::json!({"language": "C", "version": "gcc-12", "files": []})).unwrap(), "c-gcc-12");
        let e = rt(serde_json::json!({"language": "python", "version": "2.7", "files": []})).unwrap_err();
        assert_eq!(e.code(), "unknown_runtime");
        assert_eq!(
            rt(serde_json::json!({"runtime": "py", "language": "python", "files": []})).unwrap_err().code(),
            "bad_runtime"
        );
        assert_eq!(
            rt(serde_json::json!({"runtime": "py", "version": "3", "files": []})).unwrap_err().field().as_deref(),
            Some("version")
        );
        assert_eq!(rt(serde_json::json!({"files": []})).unwrap_err().code(), "bad_runtime");
    }

    #[test]
    fn bad_base64_and_network_are_422_with_field() {
        let cat = Catalog::builtin();
        let b =
            body(serde_json::json!({"runtime": "py", "files": [{"name": "a", "content": "!!", "encoding": "base64"}]}));
        let e = b.into_request(&cat, false).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.code(), e.field().as_deref()),
            (422, "bad_base64", Some("files[0].content"))
        );
        let b = body(serde_json::json!({"runtime": "py", "files": [], "network": true}));
        let e = b.into_request(&cat, false).unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            ("network_disabled", "network access is disabled by the operator")
        );
    }

    #[test]
    fn unknown_fields_and_encodings_do_not_parse() {
        assert!(serde_json::from_str::<ExecutionBody>(r#"{"runtime":"py","files":[],"extra":1}"#).is_err());
        assert!(serde_json::from_str::<ExecutionBody>(
            r#"{"runtime":"py","files":[{"name":"a","content":"","encoding":"hex"}]}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<ExecutionBody>(r#"{"runtime":"py","files":[],"run_limits":{"wall":1}}"#).is_err()
        );
    }

    #[test]
    fn request_round_trips_through_the_wire_body() {
        let cat = Catalog::builtin();
        let req = ExecutionRequest {
            runtime: "c".into(),
            files: vec![SourceFile { name: "main.c".into(), content: vec![0xff, b'x'] }],
            entry: Some("main.c".into()),
            stdin: b"in".to_vec(),
            args: vec!["-v".into()],
            run_limits: LimitRequest { cpu_time_ms: Some(5), ..Default::default() },
            compile_limits: LimitRequest { processes: Some(9), ..Default::default() },
        };
        let wire = serde_json::to_string(&ExecutionBody::from_request(&req)).unwrap();
        let back = serde_json::from_str::<ExecutionBody>(&wire).unwrap().into_request(&cat, false).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn stage_output_is_text_plus_exact_bytes_when_needed() {
        let s = StageResult {
            status: StageStatus::Ok,
            exit_code: Some(0),
            signal: None,
            stdout: b"hi\n".to_vec(),
            stderr: vec![0xff, b'a'],
            stdout_truncated: false,
            stderr_truncated: true,
            streamed: true,
            wall_ms: 1,
            cpu_ms: 2,
            peak_memory_bytes: 3,
        };
        let b = StageBody::from(&s);
        assert_eq!((b.stdout.as_str(), b.stdout_base64.as_deref()), ("hi\n", None));
        assert_eq!(b.stderr, "\u{fffd}a");
        assert_eq!(b.stderr_bytes(), vec![0xff, b'a']);
        let j = serde_json::to_value(&b).unwrap();
        assert!(j.get("stdout_base64").is_none());
        assert_eq!(j["status"], "ok");
        assert_eq!(j["cpu_time_ms"], 2);
    }
}
