//! `firecracker-standin`: a stand-in for Firecracker, not Firecracker (see
//! the `firecracker-standin` crate). Serves Firecracker's API on
//! `--api-sock` and boots the configured guest with QEMU microvm under TCG.

fn main() -> std::process::ExitCode {
    firecracker_standin::server::main()
}
