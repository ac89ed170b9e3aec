//! `tvm doctor`: what this machine has and lacks to run VMs, each finding
//! with the command that fixes it.

use std::path::Path;

use serde::Serialize;
use tvm_config::{format_bytes, Catalog, GuestArch, Settings};

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

/// Whether VMs start from templates, and what the template cache holds
/// (never a fault: a missing template means a cold boot).
fn templates_check(settings: &Settings) -> Check {
    if !settings.templates {
        return Check::new("templates", true, "off: every VM cold boots (templates = false / TVM_TEMPLATES=0)");
    }
    let store = crate::template::Templates::new(&settings.cache_dir);
    let cap = match settings.template_cache_mib {
        0 => "no cap".to_string(),
        mib => format!("cap {}", format_bytes(mib << 20)),
    };
    let detail = format!(
        "on: VMs restore from templates ({} built, {}; {cap}; built on first use or by tvm image build)",
        store.list().len(),
        format_bytes(store.total_bytes()),
    );
    Check::new("templates", true, detail)
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
    let arch = settings.guest_arch;
    let host = GuestArch::host();
    let qemu_package = match arch {
        GuestArch::X86_64 => "qemu-system-x86",
        GuestArch::Aarch64 => "qemu-system-arm",
    };
    let mut checks = vec![
        Check::new(
            "architecture",
            true,
            if arch == host {
                format!("host {host}, guests {arch} (native; KVM if the probe proves it)")
            } else {
                format!("host {host}, guests {arch} (TVM_GUEST_ARCH): emulated by QEMU TCG, never KVM")
            },
        ),
        tool("qemu", &settings.qemu, qemu_package),
        tool("mmdebstrap", Path::new("mmdebstrap"), "mmdebstrap"),
        tool("mkfs.erofs", Path::new("mkfs.erofs"), "erofs-utils"),
    ];
    checks.push(if settings.kernel_source.exists() {
        Check::new("kernel source", true, settings.kernel_source.display().to_string())
    } else {
        Check::new("kernel source", false, "missing: apt-get install linux-source-6.1")
    });
    let agent = crate::agent_path(settings);
    let agent_bytes = std::fs::read(&agent).unwrap_or_default();
    let agent_arch = crate::initrd::elf_arch(&agent_bytes);
    checks.push(if crate::initrd::is_static_elf(&agent_bytes) && agent_arch == Some(arch) {
        Check::new("guest agent", true, format!("{} ({arch}, static)", agent.display()))
    } else if let Some(other) = agent_arch.filter(|a| *a != arch) {
        Check::new(
            "guest agent",
            false,
            format!("{} is built for {other}, the guests are {arch}: see docs/arm64.md", agent.display()),
        )
    } else {
        Check::new(
            "guest agent",
            false,
            format!("missing or not static at {}: run scripts/build-agent.sh", agent.display()),
        )
    });
    let kernel = crate::kernel::find_kernel(settings).ok().flatten();
    checks.push(match &kernel {
        Some(k) => Check::new("guest kernel", true, format!("{} ({arch}, {})", k.key, k.bzimage.display())),
        None => Check::new("guest kernel", false, format!("not built for {arch}: tvm kernel build")),
    });
    if arch != host {
        // Cross builds: the kernel needs Debian's cross compiler. Images are
        // extracted and set up natively; only Python's byte-compilation runs
        // one emulated process (qemu-<arch>-static, no binfmt_misc needed).
        // Recipes with build steps (pip, customize, ...) still need
        // qemu-user in binfmt_misc: reported, not required.
        let cc = crate::kernel::KbuildTarget::of(arch, host).cross_compile.to_string() + "gcc";
        checks.push(match crate::accel::which(Path::new(&cc)) {
            Some(p) => Check::new("cross compiler", true, p.display().to_string()),
            None if kernel.is_some() => {
                Check::new("cross compiler", true, format!("{cc} not found (kernel already built)"))
            }
            None => Check::new(
                "cross compiler",
                false,
                format!("missing: apt-get install gcc-{}", cc.trim_end_matches("-gcc")),
            ),
        });
        let emulator = format!("qemu-{arch}-static");
        let handler = format!("/proc/sys/fs/binfmt_misc/qemu-{arch}");
        let binfmt = std::fs::read_to_string(&handler).is_ok_and(|s| s.starts_with("enabled"));
        checks.push(match crate::accel::which(Path::new(&emulator)) {
            Some(p) => Check::new(
                "image emulation",
                true,
                format!(
                    "{} ({} images; binfmt_misc {}: {})",
                    p.display(),
                    arch.debian(),
                    if binfmt { "enabled" } else { "not registered" },
                    if binfmt {
                        "recipes with pip/npm/gem/customize steps can be built too"
                    } else {
                        "recipes with pip/npm/gem/customize steps cannot be built"
                    }
                ),
            ),
            None => Check::new(
                "image emulation",
                false,
                format!(
                    "{emulator} missing (byte-compiles Python in {} images): apt-get install qemu-user-static",
                    arch.debian()
                ),
            ),
        });
    }
    checks.extend(
        crate::isolation_checks(&settings.qemu, settings.vmm_uid_base).into_iter().map(|(name, ok, detail)| Check {
            name,
            ok,
            detail,
        }),
    );
    // The VMM backend: which, why, versions, KVM, the jailer (runs binaries: blocking).
    let (s, k) = (settings.clone(), kernel.clone());
    match tokio::task::spawn_blocking(move || crate::vmm_checks(&s, k.as_ref())).await {
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
    checks.push(templates_check(settings));
    let registries = crate::image::registry::registries_of(settings, catalog.runtimes());
    let _ = tokio::task::spawn_blocking(move || crate::image::registry::probe_blocking(registries)).await;
    for r in catalog.runtimes() {
        let detail = match runtime_state(settings, r) {
            RuntimeState::Probing(registry) => format!("unknown: registry {registry} did not answer the probe in time"),
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
