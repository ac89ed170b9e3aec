//! Confinement of one stage: a cgroup v2 group for memory, process count and
//! CPU accounting, plus what the child does to itself between `fork` and
//! `exec` (join the cgroup, rlimits, drop root, drop every capability,
//! install the seccomp filter; see [`crate::harden`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgid, setgroups, setsid, setuid, Gid, Uid};
use tvm_protocol::Limits;

use crate::error::Error;

/// Where cgroup2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The unprivileged user every job runs as (`runner` in the image).
pub const RUNNER_UID: u32 = 1000;
/// Its group.
pub const RUNNER_GID: u32 = 1000;
/// Highest RLIMIT_NOFILE the kernel accepts by default (`fs.nr_open`);
/// asking for more would make `setrlimit` fail in the child.
const MAX_OPEN_FILES: u64 = 1 << 20;

/// Delegates the controllers the stages use to child cgroups. The agent
/// itself stays in the root cgroup, where the no-internal-processes rule
/// does not apply.
pub fn enable_controllers() -> Result<(), Error> {
    let control = Path::new(CGROUP_ROOT).join("cgroup.subtree_control");
    // memory and pids enforce limits; cpu only adds scheduling knobs
    // (cpu.stat exists without it), so a kernel lacking it is tolerated.
    if std::fs::write(&control, "+memory +pids +cpu").is_ok() {
        return Ok(());
    }
    for (wanted, required) in [("+memory", true), ("+pids", true), ("+cpu", false)] {
        match std::fs::write(&control, wanted) {
            Err(e) if required => return Err(Error::EnableControllers(wanted, e)),
            _ => {}
        }
    }
    Ok(())
}

/// A stage's cgroup, removed again by [`Cgroup::remove`].
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/<name>` with the stage's limits.
    pub fn create(name: &str, limits: &Limits) -> Result<Self, Error> {
        let path = Path::new(CGROUP_ROOT).join(name);
        std::fs::create_dir(&path).map_err(|e| Error::CreateCgroup(path.clone(), e))?;
        let cg = Self { path };
        cg.write("memory.max", &limits.memory_bytes.to_string())?;
        // Absent when the kernel has no swap support, which is just as good.
        match std::fs::write(cg.path.join("memory.swap.max"), "0") {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::WriteCgroup(cg.path.join("memory.swap.max"), e));
            }
            _ => {}
        }
        // One OOM kill takes the whole stage down: the verdict is memory
        // limit exceeded either way, and a half-killed process tree (say, a
        // shell whose child died) would otherwise run on until the wall limit.
        cg.write("memory.oom.group", "1")?;
        cg.write("pids.max", &pids_max(limits.pids))?;
        Ok(cg)
    }

    /// SIGKILLs every process in the cgroup, including ones that forked
    /// away from the main process or called `setsid`.
    pub fn kill(&self) -> Result<(), Error> {
        self.write("cgroup.kill", "1")
    }

    /// Sends `signal` to every process in the cgroup. Processes that are
    /// gone by the time it arrives are skipped; one forked meanwhile is
    /// missed, which is why a kill through [`Cgroup::kill`] always follows.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), Error> {
        let procs = self.read("cgroup.procs")?;
        // Never 0 or negative: kill(2) would read those as process groups or "everyone".
        for pid in procs.lines().filter_map(|l| l.trim().parse::<libc::pid_t>().ok()).filter(|p| *p > 0) {
            // SAFETY: kill with integer arguments. The pid cannot have been
            // reused: the agent is PID 1 and reaps every exited process itself.
            unsafe { libc::kill(pid, signal) };
        }
        Ok(())
    }

    /// Waits at most `timeout` for the cgroup to hold no process; `Ok(true)`
    /// once it is empty. Sleeps on the kernel's change notification of
    /// `cgroup.events` (`POLLPRI`), so it returns as the last process leaves,
    /// not at the next tick of a polling loop.
    ///
    /// # Errors
    /// [`Error::ReadCgroup`] when `cgroup.events` cannot be opened or read.
    pub fn wait_empty(&self, timeout: std::time::Duration) -> Result<bool, Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let path = self.path.join("cgroup.events");
        let file = std::fs::File::open(&path).map_err(|e| Error::ReadCgroup(path.clone(), e))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            // Each read from offset 0 re-arms the notification (kernfs
            // compares the file's event count with the one seen at the last
            // read), so a change between this read and the poll is not lost.
            let n = file.read_at(&mut buf, 0).map_err(|e| Error::ReadCgroup(path.clone(), e))?;
            let text = String::from_utf8_lossy(&buf[..n]);
            if keyed_value(&text, "populated") == Some(0) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
            // EINTR or a spurious wake-up: the loop reads again.
            let _ = poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX));
        }
    }

    /// Total CPU time of every process that ever ran in the cgroup.
    pub fn cpu_usage_us(&self) -> Result<u64, Error> {
        self.read_key("cpu.stat", "usage_usec")
    }

    /// How many times the OOM killer fired inside the cgroup.
    pub fn oom_kills(&self) -> Result<u64, Error> {
        let text = self.read("memory.events")?;
        Ok(oom_kills(&text))
    }

    /// Whether the group is held at its memory limit `limit` (bytes) by
    /// memory it cannot give back ([`held_at_limit`]). Unreadable files
    /// count as not at the limit.
    pub fn held_at_memory_limit(&self, limit: u64) -> bool {
        let (Ok(events), Ok(stat), Ok(current)) =
            (self.read("memory.events"), self.read("memory.stat"), self.read("memory.current"))
        else {
            return false;
        };
        current.trim().parse().is_ok_and(|current| held_at_limit(&events, &stat, current, limit))
    }

    /// Peak memory use; 0 on kernels before 5.19, which lack memory.peak.
    pub fn memory_peak(&self) -> u64 {
        self.read("memory.peak").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// The file a process writes its PID into to join.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Removes the (empty) cgroup.
    pub fn remove(self) -> Result<(), Error> {
        std::fs::remove_dir(&self.path).map_err(|e| Error::WriteCgroup(self.path.clone(), e))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), Error> {
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(|e| Error::WriteCgroup(path, e))
    }

    fn read(&self, file: &str) -> Result<String, Error> {
        let path = self.path.join(file);
        std::fs::read_to_string(&path).map_err(|e| Error::ReadCgroup(path, e))
    }

    fn read_key(&self, file: &str, key: &str) -> Result<u64, Error> {
        let text = self.read(file)?;
        keyed_value(&text, key).ok_or_else(|| {
            let missing = io::Error::new(io::ErrorKind::InvalidData, format!("no {key} field"));
            Error::ReadCgroup(self.path.join(file), missing)
        })
    }
}

/// The value of `key` in a cgroup "flat keyed" file (`key value` lines), as
/// in `cpu.stat`, `memory.events`, `cgroup.events`.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Whether (and how often) the OOM killer acted, from `memory.events`: kills
/// of single processes plus, with `memory.oom.group` set, group kills.
pub fn oom_kills(memory_events: &str) -> u64 {
    let single = keyed_value(memory_events, "oom_kill").unwrap_or(0);
    let group = keyed_value(memory_events, "oom_group_kill").unwrap_or(0);
    single + group
}

/// Whether a group whose time ran out was really stopped by its memory
/// limit: its usage reached the limit (`memory.events` `max` > 0) and what
/// it holds that reclaim cannot take back (everything but the clean page
/// cache: anonymous memory, tmpfs/shmem, kernel memory) is within an
/// eighth of the limit. Such a program (Ruby's heap growing in small
/// steps is the common case) does not die at once: each allocation makes
/// the kernel reclaim the group's own page cache, its interpreter's code
/// included, which is re-read at the next use, so it crawls until the time
/// limit instead of meeting the OOM killer. Judges call that memory limit
/// exceeded: the limit was reached first, and only cache kept it alive.
/// `memory_stat` is `memory.stat`, `current` `memory.current`, both bytes.
/// The eighth is what an interpreter's own code and data pages in the
/// cache come to (Ruby: 2.8 MB left of 9.4 MB at a 40 MiB limit, measured).
pub fn held_at_limit(memory_events: &str, memory_stat: &str, current: u64, limit: u64) -> bool {
    if keyed_value(memory_events, "max").unwrap_or(0) == 0 {
        return false;
    }
    let file = keyed_value(memory_stat, "file").unwrap_or(0);
    // tmpfs pages are in `file` too, but without swap they cannot be reclaimed.
    let shmem = keyed_value(memory_stat, "shmem").unwrap_or(0);
    let held = current.saturating_sub(file.saturating_sub(shmem));
    held >= limit - limit / 8
}

/// The `pids.max` value for a limit: the kernel refuses numbers above
/// PID_MAX_LIMIT, so anything that large (a host saying "unlimited" with
/// `u64::MAX`) becomes "max".
pub fn pids_max(pids: u64) -> String {
    const PID_MAX_LIMIT: u64 = 4 * 1024 * 1024;
    if pids >= PID_MAX_LIMIT {
        "max".into()
    } else {
        pids.to_string()
    }
}

/// RLIMIT_CPU (soft, hard) in seconds for a CPU limit in milliseconds. The
/// cgroup poll enforces the precise limit; the rlimit is a backstop one
/// second later, with SIGKILL one second after the SIGXCPU.
pub fn cpu_rlimit_secs(cpu_ms: u64) -> (u64, u64) {
    let soft = cpu_ms.div_ceil(1000).saturating_add(1);
    (soft, soft.saturating_add(1))
}

/// Everything the child needs between `fork` and `exec`, prepared in the
/// parent: after a fork in a threaded process only async-signal-safe calls
/// are allowed, so nothing in [`ChildSetup::apply`] may allocate.
#[derive(Debug)]
pub struct ChildSetup {
    cgroup_procs: CString,
    rlimits: [(Resource, u64, u64); 5],
    seccomp: &'static [seccompiler::BpfProgram],
}

impl ChildSetup {
    /// Prepares the setup for a stage confined in `cgroup`.
    pub fn new(cgroup: &Cgroup, limits: &Limits) -> Result<Self, Error> {
        let procs = cgroup.procs_file();
        let cgroup_procs = CString::new(procs.as_os_str().as_bytes())
            .map_err(|e| Error::WriteCgroup(procs.clone(), io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let (cpu_soft, cpu_hard) = cpu_rlimit_secs(limits.cpu_ms);
        let files = limits.open_files.min(MAX_OPEN_FILES);
        Ok(Self {
            cgroup_procs,
            rlimits: [
                (Resource::RLIMIT_CPU, cpu_soft, cpu_hard),
                (Resource::RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
                (Resource::RLIMIT_NOFILE, files, files),
                (Resource::RLIMIT_CORE, 0, 0),
                // The stack may grow as far as memory does, as on the judges
                // (Codeforces, AtCoder, DMOJ), instead of the kernel's 8 MiB:
                // no rlimit, so the stage's memory limit bounds it like any
                // other memory (a deep recursion within it passes, one beyond
                // it is `memory_limit_exceeded`). Not a finite RLIMIT_STACK of
                // the memory size: Ruby pre-faults its whole main-thread stack
                // up to a finite rlimit (`reserve_stack`, with stack-clash
                // probes), which would spend the memory limit at startup.
                (Resource::RLIMIT_STACK, libc::RLIM_INFINITY, libc::RLIM_INFINITY),
            ],
            seccomp: crate::harden::stage_filters()?,
        })
    }

    /// Runs in the forked child, still as root. Order matters: the cgroup is
    /// joined first so every later fork is counted; root is dropped after
    /// everything that needs it (cgroup, limits, bounding set); the seccomp
    /// filter comes last, as the runner, right before `exec`.
    pub fn apply(&self) -> io::Result<()> {
        write_file(&self.cgroup_procs, b"0")?;
        // The agent runs with oom_score_adj -1000 and children inherit it; an
        // unkillable job would leave the cgroup OOM killer with no victim.
        write_file(c"/proc/self/oom_score_adj", b"0")?;
        // Likewise the agent's raised CPU priority (so a busy job cannot
        // starve its supervisor): the job gets the normal one.
        // SAFETY: setpriority with integer arguments.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // A session of its own: no controlling terminal, and job control
        // signals from the job stay within the job.
        setsid()?;
        for &(resource, soft, hard) in &self.rlimits {
            setrlimit(resource, soft, hard)?;
        }
        crate::harden::drop_bounding_and_ambient()?;
        // Set-uid binaries in the image must not hand root back.
        nix::sys::prctl::set_no_new_privs()?;
        setgroups(&[])?;
        setgid(Gid::from_raw(RUNNER_GID))?;
        setuid(Uid::from_raw(RUNNER_UID))?;
        crate::harden::clear_capability_sets()?;
        crate::harden::install(self.seccomp)
    }
}

/// open/write/close with no allocation, for use between fork and exec.
fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated, `data` is a live buffer, and the fd
    // is closed on every path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        let result = if written == data.len() as isize { Ok(()) } else { Err(io::Error::last_os_error()) };
        libc::close(fd);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_stat() {
        let text = "usage_usec 1523410\nuser_usec 1400000\nsystem_usec 123410\nnr_periods 0\n";
        assert_eq!(keyed_value(text, "usage_usec"), Some(1_523_410));
        assert_eq!(keyed_value(text, "system_usec"), Some(123_410));
        assert_eq!(keyed_value(text, "usage"), None);
        assert_eq!(keyed_value("", "usage_usec"), None);
    }

    #[test]
    fn parses_memory_events() {
        let calm = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n";
        assert_eq!(oom_kills(calm), 0);
        let killed = "low 0\nhigh 0\nmax 1733\noom 1\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(oom_kills(killed), 2);
        // Kernels before 5.19 have no oom_group_kill line.
        assert_eq!(oom_kills("max 3\noom 1\noom_kill 1\n"), 1);
        // `max` counts limit hits, not kills.
        assert_eq!(oom_kills("max 5\noom 0\noom_kill 0\n"), 0);
    }

    #[test]
    fn a_group_held_at_its_memory_limit_is_told_from_one_with_room() {
        const MIB: u64 = 1 << 20;
        let hit = "low 0\nhigh 0\nmax 39\noom 0\noom_kill 0\n";
        let never = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n";
        // Measured: Ruby growing an array under a 40 MiB limit, its page cache
        // shrinking from 9.4 MB as the heap grows (memory.current, memory.stat).
        let ruby = format!("anon {}\nfile {}\nkernel 500000\nshmem 0\n", 39_051_264, 2_826_240);
        assert!(held_at_limit(hit, &ruby, 41_897_984, 40 * MIB));
        // The same numbers without a limit hit: not at the limit.
        assert!(!held_at_limit(never, &ruby, 41_897_984, 40 * MIB));
        // At the limit only through page cache (a runtime that read many
        // files, then loops): time limit, not memory.
        let cache = format!("anon {}\nfile {}\nshmem 0\n", 20 * MIB, 44 * MIB);
        assert!(!held_at_limit(hit, &cache, 64 * MIB, 64 * MIB));
        // tmpfs files cannot be reclaimed without swap: they count as held.
        let tmpfs = format!("anon {}\nfile {}\nshmem {}\n", 4 * MIB, 60 * MIB, 58 * MIB);
        assert!(held_at_limit(hit, &tmpfs, 64 * MIB, 64 * MIB));
        // Unparsable or empty files never turn a verdict.
        assert!(!held_at_limit("", "", 64 * MIB, 64 * MIB));
    }

    #[test]
    fn parses_cgroup_events() {
        assert_eq!(keyed_value("populated 1\nfrozen 0\n", "populated"), Some(1));
        assert_eq!(keyed_value("populated 0\nfrozen 0\n", "populated"), Some(0));
    }

    #[test]
    fn huge_pid_limits_mean_no_limit() {
        assert_eq!(pids_max(64), "64");
        assert_eq!(pids_max(u64::MAX), "max");
        assert_eq!(pids_max(4 * 1024 * 1024), "max");
    }

    #[test]
    fn cpu_rlimit_is_a_backstop_above_the_limit() {
        assert_eq!(cpu_rlimit_secs(1000), (2, 3));
        assert_eq!(cpu_rlimit_secs(1001), (3, 4));
        assert_eq!(cpu_rlimit_secs(0), (1, 2));
        let (soft, hard) = cpu_rlimit_secs(u64::MAX);
        assert!(hard > soft, "no overflow");
    }
}
