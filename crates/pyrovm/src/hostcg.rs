//! Host cgroups for VMM processes: each VMM runs in `<cgroup2>/tvm/<name>`
//! with its memory, process count and CPU capped, so a guest that makes its
//! VMM misbehave (an emulation bug, a TCG translation-cache blow-up) hurts only
//! its own VM, and the whole VMM process tree can be killed at once.
//!
//! Cgroup names carry the owning `tvm` process as `vm-<id>.<pid>.<starttime>`,
//! so the startup reaper ([`reap`]) can tell a crashed owner's leftovers from
//! a live neighbour's without any other record. On hybrid and legacy hosts,
//! limits cgroup2 cannot delegate (its controllers are bound to v1) are set
//! in the v1 hierarchies instead (`memory.limit_in_bytes`, `pids.max`,
//! `cpu.cfs_quota_us`). Hosts with no writable hierarchy at all run VMs
//! without host cgroups; [`HostCgroups::detect`] says why, the caller logs it.

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
/// and the VMM's I/O worker pool (up to 64 threads), or a stand-in's helpers.
pub const VMM_PIDS: u64 = 256;
/// Host memory a VMM may use beyond its guest's RAM, MiB: the VMM itself,
/// device buffers and, under TCG, the translation cache (measured at
/// ~100 MiB for a Python job; the rest is margin, the cap is against runaways).
pub const VMM_OVERHEAD_MIB: u64 = 256;
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

/// TVM's parent cgroups and which limits their children can enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCgroups {
    /// `<cgroup2>/tvm`, when a writable cgroup2 hierarchy exists.
    v2: Option<PathBuf>,
    /// Controllers enforced through cgroup2.
    v2_controllers: Vec<&'static str>,
    /// Controllers cgroup2 cannot give us but a v1 hierarchy can (hybrid
    /// and legacy hosts), each with its `tvm` parent.
    v1: Vec<(&'static str, PathBuf)>,
}

/// Limits of one VMM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmLimits {
    /// Memory cap in bytes (guest RAM plus the VMM's own overhead).
    pub memory_bytes: u64,
    /// Process and thread cap.
    pub pids: u64,
    /// CPU quota in CPUs (`None`: unlimited).
    pub cpus: Option<u32>,
}

/// The controllers TVM caps VMMs with.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

impl HostCgroups {
    /// Finds the cgroup2 hierarchy (`/sys/fs/cgroup` on unified hosts, or
    /// the `unified` mount of a hybrid host), creates `tvm/` in it and
    /// delegates what controllers it can; controllers it cannot delegate are
    /// taken from cgroup v1 hierarchies where mounted (under this process's
    /// own v1 cgroup, so VMMs stay inside whatever limits `tvm` runs under).
    pub fn detect() -> Result<Self, HostCgroupError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v2 = match cgroup2_mount(&mounts) {
            Some(root) => Self::at(&root),
            None => Err(HostCgroupError::NotMounted),
        };
        let (v2_parent, v2_controllers, v2_err) = match v2 {
            Ok(cg) => (cg.v2, cg.v2_controllers, None),
            Err(e) => (None, Vec::new(), Some(e)),
        };
        let mut v1 = Vec::new();
        for c in CONTROLLERS.into_iter().filter(|c| !v2_controllers.contains(c)) {
            let Some(dir) = v1_cgroup(&mounts, &own, c) else { continue };
            let parent = dir.join(PARENT);
            match make_parent(&parent) {
                Ok(()) => v1.push((c, parent)),
                Err(e) => {
                    debug!(controller = c, parent = %parent.display(), error = %e, "cgroup v1 hierarchy not writable")
                }
            }
        }
        if let (Some(e), true) = (v2_err, v1.is_empty()) {
            return Err(e);
        }
        let cg = Self { v2: v2_parent, v2_controllers, v1 };
        debug!(v2 = ?cg.v2, v2_controllers = ?cg.v2_controllers, v1 = ?cg.v1, "host cgroups usable");
        Ok(cg)
    }

    /// As [`HostCgroups::detect`], for a given cgroup2 root only.
    pub fn at(root: &Path) -> Result<Self, HostCgroupError> {
        let parent = root.join(PARENT);
        make_parent(&parent).map_err(|source| HostCgroupError::Parent { path: parent.clone(), source })?;
        let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let mut enabled = Vec::new();
        for c in CONTROLLERS {
            if !available.split_whitespace().any(|a| a == c) {
                continue;
            }
            // Each level must hand the controller down; a failure (a
            // controller held by a v1 hierarchy, an internal process)
            // leaves just that limit to v1 or unenforced.
            let ok = [root, parent.as_path()]
                .iter()
                .all(|dir| std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok());
            if ok {
                enabled.push(c);
            }
        }
        Ok(Self { v2: Some(parent), v2_controllers: enabled, v1: Vec::new() })
    }

    /// The parent cgroup that groups all VMMs: cgroup2's `…/tvm` when there
    /// is one, else the first v1 hierarchy's.
    pub fn parent(&self) -> &Path {
        self.v2.as_deref().or_else(|| self.v1.first().map(|(_, p)| p.as_path())).expect("detect() ensures one")
    }

    /// Every `tvm` parent cgroup (cgroup2 and v1).
    pub fn parents(&self) -> Vec<&Path> {
        self.v2.iter().map(PathBuf::as_path).chain(self.v1.iter().map(|(_, p)| p.as_path())).collect()
    }

    /// Limits this host cannot enforce, for a warning; empty when every
    /// limit holds.
    pub fn missing_controllers(&self) -> Vec<&'static str> {
        CONTROLLERS
            .into_iter()
            .filter(|c| !self.v2_controllers.contains(c) && !self.v1.iter().any(|(v, _)| v == c))
            .collect()
    }

    /// One line for logs and `tvm doctor`: where each limit is enforced.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.v2 {
            let what = if self.v2_controllers.is_empty() {
                "grouping and kill".into()
            } else {
                self.v2_controllers.join(", ")
            };
            parts.push(format!("{} ({what})", p.display()));
        }
        for (c, p) in &self.v1 {
            parts.push(format!("{} ({c}, v1)", p.display()));
        }
        let missing = self.missing_controllers();
        if !missing.is_empty() {
            parts.push(format!("not enforced: {}", missing.join(", ")));
        }
        parts.join("; ")
    }

    /// Removes the VM cgroups of crashed owners in every hierarchy.
    pub fn reap(&self) -> CgroupReapReport {
        let mut total = CgroupReapReport::default();
        for parent in self.parents() {
            total.removed += reap(parent).removed;
        }
        total
    }

    /// The VM cgroups in every hierarchy (for tests, `tvm soak` and `tvm doctor`).
    pub fn vm_cgroups(&self) -> Vec<PathBuf> {
        self.parents().into_iter().flat_map(vm_cgroups).collect()
    }

    /// Creates the cgroups of VM `id`, owned by this process.
    pub fn create_vm(&self, id: &str, limits: VmmLimits) -> Result<VmCgroup, HostCgroupError> {
        let me = process_identity(std::process::id()).unwrap_or_else(|| format!("{} 0", std::process::id()));
        let name = format!("vm-{id}.{}", me.replace(' ', "."));
        // Owned from the first directory on: any failure below removes them all again.
        let mut cg = VmCgroup { dirs: Vec::new(), procs: Vec::new() };
        if let Some(parent) = &self.v2 {
            let path = parent.join(&name);
            cg.add(&path)?;
            let on = |c| self.v2_controllers.contains(&c);
            let err = |source| HostCgroupError::Vm { path: path.clone(), source };
            if on("memory") {
                write(&path, "memory.max", &limits.memory_bytes.to_string()).map_err(err)?;
                // Guest RAM must not be swapped out to escape the cap.
                optional(write(&path, "memory.swap.max", "0")).map_err(err)?;
            }
            if on("pids") {
                write(&path, "pids.max", &limits.pids.to_string()).map_err(err)?;
            }
            if let (true, Some(cpus)) = (on("cpu"), limits.cpus) {
                write(&path, "cpu.max", &format!("{} 100000", u64::from(cpus) * 100_000)).map_err(err)?;
            }
        }
        for (controller, parent) in &self.v1 {
            let path = parent.join(&name);
            cg.add(&path)?;
            let err = |source| HostCgroupError::Vm { path: path.clone(), source };
            match *controller {
                "memory" => {
                    write(&path, "memory.limit_in_bytes", &limits.memory_bytes.to_string()).map_err(err)?;
                    // memory+swap at the same value: no swap to escape into
                    // (the file exists only with swap accounting).
                    optional(write(&path, "memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string()))
                        .map_err(err)?;
                }
                "pids" => write(&path, "pids.max", &limits.pids.to_string()).map_err(err)?,
                "cpu" => {
                    if let Some(cpus) = limits.cpus {
                        write(&path, "cpu.cfs_period_us", "100000").map_err(err)?;
                        write(&path, "cpu.cfs_quota_us", &(u64::from(cpus) * 100_000).to_string()).map_err(err)?;
                    }
                }
                _ => {}
            }
        }
        Ok(cg)
    }
}

/// Creates a `tvm` parent cgroup if needed and checks it takes children.
fn make_parent(parent: &Path) -> io::Result<()> {
    match std::fs::create_dir(parent) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Writability of the parent is what matters: probe it now rather than
    // failing at the first VM.
    let probe = parent.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe)?;
    let _ = std::fs::remove_dir(&probe);
    Ok(())
}

/// A missing control file is fine (an optional kernel feature).
fn optional(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// This process's cgroup directory in the v1 hierarchy of `controller`,
/// from `/proc/self/mounts` and `/proc/self/cgroup` texts.
pub fn v1_cgroup(mounts: &str, own: &str, controller: &str) -> Option<PathBuf> {
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller)).then(|| f[1])
    })?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls.split(',').any(|c| c == controller).then_some(path)
    })?;
    Some(Path::new(mount).join(path.trim_start_matches('/')))
}

/// One VMM's cgroups (one per hierarchy in use). Dropping it kills
/// whatever is still inside and removes them.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<CString>,
}

impl VmCgroup {
    fn add(&mut self, path: &Path) -> Result<(), HostCgroupError> {
        let err = |source| HostCgroupError::Vm { path: path.to_path_buf(), source };
        let procs = cstring(&path.join("cgroup.procs")).map_err(err)?;
        std::fs::create_dir(path).map_err(err)?;
        self.dirs.push(path.to_path_buf());
        self.procs.push(procs);
        Ok(())
    }

    /// The main cgroup directory (cgroup2's when in use).
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// Every directory of this VM's cgroups.
    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// What a forked child needs to join these cgroups (moved into the
    /// `pre_exec` closure, which must own its data).
    pub fn joiner(&self) -> CgroupJoiner {
        CgroupJoiner { procs: self.procs.clone() }
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path().join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Reads a control file from whichever of the VM's cgroups has it
    /// (tests and diagnostics).
    pub fn read(&self, file: &str) -> io::Result<String> {
        let mut last = io::Error::from(io::ErrorKind::NotFound);
        for dir in &self.dirs {
            match std::fs::read_to_string(dir.join(file)) {
                Ok(t) => return Ok(t),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The `cgroup.procs` paths of a [`VmCgroup`], prepared for a forked child.
#[derive(Debug, Clone)]
pub struct CgroupJoiner {
    procs: Vec<CString>,
}

impl CgroupJoiner {
    /// Moves the calling process into the cgroups. Async-signal-safe (no
    /// allocation), for use between `fork` and `exec` of the VMM.
    pub fn join_self(&self) -> io::Result<()> {
        for procs in &self.procs {
            // SAFETY: `procs` is NUL-terminated; the fd is closed on every path.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let result = if written == 1 { Ok(()) } else { Err(io::Error::last_os_error()) };
                libc::close(fd);
                result?;
            }
        }
        Ok(())
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = destroy(dir) {
                warn!(cgroup = %dir.display(), error = %e, "could not remove host cgroup");
            }
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

    #[test]
    fn finds_this_process_v1_cgroup() {
        let mounts = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let own = "4:memory:/process_api/abc\n3:cpu,cpuacct:/\n0::/\n";
        assert_eq!(v1_cgroup(mounts, own, "memory"), Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")));
        assert_eq!(v1_cgroup(mounts, own, "cpu"), Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(v1_cgroup(mounts, own, "pids"), None);
        // "cpuacct" must not match "cpu".
        assert_eq!(v1_cgroup("cgroup /x cgroup rw,cpuacct 0 0\n", "2:cpuacct:/\n", "cpu"), None);
    }

    /// On a host with writable cgroups: a VM cgroup holds its process, the
    /// limits read back from whichever hierarchy enforces them, it is killed
    /// and removed on drop, and the reaper removes a dead owner's cgroup but
    /// not a live one's. Elsewhere it checks that detection fails cleanly
    /// (the VMs then run without host cgroups).
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
        let missing = cgs.missing_controllers();
        eprintln!("host cgroups: {}", cgs.describe());
        if !missing.contains(&"memory") {
            let max = cg.read("memory.max").or_else(|_| cg.read("memory.limit_in_bytes")).unwrap();
            assert_eq!(max.trim(), (512u64 << 20).to_string());
        }
        if !missing.contains(&"pids") {
            assert_eq!(cg.read("pids.max").unwrap().trim(), "16");
        }
        if !missing.contains(&"cpu") {
            let cpu = cg.read("cpu.max").or_else(|_| cg.read("cpu.cfs_quota_us")).unwrap();
            assert!(cpu.starts_with("100000"), "{cpu}");
        }
        // Every hierarchy holds the process.
        for dir in cg.paths() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert!(procs.lines().any(|l| l.trim() == child.id().to_string()), "{dir:?}");
        }
        let paths = cg.paths().to_vec();
        drop(cg);
        assert!(paths.iter().all(|p| !p.exists()), "removed on drop");
        let status = child.wait().unwrap();
        assert!(!status.success(), "the process inside was killed");

        // A cgroup of a dead owner (pid 999999999 never exists) is reaped,
        // one of a live owner (this test) is not.
        let dead: Vec<PathBuf> = cgs.parents().iter().map(|p| p.join("vm-unit2.999999999.1")).collect();
        for d in &dead {
            std::fs::create_dir(d).unwrap();
        }
        let live = cgs.create_vm("unit3", limits).unwrap();
        let report = cgs.reap();
        assert!(report.removed >= dead.len());
        assert!(dead.iter().all(|d| !d.exists()));
        assert!(live.paths().iter().all(|p| p.exists()));
        drop(live);
    }
}
