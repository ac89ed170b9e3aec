//! `firecracker-standin`: a stand-in for Firecracker, not Firecracker (see
//! the `firecracker-standin` crate). Serves Firecracker's API on
//! `--api-sock` and boots the configured guest with QEMU microvm under TCG.

/// Its TCG guest keeps time with the host's TSC, as the QEMU backend's do.
#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    firecracker_standin::server::main(pyrovm::backend::qemu::tcg_tsc_cmdline)
}

/// It boots QEMU guests like the VMs it stands in for: Linux only.
#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("firecracker-standin: needs Linux (it boots QEMU microVMs)");
    std::process::ExitCode::from(70)
}
