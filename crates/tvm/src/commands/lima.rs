//! `tvm lima …`: TVM inside a Lima VM on macOS and Windows hosts. Thin:
//! parses the flags and calls one `pyrolima` verb each.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use pyrolima::limayaml::{Arch, VmType};
use pyrolima::{
    HostOs, HostOverrides, HostPlatform, InstancePaths, Limactl, Readiness, TemplateOptions, UpError, UpOptions,
};

use super::usage;

/// `tvm lima`.
#[derive(Args, Debug)]
pub struct LimaArgs {
    #[command(subcommand)]
    command: LimaCommand,
}

#[derive(Subcommand, Debug)]
enum LimaCommand {
    /// Print the Lima template `tvm lima up` uses (YAML).
    Template(TemplateArgs),
    /// Create or start the Lima VM, provision TVM in it and wait until its API answers on 127.0.0.1.
    Up(UpArgs),
    /// The VM's state, the accelerator TVM uses inside (KVM or TCG) and the API's readiness.
    Status {
        #[command(flatten)]
        name: NameArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM (disk, kernel and images stay).
    Down {
        #[command(flatten)]
        name: NameArg,
    },
    /// Delete the VM and TVM's host-side files for it.
    Delete {
        #[command(flatten)]
        name: NameArg,
    },
    /// Open a shell in the VM, or run a command there (after `--`).
    Shell {
        #[command(flatten)]
        name: NameArg,
        /// Command and arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct NameArg {
    /// Lima instance name.
    #[arg(long, default_value = "tvm")]
    name: String,
}

#[derive(Args, Debug)]
struct VmArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 4)]
    cpus: u32,
    /// Guest RAM (Lima syntax: 8GiB); at least 2GiB.
    #[arg(long, default_value = "8GiB")]
    memory: String,
    /// Disk size (Lima syntax); at least 20GiB.
    #[arg(long, default_value = "60GiB")]
    disk: String,
    /// Host port on 127.0.0.1 the API is forwarded to.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Lima driver: qemu, vz (macOS) or wsl2 (Windows); default by host.
    #[arg(long)]
    vm_type: Option<VmType>,
    /// Another Debian 12 image (qcow2 for qemu/vz, root filesystem tarball for wsl2).
    #[arg(long)]
    image: Option<String>,
}

#[derive(Args, Debug)]
struct TemplateArgs {
    #[command(flatten)]
    name: NameArg,
    #[command(flatten)]
    vm: VmArgs,
    /// Render for another host OS: macos, windows or linux (default: this one).
    #[arg(long)]
    host_os: Option<HostOs>,
    /// Render for another host architecture: x86_64 or aarch64.
    #[arg(long)]
    host_arch: Option<Arch>,
    /// With --host-os macos: the macOS major version (15 for 15.x; from 10).
    #[arg(long)]
    macos_version: Option<u32>,
    /// With --host-os macos on Apple silicon (aarch64): the Apple chip generation (3 for M3; from 1).
    #[arg(long)]
    apple_chip: Option<u32>,
}

#[derive(Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    name: NameArg,
    #[command(flatten)]
    vm: VmArgs,
    /// Directory holding the Linux `tvm` and `tvm-agent` to install in the VM, built for the
    /// host's architecture (default: next to this tvm if it is one, else its `linux-x86_64/`
    /// or `linux-aarch64/`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// How long to wait for the API once Lima has started the VM (e.g. 30m).
    #[arg(long, default_value = "30m")]
    wait: String,
}

fn template_options(vm: &VmArgs, host: HostPlatform, paths: &InstancePaths) -> TemplateOptions {
    let mut t = TemplateOptions::new(host, paths.share.display().to_string());
    (t.cpus, t.memory, t.disk, t.port) = (vm.cpus, vm.memory.clone(), vm.disk.clone(), vm.port);
    (t.vm_type, t.image) = (vm.vm_type, vm.image.clone());
    t
}

/// Runs `tvm lima …`.
pub async fn lima(args: LimaArgs) -> Result<ExitCode> {
    match args.command {
        LimaCommand::Template(a) => {
            let stated = HostOverrides {
                os: a.host_os,
                arch: a.host_arch,
                macos_major: a.macos_version,
                apple_chip: a.apple_chip,
            };
            // Contradicting host flags are the caller's mistake: one line, exit status 2.
            let host = HostPlatform::detect().map_err(usage)?.overridden(&stated).map_err(|e| usage(e.to_string()))?;
            let paths = InstancePaths::default_for(&a.name.name)?;
            let template =
                pyrolima::template::build(&template_options(&a.vm, host, &paths)).map_err(|e| usage(e.to_string()))?;
            print!("{}", pyrolima::template::render(&template)?);
            Ok(ExitCode::SUCCESS)
        }
        LimaCommand::Up(a) => {
            let limactl = Limactl::locate()?;
            let host = HostPlatform::detect().map_err(usage)?;
            let paths = InstancePaths::default_for(&a.name.name)?;
            let wait = tvm_config::parse_duration_ms(&a.wait).map_err(usage)?;
            let bin_dir = match a.bin_dir {
                Some(d) => d,
                None => pyrolima::default_bin_dir(&std::env::current_exe().context("locating tvm")?, host.arch),
            };
            let share = paths.share.clone();
            let opts = UpOptions {
                name: a.name.name.clone(),
                template: template_options(&a.vm, host, &paths),
                bin_dir,
                paths,
                ready_timeout: Duration::from_millis(wait),
                poll_interval: Duration::from_secs(5),
            };
            let report = match pyrolima::up(&limactl, &opts, &mut |line: &str| eprintln!("{line}")).await {
                Ok(r) => r,
                // What the user typed is at fault: exit status 2.
                Err(e @ (UpError::Template(_) | UpError::Name(_) | UpError::Binaries { .. })) => {
                    return Err(usage(e.to_string()))
                }
                Err(e) => return Err(e.into()),
            };
            if let Readiness::Serving { images_not_ready } = &report.api {
                eprintln!("still building in the background: {}", images_not_ready.join(", "));
            }
            // TCG inside, or a host directory Lima's own config mounted: say so before the user relies on it.
            if let Ok(status) = pyrolima::status(&limactl, &report.name, Some(&share)).await {
                if let Some(a) = &status.accelerator {
                    eprintln!("accelerator inside: {}", a.kind.to_uppercase());
                }
                for note in &status.notes {
                    eprintln!("note: {note}");
                }
            }
            println!("TVM is ready: tvm run --server {} file.py", report.url);
            Ok(ExitCode::SUCCESS)
        }
        LimaCommand::Status { name, json } => {
            let limactl = Limactl::locate()?;
            let paths = InstancePaths::default_for(&name.name)?;
            let s = pyrolima::status(&limactl, &name.name, Some(&paths.share)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        LimaCommand::Down { name } => {
            let limactl = Limactl::locate()?;
            let was_running = pyrolima::down(&limactl, &name.name).await?;
            println!("{} {}", name.name, if was_running { "stopped" } else { "was already stopped" });
            Ok(ExitCode::SUCCESS)
        }
        LimaCommand::Delete { name } => {
            let limactl = Limactl::locate()?;
            let paths = InstancePaths::default_for(&name.name)?;
            pyrolima::delete(&limactl, &name.name, &paths).await?;
            println!("{} deleted", name.name);
            Ok(ExitCode::SUCCESS)
        }
        LimaCommand::Shell { name, command } => {
            let limactl = Limactl::locate()?;
            let status = limactl.shell_command(&name.name, &command).status().await.context("running limactl shell")?;
            Ok(ExitCode::from(status.code().map(|c| c as u8).unwrap_or(1)))
        }
    }
}

fn print_status(s: &pyrolima::Status) {
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
    println!(
        "instance     {} ({}, {} {}, {} CPUs, {} RAM, {} disk)",
        s.name,
        s.state,
        s.vm_type,
        s.arch,
        s.cpus,
        gib(s.memory_bytes),
        gib(s.disk_bytes)
    );
    if let Some(a) = &s.accelerator {
        println!("accelerator  {}: {}", a.kind.to_uppercase(), a.reason);
    }
    match (&s.url, &s.api) {
        (Some(url), Some(Readiness::Ready)) => println!("api          ready at {url}: tvm run --server {url} file.py"),
        (Some(url), Some(Readiness::Serving { images_not_ready })) => {
            println!("api          serving at {url}; images still building: {}", images_not_ready.join(", "))
        }
        (Some(url), Some(Readiness::Draining)) => println!("api          {url} is shutting down"),
        (Some(url), Some(Readiness::Unreachable { reason })) => {
            println!("api          not answering at {url}: {reason}")
        }
        (Some(url), None) => println!("api          {url} (VM not running)"),
        (None, _) => println!("api          no port forward to TVM's API"),
    }
    if let Some(p) = &s.provision {
        println!("provision    {p}");
    }
    println!("mounts       {}", if s.mounts.is_empty() { "none".into() } else { s.mounts.join("; ") });
    for n in &s.notes {
        println!("note         {n}");
    }
}
