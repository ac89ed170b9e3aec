//! The artifact cache under `settings.cache_dir`: its layout, per-artifact
//! locks, and scratch directories in which builds happen before their result
//! is published by an atomic rename. Also the small command runner that the
//! kernel and image builders share.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

/// How many lines of a failing command's output are kept for the error.
pub const TAIL_LINES: usize = 40;

/// The cache directory and where each artifact lives in it.
///
/// ```text
/// <root>/kernel/<key>/{bzImage,vmlinux,config}
/// <root>/images/<key>.erofs  <root>/images/<key>.json
/// <root>/initrd/initrd-<key>.cpio
/// <root>/probe/kvm-<key>.json
/// <root>/locks/<name>.lock
/// <root>/tmp/<pid>-<label>-<random>/   scratch directories of running builds
/// ```
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created lazily, when something is written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Downloaded Debian packages of `suite`, shared by every image built from it.
    pub fn debs_dir(&self, suite: &str) -> PathBuf {
        self.root.join("debs").join(suite)
    }

    /// Directory of the built guest kernel `key`.
    pub fn kernel_dir(&self, key: &str) -> PathBuf {
        self.root.join("kernel").join(key)
    }

    /// Directory of all runtime images.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The erofs file of image `key`.
    pub fn image_path(&self, key: &str) -> PathBuf {
        self.images_dir().join(format!("{key}.erofs"))
    }

    /// The metadata of image `key`; written last, so its presence means the image is complete.
    pub fn image_meta(&self, key: &str) -> PathBuf {
        self.images_dir().join(format!("{key}.json"))
    }

    /// The agent initramfs with content key `key`.
    pub fn initrd_path(&self, key: &str) -> PathBuf {
        self.root.join("initrd").join(format!("initrd-{key}.cpio"))
    }

    /// The cached KVM probe verdict for kernel `key`.
    pub fn probe_path(&self, key: &str) -> PathBuf {
        self.root.join("probe").join(format!("kvm-{key}.json"))
    }

    /// Parent of all scratch directories.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Takes the exclusive lock `name` (e.g. `kernel-<key>`), waiting as long as
    /// another process holds it.
    pub fn lock(&self, name: &str) -> io::Result<CacheLock> {
        self.lock_with(name, || {})
    }

    /// Like [`Cache::lock`], calling `on_wait` once before blocking if the lock is busy.
    pub fn lock_with(&self, name: &str, on_wait: impl FnOnce()) -> io::Result<CacheLock> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid lock name {name:?}")));
        }
        let dir = self.root.join("locks");
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(CacheLock { _lock: lock, path }),
            Err((file, Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => return Err(e.into()),
        };
        info!(lock = %path.display(), "another tvm process is building this; waiting");
        on_wait();
        let mut file = file;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(CacheLock { _lock: lock, path }),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(e.into()),
            }
        }
    }

    /// A fresh scratch directory `<root>/tmp/<pid>-<label>-<random>`, removed when dropped.
    /// `label` (e.g. `kernel`) only helps a person looking at the directory.
    pub fn scratch(&self, label: &str) -> io::Result<ScratchDir> {
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp)?;
        let random = uuid::Uuid::new_v4().simple().to_string();
        let label: String = label.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
        let path = tmp.join(format!("{}-{label}-{}", std::process::id(), &random[..12]));
        fs::create_dir(&path)?;
        Ok(ScratchDir { path })
    }

    /// Removes scratch directories whose owning process is gone (it crashed or
    /// was killed mid-build). Returns how many were removed.
    pub fn sweep_stale_scratch(&self) -> usize {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(scratch_owner) else {
                continue;
            };
            if pid == std::process::id() || pid_alive(pid) {
                continue;
            }
            let path = entry.path();
            match remove_tree(&path) {
                Ok(()) => {
                    info!(path = %path.display(), pid, "removed scratch directory of a dead process");
                    removed += 1;
                }
                Err(e) => warn!(path = %path.display(), error = %e, "cannot remove stale scratch directory"),
            }
        }
        removed
    }
}

/// An exclusive lock on one cache artifact, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct CacheLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl CacheLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A build's private directory under `<root>/tmp`; removed with its contents
/// when dropped, whether the build succeeded (results were renamed out) or not.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Moves `from` (inside this scratch dir) to `to` with one rename, so
    /// readers see either nothing or the complete artifact. A directory already
    /// at `to` (a damaged earlier artifact) is first moved into the scratch dir.
    pub fn publish(&self, from: &Path, to: &Path) -> io::Result<()> {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::symlink_metadata(to).is_ok_and(|m| m.is_dir()) {
            let aside = self.join(format!("replaced-{}", uuid::Uuid::new_v4().simple()));
            fs::rename(to, &aside)?;
        }
        fs::rename(from, to)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot remove scratch directory");
        }
    }
}

/// The pid in a scratch directory name `<pid>-<label>-<random>`.
fn scratch_owner(name: &str) -> Option<u32> {
    let (pid, rest) = name.split_once('-')?;
    if rest.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process with this pid exists (EPERM means it exists but is not ours).
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// Removes `path` recursively without ever leaving its filesystem: mounts left
/// below it (mmdebstrap mounts /proc, /sys and /dev into the root it builds)
/// are detached first, and anything still mounted is left alone rather than
/// having a host filesystem's contents deleted through it.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    detach_mounts_under(path);
    let mut first_error = None;
    remove_dir_one_fs(path, meta.dev(), &mut first_error);
    first_error.map_or(Ok(()), Err)
}

fn remove_dir_one_fs(dir: &Path, dev: u64, first_error: &mut Option<io::Error>) {
    fn note(slot: &mut Option<io::Error>, e: io::Error) {
        slot.get_or_insert(e);
    }
    // Read-only directories (a chroot's /proc is 0555) cannot be emptied by a non-root owner.
    if let Ok(m) = fs::symlink_metadata(dir) {
        let mode = m.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700));
        }
    }
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let p = match entry {
                    Ok(e) => e.path(),
                    Err(e) => {
                        note(first_error, e);
                        continue;
                    }
                };
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() && m.dev() != dev => note(
                        first_error,
                        io::Error::other(format!(
                            "{} is another filesystem (still mounted?); left in place",
                            p.display()
                        )),
                    ),
                    Ok(m) if m.is_dir() => remove_dir_one_fs(&p, dev, first_error),
                    Ok(_) => {
                        if let Err(e) = fs::remove_file(&p) {
                            note(first_error, e);
                        }
                    }
                    Err(e) => note(first_error, e),
                }
            }
        }
        Err(e) => note(first_error, e),
    }
    if let Err(e) = fs::remove_dir(dir) {
        note(first_error, e);
    }
}

/// Lazily unmounts every mount point at or below `path` (deepest first).
/// Failures are ignored: without privileges nothing of ours can be mounted there,
/// and [`remove_tree`] never descends into another filesystem anyway.
fn detach_mounts_under(path: &Path) {
    let Ok(base) = fs::canonicalize(path) else {
        return;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mount_points(&info).into_iter().filter(|p| p.starts_with(&base)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => info!(mount = %p.display(), "detached leftover mount"),
            Err(e) => debug!(mount = %p.display(), error = %e, "cannot detach leftover mount"),
        }
    }
}

/// Mount points listed in a `/proc/<pid>/mountinfo` text (field 5, octal escapes decoded).
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mount_path(p))).collect()
}

/// Decodes the `\040`-style escapes the kernel uses for spaces, tabs, newlines and backslashes.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds an executable named `tool` on `PATH`, then in the sbin directories
/// (which a non-root `PATH` often lacks, and where some build tools live).
/// Resolves a program given as a path (checked to exist) or a bare name
/// (looked up through PATH).
pub fn which_path(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.exists().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(p)).find(|c| c.is_file())
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The last [`TAIL_LINES`] lines of a stream.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    pub(crate) fn push(&mut self, line: &str) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub(crate) fn text(&self) -> String {
        self.lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// Stops a running build from another thread: the build tool's whole process
/// group is killed (SIGTERM, then SIGKILL after [`CANCEL_GRACE`]) and the
/// build returns its `Cancelled` error, whose unwinding removes the scratch
/// directory and detaches its mounts ([`remove_tree`]). Clones share one flag;
/// cancelling is permanent.
#[derive(Debug, Clone, Default)]
pub struct BuildCancel {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

/// How long a cancelled build tool gets to exit on SIGTERM before SIGKILL.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

impl BuildCancel {
    /// A token nobody has cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every build holding a clone of this token.
    pub fn cancel(&self) {
        let (flag, cv) = &*self.inner;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for cancellation; returns whether it happened.
    fn wait(&self, timeout: Duration) -> bool {
        let (flag, cv) = &*self.inner;
        let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv.wait_timeout_while(guard, timeout, |c| !*c).unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// Cancels its token when dropped: held by an async caller across a blocking
/// build, so dropping the caller's future (Ctrl-C, a server draining) stops the build.
#[derive(Debug)]
pub struct CancelOnDrop(Option<BuildCancel>);

impl CancelOnDrop {
    /// Arms the guard for `cancel`.
    pub fn new(cancel: BuildCancel) -> Self {
        Self(Some(cancel))
    }

    /// The build finished: dropping no longer cancels.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.cancel();
        }
    }
}

/// Kills process group `pgid`: SIGTERM, then SIGKILL unless `exited` turns
/// true within [`CANCEL_GRACE`].
fn kill_group(pgid: u32, exited: &AtomicBool) {
    use nix::sys::signal::{killpg, Signal};
    let Ok(raw) = i32::try_from(pgid) else {
        return;
    };
    let pg = nix::unistd::Pid::from_raw(raw);
    let _ = killpg(pg, Signal::SIGTERM);
    let started = Instant::now();
    while !exited.load(Ordering::Acquire) && started.elapsed() < CANCEL_GRACE {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Also when the leader exited: its children (apt, dpkg) may linger in the group.
    let _ = killpg(pg, Signal::SIGKILL);
}

/// Why a build command did not succeed.
#[derive(Debug)]
pub(crate) enum RunError {
    /// It could not be started (`NotFound`: the tool is not installed).
    Spawn(io::Error),
    /// It ran and failed; `tail` is the end of its stderr (or stdout if stderr was empty).
    Failed { status: ExitStatus, tail: String },
    /// Reading its output or waiting for it failed.
    Io(io::Error),
    /// Its [`BuildCancel`] was cancelled; its process group was killed.
    Cancelled,
}

impl RunError {
    /// Exit status and output tail as one text, for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            RunError::Spawn(e) | RunError::Io(e) => e.to_string(),
            RunError::Cancelled => "cancelled".to_string(),
            RunError::Failed { status, tail } if tail.is_empty() => format!("{status}, no output"),
            RunError::Failed { status, tail } => format!("{status}; last output:\n{tail}"),
        }
    }
}

/// Runs `cmd` with stdin closed, calling `on_stdout` and `on_stderr` with
/// each output line as it arrives (on two threads) and keeping the tail of
/// both for the error.
pub(crate) fn run_streaming(
    cmd: &mut Command,
    on_stdout: impl FnMut(&str),
    on_stderr: impl FnMut(&str) + Send,
) -> Result<(), RunError> {
    run_cancellable(cmd, None, on_stdout, on_stderr)
}

/// [`run_streaming`], stopped by `cancel`: the command then runs in its own
/// process group, which is killed as a whole when `cancel` fires (the tool's
/// helpers, e.g. mmdebstrap's apt and dpkg, die with it), and the result is
/// [`RunError::Cancelled`].
pub(crate) fn run_cancellable(
    cmd: &mut Command,
    cancel: Option<&BuildCancel>,
    mut on_stdout: impl FnMut(&str),
    mut on_stderr: impl FnMut(&str) + Send,
) -> Result<(), RunError> {
    debug!(command = ?cmd, "running");
    if cancel.is_some_and(BuildCancel::is_cancelled) {
        return Err(RunError::Cancelled);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if cancel.is_some() {
        cmd.process_group(0);
    }
    // If tvm dies mid-build, the tool must not keep writing into a scratch dir
    // that the next run's sweep deletes as stale. The death signal follows the
    // spawning thread, which is fine: this thread waits for the child below.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    let parent = std::process::id();
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RunError::Io(io::Error::other("child pipes missing")));
    };
    let err_tail = Mutex::new(Tail::default());
    let mut out_tail = Tail::default();
    let (finished, killed) = (AtomicBool::new(false), AtomicBool::new(false));
    let pgid = child.id();
    let read = std::thread::scope(|s| {
        let err_tail = &err_tail;
        if let Some(cancel) = cancel {
            let (finished, killed) = (&finished, &killed);
            // Bounded by the command: `finished` is set once both pipes are closed.
            s.spawn(move || {
                while !finished.load(Ordering::Acquire) {
                    if cancel.wait(Duration::from_millis(100)) {
                        killed.store(true, Ordering::Release);
                        kill_group(pgid, finished);
                        return;
                    }
                }
            });
        }
        let errs = s.spawn(move || {
            for_each_line(stderr, |l| {
                err_tail.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                on_stderr(l);
            })
        });
        let out = for_each_line(stdout, |l| {
            out_tail.push(l);
            on_stdout(l);
        });
        let errs = errs.join().unwrap_or_else(|_| Err(io::Error::other("stderr reader panicked")));
        finished.store(true, Ordering::Release);
        out.and(errs)
    });
    let status = child.wait().map_err(RunError::Io)?;
    if killed.load(Ordering::Acquire) {
        return Err(RunError::Cancelled);
    }
    read.map_err(RunError::Io)?;
    if status.success() {
        return Ok(());
    }
    let err_tail = err_tail.into_inner().unwrap_or_else(|p| p.into_inner());
    let tail = if err_tail.is_empty() { out_tail.text() } else { err_tail.text() };
    Err(RunError::Failed { status, tail })
}

/// Calls `f` with each line (lossily decoded, without the newline) of `r`.
fn for_each_line(r: impl io::Read, mut f: impl FnMut(&str)) -> io::Result<()> {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        f(line.trim_end_matches(['\n', '\r']));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let c = Cache::new("/c");
        assert_eq!(c.kernel_dir("k"), Path::new("/c/kernel/k"));
        assert_eq!(c.image_path("i"), Path::new("/c/images/i.erofs"));
        assert_eq!(c.image_meta("i"), Path::new("/c/images/i.json"));
        assert_eq!(c.initrd_path("a"), Path::new("/c/initrd/initrd-a.cpio"));
        assert_eq!(c.probe_path("k"), Path::new("/c/probe/kvm-k.json"));
        assert_eq!(c.tmp_dir(), Path::new("/c/tmp"));
    }

    #[test]
    fn scratch_names_parse() {
        assert_eq!(scratch_owner("123-abcdef"), Some(123));
        assert_eq!(scratch_owner("123-"), None);
        assert_eq!(scratch_owner("x123-abc"), None);
        assert_eq!(scratch_owner("0-abc"), None);
        assert_eq!(scratch_owner("README"), None);
    }

    #[test]
    fn scratch_is_removed_on_drop_even_with_readonly_dirs() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let s = cache.scratch("test").unwrap();
        let p = s.path().to_path_buf();
        assert!(p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{}-", std::process::id())));
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", s.join("a/etc")).unwrap();
        fs::set_permissions(s.join("a/b"), fs::Permissions::from_mode(0o555)).unwrap();
        drop(s);
        assert!(!p.exists());
        assert!(Path::new("/etc").exists());
    }

    #[test]
    fn sweep_removes_only_dead_owners() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let mine = cache.scratch("test").unwrap();
        // A pid that certainly existed and is now gone: a child we reaped.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = cache.tmp_dir().join(format!("{dead}-0123456789ab"));
        fs::create_dir_all(stale.join("root/usr")).unwrap();
        fs::write(stale.join("root/usr/f"), b"x").unwrap();
        let alive = cache.tmp_dir().join("1-0123456789ab");
        fs::create_dir(&alive).unwrap();
        let foreign = cache.tmp_dir().join("notes");
        fs::create_dir(&foreign).unwrap();
        assert_eq!(cache.sweep_stale_scratch(), 1);
        assert!(!stale.exists());
        assert!(mine.path().exists() && alive.exists() && foreign.exists());
    }

    #[test]
    fn publish_replaces_a_damaged_directory() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let dest = cache.kernel_dir("k");
        fs::create_dir_all(&dest).unwrap();
        fs::write(dest.join("junk"), b"old").unwrap();
        let s = cache.scratch("test").unwrap();
        fs::create_dir(s.join("out")).unwrap();
        fs::write(s.join("out/bzImage"), b"new").unwrap();
        s.publish(&s.join("out"), &dest).unwrap();
        drop(s);
        assert_eq!(fs::read(dest.join("bzImage")).unwrap(), b"new");
        assert!(!dest.join("junk").exists());
        assert_eq!(fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn lock_is_exclusive_across_open_files() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let held = cache.lock("kernel-abc").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let c2 = cache.clone();
        let t = std::thread::spawn(move || {
            let waited = std::sync::atomic::AtomicBool::new(false);
            let _l = c2.lock_with("kernel-abc", || waited.store(true, std::sync::atomic::Ordering::SeqCst)).unwrap();
            tx.send(waited.load(std::sync::atomic::Ordering::SeqCst)).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "second lock must wait");
        drop(held);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), "on_wait was called");
        t.join().unwrap();
        assert!(cache.lock("../x").is_err());
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    22 1 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(mount_points(info), vec![PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]);
    }

    #[test]
    fn run_streaming_reports_tail_of_failures() {
        let mut out = Vec::new();
        let err = run_streaming(
            Command::new("sh").args(["-c", "echo one; echo two; for i in $(seq 1 50); do echo e$i >&2; done; exit 3"]),
            |l| out.push(l.to_string()),
            |_| {},
        )
        .unwrap_err();
        assert_eq!(out, ["one", "two"]);
        let RunError::Failed { status, tail } = err else { panic!("{err:?}") };
        assert_eq!(status.code(), Some(3));
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.starts_with("e11\n") && tail.ends_with("e50"), "{tail}");
        assert!(matches!(
            run_streaming(&mut Command::new("/nonexistent/tool"), |_| {}, |_| {}),
            Err(RunError::Spawn(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        assert!(which("sh").is_some());
        assert!(which("surely-not-a-tool-xyz").is_none());
    }

    /// Whether `pid` is gone or a zombie (killed, not yet reaped by init).
    fn dead(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn cancelling_kills_the_tools_whole_process_group() {
        let cancel = BuildCancel::new();
        let mut grandchild = None;
        // A tool with a helper of its own (as mmdebstrap has apt and dpkg), which ignores SIGTERM.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sh -c 'trap \"\" TERM; sleep 1000' & echo $!; wait"]);
        let res = run_cancellable(
            &mut cmd,
            Some(&cancel),
            |l| {
                grandchild = l.trim().parse::<i32>().ok();
                cancel.cancel();
            },
            |_| {},
        );
        assert!(matches!(res, Err(RunError::Cancelled)), "{res:?}");
        let pid = grandchild.expect("the helper's pid");
        let mut waited = 0;
        while !dead(pid) && waited < 100 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            waited += 1;
        }
        assert!(dead(pid), "helper {pid} survived the cancellation");
        // Cancelled before it starts: nothing runs.
        let res = run_cancellable(&mut Command::new("/nonexistent/tool"), Some(&cancel), |_| {}, |_| {});
        assert!(matches!(res, Err(RunError::Cancelled)), "{res:?}");
        // Without a cancellation the command runs as before.
        let mut out = Vec::new();
        run_cancellable(
            Command::new("echo").arg("fine"),
            Some(&BuildCancel::new()),
            |l| out.push(l.to_string()),
            |_| {},
        )
        .unwrap();
        assert_eq!(out, ["fine"]);
    }
}
