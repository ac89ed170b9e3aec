//! Piston v2's request validation and result shape, as pure functions.
//!
//! Validation follows Piston's `get_job` (api/src/api/v2.js) check by check
//! and message by message; the result follows its `safe_call` (api/src/job.js):
//! per stage `stdout`, `stderr`, `output`, `code`, `signal` (a name),
//! `message`, `status` (`RE` exited non-zero, `SG` killed by a signal, `TO`
//! time limit, `OL`/`EL` stdout/stderr limit, `XX` internal error; `null`
//! when the stage succeeded), `cpu_time` and `wall_time` (ms) and `memory`
//! (bytes). Differences are listed in docs/compat.md.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{json, Map, Value};
use tvm_protocol::{Limits, StageStatus};

use crate::api::StageBody;
use crate::compat::signal_name;

/// Node's `Buffer.from(s, 'base64')` accepts missing padding; so does this.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A validated `POST /api/v2/execute` (or WebSocket `init`) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PistonJob {
    /// Requested `language` (name or alias).
    pub language: String,
    /// Requested semver range.
    pub version: String,
    /// Files: name (Piston's `file{i}.code` when absent, the runtime's entry name for the first code file) and bytes.
    pub files: Vec<(String, Vec<u8>)>,
    /// Index of the entry file: Piston runs the first `utf8` file.
    pub entry: usize,
    /// Standard input, with the trailing newline Piston adds when missing.
    pub stdin: Vec<u8>,
    /// Program arguments.
    pub args: Vec<String>,
    /// `compile_timeout`, `compile_cpu_time`, `compile_memory_limit`.
    pub compile: StageLimits,
    /// `run_timeout`, `run_cpu_time`, `run_memory_limit`.
    pub run: StageLimits,
}

/// Limits a Piston request may set for one stage; `None` keeps TVM's default for the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StageLimits {
    /// `*_timeout`: wall-clock ms.
    pub wall_ms: Option<u64>,
    /// `*_cpu_time`: CPU ms.
    pub cpu_ms: Option<u64>,
    /// `*_memory_limit`: bytes.
    pub memory_bytes: Option<u64>,
}

/// The fields of a body, before the runtime is known: the first three checks of Piston.
///
/// # Errors
/// Piston's message for the first field that is wrong.
pub(crate) fn language_and_version(body: &Value) -> Result<(String, String), String> {
    let lang = body.get("language").and_then(Value::as_str).filter(|s| !s.is_empty());
    let Some(language) = lang else { return Err("language is required as a string".into()) };
    let ver = body.get("version").and_then(Value::as_str).filter(|s| !s.is_empty());
    let Some(version) = ver else { return Err("version is required as a string".into()) };
    Ok((language.to_string(), version.to_string()))
}

/// Piston's checks of `files` that come before runtime resolution: an array, each with a string `content`.
///
/// # Errors
/// Piston's message for the first failure.
pub(crate) fn check_files(body: &Value) -> Result<(), String> {
    let Some(files) = body.get("files").and_then(Value::as_array) else {
        return Err("files is required as an array".into());
    };
    for (i, f) in files.iter().enumerate() {
        if !f.get("content").is_some_and(Value::is_string) {
            return Err(format!("files[{i}].content is required as a string"));
        }
    }
    Ok(())
}

/// Validates the files, then (once the caller resolved the runtime: `entry_name`
/// and `max`) everything else, in Piston's order and with its messages. Checks
/// Piston does not make but TVM needs (types of `stdin`/`args`, decodable
/// contents) come last and say what is wrong the same way.
///
/// # Errors
/// The message of the first failed check (answered as 400 `{"message"}`).
pub(crate) fn validate(body: &Value, entry_name: &str, max: &Limits) -> Result<PistonJob, String> {
    let (language, version) = language_and_version(body)?;
    check_files(body)?;
    let files = body.get("files").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let encoding = |f: &Value| match f.get("encoding").and_then(Value::as_str) {
        Some(e @ ("base64" | "hex" | "utf8")) => e.to_string(),
        _ => "utf8".to_string(),
    };
    let Some(entry) = files.iter().position(|f| encoding(f) == "utf8") else {
        return Err("files must include at least one utf8 encoded file".into());
    };
    let mut compile = StageLimits::default();
    let mut run = StageLimits::default();
    for constraint in ["memory_limit", "timeout", "cpu_time"] {
        for stage in ["compile", "run"] {
            let name = format!("{stage}_{constraint}");
            let configured = match constraint {
                "memory_limit" => max.memory_bytes,
                "timeout" => max.wall_ms,
                _ => max.cpu_ms,
            };
            let value = match body.get(&name) {
                // Piston skips falsy values: absent, null, 0, false, "".
                None | Some(Value::Null) | Some(Value::Bool(false)) => continue,
                Some(Value::String(s)) if s.is_empty() => continue,
                Some(Value::Number(n)) if n.as_f64() == Some(0.0) => continue,
                Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(_) => return Err(format!("If specified, {name} must be a number")),
            };
            // Piston's default memory limits are -1 ("unlimited"), which skips the remaining checks
            // and which clients send explicitly; TVM always has a limit, so it means "the default".
            if constraint == "memory_limit" && value < 0.0 {
                continue;
            }
            if value > configured as f64 {
                return Err(format!("{name} cannot exceed the configured limit of {configured}"));
            }
            if value < 0.0 || value.is_nan() {
                return Err(format!("{name} must be non-negative"));
            }
            // Whole units, at least one: a fraction of a millisecond or byte means the smallest limit.
            let v = Some((value as u64).max(1));
            let target = if stage == "compile" { &mut compile } else { &mut run };
            match constraint {
                "memory_limit" => target.memory_bytes = v,
                "timeout" => target.wall_ms = v,
                _ => target.cpu_ms = v,
            }
        }
    }
    let mut out = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let content = f.get("content").and_then(Value::as_str).unwrap_or_default();
        let bytes = match encoding(f).as_str() {
            "base64" => LENIENT_B64
                .decode(content.trim_end())
                .map_err(|e| format!("files[{i}].content is not valid base64: {e}"))?,
            "hex" => hex::decode(content).map_err(|e| format!("files[{i}].content is not valid hex: {e}"))?,
            _ => content.as_bytes().to_vec(),
        };
        let name = match f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            // The entry keeps the name TVM's runtime expects (main.c, Main.java), so compilers find it.
            None if i == entry => entry_name.to_string(),
            None => format!("file{i}.code"),
        };
        out.push((name, bytes));
    }
    let mut stdin = match body.get("stdin") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("If specified, stdin must be a string".into()),
    };
    if !stdin.ends_with('\n') {
        stdin.push('\n');
    }
    let args = match body.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Bool(_) => Ok(v.to_string()),
                _ => Err("args must be an array of strings".to_string()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("If specified, args must be an array".into()),
    };
    Ok(PistonJob { language, version, files: out, entry, stdin: stdin.into_bytes(), args, compile, run })
}

/// `status` and `message` of a stage, as isolate reports them to Piston.
fn status_and_message(s: &StageBody) -> (Option<&'static str>, Option<String>) {
    match s.status {
        StageStatus::Ok => (None, None),
        StageStatus::Failed => match s.signal {
            Some(sig) => (Some("SG"), Some(format!("Caught fatal signal {sig}"))),
            None => (Some("RE"), Some(format!("Exited with error status {}", s.exit_code.unwrap_or(-1)))),
        },
        StageStatus::TimeLimitExceeded => (Some("TO"), Some("Time limit exceeded".into())),
        // Piston has no status of its own for this: isolate reports the OOM kill as a signal.
        StageStatus::MemoryLimitExceeded => (Some("SG"), Some("Memory limit exceeded".into())),
        StageStatus::OutputLimitExceeded if s.stdout_truncated => (Some("OL"), Some("stdout length exceeded".into())),
        StageStatus::OutputLimitExceeded => (Some("EL"), Some("stderr length exceeded".into())),
    }
}

/// One stage in Piston's shape; `output` is both streams in arrival order.
pub(crate) fn stage_json(s: &StageBody, output: &[u8]) -> Value {
    let (status, message) = status_and_message(s);
    // A stage TVM ended for a limit reads SIGKILL, as Piston (isolate) reports TO/OL/EL, whatever
    // ended it here: the agent stops a time limit with SIGTERM and a grace before SIGKILL, so the
    // real signal (in the native API) is often SIGTERM.
    let killed = matches!(
        s.status,
        StageStatus::TimeLimitExceeded | StageStatus::MemoryLimitExceeded | StageStatus::OutputLimitExceeded
    );
    let signal = match s.signal {
        _ if killed => Some("SIGKILL".to_string()),
        Some(n) => signal_name(n).map(str::to_string),
        None => None,
    };
    json!({
        "stdout": s.stdout,
        "stderr": s.stderr,
        "output": String::from_utf8_lossy(output),
        "code": s.exit_code,
        "signal": signal,
        "message": message,
        "status": status,
        "cpu_time": s.cpu_time_ms,
        "wall_time": s.wall_time_ms,
        "memory": s.peak_memory_bytes,
    })
}

/// A stage that never ran because TVM failed underneath it: status `XX`.
pub(crate) fn internal_stage(message: &str) -> Value {
    json!({
        "stdout": "", "stderr": "", "output": "", "code": null, "signal": null,
        "message": message, "status": "XX", "cpu_time": 0, "wall_time": 0, "memory": 0,
    })
}

/// The whole result: `language`, `version`, `run`, and `compile` for compiled
/// runtimes. When compilation failed, `run` repeats the compile stage, as Piston does.
pub(crate) fn result_json(language: &str, version: &str, compile: Option<Value>, run: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("language".into(), json!(language));
    m.insert("version".into(), json!(version));
    let run = run.or_else(|| compile.clone()).unwrap_or_else(|| internal_stage("the run stage did not start"));
    m.insert("run".into(), run);
    if let Some(c) = compile {
        m.insert("compile".into(), c);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max() -> Limits {
        Limits {
            wall_ms: 120_000,
            cpu_ms: 120_000,
            memory_bytes: 1 << 30,
            pids: 512,
            output_bytes: 1 << 24,
            file_size_bytes: 1 << 28,
            open_files: 4096,
        }
    }

    fn err(body: Value) -> String {
        validate(&body, "main.py", &max()).unwrap_err()
    }

    #[test]
    fn validation_messages_are_pistons() {
        let files = json!([{"content": "print(1)"}]);
        assert_eq!(err(json!({})), "language is required as a string");
        assert_eq!(err(json!({"language": 3})), "language is required as a string");
        assert_eq!(err(json!({"language": "py"})), "version is required as a string");
        assert_eq!(err(json!({"language": "py", "version": "*"})), "files is required as an array");
        assert_eq!(err(json!({"language": "py", "version": "*", "files": {}})), "files is required as an array");
        assert_eq!(
            err(json!({"language": "py", "version": "*", "files": [{"content": "x"}, {"name": "a"}]})),
            "files[1].content is required as a string"
        );
        assert_eq!(
            err(json!({"language": "py", "version": "*", "files": [{"content": "eA==", "encoding": "base64"}]})),
            "files must include at least one utf8 encoded file"
        );
        let with = |k: &str, v: Value| {
            let mut b = json!({"language": "py", "version": "*", "files": files});
            b[k] = v;
            err(b)
        };
        assert_eq!(with("run_timeout", json!("3000")), "If specified, run_timeout must be a number");
        assert_eq!(with("run_timeout", json!(120_001)), "run_timeout cannot exceed the configured limit of 120000");
        assert_eq!(with("compile_timeout", json!(-1)), "compile_timeout must be non-negative");
        assert_eq!(with("run_cpu_time", json!(true)), "If specified, run_cpu_time must be a number");
        assert_eq!(with("stdin", json!(5)), "If specified, stdin must be a string");
        assert_eq!(with("args", json!("a b")), "If specified, args must be an array");
        assert_eq!(with("args", json!([{}])), "args must be an array of strings");
    }

    #[test]
    fn a_valid_body_keeps_pistons_defaults() {
        let b = json!({
            "language": "python", "version": "3.x",
            "files": [{"content": "AAE=", "encoding": "base64", "name": "blob"}, {"content": "print(1)"}, {"content": "x"},
                      {"content": "6869", "encoding": "hex", "name": "h.txt"}],
            "stdin": "a", "args": ["x", 1, true], "run_timeout": 2500, "compile_timeout": 0, "run_memory_limit": 1e6,
            "compile_memory_limit": -1,
        });
        let j = validate(&b, "main.py", &max()).unwrap();
        assert_eq!(j.entry, 1, "the first utf8 file is the entry");
        assert_eq!(j.files[0], ("blob".to_string(), vec![0, 1]));
        assert_eq!(j.files[1].0, "main.py", "an unnamed entry gets the runtime's entry name");
        assert_eq!(j.files[2].0, "file2.code", "other unnamed files get Piston's names");
        assert_eq!(j.files[3].1, b"hi");
        assert_eq!(j.stdin, b"a\n", "Piston ends stdin with a newline");
        assert_eq!(j.args, vec!["x", "1", "true"]);
        assert_eq!(j.run, StageLimits { wall_ms: Some(2500), cpu_ms: None, memory_bytes: Some(1_000_000) });
        assert_eq!(j.compile, StageLimits::default(), "0 and a memory limit of -1 mean unset, as in Piston");
    }

    fn stage(status: StageStatus, exit: Option<i32>, signal: Option<i32>) -> StageBody {
        StageBody {
            status,
            exit_code: exit,
            signal,
            stdout: "o".into(),
            stderr: "e".into(),
            stdout_base64: None,
            stderr_base64: None,
            stdout_truncated: false,
            stderr_truncated: status == StageStatus::OutputLimitExceeded,
            wall_time_ms: 12,
            cpu_time_ms: 7,
            peak_memory_bytes: 4096,
        }
    }

    #[test]
    fn stages_map_to_isolate_statuses() {
        let ok = stage_json(&stage(StageStatus::Ok, Some(0), None), b"eo");
        assert_eq!(ok["status"], Value::Null);
        assert_eq!(ok["message"], Value::Null);
        assert_eq!((ok["code"].clone(), ok["output"].clone()), (json!(0), json!("eo")));
        assert_eq!(
            (ok["cpu_time"].clone(), ok["wall_time"].clone(), ok["memory"].clone()),
            (json!(7), json!(12), json!(4096))
        );
        let re = stage_json(&stage(StageStatus::Failed, Some(3), None), b"");
        assert_eq!((re["status"].clone(), re["message"].clone()), (json!("RE"), json!("Exited with error status 3")));
        let sg = stage_json(&stage(StageStatus::Failed, None, Some(11)), b"");
        assert_eq!(
            (sg["status"].clone(), sg["signal"].clone(), sg["code"].clone()),
            (json!("SG"), json!("SIGSEGV"), Value::Null)
        );
        let to = stage_json(&stage(StageStatus::TimeLimitExceeded, None, Some(9)), b"");
        assert_eq!((to["status"].clone(), to["signal"].clone()), (json!("TO"), json!("SIGKILL")));
        let term = stage_json(&stage(StageStatus::TimeLimitExceeded, None, Some(15)), b"");
        assert_eq!(term["signal"], "SIGKILL", "the agent's SIGTERM grace is not Piston's business");
        let el = stage_json(&stage(StageStatus::OutputLimitExceeded, None, None), b"");
        assert_eq!((el["status"].clone(), el["signal"].clone()), (json!("EL"), json!("SIGKILL")));
        let me = stage_json(&stage(StageStatus::MemoryLimitExceeded, None, Some(9)), b"");
        assert_eq!((me["status"].clone(), me["message"].clone()), (json!("SG"), json!("Memory limit exceeded")));
        assert_eq!(internal_stage("boom")["status"], "XX");
    }

    #[test]
    fn a_failed_compile_is_also_the_run() {
        let c = stage_json(&stage(StageStatus::Failed, Some(1), None), b"err");
        let r = result_json("c", "14.2.0", Some(c.clone()), None);
        assert_eq!(r["run"], c);
        assert_eq!(r["compile"], c);
        let r = result_json("python", "3.13.5", None, Some(json!({"x": 1})));
        assert!(r.get("compile").is_none(), "interpreted runtimes have no compile key");
    }
}
