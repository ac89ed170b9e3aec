//! The Lima template that runs TVM: built from the typed [`LimaYaml`] and
//! emitted as YAML.

use crate::host::{HostOs, HostPlatform};
use crate::limayaml::{
    Arch, Containerd, Image, LimaYaml, Mount, MountType, PortForward, Probe, Provision, ProvisionMode, Ssh, VmType,
};

/// The provision script Lima runs as root at every boot (`assets/provision.sh`).
pub const PROVISION_SCRIPT: &str = include_str!("../assets/provision.sh");

/// The readiness probe `limactl start` waits for (`assets/probe.sh`).
pub const PROBE_SCRIPT: &str = include_str!("../assets/probe.sh");

/// Marks a provision script as TVM's, so an instance of the same name made
/// by someone else is recognised and left alone.
pub const PROVISION_MARKER: &str = "# tvm-lima: provision";

/// The port `tvm serve` listens on inside the Lima VM (on 127.0.0.1 there;
/// `assets/provision.sh` and `assets/probe.sh` use the same number).
pub const GUEST_PORT: u16 = 8080;

/// Where the read-only staging mount with TVM's Linux binaries appears in the VM.
pub const GUEST_STAGING: &str = "/mnt/tvm-host";

/// The Lima release whose `LimaYAML` keys and validation rules the template
/// (and `schema/lima-template.schema.json`) follow.
pub const LIMA_VERSION: &str = "2.0.0";

/// Debian 12 cloud images (qcow2) for QEMU and vz, the "latest" aliases
/// Debian publishes, as Lima's own `templates/_images/debian-12.yaml` falls
/// back to.
const DEBIAN_CLOUD_X86_64: &str =
    "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2";
const DEBIAN_CLOUD_AARCH64: &str =
    "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-arm64.qcow2";
/// Debian 12 root filesystems for WSL2 (which imports a tarball, not a
/// disk): the ones Debian's official container images are built from.
const DEBIAN_ROOTFS_X86_64: &str =
    "https://github.com/debuerreotype/docker-debian-artifacts/raw/dist-amd64/bookworm/rootfs.tar.xz";
const DEBIAN_ROOTFS_AARCH64: &str =
    "https://github.com/debuerreotype/docker-debian-artifacts/raw/dist-arm64v8/bookworm/rootfs.tar.xz";

/// What the template is made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateOptions {
    /// The host the VM runs on.
    pub host: HostPlatform,
    /// Virtual CPUs (1-256).
    pub cpus: u32,
    /// Guest RAM in Lima's size syntax (`8GiB`); at least 2 GiB.
    pub memory: String,
    /// Disk size in Lima's size syntax; at least 20 GiB (kernel build and images).
    pub disk: String,
    /// Host port (on 127.0.0.1) the API is forwarded to.
    pub port: u16,
    /// Driver override; default by host (see [`default_vm_type`]).
    pub vm_type: Option<VmType>,
    /// Image override (a qcow2 for qemu/vz, a root filesystem tarball for wsl2).
    pub image: Option<String>,
    /// Host directory holding TVM's Linux binaries, shared read-only.
    pub staging_dir: String,
}

impl TemplateOptions {
    /// The defaults of `tvm lima template` / `tvm lima up` for `host`:
    /// 4 CPUs, 8 GiB RAM, 60 GiB disk, port 8080.
    pub fn new(host: HostPlatform, staging_dir: String) -> Self {
        TemplateOptions {
            host,
            cpus: 4,
            memory: "8GiB".into(),
            disk: "60GiB".into(),
            port: 8080,
            vm_type: None,
            image: None,
            staging_dir,
        }
    }
}

/// Why no template could be made from the options.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A size is not in Lima's syntax or below TVM's minimum.
    #[error("--{field} {value:?}: {reason}")]
    Size {
        /// `memory` or `disk`.
        field: &'static str,
        /// What was given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// CPU count out of range.
    #[error("--cpus {0}: must be between 1 and 256")]
    Cpus(u32),
    /// Port out of range (0, or 22, which Lima reserves for its SSH).
    #[error("--port {0}: must be between 1 and 65535 and not 22")]
    Port(u16),
    /// The driver does not exist on this host OS.
    #[error("vmType {vm_type} is not available on {os:?} hosts (vz: macOS only; wsl2: Windows only)")]
    VmType {
        /// The driver asked for.
        vm_type: &'static str,
        /// The host OS.
        os: HostOs,
    },
    /// vz on a macOS older than Lima's vz driver needs.
    #[error("vmType vz needs macOS 13 or later, but the host is macOS {0}: pass --vm-type qemu")]
    VzMacos(u32),
    /// YAML emission failed.
    #[error("cannot emit the template as YAML")]
    Emit(#[source] serde_norway::Error),
}

/// The driver for a host: wsl2 on Windows; vz on macOS when it can give
/// the VM nested virtualization (Apple M3+, macOS 15+); qemu otherwise.
pub fn default_vm_type(host: &HostPlatform) -> VmType {
    match host.os {
        HostOs::Windows => VmType::Wsl2,
        HostOs::Macos if host.supports_nested_vz() => VmType::Vz,
        _ => VmType::Qemu,
    }
}

/// Builds the template.
///
/// # Errors
///
/// [`TemplateError`] for out-of-range sizes, CPUs or port, or a driver the
/// host OS (or its version) lacks.
pub fn build(opts: &TemplateOptions) -> Result<LimaYaml, TemplateError> {
    check_size("memory", &opts.memory, 2 << 30)?;
    check_size("disk", &opts.disk, 20 << 30)?;
    if !(1..=256).contains(&opts.cpus) {
        return Err(TemplateError::Cpus(opts.cpus));
    }
    if opts.port == 0 || opts.port == 22 {
        return Err(TemplateError::Port(opts.port));
    }
    let vm_type = opts.vm_type.unwrap_or_else(|| default_vm_type(&opts.host));
    match (vm_type, opts.host.os) {
        (VmType::Vz, os) if os != HostOs::Macos => return Err(TemplateError::VmType { vm_type: "vz", os }),
        (VmType::Wsl2, os) if os != HostOs::Windows => return Err(TemplateError::VmType { vm_type: "wsl2", os }),
        // Lima's vz driver (Virtualization.framework) needs macOS 13.0 or later.
        (VmType::Vz, _) => {
            if let Some(v) = opts.host.macos_major.filter(|&v| v < 13) {
                return Err(TemplateError::VzMacos(v));
            }
        }
        _ => {}
    }
    let arch = opts.host.arch;
    let images = match &opts.image {
        Some(location) => vec![Image { location: location.clone(), arch, digest: None }],
        None if vm_type == VmType::Wsl2 => vec![
            Image { location: DEBIAN_ROOTFS_X86_64.into(), arch: Arch::X86_64, digest: None },
            Image { location: DEBIAN_ROOTFS_AARCH64.into(), arch: Arch::Aarch64, digest: None },
        ],
        None => vec![
            Image { location: DEBIAN_CLOUD_X86_64.into(), arch: Arch::X86_64, digest: None },
            Image { location: DEBIAN_CLOUD_AARCH64.into(), arch: Arch::Aarch64, digest: None },
        ],
    };
    let (mount_type, mount_types_unsupported) = match vm_type {
        // Lima's Debian 12 template marks 9p unsupported; reverse-sshfs needs nothing from the guest kernel.
        VmType::Qemu => (MountType::ReverseSshfs, vec!["9p".to_string()]),
        VmType::Vz => (MountType::Virtiofs, Vec::new()),
        VmType::Wsl2 => (MountType::Wsl2, Vec::new()),
    };
    let url = format!("http://127.0.0.1:{}", opts.port);
    Ok(LimaYaml {
        minimum_lima_version: Some(LIMA_VERSION.into()),
        vm_type: Some(vm_type),
        os: Some("Linux".into()),
        arch: Some(arch),
        images,
        cpus: Some(opts.cpus),
        memory: Some(opts.memory.clone()),
        disk: Some(opts.disk.clone()),
        // Only the staging directory with TVM's two binaries, read-only: never the home directory,
        // so code that escaped a microVM still finds none of the user's files in the Lima VM.
        mounts: vec![Mount {
            location: opts.staging_dir.clone(),
            mount_point: Some(GUEST_STAGING.into()),
            writable: Some(false),
        }],
        mount_types_unsupported,
        mount_type: Some(mount_type),
        ssh: Some(Ssh { load_dot_ssh_pub_keys: Some(false), forward_agent: Some(false), forward_x11: Some(false) }),
        provision: vec![Provision { mode: ProvisionMode::System, script: PROVISION_SCRIPT.into() }],
        // TVM needs no containers; not installing nerdctl saves boot time and attack surface.
        containerd: Some(Containerd { system: Some(false), user: Some(false) }),
        probes: vec![Probe {
            mode: "readiness".into(),
            description: format!("TVM API answering /readyz on guest port {GUEST_PORT}"),
            script: PROBE_SCRIPT.into(),
            hint: Some(
                "TVM is still provisioning or failed to: see /var/log/tvm-lima/provision.log in the VM \
                 (`tvm lima shell -- sudo tail /var/log/tvm-lima/provision.log`)."
                    .into(),
            ),
        }],
        port_forwards: vec![
            PortForward {
                guest_ip: Some("127.0.0.1".into()),
                guest_port: Some(GUEST_PORT),
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(opts.port),
                proto: Some("tcp".into()),
                ..Default::default()
            },
            // Nothing else the guest listens on reaches the host.
            PortForward {
                guest_ip: Some("0.0.0.0".into()),
                guest_port_range: Some([1, 65535]),
                proto: Some("any".into()),
                ignore: Some(true),
                ..Default::default()
            },
        ],
        message: Some(format!("TVM API: {url}\nRun a program: tvm run --server {url} file.py")),
        nested_virtualization: (vm_type == VmType::Vz && opts.host.supports_nested_vz()).then_some(true),
    })
}

/// The template as YAML, with a header saying what made it.
///
/// # Errors
///
/// [`TemplateError::Emit`] if serialization fails.
pub fn render(template: &LimaYaml) -> Result<String, TemplateError> {
    let body = serde_norway::to_string(template).map_err(TemplateError::Emit)?;
    Ok(format!(
        "# Lima template for TVM, generated by `tvm lima template` (tvm {}).\n\
         # Keys follow Lima {LIMA_VERSION} (pkg/limatype/lima_yaml.go); checked against\n\
         # crates/pyrolima/schema/lima-template.schema.json. Start it with `tvm lima up`.\n{body}",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Bytes of a size in Lima's syntax (go-units `RAMInBytes`: a number, an
/// optional binary prefix k/m/g/t/p, optional `i` and `b`; all prefixes are
/// powers of 1024).
///
/// # Errors
///
/// A message naming the accepted syntax.
pub fn parse_lima_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let power = match unit {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        _ => return Err("not a size (examples: 8GiB, 512MiB, 60G)".into()),
    };
    let v: f64 = num.parse().map_err(|_| "not a size (examples: 8GiB, 512MiB, 60G)".to_string())?;
    Ok((v * 1024f64.powi(power)) as u64)
}

fn check_size(field: &'static str, value: &str, min: u64) -> Result<(), TemplateError> {
    let bytes = parse_lima_size(value).map_err(|reason| TemplateError::Size { field, value: value.into(), reason })?;
    if bytes < min {
        return Err(TemplateError::Size {
            field,
            value: value.into(),
            reason: format!("TVM needs at least {} GiB", min >> 30),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(os: HostOs, arch: Arch, major: Option<u32>, chip: Option<u32>) -> HostPlatform {
        HostPlatform { os, arch, macos_major: major, apple_chip: chip }
    }

    fn opts(h: HostPlatform) -> TemplateOptions {
        TemplateOptions::new(h, "~/.cache/tvm-lima/tvm".into())
    }

    #[test]
    fn driver_follows_the_host() {
        let m3 = build(&opts(host(HostOs::Macos, Arch::Aarch64, Some(15), Some(3)))).unwrap();
        assert_eq!((m3.vm_type, m3.nested_virtualization), (Some(VmType::Vz), Some(true)));
        let m1 = build(&opts(host(HostOs::Macos, Arch::Aarch64, Some(15), Some(1)))).unwrap();
        assert_eq!((m1.vm_type, m1.nested_virtualization), (Some(VmType::Qemu), None));
        let intel = build(&opts(host(HostOs::Macos, Arch::X86_64, Some(14), None))).unwrap();
        assert_eq!((intel.vm_type, intel.arch), (Some(VmType::Qemu), Some(Arch::X86_64)));
        let win = build(&opts(host(HostOs::Windows, Arch::X86_64, None, None))).unwrap();
        assert_eq!((win.vm_type, win.mount_type), (Some(VmType::Wsl2), Some(MountType::Wsl2)));
        assert!(win.images.iter().all(|i| i.location.ends_with(".tar.xz")));
        let linux = build(&opts(host(HostOs::Linux, Arch::X86_64, None, None))).unwrap();
        assert_eq!(linux.vm_type, Some(VmType::Qemu));
        assert!(linux.images.iter().all(|i| i.location.ends_with(".qcow2")));
    }

    #[test]
    fn forced_vz_without_m3_has_no_nested_virtualization() {
        let mut o = opts(host(HostOs::Macos, Arch::X86_64, Some(15), None));
        o.vm_type = Some(VmType::Vz);
        let t = build(&o).unwrap();
        assert_eq!((t.vm_type, t.nested_virtualization), (Some(VmType::Vz), None));
    }

    #[test]
    fn drivers_foreign_to_the_host_are_refused() {
        let mut o = opts(host(HostOs::Linux, Arch::X86_64, None, None));
        o.vm_type = Some(VmType::Vz);
        assert!(matches!(build(&o), Err(TemplateError::VmType { vm_type: "vz", .. })));
        o.vm_type = Some(VmType::Wsl2);
        assert!(matches!(build(&o), Err(TemplateError::VmType { vm_type: "wsl2", .. })));
        // vz exists from macOS 13 on; an unknown version is not refused.
        for (major, ok) in [(Some(12), false), (Some(13), true), (None, true)] {
            let mut o = opts(host(HostOs::Macos, Arch::X86_64, major, None));
            o.vm_type = Some(VmType::Vz);
            assert_eq!(build(&o).is_ok(), ok, "macOS {major:?}");
        }
        let mut o = opts(host(HostOs::Macos, Arch::Aarch64, Some(12), Some(1)));
        o.vm_type = Some(VmType::Vz);
        let e = build(&o).unwrap_err().to_string();
        assert!(e.contains("macOS 13") && e.ends_with("pass --vm-type qemu"), "{e}");
    }

    #[test]
    fn flags_reach_the_template_and_bad_ones_are_refused() {
        let mut o = opts(host(HostOs::Linux, Arch::X86_64, None, None));
        (o.cpus, o.memory, o.disk, o.port) = (8, "16GiB".into(), "100G".into(), 9090);
        let t = build(&o).unwrap();
        assert_eq!((t.cpus, t.memory.as_deref(), t.disk.as_deref()), (Some(8), Some("16GiB"), Some("100G")));
        assert_eq!(t.port_forwards[0].host_port, Some(9090));
        assert_eq!(t.port_forwards[0].host_ip.as_deref(), Some("127.0.0.1"));
        for (field, bad) in [("memory", "1GiB"), ("memory", "lots"), ("disk", "10GiB"), ("disk", "5X")] {
            let mut b = o.clone();
            if field == "memory" {
                b.memory = bad.into();
            } else {
                b.disk = bad.into();
            }
            let e = build(&b).unwrap_err();
            assert!(e.to_string().starts_with(&format!("--{field} ")), "{e}");
        }
        let mut b = o.clone();
        b.cpus = 0;
        assert!(matches!(build(&b), Err(TemplateError::Cpus(0))));
        for port in [0, 22] {
            let mut b = o.clone();
            b.port = port;
            assert!(matches!(build(&b), Err(TemplateError::Port(_))));
        }
    }

    #[test]
    fn lima_sizes() {
        assert_eq!(parse_lima_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_lima_size("8g"), Ok(8 << 30));
        assert_eq!(parse_lima_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_lima_size("1.5GB"), Ok(3 << 29));
        assert_eq!(parse_lima_size("100"), Ok(100));
        assert!(parse_lima_size("8 GiBs").is_err());
        assert!(parse_lima_size("").is_err());
    }

    #[test]
    fn scripts_agree_with_the_constants() {
        assert!(PROVISION_SCRIPT.starts_with("#!"));
        assert!(PROBE_SCRIPT.starts_with("#!"));
        assert!(PROVISION_SCRIPT.contains(PROVISION_MARKER));
        let listen = format!("127.0.0.1:{GUEST_PORT}");
        assert!(PROVISION_SCRIPT.contains(&listen) && PROBE_SCRIPT.contains(&listen));
        assert!(PROVISION_SCRIPT.contains(GUEST_STAGING));
    }

    #[test]
    fn yaml_round_trips_through_the_typed_structs() {
        let t = build(&opts(host(HostOs::Macos, Arch::Aarch64, Some(15), Some(3)))).unwrap();
        let yaml = render(&t).unwrap();
        let back: LimaYaml = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(back, t);
        assert!(yaml.contains("nestedVirtualization: true"), "{yaml}");
        assert!(yaml.contains("vmType: vz"), "{yaml}");
    }
}
