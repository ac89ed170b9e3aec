//! Host cgroups for VMM processes: each QEMU runs in `<cgroup2>/tvm/<name>`
//! with its memory, process count and CPU capped, so a guest that makes its
//! VMM misbehave (a QEMU bug, a TCG translation-cache blow-up) hurts only
//! its own VM, and the whole VMM process tree can be killed at once.
//!
//! Cgroup names carry the owning `tvm` process as `vm-<id>.<pid>.<starttime>`,
//! so the startup reaper ([`reap`]) can tell a crashed owner's leftovers from
//! a live neighbour's without any other record. Hosts without a writable
//! cgroup2 hierarchy (read-only, cgroup v1 only, no delegation) run VMs
//! without one; [`HostCgroups::detect`] says why, and the caller logs it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::reaper::process_identity;

/// Name of TVM's parent cgroup under the cgroup2 root.
pub const PARENT: &str = "tvm";
/// Processes and threads a VMM may have: vCPU threads, the main loop, RCU,
/// and QEMU's I/O worker pool (up to 64 threads).
pub const VMM_PIDS: u64 = 256;
/// How long a killed cgroup may take to empty before removal is given up.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// Why host cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted")]
    NotMounted,
    /// TVM's parent cgroup could not be created or configured.
    #[error("cannot use {path}")]
    Parent {
        /// The parent cgroup.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A VM's cgroup could not be created or configured.
    #[error("cannot set up host cgroup {path}")]
    Vm {
        /// The VM's cgroup.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// TVM's parent cgroup and which limits its children can enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCgroups {
    parent: PathBuf,
    memory: bool,
    pids: bool,
    cpu: bool,
}

/// Limits of one VMM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmLimits {
    /// memory.max in bytes (guest RAM plus the VMM's own overhead).
    pub memory_bytes: u64,
    /// pids.max.
    pub pids: u64,
    /// cpu.max quota in CPUs (`None`: unlimited).
    pub cpus: Option<u32>,
}

impl HostCgroups {
    /// Finds the cgroup2 hierarchy (`/sys/fs/cgroup` on unified hosts, or
    /// the `unified` mount of a hybrid host), creates `tvm/` in it and
    /// delegates what controllers it can.
    pub fn detect() -> Result<Self, HostCgroupError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = cgroup2_mount(&mounts).ok_or(HostCgroupError::NotMounted)?;
        Self::at(&root)
    }

    /// As [`HostCgroups::detect`], for a given cgroup2 root.
    pub fn at(root: &Path) -> Result<Self, HostCgroupError> {
        let parent = root.join(PARENT);
        let err = |source| HostCgroupError::Parent { path: parent.clone(), source };
        match std::fs::create_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(err(e)),
            _ => {}
        }
        // Writability of the parent is what matters: probe it now rather
        // than failing at the first VM.
        let probe = parent.join(format!("probe-{}", std::process::id()));
        std::fs::create_dir(&probe).map_err(err)?;
        let _ = std::fs::remove_dir(&probe);

        let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let mut enabled = Vec::new();
        for c in ["memory", "pids", "cpu"] {
            if !available.split_whitespace().any(|a| a == c) {
                continue;
            }
            // Each level must hand the controller down; a failure (a
            // controller held by a v1 hierarchy, an internal process)
            // leaves just that limit unenforced.
            let ok = [root, parent.as_path()]
                .iter()
                .all(|dir| std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok());
            if ok {
                enabled.push(c);
            }
        }
        let cg = Self {
            memory: enabled.contains(&"memory"),
            pids: enabled.contains(&"pids"),
            cpu: enabled.contains(&"cpu"),
            parent,
        };
        debug!(parent = %cg.parent.display(), controllers = ?enabled, "host cgroups usable");
        Ok(cg)
    }

    /// The parent cgroup (`…/tvm`).
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Limits this host cannot enforce (controllers not delegated), for a
    /// warning; empty when every limit holds.
    pub fn missing_controllers(&self) -> Vec<&'static str> {
        [("memory", self.memory), ("pids", self.pids), ("cpu", self.cpu)]
            .into_iter()
            .filter_map(|(name, on)| (!on).then_some(name))
            .collect()
    }

    /// Creates the cgroup of VM `id`, owned by this process.
    pub fn create_vm(&self, id: &str, limits: VmmLimits) -> Result<VmCgroup, HostCgroupError> {
        let me = process_identity(std::process::id()).unwrap_or_else(|| format!("{} 0", std::process::id()));
        let name = format!("vm-{id}.{}", me.replace(' ', "."));
        let path = self.parent.join(name);
        let err = |source| HostCgroupError::Vm { path: path.clone(), source };
        std::fs::create_dir(&path).map_err(err)?;
        // Owned from here on: any failure below removes it again.
        let cg = VmCgroup { procs: cstring(&path.join("cgroup.procs")).map_err(err)?, path: path.clone() };
        if self.memory {
            write(&path, "memory.max", &limits.memory_bytes.to_string()).map_err(err)?;
            // Guest RAM must not be swapped out to escape the cap.
            match write(&path, "memory.swap.max", "0") {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
                _ => {}
            }
        }
        if self.pids {
            write(&path, "pids.max", &limits.pids.to_string()).map_err(err)?;
        }
        if let (true, Some(cpus)) = (self.cpu, limits.cpus) {
            write(&path, "cpu.max", &format!("{} 100000", u64::from(cpus) * 100_000)).map_err(err)?;
        }
        Ok(cg)
    }
}

/// One VMM's cgroup. Dropping it kills whatever is still inside
/// (`cgroup.kill`) and removes it.
#[derive(Debug)]
pub struct VmCgroup {
    path: PathBuf,
    procs: CString,
}

impl VmCgroup {
    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a forked child needs to join this cgroup (moved into the
    /// `pre_exec` closure, which must own its data).
    pub fn joiner(&self) -> CgroupJoiner {
        CgroupJoiner { procs: self.procs.clone() }
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Reads a control file (tests and diagnostics).
    pub fn read(&self, file: &str) -> io::Result<String> {
        std::fs::read_to_string(self.path.join(file))
    }
}

/// The `cgroup.procs` path of a [`VmCgroup`], prepared for a forked child.
#[derive(Debug, Clone)]
pub struct CgroupJoiner {
    procs: CString,
}

impl CgroupJoiner {
    /// Moves the calling process into the cgroup. Async-signal-safe (no
    /// allocation), for use between `fork` and `exec` of the VMM.
    pub fn join_self(&self) -> io::Result<()> {
        // SAFETY: `procs` is NUL-terminated; the fd is closed on every path.
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let result = if written == 1 { Ok(()) } else { Err(io::Error::last_os_error()) };
            libc::close(fd);
            result
        }
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.path) {
            warn!(cgroup = %self.path.display(), error = %e, "could not remove host cgroup");
        }
    }
}

/// Kills every process in the cgroup at `path`, waits (boundedly) for it to
/// empty and removes it.
fn destroy(path: &Path) -> io::Result<()> {
    // Kernels before 5.14 lack cgroup.kill; SIGKILL each member instead.
    if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
        for pid in std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + EMPTY_WAIT;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed processes are still exiting.
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What the cgroup reaper removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CgroupReapReport {
    /// Cgroups of dead owners removed (their processes killed).
    pub removed: usize,
}

/// Removes the VM cgroups under `parent` whose owning `tvm` is dead, killing
/// anything still in them. Cgroups of live owners are left alone.
pub fn reap(parent: &Path) -> CgroupReapReport {
    let mut report = CgroupReapReport::default();
    let Ok(entries) = std::fs::read_dir(parent) else { return report };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_of(&name) else { continue };
        if process_identity(owner.0).as_deref() == Some(owner.1.as_str()) {
            continue;
        }
        match destroy(&entry.path()) {
            Ok(()) => report.removed += 1,
            Err(e) => warn!(cgroup = %entry.path().display(), error = %e, "cannot remove stale host cgroup"),
        }
    }
    if report.removed > 0 {
        info!(removed = report.removed, "reaped host cgroups of a crashed tvm");
    }
    report
}

/// The VM cgroups under `parent` (for tests and `tvm doctor`).
pub fn vm_cgroups(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten().filter(|e| owner_of(&e.file_name().to_string_lossy()).is_some()).map(|e| e.path()).collect()
        })
        .unwrap_or_default()
}

/// The owner `(pid, "pid starttime")` encoded in a VM cgroup's name.
fn owner_of(name: &str) -> Option<(u32, String)> {
    let rest = name.strip_prefix("vm-")?;
    let mut parts = rest.rsplitn(3, '.');
    let start: u64 = parts.next()?.parse().ok()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    parts.next().filter(|id| !id.is_empty())?;
    Some((pid, format!("{pid} {start}")))
}

/// The cgroup2 mount point in a `/proc/self/mounts` text, preferring
/// `/sys/fs/cgroup` (unified hosts) over a hybrid host's `unified` mount.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    let all: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(target)
        })
        .collect();
    all.iter().find(|t| **t == "/sys/fs/cgroup").or_else(|| all.first()).map(PathBuf::from)
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn owner_is_read_from_the_name() {
        assert_eq!(owner_of("vm-abc123.4242.987654"), Some((4242, "4242 987654".into())));
        assert_eq!(owner_of("vm-abc.x.1"), None);
        assert_eq!(owner_of("vm-.1.2"), None);
        assert_eq!(owner_of("probe-12"), None);
        assert_eq!(owner_of("vm-abc"), None);
    }

    /// On a host with a writable cgroup2 hierarchy: a VM cgroup holds its
    /// process, is killed and removed on drop, and the reaper removes a dead
    /// owner's cgroup but not a live one's. Elsewhere it checks that
    /// detection fails cleanly (the VMs then run without host cgroups).
    #[test]
    fn vm_cgroup_lifecycle_and_reaper() {
        let cgs = match HostCgroups::detect() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("host cgroups unavailable here ({e}); checking the error only");
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        let limits = VmmLimits { memory_bytes: 512 << 20, pids: 16, cpus: Some(1) };
        let cg = cgs.create_vm("unit1", limits).unwrap();
        assert!(cg.path().exists());
        let join = cg.joiner();
        let mut child = std::process::Command::new("sleep");
        child.arg("60");
        // SAFETY: join_self only calls open/write/close.
        unsafe {
            use std::os::unix::process::CommandExt;
            child.pre_exec(move || join.join_self());
        }
        let mut child = child.spawn().unwrap();
        assert_eq!(cg.pids(), vec![child.id()]);
        if cgs.memory {
            assert_eq!(cg.read("memory.max").unwrap().trim(), (512u64 << 20).to_string());
        }
        let path = cg.path().to_path_buf();
        drop(cg);
        assert!(!path.exists(), "removed on drop");
        let status = child.wait().unwrap();
        assert!(!status.success(), "the process inside was killed");

        // A cgroup of a dead owner (pid 999999999 never exists) is reaped,
        // one of a live owner (this test) is not.
        let dead = cgs.parent().join("vm-unit2.999999999.1");
        std::fs::create_dir(&dead).unwrap();
        let live = cgs.create_vm("unit3", limits).unwrap();
        let report = reap(cgs.parent());
        assert!(report.removed >= 1);
        assert!(!dead.exists());
        assert!(live.path().exists());
        drop(live);
    }
}
