//! `tvm bench`: cold-start latency against native runs (the harness is
//! [`crate::bench`]); `tvm bench --relay`: the output relay's writes per second
//! ([`crate::relay_bench`]); `tvm bench --tests N`: compile once, run many
//! against separate executions ([`crate::tests_bench`]); `tvm bench --api`:
//! the HTTP API's overhead on a pool hit ([`crate::api_bench`]).

use std::process::ExitCode;

use anyhow::Result;
use pyrovm::Pyrovm;

use super::Context;
use crate::cli::BenchArgs;

/// Prepares the VM manager (building the kernel if needed) and prints the bench table.
pub async fn bench(ctx: Context, args: &BenchArgs) -> Result<ExitCode> {
    let vmm = Pyrovm::prepare(ctx.settings, ctx.catalog, true).await?;
    if args.api {
        crate::api_bench::run(vmm, args.runs.max(1)).await?;
    } else if let Some(n) = args.tests {
        crate::tests_bench::run(&vmm, args.runs.max(1), n).await?;
    } else if args.relay {
        crate::relay_bench::run(&vmm, args.runs.max(1), args.lines.max(1), &args.program).await?;
    } else {
        crate::bench::run(&vmm, args.runs.max(1), &args.runtimes).await?;
    }
    Ok(ExitCode::SUCCESS)
}
