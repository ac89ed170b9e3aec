//! The QEMU backend: the command line that starts one guest. x86_64 guests
//! run on `microvm`; aarch64 guests on `virt` (GIC, PSCI power-off, PL011
//! console, virtio-mmio transports described in its device tree, no PCI
//! device added), chosen by the guest architecture.
//!
//! No PCI, no ACPI, no network device: a virtio-blk root image (read-only),
//! a virtio-serial port for the agent, virtio-rng for early entropy and the
//! serial console for diagnostics. The same kernel boots under Firecracker,
//! which also describes virtio-mmio devices on the kernel command line.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use super::{AgentChannel, Console, Launch, LaunchContext, LaunchError, Vmm, VmmKind};
use crate::jail::{install_prefix, HostPath, VmmFiles, VmmIo};
use crate::kernel::Kernel;
use crate::spec::{kernel_cmdline, AccelKind, AgentTransport, VmSpec};
use tvm_config::GuestArch;

/// Kernel arguments that make an x86_64 guest under TCG keep time with the
/// host's TSC: `tsc_early_khz=<host TSC kHz> tsc=reliable`, or `None` when
/// the host TSC is not invariant (`constant_tsc` and `nonstop_tsc` in
/// `/proc/cpuinfo`) or cannot be measured.
///
/// Why: QEMU's TCG returns the host's TSC for the guest's `rdtsc`, but the
/// guest kernel cannot calibrate it (microvm has no PIT or HPET to compare
/// against), so it counts timer ticks (`refined-jiffies`). Ticks are lost
/// whenever the host is busy: at load 15 a guest saw 8.7 s pass while the
/// host saw 80 s, so wall-time limits and reported times were wrong by that
/// factor. Given the frequency, the guest uses the TSC and its clock is the
/// host's. `tsc=reliable` skips the watchdog that would compare the TSC with
/// those lossy ticks and disable it. Measured once per process (~20 ms).
/// Under KVM the guest has kvm-clock and needs none of this.
pub fn tcg_tsc_cmdline() -> Option<String> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    KHZ.get_or_init(host_tsc_khz).map(|khz| format!("tsc_early_khz={khz} tsc=reliable"))
}

/// The host's TSC frequency in kHz, measured against `CLOCK_MONOTONIC`.
#[cfg(target_arch = "x86_64")]
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let invariant = ["constant_tsc", "nonstop_tsc"].iter().all(|f| flags.split_whitespace().any(|w| w == *f));
    if !invariant {
        return None;
    }
    // A (monotonic, TSC) pair read back to back; retried when something
    // preempted us between the reads, so each pair is within a microsecond.
    let pair = || {
        (0..100).find_map(|_| {
            let before = Instant::now();
            // SAFETY: `rdtsc` reads a counter; it has no memory effects and
            // every x86_64 CPU has it.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            let after = Instant::now();
            (after.duration_since(before) < Duration::from_micros(2)).then_some((before, tsc))
        })
    };
    let (t0, c0) = pair()?;
    std::thread::sleep(Duration::from_millis(20));
    let (t1, c1) = pair()?;
    let nanos = u64::try_from(t1.duration_since(t0).as_nanos()).ok()?;
    let khz = c1.checked_sub(c0)?.checked_mul(1_000_000)? / nanos.max(1);
    // Anything outside 100 MHz..10 GHz is a measurement gone wrong.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

/// Only x86_64 hosts run x86_64 guests under TCG with a usable host TSC.
#[cfg(not(target_arch = "x86_64"))]
fn host_tsc_khz() -> Option<u64> {
    None
}

/// The QEMU backend: a binary and whether it runs under [`SANDBOX`].
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    sandbox: bool,
    arch: GuestArch,
    /// `Some(fd)`: the VM is restored from a template whose device state
    /// the VMM inherits as descriptor `fd` (see [`Qemu::restoring`]).
    incoming: Option<RawFd>,
}

impl Qemu {
    /// `binary` (`qemu-system-x86_64`), run under `-sandbox` if `sandbox`,
    /// for x86_64 guests (`microvm`).
    pub fn new(binary: &Path, sandbox: bool) -> Self {
        Self { binary: binary.to_path_buf(), sandbox, arch: GuestArch::X86_64, incoming: None }
    }

    /// The same QEMU restoring a template (the QEMU side of templates): it
    /// starts with `-incoming defer` and a QMP monitor on an inherited
    /// socketpair; once it runs, TVM turns on `x-ignore-shared` (the guest's
    /// RAM comes from its memory backend, not the stream) and has it load
    /// the device state from its inherited descriptor `state_fd`.
    pub(crate) fn restoring(&self, state_fd: RawFd) -> Self {
        Self { incoming: Some(state_fd), ..self.clone() }
    }

    /// The same QEMU for guests of `arch` (`qemu-system-aarch64` with
    /// `virt` for aarch64).
    pub fn with_arch(mut self, arch: GuestArch) -> Self {
        self.arch = arch;
        self
    }

    /// The guest architecture this QEMU emulates.
    pub fn arch(&self) -> GuestArch {
        self.arch
    }

    /// Whether VMMs run under QEMU's `-sandbox`.
    pub fn sandbox(&self) -> bool {
        self.sandbox
    }
}

/// QEMU's end of the agent channel is inherited; ours is ready at once.
/// A restore also holds our end of its QMP monitor and the number of the
/// state descriptor to load.
#[derive(Debug)]
pub struct Pending {
    agent: UnixStream,
    incoming: Option<(std::os::unix::net::UnixStream, RawFd)>,
}

impl Vmm for Qemu {
    type Pending = Pending;

    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    fn boot_image<'k>(&self, kernel: &'k Kernel) -> &'k Path {
        &kernel.bzimage
    }

    fn reboot(&self) -> char {
        // microvm has no i8042: a triple fault ends it (with -no-reboot).
        // (aarch64 ignores the letter: reboot is a PSCI call there.)
        't'
    }

    fn transport(&self) -> AgentTransport {
        AgentTransport::VirtioSerial
    }

    fn host_paths(&self, _spec: &VmSpec, _ctx: &LaunchContext<'_>) -> Vec<HostPath> {
        // QEMU's install prefix: it loads accelerator modules and firmware
        // (qboot) relative to its binary. Everything else is a descriptor.
        install_prefix(&self.binary).into_iter().map(HostPath::read).collect()
    }

    fn launch(&self, spec: &VmSpec, ctx: &LaunchContext<'_>) -> Result<Launch<Pending>, LaunchError> {
        let prep = |source| LaunchError::Prepare { what: "the agent socketpair", source };
        // The agent channel is a connected socketpair: QEMU inherits one end,
        // so there is no socket file to race for, guess or leave behind.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(prep)?;
        ours.set_nonblocking(true).map_err(prep)?;
        let ours = UnixStream::from_std(ours).map_err(prep)?;
        let mut files = VmmFiles::open(spec, spec.agent.map(|_| theirs.into()))?;
        let mut args = qemu_args_for(self.arch, spec, &files.io(), self.sandbox);
        args.extend(["-name".to_string(), format!("tvm-{}", ctx.id)]);
        let incoming = match self.incoming {
            Some(state_fd) => {
                let prep = |source| LaunchError::Prepare { what: "the QMP socketpair", source };
                let (qmp, theirs) = std::os::unix::net::UnixStream::pair().map_err(prep)?;
                let theirs = OwnedFd::from(theirs);
                args.extend(super::qmp::restore_args(theirs.as_raw_fd()));
                files.inherit([theirs]);
                Some((qmp, state_fd))
            }
            None => None,
        };
        Ok(Launch {
            program: self.binary.clone(),
            args,
            files: Some(files),
            own_dir: None,
            new_netns: false,
            confine: true,
            leftovers: Vec::new(),
            cleanup: None,
            pending: Pending { agent: ours, incoming },
        })
    }

    /// For a restore, first has the VMM load the template's device state
    /// over QMP (the caller bounds the wait and ends it if the VMM exits).
    async fn agent_channel(
        &self,
        pending: Pending,
        _console: Console,
        _deadline: tokio::time::Instant,
    ) -> Result<AgentChannel, LaunchError> {
        if let Some((qmp, state_fd)) = pending.incoming {
            let api = |message: String| LaunchError::Api { vmm: "qemu", path: "QMP migrate-incoming".into(), message };
            tokio::task::spawn_blocking(move || super::qmp::start_incoming(qmp, state_fd))
                .await
                .map_err(|e| api(format!("QMP task: {e}")))?
                .map_err(|e| api(crate::error_chain(&e)))?;
        }
        Ok(AgentChannel { stream: pending.agent, keep: None })
    }

    fn probe_kvm(&self, kernel: &Kernel) -> Result<u64, String> {
        if self.arch != GuestArch::host() {
            return Err(format!(
                "{} guests on a {} host: KVM runs only guests of the host's architecture",
                self.arch,
                GuestArch::host()
            ));
        }
        probe_kvm_for(self.arch, &self.binary, &kernel.bzimage)
    }
}

/// QEMU's `-sandbox` policy: its seccomp filter plus a deny of obsolete
/// system calls, of privilege changes (set*uid), of spawning processes
/// (fork/exec) and of resource control (scheduler, affinity). A guest that
/// takes over QEMU through an emulation bug gets no shell, no root and no
/// way to change its own limits.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Whether `qemu` accepts [`SANDBOX`] (built with seccomp support): starts it
/// with the sandbox and no machine, and asks it to quit over stdin.
pub fn sandbox_supported(qemu: &Path) -> bool {
    use std::io::Write;
    let child = std::process::Command::new(qemu)
        .args(["-sandbox", SANDBOX, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    // Bounded: a QEMU that neither quits nor fails is killed and counted as unsupported.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The x86_64 guest CPU under TCG: QEMU's `max` without ERMS ("enhanced
/// `rep movsb`"). With ERMS advertised the guest kernel copies to and from
/// user memory and clears pages with `rep movsb`/`rep stosb`, and glibc's
/// `memcpy` switches to `rep movsb` from a few KiB up; TCG runs those one
/// emulated iteration per byte (1.77 ns per byte in the guest against 0.24
/// for the `rep movsq` the kernel uses without ERMS). Output relayed in
/// 1 KiB writes cost ~25% less per byte without it (docs/performance.md,
/// "Output relay"). Under KVM the guest gets the host's CPU as it is.
pub const TCG_X86_64_CPU: &str = "max,-erms";

/// argv (without the binary) for `qemu-system-x86_64`. Every file QEMU
/// gets is an inherited descriptor named by `io` (see [`crate::jail`]).
pub fn qemu_args(spec: &VmSpec, io: &VmmIo, sandbox: bool) -> Vec<String> {
    qemu_args_for(GuestArch::X86_64, spec, io, sandbox)
}

/// argv (without the binary) for the QEMU of `arch`: `microvm` on x86_64;
/// on aarch64 `virt` with a GICv3, PSCI (so a guest reboot ends QEMU under
/// `-no-reboot`), its PL011 as the console (`ttyAMA0`) and the same
/// virtio-mmio devices (`virt` has 32 transports in its device tree).
pub fn qemu_args_for(arch: GuestArch, spec: &VmSpec, io: &VmmIo, sandbox: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let accel = spec.accel.as_str();
    let (machine, cpu, console) = match (arch, spec.accel) {
        (GuestArch::X86_64, kind) => (
            format!("microvm,accel={accel},acpi=off,x-option-roms=off,isa-serial=on,rtc=on"),
            if kind == AccelKind::Kvm { "host" } else { TCG_X86_64_CPU },
            "ttyS0",
        ),
        // `max` under TCG emulates pointer authentication with QARMA, which
        // is slow; the implementation-defined algorithm is QEMU's fast one.
        (GuestArch::Aarch64, AccelKind::Tcg) => {
            (format!("virt,accel={accel},gic-version=3,highmem=off"), "max,pauth-impdef=on", "ttyAMA0")
        }
        (GuestArch::Aarch64, AccelKind::Kvm) => (format!("virt,accel={accel},gic-version=host"), "host", "ttyAMA0"),
    };
    push(&["-M", &machine, "-cpu", cpu]);
    push(&["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none"]);
    // Under TCG the guest reads the host's TSC; its clock follows real time
    // only when it uses that TSC, not the tick-counting jiffies it falls back
    // to (see `tcg_tsc_cmdline`). The operator's arguments come after and win.
    let clock = match (arch, spec.accel) {
        (GuestArch::X86_64, AccelKind::Tcg) => tcg_tsc_cmdline(),
        _ => None,
    };
    let extra = match (clock, spec.extra_cmdline.as_deref()) {
        (Some(clock), Some(extra)) => Some(format!("{clock} {extra}")),
        (clock, extra) => clock.or(extra.map(str::to_owned)),
    };
    let cmdline = kernel_cmdline(spec.debug, 't', extra.as_deref());
    let cmdline = cmdline.replacen("console=ttyS0", &format!("console={console}"), 1);
    push(&["-kernel", &io.kernel, "-append", &cmdline]);
    if let Some(initrd) = &io.initrd {
        push(&["-initrd", initrd]);
    }
    if let Some(fd) = io.rootfs_fd {
        // An fd set: QEMU dup()s the descriptor instead of opening a path.
        push(&["-add-fd", &format!("fd={fd},set=1")]);
        push(&["-drive", "id=root,file=/dev/fdset/1,format=raw,if=none,readonly=on"]);
        push(&["-device", "virtio-blk-device,drive=root"]);
    }
    if let Some(fd) = io.agent_fd {
        // An already connected socket: no listening socket file anywhere.
        push(&["-device", "virtio-serial-device,max_ports=2", "-chardev", &format!("socket,id=agent,fd={fd}")]);
        push(&["-device", &format!("virtserialport,chardev=agent,name={}", tvm_protocol::VIRTIO_PORT_NAME)]);
    }
    push(&["-device", "virtio-rng-device"]);
    if sandbox {
        push(&["-sandbox", SANDBOX]);
    }
    a
}

/// Boots `kernel` under KVM with no root device; Ok(ms) if it panics cleanly in time.
pub fn probe_kvm(qemu: &Path, kernel: &Path) -> Result<u64, String> {
    probe_kvm_for(GuestArch::X86_64, qemu, kernel)
}

/// [`probe_kvm`] for a guest of `arch` (its machine and console); judged by
/// [`super::probe_boot`].
///
/// # Errors
/// Why KVM did not prove usable (see [`super::probe_boot`]).
pub fn probe_kvm_for(arch: GuestArch, qemu: &Path, kernel: &Path) -> Result<u64, String> {
    let spec = VmSpec {
        kernel: kernel.to_path_buf(),
        initrd: None,
        rootfs: None,
        memory_mib: 128,
        vcpus: 1,
        accel: AccelKind::Kvm,
        agent: None,
        debug: false,
        extra_cmdline: None,
    };
    // Our own kernel and no guest code: the probe needs no descriptor passing
    // and no sandbox (it decides about KVM only).
    let io = VmmIo { kernel: kernel.to_string_lossy().into_owned(), initrd: None, rootfs_fd: None, agent_fd: None };
    super::probe_boot(VmmKind::Qemu, |_| {
        let mut cmd = std::process::Command::new(qemu);
        cmd.args(qemu_args_for(arch, &spec, &io, false));
        Ok(cmd)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_no_network_and_a_readonly_root() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            rootfs: Some("/img.erofs".into()),
            memory_mib: 384,
            vcpus: 1,
            accel: AccelKind::Tcg,
            agent: Some(AgentTransport::VirtioSerial),
            debug: false,
            extra_cmdline: None,
        };
        let io = VmmIo { kernel: "/proc/self/fd/5".into(), initrd: None, rootfs_fd: Some(7), agent_fd: Some(4) };
        let a = qemu_args(&spec, &io, true).join(" ");
        assert!(a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        assert!(a.contains("microvm,accel=tcg,acpi=off"));
        assert!(a.contains("-cpu max,-erms "), "TCG runs rep movsb per byte: {a}");
        let kvm = qemu_args(&VmSpec { accel: AccelKind::Kvm, ..spec.clone() }, &io, true).join(" ");
        assert!(kvm.contains("-cpu host "), "{kvm}");
        assert!(a.contains("-add-fd fd=7,set=1 -drive id=root,file=/dev/fdset/1,format=raw,if=none,readonly=on"));
        assert!(a.contains("-kernel /proc/self/fd/5") && a.contains("socket,id=agent,fd=4"));
        assert!(a.contains("-nodefaults") && !a.contains("netdev") && !a.contains("-nic"));
        assert!(a.contains("name=tvm.agent"));
        assert!(a.contains("-m 384M"));
        let plain = qemu_args(&spec, &VmmIo { agent_fd: None, ..io }, false).join(" ");
        assert!(!plain.contains("-sandbox"));
    }

    #[test]
    fn tcg_guests_keep_time_with_the_host_tsc_and_the_operator_still_wins() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: None,
            rootfs: None,
            memory_mib: 256,
            vcpus: 1,
            accel: AccelKind::Tcg,
            agent: None,
            debug: false,
            extra_cmdline: Some("tsc=unstable".into()),
        };
        let io = VmmIo { kernel: "/k".into(), initrd: None, rootfs_fd: None, agent_fd: None };
        let a = qemu_args(&spec, &io, false).join(" ");
        match tcg_tsc_cmdline() {
            // The operator's `tsc=unstable` comes after ours: last wins.
            Some(clock) => assert!(a.contains(&format!("{clock} tsc=unstable")), "{a}"),
            None => assert!(a.contains("rdinit=/init tsc=unstable") && !a.contains("tsc_early_khz"), "{a}"),
        }
        let kvm = qemu_args(&VmSpec { accel: AccelKind::Kvm, ..spec }, &io, false).join(" ");
        assert!(!kvm.contains("tsc_early_khz"), "KVM guests use kvm-clock: {kvm}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn host_tsc_measurements_agree() {
        // Two measurements of one invariant counter agree closely; a host
        // without an invariant TSC yields none (and guests keep jiffies).
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let invariant = cpuinfo.contains(" constant_tsc") && cpuinfo.contains(" nonstop_tsc");
        match (host_tsc_khz(), host_tsc_khz()) {
            (Some(a), Some(b)) => assert!(a.abs_diff(b) * 200 < a, "{a} kHz vs {b} kHz"),
            (a, b) => assert!(!invariant, "an invariant TSC measured as {a:?} and {b:?}"),
        }
    }

    #[test]
    fn aarch64_guests_get_virt_with_gic_psci_and_the_pl011_console() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: None,
            rootfs: Some("/img.erofs".into()),
            memory_mib: 256,
            vcpus: 1,
            accel: AccelKind::Tcg,
            agent: Some(AgentTransport::VirtioSerial),
            debug: false,
            extra_cmdline: Some("x=1".into()),
        };
        let io = VmmIo { kernel: "/proc/self/fd/5".into(), initrd: None, rootfs_fd: Some(7), agent_fd: Some(4) };
        let a = qemu_args_for(GuestArch::Aarch64, &spec, &io, true).join(" ");
        assert!(a.contains("-M virt,accel=tcg,gic-version=3,highmem=off -cpu max,pauth-impdef=on"), "{a}");
        assert!(a.contains("console=ttyAMA0 ") && !a.contains("ttyS0") && a.ends_with(&format!("-sandbox {SANDBOX}")));
        assert!(a.contains("-no-reboot") && a.contains("virtio-blk-device,drive=root") && a.contains("virtserialport"));
        assert!(!a.contains("microvm") && !a.contains("pci") && !a.contains("netdev"), "{a}");
        // The x86_64 command line is what it always was.
        assert_eq!(qemu_args(&spec, &io, true), qemu_args_for(GuestArch::X86_64, &spec, &io, true));
        assert!(qemu_args(&spec, &io, true).join(" ").contains("console=ttyS0"));
        let q = Qemu::new(Path::new("qemu-system-aarch64"), false).with_arch(GuestArch::Aarch64);
        if GuestArch::host() != GuestArch::Aarch64 {
            let k = Kernel { key: "k".into(), bzimage: "/k".into(), vmlinux: "/v".into(), config: "/c".into() };
            let err = q.probe_kvm(&k).unwrap_err();
            assert!(err.contains("KVM runs only guests of the host's architecture"), "{err}");
        }
    }

    #[test]
    fn the_installed_qemu_accepts_the_sandbox_policy() {
        let qemu = Path::new("qemu-system-x86_64");
        if std::process::Command::new(qemu).arg("-version").output().is_err() {
            eprintln!("no qemu-system-x86_64 here");
            return;
        }
        // Debian's QEMU is built with seccomp; a policy typo would make this false.
        assert!(sandbox_supported(qemu));
        assert!(!sandbox_supported(Path::new("/nonexistent/qemu")));
    }
}
