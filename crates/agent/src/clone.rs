//! VM templates, guest side: the warm-up run while a template is built, and
//! what makes each VM restored from a template unique.
//!
//! Every clone of a template starts with the same kernel RNG state and the
//! same wall clock (both saved with the template). Before any stage runs, the
//! host's fresh entropy is added to the input pool and the CRNG is forced to
//! reseed from it, and the clock is set to the host's: the order Firecracker's
//! "random for clones" guidance prescribes (reseed before user code runs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tvm_protocol::{Command, GuestMessage, HostMessage, Stage, Uniqueness, MAX_ENTROPY_BYTES};

use crate::error::Error;
use crate::log::debug;
use crate::sandbox::{self, RUNNER_GID, RUNNER_UID};
use crate::stage::{self, StageSpec, WORKDIR};
use crate::transport::Link;

/// Size of the throwaway work dir the warm-up runs in.
const WARMUP_WORKDIR: &str = "size=16m,mode=0755";

/// The cgroup the warm-up runs in (removed afterwards, as any stage's).
const WARMUP_CGROUP: &str = "warmup";

/// Scratch file systems whose contents the warm-up may have left behind.
pub(crate) const SCRATCH: [&str; 2] = ["/tmp", "/dev/shm"];

// `<linux/random.h>`: RNDADDENTROPY = _IOW('R', 0x03, int[2]), RNDRESEEDCRNG = _IO('R', 0x07).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    u8
);
nix::ioctl_none_bad!(rnd_reseed_crng, nix::request_code_none!(b'R', 0x07));

/// Waits for the job, serving the template messages that may come first:
/// `Prewarm` (template build) and `Resume` (right after a restore). Each is
/// answered; anything the host sends is bounded by the frame limit. The
/// job's entropy and clock are applied before it is returned: failing that
/// is fatal for a restored VM, and only logged for a cold-booted one.
pub fn await_job(link: &mut Link) -> Result<tvm_protocol::Job, Error> {
    let mut restored = false;
    let mut warmed = false;
    loop {
        let msg = match link.receive() {
            Ok(msg) => msg,
            // A template VM's link ends here when Firecracker restores it
            // (it resets vsock connections): the clone's host connects again
            // and sends `Resume`. A QEMU template keeps its virtio port.
            Err(e @ (Error::HostClosed | Error::ReceiveJob(_))) if warmed => {
                if link.reaccept()? {
                    continue;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match msg {
            HostMessage::Run(job) => {
                crate::trace::begin();
                link.stop_listening();
                if let Some(fresh) = &job.uniqueness {
                    match make_unique(fresh) {
                        Ok(()) => {}
                        // A clone must not run anything with its template's RNG state.
                        Err(e) if restored => return Err(e),
                        // A cold-booted kernel seeded itself; the host's bytes only add to it.
                        Err(e) => debug!("not reseeded from the host: {}", crate::error::chain(&e)),
                    }
                    crate::trace::mark("unique");
                }
                return Ok(job);
            }
            HostMessage::Resume(fresh) => {
                restored = true;
                make_unique(&fresh)?;
                debug!("resumed from a template; reseeded and clock set");
                link.send(&crate::ready())?;
            }
            HostMessage::Prewarm(command) => {
                let report = prewarm(&command)?;
                link.send(&report)?;
                warmed = true;
            }
            // Session input belongs to a running job; before one there is nothing to feed.
            HostMessage::Stdin { .. } | HostMessage::StdinEof | HostMessage::Signal { .. } => {
                debug!("session input before the job, ignored");
            }
        }
    }
}

/// Adds the host's entropy to the kernel's input pool, forces the CRNG to
/// reseed (so `/dev/urandom` and `getrandom` diverge from every other clone
/// at once, not at the next scheduled reseed), and sets the wall clock.
///
/// # Errors
/// [`Error::InvalidJob`] for oversized entropy, [`Error::Reseed`] when an
/// ioctl fails, [`Error::SetClock`] when `clock_settime` does.
pub fn make_unique(fresh: &Uniqueness) -> Result<(), Error> {
    if fresh.entropy.len() > MAX_ENTROPY_BYTES {
        return Err(Error::InvalidJob(format!("{} entropy bytes, at most {MAX_ENTROPY_BYTES}", fresh.entropy.len())));
    }
    if !fresh.entropy.is_empty() {
        let random =
            File::options().write(true).open("/dev/random").map_err(|e| Error::Reseed("opening /dev/random", e))?;
        let info = pool_info(&fresh.entropy);
        // SAFETY: `info` is a `struct rand_pool_info` (two ints, then
        // `buf_size` bytes) that outlives the call; the kernel only reads it.
        unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr()) }
            .map_err(|e| Error::Reseed("RNDADDENTROPY", e.into()))?;
        // SAFETY: an argument-less ioctl on an fd we own.
        unsafe { rnd_reseed_crng(random.as_raw_fd()) }.map_err(|e| Error::Reseed("RNDRESEEDCRNG", e.into()))?;
    }
    fresh_boot_id()?;
    let secs = (fresh.unix_time_ns / 1_000_000_000) as libc::time_t;
    let nanos = (fresh.unix_time_ns % 1_000_000_000) as libc::c_long;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(Error::SetClock)
}

/// Gives this VM a boot id of its own: clones share the template's
/// `/proc/sys/kernel/random/boot_id` (set once at boot, read-only), so a
/// file with a fresh UUID (from the just reseeded CRNG) is bind-mounted over
/// it, as Firecracker's guidance suggests. Later calls rewrite the file.
fn fresh_boot_id() -> Result<(), Error> {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(|e| Error::Reseed("new boot id", e))?;
    let mounted = Path::new(BOOT_ID_FILE).exists();
    std::fs::write(BOOT_ID_FILE, uuid).map_err(|e| Error::Reseed("new boot id", e))?;
    if !mounted {
        mount(Some(BOOT_ID_FILE), BOOT_ID, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|source| Error::Mount { fstype: "bind", target: BOOT_ID, source })?;
        // Read-only for everyone, root included, like the original.
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, BOOT_ID, None::<&str>, ro, None::<&str>).map_err(|source| Error::Mount {
            fstype: "bind",
            target: BOOT_ID,
            source,
        })?;
    }
    Ok(())
}

/// The kernel's boot id, shared by every clone of a template.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// What is mounted over it: on devtmpfs, which only root may write.
const BOOT_ID_FILE: &str = "/dev/.tvm-boot-id";

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// as bytes, crediting every byte as full entropy (it comes from the host's
/// CRNG).
fn pool_info(entropy: &[u8]) -> Vec<u8> {
    let len = entropy.len() as libc::c_int;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    info
}

/// Runs the warm-up `command` like a stage (unprivileged, own cgroup with its
/// limits, seccomp), in a throwaway work dir, discarding its output. Then
/// removes everything it left in RAM except the page cache of the read-only
/// image, which is the point: its processes die with the cgroup, the work dir
/// is unmounted, and `/tmp`, `/dev/shm` and System V IPC are emptied.
///
/// # Errors
/// A bad command ([`Error::InvalidJob`]) or a setup failure (mount, cgroup);
/// a warm-up that merely fails is reported in [`GuestMessage::Warmed`].
pub fn prewarm(command: &Command) -> Result<GuestMessage, Error> {
    stage::check_command(command)?;
    sandbox::enable_controllers()?;
    let data = format!("{WARMUP_WORKDIR},uid={RUNNER_UID},gid={RUNNER_GID}");
    mount(Some("tmpfs"), WORKDIR, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(data.as_str()))
        .map_err(|source| Error::Mount { fstype: "tmpfs", target: WORKDIR, source })?;
    // Output is drained and dropped as it comes (nothing reads it), so a
    // chatty warm-up costs no memory.
    let (tx, rx) = mpsc::channel::<GuestMessage>();
    let drain = std::thread::Builder::new()
        .name("warmup-output".into())
        .spawn(move || rx.into_iter().for_each(drop))
        .map_err(|e| Error::SpawnThread("warm-up output", e))?;
    let spec = StageSpec { stage: Stage::Run, cgroup: WARMUP_CGROUP, command, stdin: None, streamed: true };
    let result = stage::run(spec, &tx);
    drop(tx);
    let _ = drain.join();
    let unmounted = umount2(WORKDIR, MntFlags::MNT_DETACH).map_err(|source| Error::Mount {
        fstype: "umount",
        target: WORKDIR,
        source,
    });
    for dir in SCRATCH {
        empty_dir(Path::new(dir));
    }
    remove_sysv_ipc();
    // The warm-up's stage took the spare: the job's gets a new one now.
    stage::prepare_spare();
    let result = result?;
    unmounted?;
    debug!("warm-up {:?} in {} ms", result.status, result.wall_ms);
    Ok(GuestMessage::Warmed { status: result.status, exit_code: result.exit_code, wall_ms: result.wall_ms })
}

/// Removes everything below `dir` (best effort: a leftover is logged; the
/// directory itself stays).
pub(crate) fn empty_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = removed {
            debug!("cannot remove warm-up leftover {}: {e}", path.display());
        }
    }
}

/// Removes System V shared memory segments, semaphore sets and message
/// queues: they outlive the processes that made them.
pub(crate) fn remove_sysv_ipc() {
    for (table, rm) in [
        // SAFETY (all three): IPC_RMID with an id read from the kernel's own
        // table and no buffer; a stale id only makes the call fail.
        (
            "/proc/sysvipc/shm",
            (|id| unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) }) as fn(i32) -> i32,
        ),
        ("/proc/sysvipc/sem", |id| unsafe { libc::semctl(id, 0, libc::IPC_RMID) }),
        ("/proc/sysvipc/msg", |id| unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) }),
    ] {
        for id in sysv_ids(&std::fs::read_to_string(table).unwrap_or_default()) {
            if rm(id) != 0 {
                debug!("cannot remove System V IPC object {id} from {table}");
            }
        }
    }
}

/// The `id` column (the second) of a `/proc/sysvipc/*` table.
fn sysv_ids(table: &str) -> Vec<i32> {
    table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_has_the_kernel_layout() {
        let info = pool_info(&[7u8; 64]);
        assert_eq!(info.len(), 8 + 64);
        assert_eq!(i32::from_ne_bytes(info[0..4].try_into().unwrap()), 512, "entropy_count in bits");
        assert_eq!(i32::from_ne_bytes(info[4..8].try_into().unwrap()), 64, "buf_size in bytes");
        assert!(info[8..].iter().all(|&b| b == 7));
    }

    #[test]
    fn ioctl_numbers_match_linux_random_h() {
        let add: u64 = nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>());
        let reseed: u64 = nix::request_code_none!(b'R', 0x07);
        assert_eq!((add, reseed), (0x4008_5203, 0x5207));
    }

    #[test]
    fn oversized_entropy_is_refused_before_any_syscall() {
        let fresh = Uniqueness { entropy: vec![0; MAX_ENTROPY_BYTES + 1], unix_time_ns: 0 };
        assert!(matches!(make_unique(&fresh), Err(Error::InvalidJob(_))));
    }

    #[test]
    fn sysv_tables_yield_their_ids() {
        let shm = "       key      shmid perms       size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime        rss       swap\n\
                   0 32769  600  4096  77  0  0  1000  1000  1000  1000  0  0  1  4096  0\n";
        assert_eq!(sysv_ids(shm), vec![32769]);
        assert!(sysv_ids("header only\n").is_empty());
    }

    #[test]
    fn emptying_a_dir_keeps_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), "x").unwrap();
        std::fs::write(dir.path().join("g"), "y").unwrap();
        empty_dir(dir.path());
        assert!(dir.path().is_dir());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
