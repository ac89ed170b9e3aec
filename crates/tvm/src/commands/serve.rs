//! `tvm serve`: the HTTP API (pyroshell) until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use pyrovm::Pyrovm;

use super::{usage, Context};

/// Prepares the VM manager (never building the kernel) and serves until a signal drains the server.
pub async fn serve(ctx: Context, args: pyroshell::ServeArgs) -> Result<ExitCode> {
    let cfg = args.into_config().map_err(usage)?;
    // No kernel build here: a server fails fast and says what to run instead of compiling for minutes.
    let vmm = Pyrovm::prepare(ctx.settings, ctx.catalog, false).await?;
    // A request never waits for a template build: it cold boots meanwhile.
    let vmm = vmm.with_template_builds(pyrovm::TemplateBuilds::Background);
    pyroshell::serve(cfg, Arc::new(vmm)).await?;
    Ok(ExitCode::SUCCESS)
}
