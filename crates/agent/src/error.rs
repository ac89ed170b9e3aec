//! The agent's error type: one variant per operation that can fail, each
//! keeping the underlying cause as its `source`.

use std::path::PathBuf;

use tvm_protocol::FrameError;

/// Why the agent could not boot the guest or run the job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Copying the compiled work dir for a test failed (the path inside it).
    #[error("copying the compiled work dir for a test ({0})")]
    CopyBuilt(PathBuf, #[source] std::io::Error),
    /// The compiled work dir holds more entries than a test copy may.
    #[error("the compiled work dir holds more than {0} entries")]
    BuiltTooLarge(usize),
    /// A `mount(2)` failed.
    #[error("mounting {fstype} on {target}")]
    Mount {
        /// Filesystem type (or `move` for a move mount).
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The root image's block device never appeared.
    #[error("waiting for the root device {0}: it never appeared")]
    RootDevice(&'static str),
    /// Moving `/newroot` onto `/` failed.
    #[error("switching root to {0}")]
    SwitchRoot(&'static str, #[source] nix::Error),
    /// `lo` could not be brought up.
    #[error("bringing up the loopback interface")]
    Loopback(#[source] nix::Error),
    /// `sethostname(2)` failed.
    #[error("setting the hostname")]
    Hostname(#[source] nix::Error),
    /// The agent could not make itself immune to the OOM killer.
    #[error("protecting the agent from the OOM killer")]
    OomScoreAdj(#[source] std::io::Error),
    /// Neither a named virtio-serial port nor a vsock device exists.
    #[error("finding the host transport: no virtio-serial port named {0:?} and no vsock device")]
    NoTransport(&'static str),
    /// The virtio-serial port exists but could not be opened.
    #[error("opening the virtio-serial port {0}")]
    OpenPort(PathBuf, #[source] std::io::Error),
    /// Setting up the vsock listener failed.
    #[error("listening on vsock port {0}")]
    VsockListen(u32, #[source] nix::Error),
    /// Accepting the host's vsock connection failed.
    #[error("accepting the host's vsock connection")]
    VsockAccept(#[source] nix::Error),
    /// A frame could not be written to the host.
    #[error("sending {0} to the host")]
    Send(&'static str, #[source] FrameError),
    /// The job frame could not be read.
    #[error("receiving the job from the host")]
    ReceiveJob(#[source] FrameError),
    /// The host hung up before sending the job.
    #[error("receiving the job from the host: the connection closed first")]
    HostClosed,
    /// The job asks for something the agent refuses to do.
    #[error("checking the job: {0}")]
    InvalidJob(String),
    /// A job file (or one of its directories) could not be written.
    #[error("writing job file {0:?}")]
    WriteFile(String, #[source] std::io::Error),
    /// Delegating controllers to the stage cgroups failed.
    #[error("enabling cgroup controllers {0:?}")]
    EnableControllers(&'static str, #[source] std::io::Error),
    /// Creating a stage cgroup failed.
    #[error("creating cgroup {0}")]
    CreateCgroup(PathBuf, #[source] std::io::Error),
    /// Writing a cgroup control file failed.
    #[error("writing {0}")]
    WriteCgroup(PathBuf, #[source] std::io::Error),
    /// Reading a cgroup control file failed.
    #[error("reading {0}")]
    ReadCgroup(PathBuf, #[source] std::io::Error),
    /// The job's seccomp filter could not be built.
    #[error("building the seccomp filter")]
    Seccomp(#[source] seccompiler::BackendError),
    /// Adding the host's entropy or reseeding the CRNG failed (step named).
    #[error("reseeding the kernel's random number generator: {0}")]
    Reseed(&'static str, #[source] std::io::Error),
    /// Setting the wall clock to the host's failed.
    #[error("setting the wall clock")]
    SetClock(#[source] nix::Error),
    /// The pipe for a stage's stdin could not be created or given its mode.
    #[error("creating the stdin pipe")]
    StdinPipe(#[source] nix::Error),
    /// A node of the output channel (named; TVM's guest kernel driver) could
    /// not be opened.
    #[error("opening the output channel {0}")]
    OutputChannel(&'static str, #[source] nix::Error),
    /// A helper thread could not be started.
    #[error("starting the {0} thread")]
    SpawnThread(&'static str, #[source] std::io::Error),
}

/// Renders an error and all its causes on one line, for the host's
/// `Failed { message }` and for the console.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        // Some errors (FrameError among them) already print their cause.
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_every_cause() {
        let e = Error::WriteFile("a/b".into(), std::io::Error::from_raw_os_error(libc::ENOSPC));
        let s = chain(&e);
        assert!(s.starts_with("writing job file \"a/b\": No space left on device"), "{s}");
    }

    #[test]
    fn chain_does_not_repeat_causes_already_in_the_message() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe gone");
        let e = Error::Send("output", tvm_protocol::FrameError::Io(io));
        assert_eq!(chain(&e), "sending output to the host: transport failed: pipe gone");
    }
}
