//! `tvm`: run untrusted code in microVMs, from the command line or as a server.
//!
//! This binary is deliberately thin: [`cli`] holds the clap types and the
//! dispatch, [`commands`] one file per subcommand that calls one library verb
//! and formats its outcome. The work happens in `pyrovm` (VMs), `pyroshell`
//! (HTTP API) and `tvm-config` (settings, catalog). [`bench`], [`relay_bench`] and
//! [`soak`] are the measuring harnesses behind `tvm bench` (`--relay`) and `tvm soak`.

mod bench;
mod cli;
mod commands;
mod relay_bench;
mod soak;

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `tvm runtimes | head` would panic on the closed
    // pipe; a CLI should end quietly as `cat` does. The server keeps it ignored.
    let subcommand = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if subcommand.as_deref() != Some("serve") {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe {
            let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
        }
    }
    cli::main()
}
