//! Files the catalog's runtimes load from the agent rather than from their
//! image (so adding one never changes an image key): a tmpfs on `/run`, as
//! on every Debian system, read-only to jobs.

use std::os::unix::fs::PermissionsExt;

use nix::mount::{mount, MsFlags};

use crate::log::debug;

/// Where the support files live.
pub const RUN: &str = "/run";

/// The files, relative to [`RUN`], and their content.
///
/// - `tvm/ruby/sync_stdout.rb`, loaded by the Ruby runtimes through
///   `RUBYOPT=-r/run/tvm/ruby/sync_stdout`: Ruby buffers `$stdout` when it
///   is a pipe and flushes it only at exit (or on a signal it can handle), so
///   a program killed by the OOM killer or `RLIMIT_CPU` lost everything it
///   had printed. Writing through at once, as Ruby does on a terminal, keeps
///   what was printed before any limit kill.
pub const FILES: &[(&str, &str)] = &[(
    "tvm/ruby/sync_stdout.rb",
    "# TVM (RUBYOPT): stdout written through at once, as on a terminal, so what\n\
     # a program printed before a limit kill is kept.\n\
     $stdout.sync = true\n",
)];

/// Mounts the tmpfs on [`RUN`] and writes [`FILES`] into it, with
/// `/run/lock` as Debian has it. Best effort: without them a runtime only
/// loses the behaviour the file gives it (the catalog's `-r` then fails
/// loudly with a `LoadError`, never silently).
pub fn install() {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(Some("tmpfs"), RUN, Some("tmpfs"), flags, Some("mode=0755,size=1m")) {
        debug!("no tmpfs on {RUN}: {e}");
        return;
    }
    let lock = std::path::Path::new(RUN).join("lock");
    let made = std::fs::create_dir_all(&lock)
        .and_then(|()| std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o1777)));
    if let Err(e) = made {
        debug!("cannot create {}: {e}", lock.display());
    }
    for (path, content) in FILES {
        let path = std::path::Path::new(RUN).join(path);
        let written =
            path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path, content));
        if let Err(e) = written {
            debug!("cannot write {}: {e}", path.display());
        }
    }
}
