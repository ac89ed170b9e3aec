//! `tvm bench`: start latency (cold boot, template restore, warm pool) next
//! to the same program run natively, plus restore-to-ready, snapshot size and
//! the host memory of an idle VM.
//!
//! Every VM run is a fresh VM (start + job + teardown), measured from the host.
//! The native baseline runs the same source with the host's own toolchain in
//! the same invocation, so the overhead ratio comes from one run on one machine.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use pyrovm::{ExecutionRequest, Pyrovm, SourceFile};

/// A hello world per language, and how the host would run it natively.
struct Sample {
    language: &'static str,
    file: &'static str,
    source: &'static str,
    /// Host command: compile (optional) and run, in a temp dir holding `file`.
    native: &'static [&'static [&'static str]],
}

const SAMPLES: &[Sample] = &[
    Sample { language: "python", file: "main.py", source: "print('hello')\n", native: &[&["python3", "main.py"]] },
    Sample { language: "javascript", file: "main.js", source: "console.log('hello')\n", native: &[&["node", "main.js"]] },
    Sample { language: "ruby", file: "main.rb", source: "puts 'hello'\n", native: &[&["ruby", "main.rb"]] },
    Sample {
        language: "go",
        file: "main.go",
        source: "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello\") }\n",
        native: &[&["go", "build", "-o", "main", "main.go"], &["./main"]],
    },
    Sample {
        language: "rust",
        file: "main.rs",
        source: "fn main() {\n    println!(\"hello\");\n}\n",
        native: &[&["rustc", "--edition", "2021", "-C", "opt-level=2", "-o", "main", "main.rs"], &["./main"]],
    },
    Sample {
        language: "java",
        file: "Main.java",
        source: "public class Main {\n    public static void main(String[] a) {\n        System.out.println(\"hello\");\n    }\n}\n",
        native: &[&["javac", "-d", ".", "Main.java"], &["java", "-cp", ".", "Main"]],
    },
    Sample {
        language: "c",
        file: "main.c",
        source: "#include <stdio.h>\nint main(void){puts(\"hello\");return 0;}\n",
        native: &[&["gcc", "-O2", "-o", "main", "main.c"], &["./main"]],
    },
    Sample {
        language: "cpp",
        file: "main.cpp",
        source: "#include <iostream>\nint main(){std::cout<<\"hello\"<<std::endl;}\n",
        native: &[&["g++", "-O2", "-o", "main", "main.cpp"], &["./main"]],
    },
];

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn native_ms(s: &Sample, dir: &Path) -> Option<f64> {
    std::fs::write(dir.join(s.file), s.source).ok()?;
    let t = Instant::now();
    for argv in s.native {
        let st = std::process::Command::new(argv[0]).args(&argv[1..]).current_dir(dir).output().ok()?;
        if !st.status.success() {
            return None;
        }
    }
    Some(t.elapsed().as_secs_f64() * 1000.0)
}

/// What [`mem_bytes`] reads of a process.
#[derive(Debug, Clone, Copy)]
enum Mem {
    /// Resident memory (`VmRSS`): pages shared with other processes count whole.
    Rss,
    /// Proportional set size (`Pss` in `smaps_rollup`): a page shared by n
    /// processes counts 1/n, so clones sharing their template's pages show it.
    Pss,
}

/// [`Mem`] of one process in bytes, if readable.
fn own_mem_bytes(pid: u32, what: Mem) -> Option<u64> {
    let (file, key) = match what {
        Mem::Rss => ("status", "VmRSS:"),
        Mem::Pss => ("smaps_rollup", "Pss:"),
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let kb: u64 = text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of a VMM and its descendants, in bytes: the Firecracker
/// stand-in's guest lives in its QEMU child (plus vhost-device-vsock), so
/// the VMM process alone would undercount it. Bounded walk (64 processes).
fn rss_bytes(pid: u32) -> Option<u64> {
    mem_bytes(pid, Mem::Rss)
}

/// [`rss_bytes`] for any [`Mem`].
fn mem_bytes(pid: u32, what: Mem) -> Option<u64> {
    let own = |p| own_mem_bytes(p, what);
    let mut total = own(pid)?;
    let mut queue = vec![pid];
    let mut seen = 1;
    while let Some(p) = queue.pop() {
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            if seen >= 64 {
                return Some(total);
            }
            seen += 1;
            total += own(c).unwrap_or(0);
            queue.push(c);
        }
    }
    Some(total)
}

/// How long a VM sits idle before its host RSS is read: long enough for the
/// VMM to settle after boot or restore.
const IDLE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the benchmark and prints the table.
pub async fn run(vmm: &Pyrovm, runs: usize, only: &[String]) -> Result<()> {
    let dir = tempfile::tempdir().context("temp dir for native runs")?;
    let cold_vmm = vmm.clone().with_templates(false);
    let tpl_vmm = vmm.clone().with_templates(true);
    println!("vmm: {} ({})", vmm.vmm().backend.kind().as_str(), vmm.vmm().reason);
    if matches!(&vmm.vmm().backend, pyrovm::Backend::Firecracker(f) if f.standin()) {
        // Honest labels: the stand-in boots QEMU under TCG, so these are not Firecracker's figures.
        println!("NOTE: figures below are the Firecracker STAND-IN's (QEMU microvm under TCG behind Firecracker's API), not Firecracker's");
    }
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!("runs per row: {runs} (each VM run starts a fresh VM)\n");
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "runtime",
        "native",
        "cold",
        "template",
        "tmpl p95",
        "pooled",
        "boot>rdy",
        "rest>rdy",
        "snapshot",
        "RSS cold",
        "RSS tmpl",
        "PSS tmpl",
        "RSS pool",
        "cold/n",
        "tmpl/n"
    );
    pyrovm::registry::probe_blocking(pyrovm::registry::registries_of(vmm.settings(), vmm.catalog().runtimes()));
    let mut no_templates = Vec::new();
    let selected = vmm
        .catalog()
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none())
        .filter(|r| {
            !matches!(pyrovm::image::runtime_state(vmm.settings(), r), pyrovm::image::RuntimeState::Unavailable(_))
        })
        .filter(|r| only.is_empty() || only.iter().any(|o| r.id.starts_with(o.as_str())));
    for rt in selected {
        let Some(s) = SAMPLES.iter().find(|s| s.language == rt.language) else {
            println!("{:<12} no benchmark program for {}", rt.id, rt.language);
            continue;
        };
        let req = ExecutionRequest {
            runtime: rt.id.clone(),
            files: vec![SourceFile { name: s.file.into(), content: s.source.as_bytes().to_vec() }],
            ..Default::default()
        };
        let plan = pyrovm::plan(vmm.catalog(), &req, vmm.settings().vm_overhead_mib)?;
        // The image and the template are built first, outside the numbers.
        // QEMU's templates must build; Firecracker's are snapshots its VMM
        // may refuse (the stand-in does): then '-' in those columns, and why.
        let built = tpl_vmm.ensure_template(&plan.runtime, plan.vm_memory_mib).await;
        let template = match (vmm.vmm().backend.kind(), built) {
            (_, Ok(t)) => Some(t),
            (pyrovm::VmmKind::Qemu, Err(e)) => return Err(e).with_context(|| format!("template of {}", rt.id)),
            (pyrovm::VmmKind::Firecracker, Err(e)) => {
                no_templates.push(format!("{}: {:#}", rt.id, anyhow::Error::from(e)));
                None
            }
        };
        cold_vmm.execute(&req, |_, _, _| {}).await.with_context(|| format!("warm-up run of {}", rt.id))?;
        let mut m = Samples::default();
        for _ in 0..runs {
            if let Some(ms) = native_ms(s, dir.path()) {
                m.native.push(ms);
            }
            // Cold boot, end to end (what `tvm run` paid before templates).
            let t = Instant::now();
            let started = cold_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?;
            m.boot_ready.push(started.vm.boot_time().as_secs_f64() * 1000.0);
            let r = started.vm.execute(&plan.job, |_, _, _| {}).await?;
            m.cold.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.verdict == tvm_protocol::Verdict::Ok, "{}: verdict {}", rt.id, r.verdict);

            if template.is_none() {
                // Pooled without templates: a cold-booted VM idles at
                // agent-ready, warmed up as the server's pool does.
                let mut vm = cold_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?.vm;
                cold_vmm.warm_up(&mut vm, rt).await?;
                let t = Instant::now();
                let r = vm.execute(&plan.job, |_, _, _| {}).await?;
                m.pooled.push(t.elapsed().as_secs_f64() * 1000.0);
                anyhow::ensure!(r.verdict == tvm_protocol::Verdict::Ok, "{}: verdict {}", rt.id, r.verdict);
                continue;
            }
            // Restored from the template, end to end (what `tvm run` pays now).
            let t = Instant::now();
            let started = tpl_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?;
            anyhow::ensure!(
                started.vm.start_kind() == pyrovm::StartKind::Template,
                "{}: not restored from the template: {}",
                rt.id,
                started.note.unwrap_or_default()
            );
            m.restore_ready.push(started.vm.boot_time().as_secs_f64() * 1000.0);
            let r = started.vm.execute(&plan.job, |_, _, _| {}).await?;
            m.template.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.verdict == tvm_protocol::Verdict::Ok, "{}: verdict {}", rt.id, r.verdict);

            // Pooled: a restored VM idles at agent-ready (its host RSS and
            // PSS are read then, beside a second idle clone as in a pool:
            // the pages both only read are shared), and only the job is on
            // the clock.
            let mut vm = tpl_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?.vm;
            let twin = tpl_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?.vm;
            tokio::time::sleep(IDLE_SETTLE).await;
            m.rss_template.extend(rss_bytes(vm.vmm_pid()).map(|b| b as f64));
            m.pss_template.extend(mem_bytes(vm.vmm_pid(), Mem::Pss).map(|b| b as f64));
            drop(twin);
            // As the server's pool does (`pool_warm_up`, see `Pyrovm::warm_up`);
            // what it costs in host memory is the `RSS pool` column.
            tpl_vmm.warm_up(&mut vm, rt).await?;
            m.rss_pool.extend(rss_bytes(vm.vmm_pid()).map(|b| b as f64));
            let t = Instant::now();
            let r = vm.execute(&plan.job, |_, _, _| {}).await?;
            m.pooled.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.verdict == tvm_protocol::Verdict::Ok, "{}: verdict {}", rt.id, r.verdict);
        }
        // One idle cold-booted VM for the RSS comparison.
        let vm = cold_vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await?.vm;
        tokio::time::sleep(IDLE_SETTLE).await;
        m.rss_cold.extend(rss_bytes(vm.vmm_pid()).map(|b| b as f64));
        drop(vm);

        let n50 = percentile(&mut m.native, 0.5);
        let c50 = percentile(&mut m.cold, 0.5);
        let t50 = percentile(&mut m.template, 0.5);
        // No host toolchain for this language: no baseline, no ratio (never a made-up number).
        let (native_col, cold_ratio, mut tpl_ratio) = if m.native.is_empty() {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            (format!("{n50:.1}ms"), format!("{:.1}x", c50 / n50), format!("{:.1}x", t50 / n50))
        };
        if template.is_none() {
            tpl_ratio = "-".into();
        }
        let ms = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.0}ms") };
        let mib = |v: &mut Vec<f64>| {
            let p = percentile(v, 0.5);
            if p.is_nan() {
                "-".to_string()
            } else {
                tvm_config::format_bytes(p as u64)
            }
        };
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
            rt.id,
            native_col,
            ms(c50),
            ms(t50),
            ms(percentile(&mut m.template, 0.95)),
            ms(percentile(&mut m.pooled, 0.5)),
            ms(percentile(&mut m.boot_ready, 0.5)),
            ms(percentile(&mut m.restore_ready, 0.5)),
            template
                .as_ref()
                .map(|t| tvm_config::format_bytes(t.meta.state_bytes + t.meta.ram.as_ref().map_or(0, |r| r.data_bytes)))
                .unwrap_or_else(|| "-".into()),
            mib(&mut m.rss_cold),
            mib(&mut m.rss_template),
            mib(&mut m.pss_template),
            mib(&mut m.rss_pool),
            cold_ratio,
            tpl_ratio
        );
    }
    for why in &no_templates {
        println!("no template for {why}");
    }
    println!("\nAll columns p50 unless named. cold = VMM start to result with a kernel boot (templates off);");
    println!("template = the same restored from the runtime's template (what `tvm run` pays now);");
    println!("pooled = job sent to result on a restored VM already at agent-ready and warmed up (the");
    println!("runtime's warm-up run once in it, as the server's pool does: a warm-pool hit);");
    println!("boot>rdy / rest>rdy = VMM start to agent-ready, cold boot / template restore;");
    println!("snapshot = the template's saved state (device state plus the RAM's non-zero pages);");
    println!("RSS = host resident memory of one idle VMM (with its child processes: the stand-in's");
    println!("QEMU and vhost-device-vsock); PSS tmpl = its proportional share while a second clone");
    println!("idles beside it (pages both map from the template count half); RSS pool = RSS of a");
    println!("restored VM after its pool warm-up (the pages the warm-up touched stay resident);");
    println!("cold/n, tmpl/n = cold and template p50 over native p50 (the host's own toolchain,");
    println!("whatever version it has; '-' where the host has none).");
    Ok(())
}

/// Measurements of one runtime, in ms (RSS in bytes).
#[derive(Debug, Default)]
struct Samples {
    native: Vec<f64>,
    cold: Vec<f64>,
    template: Vec<f64>,
    pooled: Vec<f64>,
    boot_ready: Vec<f64>,
    restore_ready: Vec<f64>,
    rss_cold: Vec<f64>,
    rss_template: Vec<f64>,
    pss_template: Vec<f64>,
    /// Host RSS of a restored VM after its pool warm-up.
    rss_pool: Vec<f64>,
}
