//! Relaying a stage's stdout and stderr to the host at the cost of bytes,
//! not of writes.
//!
//! A program that flushes every line makes one `write(2)` per line. Turning
//! each of them into its own wake-up, frame and host round trip costs far
//! more than the write itself (under TCG a few thousand lines per second), so
//! the program ends up blocked on a full pipe. Instead one thread drains both
//! pipes with large reads and sends what it found as few, large frames:
//!
//! - It blocks in `poll` until either pipe has data, reads everything that is
//!   there, sends it, then sleeps a window before reading again, so a
//!   program writing small pieces fills the (enlarged) pipe without waking
//!   anybody, and each window's output leaves as one frame per stream run of
//!   at most [`OUTPUT_CHUNK`] bytes. Output still streams: the first bytes
//!   after a quiet spell are sent at once, later ones at most one window late.
//! - The window adapts ([`Window`]): it starts at [`WINDOW`] and doubles up to
//!   [`MAX_WINDOW`] while the stream stays busy, so a steady writer costs a
//!   few dozen wake-ups and frames a second instead of hundreds (each frame
//!   is a VM exit under TCG, paid on the writer's vCPU). It halves again when
//!   a window's output filled more than half the pipe (the writer would soon
//!   block on the sleeping relay) and starts over after a quiet spell.
//! - Order across the two streams is what the relay observes and is never
//!   changed afterwards: a batch is sent whenever the stream changes. While
//!   only one stream is active the window cannot reorder anything; once both
//!   have been active within [`SHARED_QUIET`], the relay stops sleeping and
//!   reads each piece as it arrives (as a terminal's reader would), so
//!   interleaved stdout/stderr keeps its order to the granularity of the
//!   writes, at the old per-write cost. Only the first window in which the
//!   second stream wakes up can be ambiguous.
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

/// Once both streams produced output within this span of each other, the
/// relay reads every write as it comes instead of batching by time, so the
/// order of interleaved stdout and stderr is kept.
pub const SHARED_QUIET: Duration = Duration::from_millis(50);

/// Pipe capacity asked for (`F_SETPIPE_SZ`): what a writer may put in while
/// the relay sleeps one [`WINDOW`] before it blocks (128 MB/s at 2 ms).
/// The pages are charged to the writer's cgroup only while filled.
const PIPE_BYTES: libc::c_int = 256 << 10;

/// What one window's drain may read before the window shrinks: half the pipe,
/// so the writer of a window of this size never found it full.
const WINDOW_FILL_BYTES: usize = PIPE_BYTES as usize / 2;

/// Most bytes read from one stream per drain before the other gets its turn.
const DRAIN_BUDGET: usize = 4 * OUTPUT_CHUNK;

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

/// What one drain found.
#[derive(Debug, Default)]
struct Drained {
    /// Bytes read, per stream.
    bytes: [usize; 2],
    /// A stream had more than [`DRAIN_BUDGET`] waiting.
    more: bool,
}

fn pump(fds: [OwnedFd; 2], stage: Stage, shared: &Shared, outbox: &Sender<GuestMessage>) {
    let mut open = [true, true];
    let mut last_output: [Option<Instant>; 2] = [None, None];
    let mut active = 0usize;
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut batch = Batch { stage, stream: Stream::Stdout, data: Vec::with_capacity(OUTPUT_CHUNK), outbox };
    while open.iter().any(|o| *o) {
        wait_readable(&fds, open);
        // After a quiet spell the first bytes leave at once and the window
        // starts narrow, so a program that prints now and then streams promptly.
        let mut window = Window::new();
        let mut slept = false;
        loop {
            // The stream that was writing goes first: its bytes in the pipe
            // are the older ones if the other stream just woke up.
            let order = [active, 1 - active];
            let drained = drain(&fds, order, &mut open, &mut buf, shared, &mut batch);
            batch.flush();
            let now = Instant::now();
            for (last, bytes) in last_output.iter_mut().zip(drained.bytes) {
                if bytes > 0 {
                    *last = Some(now);
                }
            }
            if drained.bytes[active] == 0 && drained.bytes[1 - active] > 0 {
                active = 1 - active;
            }
            if drained.bytes == [0, 0] || !open.iter().any(|o| *o) {
                break;
            }
            if drained.more {
                continue;
            }
            let interleaving = last_output.iter().all(|t| t.is_some_and(|t| now.duration_since(t) < SHARED_QUIET));
            if interleaving {
                break;
            }
            // Only a drain after a full window says how busy the stream is;
            // the first one after `poll` found a single write or so.
            if slept {
                window = window.after(drained.bytes[0] + drained.bytes[1]);
            }
            std::thread::sleep(window.0);
            slept = true;
        }
    }
    batch.flush();
}

/// Blocks until an open stream has data or hung up.
fn wait_readable(fds: &[OwnedFd; 2], open: [bool; 2]) {
    let mut polled: Vec<PollFd<'_>> =
        fds.iter().zip(open).filter(|(_, o)| *o).map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN)).collect();
    loop {
        match poll(&mut polled, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            // Anything else (readable, hung up, even an error) is found out by read.
            _ => return,
        }
    }
}

/// Reads what the open streams hold, in `order`, into their captures and
/// the batch.
fn drain(
    fds: &[OwnedFd; 2],
    order: [usize; 2],
    open: &mut [bool; 2],
    buf: &mut [u8],
    shared: &Shared,
    batch: &mut Batch<'_>,
) -> Drained {
    let mut drained = Drained::default();
    for i in order {
        while open[i] {
            if drained.bytes[i] >= DRAIN_BUDGET {
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
            drained.bytes[i] += n;
            let mut captures = lock(&shared.captures);
            let kept = captures[i].push(&buf[..n]);
            if captures[i].truncated() {
                shared.overflowed.store(true, Ordering::Relaxed);
            }
            batch.push(STREAMS[i], kept);
        }
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
