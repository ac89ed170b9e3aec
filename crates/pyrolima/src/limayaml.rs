//! Typed mirror of Lima's instance template (`LimaYAML`).
//!
//! Field names and shapes follow Lima v2.0's `pkg/limatype/lima_yaml.go`
//! (module `github.com/lima-vm/lima/v2`): the YAML keys are the Go struct's
//! `yaml:` tags, optional fields are omitted when unset exactly as Lima's
//! `omitempty` does. Only the keys TVM sets are modelled; a template built
//! from these types can therefore only contain keys Lima knows, and
//! `schema/lima-template.schema.json` (checked in CI) holds the full key set
//! plus the rules of Lima's `pkg/limayaml/validate.go`.

use serde::{Deserialize, Serialize};

/// Lima's VM driver (`vmType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmType {
    /// QEMU (with HVF on macOS, KVM on Linux, WHPX on Windows, else TCG).
    Qemu,
    /// Apple Virtualization.framework (macOS 13.5+).
    Vz,
    /// Windows Subsystem for Linux 2 (Windows 10 build 19041+, Windows 11).
    Wsl2,
}

impl VmType {
    /// The name Lima uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VmType::Qemu => "qemu",
            VmType::Vz => "vz",
            VmType::Wsl2 => "wsl2",
        }
    }
}

impl std::str::FromStr for VmType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" => Ok(VmType::Qemu),
            "vz" => Ok(VmType::Vz),
            "wsl2" => Ok(VmType::Wsl2),
            other => Err(format!("unknown Lima vmType {other:?} (qemu, vz or wsl2)")),
        }
    }
}

/// A guest architecture as Lima names it (`arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// x86_64 (amd64).
    #[serde(rename = "x86_64")]
    X86_64,
    /// aarch64 (arm64).
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The name Lima (and `uname -m`) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(format!("unsupported architecture {other:?} (x86_64 or aarch64)")),
        }
    }
}

/// Lima's mount driver (`mountType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountType {
    /// sshfs driven from the host (`reverse-sshfs`).
    #[serde(rename = "reverse-sshfs")]
    ReverseSshfs,
    /// virtio-fs (vz; QEMU on Linux).
    #[serde(rename = "virtiofs")]
    Virtiofs,
    /// WSL2's own file sharing.
    #[serde(rename = "wsl2")]
    Wsl2,
}

/// The template: Lima's `LimaYAML`, restricted to the keys TVM sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimaYaml {
    /// Oldest Lima that understands this template (semver).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_lima_version: Option<String>,
    /// VM driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_type: Option<VmType>,
    /// Guest OS; Lima accepts `Linux` for the guests TVM uses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Guest architecture (vz requires the host's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// Disk images (or WSL2 root filesystem tarballs); Lima takes the first
    /// whose `arch` matches. Lima requires at least one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    /// Virtual CPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest RAM, in Lima's size syntax (`8GiB`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Root disk size, in Lima's size syntax (`50GiB`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Host directories shared with the guest. Serialized even when empty,
    /// so the template states "no mounts" instead of inheriting a default.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Mount drivers the guest kernel cannot use (Lima picks another).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_types_unsupported: Vec<String>,
    /// Mount driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<MountType>,
    /// The host-to-guest SSH session Lima drives the VM through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh: Option<Ssh>,
    /// Scripts run at boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provision: Vec<Provision>,
    /// Lima's bundled containerd/nerdctl.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd: Option<Containerd>,
    /// Readiness probes `limactl start` waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// Guest-to-host port forwarding rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForward>,
    /// Shown by `limactl start` when the instance is ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Expose the CPU's virtualization extensions to the guest (vz on Apple
    /// M3 or later with macOS 15 or later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nested_virtualization: Option<bool>,
}

/// One disk image (Lima's `Image`: an inlined `File`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// URL or local path.
    pub location: String,
    /// Architecture of the image.
    pub arch: Arch,
    /// `algorithm:hex`, checked after download.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A shared host directory (Lima's `Mount`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// Host path: absolute or starting with `~`.
    pub location: String,
    /// Guest path (defaults to `location`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Whether the guest may write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
}

/// SSH settings (Lima's `SSH`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ssh {
    /// Load `~/.ssh/*.pub` into the guest's authorized keys.
    #[serde(rename = "loadDotSSHPubKeys", skip_serializing_if = "Option::is_none")]
    pub load_dot_ssh_pub_keys: Option<bool>,
    /// Forward the host's ssh-agent into the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_agent: Option<bool>,
    /// Forward X11.
    #[serde(rename = "forwardX11", skip_serializing_if = "Option::is_none")]
    pub forward_x11: Option<bool>,
}

/// When a provision script runs (Lima's `ProvisionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionMode {
    /// As root, after boot, at every boot.
    System,
    /// As the Lima user, after boot.
    User,
}

/// A provision script (Lima's `Provision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provision {
    /// When and as whom it runs.
    pub mode: ProvisionMode,
    /// The script, starting with a `#!` line.
    pub script: String,
}

/// Lima's containerd settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Containerd {
    /// Rootful containerd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<bool>,
    /// Rootless containerd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<bool>,
}

/// A readiness probe (Lima's `Probe`, mode `readiness`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Only `readiness` exists.
    pub mode: String,
    /// Shown while waiting.
    pub description: String,
    /// Run as the Lima user; must start with `#!`; exit 0 means ready.
    pub script: String,
    /// Shown when the probe keeps failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// A port-forwarding rule (Lima's `PortForward`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortForward {
    /// Guest address the rule matches (default 127.0.0.1).
    #[serde(rename = "guestIP", skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// Guest port (1-65535, not 22).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    /// Inclusive guest port range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_port_range: Option<[u16; 2]>,
    /// Host address to listen on.
    #[serde(rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Host port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// `tcp`, `udp` or `any`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Drop matching ports instead of forwarding them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore: Option<bool>,
}
