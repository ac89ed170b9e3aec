//! `tvm`: run untrusted code in microVMs, from the command line or as a server.
//!
//! This binary is deliberately thin: argument parsing, output formatting and
//! exit codes. The work happens in `pyrovm` (VMs) and `tvm-config` (catalog).

mod bench;
mod cli;
mod relay_bench;
mod soak;

fn main() -> std::process::ExitCode {
    cli::main()
}
