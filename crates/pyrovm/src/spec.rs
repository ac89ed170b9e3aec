//! What a VM is made of, independent of the VMM that runs it.
//!
//! This is the bottom of `pyrovm`'s VM layer: [`crate::backend`] turns a
//! [`VmSpec`] into a VMM process, [`crate::jail`] confines it and
//! [`crate::vm`] drives it; none of them is imported here.

use std::path::PathBuf;

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

/// How the host reaches the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentTransport {
    /// A virtio-serial port named [`tvm_protocol::VIRTIO_PORT_NAME`] (QEMU).
    VirtioSerial,
    /// A virtio-vsock connection to guest port [`tvm_protocol::VSOCK_PORT`]
    /// (Firecracker's hybrid vsock: a Unix socket on the host side).
    Vsock,
}

/// What a VM is made of; every backend maps from it.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest kernel: the backend picks the format it boots from the one build
    /// ([`crate::kernel::Kernel`]: bzImage for QEMU, ELF vmlinux for Firecracker).
    pub kernel: PathBuf,
    /// Initramfs with the agent, `None` for a kernel-only probe.
    pub initrd: Option<PathBuf>,
    /// Read-only root image (the runtime), `None` for a kernel-only probe.
    pub rootfs: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator.
    pub accel: AccelKind,
    /// The agent channel; `None` for a kernel-only probe.
    pub agent: Option<AgentTransport>,
    /// Verbose kernel and agent logs on the serial console.
    pub debug: bool,
    /// Appended to the kernel command line (`Settings::kernel_args`).
    pub extra_cmdline: Option<String>,
}

/// Kernel command line. `reboot` is how the guest ends the VM, the
/// backend's [`crate::backend::Vmm::reboot`]: a triple fault (`t`) under
/// QEMU microvm, which has no i8042; the i8042 reset (`k`) under Firecracker,
/// which emulates only that. `no_timer_check` skips the kernel's IO-APIC
/// timer probe, which on a loaded host under TCG sees too few ticks and
/// panics the boot ("IO-APIC + timer doesn't work!"), as Kata Containers'
/// guests do.
pub fn kernel_cmdline(debug: bool, reboot: char, extra: Option<&str>) -> String {
    let level = if debug { "loglevel=7 tvm.debug=1" } else { "quiet loglevel=1" };
    let mut line = format!("console=ttyS0 {level} panic=-1 reboot={reboot} no_timer_check rdinit=/init");
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        line.push(' ');
        line.push_str(extra);
    }
    line
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
        assert!(kernel_cmdline(false, 'k', None).contains("reboot=k"));
    }
}
