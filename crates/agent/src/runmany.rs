//! Compile once, run many: each test of a job gets a fresh work dir holding
//! a copy of the compiled one, runs once every process of the previous test
//! is gone (its cgroup emptied and removed), and finds `/tmp`, `/dev/shm`
//! and System V IPC as empty as the first test did.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tvm_protocol::{Command, GuestMessage, Job, Stage};

use crate::clone::{empty_dir, remove_sysv_ipc, SCRATCH};
use crate::error::Error;
use crate::log::debug;
use crate::sandbox::{RUNNER_GID, RUNNER_UID};
use crate::stage::{self, StageSpec, WORKDIR};

/// Where the compiled work dir is kept (moved, not copied) while the tests
/// run: a root-only directory on the agent's devtmpfs, which the runner
/// cannot reach.
const BUILT: &str = "/dev/.tvm-built";
/// Most entries (files, directories, links) copied into each test's work dir.
const MAX_ENTRIES: usize = 10_000;
/// Deepest directory nesting copied.
const MAX_DEPTH: usize = 32;

/// Runs every test of `job` after a successful compile, sending one
/// [`GuestMessage::TestDone`] per test, in order.
///
/// # Errors
/// Mount or copy failures ([`Error::Mount`], [`Error::CopyBuilt`],
/// [`Error::BuiltTooLarge`]) and stage setup failures: the job is then
/// reported as failed, never a test as passed.
pub fn run_all(job: &Job, outbox: &Sender<GuestMessage>) -> Result<(), Error> {
    for t in &job.tests {
        stage::check_command(&Command { argv: t.argv.clone(), env: job.run.env.clone(), limits: job.run.limits })?;
    }
    keep_built()?;
    // Test runs stream nothing (each result carries its capped output), so
    // their chunks go to a channel nobody reads.
    let (quiet, rx) = mpsc::channel::<GuestMessage>();
    drop(rx);
    for (index, test) in job.tests.iter().enumerate() {
        fresh_workdir(job.workdir_bytes)?;
        let command = Command { argv: test.argv.clone(), env: job.run.env.clone(), limits: job.run.limits };
        let cgroup = format!("test-{index}");
        let spec = StageSpec {
            stage: Stage::Run,
            cgroup: &cgroup,
            command: &command,
            stdin: Some(test.stdin.clone()),
            streamed: false,
        };
        // stage::run returns only once the test's cgroup is empty: nothing of it is left for the next.
        let result = stage::run(spec, &quiet)?;
        debug!("test {index}: {:?}", result.status);
        let _ = outbox.send(GuestMessage::TestDone { index: index as u32, result });
    }
    Ok(())
}

/// Moves the compiled work dir to [`BUILT`] and makes it root's, so no test
/// can change what the next one starts from.
fn keep_built() -> Result<(), Error> {
    DirBuilder::new().mode(0o700).create(BUILT).map_err(|e| Error::CopyBuilt(BUILT.into(), e))?;
    mount(Some(WORKDIR), BUILT, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| Error::Mount {
        fstype: "move",
        target: BUILT,
        source,
    })?;
    let root = Path::new(BUILT);
    std::fs::set_permissions(root, Permissions::from_mode(0o700)).map_err(|e| Error::CopyBuilt(BUILT.into(), e))?;
    std::os::unix::fs::chown(root, Some(0), Some(0)).map_err(|e| Error::CopyBuilt(BUILT.into(), e))
}

/// Replaces `/work` with a fresh tmpfs holding a copy of [`BUILT`], and
/// empties the scratch dirs and IPC the previous test may have used.
fn fresh_workdir(bytes: u64) -> Result<(), Error> {
    // Nothing of the previous test runs any more, so nothing holds /work busy;
    // detach anyway so a stray reference cannot stop the tests.
    match umount2(WORKDIR, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(source) => return Err(Error::Mount { fstype: "umount", target: WORKDIR, source }),
    }
    for dir in SCRATCH {
        empty_dir(Path::new(dir));
    }
    remove_sysv_ipc();
    crate::job::mount_workdir(bytes)?;
    let mut entries = 0;
    copy_tree(Path::new(BUILT), Path::new(WORKDIR), Some((RUNNER_UID, RUNNER_GID)), 0, &mut entries)
}

/// Copies directories, regular files (with their mode bits) and symlinks
/// from `from` into `to`, owned by `owner` (uid, gid) when given; anything
/// else (FIFOs, sockets) is left out, and set-id bits are dropped. Never
/// follows a link.
fn copy_tree(
    from: &Path,
    to: &Path,
    owner: Option<(u32, u32)>,
    depth: usize,
    entries: &mut usize,
) -> Result<(), Error> {
    let (uid, gid) = (owner.map(|o| o.0), owner.map(|o| o.1));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: io::Error| Error::CopyBuilt(p, e)
    };
    if depth > MAX_DEPTH {
        return Err(Error::CopyBuilt(from.into(), io::Error::other(format!("deeper than {MAX_DEPTH} directories"))));
    }
    for entry in std::fs::read_dir(from).map_err(err(from))? {
        let entry = entry.map_err(err(from))?;
        *entries += 1;
        if *entries > MAX_ENTRIES {
            return Err(Error::BuiltTooLarge(MAX_ENTRIES));
        }
        let src = entry.path();
        let dst: PathBuf = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src).map_err(err(&src))?;
        let kind = meta.file_type();
        let mode = meta.mode() & 0o7777 & !0o6000;
        if kind.is_dir() {
            DirBuilder::new().mode(0o700).create(&dst).map_err(err(&dst))?;
            copy_tree(&src, &dst, owner, depth + 1, entries)?;
            std::fs::set_permissions(&dst, Permissions::from_mode(mode)).map_err(err(&dst))?;
            std::os::unix::fs::chown(&dst, uid, gid).map_err(err(&dst))?;
        } else if kind.is_file() {
            let mut input =
                OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&src).map_err(err(&src))?;
            let mut output: File = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dst)
                .map_err(err(&dst))?;
            io::copy(&mut input, &mut output).map_err(err(&dst))?;
            output.set_permissions(Permissions::from_mode(mode)).map_err(err(&dst))?;
            std::os::unix::fs::fchown(&output, uid, gid).map_err(err(&dst))?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(err(&src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(err(&dst))?;
            std::os::unix::fs::lchown(&dst, uid, gid).map_err(err(&dst))?;
        } else {
            debug!("test copy: skipping {} (not a file, directory or link)", src.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ownership needs root, which the host tests don't have (owner `None`);
    // the tree shape, contents, modes and links are what is checked here.
    #[test]
    fn copies_files_dirs_and_links_without_following_them() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::create_dir_all(s.join("a/b")).unwrap();
        std::fs::write(s.join("main"), b"\x7fELF").unwrap();
        std::fs::set_permissions(s.join("main"), Permissions::from_mode(0o755)).unwrap();
        std::fs::write(s.join("a/b/data.txt"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.join("link")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(s.join("sock")).unwrap();
        std::fs::write(s.join("setuid"), b"").unwrap();
        std::fs::set_permissions(s.join("setuid"), Permissions::from_mode(0o4755)).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let mut n = 0;
        copy_tree(s, dst.path(), None, 0, &mut n).unwrap();
        assert_eq!(n, 7);
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("main")).unwrap(), b"\x7fELF");
        assert_eq!(std::fs::metadata(d.join("main")).unwrap().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read(d.join("a/b/data.txt")).unwrap(), b"x");
        assert_eq!(std::fs::read_link(d.join("link")).unwrap(), Path::new("/etc/passwd"));
        assert!(std::fs::symlink_metadata(d.join("sock")).is_err(), "sockets are left out");
        assert_eq!(std::fs::metadata(d.join("setuid")).unwrap().mode() & 0o7777, 0o755, "set-id bits dropped");
    }

    #[test]
    fn a_huge_tree_is_refused() {
        let src = tempfile::tempdir().unwrap();
        for i in 0..=MAX_ENTRIES {
            std::fs::write(src.path().join(i.to_string()), b"").unwrap();
        }
        let dst = tempfile::tempdir().unwrap();
        let mut n = 0;
        let e = copy_tree(src.path(), dst.path(), None, 0, &mut n).unwrap_err();
        assert!(matches!(e, Error::BuiltTooLarge(MAX_ENTRIES)), "{e}");
    }
}
