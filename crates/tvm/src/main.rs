//! `tvm`: run untrusted code in microVMs, from the command line or as a server.
//!
//! This binary is deliberately thin: [`cli`] holds the clap types and the
//! dispatch, [`commands`] one file per subcommand that calls one library verb
//! and formats its outcome. The work happens in `pyrovm` (VMs), `pyroshell`
//! (HTTP API) and `tvm-config` (settings, catalog). [`bench`], [`relay_bench`],
//! [`tests_bench`] and [`soak`] are the measuring harnesses behind `tvm bench`
//! (`--relay`, `--tests N`) and `tvm soak`.

//!
//! On macOS and Windows `tvm` is a client: `tvm lima` (TVM inside a Lima
//! Linux VM), `tvm run --server URL`, `tvm runtimes --server URL`, help and
//! version. Commands that start or manage VMs here need Linux and are compiled
//! for `target_os = "linux"` only; elsewhere they fail with one line naming
//! `tvm lima up` ([`commands::linux_only`]).

#[cfg(target_os = "linux")]
mod api_bench;
#[cfg(target_os = "linux")]
mod bench;
mod cli;
mod commands;
#[cfg(target_os = "linux")]
mod relay_bench;
#[cfg(target_os = "linux")]
mod soak;
#[cfg(target_os = "linux")]
mod tests_bench;

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `tvm runtimes | head` would panic on the closed
    // pipe; a CLI should end quietly as `cat` does. The server keeps it ignored.
    // (Windows has no SIGPIPE: a closed pipe is an error there.)
    #[cfg(unix)]
    {
        let subcommand = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        if subcommand.as_deref() != Some("serve") {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe {
                let _ =
                    nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
            }
        }
    }
    cli::main()
}
