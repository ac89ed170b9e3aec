//! Judge0 CE's submission shape, as pure functions: request validation with
//! Rails-style 422 errors (`{"field": ["message", ...]}`), the `fields`
//! selection (default set, `*`, invalid → 400), serialization (seconds as
//! decimal strings, memory in KB, texts optionally base64), statuses 1–14
//! from TVM's verdicts and signals, and `expected_output` comparison.
//!
//! Sources followed: judge0/judge0 `app/models/submission.rb` (validations),
//! `app/serializers/submission_serializer.rb`, `app/services/fields/*`,
//! `app/enumerations/status.rb`, `app/jobs/isolate_job.rb` (statuses,
//! `strip_output`). Differences are listed in docs/compat.md.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as B64};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{json, Map, Value};
use tvm_protocol::{Limits, StageStatus};

use crate::api::StageBody;

/// Ruby's `Base64.decode64` tolerates missing padding and line breaks; so does this (after removing whitespace).
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Judge0's statuses: `(id, description)`.
pub(crate) const STATUSES: &[(u8, &str)] = &[
    (1, "In Queue"),
    (2, "Processing"),
    (3, "Accepted"),
    (4, "Wrong Answer"),
    (5, "Time Limit Exceeded"),
    (6, "Compilation Error"),
    (7, "Runtime Error (SIGSEGV)"),
    (8, "Runtime Error (SIGXFSZ)"),
    (9, "Runtime Error (SIGFPE)"),
    (10, "Runtime Error (SIGABRT)"),
    (11, "Runtime Error (NZEC)"),
    (12, "Runtime Error (Other)"),
    (13, "Internal Error"),
    (14, "Exec Format Error"),
];

/// The description of status `id`.
pub(crate) fn status_description(id: u8) -> &'static str {
    STATUSES.iter().find(|(i, _)| *i == id).map_or("Internal Error", |(_, d)| d)
}

/// Every attribute a submission serializes (`fields=*`), in Judge0's order.
pub(crate) const ALL_FIELDS: &[&str] = &[
    "source_code",
    "language_id",
    "stdin",
    "expected_output",
    "stdout",
    "status_id",
    "created_at",
    "finished_at",
    "time",
    "memory",
    "stderr",
    "token",
    "number_of_runs",
    "cpu_time_limit",
    "cpu_extra_time",
    "wall_time_limit",
    "memory_limit",
    "stack_limit",
    "max_processes_and_or_threads",
    "enable_per_process_and_thread_time_limit",
    "enable_per_process_and_thread_memory_limit",
    "max_file_size",
    "compile_output",
    "exit_code",
    "exit_signal",
    "message",
    "wall_time",
    "compiler_options",
    "command_line_arguments",
    "redirect_stderr_to_stdout",
    "callback_url",
    "additional_files",
    "enable_network",
    "post_execution_filesystem",
    "status",
    "language",
];

/// What `GET /submissions/{token}` returns without `fields`.
pub(crate) const DEFAULT_FIELDS: &[&str] =
    &["token", "time", "memory", "stdout", "stderr", "compile_output", "message", "status"];

/// Parses `fields`: absent or empty → the default set, `*` → all, else a comma list.
///
/// # Errors
/// Judge0's message naming the unknown fields (`invalid fields: [a, b]`, answered as 400).
pub(crate) fn parse_fields(param: Option<&str>) -> Result<Vec<&'static str>, String> {
    let raw = param.unwrap_or("").trim();
    if raw.is_empty() {
        return Ok(DEFAULT_FIELDS.to_vec());
    }
    let asked: Vec<&str> = raw.split(',').map(str::trim).filter(|f| !f.is_empty()).collect();
    if asked.contains(&"*") {
        return Ok(ALL_FIELDS.to_vec());
    }
    let invalid: Vec<&str> = asked.iter().copied().filter(|f| !ALL_FIELDS.contains(f)).collect();
    if !invalid.is_empty() {
        return Err(format!("invalid fields: [{}]", invalid.join(", ")));
    }
    Ok(ALL_FIELDS.iter().copied().filter(|f| asked.contains(f)).collect())
}

/// The server's limits for Judge0 submissions, in Judge0's units (seconds, KB).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bounds {
    /// Most runs per submission.
    pub max_number_of_runs: u32,
    /// Largest `cpu_time_limit`, s.
    pub max_cpu_time_limit: f64,
    /// Largest `cpu_extra_time`, s.
    pub max_cpu_extra_time: f64,
    /// Largest `wall_time_limit`, s.
    pub max_wall_time_limit: f64,
    /// Largest `memory_limit`, KB.
    pub max_memory_limit: u64,
    /// Largest `stack_limit`, KB.
    pub max_stack_limit: u64,
    /// Largest `max_processes_and_or_threads`.
    pub max_processes: u64,
    /// Largest `max_file_size`, KB.
    pub max_file_size: u64,
    /// Longest `compiler_options` / `command_line_arguments`, characters.
    pub max_option_chars: usize,
}

impl Bounds {
    /// From the catalog's maximum limits.
    pub(crate) fn from_maximum(max: &Limits) -> Self {
        Bounds {
            max_number_of_runs: 20,
            max_cpu_time_limit: max.cpu_ms as f64 / 1000.0,
            max_cpu_extra_time: 5.0,
            max_wall_time_limit: max.wall_ms as f64 / 1000.0,
            max_memory_limit: max.memory_bytes / 1024,
            max_stack_limit: 128_000,
            max_processes: max.pids,
            max_file_size: max.file_size_bytes / 1024,
            max_option_chars: 512,
        }
    }
}

/// Defaults of one runtime, Judge0's units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Defaults {
    /// s.
    pub cpu_time_limit: f64,
    /// s.
    pub wall_time_limit: f64,
    /// KB.
    pub memory_limit: u64,
    /// Processes.
    pub max_processes: u64,
    /// KB.
    pub max_file_size: u64,
}

impl Defaults {
    /// A runtime's default run limits.
    pub(crate) fn from_limits(l: &Limits) -> Self {
        Defaults {
            cpu_time_limit: l.cpu_ms as f64 / 1000.0,
            wall_time_limit: l.wall_ms as f64 / 1000.0,
            memory_limit: l.memory_bytes / 1024,
            max_processes: l.pids,
            max_file_size: l.file_size_bytes / 1024,
        }
    }
}

/// Judge0's default `cpu_extra_time`, s.
pub(crate) const CPU_EXTRA_TIME: f64 = 1.0;
/// Judge0's default `stack_limit`, KB.
pub(crate) const STACK_LIMIT: u64 = 64_000;

/// A submission's request attributes after validation (texts decoded).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spec {
    pub source_code: Vec<u8>,
    pub language_id: u32,
    pub stdin: Option<Vec<u8>>,
    pub expected_output: Option<Vec<u8>>,
    pub compiler_options: Option<String>,
    pub command_line_arguments: Option<String>,
    pub number_of_runs: u32,
    pub cpu_time_limit: f64,
    pub cpu_extra_time: f64,
    pub wall_time_limit: f64,
    pub memory_limit: u64,
    pub stack_limit: u64,
    pub max_processes_and_or_threads: u64,
    pub max_file_size: u64,
    pub redirect_stderr_to_stdout: bool,
    pub callback_url: Option<String>,
    /// Base64 of a zip, as sent.
    pub additional_files: Option<String>,
}

/// Rails-style validation errors: attribute → messages.
pub(crate) type Errors = BTreeMap<String, Vec<String>>;

fn add(errors: &mut Errors, field: &str, message: impl Into<String>) {
    errors.entry(field.to_string()).or_default().push(message.into());
}

/// `numericality: { greater_than: 0, less_than_or_equal_to: max }` on a number or numeric string.
fn number(body: &Value, field: &str, max: f64, max_text: String, errors: &mut Errors) -> Option<f64> {
    let v = match body.get(field) {
        None | Some(Value::Null) => return None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) if s.trim().is_empty() => return None,
        Some(Value::String(s)) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        Some(_) => None,
    };
    match v {
        None => add(errors, field, "is not a number"),
        Some(x) if x <= 0.0 => add(errors, field, "must be greater than 0"),
        Some(x) if x > max => add(errors, field, format!("must be less than or equal to {max_text}")),
        Some(x) => return Some(x),
    }
    None
}

fn boolean(body: &Value, field: &str) -> Option<bool> {
    match body.get(field)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => Some(matches!(s.as_str(), "true" | "1" | "t" | "TRUE" | "True")),
        Value::Number(n) => Some(n.as_f64() != Some(0.0)),
        _ => None,
    }
}

fn text(body: &Value, field: &str, errors: &mut Errors) -> Option<String> {
    match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            add(errors, field, "must be a string");
            None
        }
    }
}

fn decoded(body: &Value, field: &str, base64: bool, errors: &mut Errors) -> Option<Vec<u8>> {
    let s = text(body, field, errors)?;
    if !base64 {
        return Some(s.into_bytes());
    }
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    match LENIENT_B64.decode(compact.as_bytes()) {
        Ok(b) => Some(b),
        Err(_) => {
            add(errors, field, "is not valid base64");
            None
        }
    }
}

/// Formats seconds as Rails prints a decimal column: `5.0`, `0.152`, `0.17`.
pub(crate) fn decimal(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

/// Validates one submission body. `language` maps a `language_id` to the
/// runtime's defaults, `None` when no runtime has the id. Options that Judge0
/// lets an operator forbid and TVM cannot provide (per-process limits,
/// network) fail with Judge0's own "this option cannot be enabled".
///
/// # Errors
/// Every failed check, by attribute (answered as 422).
pub(crate) fn validate(
    body: &Value,
    base64: bool,
    bounds: &Bounds,
    callbacks_allowed: bool,
    language: impl Fn(u32) -> Option<Defaults>,
) -> Result<Spec, Errors> {
    let mut errors = Errors::new();
    if !body.is_object() {
        add(&mut errors, "base", "the request body must be a JSON object");
        return Err(errors);
    }
    let source_code = decoded(body, "source_code", base64, &mut errors);
    if source_code.as_ref().is_none_or(|s| s.iter().all(u8::is_ascii_whitespace)) && !errors.contains_key("source_code")
    {
        add(&mut errors, "source_code", "can't be blank");
    }
    let language_id = match body.get("language_id") {
        None | Some(Value::Null) => {
            add(&mut errors, "language_id", "can't be blank");
            None
        }
        Some(v) => {
            // Rails casts `109.0` and `"109"` to the integer 109; so do we (integral values only).
            let integral = |f: f64| (f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f)).then_some(f as u64);
            let n = v
                .as_u64()
                .or_else(|| v.as_f64().and_then(integral))
                .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()).and_then(integral));
            match n.and_then(|n| u32::try_from(n).ok()) {
                Some(id) => Some(id),
                None => {
                    add(&mut errors, "language_id", format!("language with id {v} doesn't exist"));
                    None
                }
            }
        }
    };
    let defaults = language_id.and_then(&language);
    if let (Some(id), None) = (language_id, defaults) {
        add(&mut errors, "language_id", format!("language with id {id} doesn't exist"));
    }
    let d = defaults.unwrap_or(Defaults {
        cpu_time_limit: 1.0,
        wall_time_limit: 1.0,
        memory_limit: 1,
        max_processes: 1,
        max_file_size: 1,
    });
    let stdin = decoded(body, "stdin", base64, &mut errors);
    let expected_output = decoded(body, "expected_output", base64, &mut errors);
    let option = |field: &str, errors: &mut Errors| {
        let v = text(body, field, errors).filter(|s| !s.is_empty());
        if v.as_ref().is_some_and(|s| s.chars().count() > bounds.max_option_chars) {
            add(errors, field, format!("is too long (maximum is {} characters)", bounds.max_option_chars));
        }
        v
    };
    let compiler_options = option("compiler_options", &mut errors);
    let command_line_arguments = option("command_line_arguments", &mut errors);
    let b = bounds;
    let runs =
        number(body, "number_of_runs", b.max_number_of_runs.into(), b.max_number_of_runs.to_string(), &mut errors);
    let cpu = number(body, "cpu_time_limit", b.max_cpu_time_limit, decimal(b.max_cpu_time_limit), &mut errors);
    let extra = number(body, "cpu_extra_time", b.max_cpu_extra_time, decimal(b.max_cpu_extra_time), &mut errors);
    let wall = number(body, "wall_time_limit", b.max_wall_time_limit, decimal(b.max_wall_time_limit), &mut errors);
    let mem = number(body, "memory_limit", b.max_memory_limit as f64, b.max_memory_limit.to_string(), &mut errors);
    let stack = number(body, "stack_limit", b.max_stack_limit as f64, b.max_stack_limit.to_string(), &mut errors);
    let procs =
        number(body, "max_processes_and_or_threads", b.max_processes as f64, b.max_processes.to_string(), &mut errors);
    let fsize = number(body, "max_file_size", b.max_file_size as f64, b.max_file_size.to_string(), &mut errors);
    for f in
        ["enable_per_process_and_thread_time_limit", "enable_per_process_and_thread_memory_limit", "enable_network"]
    {
        if boolean(body, f) == Some(true) {
            add(&mut errors, f, "this option cannot be enabled");
        }
    }
    let callback_url = text(body, "callback_url", &mut errors).filter(|s| !s.is_empty());
    if let Some(url) = &callback_url {
        if !callbacks_allowed {
            add(&mut errors, "callback_url", "callbacks are disabled on this server");
        } else if let Err(e) = reqwest::Url::parse(url).map_err(|e| e.to_string()).and_then(|u| {
            matches!(u.scheme(), "http" | "https").then_some(()).ok_or_else(|| "scheme must be http or https".into())
        }) {
            add(&mut errors, "callback_url", format!("is not a valid URL: {e}"));
        }
    }
    let additional_files = text(body, "additional_files", &mut errors).filter(|s| !s.is_empty());
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Spec {
        source_code: source_code.unwrap_or_default(),
        language_id: language_id.unwrap_or_default(),
        stdin,
        expected_output,
        compiler_options,
        command_line_arguments,
        number_of_runs: runs.map_or(1, |r| r as u32).max(1),
        cpu_time_limit: cpu.unwrap_or(d.cpu_time_limit),
        cpu_extra_time: extra.unwrap_or(CPU_EXTRA_TIME),
        wall_time_limit: wall.unwrap_or(d.wall_time_limit),
        memory_limit: mem.map_or(d.memory_limit, |m| m as u64),
        stack_limit: stack.map_or(STACK_LIMIT, |s| s as u64),
        max_processes_and_or_threads: procs.map_or(d.max_processes, |p| p as u64),
        max_file_size: fsize.map_or(d.max_file_size, |f| f as u64),
        redirect_stderr_to_stdout: boolean(body, "redirect_stderr_to_stdout").unwrap_or(false),
        callback_url,
        additional_files,
    })
}

/// Judge0's `strip_output`: trailing whitespace off every line and off the whole text.
pub(crate) fn strip_output(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let lines: Vec<&str> = s.split('\n').map(str::trim_end).collect();
    lines.join("\n").trim_end().to_string()
}

/// What one run produced, in Judge0's terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Outcome {
    pub status_id: u8,
    pub stdout: Option<Vec<u8>>,
    pub stderr: Option<Vec<u8>>,
    pub compile_output: Option<Vec<u8>>,
    /// CPU seconds.
    pub time: Option<f64>,
    /// Wall seconds.
    pub wall_time: Option<f64>,
    /// KB.
    pub memory: Option<u64>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub message: Option<String>,
}

/// The status of a signal death: Judge0's `find_runtime_error_by_status_code`.
pub(crate) fn signal_status(sig: i32) -> u8 {
    match sig {
        11 => 7,
        25 => 8,
        8 => 9,
        6 => 10,
        _ => 12,
    }
}

fn non_empty(b: &[u8]) -> Option<Vec<u8>> {
    (!b.is_empty()).then(|| b.to_vec())
}

/// Maps one execution to Judge0's outcome. `compile_output` is the compile
/// stage's streams interleaved (Judge0 runs the compiler with `2>&1`),
/// `run_output` the run stage's, used for `redirect_stderr_to_stdout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn outcome(
    compile: Option<&StageBody>,
    run: Option<&StageBody>,
    compile_output: &[u8],
    run_output: &[u8],
    internal_error: Option<&str>,
    spec: &Spec,
) -> Outcome {
    let mut o = Outcome { compile_output: non_empty(compile_output), ..Default::default() };
    if let Some(e) = internal_error {
        o.status_id = 13;
        o.message = Some(e.to_string());
        return o;
    }
    if let Some(c) = compile {
        if c.status != StageStatus::Ok {
            o.status_id = 6;
            o.message = match c.status {
                StageStatus::TimeLimitExceeded => Some("Compilation time limit exceeded.".into()),
                StageStatus::MemoryLimitExceeded => Some("Compilation memory limit exceeded.".into()),
                StageStatus::OutputLimitExceeded => Some("Compilation output limit exceeded.".into()),
                _ => c.exit_code.map(|n| format!("Exited with error status {n}")),
            };
            return o;
        }
    }
    let Some(r) = run else {
        o.status_id = 13;
        o.message = Some("the run stage did not start".into());
        return o;
    };
    if spec.redirect_stderr_to_stdout {
        o.stdout = non_empty(run_output);
    } else {
        o.stdout = non_empty(&r.stdout_bytes());
        o.stderr = non_empty(&r.stderr_bytes());
    }
    o.time = Some(r.cpu_time_ms as f64 / 1000.0);
    o.wall_time = Some(r.wall_time_ms as f64 / 1000.0);
    o.memory = Some(r.peak_memory_bytes / 1024);
    o.exit_code = r.exit_code;
    o.exit_signal = r.signal;
    let (status, message) = match r.status {
        StageStatus::Ok if o.time.is_some_and(|t| t > spec.cpu_time_limit) => (5, Some("Time limit exceeded".into())),
        StageStatus::Ok => {
            let accepted = spec
                .expected_output
                .as_ref()
                .is_none_or(|e| strip_output(e) == strip_output(o.stdout.as_deref().unwrap_or_default()));
            (if accepted { 3 } else { 4 }, None)
        }
        StageStatus::TimeLimitExceeded => (5, Some("Time limit exceeded".into())),
        // Judge0 has no status for it: Runtime Error (Other), and the message says what happened.
        StageStatus::MemoryLimitExceeded => (12, Some("Memory limit exceeded".into())),
        // Judge0's output goes to a file capped at max_file_size, so too much output dies of SIGXFSZ.
        StageStatus::OutputLimitExceeded => (8, Some("Output limit exceeded".into())),
        StageStatus::Failed => match r.signal {
            Some(sig) => (signal_status(sig), Some(format!("Caught fatal signal {sig}"))),
            None => (11, Some(format!("Exited with error status {}", r.exit_code.unwrap_or(-1)))),
        },
    };
    o.status_id = status;
    o.message = message;
    o
}

/// A stored submission: its request and, once finished, its outcome.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub token: String,
    pub spec: Spec,
    /// Judge0's `{id, name}` of the language.
    pub language_name: String,
    pub created_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// 1 queued, 2 processing, else the final status.
    pub outcome: Outcome,
}

/// The submission cannot be shown as text; Judge0 asks for `base64_encoded=true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotUtf8;

/// Judge0's message for [`NotUtf8`].
pub(crate) const NOT_UTF8: &str =
    "some attributes for this submission cannot be converted to UTF-8, use base64_encoded=true query parameter";

fn text_value(bytes: Option<&[u8]>, base64: bool) -> Result<Value, NotUtf8> {
    match bytes {
        None => Ok(Value::Null),
        Some(b) if base64 => Ok(json!(B64.encode(b))),
        Some(b) => std::str::from_utf8(b).map(|s| json!(s)).map_err(|_| NotUtf8),
    }
}

fn timestamp(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| json!(humantime::format_rfc3339_millis(t).to_string()))
}

/// Serializes `r` with the requested `fields`, texts as base64 when `base64`.
///
/// # Errors
/// [`NotUtf8`] when a text is not UTF-8 and `base64` is off.
pub(crate) fn serialize(r: &Record, fields: &[&str], base64: bool) -> Result<Value, NotUtf8> {
    let s = &r.spec;
    let o = &r.outcome;
    let mut m = Map::new();
    for f in fields {
        let v = match *f {
            "source_code" => text_value(Some(&s.source_code), base64)?,
            "language_id" => json!(s.language_id),
            "stdin" => text_value(s.stdin.as_deref(), base64)?,
            "expected_output" => text_value(s.expected_output.as_deref(), base64)?,
            "stdout" => text_value(o.stdout.as_deref(), base64)?,
            "status_id" => json!(o.status_id),
            "created_at" => timestamp(Some(r.created_at)),
            "finished_at" => timestamp(r.finished_at),
            "time" => o.time.map_or(Value::Null, |t| json!(decimal(t))),
            "memory" => json!(o.memory),
            "stderr" => text_value(o.stderr.as_deref(), base64)?,
            "token" => json!(r.token),
            "number_of_runs" => json!(s.number_of_runs),
            "cpu_time_limit" => json!(decimal(s.cpu_time_limit)),
            "cpu_extra_time" => json!(decimal(s.cpu_extra_time)),
            "wall_time_limit" => json!(decimal(s.wall_time_limit)),
            "memory_limit" => json!(s.memory_limit),
            "stack_limit" => json!(s.stack_limit),
            "max_processes_and_or_threads" => json!(s.max_processes_and_or_threads),
            "enable_per_process_and_thread_time_limit" | "enable_per_process_and_thread_memory_limit" => json!(false),
            "max_file_size" => json!(s.max_file_size),
            "compile_output" => text_value(o.compile_output.as_deref(), base64)?,
            "exit_code" => json!(o.exit_code),
            "exit_signal" => json!(o.exit_signal),
            "message" => text_value(o.message.as_deref().map(str::as_bytes), base64)?,
            "wall_time" => o.wall_time.map_or(Value::Null, |t| json!(decimal(t))),
            "compiler_options" => json!(s.compiler_options),
            "command_line_arguments" => json!(s.command_line_arguments),
            "redirect_stderr_to_stdout" => json!(s.redirect_stderr_to_stdout),
            "callback_url" => json!(s.callback_url),
            "additional_files" => json!(s.additional_files),
            "enable_network" => json!(false),
            "post_execution_filesystem" => Value::Null,
            "status" => json!({"id": o.status_id, "description": status_description(o.status_id)}),
            "language" => json!({"id": s.language_id, "name": r.language_name}),
            _ => continue,
        };
        m.insert((*f).to_string(), v);
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            max_number_of_runs: 20,
            max_cpu_time_limit: 120.0,
            max_cpu_extra_time: 5.0,
            max_wall_time_limit: 120.0,
            max_memory_limit: 1_048_576,
            max_stack_limit: 128_000,
            max_processes: 512,
            max_file_size: 262_144,
            max_option_chars: 512,
        }
    }

    fn defaults(id: u32) -> Option<Defaults> {
        (id == 92).then_some(Defaults {
            cpu_time_limit: 10.0,
            wall_time_limit: 10.0,
            memory_limit: 262_144,
            max_processes: 64,
            max_file_size: 16_384,
        })
    }

    fn check(body: Value) -> Result<Spec, Errors> {
        validate(&body, false, &bounds(), false, defaults)
    }

    #[test]
    fn fields_default_star_and_invalid() {
        assert_eq!(parse_fields(None).unwrap(), DEFAULT_FIELDS);
        assert_eq!(parse_fields(Some("")).unwrap(), DEFAULT_FIELDS);
        assert_eq!(parse_fields(Some("*")).unwrap().len(), ALL_FIELDS.len());
        assert_eq!(parse_fields(Some("stdout, token")).unwrap(), vec!["stdout", "token"]);
        assert_eq!(parse_fields(Some("stdout,foo,bar")).unwrap_err(), "invalid fields: [foo, bar]");
    }

    #[test]
    fn validation_errors_are_rails_shaped() {
        let e = check(json!({})).unwrap_err();
        assert_eq!(e["source_code"], vec!["can't be blank"]);
        assert_eq!(e["language_id"], vec!["can't be blank"]);
        let e = check(json!({"source_code": "x", "language_id": 71})).unwrap_err();
        assert_eq!(e["language_id"], vec!["language with id 71 doesn't exist"]);
        let e = check(json!({
            "source_code": "x", "language_id": 92, "cpu_time_limit": 500, "memory_limit": 0,
            "wall_time_limit": "abc", "number_of_runs": 21, "enable_network": true,
            "enable_per_process_and_thread_time_limit": true, "callback_url": "http://example.com/cb",
        }))
        .unwrap_err();
        assert_eq!(e["cpu_time_limit"], vec!["must be less than or equal to 120.0"]);
        assert_eq!(e["memory_limit"], vec!["must be greater than 0"]);
        assert_eq!(e["wall_time_limit"], vec!["is not a number"]);
        assert_eq!(e["number_of_runs"], vec!["must be less than or equal to 20"]);
        assert_eq!(e["enable_network"], vec!["this option cannot be enabled"]);
        assert_eq!(e["enable_per_process_and_thread_time_limit"], vec!["this option cannot be enabled"]);
        assert_eq!(e["callback_url"], vec!["callbacks are disabled on this server"]);
        let e = validate(
            &json!({"source_code": "x", "language_id": 92, "callback_url": "ftp://x"}),
            false,
            &bounds(),
            true,
            defaults,
        )
        .unwrap_err();
        assert!(e["callback_url"][0].starts_with("is not a valid URL"), "{e:?}");
        let e = check(json!({"source_code": "x", "language_id": 92, "compiler_options": "x".repeat(513)})).unwrap_err();
        assert_eq!(e["compiler_options"], vec!["is too long (maximum is 512 characters)"]);
    }

    #[test]
    fn language_id_is_cast_as_rails_casts_an_integer() {
        for id in [json!(92), json!(92.0), json!("92"), json!(" 92.0 ")] {
            assert_eq!(check(json!({"source_code": "x", "language_id": id})).unwrap().language_id, 92, "{id}");
        }
        for id in [json!(92.5), json!(-92), json!("92x"), json!(true), json!(1e20)] {
            let e = check(json!({"source_code": "x", "language_id": id})).unwrap_err();
            assert_eq!(e["language_id"], vec![format!("language with id {id} doesn't exist")]);
        }
    }

    #[test]
    fn defaults_and_base64_decoding() {
        let s = check(json!({"source_code": "print(1)", "language_id": "92", "cpu_time_limit": "2.5"})).unwrap();
        assert_eq!((s.cpu_time_limit, s.wall_time_limit, s.memory_limit), (2.5, 10.0, 262_144));
        assert_eq!((s.cpu_extra_time, s.stack_limit, s.number_of_runs), (1.0, 64_000, 1));
        let b = json!({"source_code": "cHJpbnQoMSk=\n", "language_id": 92, "stdin": "aGk", "expected_output": "MQ=="});
        let s = validate(&b, true, &bounds(), false, defaults).unwrap();
        assert_eq!(s.source_code, b"print(1)");
        assert_eq!(s.stdin.as_deref(), Some(&b"hi"[..]));
        let e =
            validate(&json!({"source_code": "!!", "language_id": 92}), true, &bounds(), false, defaults).unwrap_err();
        assert_eq!(e["source_code"], vec!["is not valid base64"]);
    }

    #[test]
    fn comparison_ignores_trailing_whitespace_per_line() {
        assert_eq!(strip_output(b"a  \nb\t\n\n"), "a\nb");
        assert_eq!(strip_output(b"a\nb"), strip_output(b"a \nb\n"));
        assert_ne!(strip_output(b" a"), strip_output(b"a"), "leading whitespace counts");
    }

    fn run(status: StageStatus, exit: Option<i32>, sig: Option<i32>, cpu_ms: u64) -> StageBody {
        StageBody {
            status,
            exit_code: exit,
            signal: sig,
            stdout: "out\n".into(),
            stderr: "err".into(),
            stdout_base64: None,
            stderr_base64: None,
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 1500,
            cpu_time_ms: cpu_ms,
            peak_memory_bytes: 10 * 1024 * 1024,
        }
    }

    #[test]
    fn statuses_from_verdicts_and_signals() {
        let mut spec = check(json!({"source_code": "x", "language_id": 92})).unwrap();
        let st = |spec: &Spec, r: StageBody| outcome(None, Some(&r), b"", b"errout", None, spec);
        let ok = st(&spec, run(StageStatus::Ok, Some(0), None, 152));
        assert_eq!((ok.status_id, ok.time, ok.memory, ok.wall_time), (3, Some(0.152), Some(10240), Some(1.5)));
        assert_eq!(ok.stdout.as_deref(), Some(&b"out\n"[..]));
        spec.expected_output = Some(b"out   \n\n".to_vec());
        assert_eq!(st(&spec, run(StageStatus::Ok, Some(0), None, 1)).status_id, 3);
        spec.expected_output = Some(b"other".to_vec());
        assert_eq!(st(&spec, run(StageStatus::Ok, Some(0), None, 1)).status_id, 4);
        assert_eq!(st(&spec, run(StageStatus::Ok, Some(0), None, 10_500)).status_id, 5, "over cpu_time_limit");
        assert_eq!(st(&spec, run(StageStatus::TimeLimitExceeded, None, Some(9), 1)).status_id, 5);
        for (sig, id) in [(11, 7), (25, 8), (8, 9), (6, 10), (9, 12)] {
            let o = st(&spec, run(StageStatus::Failed, None, Some(sig), 1));
            assert_eq!((o.status_id, o.exit_signal), (id, Some(sig)));
        }
        let o = st(&spec, run(StageStatus::Failed, Some(3), None, 1));
        assert_eq!((o.status_id, o.message.as_deref()), (11, Some("Exited with error status 3")));
        let o = st(&spec, run(StageStatus::MemoryLimitExceeded, None, Some(9), 1));
        assert_eq!((o.status_id, o.message.as_deref()), (12, Some("Memory limit exceeded")));
        assert_eq!(st(&spec, run(StageStatus::OutputLimitExceeded, None, None, 1)).status_id, 8);
        let c = run(StageStatus::Failed, Some(1), None, 1);
        let o = outcome(Some(&c), None, b"main.c:1: error", b"", None, &spec);
        assert_eq!((o.status_id, o.compile_output.as_deref()), (6, Some(&b"main.c:1: error"[..])));
        assert_eq!(outcome(None, None, b"", b"", Some("VM failed"), &spec).status_id, 13);
        spec.redirect_stderr_to_stdout = true;
        let o = st(&spec, run(StageStatus::Ok, Some(0), None, 1));
        assert_eq!((o.stdout.as_deref(), o.stderr.as_deref()), (Some(&b"errout"[..]), None));
    }

    #[test]
    fn serialization_units_and_encodings() {
        let spec = check(json!({"source_code": "print(1)", "language_id": 92})).unwrap();
        let mut r = Record {
            token: "t".into(),
            spec,
            language_name: "Python (3.11.2)".into(),
            created_at: SystemTime::UNIX_EPOCH,
            finished_at: None,
            outcome: Outcome {
                status_id: 3,
                stdout: Some(b"1\n".to_vec()),
                time: Some(0.152),
                memory: Some(9000),
                ..Default::default()
            },
        };
        let v = serialize(&r, ALL_FIELDS, false).unwrap();
        assert_eq!(v["time"], "0.152");
        assert_eq!(v["cpu_time_limit"], "10.0");
        assert_eq!(v["memory"], 9000);
        assert_eq!(v["status"], json!({"id": 3, "description": "Accepted"}));
        assert_eq!(v["language"], json!({"id": 92, "name": "Python (3.11.2)"}));
        assert_eq!(v["created_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["finished_at"], Value::Null);
        let v = serialize(&r, &["stdout", "token"], true).unwrap();
        assert_eq!(v, json!({"stdout": "MQo=", "token": "t"}));
        r.outcome.stdout = Some(vec![0xff]);
        assert_eq!(serialize(&r, DEFAULT_FIELDS, false), Err(NotUtf8));
        assert_eq!(decimal(5.0), "5.0");
        assert_eq!(decimal(0.17), "0.17");
    }
}
