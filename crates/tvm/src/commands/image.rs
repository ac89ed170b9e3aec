//! `tvm image build|list`: runtime images ([`pyrovm::image`]).

use std::collections::{HashSet, VecDeque};
use std::process::ExitCode;

use anyhow::Result;
use pyrovm::{BuildCancel, MultiProgress, Progress};
use tokio::task::JoinSet;
use tvm_config::{format_bytes, Runtime};

use super::{usage, Context};
use crate::cli::{ImageBuildArgs, ImageImportArgs};

/// The runtimes `tvm image build` was asked for.
fn selected(ctx: &Context, args: &ImageBuildArgs) -> Result<Vec<Runtime>> {
    let catalog = &ctx.catalog;
    if args.all {
        // OCI entries whose registry does not answer are skipped with the reason
        // (named explicitly, they are tried: the pull says what fails).
        pyrovm::registry::probe_blocking(pyrovm::registry::registries_of(&ctx.settings, catalog.runtimes()));
        let mut all = Vec::new();
        for r in catalog.runtimes().iter().filter(|r| r.unavailable.is_none()) {
            match pyrovm::image::runtime_state(&ctx.settings, r) {
                pyrovm::image::RuntimeState::Unavailable(why) => println!("{:<14} unavailable: {why}", r.id),
                _ => all.push(r.clone()),
            }
        }
        return Ok(all);
    }
    if args.defaults {
        // A default the guests' architecture lacks (most languages on aarch64) is
        // skipped with the reason, as with --all: building it would fail, or make
        // an image no execution may use.
        let mut defaults = Vec::new();
        for r in catalog.runtimes().iter().filter(|r| tvm_config::matrix::is_default(catalog, r)) {
            if r.architectures.contains(&ctx.settings.guest_arch) {
                defaults.push(r.clone());
            } else {
                println!(
                    "{:<14} unavailable: not supported on {} guests (architectures: {})",
                    r.id,
                    ctx.settings.guest_arch,
                    tvm_config::matrix::architectures_of(r)
                );
            }
        }
        return Ok(defaults);
    }
    if args.runtimes.is_empty() {
        return Err(usage("name runtimes to build, or pass --all or --defaults"));
    }
    args.runtimes
        .iter()
        .map(|n| catalog.get(n).cloned().ok_or_else(|| usage(format!("unknown runtime {n:?} (see `tvm runtimes`)"))))
        .collect()
}

/// Builds (or finds) the image of each selected runtime with
/// [`pyrovm::image::ensure_image_cancellable`], `--jobs` at a time (SIGINT or
/// SIGTERM cancels them all and cleans up); exit status 1 if any failed, 130
/// when stopped. Lines are printed as builds finish.
pub async fn build(ctx: Context, args: ImageBuildArgs) -> Result<ExitCode> {
    let (mut built, mut cached_n, mut failed) = (0, 0, Vec::new());
    let mut total_bytes = 0;
    let mut seen = HashSet::new();
    let mut ready = Vec::new();
    // SIGINT (Ctrl-C) or SIGTERM: the build tools run in their own process group, so
    // tvm stops them and waits until the scratch directories and their mounts are gone.
    let stop = pyroshell::shutdown_signal();
    tokio::pin!(stop);
    let mut queue = VecDeque::new();
    for r in by_alternating_suite(selected(&ctx, &args)?) {
        match r.image.clone() {
            Some(recipe) => queue.push_back((r, recipe)),
            None => println!("{:<14} unavailable: {}", r.id, r.unavailable.unwrap_or_default()),
        }
    }
    let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let group = MultiProgress::new();
    let cancel = BuildCancel::new();
    let mut running = JoinSet::new();
    // Ids of the builds in progress, for the message when interrupted.
    let mut in_progress: Vec<String> = Vec::new();
    loop {
        while running.len() < usize::from(args.jobs) {
            let Some((r, recipe)) = queue.pop_front() else { break };
            in_progress.push(r.id.clone());
            let (s, token, progress) =
                (ctx.settings.clone(), cancel.clone(), Progress::spinner_in(&group, &format!("image {}", r.id)));
            running.spawn_blocking(move || {
                let before = pyrovm::image::find_image(&s, &recipe).map(|i| i.key);
                // A tag is asked for anew: content it moved to is built as a new image.
                let res = pyrovm::image::ensure_runtime_image(&s, &r, pyrovm::image::Tags::Latest, &progress, &token);
                // Found, not built: the image it had, or one built before this command (same content, another tag).
                let cached =
                    res.as_ref().is_ok_and(|i| before.as_ref() == Some(&i.key) || i.meta.created_unix < started_unix);
                (r, cached, res)
            });
        }
        let done = tokio::select! {
            done = running.join_next() => done,
            _ = &mut stop => {
                cancel.cancel();
                while running.join_next().await.is_some() {}
                eprintln!("tvm: interrupted; the build of {} was cancelled and cleaned up", in_progress.join(", "));
                return Ok(ExitCode::from(130));
            }
        };
        let Some(done) = done else { break };
        let (r, cached, res) = done?;
        in_progress.retain(|id| *id != r.id);
        match res {
            Ok(img) => {
                ready.push(r.clone());
                // Runtimes sharing an image (C and C++) count it once.
                if seen.insert(img.key.clone()) {
                    total_bytes += img.meta.size_bytes;
                    if cached {
                        cached_n += 1;
                    } else {
                        built += 1;
                    }
                }
                let how = if cached { "cached" } else { "built " };
                group.suspend(|| println!("{:<14} {how} {} ({})", r.id, img.key, format_bytes(img.meta.size_bytes)));
            }
            Err(e) => {
                // The whole cause chain: "pulling X failed: ...: digest mismatch".
                let why = pyrovm::error_chain(&e);
                group.suspend(|| println!("{:<14} FAILED: {why}", r.id));
                failed.push((r.id.clone(), why));
            }
        }
    }
    println!(
        "images: {built} built, {cached_n} cached, {} failed; {} on disk",
        failed.len(),
        format_bytes(total_bytes)
    );
    for (id, why) in &failed {
        println!("  {id}: {why}");
    }
    if ctx.settings.templates && !args.no_templates && !ready.is_empty() {
        // A template that fails is not this command's failure: it is a
        // cache, and executions of its runtime cold boot (the line says why).
        if !templates(&ctx, &ready, args.jobs, started_unix, &mut stop).await {
            return Ok(ExitCode::from(130));
        }
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Reorders runtimes so that neighbours come from different Debian suites
/// where possible: builds from one suite share a package cache and take
/// turns, so two parallel builds of one suite would run one after the other.
fn by_alternating_suite(runtimes: Vec<Runtime>) -> Vec<Runtime> {
    let mut lanes: Vec<(String, VecDeque<Runtime>)> = Vec::new();
    for r in runtimes {
        let suite = r.image.as_ref().map(|i| i.suite.clone()).unwrap_or_default();
        match lanes.iter_mut().find(|(s, _)| *s == suite) {
            Some((_, lane)) => lane.push_back(r),
            None => lanes.push((suite, VecDeque::from([r]))),
        }
    }
    // Longest lanes first, so the big suites run side by side the longest.
    lanes.sort_by_key(|(_, lane)| std::cmp::Reverse(lane.len()));
    let mut out = Vec::new();
    while lanes.iter().any(|(_, lane)| !lane.is_empty()) {
        for (_, lane) in &mut lanes {
            out.extend(lane.pop_front());
        }
    }
    out
}

/// Builds the template of each runtime in `ready` for its default VM shape,
/// `jobs` at a time, so their first executions restore instead of booting
/// (see [`pyrovm::Templates`]). A runtime's failure is printed and counted,
/// never fatal: its executions cold boot until a later build succeeds.
/// Lines are printed as builds finish. `false` when SIGINT or SIGTERM
/// stopped it: the builds running were dropped, which kills their VMs and
/// removes their scratch directories before this returns.
async fn templates(
    ctx: &Context,
    ready: &[Runtime],
    jobs: u8,
    started_unix: u64,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    let vmm = match pyrovm::Pyrovm::prepare(ctx.settings.clone(), ctx.catalog.clone(), false).await {
        Ok(vmm) => vmm,
        Err(e) => {
            println!("templates: not built ({})", pyrovm::error_chain(&e));
            return true;
        }
    };
    if let Some(why) = vmm.vmm().backend.templates_unsupported() {
        println!("templates: not built ({why})");
        return true;
    }
    let started = std::time::Instant::now();
    let mut queue: VecDeque<Runtime> = ready.iter().cloned().collect();
    let mut running = JoinSet::new();
    let (mut built, mut cached, mut failed) = (0usize, 0usize, 0usize);
    loop {
        while running.len() < usize::from(jobs) {
            let Some(r) = queue.pop_front() else { break };
            let (vmm, memory) =
                (vmm.clone(), pyrovm::default_vm_memory_mib(&ctx.catalog, &r, ctx.settings.vm_overhead_mib));
            running.spawn(async move {
                let t = std::time::Instant::now();
                let res = vmm.ensure_template(&r, memory).await;
                (r, memory, t.elapsed(), res)
            });
        }
        let done = tokio::select! {
            done = running.join_next() => done,
            _ = &mut *stop => {
                running.shutdown().await;
                eprintln!("tvm: interrupted; the template builds in progress were cancelled and cleaned up");
                return false;
            }
        };
        let Some(done) = done else { break };
        let (r, memory, took, res) = match done {
            Ok(done) => done,
            Err(e) => {
                failed += 1;
                println!("template build task failed: {e}");
                continue;
            }
        };
        match res {
            Ok(t) => {
                let how = if t.meta.created_unix < started_unix {
                    cached += 1;
                    "cached"
                } else {
                    built += 1;
                    "built "
                };
                println!(
                    "{:<14} template {how} {} ({}, {memory} MiB VM) in {:.1} s",
                    r.id,
                    t.key,
                    format_bytes(t.meta.state_bytes),
                    took.as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!("{:<14} template FAILED: {}", r.id, pyrovm::error_chain(&e));
            }
        }
    }
    println!("templates: {built} built, {cached} cached, {failed} failed, in {:.1} s", started.elapsed().as_secs_f64());
    true
}

/// Lists built images ([`pyrovm::image::list_images`]) with the runtimes using each.
pub fn list(ctx: &Context, json: bool) -> Result<ExitCode> {
    let images = pyrovm::image::list_images(&ctx.settings);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Each runtime's image as found (a tag-only OCI recipe's through its tag record).
    let found: Vec<(String, String)> = ctx
        .catalog
        .runtimes()
        .iter()
        .filter_map(|r| Some((r.id.clone(), pyrovm::image::find_image(&ctx.settings, r.image.as_ref()?)?.key)))
        .collect();
    let users =
        |key: &str| -> Vec<String> { found.iter().filter(|(_, k)| k == key).map(|(id, _)| id.clone()).collect() };
    let tags = pyrovm::image::oci::tag_records(&ctx.settings);
    // Where an OCI image came from: the tags resolved to it, then its digest.
    let source = |i: &pyrovm::image::Image| -> String {
        let Some(pulled) = &i.meta.oci_reference else { return String::new() };
        let named: Vec<&str> = tags.iter().filter(|t| t.pinned == *pulled).map(|t| t.reference.as_str()).collect();
        let digest = i.meta.manifest_digest.as_deref().unwrap_or("-");
        if named.is_empty() {
            format!("{pulled} ({digest})")
        } else {
            format!("{} -> {digest}", named.join(", "))
        }
    };
    if json {
        let v: Vec<_> = images
            .iter()
            .map(|i| {
                let tagged: Vec<&str> = tags
                    .iter()
                    .filter(|t| i.meta.oci_reference.as_ref() == Some(&t.pinned))
                    .map(|t| t.reference.as_str())
                    .collect();
                serde_json::json!({"key": i.key, "runtimes": users(&i.key), "meta": i.meta, "path": i.path, "tags": tagged})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<26} {:<10} {:>10} {:>8}  RUNTIMES  [OCI SOURCE]", "HASH", "SUITE", "SIZE", "AGE");
    for i in images {
        let age = now.saturating_sub(i.meta.created_unix);
        let age = match age {
            a if a < 3600 => format!("{}m", a / 60),
            a if a < 86400 => format!("{}h", a / 3600),
            a => format!("{}d", a / 86400),
        };
        let suite = if i.meta.oci_reference.is_some() { "oci" } else { i.meta.suite.as_str() };
        let oci = source(&i);
        println!(
            "{:<26} {:<10} {:>10} {:>8}  {}{}{oci}",
            i.key,
            suite,
            format_bytes(i.meta.size_bytes),
            age,
            users(&i.key).join(","),
            if oci.is_empty() { "" } else { "  " },
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tvm image import PATH RUNTIME` ([`pyrovm::image::oci::import`]): the
/// runtime's image from a local OCI layout or `docker save` tarball.
pub fn import(ctx: &Context, args: &ImageImportArgs) -> Result<ExitCode> {
    let r = ctx
        .catalog
        .get(&args.runtime)
        .ok_or_else(|| usage(format!("unknown runtime {:?} (see `tvm runtimes`)", args.runtime)))?;
    if r.image.is_none() {
        return Err(usage(format!("runtime {} has no image recipe", r.id)));
    }
    let progress = Progress::spinner(&format!("image {}", r.id));
    match pyrovm::image::oci::import(&ctx.settings, r, &args.path, &progress) {
        Ok(img) => {
            let digest = img.meta.manifest_digest.as_deref().unwrap_or("-");
            println!("{:<14} imported {} ({}) from {digest}", r.id, img.key, format_bytes(img.meta.size_bytes));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{:<14} FAILED: {}", r.id, pyrovm::error_chain(&e));
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_builds_alternate_suites_and_keep_every_runtime() {
        let all: Vec<Runtime> =
            tvm_config::Catalog::builtin().runtimes().iter().filter(|r| r.image.is_some()).cloned().collect();
        let order = by_alternating_suite(all.clone());
        let mut ids: Vec<_> = order.iter().map(|r| r.id.clone()).collect();
        let mut want: Vec<_> = all.iter().map(|r| r.id.clone()).collect();
        ids.sort();
        want.sort();
        assert_eq!(ids, want, "a permutation");
        let suite = |r: &Runtime| r.image.as_ref().unwrap().suite.clone();
        // The two biggest suites alternate until the smaller of them runs out.
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for r in &all {
            *counts.entry(suite(r)).or_default() += 1;
        }
        let mut sizes: Vec<usize> = counts.values().copied().collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let side_by_side = 2 * sizes[1];
        for pair in order[..side_by_side].windows(2) {
            assert_ne!(suite(&pair[0]), suite(&pair[1]), "{} then {}", pair[0].id, pair[1].id);
        }
    }
}
