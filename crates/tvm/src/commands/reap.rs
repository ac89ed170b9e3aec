//! `tvm reap`: removes what a crashed tvm left behind.

use std::process::ExitCode;

use anyhow::Result;

use super::Context;

/// Kills leftover VMM processes, removes their run dirs, the host cgroups of
/// VMs whose `tvm` is gone (template-build VMs included) and the cache
/// scratch directories of builds (images, kernels, templates) whose process
/// is gone: what every `tvm` start reaps, on demand.
pub fn reap(ctx: &Context) -> Result<ExitCode> {
    let r = pyrovm::reaper::reap(&ctx.settings.runtime_dir);
    // No cgroup hierarchy of ours (or none usable): nothing of that kind to leave behind.
    let cgroups = pyrovm::hostcg::HostCgroups::detect().map(|c| c.reap().removed).unwrap_or(0);
    let scratch = pyrovm::cache::Cache::new(&ctx.settings.cache_dir).sweep_stale_scratch();
    println!(
        "killed {} VM processes, removed {} run dirs, {cgroups} VM cgroups and {scratch} scratch directories of dead builds",
        r.processes_killed, r.dirs_removed
    );
    Ok(ExitCode::SUCCESS)
}
