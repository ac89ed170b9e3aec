//! Turning the bare initramfs into a working system on the runtime image, and
//! ending the VM.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::error::{chain, Error};
use crate::log::debug;

/// The runtime image: erofs on the first virtio block device.
const ROOT_DEVICE: &str = "/dev/vda";
/// Where the runtime image is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// How long the root device may take to show up in devtmpfs. Virtio probing is
/// synchronous during kernel init, so this is only a safety margin.
const ROOT_DEVICE_WAIT: Duration = Duration::from_secs(2);

/// Mounts the runtime image and makes it the root filesystem, carrying
/// `/dev` along. Everything after this runs inside the image.
pub fn switch_root() -> Result<(), Error> {
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755"))?;
    attach_console();

    wait_for_device(ROOT_DEVICE)?;
    // nosuid/nodev on top of read-only: nothing in the image needs set-uid
    // binaries (the agent is already root), and they are only attack surface.
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some(ROOT_DEVICE), NEW_ROOT, Some("erofs"), flags, None::<&str>).map_err(|source| Error::Mount {
        fstype: "erofs",
        target: NEW_ROOT,
        source,
    })?;

    // The initramfs stays in RAM after the switch; dropping our own copy
    // there frees the ~2 MB it holds (the running image is already mapped).
    let _ = std::fs::remove_file("/init");

    mount(Some("/dev"), "/newroot/dev", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|source| Error::Mount { fstype: "move", target: "/newroot/dev", source })?;

    // switch_root(8) without the recursive delete: make /newroot the root of
    // our mount namespace and of this process.
    let step = |r: nix::Result<()>| r.map_err(|e| Error::SwitchRoot(NEW_ROOT, e));
    step(nix::unistd::chdir(NEW_ROOT))?;
    step(mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>))?;
    step(nix::unistd::chroot("."))?;
    step(nix::unistd::chdir("/"))?;
    Ok(())
}

/// Mounts `/proc` and `/sys`, which the rest of the boot (command line,
/// device discovery) reads.
pub fn mount_kernel_filesystems() -> Result<(), Error> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", hardened, None)?;
    mount_fs("sysfs", "/sys", hardened, None)?;
    Ok(())
}

/// Everything else the job needs from the system: cgroups, scratch space,
/// loopback networking, a hostname, and the agent's own OOM immunity.
pub fn configure() -> Result<(), Error> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("cgroup2", "/sys/fs/cgroup", hardened, None)?;
    // 1777 like any /tmp. Its pages are charged to the cgroup that writes
    // them but outlive the stage (a compile stage's leftovers stay in RAM
    // during the run stage), hence a fixed cap too.
    let scratch = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("tmpfs", "/tmp", scratch, Some("mode=1777,size=64m"))?;

    // Optional extras: programs that want a pty or POSIX shared memory get
    // them, but a kernel without them can still run most jobs.
    for (fstype, target, data) in [
        ("devpts", "/dev/pts", "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ("tmpfs", "/dev/shm", "mode=1777,size=64m"),
    ] {
        let mounted = std::fs::create_dir_all(target)
            .map_err(|e| e.to_string())
            .and_then(|()| mount_fs(fstype, target, scratch, Some(data)).map_err(|e| chain(&e)));
        if let Err(e) = mounted {
            debug!("skipping {target}: {e}");
        }
    }
    crate::support::install();
    // udev normally makes these; shells use /dev/fd for process substitution.
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }

    for (knob, value) in [
        // Always overcommit: a program that maps more than the VM's RAM then
        // runs into its cgroup memory limit (memory_limit_exceeded) when it
        // touches the pages, instead of failing the allocation up front with
        // an error whose verdict would depend on how big the VM happens to be.
        ("/proc/sys/vm/overcommit_memory", "1"),
        // The kernel log and kernel addresses are none of the job's business.
        ("/proc/sys/kernel/dmesg_restrict", "1"),
        ("/proc/sys/kernel/kptr_restrict", "2"),
    ] {
        if let Err(e) = std::fs::write(knob, value) {
            debug!("cannot set {knob}: {e}");
        }
    }

    loopback_up()?;
    nix::unistd::sethostname("tvm").map_err(Error::Hostname)?;

    // The job may exhaust memory; the agent must live to report it. Children
    // inherit this value, so the sandbox sets it back to 0 before exec.
    std::fs::write("/proc/self/oom_score_adj", "-1000").map_err(Error::OomScoreAdj)?;
    // And it must not be starved of CPU by a busy job on a one-vCPU guest.
    // Threads inherit the nice value of the thread that creates them, and
    // every agent thread is created after this; jobs reset it to 0.
    // SAFETY: setpriority with integer arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } != 0 {
        debug!("cannot raise the agent's priority: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Syncs and ends the VM. QEMU runs with `-no-reboot` and Firecracker stops
/// on reboot, so rebooting is how the guest powers off on both.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    eprintln!("tvm-agent fatal: reboot failed: {err}");
    // Last resort: PID 1 exiting panics the kernel, and `panic=-1` on the
    // command line turns that panic into a reboot as well.
    std::process::exit(1)
}

fn mount_fs(fstype: &'static str, target: &'static str, flags: MsFlags, data: Option<&str>) -> Result<(), Error> {
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| Error::Mount { fstype, target, source })
}

/// Gives PID 1 a stdin/stdout/stderr on the console. The kernel only opens
/// `/dev/console` for init if the initramfs contains that node; without it
/// fds 0-2 start closed and the first files we open would land there.
fn attach_console() {
    let closed = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0;
    if !(0..3).any(closed) {
        return;
    }
    // O_NOCTTY: the console must not become PID 1's controlling terminal,
    // or a stray ^C on the serial line would be aimed at it.
    // SAFETY: plain open/dup2/close on a constant NUL-terminated path.
    unsafe {
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..3 {
            if closed(target) {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

fn wait_for_device(path: &'static str) -> Result<(), Error> {
    let deadline = Instant::now() + ROOT_DEVICE_WAIT;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(Error::RootDevice(path));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `ip link set lo up`: programs may talk to themselves over 127.0.0.1; the
/// VM has no other interface.
fn loopback_up() -> Result<(), Error> {
    let sock =
        socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(Error::Loopback)?;
    // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read the name and read/write the
    // flags member of a properly sized ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::Loopback(Errno::last()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::Loopback(Errno::last()));
        }
    }
    Ok(())
}
