//! The QEMU `microvm` backend: the command line that starts one guest.
//!
//! No PCI, no ACPI, no network device: a virtio-blk root image (read-only),
//! a virtio-serial port for the agent, virtio-rng for early entropy and the
//! serial console for diagnostics. The same kernel boots under Firecracker,
//! which also describes virtio-mmio devices on the kernel command line.

use std::path::{Path, PathBuf};

use crate::jail::VmmIo;

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKind {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl AccelKind {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

/// What a VM is made of; backend-neutral so Firecracker maps from it too.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest kernel (bzImage for QEMU).
    pub kernel: PathBuf,
    /// Initramfs with the agent, `None` for a kernel-only probe.
    pub initrd: Option<PathBuf>,
    /// Read-only root image (the runtime), `None` for a kernel-only probe.
    pub rootfs: Option<PathBuf>,
    /// Guest RAM.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator.
    pub accel: AccelKind,
    /// Verbose kernel and agent logs on the serial console.
    pub debug: bool,
    /// Run QEMU under its own seccomp sandbox ([`SANDBOX`]).
    pub sandbox: bool,
    /// Appended to the kernel command line (`Settings::kernel_args`).
    pub extra_cmdline: Option<String>,
}

/// QEMU's `-sandbox` policy: its seccomp filter plus a deny of obsolete
/// system calls, of privilege changes (set*uid), of spawning processes
/// (fork/exec) and of resource control (scheduler, affinity). A guest that
/// takes over QEMU through an emulation bug gets no shell, no root and no
/// way to change its own limits.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Whether `qemu` accepts [`SANDBOX`] (built with seccomp support): starts it
/// with the sandbox and no machine, and asks it to quit over stdin.
pub fn sandbox_supported(qemu: &Path) -> bool {
    use std::io::Write;
    let child = std::process::Command::new(qemu)
        .args(["-sandbox", SANDBOX, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    // Bounded: a QEMU that neither quits nor fails is killed and counted as unsupported.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Kernel command line. `reboot` is how the guest ends the VM: a triple
/// fault (`t`) under QEMU microvm, which has no i8042; the i8042 reset (`k`)
/// under Firecracker, which emulates only that. `no_timer_check` skips the
/// kernel's IO-APIC timer probe, which on a loaded host under TCG sees too
/// few ticks and panics the boot ("IO-APIC + timer doesn't work!"), as
/// Kata Containers' guests do.
pub fn kernel_cmdline(debug: bool, reboot: char, extra: Option<&str>) -> String {
    let level = if debug { "loglevel=7 tvm.debug=1" } else { "quiet loglevel=1" };
    let mut line = format!("console=ttyS0 {level} panic=-1 reboot={reboot} no_timer_check rdinit=/init");
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

/// argv (without the binary) for `qemu-system-x86_64`. Every file QEMU
/// gets is an inherited descriptor named by `io` (see [`crate::jail`]).
pub fn qemu_args(spec: &VmSpec, io: &VmmIo) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let machine = format!("microvm,accel={},acpi=off,x-option-roms=off,isa-serial=on,rtc=on", spec.accel.as_str());
    let cpu = match spec.accel {
        AccelKind::Kvm => "host",
        AccelKind::Tcg => "max",
    };
    push(&["-M", &machine, "-cpu", cpu]);
    push(&["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none"]);
    push(&["-kernel", &io.kernel, "-append", &kernel_cmdline(spec.debug, 't', spec.extra_cmdline.as_deref())]);
    if let Some(initrd) = &io.initrd {
        push(&["-initrd", initrd]);
    }
    if let Some(fd) = io.rootfs_fd {
        // An fd set: QEMU dup()s the descriptor instead of opening a path.
        push(&["-add-fd", &format!("fd={fd},set=1")]);
        push(&["-drive", "id=root,file=/dev/fdset/1,format=raw,if=none,readonly=on"]);
        push(&["-device", "virtio-blk-device,drive=root"]);
    }
    if let Some(fd) = io.agent_fd {
        // An already connected socket: no listening socket file anywhere.
        push(&["-device", "virtio-serial-device,max_ports=2", "-chardev", &format!("socket,id=agent,fd={fd}")]);
        push(&["-device", &format!("virtserialport,chardev=agent,name={}", tvm_protocol::VIRTIO_PORT_NAME)]);
    }
    push(&["-device", "virtio-rng-device"]);
    if spec.sandbox {
        push(&["-sandbox", SANDBOX]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_kernel_arguments_come_last() {
        assert!(kernel_cmdline(false, 't', None).ends_with("rdinit=/init"));
        assert!(kernel_cmdline(false, 't', None).contains(" no_timer_check "), "boots on a loaded TCG host");
        assert!(kernel_cmdline(false, 't', Some(" ")).ends_with("rdinit=/init"));
        // Last wins for most kernel parameters, so the operator's value overrides ours.
        assert!(kernel_cmdline(false, 'k', Some("mitigations=off")).ends_with("rdinit=/init mitigations=off"));
    }

    #[test]
    fn command_line_has_no_network_and_a_readonly_root() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            rootfs: Some("/img.erofs".into()),
            memory_mib: 384,
            vcpus: 1,
            accel: AccelKind::Tcg,
            debug: false,
            extra_cmdline: None,
            sandbox: true,
        };
        let io = VmmIo { kernel: "/proc/self/fd/5".into(), initrd: None, rootfs_fd: Some(7), agent_fd: Some(4) };
        let a = qemu_args(&spec, &io).join(" ");
        assert!(a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        assert!(a.contains("microvm,accel=tcg,acpi=off"));
        assert!(a.contains("-add-fd fd=7,set=1 -drive id=root,file=/dev/fdset/1,format=raw,if=none,readonly=on"));
        assert!(a.contains("-kernel /proc/self/fd/5") && a.contains("socket,id=agent,fd=4"));
        assert!(a.contains("-nodefaults") && !a.contains("netdev") && !a.contains("-nic"));
        assert!(a.contains("name=tvm.agent"));
        assert!(a.contains("-m 384M"));
        let plain = qemu_args(&VmSpec { sandbox: false, ..spec }, &VmmIo { agent_fd: None, ..io }).join(" ");
        assert!(!plain.contains("-sandbox"));
    }

    #[test]
    fn the_installed_qemu_accepts_the_sandbox_policy() {
        let qemu = Path::new("qemu-system-x86_64");
        if std::process::Command::new(qemu).arg("-version").output().is_err() {
            eprintln!("no qemu-system-x86_64 here");
            return;
        }
        // Debian's QEMU is built with seccomp; a policy typo would make this false.
        assert!(sandbox_supported(qemu));
        assert!(!sandbox_supported(Path::new("/nonexistent/qemu")));
    }
}
