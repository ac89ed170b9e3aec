//! `tvm doctor`: what this machine has and lacks to run VMs, each finding
//! with the command that fixes it.

use std::path::Path;

use serde::Serialize;
use tvm_config::{format_bytes, Catalog, Settings};

use crate::image::{runtime_state, RuntimeState};
use crate::AccelDecision;

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`qemu`, `guest kernel`, `runtime python-3.13`, ...).
    pub name: String,
    /// Whether it is usable. Optional parts (host cgroups, unbuilt images) are ok.
    pub ok: bool,
    /// What was found, or how to fix it.
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Check { name: name.into(), ok, detail: detail.into() }
    }
}

/// Every finding, in a fixed order: tools, kernel, agent, isolation, VMM, accelerator, runtimes.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether every check is ok.
    pub healthy: bool,
    /// The accelerator decision, when a kernel was there to probe with.
    pub accel: Option<AccelDecision>,
    /// The findings.
    pub checks: Vec<Check>,
}

fn tool(name: &str, path: &Path, package: &str) -> Check {
    match crate::accel::which(path) {
        Some(p) => Check::new(name, true, p.display().to_string()),
        None => Check::new(name, false, format!("missing: apt-get install {package}")),
    }
}

/// Checks this machine against `settings` and `catalog`. Builds nothing; the
/// accelerator probe may boot one VM (seconds), so it runs on a blocking thread.
pub async fn diagnose(settings: &Settings, catalog: &Catalog) -> Report {
    let mut checks = vec![
        tool("qemu", &settings.qemu, "qemu-system-x86"),
        tool("mmdebstrap", Path::new("mmdebstrap"), "mmdebstrap"),
        tool("mkfs.erofs", Path::new("mkfs.erofs"), "erofs-utils"),
    ];
    checks.push(if settings.kernel_source.exists() {
        Check::new("kernel source", true, settings.kernel_source.display().to_string())
    } else {
        Check::new("kernel source", false, "missing: apt-get install linux-source-6.1")
    });
    let agent = crate::agent_path(settings);
    checks.push(if crate::initrd::is_static_elf(&std::fs::read(&agent).unwrap_or_default()) {
        Check::new("guest agent", true, agent.display().to_string())
    } else {
        Check::new(
            "guest agent",
            false,
            format!("missing or not static at {}: run scripts/build-agent.sh", agent.display()),
        )
    });
    let kernel = crate::kernel::find_kernel(settings).ok().flatten();
    checks.push(match &kernel {
        Some(k) => Check::new("guest kernel", true, format!("{} ({})", k.key, k.bzimage.display())),
        None => Check::new("guest kernel", false, "not built: tvm kernel build"),
    });
    checks.extend(
        crate::isolation_checks(&settings.qemu, settings.vmm_uid_base).into_iter().map(|(name, ok, detail)| Check {
            name,
            ok,
            detail,
        }),
    );
    // The VMM backend: which, why, versions, KVM, the jailer (runs binaries: blocking).
    let s = settings.clone();
    match tokio::task::spawn_blocking(move || crate::vmm_checks(&s)).await {
        Ok(v) => checks.extend(v.into_iter().map(|(name, ok, detail)| Check { name, ok, detail })),
        Err(e) => checks.push(Check::new("vmm", false, format!("probe task failed: {e}"))),
    }
    let mut accel = None;
    if let Some(k) = &kernel {
        let (s, k) = (settings.clone(), k.clone());
        let decided = tokio::task::spawn_blocking(move || crate::accel_for(&s, &k)).await;
        match decided {
            Ok(Ok(d)) => {
                checks.push(Check::new("accelerator", true, format!("{}: {}", d.kind().as_str(), d.reason)));
                accel = Some(d);
            }
            Ok(Err(e)) => checks.push(Check::new("accelerator", false, e.to_string())),
            Err(e) => checks.push(Check::new("accelerator", false, format!("probe task failed: {e}"))),
        }
    }
    for r in catalog.runtimes() {
        let detail = match runtime_state(settings, r) {
            RuntimeState::Unavailable(why) => format!("unavailable: {why}"),
            RuntimeState::Ready(i) => format!("ready {} ({})", i.key, format_bytes(i.meta.size_bytes)),
            // Not a fault: `tvm run` builds it on first use, `tvm serve` in the background.
            RuntimeState::Buildable => format!("not built yet (built on first use; now: tvm image build {})", r.id),
        };
        checks.push(Check::new(format!("runtime {}", r.id), true, detail));
    }
    let healthy = checks.iter().all(|c| c.ok);
    Report { healthy, accel, checks }
}
