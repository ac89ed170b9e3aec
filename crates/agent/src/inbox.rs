//! What the host sends while an interactive job runs (protocol 3): stdin
//! chunks, end of input and signals.
//!
//! One thread reads the host link (bounded frames, [`MAX_SESSION_FRAME`])
//! and keeps the state the stages use: bytes not yet written to the run
//! stage's stdin (at most [`MAX_STDIN_PENDING`]), whether the host said end
//! of input, and signals waiting for the supervisor. The run stage's stdin
//! pipe is written non-blocking, so a program that stops reading never
//! stalls the reading of signals; input sent before the run stage starts
//! (during compilation) waits for it, as a terminal's type-ahead does.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tvm_protocol::{FrameDecoder, HostMessage, MAX_SESSION_FRAME, MAX_STDIN_PENDING};

use crate::error::Error;
use crate::log::debug;

/// How long the reader waits for the host before retrying a stdin pipe the
/// program has not drained (bounds the delay of buffered input).
const RETRY: Duration = Duration::from_millis(10);

/// How long it waits when it has nothing to write.
const IDLE: Duration = Duration::from_millis(100);

/// Signals kept for the supervisor between two of its ticks; a host sending
/// more than this in 5 ms is flooding, and the excess is dropped.
const MAX_QUEUED_SIGNALS: usize = 16;

/// The session's input side, shared by the reader thread and the stages.
#[derive(Debug, Clone)]
pub struct Inbox {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes received but not yet written to the run stage.
    pending: Vec<u8>,
    /// The host sent `StdinEof`.
    eof: bool,
    /// The running run stage's stdin (non-blocking), until closed.
    pipe: Option<OwnedFd>,
    /// Signals for the running stage, oldest first.
    signals: Vec<i32>,
}

impl Inbox {
    /// Starts reading `link` (a second descriptor of the host link), with
    /// `initial` as the first stdin bytes (the job's own `stdin`).
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if the reader thread cannot start.
    pub fn start(link: File, mut initial: Vec<u8>) -> Result<Self, Error> {
        initial.truncate(MAX_STDIN_PENDING);
        let inbox = Inbox { state: Arc::new(Mutex::new(State { pending: initial, ..State::default() })) };
        let reader = inbox.clone();
        std::thread::Builder::new()
            .name("host reader".into())
            .spawn(move || reader.read_host(link))
            .map_err(|e| Error::SpawnThread("host reader", e))?;
        Ok(inbox)
    }

    /// Called right before a stage's program starts: signals sent while no
    /// stage (or another one) ran are not for this one. Not at [`Inbox::attach`]:
    /// the program runs by then, and a signal the host sent as soon as it saw
    /// the program's first output would be dropped.
    pub fn begin_stage(&self) {
        self.lock().signals.clear();
    }

    /// Hands over the run stage's stdin pipe (its program already runs) and
    /// writes what is pending.
    pub fn attach(&self, pipe: OwnedFd) {
        let raw = pipe.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let mut st = self.lock();
        st.pipe = Some(pipe);
        st.flush();
    }

    /// Called when a stage ends: closes the run stage's stdin.
    pub fn detach(&self) {
        self.lock().pipe = None;
    }

    /// Signals received since the last call (for the running stage).
    pub fn take_signals(&self) -> Vec<i32> {
        std::mem::take(&mut self.lock().signals)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic anywhere powers the VM off (main's hook), so poison never matters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader thread: decodes host frames until the host hangs up or
    /// breaks the protocol (then the host ends the VM anyway).
    fn read_host(&self, mut link: File) {
        let mut decoder = FrameDecoder::new(MAX_SESSION_FRAME);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let waiting = {
                let mut st = self.lock();
                st.flush();
                st.pipe.is_some() && !st.pending.is_empty()
            };
            let timeout = if waiting { RETRY } else { IDLE };
            let mut fds = [PollFd::new(link.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    debug!("host reader: poll failed: {e}");
                    return;
                }
            }
            let n = match link.read(&mut buf) {
                Ok(0) => {
                    debug!("host reader: the host hung up");
                    return;
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {
                    continue
                }
                Err(e) => {
                    debug!("host reader: {e}");
                    return;
                }
            };
            decoder.push(&buf[..n]);
            loop {
                match decoder.next_frame::<HostMessage>() {
                    Ok(Some(msg)) => self.lock().apply(msg),
                    Ok(None) => break,
                    Err(e) => {
                        debug!("host reader: bad frame, ignoring the rest of the input: {e}");
                        return;
                    }
                }
            }
        }
    }
}

impl State {
    fn apply(&mut self, msg: HostMessage) {
        match msg {
            HostMessage::Stdin { data } => {
                if self.eof {
                    debug!("host reader: stdin after end of input, dropped");
                    return;
                }
                let room = MAX_STDIN_PENDING.saturating_sub(self.pending.len());
                if data.len() > room {
                    debug!("host reader: {} stdin bytes over the pending cap, dropped", data.len() - room);
                }
                self.pending.extend_from_slice(&data[..data.len().min(room)]);
                self.flush();
            }
            HostMessage::StdinEof => {
                self.eof = true;
                self.flush();
            }
            HostMessage::Signal { signal } => {
                if !(1..=31).contains(&signal) {
                    debug!("host reader: signal {signal} is not a standard signal, ignored");
                } else if self.signals.len() >= MAX_QUEUED_SIGNALS {
                    debug!("host reader: too many queued signals, {signal} dropped");
                } else {
                    self.signals.push(signal);
                }
            }
            HostMessage::Run(_) | HostMessage::Prewarm(_) | HostMessage::Resume(_) => {
                debug!("host reader: job or template message while a job runs, ignored");
            }
        }
    }

    /// Writes as much pending input as the pipe takes without blocking, and
    /// closes the pipe once end of input is reached and everything is written.
    fn flush(&mut self) {
        let Some(pipe) = &self.pipe else {
            return;
        };
        while !self.pending.is_empty() {
            match nix::unistd::write(pipe, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    // EPIPE: the program closed its stdin or is gone; later input has nowhere to go.
                    debug!("stdin pipe: {e}; dropping {} pending bytes", self.pending.len());
                    self.pending.clear();
                    self.pipe = None;
                    return;
                }
            }
        }
        if self.eof {
            debug!("stdin: end of input");
            self.pipe = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn frame(msg: &HostMessage) -> Vec<u8> {
        tvm_protocol::encode(msg)
    }

    #[test]
    fn stdin_flows_in_order_then_eof_closes_the_pipe_and_signals_queue() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let inbox = Inbox::start(File::from(OwnedFd::from(ours)), b"first ".to_vec()).unwrap();
        let (mut rd, wr) = std::io::pipe().unwrap();
        host.write_all(&frame(&HostMessage::Stdin { data: b"second".to_vec() })).unwrap();
        host.write_all(&frame(&HostMessage::Signal { signal: 99 })).unwrap();
        host.write_all(&frame(&HostMessage::Signal { signal: 2 })).unwrap();
        // Before a stage begins, input waits and signals are not for it.
        std::thread::sleep(Duration::from_millis(150));
        inbox.begin_stage();
        // A signal sent once the program runs but before its stdin is attached is its.
        host.write_all(&frame(&HostMessage::Signal { signal: 1 })).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        inbox.attach(OwnedFd::from(wr));
        host.write_all(&frame(&HostMessage::Signal { signal: 15 })).unwrap();
        host.write_all(&frame(&HostMessage::StdinEof)).unwrap();
        host.write_all(&frame(&HostMessage::Stdin { data: b"late".to_vec() })).unwrap();
        let mut got = Vec::new();
        // End of file only comes once the inbox closes the pipe after StdinEof.
        rd.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"first second");
        assert_eq!(inbox.take_signals(), vec![1, 15]);
        assert!(inbox.take_signals().is_empty());
    }

    #[test]
    fn oversized_frames_stop_the_reader_without_touching_the_stage() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let inbox = Inbox::start(File::from(OwnedFd::from(ours)), Vec::new()).unwrap();
        host.write_all(&((MAX_SESSION_FRAME as u32 + 1).to_be_bytes())).unwrap();
        host.write_all(&frame(&HostMessage::Signal { signal: 2 })).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(inbox.take_signals().is_empty());
        let mut st = State::default();
        st.apply(HostMessage::Stdin { data: vec![0; MAX_STDIN_PENDING + 10] });
        assert_eq!(st.pending.len(), MAX_STDIN_PENDING, "pending input is capped");
    }
}
