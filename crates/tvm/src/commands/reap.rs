//! `tvm reap`: removes what a crashed tvm left behind.

use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Kills leftover VMM processes and removes their run dirs.
pub fn reap(ctx: &Context) -> Result<ExitCode> {
    let r = pyrovm::reaper::reap(&ctx.settings.runtime_dir);
    println!("killed {} VM processes, removed {} run dirs", r.processes_killed, r.dirs_removed);
    Ok(ExitCode::SUCCESS)
}
