//! Relaying a stage's stdout and stderr to the host at the cost of bytes,
//! not of writes, in the order the program wrote them.
//!
//! A program's stdout and stderr are not pipes but the two writer nodes of
//! TVM's output channel, a driver in the guest kernel
//! (`guest/kernel/tvm_output.c`): each `write(2)` is one copy into a ring of
//! [`RING_BYTES`] that the two streams share, as records (a `u32` header:
//! bit 31 stderr, bits 0–30 length; then the bytes). Under TCG a write there
//! costs little more than one to `/dev/null`, where a pipe write cost about
//! twice that (docs/performance.md, "Output relay"). This module reads the
//! channel's reader node and sends what it finds as few, large frames:
//!
//! - One thread, waiting in a blocking `read` of the reader node. The driver
//!   wakes it only when a write finds the ring empty, so a program that
//!   writes without pause costs one wake-up per quiet spell, not per write.
//! - While output keeps coming the thread lets the ring fill for a window
//!   without reading, then reads everything at once and sends it as one
//!   frame of records (both streams, in order) per [`OUTPUT_CHUNK`] bytes. Output still
//!   streams: the first bytes after a quiet spell are read and sent at once,
//!   later ones at most one window late.
//! - The window adapts ([`Window`]): it starts at [`WINDOW`] and doubles up to
//!   [`MAX_WINDOW`] while output stays busy, so a steady writer costs a few
//!   dozen wake-ups and frames a second (each frame is a VM exit under TCG,
//!   paid on the writer's vCPU). It halves again when a window's output
//!   filled more than half the ring (the writer would soon block on the
//!   sleeping relay) and starts over after a quiet spell.
//! - Caps stay exact: every byte goes through its stream's [`Capture`],
//!   which takes exactly `cap` bytes (and keeps them only for tests, whose
//!   frames reach nobody; a streamed stage's result does not repeat its
//!   output, protocol 6); the first byte beyond raises the
//!   overflow flag the supervisor kills on, and the rest is read and
//!   discarded so the writer never blocks before it dies.
//! - What the reader node returns is parsed as untrusted input
//!   ([`Records`]): a record may arrive split across reads, and a length
//!   that cannot be right ends the relay's parsing (logged) instead of
//!   reading out of bounds.
//!
//! # Order
//!
//! **Bytes arrive in the order they entered the ring, at the granularity of
//! one `write(2)`, across both streams and on any number of vCPUs.** The
//! driver appends each write under the channel's one lock, so the ring holds
//! the writes in the order they happened, and the relay sends records in
//! ring order. A write of at most
//! `PIPE_BUF` (4096) bytes is never split; a larger one that finds the ring
//! short of room enters in pieces (the writer sleeps in between), so another
//! thread's write may come between the pieces, as on a pipe or a terminal.
//! Writes made at the same time by different threads have no order of their
//! own: whichever takes the lock first comes first.
//!
//! Not promised: the host's event stream turns frames into text, and an
//! incomplete UTF-8 sequence at the end of a frame is held back until its
//! stream's next frame, so those few bytes may follow the other stream's
//! next event. The bytes of `output` and of the result are not affected.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tvm_protocol::{GuestMessage, OutputRecords, Stage, Stream, OUTPUT_CHUNK};

use crate::error::Error;
use crate::output::Capture;

/// The output channel's reader node: each open makes a new channel, and the
/// writer nodes opened after it write into that one (root only, `0600`).
pub const OUTPUT_NODE: &str = "/dev/tvm-output";

/// The writer nodes of the current channel's stdout and stderr (`0222`: the
/// job reopens them through `/dev/stdout` and `/dev/stderr`).
pub const STREAM_NODES: [&str; 2] = ["/dev/tvm-stdout", "/dev/tvm-stderr"];

/// How long the relay lets output accumulate between reads while a program
/// is writing. Bounds the streaming delay; long enough that a program
/// writing a line every few microseconds is read thousands of lines at a time.
pub const WINDOW: Duration = Duration::from_millis(2);

/// The widest the window grows while output stays busy: the most a line is
/// held back while a program writes without pause (a terminal reader does
/// not notice 25 ms), and about 40 frames a second.
pub const MAX_WINDOW: Duration = Duration::from_millis(25);

/// The channel's ring (bytes, records' headers included): what a writer may
/// put in while the relay sleeps one window before it blocks (40 MB/s at
/// [`MAX_WINDOW`]). The driver's `TVM_OUT_RING`.
pub const RING_BYTES: usize = 1 << 20;

/// What one window's drain may read (bytes) before the window shrinks: half
/// the ring, so the writer of a window of this size never found it full.
const WINDOW_FILL_BYTES: usize = RING_BYTES / 2;

/// Most bytes read in one drain. On one vCPU the writer cannot refill the
/// ring while the (real-time) relay drains it, so this only bounds a drain
/// racing a writer on another vCPU; the rest is read on the next turn.
const DRAIN_BUDGET: usize = 2 * RING_BYTES;

/// The relay's read buffer: at least the driver's `TVM_OUT_READ_MIN` (one
/// header and the largest record, 64 KiB), which it refuses smaller reads
/// below.
const READ_BYTES: usize = 256 << 10;

/// Room reserved for one frame's records: a full chunk and the headers of
/// a few dozen records.
const FRAME_CAPACITY: usize = OUTPUT_CHUNK + 256;

/// A record's header: `u32`, native-endian (the guest's own kernel wrote it).
const HEADER_BYTES: usize = 4;

/// The header's stream bit (set: stderr).
const STDERR_BIT: u32 = 1 << 31;

/// The largest record the driver makes (`TVM_OUT_REC_MAX`).
const RECORD_MAX: usize = 64 << 10;

/// The real-time priority of the relay thread and of the host writer it
/// hands frames to (`SCHED_FIFO`, lowest level): above every program (they
/// cannot raise their own), so a program blocked on a full ring or a frame
/// waiting to go out never waits for the program's own time slice.
const RELAY_PRIORITY: libc::c_int = 1;

/// How long [`Relay::spawn`] waits for its thread to run (milliseconds at
/// most on an idle guest).
const READY_WAIT: Duration = Duration::from_secs(1);

/// What the relay thread shares with the supervisor.
#[derive(Debug)]
struct Shared {
    captures: Mutex<[Capture; 2]>,
    overflowed: AtomicBool,
    fd: OwnedFd,
    batch: Mutex<Batch>,
    /// Set once the stage's processes are all dead: no window is worth
    /// waiting out, the ring only holds what is left.
    closing: Mutex<bool>,
    /// Signalled when [`Shared::closing`] is set.
    closing_set: Condvar,
    /// An eventfd made readable when [`Shared::closing`] is set: the thread
    /// waits on it next to the reader node, so it ends without the
    /// channel's end of file (a descriptor of the channel may outlive every
    /// process of the stage, e.g. in flight in a Unix socket).
    closing_fd: OwnedFd,
}

/// The thread relaying one stage's output.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    /// Disconnected once the thread has ended (it holds the sender). The
    /// thread is not joined: one blocked on a channel that an unkillable
    /// process holds open is abandoned with the VM.
    done: mpsc::Receiver<()>,
}

/// What one stream captured: the kept bytes and whether more was cut.
pub type Captured = (Vec<u8>, bool);

impl Relay {
    /// Starts relaying the reader `fd` of an output channel (or, in tests,
    /// of a pipe carrying the same records), keeping at most `cap` bytes of
    /// each stream and streaming them to `outbox` as
    /// [`GuestMessage::OutputRecords`] of at most [`OUTPUT_CHUNK`] bytes.
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if the relay thread cannot be created.
    #[cfg(test)]
    pub fn start(fd: OwnedFd, stage: Stage, cap: u64, outbox: Sender<GuestMessage>) -> Result<Self, Error> {
        let relay = Self::spawn(fd)?;
        relay.configure(stage, cap, outbox, true);
        Ok(relay)
    }

    /// Starts the relay thread ahead of time, before the stage is known: it
    /// waits in its read; [`Relay::configure`] must be called before
    /// anything writes the channel (bytes before it would be counted against
    /// a cap of 0 and sent nowhere). The agent makes one spare this way
    /// before its job arrives (`stage::prepare_spare`).
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if the relay thread cannot be created (the
    /// reader is then closed, which ends the channel for its writers).
    pub fn spawn(fd: OwnedFd) -> Result<Self, Error> {
        // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::SpawnThread("output relay", std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor eventfd just returned, owned by nobody else.
        let closing_fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            captures: Mutex::new([Capture::new(0), Capture::new(0)]),
            overflowed: AtomicBool::new(false),
            fd,
            batch: Mutex::new(Batch::new()),
            closing: Mutex::new(false),
            closing_set: Condvar::new(),
            closing_fd,
        });
        let (ready_tx, ready) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<()>();
        let state = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("output relay".into())
            .spawn(move || {
                raise_priority();
                // Allocated before telling: from here to its first `read`
                // the thread takes no lock the agent might hold.
                let buf = vec![0u8; READ_BYTES];
                // The receiver may have given up waiting: nothing to tell then.
                let _ = ready_tx.send(());
                follow(&state, buf);
                drop(done_tx);
            })
            .map_err(|e| Error::SpawnThread("output relay", e))?;
        // Bounded: a thread that is slow to start only delays the first read.
        if ready.recv_timeout(READY_WAIT).is_err() {
            crate::log::debug!("output relay: the relay thread was not running after {READY_WAIT:?}");
        }
        Ok(Self { shared, done })
    }

    /// Says which stage the output belongs to, takes at most `cap` bytes of
    /// each stream, and streams them to `outbox`; with `keep`, also keeps
    /// them for [`Relay::take`] (tests, whose `outbox` reaches nobody).
    /// Call before the program that writes the channel starts.
    pub fn configure(&self, stage: Stage, cap: u64, outbox: Sender<GuestMessage>, keep: bool) {
        let mut batch = lock(&self.shared.batch);
        batch.stage = stage;
        batch.outbox = Some(outbox);
        *lock(&self.shared.captures) = [Capture::with(cap, keep), Capture::with(cap, keep)];
    }

    /// Called once every process that could write the channel is dead: ends
    /// any window at once (what the ring holds is all that will come) and
    /// waits at most `timeout` for the thread to read what the ring holds
    /// and send everything. `true` when it did. It does not wait for the
    /// channel's end of file: a writer descriptor that outlives the stage's
    /// processes (sent over a Unix socket and never received) holds no
    /// more output.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        *lock(&self.shared.closing) = true;
        self.shared.closing_set.notify_all();
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.shared.closing_fd.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
        matches!(self.done.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Disconnected))
    }

    /// Whether either stream went past its cap (the stage must be killed).
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// The captured stdout and stderr (no bytes unless configured to keep
    /// them). Works even if the thread is still blocked on a channel some
    /// unkillable process holds: it is then simply abandoned, and what it
    /// had taken but not sent is sent from here, before the stage's result
    /// (the host's copy of a streamed stage's output is what was sent).
    pub fn take(self) -> [Captured; 2] {
        lock(&self.shared.batch).flush();
        let mut captures = lock(&self.shared.captures);
        let [out, err] = &mut *captures;
        [out.take(), err.take()]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means the relay thread panicked, and the panic
    // hook has already ended the VM; the data itself is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Output read but not sent yet: both streams' bytes, in the order written.
/// A frame ([`GuestMessage::OutputRecords`]) ends when it holds
/// [`OUTPUT_CHUNK`] bytes or at the end of a drain, never at a stream
/// change: a program that alternates stdout and stderr on every write costs
/// frames by the byte, as any other (one frame per switch queued one
/// `OUTPUT_CHUNK`-sized buffer per write for the host writer, and ran a
/// guest out of memory).
#[derive(Debug)]
struct Batch {
    stage: Stage,
    records: OutputRecords,
    /// `None` only before [`Relay::configure`], when nothing can be written.
    outbox: Option<Sender<GuestMessage>>,
}

impl Batch {
    fn new() -> Self {
        Self { stage: Stage::Run, records: OutputRecords::with_capacity(FRAME_CAPACITY), outbox: None }
    }

    /// Appends `bytes` of `stream`, sending a frame whenever one is full.
    fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = OUTPUT_CHUNK - self.records.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.records.push(stream, now);
            bytes = rest;
            if self.records.len() == OUTPUT_CHUNK {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        if !self.records.is_empty() {
            let records = std::mem::replace(&mut self.records, OutputRecords::with_capacity(FRAME_CAPACITY));
            // The writer only goes away with the VM.
            if let Some(outbox) = &self.outbox {
                let _ = outbox.send(GuestMessage::OutputRecords { stage: self.stage, records: records.into_blob() });
            }
        }
    }
}

/// The sleep between drains while output keeps coming: [`WINDOW`] after a
/// quiet spell, doubled after every drain that found output but filled less
/// than [`WINDOW_FILL_BYTES`], halved after one that filled more, never above
/// [`MAX_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window(Duration);

impl Window {
    fn new() -> Self {
        Self(WINDOW)
    }

    /// The window after a drain that read `bytes`.
    fn after(self, bytes: usize) -> Self {
        let next = if bytes > WINDOW_FILL_BYTES { self.0 / 2 } else { self.0 * 2 };
        Self(next.clamp(WINDOW, MAX_WINDOW))
    }
}

/// Splits what the reader node returns into records. The driver returns
/// whole records, but nothing here relies on it: a record split across
/// reads is put back together ([`Records::pending`]), and a header whose
/// length exceeds the driver's largest record stops parsing for good (the
/// bytes are not output a program wrote).
#[derive(Debug, Default)]
struct Records {
    /// The start of a record whose end has not been read yet.
    pending: Vec<u8>,
    /// A bad header was seen: everything after it is dropped.
    broken: bool,
}

impl Records {
    /// Calls `each(stream, bytes)` for every complete record in what came
    /// before and `data`, in order.
    fn feed(&mut self, data: &[u8], mut each: impl FnMut(Stream, &[u8])) {
        if self.broken {
            return;
        }
        let mut owned = std::mem::take(&mut self.pending);
        let all: &[u8] = if owned.is_empty() {
            data
        } else {
            owned.extend_from_slice(data);
            &owned
        };
        let mut at = 0;
        while all.len() - at >= HEADER_BYTES {
            let mut header = [0u8; HEADER_BYTES];
            header.copy_from_slice(&all[at..at + HEADER_BYTES]);
            let header = u32::from_ne_bytes(header);
            let len = (header & !STDERR_BIT) as usize;
            if len > RECORD_MAX {
                crate::log::debug!("output relay: a record header claims {len} bytes; dropping what follows");
                self.broken = true;
                return;
            }
            if all.len() - at - HEADER_BYTES < len {
                break;
            }
            let stream = if header & STDERR_BIT == 0 { Stream::Stdout } else { Stream::Stderr };
            each(stream, &all[at + HEADER_BYTES..at + HEADER_BYTES + len]);
            at += HEADER_BYTES + len;
        }
        self.pending = all[at..].to_vec();
    }
}

/// Puts the calling thread at [`RELAY_PRIORITY`]: the relay thread, and the
/// host writer it hands frames to. Best effort (another kernel, a seccomp
/// policy): without it the relay only answers later.
pub fn raise_priority() {
    let param = libc::sched_param { sched_priority: RELAY_PRIORITY };
    // SAFETY: sets the calling thread's policy from a live parameter block.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        crate::log::debug!("output relay keeps the normal priority: {}", std::io::Error::last_os_error());
    }
}

/// The relay thread: waits until the program writes, then holds the window
/// until output goes quiet; ends at the channel's end of file (every writer
/// closed), or once the stage is over and the ring is drained.
fn follow(shared: &Shared, mut buf: Vec<u8>) {
    let mut records = Records::default();
    loop {
        if !wait_readable(shared) {
            drain(shared, &mut records, &mut buf);
            lock(&shared.batch).flush();
            return;
        }
        let Some(n) = read_blocking(&shared.fd, &mut buf) else {
            return;
        };
        keep(shared, &mut records, &buf[..n]);
        drain(shared, &mut records, &mut buf);
        lock(&shared.batch).flush();
        let mut window = Window::new();
        let mut until = Instant::now() + window.0;
        loop {
            wait_window(shared, until);
            let drained = drain(shared, &mut records, &mut buf);
            lock(&shared.batch).flush();
            let now = Instant::now();
            if drained.more {
                until = now;
            } else if drained.bytes == 0 {
                break;
            } else {
                window = window.after(drained.bytes);
                until = now + window.0;
            }
        }
    }
}

/// Waits until the reader has output or its end of file (`true`), or the
/// stage is over (`false`). The reader's wait queue is woken only by a
/// write into an empty ring, as for a blocking read.
fn wait_readable(shared: &Shared) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(shared.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.closing_fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            // Unexpected: let the blocking read decide.
            Err(_) => return true,
            Ok(_) => {}
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return true;
        }
        if fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
            return false;
        }
    }
}

/// A blocking read; `None` at end of file (or if the node can no longer be read).
fn read_blocking(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: reads into a live buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => return usize::try_from(n).ok(),
            n if n < 0 && Errno::last() == Errno::EINTR => continue,
            n => {
                if n < 0 {
                    crate::log::debug!("output relay: read failed: {}", std::io::Error::last_os_error());
                }
                return None;
            }
        }
    }
}

/// Sleeps until `until`, or less once the stage's processes are all dead.
fn wait_window(shared: &Shared, until: Instant) {
    let mut closing = lock(&shared.closing);
    loop {
        let now = Instant::now();
        if *closing || now >= until {
            return;
        }
        closing = match shared.closing_set.wait_timeout(closing, until - now) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}

/// What one drain read.
#[derive(Debug, Default)]
struct Drained {
    bytes: usize,
    /// Stopped at [`DRAIN_BUDGET`] with bytes still waiting.
    more: bool,
}

/// Bytes waiting in the ring (`FIONREAD`); 0 if unknown.
fn waiting(fd: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the live location given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Reads what the ring holds without blocking (only this thread reads it,
/// so what `FIONREAD` reports stays there until read).
fn drain(shared: &Shared, records: &mut Records, buf: &mut [u8]) -> Drained {
    let mut drained = Drained::default();
    loop {
        if waiting(&shared.fd) == 0 {
            break;
        }
        if drained.bytes >= DRAIN_BUDGET {
            drained.more = true;
            break;
        }
        // SAFETY: reads into a live buffer of the given length.
        let n = unsafe { libc::read(shared.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) if Errno::last() == Errno::EINTR => continue,
            Err(_) => break,
        };
        drained.bytes += n;
        keep(shared, records, &buf[..n]);
    }
    drained
}

/// Captures and batches the records in `data`.
fn keep(shared: &Shared, records: &mut Records, data: &[u8]) {
    let mut captures = lock(&shared.captures);
    let mut batch = lock(&shared.batch);
    records.feed(data, |stream, bytes| {
        let i = usize::from(stream == Stream::Stderr);
        let kept = captures[i].push(bytes);
        if captures[i].truncated() {
            shared.overflowed.store(true, Ordering::Relaxed);
        }
        batch.push(stream, kept);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    /// A stand-in for the guest driver's writer side (the driver exists only
    /// in the guest kernel; the VM suites `fidelity` and `sessions` test the
    /// real one): records written into a pipe, exactly as the driver lays
    /// them out. The pipe may split them across reads, which the relay must
    /// (and the driver never does) put back together.
    struct Writer(std::fs::File);

    impl Writer {
        fn write(&mut self, stream: Stream, bytes: &[u8]) {
            for piece in bytes.chunks(RECORD_MAX) {
                let bit = if stream == Stream::Stderr { STDERR_BIT } else { 0 };
                let header = (bit | u32::try_from(piece.len()).unwrap()).to_ne_bytes();
                let mut record = header.to_vec();
                record.extend_from_slice(piece);
                self.0.write_all(&record).unwrap();
            }
        }
    }

    fn channel() -> (OwnedFd, Writer) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (r, Writer(std::fs::File::from(w)))
    }

    /// Collects the relay's frames once the writer is closed, each as its
    /// records `(stream, bytes)`.
    fn frames(rx: mpsc::Receiver<GuestMessage>) -> Vec<Vec<(Stream, Vec<u8>)>> {
        frames_labelled(rx, Stage::Run)
    }

    /// [`frames`] of a relay configured for `stage`.
    fn frames_labelled(rx: mpsc::Receiver<GuestMessage>, want: Stage) -> Vec<Vec<(Stream, Vec<u8>)>> {
        rx.into_iter()
            .map(|m| match m {
                GuestMessage::OutputRecords { stage, records } if stage == want => {
                    OutputRecords::parse(&records).unwrap().into_iter().map(|(s, d)| (s, d.to_vec())).collect()
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// The frames' records, in order.
    fn records(frames: &[Vec<(Stream, Vec<u8>)>]) -> Vec<(Stream, Vec<u8>)> {
        frames.iter().flatten().cloned().collect()
    }

    fn finish(relay: Relay) -> [Captured; 2] {
        assert!(relay.wait_finished(Duration::from_secs(10)), "relay did not finish");
        relay.take()
    }

    #[test]
    fn many_small_writes_arrive_whole_in_few_frames() {
        let (fd, mut w) = channel();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(fd, Stage::Run, u64::MAX, tx).unwrap();
        let mut expected = Vec::new();
        for i in 0..50_000 {
            let line = format!("{i}\n");
            w.write(Stream::Stdout, line.as_bytes());
            expected.extend_from_slice(line.as_bytes());
        }
        drop(w);
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!(out, expected);
        assert!(!out_cut && !err_cut && err.is_empty());
        let frames = frames(rx);
        let streamed: Vec<u8> = records(&frames).into_iter().flat_map(|(_, d)| d).collect();
        assert_eq!(streamed, expected, "the stream carries exactly the captured bytes");
        assert!(frames.iter().all(|f| f.iter().map(|(_, d)| d.len()).sum::<usize>() <= OUTPUT_CHUNK));
        assert!(records(&frames).iter().all(|(s, _)| *s == Stream::Stdout));
        assert!(frames.len() < 5_000, "{} frames for 50000 writes: not coalesced", frames.len());
    }

    #[test]
    fn records_keep_their_order_across_streams_in_frames() {
        let (fd, mut w) = channel();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(fd, Stage::Run, u64::MAX, tx).unwrap();
        let mut expected: Vec<(Stream, Vec<u8>)> = Vec::new();
        for i in 0..2_000 {
            // Runs of one to three writes per stream, as a program that
            // alternates streams irregularly.
            for j in 0..(i % 3 + 1) {
                let stream = if i % 2 == 0 { Stream::Stdout } else { Stream::Stderr };
                let line = format!("{stream:?} {i}.{j}\n").into_bytes();
                w.write(stream, &line);
                match expected.last_mut() {
                    Some((s, d)) if *s == stream => d.extend_from_slice(&line),
                    _ => expected.push((stream, line)),
                }
            }
        }
        drop(w);
        finish(relay);
        // Frames may split a stream's run of bytes, never reorder them, and
        // a stream change does not end a frame.
        let frames = frames(rx);
        assert!(frames.len() < 100, "{} frames for 8000 writes alternating streams", frames.len());
        let mut got: Vec<(Stream, Vec<u8>)> = Vec::new();
        for (stream, data) in records(&frames) {
            match got.last_mut() {
                Some((s, d)) if *s == stream => d.extend_from_slice(&data),
                _ => got.push((stream, data)),
            }
        }
        assert!(got == expected, "{} runs, {} expected", got.len(), expected.len());
    }

    #[test]
    fn cap_is_exact_and_overflow_is_flagged_while_draining_on() {
        let (fd, mut w) = channel();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(fd, Stage::Run, 1000, tx).unwrap();
        w.write(Stream::Stderr, b"warning\n");
        // Far more than a pipe holds: the relay must keep reading past the cap.
        let chunk = [b'x'; 4096];
        for _ in 0..1024 {
            w.write(Stream::Stdout, &chunk);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.overflowed() {
            assert!(Instant::now() < deadline, "overflow never flagged");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(w);
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!((out.len(), out_cut), (1000, true));
        assert_eq!((err.as_slice(), err_cut), (&b"warning\n"[..], false));
        let streamed: usize =
            records(&frames(rx)).iter().filter(|(s, _)| *s == Stream::Stdout).map(|(_, d)| d.len()).sum();
        assert_eq!(streamed, 1000, "exactly the kept bytes are streamed");
    }

    /// The agent's spare: a thread started long before the stage is known,
    /// configured just before the program runs, relays exactly as a relay
    /// started for the stage (its stage label, its cap). Configured as a
    /// streamed stage's, it keeps nothing: the frames carry the output, cut
    /// at the same byte, and `take` gives only the truncation flags.
    #[test]
    fn a_relay_spawned_ahead_and_configured_later_relays_for_its_stage() {
        let (fd, mut w) = channel();
        let relay = Relay::spawn(fd).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = mpsc::channel();
        relay.configure(Stage::Compile, 5, tx, false);
        w.write(Stream::Stdout, b"hello world\n");
        w.write(Stream::Stderr, b"e\n");
        drop(w);
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!((out.as_slice(), out_cut), (&b""[..], true));
        assert_eq!((err.as_slice(), err_cut), (&b""[..], false));
        let msgs: Vec<GuestMessage> = rx.try_iter().collect();
        assert!(!msgs.is_empty());
        assert!(
            msgs.iter().all(|m| matches!(m, GuestMessage::OutputRecords { stage: Stage::Compile, .. })),
            "every frame is labelled with the configured stage: {msgs:?}"
        );
        let (tx, rx) = mpsc::channel();
        msgs.into_iter().for_each(|m| tx.send(m).unwrap());
        drop(tx);
        assert_eq!(
            records(&frames_labelled(rx, Stage::Compile)),
            vec![(Stream::Stdout, b"hello".to_vec()), (Stream::Stderr, b"e\n".to_vec())]
        );
    }

    /// A writer descriptor that outlives the stage's processes (in flight in
    /// a Unix socket) holds no more output: the relay sends what the ring
    /// holds and ends without the channel's end of file.
    #[test]
    fn a_writer_outliving_the_stage_does_not_hold_the_relay() {
        let (fd, mut w) = channel();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(fd, Stage::Run, u64::MAX, tx).unwrap();
        w.write(Stream::Stdout, b"before the end\n");
        assert!(relay.wait_finished(Duration::from_secs(10)), "the relay waited for an end of file");
        let [(out, _), _] = relay.take();
        assert_eq!(out, b"before the end\n");
        assert_eq!(records(&frames(rx)), vec![(Stream::Stdout, b"before the end\n".to_vec())]);
        drop(w);
    }

    fn record(stream: Stream, bytes: &[u8]) -> Vec<u8> {
        let bit = if stream == Stream::Stderr { STDERR_BIT } else { 0 };
        let mut r = (bit | u32::try_from(bytes.len()).unwrap()).to_ne_bytes().to_vec();
        r.extend_from_slice(bytes);
        r
    }

    #[test]
    fn records_split_anywhere_are_put_back_together() {
        let mut data = record(Stream::Stdout, b"first\n");
        data.extend(record(Stream::Stderr, b""));
        data.extend(record(Stream::Stderr, &[b'e'; 70_000][..RECORD_MAX]));
        data.extend(record(Stream::Stdout, b"last"));
        let mut want = Vec::new();
        Records::default().feed(&data, |s, b| want.push((s, b.to_vec())));
        assert_eq!(want.len(), 4);
        for piece in [1, 3, 4, 5, 4096] {
            let mut records = Records::default();
            let mut got = Vec::new();
            for chunk in data.chunks(piece) {
                records.feed(chunk, |s, b| got.push((s, b.to_vec())));
            }
            assert!(got == want, "pieces of {piece} bytes");
            assert!(records.pending.is_empty());
        }
    }

    #[test]
    fn a_record_longer_than_the_driver_makes_stops_parsing() {
        let mut data = record(Stream::Stdout, b"kept\n");
        data.extend(u32::try_from(RECORD_MAX + 1).unwrap().to_ne_bytes());
        data.extend(record(Stream::Stdout, b"after a bad header\n"));
        let mut records = Records::default();
        let mut got = Vec::new();
        records.feed(&data, |s, b| got.push((s, b.to_vec())));
        records.feed(&record(Stream::Stdout, b"later\n"), |s, b| got.push((s, b.to_vec())));
        assert_eq!(got, vec![(Stream::Stdout, b"kept\n".to_vec())]);
        assert!(records.broken);
    }

    #[test]
    fn window_widens_while_busy_and_narrows_when_the_ring_fills() {
        let mut w = Window::new();
        assert_eq!(w.0, WINDOW);
        let mut widths = Vec::new();
        for _ in 0..6 {
            w = w.after(100);
            widths.push(w.0.as_millis());
        }
        assert_eq!(widths, [4, 8, 16, 25, 25, 25]);
        assert_eq!(w.after(WINDOW_FILL_BYTES + 1).0, MAX_WINDOW / 2);
        assert_eq!(Window::new().after(WINDOW_FILL_BYTES + 1).0, WINDOW, "never below the narrowest window");
    }

    #[test]
    fn batches_split_at_the_frame_size_not_at_stream_changes() {
        let (tx, rx) = mpsc::channel();
        let mut batch = Batch::new();
        batch.outbox = Some(tx);
        batch.push(Stream::Stdout, &vec![b'a'; OUTPUT_CHUNK + 10]);
        batch.push(Stream::Stderr, b"e");
        batch.push(Stream::Stdout, b"b");
        batch.flush();
        drop(batch);
        let got: Vec<Vec<(Stream, usize)>> =
            frames(rx).into_iter().map(|f| f.into_iter().map(|(s, d)| (s, d.len())).collect()).collect();
        assert_eq!(
            got,
            vec![
                vec![(Stream::Stdout, OUTPUT_CHUNK)],
                vec![(Stream::Stdout, 10), (Stream::Stderr, 1), (Stream::Stdout, 1)]
            ]
        );
    }
}
