//! `tvm doctor`: prints [`pyrovm::doctor::diagnose`]'s findings.

use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::cli::DoctorArgs;

/// Prints one line per check (or the report as JSON); exit status 1 unless healthy.
pub async fn doctor(ctx: &Context, args: &DoctorArgs) -> Result<ExitCode> {
    let report = pyrovm::doctor::diagnose(&ctx.settings, &ctx.catalog).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.checks {
            println!("{} {:<22} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
        }
    }
    Ok(if report.healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
