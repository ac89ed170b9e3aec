//! `tvm template list|remove`: the VM template cache ([`pyrovm::Templates`]).

use std::process::ExitCode;

use anyhow::Result;
use tvm_config::format_bytes;

use super::{usage, Context};
use crate::cli::TemplateCommand;

/// Lists or removes templates.
pub fn template(ctx: &Context, command: TemplateCommand) -> Result<ExitCode> {
    let store = pyrovm::Templates::new(&ctx.settings.cache_dir)
        .with_max_bytes(ctx.settings.template_cache_mib.saturating_mul(1 << 20));
    match command {
        TemplateCommand::List { json } => {
            let all = store.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(ExitCode::SUCCESS);
            }
            // SIZE: what the template takes on disk (its saved device state and
            // the non-zero pages of its RAM); RAM: the guest's memory size.
            println!("{:<26} {:<14} {:>8} {:>10} {:>9} {:>9}", "KEY", "RUNTIME", "RAM", "SIZE", "BOOT", "WARMUP");
            for t in all {
                let size = t.state_bytes + t.ram.as_ref().map_or(0, |r| r.data_bytes);
                println!(
                    "{:<26} {:<14} {:>7}M {:>10} {:>7}ms {:>7}ms",
                    t.key,
                    t.runtime,
                    t.inputs.memory_mib,
                    format_bytes(size),
                    t.boot_ms,
                    t.warmup_ms
                );
            }
            let cap = match store.max_bytes() {
                0 => "no cap".to_string(),
                max => format!("cap {}, least recently used removed past it", format_bytes(max)),
            };
            println!("{} in all ({cap}; template_cache_mib)", format_bytes(store.total_bytes()));
        }
        TemplateCommand::Remove { keys, all } => {
            let keys: Vec<String> = if all {
                store.list().into_iter().map(|t| t.key).collect()
            } else if keys.is_empty() {
                return Err(usage("name template keys to remove, or pass --all"));
            } else {
                keys
            };
            let mut removed = 0;
            for key in &keys {
                if store.remove(key)? {
                    removed += 1;
                } else {
                    println!("{key}: no such template");
                }
            }
            println!("removed {removed} template(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
