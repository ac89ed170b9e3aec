//! Per-VM run directories and the startup reaper.
//!
//! Every VM gets `<runtime_dir>/vm-<id>/` holding two small files naming
//! the owning `tvm` process and the VMM process, each as `pid starttime` so
//! a recycled pid is never mistaken for ours, and, when the backend makes
//! any, the host paths outside it that the VM created (`leftovers`: a
//! jailer's chroot and cgroups). If `tvm` dies without running its
//! destructors (SIGKILL, power loss), the next `tvm` to start kills the VMM
//! it finds and removes the leftovers and the directory.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// `pid starttime` of a live process, from /proc.
pub fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) counted after the parenthesised command name, which may contain spaces.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Whether the process recorded as `identity` still runs. A zombie (dead,
/// not yet collected by its parent: a QEMU whose `tvm` was SIGKILLed is one
/// until init reaps it) does not: there is nothing left to kill.
fn is_alive(identity: &str) -> bool {
    let Some(pid) = identity.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    if process_identity(pid).as_deref() != Some(identity.trim()) {
        return false;
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
        // Field 3 (state), right after the parenthesised command name.
        stat.rsplit_once(')').and_then(|(_, after)| after.split_whitespace().next().map(str::to_owned))
    });
    !matches!(state.as_deref(), Some("Z" | "X") | None)
}

/// Owns a VM's run directory; removes it on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<runtime_dir>/vm-<id>/` (mode 0700) and records the owner.
    pub fn create(runtime_dir: &Path, id: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(runtime_dir)?;
        let path = runtime_dir.join(format!("vm-{id}"));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = Self { path };
        let me = process_identity(std::process::id()).unwrap_or_default();
        std::fs::write(dir.path.join("owner"), me)?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records host paths outside the run dir that the VM creates, one per
    /// line, so a reaper can remove them if we cannot. Nothing to record
    /// writes nothing.
    pub fn record_leftovers(&self, paths: &[PathBuf]) -> std::io::Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        std::fs::write(self.path.join(LEFTOVERS), lines.join("\n") + "\n")
    }

    /// Records the VMM process so a reaper can kill it if we cannot.
    pub fn record_vmm(&self, pid: u32) -> std::io::Result<()> {
        std::fs::write(self.path.join("vmm"), process_identity(pid).unwrap_or_else(|| format!("{pid} 0")))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %self.path.display(), error = %e, "could not remove VM run dir");
            }
        }
    }
}

/// The run dir file listing a VM's host paths outside the run dir.
const LEFTOVERS: &str = "leftovers";

/// Removes one recorded leftover: a file (a uid claim), a directory tree (a
/// chroot) or, for a cgroup, whose files cannot be deleted, the directory
/// alone. `true` if it was there and is gone.
pub fn remove_leftover(path: &Path) -> bool {
    if !path.is_absolute() || path.parent().is_none() {
        return false;
    }
    if path.starts_with("/sys/fs/cgroup") {
        return std::fs::remove_dir(path).is_ok();
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).is_ok(),
        Ok(_) => std::fs::remove_file(path).is_ok(),
        Err(_) => false,
    }
}

/// The environment variable that names a VMM's run dir; it is the VMM's
/// whole environment.
pub const RUN_DIR_ENV: &str = "TVM_RUN_DIR";

/// Pids of the live VMM processes whose run dir lies in `runtime_dir`
/// (found by their environment, so also after their run dir is gone).
pub fn vmm_processes(runtime_dir: &Path) -> Vec<u32> {
    let needle = format!("{RUN_DIR_ENV}={}/", runtime_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v.starts_with(needle.as_bytes())))
        })
        .collect()
}

/// What the reaper cleaned up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReapReport {
    /// VMM processes killed.
    pub processes_killed: usize,
    /// Run directories removed.
    pub dirs_removed: usize,
    /// Recorded leftovers (chroots, cgroups) removed.
    pub leftovers_removed: usize,
}

/// Removes what crashed `tvm` processes left in `runtime_dir`. VMs of live
/// `tvm` processes are left alone.
pub fn reap(runtime_dir: &Path) -> ReapReport {
    let mut report = ReapReport::default();
    let Ok(entries) = std::fs::read_dir(runtime_dir) else { return report };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("vm-") {
            continue;
        }
        let owner = std::fs::read_to_string(path.join("owner")).unwrap_or_default();
        if !owner.is_empty() && is_alive(&owner) {
            continue;
        }
        if let Ok(vmm) = std::fs::read_to_string(path.join("vmm")) {
            if is_alive(&vmm) {
                if let Some(pid) = vmm.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    report.processes_killed += 1;
                }
            }
        }
        if let Ok(list) = std::fs::read_to_string(path.join(LEFTOVERS)) {
            // After the kill: a cgroup empties once its processes are gone.
            std::thread::sleep(std::time::Duration::from_millis(50));
            for line in list.lines().filter(|l| !l.trim().is_empty()) {
                if remove_leftover(Path::new(line.trim())) {
                    report.leftovers_removed += 1;
                }
            }
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            report.dirs_removed += 1;
        }
    }
    if report != ReapReport::default() {
        info!(
            killed = report.processes_killed,
            removed = report.dirs_removed,
            leftovers = report.leftovers_removed,
            "reaped leftovers of a crashed tvm"
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let identity = process_identity(child.id()).unwrap();
        assert!(is_alive(&identity));
        // Exited but not waited for: a zombie until `wait` below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_alive(&identity) {
            assert!(std::time::Instant::now() < deadline, "the child never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(process_identity(child.id()).as_deref(), Some(identity.as_str()), "still a zombie");
        child.wait().unwrap();
        assert!(!is_alive(&identity));
        assert!(!is_alive("not-a-pid 1"));
    }

    #[test]
    fn reaper_kills_orphans_of_dead_owners_and_spares_live_ones() {
        let rt = tempfile::tempdir().unwrap();
        // A live owner (this test) with a live "VMM".
        let live = RunDir::create(rt.path(), "live").unwrap();
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        live.record_vmm(sleeper.id()).unwrap();
        // A dead owner (pid 0 never matches) with its own VMM.
        let mut orphan = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let dead = rt.path().join("vm-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("owner"), "999999999 1").unwrap();
        std::fs::write(dead.join("vmm"), process_identity(orphan.id()).unwrap()).unwrap();
        // And a leftover outside its run dir (as a jailer's chroot would be).
        let outside = tempfile::tempdir().unwrap();
        let chroot = outside.path().join("firecracker/dead/root");
        std::fs::create_dir_all(&chroot).unwrap();
        std::fs::write(chroot.join("vmlinux"), "k").unwrap();
        std::fs::write(dead.join(LEFTOVERS), format!("{}\n", outside.path().join("firecracker/dead").display()))
            .unwrap();

        let r = reap(rt.path());
        assert_eq!(r, ReapReport { processes_killed: 1, dirs_removed: 1, leftovers_removed: 1 });
        assert!(!outside.path().join("firecracker/dead").exists(), "leftover removed");
        assert!(!orphan.wait().unwrap().success(), "orphan was killed");
        assert!(live.path().exists());
        assert!(sleeper.try_wait().unwrap().is_none(), "live owner's VMM untouched");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists(), "RunDir removes itself");
    }
}
