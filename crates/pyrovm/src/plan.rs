//! Turning an [`ExecutionRequest`] (CLI or API) into a guest [`Job`].
//!
//! Everything a caller can get wrong is checked here, before any VM boots,
//! and reported as a [`PlanError`] naming the offending field.

use serde::{Deserialize, Serialize};
use tvm_config::{Catalog, Runtime};
use tvm_protocol::{validate_file_path, Command, File, Job, Limits, TestRun};

/// Most files one submission may carry.
pub const MAX_FILES: usize = 64;
/// Most bytes all files of one submission may carry.
pub const MAX_FILES_BYTES: u64 = 16 << 20;
/// Most bytes of stdin.
pub const MAX_STDIN_BYTES: u64 = 16 << 20;
/// Most program arguments, and bytes per argument.
pub const MAX_ARGS: usize = 256;
/// Most bytes of one program argument.
pub const MAX_ARG_BYTES: usize = 4096;
/// Most bytes of a file name (the whole relative path), as the guest checks it.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// Most parts (directories and the file) of a file name, as the guest checks it.
pub const MAX_FILE_NAME_PARTS: usize = 8;
/// Least memory limit of a stage, in bytes (1 MiB). No runtime's process
/// starts in less (the dynamic loader and libc alone map more), so a smaller
/// value is a unit mistake (KiB meant as MiB, `--memory-limit 1K`) and gets a
/// clear error instead of a VM booted to report `memory_limit_exceeded`.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// A submitted source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path relative to the work dir.
    pub name: String,
    /// Content.
    #[serde(with = "tvm_protocol::b64")]
    pub content: Vec<u8>,
}

/// Per-stage limit overrides; `None` keeps the runtime's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    /// Wall-clock time in milliseconds.
    pub wall_time_ms: Option<u64>,
    /// CPU time in milliseconds.
    pub cpu_time_ms: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    pub processes: Option<u64>,
    /// Captured bytes per output stream.
    pub output_bytes: Option<u64>,
    /// Largest file the program may write.
    pub file_size_bytes: Option<u64>,
}

/// One execution as a caller describes it. Shared by the CLI and the HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRequest {
    /// Runtime id or alias (`python`, `python-3.11`, ...).
    pub runtime: String,
    /// Source files; the first is the entry point unless `entry` names one.
    pub files: Vec<SourceFile>,
    /// Entry file name.
    pub entry: Option<String>,
    /// Standard input of the run stage.
    #[serde(with = "tvm_protocol::b64", default)]
    pub stdin: Vec<u8>,
    /// Program arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Limits of the run stage.
    #[serde(default)]
    pub run_limits: LimitRequest,
    /// Limits of the compile stage.
    #[serde(default)]
    pub compile_limits: LimitRequest,
}

/// Why a request cannot run. Each variant names what the caller must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No runtime has that id or alias.
    #[error("unknown runtime {0:?} (see `tvm runtimes`)")]
    UnknownRuntime(String),
    /// The runtime exists in the catalog but cannot be built here.
    #[error("runtime {id} is unavailable: {reason}")]
    RuntimeUnavailable {
        /// Runtime id.
        id: String,
        /// Catalog's reason.
        reason: String,
    },
    /// Nothing to run.
    #[error("no files submitted")]
    NoFiles,
    /// Too many files.
    #[error("{0} files submitted; at most {MAX_FILES} are allowed")]
    TooManyFiles(usize),
    /// Files too large in total.
    #[error("files total {0} bytes; at most {MAX_FILES_BYTES} are allowed")]
    FilesTooLarge(u64),
    /// A file name is unsafe or malformed.
    #[error("bad file name: {0}")]
    BadFileName(String),
    /// Two files share a name.
    #[error("file {0:?} is submitted twice")]
    DuplicateFile(String),
    /// One file's name is a directory in another's path (`x` and `x/y`):
    /// the guest cannot create both.
    #[error("file {file:?} is also used as a directory by {other:?}")]
    PathConflict {
        /// The file whose name is a directory elsewhere.
        file: String,
        /// A file inside that directory.
        other: String,
    },
    /// The named entry file is not among the files.
    #[error("entry file {0:?} is not among the submitted files")]
    EntryNotFound(String),
    /// stdin is too large.
    #[error("stdin is {0} bytes; at most {MAX_STDIN_BYTES} are allowed")]
    StdinTooLarge(u64),
    /// Too many or too long arguments.
    #[error("arguments: {0}")]
    BadArgs(String),
    /// The tests of a compile-once-run-many request are malformed or too many.
    #[error("tests: {0}")]
    BadTests(String),
    /// A limit is below its least value (1; [`MIN_MEMORY_BYTES`] for
    /// memory) or above the operator's maximum.
    #[error("{stage} limit {field} = {value} is out of range ({min}..={max})")]
    LimitOutOfRange {
        /// `run` or `compile`.
        stage: &'static str,
        /// Field name as in the API.
        field: &'static str,
        /// Requested value.
        value: u64,
        /// Least allowed value.
        min: u64,
        /// Operator maximum.
        max: u64,
    },
}

impl PlanError {
    /// The request field at fault, for API error bodies.
    pub fn field(&self) -> Option<&'static str> {
        Some(match self {
            PlanError::UnknownRuntime(_) | PlanError::RuntimeUnavailable { .. } => "runtime",
            PlanError::NoFiles
            | PlanError::TooManyFiles(_)
            | PlanError::FilesTooLarge(_)
            | PlanError::BadFileName(_)
            | PlanError::DuplicateFile(_)
            | PlanError::PathConflict { .. } => "files",
            PlanError::EntryNotFound(_) => "entry",
            PlanError::StdinTooLarge(_) => "stdin",
            PlanError::BadArgs(_) => "args",
            PlanError::BadTests(_) => "tests",
            PlanError::LimitOutOfRange { stage: "compile", .. } => "compile_limits",
            PlanError::LimitOutOfRange { .. } => "run_limits",
        })
    }
}

/// A validated request, ready for a VM.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The runtime chosen.
    pub runtime: Runtime,
    /// What the agent will run.
    pub job: Job,
    /// Guest RAM this job needs, in MiB (limits + work dir + overhead).
    pub vm_memory_mib: u64,
}

/// Validates `req` against the catalog and builds the job.
pub fn plan(catalog: &Catalog, req: &ExecutionRequest, vm_overhead_mib: u64) -> Result<Plan, PlanError> {
    let runtime = catalog.get(&req.runtime).ok_or_else(|| PlanError::UnknownRuntime(req.runtime.clone()))?;
    if let Some(reason) = &runtime.unavailable {
        return Err(PlanError::RuntimeUnavailable { id: runtime.id.clone(), reason: reason.clone() });
    }
    if req.files.is_empty() {
        return Err(PlanError::NoFiles);
    }
    if req.files.len() > MAX_FILES {
        return Err(PlanError::TooManyFiles(req.files.len()));
    }
    let total: u64 = req.files.iter().map(|f| f.content.len() as u64).sum();
    if total > MAX_FILES_BYTES {
        return Err(PlanError::FilesTooLarge(total));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &req.files {
        validate_file_path(&f.name).map_err(PlanError::BadFileName)?;
        if !seen.insert(f.name.as_str()) {
            return Err(PlanError::DuplicateFile(f.name.clone()));
        }
    }
    // `x` and `x/y` cannot both exist: refuse here rather than fail inside the guest.
    for f in &req.files {
        for (i, _) in f.name.match_indices('/') {
            if let Some(file) = seen.get(&f.name[..i]) {
                return Err(PlanError::PathConflict { file: file.to_string(), other: f.name.clone() });
            }
        }
    }
    let entry = match &req.entry {
        Some(e) if seen.contains(e.as_str()) => e.clone(),
        Some(e) => return Err(PlanError::EntryNotFound(e.clone())),
        None => req.files[0].name.clone(),
    };
    if req.stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(PlanError::StdinTooLarge(req.stdin.len() as u64));
    }
    if req.args.len() > MAX_ARGS {
        return Err(PlanError::BadArgs(format!("{} given, at most {MAX_ARGS}", req.args.len())));
    }
    if let Some(a) = req.args.iter().find(|a| a.len() > MAX_ARG_BYTES || a.contains('\0')) {
        return Err(PlanError::BadArgs(format!(
            "an argument is longer than {MAX_ARG_BYTES} bytes or contains NUL ({} bytes)",
            a.len()
        )));
    }

    let max = catalog.maximum();
    let run_limits = apply_limits("run", runtime.run_limits, &req.run_limits, max)?;
    let compile_limits = apply_limits("compile", runtime.compile_limits, &req.compile_limits, max)?;

    // Java wants a public class in a file of its name: rename files after it,
    // and run the entry file's class, whatever the client called the files.
    let java = runtime.language == "java";
    let renames = if java {
        crate::java::renames(req.files.iter().map(|f| (f.name.as_str(), &f.content[..])))
    } else {
        Default::default()
    };
    let name_of = |name: &str| renames.get(name).cloned().unwrap_or_else(|| name.to_string());
    let entry_content = req.files.iter().find(|f| f.name == entry).map(|f| &f.content[..]).unwrap_or_default();
    let entry_class = java.then(|| crate::java::main_class(entry_content)).flatten();
    let entry = name_of(&entry);
    let sources: Vec<String> = req
        .files
        .iter()
        .filter(|f| {
            let ext = f.name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
            runtime.extensions.iter().any(|x| x.eq_ignore_ascii_case(ext))
        })
        .map(|f| name_of(&f.name))
        .collect();
    // Otherwise the main class is named after its file: `app/Main.java` is `app.Main`.
    let entry_class = entry_class
        .unwrap_or_else(|| entry.rsplit_once('.').map_or(entry.as_str(), |(stem, _)| stem).replace('/', "."));
    if entry_class.starts_with('-') && runtime_uses(runtime, "{entry_class}") {
        // A class name is no path, so `./` cannot protect it; no Java class starts with `-` anyway.
        return Err(PlanError::BadFileName(format!(
            "entry {entry:?} names the class {entry_class:?}, which would be read as an option"
        )));
    }
    let entry_arg = path_arg(&entry);
    let expand = |template: &[String]| -> Vec<String> {
        let mut argv = Vec::new();
        for t in template {
            match t.as_str() {
                "{sources}" => argv.extend(sources.iter().map(|s| path_arg(s))),
                _ => argv.push(t.replace("{entry_class}", &entry_class).replace("{entry}", &entry_arg)),
            }
        }
        argv
    };
    let compile =
        runtime.compile.as_ref().map(|c| Command { argv: expand(c), env: runtime.env.clone(), limits: compile_limits });
    let mut run_argv = expand(&runtime.run);
    run_argv.extend(req.args.iter().cloned());
    let job = Job {
        files: req
            .files
            .iter()
            .map(|f| File { path: name_of(&f.name), content: f.content.clone(), executable: false })
            .collect(),
        compile,
        run: Command { argv: run_argv, env: runtime.env.clone(), limits: run_limits },
        stdin: req.stdin.clone(),
        workdir_bytes: catalog.workdir_bytes(),
        // Filled in by the VM right before the job is sent, so it is fresh
        // even for a job that waited in a queue.
        uniqueness: None,
        tests: Vec::new(),
        interactive: false,
    };
    let compile_mem = job.compile.is_some().then_some(compile_limits.memory_bytes);
    let needed = vm_memory_mib(run_limits.memory_bytes, compile_mem, job.workdir_bytes, vm_overhead_mib);
    let vm_memory_mib = vm_shape_mib(needed, default_vm_memory_mib(catalog, runtime, vm_overhead_mib));
    Ok(Plan { runtime: runtime.clone(), job, vm_memory_mib })
}

/// One test of a compile-once-run-many request: the run stage's standard
/// input and program arguments for that run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TestRequest {
    /// Standard input of this run.
    #[serde(with = "tvm_protocol::b64", default)]
    pub stdin: Vec<u8>,
    /// Program arguments of this run (bounded as a request's `args`).
    #[serde(default)]
    pub args: Vec<String>,
}

/// Turns `plan` into a compile-once-run-many job: compile once, then one run
/// per test with the runtime's run command plus the test's arguments. The
/// plan's own run (its `args` and `stdin`) must be empty: a request gives
/// either those or tests. The guest keeps a copy of the compiled work dir
/// while the tests run, so the VM gets one more work dir of RAM.
///
/// # Errors
/// [`PlanError::BadTests`]: none or more than [`tvm_protocol::MAX_TESTS`]
/// tests, a top-level `args`/`stdin` next to tests, a test argument over the
/// `args` bounds, or more than [`MAX_STDIN_BYTES`] of stdin over all tests.
pub fn add_tests(plan: &mut Plan, req: &ExecutionRequest, tests: &[TestRequest]) -> Result<(), PlanError> {
    let max = tvm_protocol::MAX_TESTS;
    if tests.is_empty() || tests.len() > max {
        return Err(PlanError::BadTests(format!("{} given, 1 to {max} allowed", tests.len())));
    }
    if !req.args.is_empty() || !req.stdin.is_empty() {
        return Err(PlanError::BadTests("give `stdin` and `args` per test, not next to `tests`".into()));
    }
    let stdin: u64 = tests.iter().map(|t| t.stdin.len() as u64).sum();
    if stdin > MAX_STDIN_BYTES {
        return Err(PlanError::BadTests(format!("{stdin} bytes of stdin in all; at most {MAX_STDIN_BYTES}")));
    }
    for (i, t) in tests.iter().enumerate() {
        if t.args.len() > MAX_ARGS || t.args.iter().any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0')) {
            return Err(PlanError::BadTests(format!(
                "tests[{i}].args: at most {MAX_ARGS} arguments of at most {MAX_ARG_BYTES} bytes, no NUL"
            )));
        }
    }
    let base = plan.job.run.argv.clone();
    plan.job.tests = tests
        .iter()
        .map(|t| TestRun { argv: base.iter().chain(&t.args).cloned().collect(), stdin: t.stdin.clone() })
        .collect();
    plan.vm_memory_mib =
        (plan.vm_memory_mib + plan.job.workdir_bytes.div_ceil(1 << 20)).next_multiple_of(VM_SHAPE_STEP_MIB);
    Ok(())
}

/// Guest RAM steps, MiB, above a runtime's default VM size.
const VM_SHAPE_STEP_MIB: u64 = 64;

/// The VM size, MiB, for a job that needs `needed_mib` where the runtime's
/// default limits need `default_mib`: never below the default, above it
/// rounded up to [`VM_SHAPE_STEP_MIB`]. The stages' memory limits are
/// enforced exactly by their cgroups inside the guest, not by the VM's size,
/// so a VM may be larger than a job needs; few sizes mean few templates (each
/// size is its own template and pool) instead of one per MiB a client asks
/// for, and a smaller limit reuses the default's template and pool.
fn vm_shape_mib(needed_mib: u64, default_mib: u64) -> u64 {
    if needed_mib <= default_mib {
        default_mib
    } else {
        needed_mib.next_multiple_of(VM_SHAPE_STEP_MIB)
    }
}

/// Guest RAM, MiB, for stages with these memory limits (bytes), the work dir
/// and `vm_overhead_mib` (kernel, agent, page cache).
fn vm_memory_mib(run_mem: u64, compile_mem: Option<u64>, workdir_bytes: u64, vm_overhead_mib: u64) -> u64 {
    let stage_mem = compile_mem.map_or(run_mem, |c| c.max(run_mem));
    (stage_mem + workdir_bytes).div_ceil(1 << 20) + vm_overhead_mib
}

/// Guest RAM, MiB, of a request for `runtime` with default limits: the VM
/// shape most executions get, so the one `tvm image build` makes a template for.
pub fn default_vm_memory_mib(catalog: &Catalog, runtime: &Runtime, vm_overhead_mib: u64) -> u64 {
    let compile_mem = runtime.compile.is_some().then_some(runtime.compile_limits.memory_bytes);
    vm_memory_mib(runtime.run_limits.memory_bytes, compile_mem, catalog.workdir_bytes(), vm_overhead_mib)
}

/// A submitted path as a command argument: `-V` becomes `./-V`, so no
/// compiler or interpreter can read a file name as one of its options (the
/// POSIX utility convention; `--` is not understood by every runtime).
fn path_arg(path: &str) -> String {
    if path.starts_with('-') {
        format!("./{path}")
    } else {
        path.to_string()
    }
}

fn runtime_uses(runtime: &Runtime, placeholder: &str) -> bool {
    runtime.run.iter().chain(runtime.compile.iter().flatten()).any(|t| t.contains(placeholder))
}

/// The least value of the limit `field` (API name): [`MIN_MEMORY_BYTES`]
/// for memory, 1 for the others (0 would forbid the stage outright).
pub fn limit_minimum(field: &str) -> u64 {
    if field == "memory_bytes" {
        MIN_MEMORY_BYTES
    } else {
        1
    }
}

fn apply_limits(stage: &'static str, base: Limits, req: &LimitRequest, max: &Limits) -> Result<Limits, PlanError> {
    let mut l = base;
    let fields: [(&'static str, Option<u64>, &mut u64, u64); 6] = [
        ("wall_time_ms", req.wall_time_ms, &mut l.wall_ms, max.wall_ms),
        ("cpu_time_ms", req.cpu_time_ms, &mut l.cpu_ms, max.cpu_ms),
        ("memory_bytes", req.memory_bytes, &mut l.memory_bytes, max.memory_bytes),
        ("processes", req.processes, &mut l.pids, max.pids),
        ("output_bytes", req.output_bytes, &mut l.output_bytes, max.output_bytes),
        ("file_size_bytes", req.file_size_bytes, &mut l.file_size_bytes, max.file_size_bytes),
    ];
    for (field, value, slot, max) in fields {
        if let Some(v) = value {
            let min = limit_minimum(field);
            if v < min || v > max {
                return Err(PlanError::LimitOutOfRange { stage, field, value: v, min, max });
            }
            *slot = v;
        }
    }
    // A wall limit below the CPU limit would make the CPU limit meaningless; keep CPU ≤ wall.
    l.cpu_ms = l.cpu_ms.min(l.wall_ms);
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(runtime: &str, files: &[(&str, &str)]) -> ExecutionRequest {
        ExecutionRequest {
            runtime: runtime.into(),
            files: files
                .iter()
                .map(|(n, c)| SourceFile { name: n.to_string(), content: c.as_bytes().to_vec() })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn c_sources_expand_and_args_append() {
        let c = Catalog::builtin();
        let mut r = req("c", &[("main.c", "int main(){}"), ("util.c", ""), ("util.h", "")]);
        r.args = vec!["a b".into()];
        let p = plan(&c, &r, 160).unwrap();
        let argv = &p.job.compile.as_ref().unwrap().argv;
        assert!(argv.contains(&"main.c".to_string()) && argv.contains(&"util.c".to_string()));
        assert!(!argv.contains(&"util.h".to_string()));
        assert_eq!(p.job.run.argv, ["stdbuf", "-oL", "./main", "a b"]);
    }

    #[test]
    fn java_main_class_follows_the_entry_file() {
        let c = Catalog::builtin();
        let mut r = req("java", &[("app/Main.java", "package app; class Main {}"), ("app/Util.java", "")]);
        r.args = vec!["x".into()];
        let p = plan(&c, &r, 160).unwrap();
        assert_eq!(p.job.run.argv[p.job.run.argv.len() - 2..], ["app.Main", "x"]);
        let compile = &p.job.compile.as_ref().unwrap().argv;
        assert!(compile.ends_with(&["app/Main.java".to_string(), "app/Util.java".to_string()]), "{compile:?}");
    }

    #[test]
    fn a_java_file_is_named_after_its_public_class() {
        let c = Catalog::builtin();
        let p = plan(&c, &req("java", &[("test.java", "public class HelloWorld {}")]), 160).unwrap();
        assert_eq!(p.job.files[0].path, "HelloWorld.java");
        assert_eq!(p.job.compile.as_ref().unwrap().argv.last().map(String::as_str), Some("HelloWorld.java"));
        assert_eq!(p.job.run.argv.last().map(String::as_str), Some("HelloWorld"));
        // Other languages keep their file names whatever they contain.
        let p = plan(&c, &req("python", &[("test.py", "public class HelloWorld {}")]), 160).unwrap();
        assert_eq!(p.job.files[0].path, "test.py");
    }

    #[test]
    fn entry_and_limits_are_checked() {
        let c = Catalog::builtin();
        let mut r = req("python", &[("a.py", "")]);
        assert_eq!(plan(&c, &r, 160).unwrap().job.run.argv, vec!["python3.13", "a.py"]);
        r.entry = Some("b.py".into());
        assert_eq!(plan(&c, &r, 160).unwrap_err(), PlanError::EntryNotFound("b.py".into()));
        r.entry = None;
        r.run_limits.memory_bytes = Some(64 << 30);
        assert!(matches!(plan(&c, &r, 160).unwrap_err(), PlanError::LimitOutOfRange { field: "memory_bytes", .. }));
        // A unit mistake (`1K` for `1M`) is refused before any VM boots; the floor itself is fine.
        for (field, too_small) in [("memory_bytes", MIN_MEMORY_BYTES - 1), ("memory_bytes", 1), ("wall_time_ms", 0)] {
            let mut r = req("python", &[("a.py", "")]);
            match field {
                "memory_bytes" => r.compile_limits.memory_bytes = Some(too_small),
                _ => r.run_limits.wall_time_ms = Some(too_small),
            }
            let e = plan(&c, &r, 160).unwrap_err();
            let min = limit_minimum(field);
            assert!(matches!(e, PlanError::LimitOutOfRange { field: f, min: m, .. } if f == field && m == min), "{e}");
            assert!(e.to_string().contains(&format!("({min}..=")), "{e}");
        }
        r.run_limits.memory_bytes = Some(MIN_MEMORY_BYTES);
        plan(&c, &r, 160).unwrap();
        r.run_limits.memory_bytes = Some(128 << 20);
        r.run_limits.wall_time_ms = Some(1000);
        let p = plan(&c, &r, 160).unwrap();
        assert_eq!(p.job.run.limits.wall_ms, 1000);
        assert_eq!(p.job.run.limits.cpu_ms, 1000, "cpu is clamped to wall");
        let python = c.get("python").unwrap();
        assert_eq!(p.vm_memory_mib, default_vm_memory_mib(&c, python, 160), "a smaller limit runs in the default VM");
        let defaults = plan(&c, &req("python", &[("a.py", "")]), 160).unwrap();
        assert_eq!(default_vm_memory_mib(&c, python, 160), defaults.vm_memory_mib);
        let cc = c.get("c").unwrap();
        let defaults = plan(&c, &req("c", &[("a.c", "")]), 160).unwrap();
        assert_eq!(default_vm_memory_mib(&c, cc, 160), defaults.vm_memory_mib);
    }

    /// Found by a new-user run: limits of 200, 201, … 205 MiB each made a VM
    /// size of its own, so a template build each, evicting the defaults'.
    #[test]
    fn nearby_memory_limits_share_one_vm_size() {
        let c = Catalog::builtin();
        let python = c.get("python").unwrap();
        let default = default_vm_memory_mib(&c, python, 160);
        let mib = |limit_mib: u64| {
            let mut r = req("python", &[("a.py", "")]);
            r.run_limits.memory_bytes = Some(limit_mib << 20);
            plan(&c, &r, 160).unwrap().vm_memory_mib
        };
        for small in [1, 100, 200, 205] {
            assert_eq!(mib(small), default, "{small} MiB");
        }
        assert_eq!(mib(300), mib(301));
        assert!(mib(300) >= 300 + 160 && mib(300) % VM_SHAPE_STEP_MIB == 0, "{}", mib(300));
        assert!(mib(1024) >= 1024 + 160, "{}", mib(1024));
    }

    #[test]
    fn hostile_names_and_unknown_runtimes_are_refused() {
        let c = Catalog::builtin();
        assert!(matches!(plan(&c, &req("python", &[("../x.py", "")]), 160), Err(PlanError::BadFileName(_))));
        assert!(matches!(plan(&c, &req("python", &[("/etc/passwd", "")]), 160), Err(PlanError::BadFileName(_))));
        assert!(matches!(plan(&c, &req("python", &[("a", ""), ("a", "")]), 160), Err(PlanError::DuplicateFile(_))));
        assert!(matches!(plan(&c, &req("cobol", &[("a", "")]), 160), Err(PlanError::UnknownRuntime(_))));
        assert!(matches!(plan(&c, &req("python", &[]), 160), Err(PlanError::NoFiles)));
    }

    #[test]
    fn a_file_used_as_a_directory_is_a_conflict_in_either_order() {
        let c = Catalog::builtin();
        for files in [[("x", ""), ("x/y.py", "")], [("x/y.py", ""), ("x", "")]] {
            let e = plan(&c, &req("python", &files), 160).unwrap_err();
            assert_eq!(e, PlanError::PathConflict { file: "x".into(), other: "x/y.py".into() });
            assert_eq!(e.field(), Some("files"));
        }
        let deep = [("a/b", ""), ("a/b/c/d.py", "")];
        assert!(matches!(plan(&c, &req("python", &deep), 160), Err(PlanError::PathConflict { .. })));
        // Siblings and shared prefixes that are not whole parts are fine.
        let ok = [("a/b.py", ""), ("a/c.py", ""), ("ab", ""), ("a.py", "")];
        assert!(plan(&c, &req("python", &ok), 160).is_ok());
    }

    #[test]
    fn option_like_paths_are_passed_as_paths() {
        let c = Catalog::builtin();
        let p = plan(&c, &req("python", &[("-V", "print(1)")]), 160).unwrap();
        assert_eq!(p.job.run.argv, vec!["python3.13", "./-V"]);
        assert_eq!(p.job.files[0].path, "-V", "the file keeps its name");
        let p = plan(&c, &req("c", &[("-o.c", ""), ("--help.c", "")]), 160).unwrap();
        let argv = &p.job.compile.as_ref().unwrap().argv;
        assert!(argv.contains(&"./-o.c".to_string()) && argv.contains(&"./--help.c".to_string()), "{argv:?}");
        let p = plan(&c, &req("rust", &[("-C.rs", "")]), 160).unwrap();
        assert_eq!(p.job.compile.as_ref().unwrap().argv.last().map(String::as_str), Some("./-C.rs"));
        assert!(matches!(plan(&c, &req("java", &[("-X.java", "")]), 160), Err(PlanError::BadFileName(_))));
        // Every catalog runtime: no argv element built from a name starting with `-` starts with `-`.
        for rt in c.runtimes() {
            let ext = rt.extensions.first().cloned().unwrap_or_default();
            let name = format!("-x.{ext}");
            if let Ok(p) = plan(&c, &req(&rt.id, &[(&name, "")]), 160) {
                let argvs = p.job.compile.iter().chain([&p.job.run]).flat_map(|c| c.argv.clone());
                for a in argvs {
                    assert!(!a.starts_with(&name), "{}: {a:?} can be read as an option", rt.id);
                }
            }
        }
    }
}
