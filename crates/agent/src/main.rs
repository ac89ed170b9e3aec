//! `tvm-agent`: PID 1 inside every TVM microVM.
//!
//! The kernel starts it from a tiny initramfs. It mounts the runtime image
//! (`/dev/vda`, erofs) as the root filesystem, finds its link to the host (a
//! virtio-serial port under QEMU, vsock under Firecracker), announces
//! `Ready`, and receives exactly one job. It writes the job's files into a
//! tmpfs work dir, runs the compile and run stages as the unprivileged
//! `runner` user, each in its own cgroup with rlimits, streams their output,
//! and reports the result. Then it powers the VM off: a VM never runs a
//! second job. As PID 1 it must never exit, so every path ends in a reboot.

mod boot;
mod clone;
mod error;
mod harden;
mod inbox;
mod job;
mod log;
mod output;
mod relay;
mod runmany;
mod sandbox;
mod stage;
mod support;
mod trace;
mod transport;

use tvm_protocol::{GuestMessage, PROTOCOL_VERSION};

use crate::error::{chain, Error};
use crate::log::debug;

fn main() {
    // Running this on a host by mistake would remount / and reboot it.
    if std::process::id() != 1 {
        eprintln!("tvm-agent: this is the init process of a TVM guest; refusing to run as pid {}", std::process::id());
        std::process::exit(2);
    }
    // A panic anywhere (any thread) ends the VM instead of leaving a
    // half-working PID 1 behind; the host sees the VM stop without `Done`.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("tvm-agent fatal: {info}");
        boot::power_off();
    }));
    if let Err(e) = run() {
        log::fatal(&e);
    }
    boot::power_off()
}

/// The `Ready` announcement (after boot, and again after a restore).
fn ready() -> GuestMessage {
    GuestMessage::Ready {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        uptime_ms: log::uptime_ms(),
    }
}

fn run() -> Result<(), Error> {
    boot::switch_root()?;
    boot::mount_kernel_filesystems()?;
    log::init(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    debug!("root switched");
    // A failure here is reported to the host as the job's `Failed` once the
    // link is up, which says more than a VM that just stops.
    let setup = boot::configure();
    // Compiled now, so that a template's clones have them (see the function).
    if let Err(e) = harden::stage_filters() {
        debug!("seccomp filters not compiled at start-up (each stage tries again): {}", chain(&e));
    }

    stage::prepare_spare();
    let mut link = transport::connect()?;
    link.send(&ready())?;
    debug!("ready sent, waiting for the job");

    // A VM restored from a template shares its RNG state and clock with its
    // siblings until the job's fresh entropy and time are applied, before
    // anything of the job runs.
    let received = setup.and_then(|()| clone::await_job(&mut link));
    let mut job = match received {
        Ok(job) => job,
        Err(e) => {
            // Best effort: the host may be the reason we failed.
            if link.send(&GuestMessage::Failed { message: chain(&e) }).is_ok() {
                link.wait_for_hangup();
            }
            return Err(e);
        }
    };
    debug!("job received");

    // A session's input arrives while the job runs, on a second descriptor
    // of the link (the writer thread owns the first).
    let inbox = if job.interactive {
        let stdin = std::mem::take(&mut job.stdin);
        Some(inbox::Inbox::start(link.reader()?, stdin)?)
    } else {
        None
    };
    let outbox = link.into_outbox()?;
    trace::mark("channels");
    let last = match job::execute_with(job, &outbox.sender(), inbox.as_ref()) {
        Ok(mut result) => {
            trace::mark("result");
            result.trace = trace::take();
            debug!("job done: {}", result.verdict);
            GuestMessage::Done(result)
        }
        Err(e) => {
            log::fatal(&e);
            GuestMessage::Failed { message: chain(&e) }
        }
    };
    outbox.finish(last)?;
    debug!("result delivered, powering off");
    Ok(())
}
