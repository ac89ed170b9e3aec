//! Least privilege for the VMM process, whichever backend it is (TVM's own
//! confinement; Firecracker's jailer is used on top when present, see
//! [`crate::backend::firecracker`]).
//!
//! The VMM is the one host process that parses guest-controlled data, so it
//! gets as little as the guest needs:
//! - **Files as descriptors.** Kernel and initramfs are copied into sealed
//!   memfds and the root image is opened read-only; the VMM inherits the
//!   descriptors ([`VmmFiles`]). QEMU opens none of TVM's paths and gets the
//!   agent channel as one end of a socketpair; Firecracker reopens the
//!   descriptors through `/proc/self/fd` and creates its sockets in a
//!   directory of its own ([`Confinement::prepare`]'s `own_dir`).
//! - **Its own user.** When `tvm` runs as root, each VMM runs as uid and
//!   gid `vmm_uid_base + pid`, unique among live VMs without any allocation
//!   state, with no supplementary groups except `/dev/kvm`'s under KVM.
//! - **Landlock.** The filesystem view is cut to what the VMM needs to
//!   start (system libraries and data read-only, plus the backend's
//!   [`HostPath`]s; `/proc` and `/sys` read-only; `/dev/null`,
//!   `/dev/urandom`, `/dev/kvm`), all TCP bind/connect is denied, and it may
//!   signal no process outside itself. Kernels without Landlock (before
//!   5.13) start the VMM without it; `tvm doctor` says so.
//!
//! Everything run between `fork` and `exec` ([`Confinement::enter`]) is a
//! plain system call on data prepared beforehand: async-signal-safe.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};

use crate::spec::{AccelKind, VmSpec};

/// The Landlock ABI whose rights TVM asks for (Linux 6.12: signal and
/// abstract-socket scoping); older kernels enforce the subset they know.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Why a VMM cannot be confined as configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfineVmmError {
    /// A file the VMM needs could not be opened or copied.
    #[error("cannot open {path} for the VMM")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent socketpair or a memfd could not be created.
    #[error("cannot create the VMM's descriptors")]
    Descriptors(#[source] io::Error),
    /// The Landlock ruleset could not be built.
    #[error("cannot build the VMM's Landlock ruleset: {0}")]
    Landlock(String),
    /// `vmm_uid_base` leaves no room for pids.
    #[error("vmm_uid_base {0} is too large (at most {max})", max = tvm_config::MAX_VMM_UID_BASE)]
    UidBase(u32),
}

/// A host path a backend's VMM needs beyond the system files every VMM gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    /// File or directory (a directory covers everything beneath it).
    pub path: PathBuf,
    /// What the VMM may do there.
    pub access: PathAccess,
}

/// Access a [`HostPath`] grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Read (and execute) files, list directories.
    Read,
    /// Also create, write and remove files, Unix sockets and FIFOs beneath a directory.
    ReadWrite,
}

impl HostPath {
    /// Read-only access to `path`.
    pub fn read(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), access: PathAccess::Read }
    }

    /// Read-write access beneath the directory `path`.
    pub fn read_write(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), access: PathAccess::ReadWrite }
    }
}

/// The install prefix of `binary` (`/usr` for `/usr/bin/qemu-*`): VMMs load
/// modules and firmware relative to their binary, so the whole prefix is
/// readable.
pub fn install_prefix(binary: &Path) -> Option<PathBuf> {
    let q = crate::cache::which_path(binary).and_then(|q| std::fs::canonicalize(q).ok())?;
    q.parent()?.parent().map(Path::to_path_buf)
}

/// The descriptors a VMM inherits instead of paths.
#[derive(Debug)]
pub struct VmmFiles {
    kernel: OwnedFd,
    initrd: Option<OwnedFd>,
    rootfs: Option<OwnedFd>,
    agent: Option<OwnedFd>,
    /// More descriptors for backend features (templates: the QMP channel,
    /// the incoming state file), named on the command line by number.
    extra: Vec<OwnedFd>,
    /// The number the root image must have in the VMM, when a saved VM
    /// names it by that number (Firecracker snapshots: `/proc/self/fd/N`).
    rootfs_pin: Option<RawFd>,
}

/// How a VMM's command line or API names the inherited descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmIo {
    /// The kernel (`/proc/self/fd/N` of a memfd).
    pub kernel: String,
    /// The initramfs (`/proc/self/fd/N` of a memfd).
    pub initrd: Option<String>,
    /// Descriptor of the read-only root image.
    pub rootfs_fd: Option<RawFd>,
    /// Descriptor of the VMM's end of the agent channel, if it is inherited.
    pub agent_fd: Option<RawFd>,
}

impl VmmFiles {
    /// Opens what `spec` names. `agent` is the VMM's end of the agent
    /// channel when the backend hands it over as a descriptor.
    pub fn open(spec: &VmSpec, agent: Option<OwnedFd>) -> Result<Self, ConfineVmmError> {
        let kernel = sealed_copy(&spec.kernel, "tvm-kernel")?;
        let initrd = spec.initrd.as_deref().map(|p| sealed_copy(p, "tvm-initrd")).transpose()?;
        let rootfs = spec
            .rootfs
            .as_deref()
            .map(|p| {
                std::fs::File::open(p)
                    .map(OwnedFd::from)
                    .map_err(|source| ConfineVmmError::Open { path: p.to_path_buf(), source })
            })
            .transpose()?;
        Ok(Self { kernel, initrd, rootfs, agent, extra: Vec::new(), rootfs_pin: None })
    }

    /// Gives the root image descriptor number `at` in the VMM (duplicated
    /// there before `exec`), so that a snapshot naming `/proc/self/fd/<at>`
    /// finds the image in every VMM restored from it. Applies only to
    /// confined launches ([`Confinement`] does the duplication).
    pub fn pin_rootfs(&mut self, at: RawFd) {
        self.rootfs_pin = Some(at);
    }

    /// `(descriptor, number in the VMM)` of a pinned root image.
    fn pins(&self) -> Option<(RawFd, RawFd)> {
        Some((self.rootfs.as_ref()?.as_raw_fd(), self.rootfs_pin?))
    }

    /// Adds descriptors the VMM inherits as they are (same numbers in the
    /// VMM, which the caller has already written into its arguments).
    pub fn inherit(&mut self, fds: impl IntoIterator<Item = OwnedFd>) {
        self.extra.extend(fds);
    }

    /// The command-line names of the descriptors.
    pub fn io(&self) -> VmmIo {
        let proc_path = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_raw_fd());
        VmmIo {
            kernel: proc_path(&self.kernel),
            initrd: self.initrd.as_ref().map(proc_path),
            rootfs_fd: self.rootfs.as_ref().map(|f| f.as_raw_fd()),
            agent_fd: self.agent.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    fn raw_fds(&self) -> Vec<RawFd> {
        [Some(&self.kernel), self.initrd.as_ref(), self.rootfs.as_ref(), self.agent.as_ref()]
            .into_iter()
            .flatten()
            .chain(&self.extra)
            .map(|f| f.as_raw_fd())
            .collect()
    }
}

/// A read-only, sealed in-memory copy of `path`: the VMM reopens it through
/// `/proc/self/fd` as its own user, whatever the cache's permissions, and
/// neither it nor anyone else can change it underneath a booting guest.
fn sealed_copy(path: &Path, name: &str) -> Result<OwnedFd, ConfineVmmError> {
    let data = std::fs::read(path).map_err(|source| ConfineVmmError::Open { path: path.to_path_buf(), source })?;
    let name = CString::new(name).expect("static name");
    // SAFETY: memfd_create with a valid C string; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(ConfineVmmError::Descriptors(io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(&data).map_err(ConfineVmmError::Descriptors)?;
    let fd = OwnedFd::from(file);
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: plain fcntl/fchmod on an fd we own.
    unsafe {
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 || libc::fchmod(fd.as_raw_fd(), 0o444) != 0 {
            return Err(ConfineVmmError::Descriptors(io::Error::last_os_error()));
        }
    }
    Ok(fd)
}

/// Everything the forked VMM child does to itself before `exec`, prepared
/// in the parent.
#[derive(Debug)]
pub struct Confinement {
    inherit: Vec<RawFd>,
    /// A directory handed to the VMM's uid (`fchown` before the uid change;
    /// also in `inherit`). Owned by the caller until the VMM is spawned.
    own_dir: Option<RawFd>,
    /// `Some(base)`: become uid/gid `base + pid`.
    uid_base: Option<u32>,
    /// The one supplementary group kept (`/dev/kvm`'s owner group).
    kvm_gid: Option<libc::gid_t>,
    landlock: Option<OwnedFd>,
    /// `(descriptor, number)`: duplicated to that number in the child.
    pin: Option<(RawFd, RawFd)>,
}

/// What confinement this host gives VMMs (for logs and `tvm doctor`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfinementReport {
    /// VMMs run as a per-VM uid.
    pub own_user: bool,
    /// The kernel's Landlock ABI version (0: none).
    pub landlock_abi: i32,
}

impl ConfinementReport {
    /// What holds here, as a settings-independent probe.
    pub fn detect(uid_base: u32) -> Self {
        Self { own_user: uid_base != 0 && nix::unistd::geteuid().is_root(), landlock_abi: landlock_abi() }
    }

    /// One line for `tvm doctor`.
    pub fn describe(&self) -> String {
        let user = if self.own_user { "own uid per VM" } else { "invoking user's uid (tvm is not root)" };
        let ll = if self.landlock_abi > 0 {
            format!("Landlock ABI {} (files, TCP, signals)", self.landlock_abi)
        } else {
            "no Landlock in this kernel: files limited by uid only".into()
        };
        format!("fds only, {user}, {ll}")
    }
}

/// The running kernel's Landlock ABI version, 0 when unsupported.
pub fn landlock_abi() -> i32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION takes no attribute pointer.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32 /* VERSION */)
    };
    v.max(0) as i32
}

impl Confinement {
    /// Prepares the confinement of a VMM that holds `files` and may reach
    /// `paths` (its [`crate::backend::Vmm::host_paths`]). `own_dir`, an open
    /// directory, is inherited and becomes the VMM's own (its uid owns it)
    /// so it can create its sockets there; it should be among `paths` with
    /// [`PathAccess::ReadWrite`]. The caller keeps `files` and `own_dir`
    /// open until the VMM is spawned.
    ///
    /// # Errors
    /// [`ConfineVmmError::UidBase`] for an out-of-range `uid_base`,
    /// [`ConfineVmmError::Landlock`] if the ruleset cannot be built.
    pub fn prepare(
        files: Option<&VmmFiles>,
        paths: &[HostPath],
        own_dir: Option<&OwnedFd>,
        accel: AccelKind,
        uid_base: u32,
    ) -> Result<Self, ConfineVmmError> {
        if uid_base > tvm_config::MAX_VMM_UID_BASE {
            return Err(ConfineVmmError::UidBase(uid_base));
        }
        let mut own_user = uid_base != 0 && nix::unistd::geteuid().is_root();
        let kvm_gid = match accel {
            AccelKind::Kvm if own_user => {
                use std::os::unix::fs::MetadataExt;
                // The per-VM uid reaches /dev/kvm through its group (Debian's
                // udev rule: 0660 root:kvm). A device only root may open
                // leaves the VMM with the invoking uid rather than without KVM.
                match std::fs::metadata("/dev/kvm") {
                    Ok(m) if m.mode() & 0o060 == 0o060 => Some(m.gid()),
                    _ => {
                        own_user = false;
                        None
                    }
                }
            }
            _ => None,
        };
        let landlock = if landlock_abi() > 0 { landlock_ruleset(paths, accel)? } else { None };
        let own_dir = own_dir.map(|d| d.as_raw_fd());
        let mut inherit = files.map(VmmFiles::raw_fds).unwrap_or_default();
        inherit.extend(own_dir);
        let pin = files.and_then(VmmFiles::pins);
        if let Some((from, at)) = pin {
            // Another inherited descriptor already has that number (a process
            // with ~1000 files open): the VMM would lose it.
            if inherit.iter().any(|&fd| fd == at && fd != from) {
                return Err(ConfineVmmError::Descriptors(io::Error::other(format!(
                    "descriptor {at}, where the root image must be, is another inherited file"
                ))));
            }
        }
        Ok(Self { inherit, own_dir, uid_base: own_user.then_some(uid_base), kvm_gid, landlock, pin })
    }

    /// Step one in the child: keep the VMM's descriptors across `exec` and
    /// give up root for the per-VM uid. Async-signal-safe.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: fcntl/getpid/setgroups/setres[ug]id are plain system calls
        // on values prepared before fork; nothing allocates.
        unsafe {
            for &fd in &self.inherit {
                // The descriptors are close-on-exec in the parent, so no other
                // child ever inherits them; only this one clears the flag.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // dup2 leaves the copy without close-on-exec: it is inherited.
            if let Some((from, at)) = self.pin {
                if from != at && libc::dup2(from, at) != at {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(base) = self.uid_base {
                let id = base + libc::getpid() as u32;
                let groups: &[libc::gid_t] = match &self.kvm_gid {
                    Some(g) => std::slice::from_ref(g),
                    None => &[],
                };
                if let Some(dir) = self.own_dir {
                    if libc::fchown(dir, id, id) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(id, id, id) != 0
                    || libc::setresuid(id, id, id) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Step two, last before `exec` (after anything that needs the
    /// filesystem): no new privileges and the Landlock domain. Async-signal-safe.
    pub fn lock(&self) -> io::Result<()> {
        // SAFETY: prctl and landlock_restrict_self on a prepared ruleset fd.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(rs) = &self.landlock {
                if libc::syscall(libc::SYS_landlock_restrict_self, rs.as_raw_fd(), 0u32) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

/// The Landlock ruleset of one VMM: read-only system files it needs to start,
/// the backend's `paths`, the few devices, no TCP, no signals out.
fn landlock_ruleset(paths: &[HostPath], accel: AccelKind) -> Result<Option<OwnedFd>, ConfineVmmError> {
    let err = |e: &dyn std::fmt::Display| ConfineVmmError::Landlock(e.to_string());
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi);
    let read_file = AccessFs::ReadFile;
    let dev_rw = AccessFs::ReadFile | AccessFs::WriteFile;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::from_all(abi))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let system = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache"];
    let mut rules: Vec<HostPath> = system.iter().map(HostPath::read).collect();
    // /proc and /sys: the VMM reads its own status and the host's CPU and
    // NUMA layout. Other processes' /proc entries stay closed by the uid.
    rules.extend(["/proc", "/sys"].map(HostPath::read));
    rules.extend(paths.iter().cloned());
    for rule in rules.iter().filter(|r| r.path.exists()) {
        let fd = PathFd::new(&rule.path).map_err(|e| err(&e))?;
        let access = match (rule.access, rule.path.is_dir()) {
            (PathAccess::Read, true) => read,
            (PathAccess::Read, false) => read_file.into(),
            // Sockets, FIFOs and files beneath the VMM's own directory.
            (PathAccess::ReadWrite, true) => {
                read | AccessFs::WriteFile
                    | AccessFs::MakeSock
                    | AccessFs::MakeFifo
                    | AccessFs::MakeReg
                    | AccessFs::MakeDir
                    | AccessFs::RemoveFile
                    | AccessFs::RemoveDir
                    | AccessFs::Truncate
            }
            (PathAccess::ReadWrite, false) => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate,
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(|e| err(&e))?;
    }
    let mut devices = vec![("/dev/null", dev_rw), ("/dev/urandom", read_file.into())];
    if accel == AccelKind::Kvm {
        // The KVM API is ioctls on /dev/kvm and the fds it returns.
        devices.push(("/dev/kvm", dev_rw | AccessFs::IoctlDev));
    }
    for (dev, access) in devices {
        if let Ok(fd) = PathFd::new(dev) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(|e| err(&e))?;
        }
    }
    // No rule for the kernel and initramfs memfds: they live on the kernel's
    // internal shmem mount, which Landlock neither restricts nor takes rules
    // for, so the VMM's reopen through /proc/self/fd works as it is.
    Ok(ruleset.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_copies_are_sealed_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"kernel bytes").unwrap();
        let fd = sealed_copy(&f, "t").unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert_eq!(std::fs::read(&path).unwrap(), b"kernel bytes");
        // Even root cannot write through a write seal.
        let w = std::fs::OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(b"x"));
        assert!(w.is_err());
        assert!(matches!(sealed_copy(&dir.path().join("missing"), "t"), Err(ConfineVmmError::Open { .. })));
    }

    #[test]
    fn io_names_inherited_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["k", "i", "r"] {
            std::fs::write(dir.path().join(n), n).unwrap();
        }
        let spec = VmSpec {
            kernel: dir.path().join("k"),
            initrd: Some(dir.path().join("i")),
            rootfs: Some(dir.path().join("r")),
            memory_mib: 64,
            vcpus: 1,
            accel: AccelKind::Tcg,
            agent: Some(crate::spec::AgentTransport::VirtioSerial),
            debug: false,
            extra_cmdline: None,
        };
        let (_ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let files = VmmFiles::open(&spec, Some(theirs.into())).unwrap();
        let io = files.io();
        assert!(io.kernel.starts_with("/proc/self/fd/"));
        assert_eq!(files.raw_fds().len(), 4);
        assert!(io.rootfs_fd.is_some() && io.agent_fd.is_some());
        let paths = [HostPath::read("/usr"), HostPath::read_write(dir.path())];
        let own: OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
        let c = Confinement::prepare(Some(&files), &paths, Some(&own), AccelKind::Tcg, 2_000_000_000).unwrap();
        assert_eq!(c.inherit.len(), 5, "the four files and the own dir");
        assert_eq!(c.own_dir, Some(own.as_raw_fd()));
        assert_eq!(c.landlock.is_some(), landlock_abi() > 0);
        assert!(matches!(
            Confinement::prepare(Some(&files), &[], None, AccelKind::Tcg, u32::MAX),
            Err(ConfineVmmError::UidBase(_))
        ));
    }
}
