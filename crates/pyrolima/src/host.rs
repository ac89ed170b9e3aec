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

impl HostOs {
    /// The name `--host-os` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            HostOs::Macos => "macos",
            HostOs::Windows => "windows",
            HostOs::Linux => "linux",
        }
    }
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

/// What the caller states about the host a template is for (`tvm lima
/// template --host-os --host-arch --macos-version --apple-chip`); `None`
/// leaves the fact to the machine this runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostOverrides {
    /// `--host-os`.
    pub os: Option<HostOs>,
    /// `--host-arch`.
    pub arch: Option<Arch>,
    /// `--macos-version`.
    pub macos_major: Option<u32>,
    /// `--apple-chip`.
    pub apple_chip: Option<u32>,
}

/// Stated host facts that cannot be true together (or at all). Each message
/// names the flag and says the fix, since the template would otherwise be
/// rendered for a host that does not exist (an Intel Mac with an M3 chip
/// silently loses nested virtualization).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFactsError {
    /// Apple silicon generations are numbered from 1 (M1).
    #[error("--apple-chip 0: Apple chip generations start at 1 (M1); pass 3 for an M3")]
    AppleChipZero,
    /// macOS major versions are numbered from 10 (10.x).
    #[error("--macos-version {0}: macOS major versions start at 10 (10 for 10.15, 15 for macOS 15)")]
    MacosVersion(u32),
    /// A macOS-only fact for a host that is not macOS.
    #[error("--{flag} describes a macOS host, but the template is for {os}: add {add}, or drop --{flag}")]
    NotMacos {
        /// `apple-chip` or `macos-version`.
        flag: &'static str,
        /// The OS the template is for (`--host-os`, else this machine's).
        os: &'static str,
        /// The flags that make the host one the fact fits.
        add: &'static str,
    },
    /// An Apple chip on an x86_64 host: only Intel Macs are x86_64.
    #[error(
        "--apple-chip implies an arm64 host, but the template is for x86_64: pass --host-arch aarch64 \
         (Apple silicon), or drop --apple-chip (an Intel Mac)"
    )]
    AppleChipOnX86,
}

impl HostPlatform {
    /// This machine's facts (`self`, from [`HostPlatform::detect`]) with the
    /// caller's stated ones in their place. Detected macOS facts stay only
    /// while they still describe the host: a different OS drops both, a
    /// different architecture drops the Apple chip.
    ///
    /// # Errors
    ///
    /// [`HostFactsError`] when the stated facts contradict each other or
    /// the host they apply to.
    pub fn overridden(self, stated: &HostOverrides) -> Result<HostPlatform, HostFactsError> {
        let mut host = self;
        if let Some(os) = stated.os.filter(|&os| os != host.os) {
            host = HostPlatform { os, arch: host.arch, macos_major: None, apple_chip: None };
        }
        if let Some(arch) = stated.arch.filter(|&arch| arch != host.arch) {
            host.arch = arch;
            host.apple_chip = None;
        }
        if stated.apple_chip == Some(0) {
            return Err(HostFactsError::AppleChipZero);
        }
        if let Some(v) = stated.macos_major.filter(|&v| v < 10) {
            return Err(HostFactsError::MacosVersion(v));
        }
        let chip = stated.apple_chip.is_some();
        // Two flags at odds first: the fix is one of them, whatever this machine is.
        if chip && stated.arch == Some(Arch::X86_64) {
            return Err(HostFactsError::AppleChipOnX86);
        }
        for (flag, given) in [("apple-chip", chip), ("macos-version", stated.macos_major.is_some())] {
            if given && host.os != HostOs::Macos {
                // All that is missing in one message, not one round per flag.
                let add = if flag == "apple-chip" && host.arch != Arch::Aarch64 {
                    "--host-os macos --host-arch aarch64"
                } else {
                    "--host-os macos"
                };
                return Err(HostFactsError::NotMacos { flag, os: host.os.as_str(), add });
            }
        }
        if chip && host.arch != Arch::Aarch64 {
            return Err(HostFactsError::AppleChipOnX86);
        }
        host.macos_major = stated.macos_major.or(host.macos_major);
        host.apple_chip = stated.apple_chip.or(host.apple_chip);
        Ok(host)
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

    fn linux_x86() -> HostPlatform {
        HostPlatform { os: HostOs::Linux, arch: Arch::X86_64, macos_major: None, apple_chip: None }
    }

    fn stated(os: Option<HostOs>, arch: Option<Arch>, major: Option<u32>, chip: Option<u32>) -> HostOverrides {
        HostOverrides { os, arch, macos_major: major, apple_chip: chip }
    }

    #[test]
    fn stated_host_facts_replace_detected_ones_that_no_longer_apply() {
        let m3 = mac(Arch::Aarch64, Some(15), Some(3));
        // Nothing stated: this machine as detected.
        assert_eq!(m3.clone().overridden(&HostOverrides::default()), Ok(m3.clone()));
        // Another architecture is another Mac: the detected chip goes, the version stays.
        let intel = m3.clone().overridden(&stated(None, Some(Arch::X86_64), None, None)).unwrap();
        assert_eq!(intel, mac(Arch::X86_64, Some(15), None));
        // The same OS keeps its facts; another drops them.
        assert_eq!(m3.clone().overridden(&stated(Some(HostOs::Macos), None, None, None)), Ok(m3.clone()));
        let win = m3.overridden(&stated(Some(HostOs::Windows), None, None, None)).unwrap();
        assert_eq!((win.macos_major, win.apple_chip), (None, None));
        // From a Linux machine, a whole Apple silicon Mac stated.
        let stated_m3 = stated(Some(HostOs::Macos), Some(Arch::Aarch64), Some(15), Some(3));
        assert_eq!(linux_x86().overridden(&stated_m3), Ok(mac(Arch::Aarch64, Some(15), Some(3))));
        let stated_intel = stated(Some(HostOs::Macos), Some(Arch::X86_64), Some(14), None);
        assert_eq!(linux_x86().overridden(&stated_intel), Ok(mac(Arch::X86_64, Some(14), None)));
    }

    #[test]
    fn contradicting_host_facts_are_refused_with_the_fix() {
        let macos = Some(HostOs::Macos);
        let cases = [
            // An Intel Mac has no Apple chip, whether the x86_64 is stated or detected.
            (stated(macos, Some(Arch::X86_64), None, Some(3)), HostFactsError::AppleChipOnX86),
            (stated(macos, None, None, Some(3)), HostFactsError::AppleChipOnX86),
            (stated(macos, Some(Arch::Aarch64), None, Some(0)), HostFactsError::AppleChipZero),
            (stated(macos, None, Some(0), None), HostFactsError::MacosVersion(0)),
            (stated(macos, None, Some(9), None), HostFactsError::MacosVersion(9)),
            // macOS facts for another OS, stated or detected (this Linux machine).
            (stated(None, Some(Arch::X86_64), None, Some(3)), HostFactsError::AppleChipOnX86),
            (
                stated(Some(HostOs::Windows), Some(Arch::Aarch64), None, Some(3)),
                HostFactsError::NotMacos { flag: "apple-chip", os: "windows", add: "--host-os macos" },
            ),
            (
                stated(None, None, None, Some(3)),
                HostFactsError::NotMacos {
                    flag: "apple-chip",
                    os: "linux",
                    add: "--host-os macos --host-arch aarch64",
                },
            ),
            (
                stated(None, None, Some(15), None),
                HostFactsError::NotMacos { flag: "macos-version", os: "linux", add: "--host-os macos" },
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(linux_x86().overridden(&facts), Err(want.clone()), "{facts:?}");
            let msg = want.to_string();
            assert!(!msg.contains('\n') && msg.starts_with("--"), "one line naming the flag: {msg}");
        }
        assert!(HostFactsError::AppleChipOnX86.to_string().contains("--host-arch aarch64"));
        assert!(HostFactsError::AppleChipZero.to_string().contains("start at 1"));
        // A detected Apple silicon Mac stated to be x86_64 and an M3 at once.
        let m1 = mac(Arch::Aarch64, Some(15), Some(1));
        assert_eq!(
            m1.overridden(&stated(None, Some(Arch::X86_64), None, Some(3))),
            Err(HostFactsError::AppleChipOnX86)
        );
    }
}
