//! One job: check it, give it a fresh work dir with its files, then run the
//! compile stage (if any) and the run stage.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use nix::mount::{mount, MsFlags};
use tvm_protocol::{validate_file_path, File, GuestMessage, Job, JobResult, Stage, StageResult, StageStatus, Verdict};

use crate::error::Error;
use crate::inbox::Inbox;
use crate::log::debug;
use crate::sandbox::{self, RUNNER_GID, RUNNER_UID};
use crate::stage::{self, StageSpec, WORKDIR};

/// Runs the job and returns its result. An `Err` means the job could not be
/// run at all (bad job, setup failure), not that the program failed. For an
/// interactive job `inbox` carries the host's stdin and signals, and each
/// stage's start and exit are reported as they happen.
pub fn execute_with(mut job: Job, outbox: &Sender<GuestMessage>, inbox: Option<&Inbox>) -> Result<JobResult, Error> {
    // Everything checkable is checked before anything is written or run.
    let plans =
        job.files.iter().map(|f| plan_file(&f.path).map_err(Error::InvalidJob)).collect::<Result<Vec<_>, _>>()?;
    if let Some(compile) = &job.compile {
        stage::check_command(compile)?;
    }
    stage::check_command(&job.run)?;

    mount_workdir(job.workdir_bytes)?;
    for (file, plan) in job.files.iter().zip(&plans) {
        write_file(Path::new(WORKDIR), plan, file).map_err(|e| Error::WriteFile(file.path.clone(), e))?;
    }
    debug!("work dir ready: {} files", job.files.len());
    crate::trace::mark("workdir");
    sandbox::enable_controllers()?;
    crate::trace::mark("controllers");

    let compile = match &job.compile {
        Some(command) => {
            let spec = StageSpec { stage: Stage::Compile, cgroup: "stage-1", command, stdin: None, streamed: true };
            Some(run_reported(spec, outbox, inbox)?)
        }
        None => None,
    };
    let compiled = !matches!(&compile, Some(c) if c.status != StageStatus::Ok);
    if !job.tests.is_empty() {
        if compiled {
            crate::runmany::run_all(&job, outbox)?;
        }
        // Per-test verdicts travel in `TestDone`; this one says the build went through.
        let verdict = if compiled { Verdict::Ok } else { Verdict::CompileError };
        return Ok(JobResult { verdict, compile, run: None, trace: Vec::new() });
    }
    let run = if compiled {
        // A session's stdin comes through the inbox (which got the job's own stdin first).
        let stdin = inbox.is_none().then(|| std::mem::take(&mut job.stdin));
        let spec = StageSpec { stage: Stage::Run, cgroup: "stage-2", command: &job.run, stdin, streamed: true };
        Some(run_reported(spec, outbox, inbox)?)
    } else {
        None
    };
    let verdict = Verdict::from_stages(compile.as_ref(), run.as_ref());
    Ok(JobResult { verdict, compile, run, trace: Vec::new() })
}

/// Runs a stage; in a session, announces its start and exit to the host.
fn run_reported(
    spec: StageSpec<'_>,
    outbox: &Sender<GuestMessage>,
    inbox: Option<&Inbox>,
) -> Result<StageResult, Error> {
    let stage = spec.stage;
    if inbox.is_some() {
        let _ = outbox.send(GuestMessage::StageStarted { stage });
    }
    let result = stage::run_attached(spec, outbox, inbox)?;
    if inbox.is_some() {
        let _ = outbox.send(GuestMessage::StageExited {
            stage,
            status: result.status,
            exit_code: result.exit_code,
            signal: result.signal,
        });
    }
    Ok(result)
}

/// A fresh tmpfs on `/work` of the job's size, owned by the runner.
pub(crate) fn mount_workdir(bytes: u64) -> Result<(), Error> {
    // tmpfs reads size=0 as "unlimited"; one page is the smallest real cap.
    let size = bytes.max(4096);
    let data = format!("size={size},mode=0755,uid={RUNNER_UID},gid={RUNNER_GID}");
    mount(Some("tmpfs"), WORKDIR, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(data.as_str()))
        .map_err(|source| Error::Mount { fstype: "tmpfs", target: WORKDIR, source })
}

/// Where a job file goes, relative to the work dir.
#[derive(Debug, PartialEq, Eq)]
struct FilePlan {
    /// Directories to create first, outermost first.
    dirs: Vec<PathBuf>,
    /// The file itself.
    file: PathBuf,
}

/// Validates a job file path (the agent trusts nothing the host checked) and
/// lists the directories it needs.
fn plan_file(path: &str) -> Result<FilePlan, String> {
    validate_file_path(path)?;
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop();
    let mut dirs = Vec::with_capacity(parts.len());
    let mut dir = PathBuf::new();
    for part in parts {
        dir.push(part);
        dirs.push(dir.clone());
    }
    Ok(FilePlan { dirs, file: PathBuf::from(path) })
}

fn write_file(root: &Path, plan: &FilePlan, file: &File) -> io::Result<()> {
    for dir in &plan.dirs {
        ensure_dir(&root.join(dir))?;
    }
    let mode = if file.executable { 0o755 } else { 0o644 };
    // create_new + O_NOFOLLOW: a duplicate path is an error, and no path can
    // be redirected through a symlink.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(root.join(&plan.file))?;
    out.write_all(&file.content)?;
    // Set explicitly: the umask must not decide what the program can do.
    out.set_permissions(Permissions::from_mode(mode))?;
    std::os::unix::fs::fchown(&out, Some(RUNNER_UID), Some(RUNNER_GID))
}

fn ensure_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => {
            std::fs::set_permissions(path, Permissions::from_mode(0o755))?;
            std::os::unix::fs::chown(path, Some(RUNNER_UID), Some(RUNNER_GID))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(path)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is a file, not a directory", path.display()),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parent_directories_outermost_first() {
        let plan = plan_file("src/pkg/mod.py").unwrap();
        assert_eq!(plan.dirs, vec![PathBuf::from("src"), PathBuf::from("src/pkg")]);
        assert_eq!(plan.file, PathBuf::from("src/pkg/mod.py"));
        assert_eq!(plan_file("main.py").unwrap(), FilePlan { dirs: vec![], file: "main.py".into() });
    }

    #[test]
    fn rejects_paths_that_escape_the_work_dir() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\0b"] {
            assert!(plan_file(bad).is_err(), "{bad:?}");
        }
    }

    fn file(path: &str, content: &[u8], executable: bool) -> File {
        File { path: path.into(), content: content.to_vec(), executable }
    }

    // Ownership is left out: chown needs root, and the host tests don't have it.
    fn write_as_user(root: &Path, f: &File) -> io::Result<()> {
        let plan = plan_file(&f.path).map_err(io::Error::other)?;
        match write_file(root, &plan, f) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
            other => other,
        }
    }

    #[test]
    fn writes_files_with_modes_and_refuses_duplicates_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_as_user(root, &file("a/b/run.sh", b"#!/bin/sh\n", true)).unwrap();
        write_as_user(root, &file("a/data.txt", b"x", false)).unwrap();
        let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("a/b/run.sh"), 0o755);
        assert_eq!(mode("a/data.txt"), 0o644);
        assert_eq!(mode("a/b"), 0o755);
        assert_eq!(std::fs::read(root.join("a/b/run.sh")).unwrap(), b"#!/bin/sh\n");

        let dup = write_as_user(root, &file("a/data.txt", b"y", false)).unwrap_err();
        assert_eq!(dup.kind(), io::ErrorKind::AlreadyExists);
        assert!(write_as_user(root, &file("a/data.txt/x", b"y", false)).is_err(), "file used as a directory");

        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        assert!(write_as_user(root, &file("link", b"y", false)).is_err(), "must not follow a symlink");
        std::os::unix::fs::symlink("/tmp", root.join("dirlink")).unwrap();
        assert!(
            write_as_user(root, &file("dirlink/x", b"y", false)).is_err(),
            "must not write through a symlinked dir"
        );
    }
}
