//! Command-line interface: the clap types and the dispatch to one file per
//! subcommand in [`crate::commands`]. A new subcommand is a variant here plus
//! a file there that calls one library verb.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tvm_config::{Accel, VmmChoice};

use crate::commands::{self, Context};

#[derive(Parser, Debug)]
#[command(name = "tvm", version, about = "Run untrusted code in microVMs", propagate_version = true)]
pub struct Cli {
    /// Log level filter (e.g. info, debug, pyrovm=debug).
    #[arg(long, global = true, env = "TVM_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a program in a fresh microVM and print its output.
    ///
    /// Exit status: the program's own (128+N if killed by signal N); 1 for a
    /// compile error; 124 time limit; 137 memory limit; 125 output limit;
    /// 69 runtime or server unavailable; 70 TVM internal error; 2 bad input.
    Run(RunArgs),
    /// List the runtime catalog.
    Runtimes(RuntimesArgs),
    /// Check this machine: VMM, kernel, agent, images, accelerator.
    Doctor(DoctorArgs),
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
    /// VM templates (snapshots of booted, prewarmed VMs that executions are
    /// restored from unless `templates = false`; a cache, rebuilt on first use).
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Remove VMs and run dirs left behind by a crashed tvm.
    Reap,
    /// Serve the HTTP API (pyroshell) until SIGTERM/SIGINT.
    #[cfg(target_os = "linux")]
    Serve(Box<ServeCommandArgs>),
    /// Serve the HTTP API (Linux only: on this host, `tvm lima up` runs it in a Lima VM).
    #[cfg(not(target_os = "linux"))]
    Serve(LinuxOnlyArgs),
    /// Benchmark cold-start latency against native runs and print a table.
    Bench(BenchArgs),
    /// Soak bench: mixed hostile and normal executions through an in-process server; prints host figures before/after.
    Soak(SoakArgs),
    /// TVM on macOS and Windows: a Lima VM running `tvm serve`, its API forwarded to 127.0.0.1.
    Lima(commands::lima::LimaArgs),
}

/// `--accel` and `--vmm`: taken only by the commands that start VMs on this
/// host (`run`, `serve`, `bench`, `soak`, `doctor`, `image build`), since
/// nowhere else are they read, and a flag that is accepted but does nothing
/// misleads. `TVM_ACCEL`, `TVM_VMM` and the config file reach every command
/// through [`tvm_config::Settings`] all the same.
#[derive(Args, Debug, Default, Clone, Copy)]
pub struct VmmArgs {
    /// Accelerator: auto (KVM if a probe boot works, else TCG), kvm or tcg.
    #[arg(long, env = "TVM_ACCEL")]
    pub accel: Option<Accel>,
    /// VMM: auto (Firecracker if its binary exists and KVM works, else QEMU), qemu or firecracker.
    #[arg(long, env = "TVM_VMM")]
    pub vmm: Option<VmmChoice>,
}

/// `tvm serve`: pyroshell's flags and the VM backend's. (Not `ServeArgs`:
/// clap names each flattened struct's argument group after its type, and
/// two groups of one name panic at startup in debug builds.)
#[cfg(target_os = "linux")]
#[derive(Args, Debug)]
pub struct ServeCommandArgs {
    #[command(flatten)]
    pub serve: pyroshell::ServeArgs,
    #[command(flatten)]
    pub vmm: VmmArgs,
}

/// `tvm run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Source files; the first is the entry point. Files in or below its
    /// directory keep their relative path inside the VM (`pkg/util.py`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Runtime id or alias (default: from the entry file's extension).
    #[arg(long, short)]
    pub runtime: Option<String>,
    /// File fed to the program's standard input ("-" for this process's stdin).
    /// Without it, tvm's own stdin is forwarded when it is not a terminal (a
    /// pipe or a redirected file, read to its end first); a terminal, /dev/null
    /// or a closed stdin gives the program an empty one.
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Wall-clock limit of the run stage (e.g. 2s, 500ms).
    // Hyphen values are taken, so `-1` gets the unit parser's message, not
    // clap's tip to pass it after `--` (which would make it a program argument).
    #[arg(long, allow_hyphen_values = true)]
    pub time_limit: Option<String>,
    /// Memory limit of the run stage (e.g. 128M).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_limit: Option<String>,
    /// Output cap per stream (e.g. 64K).
    #[arg(long, allow_hyphen_values = true)]
    pub output_limit: Option<String>,
    /// Print the result document of `POST /v1/executions` (the same with --server)
    /// instead of the program's output.
    #[arg(long)]
    pub json: bool,
    /// Send the job to a running `tvm serve` instead of booting a VM here.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// API key for --server.
    #[arg(long, env = "TVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub vmm: VmmArgs,
    /// Arguments passed to the program.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// The arguments of a Linux-only command on another OS: taken as they come,
/// so the answer is the one line saying what to do instead.
#[cfg(not(target_os = "linux"))]
#[derive(Args, Debug)]
pub struct LinuxOnlyArgs {
    /// Ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// `tvm runtimes`.
#[derive(Args, Debug)]
pub struct RuntimesArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// The version-compatibility matrix: language × version × state, with
    /// each image's source and installed package versions.
    #[arg(long)]
    pub matrix: bool,
    /// With --matrix: print docs/compatibility.md (generated from the catalog).
    #[arg(long, requires = "matrix")]
    pub markdown: bool,
    /// List the runtimes of a running `tvm serve` (`GET /v1/runtimes`) instead
    /// of this host's catalog and images.
    #[arg(long, value_name = "URL", conflicts_with = "matrix")]
    pub server: Option<String>,
    /// API key for --server.
    #[arg(long, env = "TVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `tvm doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub vmm: VmmArgs,
}

#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// Build the guest kernel (cached by its config's hash).
    Build,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build runtime images (cached by recipe hash).
    Build(ImageBuildArgs),
    /// List built images.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Build a runtime's image from a local OCI image layout directory or a
    /// `docker save` tarball instead of its registry (air-gapped hosts).
    Import(ImageImportArgs),
}

/// `tvm image import`.
#[derive(Args, Debug)]
pub struct ImageImportArgs {
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`)
    /// or a `docker save` tarball (gzip-compressed or not).
    pub path: std::path::PathBuf,
    /// The runtime (id or alias) whose OCI recipe the image is for; the
    /// image in PATH is the one the recipe's reference names.
    pub runtime: String,
}

/// `tvm template`.
#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// List built templates.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove templates (by key, or all); the next start rebuilds what it needs.
    Remove {
        /// Template keys (from `tvm template list`).
        keys: Vec<String>,
        /// Every template.
        #[arg(long, conflicts_with = "keys")]
        all: bool,
    },
}

/// `tvm image build`.
#[derive(Args, Debug)]
pub struct ImageBuildArgs {
    /// Runtime ids or aliases.
    pub runtimes: Vec<String>,
    /// Every available runtime in the catalog.
    #[arg(long, conflicts_with = "defaults")]
    pub all: bool,
    /// The default version of every language (what `tvm run FILE` picks).
    #[arg(long)]
    pub defaults: bool,
    /// Images built at the same time (1-8). A build is mostly one busy core
    /// (dpkg, then mkfs.erofs); builds of one Debian suite share downloaded packages.
    #[arg(long, short = 'j', default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub jobs: u8,
    /// Build only the images, not the VM templates of these runtimes (with
    /// templates on, the default, each is built after the images, `--jobs`
    /// at a time; otherwise the first execution of each builds its own).
    #[arg(long)]
    pub no_templates: bool,
    // Read when templates are built (they boot VMs).
    #[command(flatten)]
    pub vmm: VmmArgs,
}

/// `tvm bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Measured runs per runtime.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Runtimes to measure (prefix of the id; default all).
    pub runtimes: Vec<String>,
    /// Instead: short writes per second through the output relay next to
    /// the same programs writing to /dev/null in the guest.
    #[arg(long, conflicts_with = "runtimes")]
    pub relay: bool,
    /// Writes per relay-bench run.
    #[arg(long, default_value_t = 200_000, requires = "relay")]
    pub lines: u64,
    /// Relay-bench rows to run: those whose program name contains one of
    /// these (case-insensitive, repeatable; default every row), e.g.
    /// `--program "C write"`.
    #[arg(long, value_name = "NAME", requires = "relay")]
    pub program: Vec<String>,
    /// Instead: this many tests (1-64) of a C++ solution as the `tests` of
    /// one execution (compile once, run many) next to as many separate
    /// executions.
    #[arg(long, value_name = "N", conflicts_with_all = ["runtimes", "relay"])]
    pub tests: Option<usize>,
    /// Instead: what the HTTP API adds to a Python hello served by a warm
    /// pool VM (round trip minus in-guest wall), through an in-process server.
    #[arg(long, conflicts_with_all = ["runtimes", "relay", "tests"])]
    pub api: bool,
    #[command(flatten)]
    pub vmm: VmmArgs,
}

/// `tvm soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Requests to send (executions, and every ninth a malformed body).
    #[arg(long, default_value_t = 200)]
    pub executions: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Stop sending after this long (e.g. 30m).
    #[arg(long, default_value = "30m")]
    pub duration: String,
    #[command(flatten)]
    pub vmm: VmmArgs,
}

/// Entry point: runs the CLI and turns errors into one-line messages.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(target_os = "linux")]
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.serve.json_logs);
    #[cfg(not(target_os = "linux"))]
    let json_logs = false;
    pyroshell::init_tracing(&cli.log, json_logs);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tvm: cannot start async runtime: {e}");
            return ExitCode::from(commands::EXIT_INTERNAL);
        }
    };
    let outcome = rt.block_on(dispatch(cli));
    // A background image build may still hold a blocking thread; do not wait for it forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tvm: {e:#}");
            ExitCode::from(commands::exit_status_of(&e))
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let ctx = Context::load(cli.command.vmm_args())?;
    // `serve` drains, `image build` and `kernel build` cancel their builds on a signal themselves.
    #[cfg(target_os = "linux")]
    let handles_signals = matches!(
        &cli.command,
        Command::Serve(_)
            | Command::Image { command: ImageCommand::Build(_) }
            | Command::Kernel { command: KernelCommand::Build }
    );
    #[cfg(not(target_os = "linux"))]
    let handles_signals = false;
    if handles_signals {
        command(ctx, cli.command).await
    } else {
        commands::until_signal(command(ctx, cli.command)).await
    }
}

async fn command(ctx: Context, command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => commands::run::run(ctx, args).await,
        Command::Runtimes(args) => commands::runtimes::runtimes(&ctx, &args).await,
        Command::Lima(args) => commands::lima::lima(args).await,
        // The commands that run VMs on this host.
        #[cfg(target_os = "linux")]
        Command::Doctor(args) => commands::doctor::doctor(&ctx, &args).await,
        #[cfg(target_os = "linux")]
        Command::Kernel { command: KernelCommand::Build } => commands::kernel::build(ctx).await,
        #[cfg(target_os = "linux")]
        Command::Image { command: ImageCommand::Build(args) } => commands::image::build(ctx, args).await,
        #[cfg(target_os = "linux")]
        Command::Image { command: ImageCommand::List { json } } => commands::image::list(&ctx, json),
        #[cfg(target_os = "linux")]
        Command::Image { command: ImageCommand::Import(args) } => commands::image::import(&ctx, &args),
        #[cfg(target_os = "linux")]
        Command::Template { command } => commands::template::template(&ctx, command),
        #[cfg(target_os = "linux")]
        Command::Reap => commands::reap::reap(&ctx),
        #[cfg(target_os = "linux")]
        Command::Serve(args) => commands::serve::serve(ctx, args.serve).await,
        #[cfg(target_os = "linux")]
        Command::Bench(args) => commands::bench::bench(ctx, &args).await,
        #[cfg(target_os = "linux")]
        Command::Soak(args) => commands::soak::soak(ctx, &args).await,
        #[cfg(not(target_os = "linux"))]
        command => Err(commands::linux_only(&format!("`tvm {}`", command.name()))),
    }
}

impl Command {
    /// The `--accel`/`--vmm` of the commands that take them; none elsewhere.
    fn vmm_args(&self) -> VmmArgs {
        match self {
            Command::Run(a) => a.vmm,
            Command::Doctor(a) => a.vmm,
            Command::Image { command: ImageCommand::Build(a) } => a.vmm,
            #[cfg(target_os = "linux")]
            Command::Serve(a) => a.vmm,
            Command::Bench(a) => a.vmm,
            Command::Soak(a) => a.vmm,
            _ => VmmArgs::default(),
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl Command {
    /// The subcommand's name as typed.
    fn name(&self) -> &'static str {
        match self {
            Command::Run(_) => "run",
            Command::Runtimes(_) => "runtimes",
            Command::Doctor(_) => "doctor",
            Command::Kernel { .. } => "kernel",
            Command::Image { .. } => "image",
            Command::Template { .. } => "template",
            Command::Reap => "reap",
            Command::Serve(_) => "serve",
            Command::Bench(_) => "bench",
            Command::Soak(_) => "soak",
            Command::Lima(_) => "lima",
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand path below `cmd` ("image build"), with whether it
    /// takes `--accel` and whether it takes `--vmm`.
    fn vm_flags(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, bool, bool)>) {
        for sub in cmd.get_subcommands() {
            let path = format!("{prefix}{}", sub.get_name()).trim().to_string();
            let takes = |id: &str| sub.get_arguments().any(|a| a.get_id() == id);
            out.push((path.clone(), takes("accel"), takes("vmm")));
            vm_flags(sub, &format!("{path} "), out);
        }
    }

    #[test]
    fn accel_and_vmm_are_taken_only_by_the_commands_that_start_vms() {
        Cli::command().debug_assert();
        let top = Cli::command();
        assert!(!top.get_arguments().any(|a| a.get_id() == "accel" || a.get_id() == "vmm"), "no global VM flags");
        let mut all = Vec::new();
        vm_flags(&top, "", &mut all);
        let taking: Vec<&str> = all.iter().filter(|(_, a, v)| *a || *v).map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(taking, ["run", "doctor", "image build", "serve", "bench", "soak"]);
        assert!(all.iter().all(|(_, a, v)| a == v), "both or neither: {all:?}");
        for path in taking {
            // `run` needs a file; the flags come after the subcommand.
            let mut argv: Vec<&str> = std::iter::once("tvm").chain(path.split(' ')).collect();
            argv.extend(if path == "run" { &["x.py"][..] } else { &[] });
            argv.extend(["--accel", "tcg", "--vmm", "qemu"]);
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let flags = cli.command.vmm_args();
            assert_eq!((flags.accel, flags.vmm), (Some(Accel::Tcg), Some(VmmChoice::Qemu)), "{argv:?} reaches Context");
        }
        // Elsewhere, and before the subcommand, clap's usual refusal (exit status 2).
        for argv in [
            &["tvm", "lima", "up", "--vmm", "qemu"][..],
            &["tvm", "lima", "template", "--accel", "tcg"],
            &["tvm", "runtimes", "--accel", "kvm"],
            &["tvm", "kernel", "build", "--vmm", "qemu"],
            &["tvm", "reap", "--accel", "tcg"],
            &["tvm", "image", "list", "--vmm", "qemu"],
            &["tvm", "--accel", "tcg", "run", "x.py"],
        ] {
            let e = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{argv:?}: {e}");
            assert_eq!(e.exit_code(), 2);
        }
    }
}
