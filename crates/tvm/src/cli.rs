//! Command-line interface: subcommands, output and exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pyrovm::{ExecuteError, ExecutionRequest, Progress, Pyrovm, SourceFile};
use tvm_config::{format_bytes, parse_duration_ms, parse_size_bytes, Accel, Catalog, Settings};
use tvm_protocol::{Stage, Stream, Verdict};

/// Exit code when TVM itself failed (sysexits' EX_SOFTWARE).
const EXIT_INTERNAL: u8 = 70;
/// Exit code for bad usage or input.
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "tvm", version, about = "Run untrusted code in microVMs", propagate_version = true)]
struct Cli {
    /// Accelerator: auto (KVM if a probe boot works, else TCG), kvm or tcg.
    #[arg(long, global = true, env = "TVM_ACCEL")]
    accel: Option<Accel>,
    /// Log level filter (e.g. info, debug, pyrovm=debug).
    #[arg(long, global = true, env = "TVM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a program in a fresh microVM and print its output.
    ///
    /// Exit status: the program's own (128+N if killed by signal N); 1 for a
    /// compile error; 124 time limit; 137 memory limit; 125 output limit;
    /// 70 TVM internal error; 2 bad input.
    Run(RunArgs),
    /// List the runtime catalog.
    Runtimes {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The version-compatibility matrix: language × version × state, with
        /// each image's source and installed package versions.
        #[arg(long)]
        matrix: bool,
        /// With --matrix: print docs/compatibility.md (generated from the catalog).
        #[arg(long, requires = "matrix")]
        markdown: bool,
    },
    /// Check this machine: VMM, kernel, agent, images, accelerator.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Guest kernel management.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Runtime image management.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Remove VMs and run dirs left behind by a crashed tvm.
    Reap,
    /// Serve the HTTP API (pyroshell) until SIGTERM/SIGINT.
    Serve(pyroshell::ServeArgs),
    /// Benchmark cold-start latency against native runs and print a table.
    Bench {
        /// Measured runs per runtime.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Runtimes to measure (prefix of the id; default all).
        runtimes: Vec<String>,
    },
    /// Soak bench: mixed hostile and normal executions through an in-process server; prints host figures before/after.
    Soak(crate::soak::SoakArgs),
}

#[derive(Subcommand, Debug)]
enum KernelCommand {
    /// Build the guest kernel (cached by its config's hash).
    Build,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build runtime images (cached by recipe hash).
    Build {
        /// Runtime ids or aliases.
        runtimes: Vec<String>,
        /// Every available runtime in the catalog.
        #[arg(long, conflicts_with = "defaults")]
        all: bool,
        /// The default version of every language (what `tvm run FILE` picks).
        #[arg(long)]
        defaults: bool,
    },
    /// List built images.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Source files; the first is the entry point. Files in or below its
    /// directory keep their relative path inside the VM (`pkg/util.py`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Runtime id or alias (default: from the entry file's extension).
    #[arg(long, short)]
    runtime: Option<String>,
    /// File fed to the program's standard input ("-" for this process's stdin).
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// Wall-clock limit of the run stage (e.g. 2s, 500ms).
    #[arg(long)]
    time_limit: Option<String>,
    /// Memory limit of the run stage (e.g. 128M).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Output cap per stream (e.g. 64K).
    #[arg(long)]
    output_limit: Option<String>,
    /// Print the full structured result as JSON instead of the program's output.
    #[arg(long)]
    json: bool,
    /// Send the job to a running `tvm serve` instead of booting a VM here.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// API key for --server.
    #[arg(long, env = "TVM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Arguments passed to the program.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Entry point: runs the CLI and turns errors into one-line messages.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.json_logs);
    pyroshell::init_tracing(&cli.log, json_logs);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tvm: cannot start async runtime: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let outcome = rt.block_on(dispatch(cli));
    // A background image build may still hold a blocking thread; do not wait for it forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tvm: {e:#}");
            ExitCode::from(if e.downcast_ref::<UsageError>().is_some() { EXIT_USAGE } else { EXIT_INTERNAL })
        }
    }
}

/// An error in what the user typed or submitted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn load(accel: Option<Accel>) -> Result<(Settings, Catalog)> {
    let mut settings = Settings::load().context("loading settings")?;
    if let Some(a) = accel {
        settings.accel = a;
    }
    let catalog = match &settings.catalog {
        Some(p) => Catalog::load(p)?,
        None => Catalog::builtin(),
    };
    Ok((settings, catalog))
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let (settings, catalog) = load(cli.accel)?;
    match cli.command {
        Command::Run(args) => run(settings, catalog, args).await,
        Command::Runtimes { json, matrix, markdown } => {
            match (matrix, markdown) {
                (true, true) => print!("{}", tvm_config::matrix::compatibility_markdown(&catalog)),
                (true, false) => runtime_matrix(&settings, &catalog, json),
                _ => runtimes(&settings, &catalog, json),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { json } => doctor(settings, catalog, json).await,
        Command::Kernel { command: KernelCommand::Build } => {
            let k = tokio::task::spawn_blocking(move || {
                pyrovm::kernel::ensure_kernel(&settings, &Progress::bar(0, "building guest kernel"))
            })
            .await??;
            println!("kernel {} ready: {}", k.key, k.bzimage.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Image { command: ImageCommand::Build { runtimes, all, defaults } } => {
            image_build(settings, catalog, runtimes, all, defaults).await
        }
        Command::Image { command: ImageCommand::List { json } } => {
            image_list(&settings, &catalog, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { runs, runtimes } => {
            let vmm = Pyrovm::prepare(settings, catalog, true).await?;
            crate::bench::run(&vmm, runs.max(1), &runtimes).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Soak(args) => crate::soak::command(settings, catalog, args).await,
        Command::Serve(args) => {
            let cfg = args.into_config().map_err(usage)?;
            // No kernel build here: a server fails fast and says what to run instead of compiling for minutes.
            let vmm = Pyrovm::prepare(settings, catalog, false).await?;
            pyroshell::serve(cfg, std::sync::Arc::new(vmm)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reap => {
            let r = pyrovm::reaper::reap(&settings.runtime_dir);
            println!("killed {} VM processes, removed {} run dirs", r.processes_killed, r.dirs_removed);
            Ok(ExitCode::SUCCESS)
        }
    }
}

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
    let mut files = Vec::new();
    // Files below the entry file's directory keep their relative path (a Python
    // package, a Go module's packages, Rust modules); others their bare name.
    let base = entry.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let base = base.and_then(|b| b.canonicalize().ok());
    for f in &args.files {
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
        files.push(SourceFile { name, content });
    }
    let stdin = match &args.stdin {
        None => Vec::new(),
        Some(p) if p == Path::new("-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            buf
        }
        Some(p) => std::fs::read(p).map_err(|e| usage(format!("cannot read stdin file {}: {e}", p.display())))?,
    };
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
    pyrovm::plan(catalog, &req, 0).map_err(|e| usage(e.to_string()))?;
    Ok(req)
}

async fn run(settings: Settings, catalog: Catalog, args: RunArgs) -> Result<ExitCode> {
    let req = read_request(&catalog, &args)?;
    if let Some(url) = &args.server {
        return run_remote(url, args.api_key.as_deref(), &req, args.json).await;
    }
    let vmm = Pyrovm::prepare(settings, catalog, true).await?;
    let json = args.json;
    let exec = vmm.execute(&req, |stage, stream, data| {
        // Compile output is shown only if compilation fails (from the result).
        if json || stage == Stage::Compile {
            return;
        }
        let _ = match stream {
            Stream::Stdout => std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush()),
            Stream::Stderr => std::io::stderr().write_all(data),
        };
    });
    let outcome = tokio::select! {
        r = exec => r,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the execution future drops the VM guard: QEMU is killed and its run dir removed.
            eprintln!("tvm: interrupted; VM destroyed");
            return Ok(ExitCode::from(130));
        }
    };
    let exec = match outcome {
        Ok(e) => e,
        Err(ExecuteError::Plan(e)) => return Err(usage(e.to_string())),
        Err(e) if json => {
            let v = serde_json::json!({ "verdict": Verdict::InternalError, "error": e.to_string() });
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::from(EXIT_INTERNAL));
        }
        Err(e) => bail!(e),
    };
    let r = &exec.result;
    if json {
        println!("{}", serde_json::to_string_pretty(&readable_json(&exec)?)?);
    } else if r.verdict == Verdict::CompileError {
        if let Some(c) = &r.compile {
            std::io::stderr().write_all(&c.stdout)?;
            std::io::stderr().write_all(&c.stderr)?;
        }
    }
    let run = r.run.as_ref();
    let code = exit_code(r.verdict, run.and_then(|s| s.exit_code), run.and_then(|s| s.signal));
    if !json && r.verdict != Verdict::Ok && r.verdict != Verdict::RuntimeError {
        eprintln!("tvm: {}", r.verdict);
    }
    Ok(ExitCode::from(code))
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

/// `tvm run --server URL`: the same request, executed by a running `tvm serve`.
async fn run_remote(url: &str, key: Option<&str>, req: &ExecutionRequest, json: bool) -> Result<ExitCode> {
    let outcome = if json {
        pyroshell::client::execute(url, key, req).await
    } else {
        pyroshell::client::execute_streaming(url, key, req, |stage, stream, text| {
            if stage == Stage::Run {
                let _ = match stream {
                    Stream::Stdout => {
                        std::io::stdout().write_all(text.as_bytes()).and_then(|_| std::io::stdout().flush())
                    }
                    Stream::Stderr => std::io::stderr().write_all(text.as_bytes()),
                };
            }
        })
        .await
    };
    let r = match outcome {
        Ok(r) => r,
        Err(e) if e.is_bad_request() => return Err(usage(e.to_string())),
        Err(e) => bail!(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        if let (Verdict::CompileError, Some(c)) = (r.verdict, &r.compile) {
            eprint!("{}{}", c.stdout, c.stderr);
        }
        if let Some(e) = &r.error {
            eprintln!("tvm: internal error: {e}");
        } else if r.verdict != Verdict::Ok && r.verdict != Verdict::RuntimeError {
            eprintln!("tvm: {}", r.verdict);
        }
    }
    let run = r.run.as_ref();
    Ok(ExitCode::from(exit_code(r.verdict, run.and_then(|s| s.exit_code), run.and_then(|s| s.signal))))
}

/// The execution as JSON with output as text: `stdout`/`stderr` are UTF-8
/// (lossy), and the exact bytes are added as `*_base64` only when they are not
/// valid UTF-8.
fn readable_json(exec: &pyrovm::Execution) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(exec)?;
    let stages = [("compile", exec.result.compile.as_ref()), ("run", exec.result.run.as_ref())];
    for (name, stage) in stages {
        let Some(stage) = stage else { continue };
        for (key, bytes) in [("stdout", &stage.stdout), ("stderr", &stage.stderr)] {
            let slot = &mut v[name];
            match std::str::from_utf8(bytes) {
                Ok(text) => slot[key] = text.into(),
                Err(_) => {
                    slot[key] = String::from_utf8_lossy(bytes).into_owned().into();
                    slot[format!("{key}_base64")] = v_b64(bytes).into();
                }
            }
        }
    }
    Ok(v)
}

fn v_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn runtimes(settings: &Settings, catalog: &Catalog, json: bool) {
    let rows: Vec<serde_json::Value> = catalog
        .runtimes()
        .iter()
        .map(|r| {
            let state = match runtime_state(settings, r) {
                (state, Some(why), _) => format!("{state}: {why}"),
                (state, None, _) => state.to_string(),
            };
            serde_json::json!({
                "id": r.id, "language": r.language, "version": r.version, "aliases": r.aliases,
                "extensions": r.extensions, "compiled": r.compile.is_some(), "state": state,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return;
    }
    println!("{:<14} {:<11} {:<8} {:<22} {:<12} STATE", "ID", "LANGUAGE", "VERSION", "ALIASES", "EXTENSIONS");
    for r in rows {
        let list = |k: &str| {
            r[k].as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        };
        println!(
            "{:<14} {:<11} {:<8} {:<22} {:<12} {}",
            r["id"].as_str().unwrap_or(""),
            r["language"].as_str().unwrap_or(""),
            r["version"].as_str().unwrap_or(""),
            list("aliases"),
            list("extensions"),
            r["state"].as_str().unwrap_or("")
        );
    }
}

/// A runtime's state on this machine: `unavailable` (with the catalog's
/// reason), `ready` (with its built image) or `buildable`.
fn runtime_state(
    settings: &Settings,
    r: &tvm_config::Runtime,
) -> (&'static str, Option<String>, Option<pyrovm::image::Image>) {
    if let Some(why) = &r.unavailable {
        return ("unavailable", Some(why.clone()), None);
    }
    match r.image.as_ref().and_then(|recipe| pyrovm::image::find_image(settings, recipe)) {
        Some(image) => ("ready", None, Some(image)),
        None => ("buildable", None, None),
    }
}

/// `tvm runtimes --matrix`: every language and version with its state here.
fn runtime_matrix(settings: &Settings, catalog: &Catalog, json: bool) {
    use tvm_config::matrix;
    let mut rows = Vec::new();
    for language in matrix::languages(catalog) {
        for r in catalog.runtimes().iter().filter(|r| r.language == language) {
            let (state, reason, image) = runtime_state(settings, r);
            let installed: Vec<String> =
                image.iter().flat_map(|i| i.meta.installed.iter().map(|(p, v)| format!("{p} {v}"))).collect();
            rows.push(serde_json::json!({
                "language": r.language, "version": r.version, "id": r.id,
                "default": matrix::is_default(catalog, r), "state": state, "reason": reason,
                "source": r.image.as_ref().map(|i| i.source()), "installed": installed,
                "image_bytes": image.as_ref().map(|i| i.meta.size_bytes),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        return;
    }
    println!("{:<11} {:<9} {:<13} {:<11} SOURCE / INSTALLED", "LANGUAGE", "VERSION", "ID", "STATE");
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let version = if r["default"] == true { format!("{}*", s("version")) } else { s("version") };
        let detail = match (s("state").as_str(), r["installed"].as_array()) {
            ("unavailable", _) => s("reason"),
            ("ready", Some(i)) => format!(
                "{}; installed: {}",
                s("source"),
                i.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            ),
            _ => s("source"),
        };
        println!("{:<11} {:<9} {:<13} {:<11} {detail}", s("language"), version, s("id"), s("state"));
    }
    println!("\n* default for its file extension. Build what is buildable with `tvm image build --all`.");
}

async fn image_build(
    settings: Settings,
    catalog: Catalog,
    names: Vec<String>,
    all: bool,
    defaults: bool,
) -> Result<ExitCode> {
    let selected: Vec<_> = if all {
        catalog.runtimes().iter().filter(|r| r.unavailable.is_none()).cloned().collect()
    } else if defaults {
        catalog.runtimes().iter().filter(|r| tvm_config::matrix::is_default(&catalog, r)).cloned().collect()
    } else {
        if names.is_empty() {
            return Err(usage("name runtimes to build, or pass --all or --defaults"));
        }
        names
            .iter()
            .map(|n| {
                catalog.get(n).cloned().ok_or_else(|| usage(format!("unknown runtime {n:?} (see `tvm runtimes`)")))
            })
            .collect::<Result<_>>()?
    };
    let (mut built, mut cached_n, mut failed) = (0, 0, Vec::new());
    let mut total_bytes = 0;
    let mut seen = std::collections::HashSet::new();
    for r in selected {
        let Some(recipe) = r.image.clone() else {
            println!("{:<14} unavailable: {}", r.id, r.unavailable.unwrap_or_default());
            continue;
        };
        let cached = pyrovm::image::find_image(&settings, &recipe).is_some();
        let s = settings.clone();
        let id = r.id.clone();
        let res = tokio::task::spawn_blocking(move || {
            pyrovm::image::ensure_image(&s, &recipe, &Progress::spinner(&format!("image {id}")))
        })
        .await?;
        match res {
            Ok(img) => {
                // Runtimes sharing an image (C and C++) count it once.
                if seen.insert(img.key.clone()) {
                    total_bytes += img.meta.size_bytes;
                    if cached {
                        cached_n += 1;
                    } else {
                        built += 1;
                    }
                }
                println!(
                    "{:<14} {} {} ({})",
                    r.id,
                    if cached { "cached" } else { "built " },
                    img.key,
                    format_bytes(img.meta.size_bytes)
                )
            }
            Err(e) => {
                println!("{:<14} FAILED: {e}", r.id);
                failed.push((r.id.clone(), e.to_string()));
            }
        }
    }
    println!(
        "images: {built} built, {cached_n} cached, {} failed; {} on disk",
        failed.len(),
        format_bytes(total_bytes)
    );
    for (id, why) in &failed {
        println!("  {id}: {why}");
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn image_list(settings: &Settings, catalog: &Catalog, json: bool) {
    let images = pyrovm::image::list_images(settings);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let users = |key: &str| -> Vec<String> {
        catalog
            .runtimes()
            .iter()
            .filter(|r| r.image.as_ref().is_some_and(|i| i.key() == key))
            .map(|r| r.id.clone())
            .collect()
    };
    if json {
        let v: Vec<_> = images
            .iter()
            .map(|i| serde_json::json!({"key": i.key, "runtimes": users(&i.key), "meta": i.meta, "path": i.path}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("{:<26} {:<10} {:>10} {:>8}  RUNTIMES", "HASH", "SUITE", "SIZE", "AGE");
    for i in images {
        let age = now.saturating_sub(i.meta.created_unix);
        let age = if age < 3600 {
            format!("{}m", age / 60)
        } else if age < 86400 {
            format!("{}h", age / 3600)
        } else {
            format!("{}d", age / 86400)
        };
        println!(
            "{:<26} {:<10} {:>10} {:>8}  {}",
            i.key,
            i.meta.suite,
            format_bytes(i.meta.size_bytes),
            age,
            users(&i.key).join(",")
        );
    }
}

async fn doctor(settings: Settings, catalog: Catalog, json: bool) -> Result<ExitCode> {
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let qemu = pyrovm::accel::which(&settings.qemu);
    checks.push((
        "qemu".into(),
        qemu.is_some(),
        qemu.map(|p| p.display().to_string()).unwrap_or_else(|| "missing: apt-get install qemu-system-x86".into()),
    ));
    for (tool, pkg) in [("mmdebstrap", "mmdebstrap"), ("mkfs.erofs", "erofs-utils")] {
        let found = pyrovm::accel::which(Path::new(tool));
        checks.push((
            tool.into(),
            found.is_some(),
            found.map(|p| p.display().to_string()).unwrap_or_else(|| format!("missing: apt-get install {pkg}")),
        ));
    }
    checks.push((
        "kernel source".into(),
        settings.kernel_source.exists(),
        if settings.kernel_source.exists() {
            settings.kernel_source.display().to_string()
        } else {
            "missing: apt-get install linux-source-6.1".into()
        },
    ));
    let agent = pyrovm::agent_path(&settings);
    let agent_ok = pyrovm::initrd::is_static_elf(&std::fs::read(&agent).unwrap_or_default());
    checks.push((
        "guest agent".into(),
        agent_ok,
        if agent_ok {
            agent.display().to_string()
        } else {
            format!("missing or not static at {}: run scripts/build-agent.sh", agent.display())
        },
    ));
    let kernel = pyrovm::kernel::find_kernel(&settings).ok().flatten();
    checks.push((
        "guest kernel".into(),
        kernel.is_some(),
        kernel
            .as_ref()
            .map(|k| format!("{} ({})", k.key, k.bzimage.display()))
            .unwrap_or_else(|| "not built: tvm kernel build".into()),
    ));
    checks.extend(pyrovm::isolation_checks(&settings.qemu, settings.vmm_uid_base));
    checks.extend(pyrovm::vmm_checks(&settings));
    let mut accel = None;
    if let Some(k) = &kernel {
        let (s, k) = (settings.clone(), k.clone());
        let d = tokio::task::spawn_blocking(move || pyrovm::accel_for(&s, &k)).await?;
        match d {
            Ok(d) => {
                checks.push(("accelerator".into(), true, format!("{}: {}", d.kind().as_str(), d.reason)));
                accel = Some(d);
            }
            Err(e) => checks.push(("accelerator".into(), false, e.to_string())),
        }
    }
    for r in catalog.runtimes() {
        let (ok, detail) = match (&r.unavailable, &r.image) {
            (Some(why), _) => (true, format!("unavailable: {why}")),
            (None, Some(recipe)) => match pyrovm::image::find_image(&settings, recipe) {
                Some(i) => (true, format!("ready {} ({})", i.key, format_bytes(i.meta.size_bytes))),
                // Not a fault: `tvm run` builds it on first use, `tvm serve` in the background.
                None => (true, format!("not built yet (built on first use; now: tvm image build {})", r.id)),
            },
            (None, None) => (false, "no recipe".into()),
        };
        checks.push((format!("runtime {}", r.id), ok, detail));
    }
    let healthy = checks.iter().all(|c| c.1);
    if json {
        let v = serde_json::json!({
            "healthy": healthy,
            "accel": accel,
            "checks": checks.iter().map(|(n, ok, d)| serde_json::json!({"name": n, "ok": ok, "detail": d})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (name, ok, detail) in &checks {
            println!("{} {:<22} {}", if *ok { "ok  " } else { "FAIL" }, name, detail);
        }
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
