//! One file per subcommand. Each takes the loaded [`Context`] and its clap
//! arguments (from [`crate::cli`]), calls one library verb (`pyrovm`,
//! `pyroshell`, `tvm-config`) and prints the outcome; the work itself lives in
//! those crates.

pub mod bench;
pub mod doctor;
pub mod image;
pub mod kernel;
pub mod lima;
pub mod reap;
pub mod run;
pub mod runtimes;
pub mod serve;
pub mod soak;
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
    /// Settings in force.
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

/// The exit status for a command that failed with `e`: 2 for usage errors, 70 otherwise.
pub fn exit_status_of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_INTERNAL
    }
}
