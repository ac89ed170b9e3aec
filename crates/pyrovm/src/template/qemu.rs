//! Templates under the QEMU backend: guest RAM as a file, device state as
//! QEMU's migration stream.
//!
//! The template VM's RAM is a memfd it maps shared ([`ram_args`],
//! `share=on`) and it runs with a QMP monitor on an inherited socketpair
//! ([`save_args`]); once warm it is paused and migrated (`stop`,
//! `x-ignore-shared`, `getfd`, `migrate fd:`) into the template's `state`
//! file, which then holds device state only (tens of KiB): shared RAM is
//! skipped. TVM writes the memfd's non-zero pages to the `ram` file
//! ([`super::ram`]).
//!
//! A clone is a fresh QEMU with the same device model whose RAM is the
//! process's sealed copy of that file mapped privately (`share=off`:
//! copy-on-write, the copy is never written), started with
//! `-incoming defer` ([`restore_args`]); over QMP TVM turns on
//! `x-ignore-shared` and has it load the state from an inherited descriptor
//! (`migrate-incoming fd:N`, [`start_incoming`]). QEMU runs the guest as soon
//! as the state is loaded. QEMU 7.2 checks that both ends agree: a clone
//! without `x-ignore-shared` fails the load ("Capability x-ignore-shared is
//! off, but received capability is on") and exits, and a private RAM block
//! is not ignored on the clone's side, so it takes what the stream has for
//! it, which is nothing: the pages are the file's.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Instant;

use tracing::debug;
use tvm_protocol::Command;

use super::{
    boot_and_warm, io_err, BuildRequest, Template, TemplateError, TemplateInputs, TemplateMeta, TemplateVmm, Templates,
    WarmVm,
};
use crate::backend::qemu::Qemu;
use crate::backend::qmp::{qmp_args, Qmp, QmpError};
use crate::spec::VmSpec;
use crate::vm::{uniqueness, StartExtras};

impl TemplateVmm for Qemu {
    fn template_inputs(
        &self,
        spec: &VmSpec,
        kernel_key: &str,
        image_key: &str,
        warmup: Option<Command>,
    ) -> TemplateInputs {
        TemplateInputs::new(spec, crate::backend::Vmm::binary(self), kernel_key, image_key, warmup)
    }

    async fn save(dir: &Path, key: &str, req: &BuildRequest<'_, Self>) -> Result<TemplateMeta, TemplateError> {
        save_template(dir, key, req).await
    }

    /// The same QEMU, mapping the template's RAM privately (a sealed copy,
    /// [`Templates::open_ram`]) and loading its device state from an
    /// inherited descriptor (opened and checked by [`Templates::open_state`]).
    fn restore_launch(&self, templates: &Templates, t: &Template) -> Result<(Self, StartExtras), TemplateError> {
        let state = templates.open_state(t)?;
        let ram = templates.open_ram(t)?;
        let args = ram_args(ram.as_raw_fd(), t.meta.inputs.memory_mib, false);
        let vmm = self.restoring(state.as_raw_fd());
        Ok((vmm, StartExtras { fds: vec![state, ram], args, resume: Some(uniqueness()) }))
    }
}

/// The id of the guest RAM's memory backend (the stream names RAM blocks by it).
const RAM_ID: &str = "tvm.ram";

/// QEMU arguments making the guest's `mib` MiB of RAM the file on inherited
/// descriptor `fd` (reopened through `/proc/self/fd`): mapped shared
/// (`share`: the template VM, whose pages TVM then saves) or private
/// (copy-on-write: a clone).
pub fn ram_args(fd: RawFd, mib: u64, share: bool) -> Vec<String> {
    let share = if share { "on" } else { "off" };
    vec![
        "-object".into(),
        format!("memory-backend-file,id={RAM_ID},size={mib}M,mem-path=/proc/self/fd/{fd},share={share}"),
        "-machine".into(),
        format!("memory-backend={RAM_ID}"),
    ]
}

/// QEMU arguments of a VM that can be saved: a QMP monitor on inherited
/// descriptor `qmp_fd` (the VM's device model is unchanged, so its state
/// loads into a VMM started without it). The saved stream carries no run
/// state: the VM is paused for the save, and a restored VM must start
/// running on its own as soon as the state is loaded, without a monitor.
pub fn save_args(qmp_fd: i32) -> Vec<String> {
    let mut a = qmp_args(qmp_fd);
    a.extend(["-global".into(), "migration.store-global-state=off".into()]);
    a
}

/// Boots the template VM with its RAM in a memfd, warms it, saves its
/// device state into `dir/state` over QMP and its RAM into `dir/ram`.
async fn save_template(dir: &Path, key: &str, req: &BuildRequest<'_, Qemu>) -> Result<TemplateMeta, TemplateError> {
    let ram_bytes = req.spec.memory_mib << 20;
    let ram = super::ram::guest_ram_memfd(ram_bytes).map_err(io_err("creating the guest RAM memfd for", dir))?;
    let ram_fd = OwnedFd::from(ram.try_clone().map_err(io_err("duplicating the guest RAM memfd for", dir))?);
    let state_path = dir.join("state");
    // 0600: guest memory is nobody else's business (it holds no user data:
    // the template never ran any).
    let state = std::os::unix::fs::OpenOptionsExt::mode(File::options().write(true).create_new(true), 0o600)
        .open(&state_path)
        .map_err(io_err("creating", &state_path))?;
    let (qmp, theirs) = StdUnixStream::pair().map_err(io_err("creating the QMP socketpair for", dir))?;
    let theirs = OwnedFd::from(theirs);
    let mut args = ram_args(ram_fd.as_raw_fd(), req.spec.memory_mib, true);
    args.extend(save_args(theirs.as_raw_fd()));
    let launch = StartExtras { args, fds: vec![theirs, ram_fd], resume: None };
    let WarmVm { vm, boot_ms, warmup_ms } = boot_and_warm(req, &req.vmm, launch).await?;
    let started = Instant::now();
    let qmp_result = tokio::task::spawn_blocking(move || {
        let mut qmp = Qmp::connect(qmp)?;
        qmp.save(&state)?;
        Ok::<File, QmpError>(state)
    })
    .await
    .map_err(|e| TemplateError::Qmp(QmpError(format!("QMP task: {e}"))))?;
    let state = match qmp_result {
        Ok(state) => state,
        Err(e) => {
            debug!(console = %vm.console(), "template VM console");
            return Err(TemplateError::Qmp(e));
        }
    };
    drop(vm);
    state.sync_all().map_err(io_err("syncing", &state_path))?;
    drop(state);
    let ram_path = dir.join(super::ram::RAM_FILE);
    let writing = io_err("writing", &ram_path);
    let ram = tokio::task::spawn_blocking(move || super::ram::write_sparse(&ram, ram_bytes, &ram_path))
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(writing)?;
    let save_ms = started.elapsed().as_millis() as u64;
    TemplateMeta::saved(key, req, (&state_path, Some(ram)), (boot_ms, warmup_ms), save_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qmp::restore_args;
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    #[test]
    fn restore_and_save_arguments_name_their_descriptors() {
        assert_eq!(
            restore_args(9),
            ["-chardev", "socket,id=qmp,fd=9", "-mon", "chardev=qmp,mode=control", "-incoming", "defer"]
        );
        let save = save_args(5).join(" ");
        assert!(save.starts_with("-chardev socket,id=qmp,fd=5 -mon chardev=qmp,mode=control"), "{save}");
        assert!(save.ends_with("-global migration.store-global-state=off"), "{save}");
        let ram = ram_args(7, 480, false).join(" ");
        assert_eq!(
            ram,
            "-object memory-backend-file,id=tvm.ram,size=480M,mem-path=/proc/self/fd/7,share=off -machine memory-backend=tvm.ram"
        );
        assert!(ram_args(7, 480, true).join(" ").contains(",share=on "));
    }

    /// A QEMU a failing assertion must not leave running.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const QEMU: &str = "qemu-system-x86_64";
    const MIB: u64 = 16;

    /// A paused microvm (no guest runs: `-S`) of [`MIB`] MiB whose RAM is
    /// `ram` (shared or private) under TVM's `-sandbox`, with a QMP monitor,
    /// plus `more` arguments; `fds` are inherited.
    fn paused_qemu(ram: RawFd, share: bool, more: &[String], fds: &[RawFd]) -> (Reaped, Qmp) {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        let theirs = OwnedFd::from(theirs);
        let mut cmd = std::process::Command::new(QEMU);
        cmd.args(["-M", "microvm,accel=tcg", "-m", &format!("{MIB}M"), "-nodefaults", "-display", "none", "-S"])
            .args(["-sandbox", crate::backend::qemu::SANDBOX])
            .args(ram_args(ram, MIB, share))
            .args(qmp_args(theirs.as_raw_fd()))
            .args(more)
            .stderr(std::process::Stdio::piped());
        let inherit: Vec<RawFd> = fds.iter().copied().chain([ram, theirs.as_raw_fd()]).collect();
        // SAFETY: fcntl on descriptors we own, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &f in &inherit {
                    if libc::fcntl(f, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = Reaped(cmd.spawn().unwrap());
        drop(theirs);
        (child, Qmp::connect(ours).unwrap())
    }

    /// The template mechanism against the installed QEMU, without a guest
    /// kernel: a VM whose RAM is a shared memfd saves device state only
    /// (`x-ignore-shared`); a second QEMU mapping a sealed copy of that RAM
    /// privately loads it with `-incoming defer` + `migrate-incoming` and
    /// sees the RAM's bytes; a third that does not turn the capability on
    /// fails the load and exits instead of running with the wrong memory.
    #[test]
    fn guest_ram_stays_out_of_the_stream_and_clones_map_a_sealed_copy() {
        if std::process::Command::new(QEMU).arg("-version").output().is_err() {
            eprintln!("no {QEMU} here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ram = super::super::ram::guest_ram_memfd(MIB << 20).unwrap();
        // 4 MiB of guest RAM that is not zero, and a marker at 1 MiB.
        ram.write_all_at(&vec![0xab; 4 << 20], 2 << 20).unwrap();
        ram.write_all_at(b"tvm-ram!", 1 << 20).unwrap();
        let path = dir.path().join("state");
        let state = File::create(&path).unwrap();
        let (mut child, mut qmp) = paused_qemu(ram.as_raw_fd(), true, &[], &[]);
        qmp.save(&state).unwrap();
        assert!(qmp.execute("no-such-command", None, None).is_err(), "QMP errors are errors");
        qmp.execute("quit", None, None).unwrap();
        child.0.wait().unwrap();
        drop(state);
        let state_bytes = std::fs::metadata(&path).unwrap().len();
        assert!(state_bytes > 0 && state_bytes < 1 << 20, "device state only, not 4 MiB of RAM: {state_bytes} bytes");

        let ram_path = dir.path().join("ram");
        let meta = super::super::ram::write_sparse(&ram, MIB << 20, &ram_path).unwrap();
        assert_eq!(meta.data_bytes, (4 << 20) + 4096);
        let sealed = super::super::ram::sealed_copy(&File::open(&ram_path).unwrap(), MIB << 20).unwrap();

        let defer = ["-incoming".to_string(), "defer".to_string()];
        let input = File::open(&path).unwrap();
        let (mut child, mut qmp) = paused_qemu(sealed.as_raw_fd(), false, &defer, &[input.as_raw_fd()]);
        qmp.ignore_shared().unwrap();
        let uri = serde_json::json!({"uri": format!("fd:{}", input.as_raw_fd())});
        qmp.execute("migrate-incoming", Some(uri.clone()), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = qmp.execute("query-migrate", None, None).unwrap();
            if m.get("status").and_then(|s| s.as_str()) == Some("completed") {
                break;
            }
            assert!(Instant::now() < deadline, "incoming migration never completed: {m}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let xp = |qmp: &mut Qmp, at: u64| {
            let cmd = serde_json::json!({"command-line": format!("xp /1xg {at:#x}")});
            qmp.execute("human-monitor-command", Some(cmd), None).unwrap().as_str().unwrap().to_string()
        };
        // "tvm-ram!" as a little-endian u64.
        assert!(xp(&mut qmp, 1 << 20).contains("0x216d61722d6d7674"), "{}", xp(&mut qmp, 1 << 20));
        assert!(xp(&mut qmp, 3 << 20).contains("0xabababababababab"));
        qmp.execute("quit", None, None).unwrap();
        child.0.wait().unwrap();

        let input = File::open(&path).unwrap();
        let (mut child, mut qmp) = paused_qemu(sealed.as_raw_fd(), false, &defer, &[input.as_raw_fd()]);
        let uri = serde_json::json!({"uri": format!("fd:{}", input.as_raw_fd())});
        qmp.execute("migrate-incoming", Some(uri), None).unwrap();
        let status = child.0.wait().unwrap();
        assert!(!status.success(), "a load without x-ignore-shared fails");
        let mut err = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(err.contains("x-ignore-shared"), "{err}");
    }
}
