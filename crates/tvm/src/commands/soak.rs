//! `tvm soak`: mixed hostile and normal executions through an in-process
//! server (the harness is [`crate::soak`]).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use pyrovm::Pyrovm;

use super::{usage, Context};
use crate::cli::SoakArgs;

/// Prepares the VM manager and runs the soak for at most `--duration`.
pub async fn soak(ctx: Context, args: &SoakArgs) -> Result<ExitCode> {
    let duration = Duration::from_millis(tvm_config::parse_duration_ms(&args.duration).map_err(usage)?);
    let vmm = Pyrovm::prepare(ctx.settings, ctx.catalog, false)
        .await?
        .with_template_builds(pyrovm::TemplateBuilds::Background);
    crate::soak::run(vmm, args.executions, args.concurrency, duration).await?;
    Ok(ExitCode::SUCCESS)
}
