//! The guest kernel: Debian's `linux-source-6.1` configured by `make tinyconfig`
//! plus TVM's pinned fragment (`guest/kernel/tvm-guest-6.1.fragment` for
//! x86_64, `tvm-guest-6.1-arm64.fragment` for aarch64, cross-compiled with
//! Debian's `gcc-aarch64-linux-gnu` on other hosts). Every fragment line is
//! verified to survive `olddefconfig`, so the fragment is the truth about the
//! guest. Builds are cached by a key of fragment and source (the fragments
//! differ, so the key names the architecture too).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::info;
use tvm_config::{GuestArch, Settings};

use crate::cache::{run_cancellable, which, BuildCancel, Cache, RunError};
use crate::progress::Progress;

/// TVM's own driver, built into every guest kernel: the stage output
/// channel (`/dev/tvm-output`, `/dev/tvm-stdout`, `/dev/tvm-stderr`) the
/// agent gives programs as their stdout and stderr instead of pipes
/// (the file's header says why and how it behaves).
pub const OUTPUT_DRIVER: &str = include_str!("../../../guest/kernel/tvm_output.c");

/// Where [`OUTPUT_DRIVER`] goes in the kernel tree (`obj-y` of `drivers/char`,
/// a directory every configuration builds).
const OUTPUT_DRIVER_PATH: &str = "drivers/char/tvm_output.c";

/// The pinned configuration fragment (x86_64).
pub const FRAGMENT: &str = include_str!("../../../guest/kernel/tvm-guest-6.1.fragment");

/// The pinned configuration fragment for aarch64 guests (QEMU `virt`).
pub const FRAGMENT_AARCH64: &str = include_str!("../../../guest/kernel/tvm-guest-6.1-arm64.fragment");

/// The fragment of guests of `arch`.
pub fn fragment_for(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => FRAGMENT,
        GuestArch::Aarch64 => FRAGMENT_AARCH64,
    }
}

/// Bumped when the build procedure changes in a way that changes the result.
const KERNEL_RECIPE_VERSION: u32 = 2;

/// `  CC`/`  LD`/`  AR` lines printed by `make bzImage` for this configuration
/// (measured: 1427 with Debian linux-source-6.1 6.1.192-3, plus TVM's driver); the length of the progress bar.
pub const KERNEL_BUILD_STEPS: u64 = 1428;

/// The same count for `make ARCH=arm64 Image` of the aarch64 fragment.
pub const KERNEL_BUILD_STEPS_AARCH64: u64 = 1273;

/// Kbuild's settings for building a kernel for `arch` on this host: `ARCH`,
/// `CROSS_COMPILE` (empty when native), the make target and its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KbuildTarget {
    /// Kbuild's `ARCH`.
    pub arch: &'static str,
    /// Kbuild's `CROSS_COMPILE` prefix; empty for a native build.
    pub cross_compile: &'static str,
    /// The make target (`bzImage`, `Image`).
    pub target: &'static str,
    /// Where the target lands in the source tree.
    pub output: &'static str,
}

impl KbuildTarget {
    /// The build of guests of `arch` on a host of `host`.
    pub fn of(arch: GuestArch, host: GuestArch) -> Self {
        match arch {
            GuestArch::X86_64 => Self {
                arch: "x86",
                cross_compile: if host == arch { "" } else { "x86_64-linux-gnu-" },
                target: "bzImage",
                output: "arch/x86/boot/bzImage",
            },
            // `Image` (uncompressed): QEMU virt and Firecracker boot it directly.
            GuestArch::Aarch64 => Self {
                arch: "arm64",
                cross_compile: if host == arch { "" } else { "aarch64-linux-gnu-" },
                target: "Image",
                output: "arch/arm64/boot/Image",
            },
        }
    }
}

/// Tools the build runs, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
];

/// objtool (always built for x86_64) needs libelf's headers.
const LIBELF_HEADER: &str = "/usr/include/gelf.h";

/// A built guest kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Cache key (see [`kernel_key`]).
    pub key: String,
    /// The architecture's bootable image (QEMU `-kernel`): `bzImage` on
    /// x86_64, the uncompressed arm64 `Image` on aarch64.
    pub bzimage: PathBuf,
    /// Uncompressed ELF (Firecracker, debugging).
    pub vmlinux: PathBuf,
    /// The resolved `.config`.
    pub config: PathBuf,
}

impl Kernel {
    fn in_dir(dir: &Path, key: &str, arch: GuestArch) -> Self {
        let boot = match arch {
            GuestArch::X86_64 => "bzImage",
            GuestArch::Aarch64 => "Image",
        };
        Self { key: key.to_string(), bzimage: dir.join(boot), vmlinux: dir.join("vmlinux"), config: dir.join("config") }
    }

    fn is_complete(&self) -> bool {
        [&self.bzimage, &self.vmlinux, &self.config].iter().all(|p| p.is_file())
    }
}

/// Why the guest kernel could not be built (or its key computed).
#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    /// Debian's kernel source tarball is not installed.
    #[error("kernel source {} not found; install it with `apt-get install linux-source-6.1` (or set TVM_KERNEL_SOURCE)", path.display())]
    SourceMissing {
        /// Where it was expected (`settings.kernel_source`).
        path: PathBuf,
    },
    /// A build tool or header is missing.
    #[error("{tool} not found; install it with `apt-get install {package}`")]
    ToolMissing {
        /// The tool (or header file).
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// Unpacking the source tarball failed.
    #[error("unpacking {} failed: {tail}", tarball.display())]
    Extract {
        /// The tarball.
        tarball: PathBuf,
        /// Exit status and the last lines of output.
        tail: String,
    },
    /// `make tinyconfig`, merging the fragment or `make olddefconfig` failed.
    #[error("configuring the kernel failed at `{step}`: {tail}")]
    Configure {
        /// The command that failed.
        step: &'static str,
        /// Exit status and the last lines of output.
        tail: String,
    },
    /// Kconfig did not keep fragment options (usually an unmet dependency).
    #[error("the kernel config dropped options of the guest fragment (unmet dependencies?): {}", options.join(", "))]
    OptionDropped {
        /// The fragment lines not honoured, each with what the config has instead.
        options: Vec<String>,
    },
    /// `make bzImage` failed.
    #[error("compiling the kernel failed: {tail}")]
    Compile {
        /// Exit status and the last lines of stderr.
        tail: String,
    },
    /// The build was stopped through its [`BuildCancel`] (`tvm kernel build`
    /// got a signal, or the caller waiting for it went away): the compiler's
    /// process group was killed and the scratch directory removed.
    #[error("the kernel build was cancelled")]
    Cancelled,
    /// Filesystem work (cache, scratch directory, lock) failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// A build tool's failure as `kind`, unless it was cancelled.
fn tool_failed(e: RunError, kind: impl FnOnce(String) -> KernelBuildError) -> KernelBuildError {
    match e {
        RunError::Cancelled => KernelBuildError::Cancelled,
        e => kind(e.describe()),
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelBuildError {
    let path = path.to_path_buf();
    move |source| KernelBuildError::Io { action, path, source }
}

/// The cache key: first 24 hex digits of a SHA-256 over the recipe version, the
/// fragment, TVM's driver, and the source tarball's file name and size. Cheap on purpose: the
/// 130 MB tarball is never read (a new Debian upload changes its size).
pub fn kernel_key(settings: &Settings) -> Result<String, KernelBuildError> {
    let src = &settings.kernel_source;
    let meta = std::fs::metadata(src).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => KernelBuildError::SourceMissing { path: src.clone() },
        _ => KernelBuildError::Io { action: "reading", path: src.clone(), source: e },
    })?;
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(key_of(fragment_for(settings.guest_arch), &name, meta.len()))
}

fn key_of(fragment: &str, source_name: &str, source_len: u64) -> String {
    let mut h = Sha256::new();
    h.update(KERNEL_RECIPE_VERSION.to_le_bytes());
    h.update(fragment.as_bytes());
    h.update(OUTPUT_DRIVER.as_bytes());
    h.update(source_name.as_bytes());
    h.update(source_len.to_le_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The cached kernel for the current fragment and source tarball, if built.
pub fn find_kernel(settings: &Settings) -> Result<Option<Kernel>, KernelBuildError> {
    let key = kernel_key(settings)?;
    let k = Kernel::in_dir(&Cache::new(&settings.cache_dir).kernel_dir(&key), &key, settings.guest_arch);
    Ok(k.is_complete().then_some(k))
}

/// Returns the cached kernel or builds it (about 5 minutes on 2 cores). Holds
/// the cache lock while building, so concurrent callers wait and reuse it.
/// `cancel` stops a build: its tools' process group is killed and the ~1.5 GB
/// scratch directory removed before this returns [`KernelBuildError::Cancelled`]
/// (a build whose process dies first leaves it to the next start's sweep,
/// [`Cache::sweep_stale_scratch`]).
pub fn ensure_kernel(
    settings: &Settings,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Kernel, KernelBuildError> {
    if let Some(k) = find_kernel(settings)? {
        progress.clear();
        return Ok(k);
    }
    check_tools(settings.guest_arch)?;
    let key = kernel_key(settings)?;
    let cache = Cache::new(&settings.cache_dir);
    let lock_name = format!("kernel-{key}");
    let _lock = cache
        .lock_with(&lock_name, || progress.set_message("waiting for another tvm process building the guest kernel"))
        .map_err(io_err("locking", &cache.root().join("locks").join(&lock_name)))?;
    if let Some(k) = find_kernel(settings)? {
        progress.finish(format!("guest kernel {key} built by another process"));
        return Ok(k);
    }
    cache.sweep_stale_scratch();
    let started = Instant::now();
    match build(settings, &cache, &key, progress, cancel) {
        Ok(k) => {
            let secs = started.elapsed().as_secs();
            info!(key, seconds = secs, "guest kernel built");
            progress.finish(format!("guest kernel {key} built in {}m{:02}s", secs / 60, secs % 60));
            Ok(k)
        }
        Err(e) => {
            progress.fail("guest kernel build failed");
            Err(e)
        }
    }
}

/// Fails naming the first missing tool and its package.
fn check_tools(arch: GuestArch) -> Result<(), KernelBuildError> {
    if let Some(&(tool, package)) = TOOLS.iter().find(|(tool, _)| which(tool).is_none()) {
        return Err(KernelBuildError::ToolMissing { tool, package });
    }
    if arch == GuestArch::Aarch64 && KbuildTarget::of(arch, GuestArch::host()).cross_compile == "aarch64-linux-gnu-" {
        if which("aarch64-linux-gnu-gcc").is_none() {
            return Err(KernelBuildError::ToolMissing {
                tool: "aarch64-linux-gnu-gcc",
                package: "gcc-aarch64-linux-gnu",
            });
        }
        // arm64 builds no objtool, so libelf is not needed.
        return Ok(());
    }
    if !Path::new(LIBELF_HEADER).is_file() {
        return Err(KernelBuildError::ToolMissing { tool: "libelf headers (gelf.h)", package: "libelf-dev" });
    }
    Ok(())
}

/// Unpacks, configures, verifies, compiles and publishes; the scratch directory
/// (about 1.5 GB) is removed on return, whatever happened.
fn build(
    settings: &Settings,
    cache: &Cache,
    key: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Kernel, KernelBuildError> {
    let scratch = cache.scratch("kernel").map_err(io_err("creating a scratch directory in", &cache.tmp_dir()))?;
    let src = scratch.join("src");
    std::fs::create_dir(&src).map_err(io_err("creating", &src))?;
    let arch = settings.guest_arch;
    let kbuild = KbuildTarget::of(arch, GuestArch::host());
    progress.set_length(match arch {
        GuestArch::X86_64 => KERNEL_BUILD_STEPS,
        GuestArch::Aarch64 => KERNEL_BUILD_STEPS_AARCH64,
    });
    let fragment_text = fragment_for(arch);

    let tarball = &settings.kernel_source;
    let name = tarball.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    progress.set_message(format!("unpacking {name}"));
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(tarball).arg("--strip-components=1").arg("-C").arg(&src);
    run_cancellable(&mut tar, Some(cancel), |_| {}, |_| {})
        .map_err(|e| tool_failed(e, |tail| KernelBuildError::Extract { tarball: tarball.clone(), tail }))?;

    add_output_driver(&src)?;

    progress.set_message("configuring the guest kernel");
    let fragment = scratch.join("tvm-guest.fragment");
    std::fs::write(&fragment, fragment_text).map_err(io_err("writing", &fragment))?;
    let configure = |step: &'static str, cmd: &mut Command| {
        run_cancellable(cmd, Some(cancel), |_| {}, |_| {})
            .map_err(|e| tool_failed(e, |tail| KernelBuildError::Configure { step, tail }))
    };
    configure("make tinyconfig", make(&src, kbuild).arg("tinyconfig"))?;
    let mut merge = Command::new("sh");
    merge.current_dir(&src).arg("scripts/kconfig/merge_config.sh").args(["-m", ".config"]).arg(&fragment);
    if kbuild.arch != "x86" || !kbuild.cross_compile.is_empty() {
        merge.env("ARCH", kbuild.arch).env("CROSS_COMPILE", kbuild.cross_compile);
    }
    configure("merge_config.sh -m .config tvm-guest.fragment", &mut merge)?;
    configure("make olddefconfig", make(&src, kbuild).arg("olddefconfig"))?;
    let config_path = src.join(".config");
    let config = std::fs::read_to_string(&config_path).map_err(io_err("reading", &config_path))?;
    let options = dropped_options(fragment_text, &config);
    if !options.is_empty() {
        return Err(KernelBuildError::OptionDropped { options });
    }

    progress.set_message("compiling the guest kernel");
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut steps = 0u64;
    let mut compile = make(&src, kbuild);
    compile.arg(format!("-j{jobs}")).arg(kbuild.target);
    run_cancellable(
        &mut compile,
        Some(cancel),
        |line| {
            if is_build_step(line) {
                steps += 1;
                progress.set_position(steps);
            }
        },
        |_| {},
    )
    .map_err(|e| tool_failed(e, |tail| KernelBuildError::Compile { tail }))?;
    info!(steps, expected = KERNEL_BUILD_STEPS, "kernel compile steps");

    // Everything is inside the scratch dir (one filesystem), so renames suffice;
    // `out` then becomes kernel/<key> with a single rename.
    let out = scratch.join("out");
    std::fs::create_dir(&out).map_err(io_err("creating", &out))?;
    let boot = Kernel::in_dir(&out, key, arch);
    let boot_name = boot.bzimage.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for (from, to) in [(kbuild.output, boot_name.as_str()), ("vmlinux", "vmlinux"), (".config", "config")] {
        let from = src.join(from);
        std::fs::rename(&from, out.join(to)).map_err(io_err("moving", &from))?;
    }
    let dest = cache.kernel_dir(key);
    scratch.publish(&out, &dest).map_err(io_err("publishing", &dest))?;
    Ok(Kernel::in_dir(&dest, key, arch))
}

/// Puts [`OUTPUT_DRIVER`] into the unpacked tree and into `drivers/char`'s
/// always-built objects.
fn add_output_driver(src: &Path) -> Result<(), KernelBuildError> {
    let driver = src.join(OUTPUT_DRIVER_PATH);
    std::fs::write(&driver, OUTPUT_DRIVER).map_err(io_err("writing", &driver))?;
    let makefile = src.join("drivers/char/Makefile");
    let mut text = std::fs::read_to_string(&makefile).map_err(io_err("reading", &makefile))?;
    text.push_str("obj-y += tvm_output.o\n");
    std::fs::write(&makefile, text).map_err(io_err("writing", &makefile))
}

/// `make` in the source tree for `kbuild`, shielded from the caller's make
/// and kbuild settings.
fn make(src: &Path, kbuild: KbuildTarget) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src);
    for var in
        ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARCH", "CROSS_COMPILE", "LLVM", "KBUILD_OUTPUT", "KCONFIG_CONFIG", "V"]
    {
        c.env_remove(var);
    }
    c.env("LC_ALL", "C").env("KBUILD_BUILD_USER", "tvm").env("KBUILD_BUILD_HOST", "tvm");
    // A native x86_64 build keeps kbuild's own defaults, exactly as before arm64.
    if kbuild.arch != "x86" || !kbuild.cross_compile.is_empty() {
        c.env("ARCH", kbuild.arch).env("CROSS_COMPILE", kbuild.cross_compile);
    }
    c
}

/// Whether a line of kbuild's quiet output is one of the counted steps.
fn is_build_step(line: &str) -> bool {
    ["  CC ", "  LD ", "  AR "].iter().any(|p| line.starts_with(p))
}

/// Fragment lines the final `.config` does not honour, each as
/// `CONFIG_X=y (now: not set)`. `CONFIG_X=n` (or `# CONFIG_X is not set`) is
/// honoured when the option is absent or not set; any other value must match.
pub fn dropped_options(fragment: &str, config: &str) -> Vec<String> {
    let actual: HashMap<&str, Option<&str>> = config.lines().filter_map(parse_config_line).collect();
    fragment
        .lines()
        .filter_map(|l| parse_config_line(l).map(|(name, want)| (l.trim(), name, want)))
        .filter_map(|(line, name, want)| {
            let have = actual.get(name).copied().flatten();
            let ok = match want {
                None | Some("n") => have.is_none() || have == Some("n"),
                Some(v) => have == Some(v),
            };
            (!ok).then(|| format!("{line} (now: {})", have.map_or("not set".to_string(), |v| format!("={v}"))))
        })
        .collect()
}

/// `CONFIG_X=v` → `(CONFIG_X, Some(v))`; `# CONFIG_X is not set` → `(CONFIG_X, None)`.
fn parse_config_line(line: &str) -> Option<(&str, Option<&str>)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return name.starts_with("CONFIG_").then_some((name, None));
    }
    let (name, value) = line.split_once('=')?;
    name.starts_with("CONFIG_").then_some((name, Some(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_names_dropped_options() {
        let frag = "# comment\nCONFIG_A=y\nCONFIG_B=n\nCONFIG_C=8\nCONFIG_D=y\n# CONFIG_E is not set\nCONFIG_F=n\n";
        let cfg = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=8\n# CONFIG_D is not set\nCONFIG_G=y\n";
        assert_eq!(dropped_options(frag, cfg), vec!["CONFIG_D=y (now: not set)"]);
        let cfg = "CONFIG_A=m\nCONFIG_B=y\nCONFIG_C=64\nCONFIG_D=y\nCONFIG_E=y\n";
        assert_eq!(
            dropped_options(frag, cfg),
            vec![
                "CONFIG_A=y (now: =m)",
                "CONFIG_B=n (now: =y)",
                "CONFIG_C=8 (now: =64)",
                "# CONFIG_E is not set (now: =y)"
            ]
        );
    }

    #[test]
    fn the_real_fragment_parses_and_demands_what_the_agent_needs() {
        let lines: Vec<_> = FRAGMENT.lines().filter_map(parse_config_line).collect();
        assert!(lines.len() > 50, "{}", lines.len());
        for (name, want) in [
            ("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", Some("y")),
            ("CONFIG_EROFS_FS", Some("y")),
            ("CONFIG_BLK_DEV_INITRD", Some("y")),
            ("CONFIG_MODULES", Some("n")),
        ] {
            assert!(lines.contains(&(name, want)), "{name}");
        }
        // A config that is exactly the fragment honours it.
        assert!(dropped_options(FRAGMENT, FRAGMENT).is_empty());
    }

    #[test]
    fn key_is_stable_and_depends_on_its_inputs() {
        let k = key_of("CONFIG_A=y\n", "linux-source-6.1.tar.xz", 138_008_000);
        assert_eq!(k.len(), 24);
        assert_eq!(k, key_of("CONFIG_A=y\n", "linux-source-6.1.tar.xz", 138_008_000));
        assert_ne!(k, key_of("CONFIG_A=n\n", "linux-source-6.1.tar.xz", 138_008_000));
        assert_ne!(k, key_of("CONFIG_A=y\n", "linux-source-6.1.tar.xz", 138_008_001));
        assert_ne!(k, key_of("CONFIG_A=y\n", "linux-source-6.2.tar.xz", 138_008_000));
    }

    #[test]
    fn key_needs_the_source_and_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings { kernel_source: dir.path().join("linux-source-6.1.tar.xz"), ..Settings::default() };
        let err = kernel_key(&s).unwrap_err().to_string();
        assert!(err.contains("apt-get install linux-source-6.1") && !err.contains('\n'), "{err}");
        std::fs::write(&s.kernel_source, b"not really a tarball").unwrap();
        let k = kernel_key(&s).unwrap();
        assert_eq!(k, key_of(FRAGMENT, "linux-source-6.1.tar.xz", 20));
        s.cache_dir = dir.path().join("cache");
        assert!(find_kernel(&s).unwrap().is_none());
        let kdir = Cache::new(&s.cache_dir).kernel_dir(&k);
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::write(kdir.join("bzImage"), b"x").unwrap();
        assert!(find_kernel(&s).unwrap().is_none(), "incomplete kernel dir is not a kernel");
        std::fs::write(kdir.join("vmlinux"), b"x").unwrap();
        std::fs::write(kdir.join("config"), b"x").unwrap();
        assert_eq!(find_kernel(&s).unwrap().unwrap().bzimage, kdir.join("bzImage"));
    }

    #[test]
    fn the_arm64_fragment_is_its_own_key_and_keeps_the_agents_options() {
        let a = key_of(FRAGMENT_AARCH64, "linux-source-6.1.tar.xz", 1);
        assert_ne!(a, key_of(FRAGMENT, "linux-source-6.1.tar.xz", 1), "kernels are keyed by architecture");
        let lines: Vec<_> = FRAGMENT_AARCH64.lines().filter_map(parse_config_line).collect();
        for (name, want) in [
            ("CONFIG_VIRTIO_MMIO", Some("y")),
            ("CONFIG_SERIAL_AMBA_PL011_CONSOLE", Some("y")),
            ("CONFIG_ARM_PSCI_FW", Some("y")),
            ("CONFIG_EROFS_FS", Some("y")),
            ("CONFIG_VIRTIO_CONSOLE", Some("y")),
            ("CONFIG_MODULES", Some("n")),
            ("CONFIG_PCI", Some("n")),
        ] {
            assert!(lines.contains(&(name, want)), "{name}");
        }
        // Everything the x86_64 guest has from UNIX98 ptys on is arch-neutral and shared.
        let shared = FRAGMENT.split_once("CONFIG_UNIX98_PTYS=y").unwrap().1;
        assert!(FRAGMENT_AARCH64.ends_with(shared), "the arch-neutral part of the fragments drifted apart");
        let x86 = KbuildTarget::of(GuestArch::X86_64, GuestArch::X86_64);
        assert_eq!((x86.arch, x86.cross_compile, x86.target), ("x86", "", "bzImage"));
        let cross = KbuildTarget::of(GuestArch::Aarch64, GuestArch::X86_64);
        assert_eq!(
            (cross.arch, cross.cross_compile, cross.output),
            ("arm64", "aarch64-linux-gnu-", "arch/arm64/boot/Image")
        );
        assert_eq!(KbuildTarget::of(GuestArch::Aarch64, GuestArch::Aarch64).cross_compile, "");
    }

    #[test]
    fn build_steps_are_counted_from_kbuild_lines() {
        assert!(is_build_step("  CC      kernel/fork.o"));
        assert!(is_build_step("  LD      vmlinux.o"));
        assert!(is_build_step("  AR      lib/built-in.a"));
        assert!(!is_build_step("  HOSTCC  scripts/basic/fixdep"));
        assert!(!is_build_step("Kernel: arch/x86/boot/bzImage is ready  (#1)"));
    }

    /// Firecracker's own 6.1 guest configuration (v1.16.1), for comparison.
    const FIRECRACKER_CONFIG: &str =
        include_str!("../../../third_party/firecracker/microvm-kernel-ci-x86_64-6.1.config");

    /// Options of Firecracker's config for vsock, virtio-mmio, the serial
    /// console and `reboot=k` where TVM's guest differs, and why.
    const DEVIATIONS: &[(&str, &str)] = &[
        // Firecracker's guest finds devices through ACPI; TVM's has no ACPI
        // (QEMU microvm acpi=off), and Firecracker still appends every
        // device as virtio_mmio.device=... on x86_64.
        ("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "ours: =y, devices come from the command line"),
        ("CONFIG_SERIAL_8250_PNP", "needs PNP/ACPI, which the guest has not"),
        ("CONFIG_SERIAL_8250_PCI", "PCI UARTs; the guest has no PCI"),
        ("CONFIG_SERIAL_8250_EXAR", "PCI UARTs; the guest has no PCI"),
        ("CONFIG_SERIAL_8250_LPSS", "PCI UARTs; the guest has no PCI"),
        ("CONFIG_SERIAL_8250_MID", "PCI UARTs; the guest has no PCI"),
        ("CONFIG_SERIAL_8250_PERICOM", "PCI UARTs; the guest has no PCI"),
        ("CONFIG_SERIAL_8250_DMA", "UART DMA engines; a virtual 16550 has none"),
        ("CONFIG_SERIAL_8250_DWLIB", "DesignWare UART library, selected only by the PCI drivers"),
    ];

    fn is_firecracker_device_option(name: &str) -> bool {
        let vsock = name.contains("VSOCK") && !name.contains("VHOST");
        let mmio = ["CONFIG_VIRTIO", "CONFIG_VIRTIO_MENU"].contains(&name) || name.starts_with("CONFIG_VIRTIO_MMIO");
        let serial = name.starts_with("CONFIG_SERIAL_8250")
            || name.starts_with("CONFIG_SERIAL_CORE")
            || name == "CONFIG_SERIAL_EARLYCON";
        // reboot=k: the i8042 reset needs no driver; Firecracker's config has none.
        let reboot = name == "CONFIG_SERIO";
        vsock || mmio || serial || reboot
    }

    #[test]
    fn fragment_has_firecrackers_vsock_virtio_mmio_serial_and_reboot_options() {
        let ours: HashMap<&str, Option<&str>> =
            FRAGMENT.lines().filter_map(parse_config_line).map(|(n, v)| (n, v.filter(|v| *v != "n"))).collect();
        let theirs: Vec<(&str, Option<&str>)> = FIRECRACKER_CONFIG
            .lines()
            .filter_map(parse_config_line)
            .filter(|(n, _)| is_firecracker_device_option(n))
            .collect();
        assert!(theirs.len() >= 25, "the comparison covers Firecracker's options: {theirs:?}");
        let mut missing = Vec::new();
        for (name, value) in &theirs {
            if let Some((_, why)) = DEVIATIONS.iter().find(|(n, _)| n == name) {
                // A deviation must really deviate, or the table goes stale.
                assert_ne!(ours.get(name).copied().flatten(), *value, "{name} is listed as a deviation ({why})");
                continue;
            }
            // Options Firecracker leaves unset for devices that need PCI or
            // other hardware Kconfig hides here count as matched when absent.
            match (ours.get(name), value) {
                (Some(v), _) if v == value => {}
                (None, None) => {}
                _ => missing.push(format!("{name}={}", value.unwrap_or("n"))),
            }
        }
        assert!(missing.is_empty(), "guest/kernel fragment lacks Firecracker's options: {missing:?}");
        // Ours puts devices on the command line, which Firecracker fills on x86_64.
        assert_eq!(ours.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"), Some(&Some("y")));
    }
}
