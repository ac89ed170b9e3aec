//! The host TVM is asked to bring a Lima VM to: OS, CPU architecture and,
//! on macOS, what decides whether nested virtualization is possible.

use std::process::Command;

use serde::Serialize;

use crate::limayaml::Arch;

/// A host operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostOs {
    /// macOS.
    Macos,
    /// Windows.
    Windows,
    /// Linux (TVM runs natively there; Lima is optional).
    Linux,
}

impl std::str::FromStr for HostOs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "macos" | "darwin" => Ok(HostOs::Macos),
            "windows" => Ok(HostOs::Windows),
            "linux" => Ok(HostOs::Linux),
            other => Err(format!("unknown host OS {other:?} (macos, windows or linux)")),
        }
    }
}

/// What the template and `tvm lima up` depend on about the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPlatform {
    /// Operating system.
    pub os: HostOs,
    /// CPU architecture; the Lima VM has the same one (vz can only run the
    /// host's, and emulating x86_64 on arm64 under TCG is too slow to boot
    /// microVMs inside).
    pub arch: Arch,
    /// macOS major version (`15` for macOS 15.x), when known.
    pub macos_major: Option<u32>,
    /// Apple silicon generation (`3` for M3, M3 Pro, ...), when known.
    pub apple_chip: Option<u32>,
}

impl HostPlatform {
    /// The machine this runs on. On macOS it asks `sw_vers -productVersion`
    /// and `sysctl -n machdep.cpu.brand_string`; unknown values stay `None`
    /// (which selects the conservative template: no nested virtualization).
    ///
    /// # Errors
    ///
    /// A CPU architecture other than x86_64 and aarch64, as a message.
    pub fn detect() -> Result<Self, String> {
        let arch: Arch = std::env::consts::ARCH.parse()?;
        let os = match std::env::consts::OS {
            "macos" => HostOs::Macos,
            "windows" => HostOs::Windows,
            _ => HostOs::Linux,
        };
        let (mut macos_major, mut apple_chip) = (None, None);
        if os == HostOs::Macos {
            macos_major = command_output("sw_vers", &["-productVersion"]).and_then(|v| parse_macos_major(&v));
            apple_chip =
                command_output("sysctl", &["-n", "machdep.cpu.brand_string"]).and_then(|b| parse_apple_chip(&b));
        }
        Ok(HostPlatform { os, arch, macos_major, apple_chip })
    }

    /// Whether Lima can give the VM nested virtualization (KVM inside):
    /// Lima's `nestedVirtualization` needs vz on Apple M3 or later with
    /// macOS 15 or later.
    pub fn supports_nested_vz(&self) -> bool {
        self.os == HostOs::Macos
            && self.arch == Arch::Aarch64
            && self.macos_major.is_some_and(|v| v >= 15)
            && self.apple_chip.is_some_and(|c| c >= 3)
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `15` from `15.1.1`.
pub fn parse_macos_major(version: &str) -> Option<u32> {
    version.trim().split('.').next()?.parse().ok()
}

/// `3` from `Apple M3 Pro`; `None` for Intel brand strings.
pub fn parse_apple_chip(brand: &str) -> Option<u32> {
    let rest = brand.trim().strip_prefix("Apple M")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(arch: Arch, major: Option<u32>, chip: Option<u32>) -> HostPlatform {
        HostPlatform { os: HostOs::Macos, arch, macos_major: major, apple_chip: chip }
    }

    #[test]
    fn parses_macos_facts() {
        assert_eq!(parse_macos_major("15.1.1"), Some(15));
        assert_eq!(parse_macos_major("14.6"), Some(14));
        assert_eq!(parse_macos_major("garbage"), None);
        assert_eq!(parse_apple_chip("Apple M3 Pro"), Some(3));
        assert_eq!(parse_apple_chip("Apple M1"), Some(1));
        assert_eq!(parse_apple_chip("Apple M10 Max"), Some(10));
        assert_eq!(parse_apple_chip("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz"), None);
    }

    #[test]
    fn nested_vz_needs_m3_and_macos_15() {
        assert!(mac(Arch::Aarch64, Some(15), Some(3)).supports_nested_vz());
        assert!(mac(Arch::Aarch64, Some(26), Some(4)).supports_nested_vz());
        assert!(!mac(Arch::Aarch64, Some(14), Some(3)).supports_nested_vz());
        assert!(!mac(Arch::Aarch64, Some(15), Some(2)).supports_nested_vz());
        assert!(!mac(Arch::Aarch64, None, Some(3)).supports_nested_vz());
        assert!(!mac(Arch::X86_64, Some(15), None).supports_nested_vz());
        let win = HostPlatform { os: HostOs::Windows, arch: Arch::X86_64, macos_major: None, apple_chip: None };
        assert!(!win.supports_nested_vz());
    }
}
