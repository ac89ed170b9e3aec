//! Relaying a stage's stdout and stderr to the host at the cost of bytes,
//! not of writes, in the order the program wrote them.
//!
//! A program that flushes every line makes one `write(2)` per line. Turning
//! each of them into its own wake-up, frame and host round trip costs far
//! more than the write itself (under TCG a few thousand lines per second), so
//! the program ends up blocked on a full pipe. Instead one thread drains both
//! pipes with large reads and sends what it found as few, large frames:
//!
//! - While a stream is busy the relay lets its (enlarged, [`PIPE_BYTES`])
//!   pipe fill for a window without waking up, then reads everything at once
//!   and sends it as one frame per [`OUTPUT_CHUNK`] bytes. Output still
//!   streams: the first bytes after a quiet spell are read at once, later
//!   ones at most one window late.
//! - The window adapts ([`Window`]): it starts at [`WINDOW`] and doubles up to
//!   [`MAX_WINDOW`] while the stream stays busy, so a steady writer costs a
//!   few dozen wake-ups and frames a second (each frame is a VM exit under
//!   TCG, paid on the writer's vCPU). It halves again when a window's output
//!   filled more than half the pipe (the writer would soon block on the
//!   sleeping relay) and starts over after a quiet spell.
//! - Order across the two streams is the order of the writes. During a
//!   window the relay still waits on the *other* stream's pipe: its first
//!   write ends the window, everything already in the busy pipe is read and
//!   sent first (it was written before), then the other stream's bytes, and
//!   the window moves to that stream. The relay thread runs at a real-time
//!   priority ([`raise_priority`]), so on the guest's single vCPU a write
//!   that wakes it is read before the program makes its next system call:
//!   interleaved stdout and stderr (Piston's `output`) keep the order of the
//!   writes exactly, and a program that alternates streams on every write
//!   pays one wake-up per switch, as with a terminal.
//! - Caps stay exact: every byte goes through the stream's [`Capture`], which
//!   keeps exactly `cap` bytes; the first byte beyond raises the overflow flag
//!   the supervisor kills on, and the rest is read and discarded so the
//!   writer never blocks before it dies.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tvm_protocol::{GuestMessage, Stage, Stream, OUTPUT_CHUNK};

use crate::error::Error;
use crate::output::Capture;

/// How long the relay lets output accumulate in the pipes between reads
/// while a program is writing. Bounds the streaming delay; long enough that
/// a program writing a line every few microseconds is read thousands of lines
/// at a time.
pub const WINDOW: Duration = Duration::from_millis(2);

/// The widest the window grows while a stream stays busy: the most a line
/// is held back while a program writes without pause (a terminal reader does
/// not notice 25 ms), and about 40 frames a second per busy stream.
pub const MAX_WINDOW: Duration = Duration::from_millis(25);

/// Pipe capacity asked for (`F_SETPIPE_SZ`): what a writer may put in while
/// the relay sleeps one window before it blocks (40 MB/s at [`MAX_WINDOW`]).
/// The pages are charged to the writer's cgroup only while filled, and root
/// may ask for up to `/proc/sys/fs/pipe-max-size` (1 MiB by default).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// What one window's drain may read before the window shrinks: half the pipe,
/// so the writer of a window of this size never found it full.
const WINDOW_FILL_BYTES: usize = PIPE_BYTES as usize / 2;

/// Most bytes read from one stream in one go. On one vCPU the writer cannot
/// refill the pipe while the (real-time) relay drains it, so this only
/// bounds a drain racing a writer on another vCPU; what is left is read on
/// the next turn, still before the other stream.
const DRAIN_BUDGET: usize = 2 * PIPE_BYTES as usize;

/// The real-time priority of the relay thread (`SCHED_FIFO`, lowest level):
/// above every program (they cannot raise their own), so a write that wakes
/// the relay is read before the writer goes on.
const RELAY_PRIORITY: libc::c_int = 1;

/// The two streams, in the order their captures are kept.
const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

/// What the relay shares with the supervisor.
#[derive(Debug)]
struct Shared {
    captures: Mutex<[Capture; 2]>,
    overflowed: AtomicBool,
}

/// The thread relaying one stage's output.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

/// What one stream captured: the kept bytes and whether more was cut.
pub type Captured = (Vec<u8>, bool);

impl Relay {
    /// Starts relaying the read ends of a stage's stdout and stderr pipes,
    /// keeping at most `cap` bytes of each and streaming them to `outbox`
    /// as [`GuestMessage::Output`] chunks of at most [`OUTPUT_CHUNK`] bytes.
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if the thread cannot be created.
    pub fn start(
        stdout: OwnedFd,
        stderr: OwnedFd,
        stage: Stage,
        cap: u64,
        outbox: Sender<GuestMessage>,
    ) -> Result<Self, Error> {
        let shared = Arc::new(Shared {
            captures: Mutex::new([Capture::new(cap), Capture::new(cap)]),
            overflowed: AtomicBool::new(false),
        });
        for fd in [&stdout, &stderr] {
            prepare_pipe(fd);
        }
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("output relay".into())
            .spawn(move || pump([stdout, stderr], stage, &state, &outbox))
            .map_err(|e| Error::SpawnThread("output relay", e))?;
        Ok(Self { shared, thread })
    }

    /// Whether either stream went past its cap (the stage must be killed).
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// Whether both streams reached end of file and everything was sent.
    pub fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// The captured stdout and stderr. Works even if the thread is still
    /// blocked on a pipe some unkillable process holds: it is then simply
    /// abandoned.
    pub fn take(self) -> [Captured; 2] {
        let mut captures = lock(&self.shared.captures);
        let [out, err] = &mut *captures;
        [out.take(), err.take()]
    }
}

/// Non-blocking reads (the relay decides when to wait), and a pipe large
/// enough to hold a window's worth of output. Both are best effort: a
/// blocking or small pipe only costs speed.
fn prepare_pipe(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        libc::fcntl(raw, libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
}

fn lock(captures: &Mutex<[Capture; 2]>) -> MutexGuard<'_, [Capture; 2]> {
    // A poisoned lock only means the relay panicked, and the panic hook has
    // already ended the VM; the data itself is still consistent.
    captures.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Output read but not sent yet: one stream's bytes, in order.
struct Batch<'a> {
    stage: Stage,
    stream: Stream,
    data: Vec<u8>,
    outbox: &'a Sender<GuestMessage>,
}

impl Batch<'_> {
    /// Appends `bytes` of `stream`, sending what came before first if the
    /// stream changes and whenever a frame is full.
    fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        if stream != self.stream {
            self.flush();
            self.stream = stream;
        }
        while !bytes.is_empty() {
            let room = OUTPUT_CHUNK - self.data.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.data.extend_from_slice(now);
            bytes = rest;
            if self.data.len() == OUTPUT_CHUNK {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        if !self.data.is_empty() {
            let data = std::mem::replace(&mut self.data, Vec::with_capacity(OUTPUT_CHUNK));
            // The writer only goes away with the VM.
            let _ = self.outbox.send(GuestMessage::Output { stage: self.stage, stream: self.stream, data });
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

    /// The window after a drain that read `bytes` (both streams).
    fn after(self, bytes: usize) -> Self {
        let next = if bytes > WINDOW_FILL_BYTES { self.0 / 2 } else { self.0 * 2 };
        Self(next.clamp(WINDOW, MAX_WINDOW))
    }
}

/// The stream the relay is batching: it is read when its window ends or
/// when the other stream writes, whichever comes first.
#[derive(Debug, Clone, Copy)]
struct Busy {
    stream: usize,
    until: Instant,
    window: Window,
}

impl Busy {
    fn new(stream: usize, now: Instant) -> Self {
        Self { stream, until: now + WINDOW, window: Window::new() }
    }
}

/// Puts the calling thread at [`RELAY_PRIORITY`]: the relay, and the host
/// writer it hands frames to. Both must be above the program: if the relay
/// blocked on a lock (the channel's, the allocator's) held by a thread the
/// program outranks, the program would run on and write to both pipes
/// before the relay's next read. At one real-time level (FIFO), neither
/// preempts the other inside such a lock.
///
/// Best effort: without the real-time priority (another kernel, a seccomp
/// policy) order across the streams is only as good as the scheduler's
/// wake-up preemption.
pub fn raise_priority() {
    let param = libc::sched_param { sched_priority: RELAY_PRIORITY };
    // SAFETY: sets the calling thread's policy from a live parameter block.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        crate::log::debug!("output relay keeps the normal priority: {}", std::io::Error::last_os_error());
    }
}

fn pump(fds: [OwnedFd; 2], stage: Stage, shared: &Shared, outbox: &Sender<GuestMessage>) {
    raise_priority();
    let mut open = [true, true];
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut batch = Batch { stage, stream: Stream::Stdout, data: Vec::with_capacity(OUTPUT_CHUNK), outbox };
    let mut busy: Option<Busy> = None;
    while open.iter().any(|o| *o) {
        let Some(current) = busy else {
            // Quiet: the first write of either stream wakes the relay, and
            // that stream becomes the busy one. Both ready at once only
            // happens when the relay was not waiting yet (or on several
            // vCPUs); then stdout goes first.
            let ready = wait_readable(&fds, open, None);
            let mut next = None;
            for (i, _) in ready.iter().enumerate().filter(|(_, r)| **r) {
                if drain(&fds, i, &mut open, &mut buf, shared, &mut batch).bytes > 0 {
                    next = Some(i);
                }
            }
            batch.flush();
            busy = next.map(|i| Busy::new(i, Instant::now()));
            continue;
        };
        // The window: wait on the other stream only.
        let s = current.stream;
        let mut others = open;
        others[s] = false;
        let ready = wait_readable(&fds, others, Some(current.until));
        // What the busy stream holds was written before whatever woke us.
        let drained = drain(&fds, s, &mut open, &mut buf, shared, &mut batch);
        let o = 1 - s;
        let switched = (ready[o] && drain(&fds, o, &mut open, &mut buf, shared, &mut batch).bytes > 0).then_some(o);
        batch.flush();
        let now = Instant::now();
        busy = match switched {
            Some(o) => Some(Busy::new(o, now)),
            None if drained.more => Some(Busy { until: now, ..current }),
            None if drained.bytes == 0 || !open[s] => None,
            None => {
                let window = if now >= current.until { current.window.after(drained.bytes) } else { current.window };
                Some(Busy { stream: s, until: now + window.0, window })
            }
        };
    }
    batch.flush();
}

/// Blocks until an open stream in `open` has data or hung up, or until
/// `deadline`; says which are ready. With no stream to wait on it just
/// sleeps until the deadline.
fn wait_readable(fds: &[OwnedFd; 2], open: [bool; 2], deadline: Option<Instant>) -> [bool; 2] {
    let index: Vec<usize> = (0..2).filter(|i| open[*i]).collect();
    let mut polled: Vec<PollFd<'_>> = index.iter().map(|i| PollFd::new(fds[*i].as_fd(), PollFlags::POLLIN)).collect();
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: waking before the deadline would only poll again.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut polled, timeout) {
            Err(Errno::EINTR) => continue,
            Ok(0) => return [false, false],
            Ok(_) => {
                let mut ready = [false, false];
                for (i, p) in index.iter().zip(&polled) {
                    // Readable, hung up, even an error: found out by read.
                    ready[*i] = p.revents().is_some_and(|r| !r.is_empty());
                }
                return ready;
            }
            // Not expected for pipes; reading tells what happened. Paced, so
            // a poll that keeps failing cannot spin the real-time thread.
            Err(_) => {
                std::thread::sleep(WINDOW);
                return open;
            }
        }
    }
}

/// What one drain found.
#[derive(Debug, Default)]
struct Drained {
    /// Bytes read.
    bytes: usize,
    /// More than [`DRAIN_BUDGET`] was waiting.
    more: bool,
}

/// Reads what stream `i` holds into its capture and the batch.
fn drain(
    fds: &[OwnedFd; 2],
    i: usize,
    open: &mut [bool; 2],
    buf: &mut [u8],
    shared: &Shared,
    batch: &mut Batch<'_>,
) -> Drained {
    let mut drained = Drained::default();
    while open[i] {
        if drained.bytes >= DRAIN_BUDGET {
            drained.more = true;
            break;
        }
        // SAFETY: read into a live buffer of buf.len() bytes from a descriptor we own.
        let n = unsafe { libc::read(fds[i].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = match n {
            0 => {
                open[i] = false;
                break;
            }
            n if n > 0 => n as usize,
            _ => match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => break,
                // Not a pipe we can read any more: nothing more will come.
                _ => {
                    open[i] = false;
                    break;
                }
            },
        };
        drained.bytes += n;
        let mut captures = lock(&shared.captures);
        let kept = captures[i].push(&buf[..n]);
        if captures[i].truncated() {
            shared.overflowed.store(true, Ordering::Relaxed);
        }
        batch.push(STREAMS[i], kept);
    }
    drained
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    fn pipe() -> (OwnedFd, std::fs::File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (r, std::fs::File::from(w))
    }

    /// Collects the relay's frames once both writers are closed.
    fn frames(rx: mpsc::Receiver<GuestMessage>) -> Vec<(Stream, Vec<u8>)> {
        rx.into_iter()
            .map(|m| match m {
                GuestMessage::Output { stage: Stage::Run, stream, data } => (stream, data),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn finish(relay: Relay) -> [Captured; 2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.finished() {
            assert!(Instant::now() < deadline, "relay did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
        relay.take()
    }

    #[test]
    fn many_small_writes_arrive_whole_in_few_frames() {
        let (out_r, mut out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, u64::MAX, tx).unwrap();
        let mut expected = Vec::new();
        for i in 0..50_000 {
            let line = format!("{i}\n");
            out_w.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        drop((out_w, err_w));
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!(out, expected);
        assert!(!out_cut && !err_cut && err.is_empty());
        let frames = frames(rx);
        let streamed: Vec<u8> = frames.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        assert_eq!(streamed, expected, "the stream carries exactly the captured bytes");
        assert!(frames.iter().all(|(s, d)| *s == Stream::Stdout && d.len() <= OUTPUT_CHUNK));
        assert!(frames.len() < 5_000, "{} frames for 50000 writes: not coalesced", frames.len());
    }

    #[test]
    fn alternating_streams_keep_their_order() {
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, u64::MAX, tx).unwrap();
        // A writer that waits for each piece to be read, like a program
        // whose stdout and stderr go to one terminal, and one that does not.
        for i in 0..40 {
            out_w.write_all(format!("out {i}\n").as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            err_w.write_all(format!("err {i}\n").as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        drop((out_w, err_w));
        let [(out, _), (err, _)] = finish(relay);
        let frames = frames(rx);
        let mut text = String::new();
        for (stream, data) in &frames {
            for line in String::from_utf8_lossy(data).lines() {
                assert!(line.starts_with(if *stream == Stream::Stdout { "out" } else { "err" }));
                text.push_str(line);
                text.push('\n');
            }
        }
        let expected: String = (0..40).map(|i| format!("out {i}\nerr {i}\n")).collect();
        assert_eq!(text, expected);
        assert_eq!(out.len() + err.len(), expected.len());
    }

    #[test]
    fn a_write_on_the_other_stream_ends_the_window() {
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, u64::MAX, tx).unwrap();
        // Stdout keeps the relay in its window (writes well inside MAX_WINDOW
        // of each other); each stderr line must still come between the stdout
        // lines written around it, not after the window's stdout batch.
        let mut expected = String::new();
        for i in 0..30 {
            for j in 0..3 {
                let line = format!("out {i}.{j}\n");
                out_w.write_all(line.as_bytes()).unwrap();
                expected.push_str(&line);
                std::thread::sleep(Duration::from_millis(1));
            }
            let line = format!("err {i}\n");
            err_w.write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
            std::thread::sleep(Duration::from_millis(1));
        }
        drop((out_w, err_w));
        finish(relay);
        let mut text = String::new();
        for (stream, data) in frames(rx) {
            let data = String::from_utf8(data).unwrap();
            assert!(data.lines().all(|l| l.starts_with(if stream == Stream::Stdout { "out" } else { "err" })));
            text.push_str(&data);
        }
        assert_eq!(text, expected);
    }

    #[test]
    fn cap_is_exact_and_overflow_is_flagged_while_draining_on() {
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, 1000, tx).unwrap();
        err_w.write_all(b"warning\n").unwrap();
        // Far more than the pipe holds: the relay must keep reading past the cap.
        let chunk = [b'x'; 4096];
        for _ in 0..1024 {
            out_w.write_all(&chunk).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.overflowed() {
            assert!(Instant::now() < deadline, "overflow never flagged");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop((out_w, err_w));
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!((out.len(), out_cut), (1000, true));
        assert_eq!((err.as_slice(), err_cut), (&b"warning\n"[..], false));
        let streamed: usize = frames(rx).iter().filter(|(s, _)| *s == Stream::Stdout).map(|(_, d)| d.len()).sum();
        assert_eq!(streamed, 1000, "exactly the kept bytes are streamed");
    }

    #[test]
    fn window_widens_while_busy_and_narrows_when_the_pipe_fills() {
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
    fn batches_split_at_the_frame_size_and_at_stream_changes() {
        let (tx, rx) = mpsc::channel();
        let mut batch = Batch { stage: Stage::Run, stream: Stream::Stdout, data: Vec::new(), outbox: &tx };
        batch.push(Stream::Stdout, &vec![b'a'; OUTPUT_CHUNK + 10]);
        batch.push(Stream::Stderr, b"e");
        batch.push(Stream::Stdout, b"b");
        batch.flush();
        drop(tx);
        let got: Vec<(Stream, usize)> = frames(rx).into_iter().map(|(s, d)| (s, d.len())).collect();
        assert_eq!(
            got,
            vec![(Stream::Stdout, OUTPUT_CHUNK), (Stream::Stdout, 10), (Stream::Stderr, 1), (Stream::Stdout, 1)]
        );
    }
}
