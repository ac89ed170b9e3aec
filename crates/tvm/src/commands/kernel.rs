//! `tvm kernel build`: builds (or finds) the guest kernel.

use std::process::ExitCode;

use anyhow::Result;
use pyrovm::Progress;

use super::Context;

/// Builds the guest kernel for the settings in force (cached by its config's hash).
pub async fn build(ctx: Context) -> Result<ExitCode> {
    let settings = ctx.settings;
    let k = tokio::task::spawn_blocking(move || {
        pyrovm::kernel::ensure_kernel(&settings, &Progress::bar(0, "building guest kernel"))
    })
    .await??;
    println!("kernel {} ready: {}", k.key, k.bzimage.display());
    Ok(ExitCode::SUCCESS)
}
