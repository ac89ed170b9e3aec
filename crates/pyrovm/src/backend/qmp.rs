//! A minimal QMP client (QEMU's monitor protocol) on an inherited
//! socketpair, for what TVM asks of a running QEMU: saving a template VM's
//! device state and starting a clone's incoming migration
//! (the QEMU side of templates says how they fit together).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, Instant};

/// What went wrong talking QMP: the socket, the greeting, a command QEMU
/// refused (its error), a reply out of bounds, or a migration that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QmpError(pub String);

/// How long QEMU may take to answer, and a save to complete.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest QMP reply line accepted (QEMU's replies here are a few hundred bytes).
const MAX_QMP_LINE: usize = 64 << 10;

/// A QMP monitor on inherited descriptor `qmp_fd`.
pub fn qmp_args(qmp_fd: i32) -> Vec<String> {
    vec!["-chardev".into(), format!("socket,id=qmp,fd={qmp_fd}"), "-mon".into(), "chardev=qmp,mode=control".into()]
}

/// QEMU arguments of a VM to be restored: a QMP monitor on inherited
/// descriptor `qmp_fd` and an incoming migration that waits for
/// [`start_incoming`].
pub fn restore_args(qmp_fd: RawFd) -> Vec<String> {
    let mut a = qmp_args(qmp_fd);
    a.extend(["-incoming".into(), "defer".into()]);
    a
}

/// Over the restoring VMM's monitor `qmp` ([`restore_args`]): turns on
/// `x-ignore-shared` and starts loading the device state from the VMM's
/// inherited descriptor `state_fd`. QEMU runs the guest once it is loaded,
/// and exits if the load fails. Blocking (QMP replies within 120 s).
///
/// # Errors
/// [`QmpError`]: the socket, the greeting or a command failed.
pub fn start_incoming(qmp: StdUnixStream, state_fd: RawFd) -> Result<(), QmpError> {
    let mut qmp = Qmp::connect(qmp)?;
    qmp.ignore_shared()?;
    qmp.execute("migrate-incoming", Some(serde_json::json!({"uri": format!("fd:{state_fd}")})), None)?;
    Ok(())
}

/// A minimal QMP client on the VMM's monitor socket: line-delimited JSON,
/// one command at a time, every read bounded in size and time.
pub(crate) struct Qmp {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Qmp {
    /// Reads QEMU's greeting and leaves negotiation mode.
    pub(crate) fn connect(stream: StdUnixStream) -> Result<Self, QmpError> {
        let err = |e: std::io::Error| QmpError(format!("socket: {e}"));
        stream.set_read_timeout(Some(SAVE_TIMEOUT)).map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None, None)?;
        Ok(qmp)
    }

    /// Turns on `x-ignore-shared`: RAM the VMM maps shared is neither sent
    /// nor expected in the stream.
    pub(crate) fn ignore_shared(&mut self) -> Result<(), QmpError> {
        let caps = serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        self.execute("migrate-set-capabilities", Some(caps), None).map(drop)
    }

    /// Pauses the guest and migrates its device state into `state`
    /// (`x-ignore-shared`: its shared RAM stays out), waiting until QEMU
    /// reports the migration completed.
    pub(crate) fn save(&mut self, state: &File) -> Result<(), QmpError> {
        self.execute("stop", None, None)?;
        self.ignore_shared()?;
        // QEMU 7.2 takes an outgoing migration fd only by name (`getfd`, the
        // descriptor riding along as SCM_RIGHTS); a `file:` URI needs 8.2.
        self.execute("getfd", Some(serde_json::json!({"fdname": "state"})), Some(state.as_raw_fd()))?;
        self.execute("migrate", Some(serde_json::json!({"uri": "fd:state"})), None)?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let info = self.execute("query-migrate", None, None)?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError(format!("migration {}", info.get("error-desc").unwrap_or(&info))))
                }
                _ if Instant::now() > deadline => {
                    return Err(QmpError(format!("migration not done within {} s", SAVE_TIMEOUT.as_secs())))
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Runs one command and returns its `return` value; events are skipped.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
        fd: Option<i32>,
    ) -> Result<serde_json::Value, QmpError> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        let sent = match fd {
            Some(fd) => send_with_fd(&self.writer, &line, fd),
            None => self.writer.write_all(&line),
        };
        sent.map_err(|e| QmpError(format!("sending {command}: {e}")))?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError(format!("{command}: {e}")));
            }
        }
    }

    fn read_message(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_QMP_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| QmpError(format!("reading: {e}")))?;
        if n == 0 {
            return Err(QmpError("the VMM closed its monitor".into()));
        }
        if !line.ends_with(b"\n") {
            return Err(QmpError(format!("reply longer than {MAX_QMP_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| QmpError(format!("unparsable reply: {e}")))
    }
}

/// Writes `data` with `fd` attached as SCM_RIGHTS (QMP `getfd`).
fn send_with_fd(stream: &StdUnixStream, data: &[u8], fd: i32) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    if n != data.len() {
        // The descriptor went with the first part; the rest is plain data.
        (&*stream).write_all(&data[n..])?;
    }
    Ok(())
}
