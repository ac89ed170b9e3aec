//! `tvm bench`: cold-start latency next to the same program run natively.
//!
//! Every VM run is a fresh VM (boot + job + teardown), measured from the host.
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

/// Runs the benchmark and prints the table.
pub async fn run(vmm: &Pyrovm, runs: usize, only: &[String]) -> Result<()> {
    let dir = tempfile::tempdir().context("temp dir for native runs")?;
    println!("vmm: {} ({})", vmm.vmm().backend.kind().as_str(), vmm.vmm().reason);
    if matches!(&vmm.vmm().backend, pyrovm::Backend::Firecracker(f) if f.standin()) {
        // Honest labels: the stand-in boots QEMU under TCG, so these are not Firecracker's figures.
        println!("NOTE: figures below are the Firecracker STAND-IN's (QEMU microvm under TCG behind Firecracker's API), not Firecracker's");
    }
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!("runs per row: {runs} (each VM run boots a fresh VM)\n");
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>10}",
        "runtime",
        "native p50",
        "cold p50",
        "cold p95",
        "warm p50",
        "warm p95",
        "ready p50",
        "guest boot",
        "cold ex/s",
        "ratio",
        "image"
    );
    let selected = vmm
        .catalog()
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none())
        .filter(|r| only.is_empty() || only.iter().any(|o| r.id.starts_with(o.as_str())));
    for rt in selected {
        let Some(s) = SAMPLES.iter().find(|s| s.language == rt.language) else {
            println!("{:<12} no benchmark program for {}", rt.id, rt.language);
            continue;
        };
        // The first VM may build the image; keep it out of the numbers.
        let req = ExecutionRequest {
            runtime: rt.id.clone(),
            files: vec![SourceFile { name: s.file.into(), content: s.source.as_bytes().to_vec() }],
            ..Default::default()
        };
        vmm.execute(&req, |_, _, _| {}).await.with_context(|| format!("warm-up run of {}", rt.id))?;
        let (mut native, mut cold, mut ready, mut uptime, mut exec) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            if let Some(ms) = native_ms(s, dir.path()) {
                native.push(ms);
            }
            let t = Instant::now();
            let plan = pyrovm::plan(vmm.catalog(), &req, vmm.settings().vm_overhead_mib)?;
            let vm = vmm.boot(&plan.runtime, plan.vm_memory_mib).await?;
            ready.push(vm.boot_time().as_secs_f64() * 1000.0);
            uptime.push(vm.guest_uptime_ms() as f64);
            let e = Instant::now();
            let r = vm.execute(&plan.job, |_, _, _| {}).await?;
            exec.push(e.elapsed().as_secs_f64() * 1000.0);
            cold.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.verdict == tvm_protocol::Verdict::Ok, "{}: verdict {}", rt.id, r.verdict);
        }
        let n50 = percentile(&mut native, 0.5);
        let c50 = percentile(&mut cold, 0.5);
        // One VM at a time: executions per second of a serial client paying the boot each time.
        let per_sec = 1000.0 * cold.len() as f64 / cold.iter().sum::<f64>();
        let image = rt
            .image
            .as_ref()
            .and_then(|r| pyrovm::image::find_image(vmm.settings(), r))
            .map(|i| tvm_config::format_bytes(i.meta.size_bytes))
            .unwrap_or_default();
        // No host toolchain for this language: no baseline, no ratio (never a made-up number).
        let (native_col, ratio_col) = if native.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{n50:.1}ms"), format!("{:.1}x", c50 / n50))
        };
        println!(
            "{:<12} {:>10} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>9.2} {:>8} {:>10}",
            rt.id,
            native_col,
            c50,
            percentile(&mut cold, 0.95),
            percentile(&mut exec, 0.5),
            percentile(&mut exec, 0.95),
            percentile(&mut ready, 0.5),
            percentile(&mut uptime, 0.5),
            per_sec,
            ratio_col,
            image
        );
    }
    println!("\ncold = VMM start to result (boot + job + teardown), what `tvm run` pays;");
    println!(
        "warm = job sent to result on an already booted VM, what a warm-pool request pays (`tvm serve --pool-size`);"
    );
    println!("ready = VMM start to agent-ready; guest boot = guest uptime at agent-ready;");
    println!("cold ex/s = serial executions per second with a boot each; ratio = cold p50 / native p50");
    println!("(native: the host's own toolchain, whatever version it has; '-' where the host has none).");
    Ok(())
}
