//! `tvm run`: one execution, in a fresh VM here ([`pyrovm::Pyrovm::execute`])
//! or on a running server ([`pyroshell::client`]). Both end in the API's
//! [`ExecutionResult`]: `--json` prints it, otherwise the program's output
//! streams through and the exit status follows its verdict.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use pyroshell::ExecutionResult;
use pyrovm::plan::MAX_STDIN_BYTES;
#[cfg(target_os = "linux")]
use pyrovm::{ExecuteError, Pyrovm};
use pyrovm::{ExecutionRequest, SourceFile};
use tvm_config::{parse_duration_ms, parse_size_bytes, Catalog};
use tvm_protocol::{Stage, Stream, Verdict};

use super::{usage, Context, EXIT_INTERNAL};
use crate::cli::RunArgs;

/// Runs `args` locally or on `--server` and reports the result.
pub async fn run(ctx: Context, args: RunArgs) -> Result<ExitCode> {
    let req = read_request(&ctx.catalog, &args)?;
    let mut echo = Echo::default();
    let result = match &args.server {
        Some(url) => run_remote(url, args.api_key.as_deref(), &req, args.json, &mut echo).await?,
        #[cfg(target_os = "linux")]
        None => run_local(ctx, &req, args.json, &mut echo).await?,
        // No VMs here: the Lima VM's server runs them.
        #[cfg(not(target_os = "linux"))]
        None => return Err(super::linux_only("`tvm run` without --server")),
    };
    report(&result, args.json, &echo)
}

/// Echoes the program's streamed output to tvm's own stdout and stderr, and
/// remembers how it ended, so that a status line printed after it starts on a
/// line of its own (`print("x", end="")` then a time limit must not read
/// `xtvm: time_limit_exceeded`).
#[derive(Debug, Default)]
struct Echo {
    /// The stream written last and its last byte.
    last: Option<(Stream, u8)>,
    /// The last byte written to stderr.
    last_on_stderr: Option<u8>,
}

impl Echo {
    fn write(&mut self, stream: Stream, data: &[u8]) {
        let Some(&end) = data.last() else { return };
        let _ = match stream {
            Stream::Stdout => std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush()),
            Stream::Stderr => std::io::stderr().write_all(data),
        };
        self.last = Some((stream, end));
        if stream == Stream::Stderr {
            self.last_on_stderr = Some(end);
        }
    }

    /// Whether a line written to stderr now would continue an unfinished line
    /// of the output: the program's last line on stderr, or, when both streams
    /// end up in the same place (a terminal, `> log 2>&1`), its last line on either.
    fn line_open_on_stderr(&self) -> bool {
        let end = if same_destination() { self.last.map(|(_, end)| end) } else { self.last_on_stderr };
        end.is_some_and(|end| end != b'\n')
    }
}

/// Whether tvm's stdout and stderr are the same terminal or file.
fn same_destination() -> bool {
    if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        // `/dev/fd/N` follows the descriptor to what it is open on (file, pipe, terminal).
        if let (Ok(a), Ok(b)) = (std::fs::metadata("/dev/fd/1"), std::fs::metadata("/dev/fd/2")) {
            return a.dev() == b.dev() && a.ino() == b.ino();
        }
    }
    false
}

/// The request `args` describe, validated against the catalog before any VM work.
fn read_request(catalog: &Catalog, args: &RunArgs) -> Result<ExecutionRequest> {
    let entry = &args.files[0];
    let runtime = match &args.runtime {
        Some(r) => r.clone(),
        None => {
            let ext = entry.extension().and_then(|e| e.to_str()).unwrap_or("");
            catalog.for_extension(ext).map(|r| r.id.clone()).ok_or_else(|| {
                usage(format!(
                    "cannot tell the language of {} from its extension; pass --runtime (see `tvm runtimes`)",
                    entry.display()
                ))
            })?
        }
    };
    let files = read_files(&args.files)?;
    let stdin = read_stdin(args.stdin.as_deref())?;
    let mut req = ExecutionRequest { runtime, files, stdin, args: args.args.clone(), ..Default::default() };
    if let Some(t) = &args.time_limit {
        let ms = parse_duration_ms(t).map_err(usage)?;
        req.run_limits.wall_time_ms = Some(ms);
        req.run_limits.cpu_time_ms = Some(ms);
    }
    if let Some(m) = &args.memory_limit {
        req.run_limits.memory_bytes = Some(parse_size_bytes(m).map_err(usage)?);
    }
    if let Some(o) = &args.output_limit {
        req.run_limits.output_bytes = Some(parse_size_bytes(o).map_err(usage)?);
    }
    // Validate before any VM work so bad input fails fast with the field named.
    // A runtime the catalog marks unavailable is not the caller's typo: exit 69, as for an image
    // that cannot be built.
    pyrovm::plan(catalog, &req, 0).map_err(|e| match e {
        e @ pyrovm::PlanError::RuntimeUnavailable { .. } => anyhow::Error::new(e),
        e => usage(e.to_string()),
    })?;
    Ok(req)
}

/// Reads the source files. Files below the entry file's directory keep their
/// relative path (a Python package, a Go module's packages, Rust modules);
/// others their bare name. Two local files that would get the same name in
/// the VM are a usage error naming both.
fn read_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    let entry = &paths[0];
    let base = entry.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let base = base.and_then(|b| b.canonicalize().ok());
    let mut files: Vec<SourceFile> = Vec::new();
    let mut local: Vec<&Path> = Vec::new();
    for f in paths {
        let content = std::fs::read(f).map_err(|e| usage(format!("cannot read {}: {e}", f.display())))?;
        let relative = base.as_ref().and_then(|b| {
            let full = f.canonicalize().ok()?;
            Some(full.strip_prefix(b).ok()?.to_str()?.to_string())
        });
        let name = match relative {
            Some(r) => r,
            None => f
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| usage(format!("{} has no usable file name", f.display())))?
                .to_string(),
        };
        if let Some(i) = files.iter().position(|s| s.name == name) {
            let (a, b) = (local[i].display(), f.display());
            return Err(if local[i].canonicalize().ok() == f.canonicalize().ok() {
                usage(format!("{b} is given twice"))
            } else {
                usage(format!(
                    "{a} and {b} would both be {name:?} in the VM (files outside the entry file's \
                     directory keep only their name); rename one or move it below the entry file's directory"
                ))
            });
        }
        files.push(SourceFile { name, content });
        local.push(f);
    }
    Ok(files)
}

/// The program's stdin. `--stdin FILE` wins (`-` is tvm's own stdin);
/// without it, tvm's own stdin is forwarded when it is not a terminal (a pipe
/// or a redirected file, read to its end before the VM starts), and the
/// program gets an empty stdin when it is a terminal or closed. `/dev/null`
/// (CI) reads as empty. At most [`MAX_STDIN_BYTES`] are read, so a larger
/// input fails validation instead of filling memory.
fn read_stdin(arg: Option<&Path>) -> Result<Vec<u8>> {
    match arg {
        Some(p) if p == Path::new("-") => read_own_stdin(),
        Some(p) => std::fs::read(p).map_err(|e| usage(format!("cannot read stdin file {}: {e}", p.display()))),
        None if std::io::stdin().is_terminal() => Ok(Vec::new()),
        None => read_own_stdin(),
    }
}

fn read_own_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    match std::io::stdin().lock().take(MAX_STDIN_BYTES + 1).read_to_end(&mut buf) {
        Ok(_) => Ok(buf),
        // File descriptor 0 closed (`tvm run x.py <&-`): nothing to forward.
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBADF as i32) => Ok(Vec::new()),
        Err(e) => Err(e).context("reading tvm's standard input"),
    }
}

/// Runs `req` in a fresh VM here. A signal stops it by dropping this future
/// ([`super::until_signal`]), which destroys the VM.
#[cfg(target_os = "linux")]
async fn run_local(ctx: Context, req: &ExecutionRequest, json: bool, echo: &mut Echo) -> Result<ExecutionResult> {
    // Before `prepare`, which may build the guest kernel for minutes: a runtime
    // the guests' architecture lacks is known from the catalog alone (exit 69).
    if let Some(runtime) = ctx.catalog.get(&req.runtime) {
        pyrovm::check_guest_arch(&ctx.settings, runtime)?;
    }
    let vmm = Pyrovm::prepare(ctx.settings, ctx.catalog, true).await?;
    let exec = vmm.execute(req, |stage, stream, data| {
        // Compile output is shown only if compilation fails (from the result).
        if json || stage == Stage::Compile {
            return;
        }
        echo.write(stream, data);
    });
    match exec.await {
        Ok(exec) => Ok(ExecutionResult::from_execution(&exec)),
        Err(ExecuteError::Plan(e)) => Err(usage(e.to_string())),
        // The same document the server returns for its own faults.
        Err(e) if json => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let accel = vmm.accel().kind().as_str();
            Ok(ExecutionResult::internal_error(id, req.runtime.clone(), accel, pyrovm::error_chain(&e)))
        }
        Err(e) => bail!(e),
    }
}

/// `--server URL`: the same request, executed by a running `tvm serve`.
async fn run_remote(
    url: &str,
    key: Option<&str>,
    req: &ExecutionRequest,
    json: bool,
    echo: &mut Echo,
) -> Result<ExecutionResult> {
    let outcome = if json {
        pyroshell::client::execute(url, key, req).await
    } else {
        pyroshell::client::execute_streaming(url, key, req, |stage, stream, text| {
            if stage == Stage::Run {
                echo.write(stream, text.as_bytes());
            }
        })
        .await
    };
    match outcome {
        Ok(r) => Ok(r),
        Err(e) if e.is_bad_request() => Err(usage(e.to_string())),
        Err(e) => bail!(e),
    }
}

/// Prints the result document (`--json`) or what a terminal user needs after
/// the streamed output: compile errors, a verdict that is not the program's
/// own, the signal that killed it. Returns the exit status.
fn report(r: &ExecutionResult, json: bool, echo: &Echo) -> Result<ExitCode> {
    let run = r.run.as_ref();
    let (exit, signal) = (run.and_then(|s| s.exit_code), run.and_then(|s| s.signal));
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let mut err = std::io::stderr().lock();
        let mut line_open = echo.line_open_on_stderr();
        if let (Verdict::CompileError, Some(c)) = (r.verdict, &r.compile) {
            for text in [c.stdout_bytes(), c.stderr_bytes()] {
                err.write_all(&text)?;
                line_open = text.last().map_or(line_open, |&end| end != b'\n');
            }
        }
        let status = if let Some(e) = &r.error {
            Some(format!("tvm: internal error: {e}"))
        } else if r.verdict == Verdict::RuntimeError {
            signal.filter(|_| exit.is_none()).map(killed_line)
        } else {
            (r.verdict != Verdict::Ok).then(|| format!("tvm: {}", r.verdict))
        };
        if let Some(status) = status {
            if line_open {
                writeln!(err)?;
            }
            writeln!(err, "{status}")?;
        }
    }
    Ok(ExitCode::from(exit_code(r.verdict, exit, signal)))
}

/// What a shell says about a program killed by signal `n`: `tvm: killed by signal 11 (SIGSEGV)`.
/// `n` is the guest's (Linux) number, named by Linux's table on every host.
fn killed_line(n: i32) -> String {
    match tvm_protocol::linux_signal_name(n) {
        Some(name) => format!("tvm: killed by signal {n} ({name})"),
        None => format!("tvm: killed by signal {n}"),
    }
}

/// `tvm run`'s exit status for a verdict (documented in `tvm run --help`).
fn exit_code(verdict: Verdict, exit: Option<i32>, signal: Option<i32>) -> u8 {
    match verdict {
        Verdict::Ok => 0,
        Verdict::RuntimeError => exit.map(|c| c as u8).or(signal.map(|s| 128u8.wrapping_add(s as u8))).unwrap_or(1),
        Verdict::CompileError => 1,
        Verdict::TimeLimitExceeded => 124,
        Verdict::MemoryLimitExceeded => 137,
        Verdict::OutputLimitExceeded => 125,
        Verdict::InternalError => EXIT_INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_lines_name_the_signal_like_a_shell() {
        assert_eq!(killed_line(11), "tvm: killed by signal 11 (SIGSEGV)");
        assert_eq!(killed_line(9), "tvm: killed by signal 9 (SIGKILL)");
        assert_eq!(killed_line(6), "tvm: killed by signal 6 (SIGABRT)");
        assert_eq!(killed_line(77), "tvm: killed by signal 77");
    }

    #[test]
    fn files_that_would_share_a_name_in_the_vm_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["app", "lib"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join("util.py"), "x = 1\n").unwrap();
        }
        std::fs::write(dir.path().join("app/main.py"), "import util\n").unwrap();
        let p = |s: &str| dir.path().join(s);
        // Below the entry's directory: relative paths; outside it: the bare name.
        let ok = read_files(&[p("app/main.py"), p("lib/util.py")]).unwrap();
        assert_eq!(ok.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["main.py", "util.py"]);
        let e = read_files(&[p("app/main.py"), p("lib/util.py"), p("app/util.py")]).unwrap_err().to_string();
        assert!(e.contains("lib/util.py") && e.contains("app/util.py") && e.contains("\"util.py\""), "{e}");
        let e = read_files(&[p("app/main.py"), p("app/util.py"), p("app/util.py")]).unwrap_err().to_string();
        assert!(e.ends_with("app/util.py is given twice"), "{e}");
    }

    #[test]
    fn a_status_line_never_continues_the_programs_unfinished_stderr_line() {
        let at =
            |stream, end| Echo { last: Some((stream, end)), last_on_stderr: (stream == Stream::Stderr).then_some(end) };
        assert!(!Echo::default().line_open_on_stderr());
        assert!(at(Stream::Stderr, b'x').line_open_on_stderr());
        assert!(!at(Stream::Stderr, b'\n').line_open_on_stderr());
        assert!(!at(Stream::Stdout, b'\n').line_open_on_stderr());
        // Stdout's open line matters only where stdout and stderr meet.
        assert_eq!(at(Stream::Stdout, b'x').line_open_on_stderr(), same_destination());
        // Stderr cut mid-line (at its cap, say), then stdout: elsewhere, stderr's line is still open.
        let cut = Echo { last: Some((Stream::Stdout, b'\n')), last_on_stderr: Some(b'x') };
        assert_eq!(cut.line_open_on_stderr(), !same_destination());
    }

    #[test]
    fn exit_status_follows_the_verdict() {
        assert_eq!(exit_code(Verdict::RuntimeError, None, Some(11)), 139);
        assert_eq!(exit_code(Verdict::RuntimeError, Some(3), None), 3);
        assert_eq!(exit_code(Verdict::TimeLimitExceeded, None, Some(9)), 124);
        assert_eq!(exit_code(Verdict::InternalError, None, None), EXIT_INTERNAL);
    }
}
