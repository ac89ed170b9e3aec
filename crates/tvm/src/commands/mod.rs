//! One file per subcommand. Each takes the loaded [`Context`] and its clap
//! arguments (from [`crate::cli`]), calls one library verb (`pyrovm`,
//! `pyroshell`, `tvm-config`) and prints the outcome; the work itself lives in
//! those crates.

//!
//! `lima`, `run --server` and `runtimes` build on every OS; the commands
//! that run VMs here are Linux-only and answer [`linux_only`] elsewhere.

#[cfg(target_os = "linux")]
pub mod bench;
#[cfg(target_os = "linux")]
pub mod doctor;
#[cfg(target_os = "linux")]
pub mod image;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod lima;
#[cfg(target_os = "linux")]
pub mod reap;
pub mod run;
pub mod runtimes;
#[cfg(target_os = "linux")]
pub mod serve;
#[cfg(target_os = "linux")]
pub mod soak;
#[cfg(target_os = "linux")]
pub mod template;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use tvm_config::{Catalog, Settings};

use crate::cli::VmmArgs;

/// Exit code when TVM itself failed (sysexits' EX_SOFTWARE).
pub const EXIT_INTERNAL: u8 = 70;
/// Exit code for bad usage or input.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when what the run needs cannot serve it now: the runtime's image
/// cannot be built or pulled (a registry that does not answer, a failed
/// recipe), or the server cannot be reached or answers 503 (sysexits'
/// EX_UNAVAILABLE). Distinct from 70 so scripts can tell "try later or
/// elsewhere" from a fault in TVM.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// What every subcommand starts from: settings (file, environment, and the
/// `--accel`/`--vmm` of the commands that start VMs) and the runtime catalog
/// they name.
#[derive(Debug)]
pub struct Context {
    /// Settings in force (read by the commands that run VMs here, which are
    /// Linux-only; elsewhere tvm is a client of `--server`).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub settings: Settings,
    /// The runtime catalog (built in, or the file `settings.catalog` names) with the overlays of `settings.runtimes_dir`.
    pub catalog: Catalog,
}

impl Context {
    /// Loads settings and the catalog; the command's `--accel`/`--vmm`
    /// override the settings.
    ///
    /// # Errors
    /// The settings or the catalog file are unreadable or invalid.
    pub fn load(flags: VmmArgs) -> Result<Self> {
        let mut settings = Settings::load().context("loading settings")?;
        if let Some(a) = flags.accel {
            settings.accel = a;
        }
        if let Some(v) = flags.vmm {
            settings.vmm = v;
        }
        let catalog = Catalog::assemble(settings.catalog.as_deref(), &settings.runtimes_dir)?;
        Ok(Self { settings, catalog })
    }
}

/// An error in what the user typed or submitted (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The one-line error of a command that runs VMs on this host, on a host
/// that is not Linux: TVM's VMs need Linux (KVM, cgroups, vsock), which
/// `tvm lima up` brings as a Lima VM whose API the client commands reach.
#[cfg_attr(target_os = "linux", allow(dead_code))]
pub fn linux_only(what: &str) -> anyhow::Error {
    usage(format!(
        "{what} runs microVMs and needs a Linux host; on {} start TVM in a Lima VM with `tvm lima up`, \
         then use `tvm run --server http://127.0.0.1:8080 FILE` and `tvm runtimes --server http://127.0.0.1:8080`",
        std::env::consts::OS
    ))
}

/// The exit status for a command that failed with `e`: 2 for usage errors
/// and for a configured VMM or accelerator that cannot run here (the fix is
/// the caller's: `--vmm`, `--accel`, the config file), 69 for a runtime or
/// server that is unavailable (an image that cannot be built or pulled, a
/// runtime the guests' architecture lacks), or `limactl` not installed
/// ([`EXIT_UNAVAILABLE`]), 70 otherwise.
pub fn exit_status_of(e: &anyhow::Error) -> u8 {
    let unavailable = e.chain().any(|c| {
        // A prerequisite that is not installed (sysexits: "a support program ... does not exist").
        if matches!(c.downcast_ref::<pyrolima::LocateError>(), Some(pyrolima::LocateError::NotInstalled { .. })) {
            return true;
        }
        #[cfg(target_os = "linux")]
        if matches!(
            c.downcast_ref::<pyrovm::ExecuteError>(),
            Some(
                pyrovm::ExecuteError::Image { .. }
                    | pyrovm::ExecuteError::UnsupportedArch { .. }
                    | pyrovm::ExecuteError::Plan(pyrovm::PlanError::RuntimeUnavailable { .. })
            )
        ) || matches!(c.downcast_ref::<pyrovm::PlanError>(), Some(pyrovm::PlanError::RuntimeUnavailable { .. }))
        {
            return true;
        }
        match c.downcast_ref::<pyroshell::client::ClientError>() {
            Some(
                pyroshell::client::ClientError::Http { .. } | pyroshell::client::ClientError::Api { status: 503, .. },
            ) => true,
            // The server's catalog marks the runtime unavailable (422): the same answer as locally.
            Some(pyroshell::client::ClientError::Api { code, .. }) => code == "runtime_unavailable",
            _ => false,
        }
    });
    if unavailable {
        return EXIT_UNAVAILABLE;
    }
    #[cfg(target_os = "linux")]
    let misconfigured = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<pyrovm::PrepareError>(),
            Some(pyrovm::PrepareError::Vmm(_) | pyrovm::PrepareError::Accel(_))
        )
    });
    #[cfg(not(target_os = "linux"))]
    let misconfigured = false;
    if e.downcast_ref::<UsageError>().is_some() || misconfigured {
        EXIT_USAGE
    } else {
        EXIT_INTERNAL
    }
}

/// Runs `work` until it ends or tvm gets SIGINT, SIGTERM or SIGHUP. On a
/// signal the future is dropped, so every guard it holds (VMs and their run
/// dirs and host cgroups, build scratch dirs) is released before tvm exits
/// with 128 + the signal's number, as a shell reports a killed command.
/// `timeout`, CI cancellation and systemd send SIGTERM, a closed terminal
/// SIGHUP: each must clean up as Ctrl-C does.
pub async fn until_signal(work: impl std::future::Future<Output = Result<ExitCode>>) -> Result<ExitCode> {
    let (name, number) = tokio::select! {
        r = work => return r,
        s = signal_received() => s,
    };
    eprintln!("tvm: interrupted by {name}; stopped, and its VMs were destroyed");
    Ok(ExitCode::from(128 + number))
}

/// Resolves when tvm gets SIGINT, SIGTERM or SIGHUP, with the signal's name
/// and number; never where the handlers cannot be installed (or off Unix).
pub async fn signal_received() -> (&'static str, u8) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
            (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
        {
            return tokio::select! {
                _ = int.recv() => ("SIGINT", 2u8),
                _ = term.recv() => ("SIGTERM", 15),
                _ = hup.recv() => ("SIGHUP", 1),
            };
        }
    }
    std::future::pending().await
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> anyhow::Error {
        pyroshell::client::ClientError::Api {
            status,
            code: code.into(),
            message: "m".into(),
            field: None,
            retry_after_secs: None,
        }
        .into()
    }

    /// README's exit table: 69 for a runtime or server that is unavailable,
    /// locally and through a server alike; 2 for the caller's mistakes.
    #[test]
    fn unavailable_runtimes_are_69_locally_and_remotely_and_typos_are_2() {
        let unavailable = pyrovm::PlanError::RuntimeUnavailable { id: "x".into(), reason: "r".into() };
        assert_eq!(exit_status_of(&anyhow::Error::new(unavailable.clone())), EXIT_UNAVAILABLE);
        assert_eq!(exit_status_of(&anyhow::Error::new(pyrovm::ExecuteError::Plan(unavailable))), EXIT_UNAVAILABLE);
        assert_eq!(exit_status_of(&api(422, "runtime_unavailable")), EXIT_UNAVAILABLE);
        assert_eq!(exit_status_of(&api(503, "draining")), EXIT_UNAVAILABLE);
        assert_eq!(exit_status_of(&usage("unknown runtime")), EXIT_USAGE);
        assert_ne!(exit_status_of(&api(422, "unknown_runtime")), EXIT_UNAVAILABLE);
    }
}
