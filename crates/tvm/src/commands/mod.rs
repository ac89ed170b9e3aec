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

use anyhow::{Context as _, Result};
use tvm_config::{Accel, Catalog, Settings, VmmChoice};

/// Exit code when TVM itself failed (sysexits' EX_SOFTWARE).
pub const EXIT_INTERNAL: u8 = 70;
/// Exit code for bad usage or input.
pub const EXIT_USAGE: u8 = 2;

/// What every subcommand starts from: settings (file, environment, global
/// flags) and the runtime catalog they name.
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
    /// Loads settings and the catalog; global flags override the settings.
    ///
    /// # Errors
    /// The settings or the catalog file are unreadable or invalid.
    pub fn load(accel: Option<Accel>, vmm: Option<VmmChoice>) -> Result<Self> {
        let mut settings = Settings::load().context("loading settings")?;
        if let Some(a) = accel {
            settings.accel = a;
        }
        if let Some(v) = vmm {
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

/// The exit status for a command that failed with `e`: 2 for usage errors, 70 otherwise.
pub fn exit_status_of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_INTERNAL
    }
}
