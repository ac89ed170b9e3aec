//! `tvm kernel build`: builds (or finds) the guest kernel.

use std::process::ExitCode;

use anyhow::Result;
use pyrovm::{BuildCancel, Progress};

use super::Context;

/// Builds the guest kernel for the settings in force (cached by its config's
/// hash). SIGINT, SIGTERM or SIGHUP cancel the build: tvm kills the
/// compiler's process group and waits until the scratch directory (~1.5 GB)
/// is removed, then exits with 128 + the signal's number.
pub async fn build(ctx: Context) -> Result<ExitCode> {
    let settings = ctx.settings;
    let cancel = BuildCancel::new();
    let token = cancel.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        pyrovm::kernel::ensure_kernel(&settings, &Progress::bar(0, "building guest kernel"), &token)
    });
    tokio::select! {
        done = &mut task => {
            let k = done??;
            println!("kernel {} ready: {}", k.key, k.bzimage.display());
            Ok(ExitCode::SUCCESS)
        }
        (name, number) = super::signal_received() => {
            cancel.cancel();
            // The build unwinds: its tools are killed, its scratch directory removed.
            let _ = task.await;
            eprintln!("tvm: interrupted by {name}; the kernel build was cancelled and cleaned up");
            Ok(ExitCode::from(128 + number))
        }
    }
}
