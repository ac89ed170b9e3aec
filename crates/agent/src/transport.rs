//! The link to the host: the virtio-serial port named
//! [`VIRTIO_PORT_NAME`] under QEMU, or one vsock connection on
//! [`VSOCK_PORT`] under Firecracker (which has no virtio-serial).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use tvm_protocol::{
    read_frame, write_frame, FrameError, GuestMessage, HostMessage, MAX_HOST_FRAME, VIRTIO_PORT_NAME, VSOCK_PORT,
};

use crate::error::Error;
use crate::log::debug;

/// Virtio device IDs, as shown in `/sys/bus/virtio/devices/*/device`.
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_VSOCK: u32 = 19;

/// The port's name reaches the guest in a control message after the device
/// probes, so it can show up a little after PID 1 starts.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// How long the final message may take to reach the host before the VM is
/// ended anyway (a host that stopped reading must not keep the VM alive).
const FINAL_FLUSH: Duration = Duration::from_secs(60);

/// How long the agent waits, after its final message, for the host to close
/// the connection. A finished `write` only means the bytes are queued in the
/// virtqueue (or socket): powering off at once loses whatever the host has
/// not pulled yet, so the host's hang-up is the acknowledgement that it has
/// read everything. A host that never hangs up costs this much per VM.
const HANGUP_WAIT: Duration = Duration::from_secs(10);

/// A connected, bidirectional byte stream to the host.
#[derive(Debug)]
pub struct Link {
    stream: File,
    /// The vsock listener, kept until the job starts: Firecracker resets
    /// every vsock connection when it restores a snapshot, and the restored
    /// VM's host then connects again ([`Link::reaccept`]).
    listener: Option<OwnedFd>,
}

/// Finds and opens the host link, waiting for the host where needed.
pub fn connect() -> Result<Link, Error> {
    let ports = Path::new("/sys/class/virtio-ports");
    let devices = Path::new("/sys/bus/virtio/devices");
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Some(name) = find_port(ports, VIRTIO_PORT_NAME) {
            let path = Path::new("/dev").join(&name);
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(stream) => {
                    debug!("host link: virtio-serial port {}", path.display());
                    return Ok(Link { stream, listener: None });
                }
                // devtmpfs creates the node asynchronously after sysfs.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {}
                Err(e) => return Err(Error::OpenPort(path, e)),
            }
        } else if !virtio_device_present(devices, VIRTIO_ID_CONSOLE) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if virtio_device_present(devices, VIRTIO_ID_VSOCK) {
        return accept_vsock();
    }
    Err(Error::NoTransport(VIRTIO_PORT_NAME))
}

impl Link {
    /// Replaces the connection with the host's next one on the vsock port
    /// (after a snapshot restore reset it); `false` when the link is not
    /// vsock or no longer listens.
    ///
    /// # Errors
    /// [`Error::VsockAccept`] when accepting fails.
    pub fn reaccept(&mut self) -> Result<bool, Error> {
        let Some(listener) = &self.listener else {
            return Ok(false);
        };
        self.stream = accept_on(listener)?;
        debug!("host link: vsock connection accepted again");
        Ok(true)
    }

    /// Closes the vsock listener: the job starts, nobody connects any more.
    pub fn stop_listening(&mut self) {
        self.listener = None;
    }

    /// Writes one message directly (before the writer thread exists).
    pub fn send(&mut self, msg: &GuestMessage) -> Result<(), Error> {
        write_frame(&mut self.stream, msg).map_err(|e| Error::Send(describe(msg), e))
    }

    /// Reads the next message from the host (the job, or a template
    /// message before it: see [`crate::clone::await_job`]).
    pub fn receive(&mut self) -> Result<HostMessage, Error> {
        match read_frame::<HostMessage, _>(&mut self.stream, MAX_HOST_FRAME) {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(Error::HostClosed),
            Err(e) => Err(Error::ReceiveJob(e)),
        }
    }

    /// Waits (boundedly) until the host has hung up, after a final message
    /// sent with [`Link::send`].
    pub fn wait_for_hangup(&self) {
        wait_for_hangup(&self.stream, HANGUP_WAIT);
    }

    /// A second descriptor of the link for reading what the host sends
    /// while the job runs (interactive jobs).
    ///
    /// # Errors
    /// [`Error::SpawnThread`] (for the host reader) if it cannot be duplicated.
    pub fn reader(&self) -> Result<File, Error> {
        self.stream.try_clone().map_err(|e| Error::SpawnThread("host reader", e))
    }

    /// Hands the link to a writer thread. Output chunks come from several
    /// reader threads; funnelling them through one owner keeps frames whole
    /// and lets readers never block on a slow host.
    pub fn into_outbox(self) -> Result<Outbox, Error> {
        let (tx, rx) = mpsc::channel::<GuestMessage>();
        // A second descriptor to watch for the host's hang-up at the end
        // while the writer thread owns the first.
        let watch = self.stream.try_clone().map_err(|e| Error::SpawnThread("host writer", e))?;
        let mut stream = self.stream;
        let writer = std::thread::Builder::new()
            .name("host-writer".into())
            .spawn(move || {
                // At the relay's priority: the relay hands every chunk to this
                // thread, and a frame waiting here for the program's time
                // slice would hold back what the relay has already read.
                crate::relay::raise_priority();
                for msg in rx {
                    write_frame(&mut stream, &msg).map_err(|e| Error::Send(describe(&msg), e))?;
                    // Nothing may follow the final message, even if a stuck
                    // reader thread still holds a sender.
                    if matches!(msg, GuestMessage::Done(_) | GuestMessage::Failed { .. }) {
                        break;
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::SpawnThread("host writer", e))?;
        Ok(Outbox { tx, writer, watch })
    }
}

/// The sending half of the link once the job runs.
#[derive(Debug)]
pub struct Outbox {
    tx: Sender<GuestMessage>,
    writer: JoinHandle<Result<(), Error>>,
    watch: File,
}

impl Outbox {
    /// A handle for a thread that streams output.
    pub fn sender(&self) -> Sender<GuestMessage> {
        self.tx.clone()
    }

    /// Queues the final message (`Done` or `Failed`) and waits, boundedly,
    /// until everything before it and it have been written and the host has
    /// hung up.
    pub fn finish(self, last: GuestMessage) -> Result<(), Error> {
        let what = describe(&last);
        // A send error means the writer already died; its join says why.
        let _ = self.tx.send(last);
        drop(self.tx);
        let deadline = Instant::now() + FINAL_FLUSH;
        while !self.writer.is_finished() {
            if Instant::now() > deadline {
                let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "the host stopped reading");
                return Err(Error::Send(what, FrameError::Io(timeout)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match self.writer.join() {
            Ok(result) => result?,
            // The panic hook has already powered the VM off; unreachable in practice.
            Err(_) => return Ok(()),
        }
        if !wait_for_hangup(&self.watch, HANGUP_WAIT) {
            debug!("the host did not hang up within {HANGUP_WAIT:?}; powering off anyway");
        }
        Ok(())
    }
}

/// Reads and discards until the host closes the connection (`true`) or
/// `timeout` passes (`false`). Both transports report the close as end of
/// file: a virtio port once QEMU's chardev loses its client, a vsock
/// stream once the peer shuts down.
fn wait_for_hangup(stream: &File, timeout: Duration) -> bool {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return false,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => {
                debug!("host hung up after {} ms", started.elapsed().as_millis());
                return true;
            }
            // The protocol has nothing after Run; stray bytes are ignored.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset is a hang-up too.
            Err(_) => return true,
        }
    }
}

fn describe(msg: &GuestMessage) -> &'static str {
    match msg {
        GuestMessage::Ready { .. } => "ready",
        GuestMessage::OutputRecords { .. } => "output",
        GuestMessage::Done(_) => "the result",
        GuestMessage::TestDone { .. } => "a test result",
        GuestMessage::Failed { .. } => "the failure report",
        GuestMessage::Warmed { .. } => "the warm-up report",
        GuestMessage::StageStarted { .. } => "a stage start",
        GuestMessage::StageExited { .. } => "a stage exit",
    }
}

/// The `/sys/class/virtio-ports` entry (= the `/dev` node name) whose `name`
/// attribute is `wanted`.
fn find_port(ports: &Path, wanted: &str) -> Option<String> {
    let entries = std::fs::read_dir(ports).ok()?;
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == wanted))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    // Deterministic if a misconfigured VM names two ports the same.
    found.sort();
    found.into_iter().next()
}

/// Whether a virtio device with this ID exists (bound to a driver or not).
fn virtio_device_present(devices: &Path, id: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return false;
    };
    entries.flatten().any(|e| {
        let text = std::fs::read_to_string(e.path().join("device")).unwrap_or_default();
        parse_hex(text.trim()) == Some(id)
    })
}

fn parse_hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// Firecracker's host connects to guest port [`VSOCK_PORT`] through its
/// vsock UDS; exactly one connection is accepted, then the listener closes.
fn accept_vsock() -> Result<Link, Error> {
    let listen_err = |e| Error::VsockListen(VSOCK_PORT, e);
    // CLOEXEC everywhere: the job must never inherit the host link.
    let listener = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(listen_err)?;
    bind(listener.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, VSOCK_PORT)).map_err(listen_err)?;
    listen(&listener, Backlog::new(1).map_err(listen_err)?).map_err(listen_err)?;
    debug!("host link: waiting for a vsock connection on port {VSOCK_PORT}");
    let stream = accept_on(&listener)?;
    debug!("host link: vsock connection accepted");
    Ok(Link { stream, listener: Some(listener) })
}

/// Accepts the next connection on a vsock listener.
fn accept_on(listener: &OwnedFd) -> Result<File, Error> {
    let fd = loop {
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => break fd,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::VsockAccept(e)),
        }
    };
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(path: PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn finds_the_port_by_its_name_attribute() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path().join("vport0p0/name"), "org.qemu.guest_agent.0\n");
        write(dir.path().join("vport0p1/name"), "tvm.agent\n");
        // A port whose name has not arrived yet has no name file.
        std::fs::create_dir_all(dir.path().join("vport0p2")).unwrap();
        assert_eq!(find_port(dir.path(), "tvm.agent").as_deref(), Some("vport0p1"));
        assert_eq!(find_port(dir.path(), "tvm"), None);
        assert_eq!(find_port(&dir.path().join("missing"), "tvm.agent"), None);
    }

    fn socket_pair() -> (File, std::os::unix::net::UnixStream) {
        let (ours, host) = std::os::unix::net::UnixStream::pair().unwrap();
        (File::from(OwnedFd::from(ours)), host)
    }

    #[test]
    fn hangup_is_end_of_file_after_any_stray_bytes() {
        let (ours, mut host) = socket_pair();
        std::io::Write::write_all(&mut host, b"stray").unwrap();
        drop(host);
        assert!(wait_for_hangup(&ours, Duration::from_secs(5)));
    }

    #[test]
    fn a_host_that_never_hangs_up_is_waited_for_boundedly() {
        let (ours, _host) = socket_pair();
        let started = Instant::now();
        assert!(!wait_for_hangup(&ours, Duration::from_millis(50)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn recognises_virtio_device_ids() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path().join("virtio0/device"), "0x0002\n");
        write(dir.path().join("virtio1/device"), "0x0013\n");
        assert!(virtio_device_present(dir.path(), VIRTIO_ID_VSOCK));
        assert!(!virtio_device_present(dir.path(), VIRTIO_ID_CONSOLE));
        assert_eq!(parse_hex("0x0003"), Some(3));
        assert_eq!(parse_hex("3"), None);
    }
}
