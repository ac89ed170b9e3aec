//! Relaying a stage's stdout and stderr to the host at the cost of bytes,
//! not of writes, in the order the program wrote them.
//!
//! A program that flushes every line makes one `write(2)` per line. Turning
//! each of them into its own wake-up, frame and host round trip costs far
//! more than the write itself (under TCG a few thousand lines per second), so
//! the program ends up blocked on a full pipe. Instead each pipe has a relay
//! thread that reads it in large pieces and sends what it found as few, large
//! frames:
//!
//! - The pipes are never polled. Once anybody has `poll`ed (or `select`ed, or
//!   `epoll`ed) a pipe, Linux 6.1 wakes its readers' wait queue on *every*
//!   write from then on (`pipe->poll_usage` in `pipe_write`, for epoll's
//!   sake), where an unpolled pipe only wakes its reader when a write finds
//!   it empty. A relay thread therefore waits in a blocking `read`: the
//!   writer wakes it once per quiet spell, not once per write.
//! - While a stream is busy its thread lets its (enlarged, [`PIPE_BYTES`])
//!   pipe fill for a window without reading, then reads everything at once
//!   and sends it as one frame per [`OUTPUT_CHUNK`] bytes. Output still
//!   streams: the first bytes after a quiet spell are read and sent at once,
//!   later ones at most one window late.
//! - The window adapts ([`Window`]): it starts at [`WINDOW`] and doubles up to
//!   [`MAX_WINDOW`] while the stream stays busy, so a steady writer costs a
//!   few dozen wake-ups and frames a second (each frame is a VM exit under
//!   TCG, paid on the writer's vCPU). It halves again when a window's output
//!   filled more than half the pipe (the writer would soon block on the
//!   sleeping relay) and starts over after a quiet spell.
//! - Order across the two streams: see [Order](#order) below.
//! - Caps stay exact: every byte goes through the stream's [`Capture`], which
//!   keeps exactly `cap` bytes; the first byte beyond raises the overflow flag
//!   the supervisor kills on, and the rest is read and discarded so the
//!   writer never blocks before it dies.
//!
//! # Order
//!
//! Within a stream every kept byte arrives once, in the order written:
//! always. Across the two streams (what Piston's `output` and the native
//! API's `stdout`/`stderr` event stream show interleaved, both in the order
//! the host receives frames) the promise is:
//!
//! **On a guest with one vCPU (the default) and the relay threads at their
//! real-time priority, frames carry the bytes in the order they entered the
//! two pipes, at the granularity of one pipe write.** A `write(2)` the pipe
//! takes whole (any write of at most `PIPE_BUF`, 4096 bytes, and a larger
//! one the 1 MiB pipe has room for) is never split by bytes of the other
//! stream, and a write that starts after another one returned comes after
//! it. So a program whose writes to stdout and stderr follow one another
//! (one thread, or several that take turns) gets back exactly the order of
//! its write calls, from its first instruction on.
//!
//! How: the stage's pipes are created and both relay threads are waiting in
//! their `read`s before the program is spawned ([`Relay::spawn`] returns
//! once both run at [`RELAY_PRIORITY`]). At most one stream is in its window
//! at a time, and all output passes one batch under one lock ([`Turn`]).
//! The other stream's thread waits in its `read`, so the program's first
//! write there wakes it, and being real-time it runs before the program's
//! next system call (on the one vCPU nothing else runs in between): it first
//! reads what the busy stream's pipe holds and sends that (written before),
//! ends that stream's window, then sends its own bytes and takes the window
//! over. A window that ends on its timer reads only its own pipe: the other
//! one is empty then (a write there would already have woken its thread). A
//! program that alternates streams on every write therefore pays one
//! wake-up per switch, as with a terminal.
//!
//! Not promised:
//! - With several vCPUs (`TVM_VCPUS` > 1) the woken relay thread runs on
//!   another vCPU while the program goes on: a write to one stream made
//!   within a relay wake-up (microseconds) of a write to the other may be
//!   sent first, because both threads then hold fresh bytes and the one
//!   that takes the lock first goes first. Without the real-time priority
//!   ([`raise_priority`] failed: logged) the same holds whenever the
//!   scheduler lets the program run on before the relay.
//! - A write larger than the room left in its pipe enters it in pieces (the
//!   writer sleeps in between), so another thread's write to the other
//!   stream may come between the pieces, as it may on a terminal.
//! - Writes made at the same time by different threads (or processes) have
//!   no order of their own: whichever enters its pipe first comes first.
//! - The host's event stream turns frames into text: an incomplete UTF-8
//!   sequence at the end of a frame is held back until its stream's next
//!   frame, so those few bytes may follow the other stream's next event.
//!   The bytes of `output` and of the result are not affected.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tvm_protocol::{GuestMessage, Stage, Stream, OUTPUT_CHUNK};

use crate::error::Error;
use crate::output::Capture;

/// How long the relay lets output accumulate in a pipe between reads while
/// a program is writing. Bounds the streaming delay; long enough that a
/// program writing a line every few microseconds is read thousands of lines
/// at a time.
pub const WINDOW: Duration = Duration::from_millis(2);

/// The widest the window grows while a stream stays busy: the most a line
/// is held back while a program writes without pause (a terminal reader does
/// not notice 25 ms), and about 40 frames a second per busy stream.
pub const MAX_WINDOW: Duration = Duration::from_millis(25);

/// Pipe capacity asked for (`F_SETPIPE_SZ`, bytes): what a writer may put in
/// while the relay sleeps one window before it blocks (40 MB/s at
/// [`MAX_WINDOW`]). The pages are charged to the writer's cgroup only while
/// filled, and root may ask for up to `/proc/sys/fs/pipe-max-size` (1 MiB by
/// default).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// What one window's drain may read (bytes) before the window shrinks: half
/// the pipe, so the writer of a window of this size never found it full.
const WINDOW_FILL_BYTES: usize = PIPE_BYTES as usize / 2;

/// Most bytes read from one stream in one drain. On one vCPU the writer
/// cannot refill the pipe while the (real-time) relay drains it, so this only
/// bounds a drain racing a writer on another vCPU; what is left is read at
/// once on the next turn, still before the other stream's next bytes.
const DRAIN_BUDGET: usize = 2 * PIPE_BYTES as usize;

/// The real-time priority of the relay threads (`SCHED_FIFO`, lowest level):
/// above every program (they cannot raise their own), so a write that wakes
/// the relay is read before the writer goes on.
const RELAY_PRIORITY: libc::c_int = 1;

/// How long [`Relay::spawn`] waits for its threads to run at the relay's
/// priority (milliseconds at most on an idle guest).
const READY_WAIT: Duration = Duration::from_secs(1);

/// The two streams, in the order their captures and pipes are kept.
const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

/// Where a stream's relay thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In (or on its way into) a blocking read of a pipe it found empty:
    /// nobody else reads this pipe.
    Waiting,
    /// Letting the pipe fill until its window ends. The other stream's
    /// thread may read this pipe (under [`Shared::turn`]) and end the window.
    Window,
    /// End of file (or a pipe that can no longer be read): nothing more comes.
    Closed,
}

/// What the two relay threads share under one lock: whose window it is and
/// the output read but not sent yet. A pipe is read by the thread that does
/// not own it only under this lock while its owner is in its window, so two
/// reads of one pipe never race and none of them blocks.
#[derive(Debug)]
struct Turn {
    phase: [Phase; 2],
    batch: Batch,
}

/// What the relay threads share with each other and the supervisor.
#[derive(Debug)]
struct Shared {
    captures: Mutex<[Capture; 2]>,
    overflowed: AtomicBool,
    fds: [OwnedFd; 2],
    turn: Mutex<Turn>,
    /// Signalled when a stream's window is ended by the other stream, or
    /// when every writer is gone ([`Shared::closing`]).
    window_over: Condvar,
    /// Set (under [`Shared::turn`]) once the stage's processes are all dead:
    /// no window is worth waiting out, the pipes only hold what is left.
    closing: AtomicBool,
}

/// The threads relaying one stage's output.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    /// Disconnected once both threads have ended (each holds a sender). The
    /// threads are not joined: one blocked on a pipe that an unkillable
    /// process holds open is abandoned with the VM.
    done: mpsc::Receiver<()>,
}

/// What one stream captured: the kept bytes and whether more was cut.
pub type Captured = (Vec<u8>, bool);

impl Relay {
    /// Starts relaying the read ends of a stage's stdout and stderr pipes,
    /// keeping at most `cap` bytes of each and streaming them to `outbox`
    /// as [`GuestMessage::Output`] chunks of at most [`OUTPUT_CHUNK`] bytes.
    /// Start it before the program that writes the pipes: it returns once
    /// both threads run (at most [`READY_WAIT`]), and only writes made after
    /// that keep their order across the streams ([Order](self#order)).
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if a relay thread cannot be created. The
    /// pipes are then closed with whatever thread did start (it ends at the
    /// end of file of its pipe).
    #[cfg(test)]
    pub fn start(
        stdout: OwnedFd,
        stderr: OwnedFd,
        stage: Stage,
        cap: u64,
        outbox: Sender<GuestMessage>,
    ) -> Result<Self, Error> {
        let relay = Self::spawn(stdout, stderr)?;
        relay.configure(stage, cap, outbox);
        Ok(relay)
    }

    /// Starts the relay threads ahead of time, before the stage is known: the
    /// threads wait in their reads; [`Relay::configure`] must be called
    /// before anything writes the pipes (bytes before it would be counted
    /// against a cap of 0 and sent nowhere). The agent makes one spare this
    /// way before its job arrives (`stage::prepare_spare`).
    ///
    /// # Errors
    /// [`Error::SpawnThread`] if a relay thread cannot be created. The
    /// pipes are then closed with whatever thread did start (it ends at the
    /// end of file of its pipe).
    pub fn spawn(stdout: OwnedFd, stderr: OwnedFd) -> Result<Self, Error> {
        for fd in [&stdout, &stderr] {
            prepare_pipe(fd);
        }
        let shared = Arc::new(Shared {
            captures: Mutex::new([Capture::new(0), Capture::new(0)]),
            overflowed: AtomicBool::new(false),
            fds: [stdout, stderr],
            turn: Mutex::new(Turn {
                phase: [Phase::Waiting; 2],
                batch: Batch {
                    stage: Stage::Run,
                    stream: Stream::Stdout,
                    data: Vec::with_capacity(OUTPUT_CHUNK),
                    outbox: None,
                },
            }),
            window_over: Condvar::new(),
            closing: AtomicBool::new(false),
        });
        let (ready_tx, ready) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<()>();
        let spawn = |s: usize| {
            let state = Arc::clone(&shared);
            let ready = ready_tx.clone();
            let done = done_tx.clone();
            std::thread::Builder::new()
                .name(if s == 0 { "stdout relay" } else { "stderr relay" }.into())
                .spawn(move || {
                    raise_priority();
                    // Allocated before telling: from here to its first
                    // `read` the thread takes no lock the agent might hold.
                    let bufs = [vec![0u8; OUTPUT_CHUNK], vec![0u8; OUTPUT_CHUNK]];
                    // The receiver may have given up waiting: nothing to tell then.
                    let _ = ready.send(());
                    follow(s, &state, bufs);
                    drop(done);
                })
                .map_err(|e| Error::SpawnThread("output relay", e))
        };
        spawn(0)?;
        spawn(1)?;
        drop(done_tx);
        // Both threads at the relay's priority before the program's first
        // writes can matter: a thread that has not run yet cannot keep the
        // order of writes made before it does. Bounded: a thread that is
        // slow to start only costs that order, never the stage.
        let deadline = Instant::now() + READY_WAIT;
        for _ in 0..2 {
            if ready.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
                crate::log::debug!("output relay: a relay thread was not running after {READY_WAIT:?}");
                break;
            }
        }
        Ok(Self { shared, done })
    }

    /// Says which stage the output belongs to, keeps at most `cap` bytes of
    /// each stream, and streams them to `outbox`. Call before the program
    /// that writes the pipes starts.
    pub fn configure(&self, stage: Stage, cap: u64, outbox: Sender<GuestMessage>) {
        let mut turn = lock(&self.shared.turn);
        turn.batch.stage = stage;
        turn.batch.outbox = Some(outbox);
        *lock(&self.shared.captures) = [Capture::new(cap), Capture::new(cap)];
    }

    /// Called once every process that could write the pipes is dead: ends
    /// any window at once (what the pipes hold is all that will come) and
    /// waits at most `timeout` for both threads to read their end of file
    /// and send everything. `true` when they did; a pipe still held open by
    /// an unkillable process keeps its thread, which is then abandoned.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        {
            // Under the lock a window's wait checks the flag, so the
            // notification cannot fall between its check and its sleep.
            let _turn = lock(&self.shared.turn);
            self.shared.closing.store(true, Ordering::Relaxed);
            self.shared.window_over.notify_all();
        }
        matches!(self.done.recv_timeout(timeout), Err(mpsc::RecvTimeoutError::Disconnected))
    }

    /// Whether either stream went past its cap (the stage must be killed).
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }

    /// The captured stdout and stderr. Works even if a thread is still
    /// blocked on a pipe some unkillable process holds: it is then simply
    /// abandoned.
    pub fn take(self) -> [Captured; 2] {
        let mut captures = lock(&self.shared.captures);
        let [out, err] = &mut *captures;
        [out.take(), err.take()]
    }
}

/// A pipe large enough to hold a window's worth of output, read in blocking
/// mode (the threads wait in `read`, never in `poll`). Best effort: a small
/// pipe only costs speed.
fn prepare_pipe(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
            libc::fcntl(raw, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        libc::fcntl(raw, libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a relay thread panicked, and the panic hook
    // has already ended the VM; the data itself is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Output read but not sent yet: one stream's bytes, in order.
#[derive(Debug)]
struct Batch {
    stage: Stage,
    stream: Stream,
    data: Vec<u8>,
    /// `None` only before [`Relay::configure`], when nothing can be written.
    outbox: Option<Sender<GuestMessage>>,
}

impl Batch {
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
            if let Some(outbox) = &self.outbox {
                let _ = outbox.send(GuestMessage::Output { stage: self.stage, stream: self.stream, data });
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

/// Puts the calling thread at [`RELAY_PRIORITY`]: the relay threads, and the
/// host writer they hand frames to. All must be above the program: if a relay
/// thread blocked on a lock (the turn, the channel's, the allocator's) held
/// by a thread the program outranks, the program would run on and write to
/// both pipes before the relay's next read. At one real-time level (FIFO),
/// none preempts another inside such a lock.
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

/// The relay thread of stream `s`: waits in a read until the program writes,
/// then holds the window until the stream goes quiet or the other stream
/// takes the window over; ends at the pipe's end of file.
/// `bufs` are two read buffers of [`OUTPUT_CHUNK`] bytes: one for this
/// stream's pipe, one for the other's while the first still holds what woke
/// the thread.
fn follow(s: usize, shared: &Shared, bufs: [Vec<u8>; 2]) {
    let o = 1 - s;
    let [mut buf, mut other] = bufs;
    loop {
        // Waiting: the first write into the empty pipe wakes this read.
        let Some(n) = read_blocking(&shared.fds[s], &mut buf) else {
            lock(&shared.turn).phase[s] = Phase::Closed;
            return;
        };
        let mut turn = lock(&shared.turn);
        if turn.phase[o] == Phase::Window {
            // What the busy stream holds was written before the write that
            // woke us: it goes first, and its window is over.
            drain(shared, o, &mut turn, &mut other);
            turn.phase[o] = Phase::Waiting;
            shared.window_over.notify_all();
        }
        keep(shared, s, n, &buf, &mut turn);
        drain(shared, s, &mut turn, &mut buf);
        // The first bytes after a quiet spell go out at once: streaming.
        turn.batch.flush();
        turn.phase[s] = Phase::Window;
        let mut window = Window::new();
        let mut until = Instant::now() + window.0;
        loop {
            turn = wait_window(shared, turn, s, until);
            if turn.phase[s] != Phase::Window {
                // The other stream took over and emptied this pipe.
                break;
            }
            let drained = drain(shared, s, &mut turn, &mut buf);
            turn.batch.flush();
            let now = Instant::now();
            if drained.more {
                until = now;
            } else if drained.bytes == 0 {
                // Quiet for a whole window: wait in read again (this pipe
                // is empty, so the next write wakes us).
                turn.phase[s] = Phase::Waiting;
                break;
            } else {
                window = window.after(drained.bytes);
                until = now + window.0;
            }
        }
    }
}

/// One blocking read of `fd` into `buf`: the number of bytes read, or `None`
/// at end of file or when the pipe cannot be read any more (nothing more
/// will come either way).
fn read_blocking(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: read into a live buffer of buf.len() bytes from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => return Some(n as usize),
            n if n < 0 && Errno::last() == Errno::EINTR => continue,
            _ => return None,
        }
    }
}

/// Sleeps until `until` or until the other stream ends stream `s`'s window,
/// whichever comes first; gives the lock back held.
fn wait_window<'a>(
    shared: &'a Shared,
    mut turn: MutexGuard<'a, Turn>,
    s: usize,
    until: Instant,
) -> MutexGuard<'a, Turn> {
    loop {
        let now = Instant::now();
        if turn.phase[s] != Phase::Window || now >= until || shared.closing.load(Ordering::Relaxed) {
            return turn;
        }
        turn = match shared.window_over.wait_timeout(turn, until - now) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
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

/// Bytes waiting in pipe `fd` (`FIONREAD`); 0 when it cannot tell (the
/// pipe's own thread then finds out what happened in its blocking read).
fn waiting(fd: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a live pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Reads what stream `i`'s pipe holds into its capture and the batch,
/// through `buf` (not empty). Only under the turn lock, by the pipe's own
/// thread or while that thread is in its window, so the bytes counted are
/// there to read and no read blocks.
fn drain(shared: &Shared, i: usize, turn: &mut Turn, buf: &mut [u8]) -> Drained {
    let mut drained = Drained::default();
    loop {
        let ready = waiting(&shared.fds[i]).min(buf.len());
        if ready == 0 {
            break;
        }
        if drained.bytes >= DRAIN_BUDGET {
            drained.more = true;
            break;
        }
        // SAFETY: read into a live buffer of at least `ready` bytes from a descriptor we own.
        let n = unsafe { libc::read(shared.fds[i].as_raw_fd(), buf.as_mut_ptr().cast(), ready) };
        let n = match n {
            n if n > 0 => n as usize,
            n if n < 0 && Errno::last() == Errno::EINTR => continue,
            // End of file or an error: the pipe's own blocking read finds out.
            _ => break,
        };
        drained.bytes += n;
        keep(shared, i, n, buf, turn);
    }
    drained
}

/// Passes the first `n` bytes of `buf`, read from stream `i`, through its
/// capture into the batch.
fn keep(shared: &Shared, i: usize, n: usize, buf: &[u8], turn: &mut Turn) {
    let mut captures = lock(&shared.captures);
    let kept = captures[i].push(&buf[..n]);
    if captures[i].truncated() {
        shared.overflowed.store(true, Ordering::Relaxed);
    }
    turn.batch.push(STREAMS[i], kept);
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

    /// Receives frames into `got` until one of `stream` ends with `tail`.
    fn await_sent(rx: &mpsc::Receiver<GuestMessage>, got: &mut Vec<(Stream, Vec<u8>)>, stream: Stream, tail: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(GuestMessage::Output { stage: Stage::Run, stream: s, data }) => {
                    let done = s == stream && data.ends_with(tail);
                    got.push((s, data));
                    if done {
                        return;
                    }
                }
                other => panic!("waiting for {:?} on {stream:?}: {other:?}", String::from_utf8_lossy(tail)),
            }
        }
    }

    fn finish(relay: Relay) -> [Captured; 2] {
        assert!(relay.wait_finished(Duration::from_secs(10)), "relay did not finish");
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
        // A writer that waits for each piece to be shown, like a program
        // whose stdout and stderr go to one terminal.
        let mut got = Vec::new();
        for i in 0..40 {
            let line = format!("out {i}\n");
            out_w.write_all(line.as_bytes()).unwrap();
            await_sent(&rx, &mut got, Stream::Stdout, line.as_bytes());
            let line = format!("err {i}\n");
            err_w.write_all(line.as_bytes()).unwrap();
            await_sent(&rx, &mut got, Stream::Stderr, line.as_bytes());
        }
        drop((out_w, err_w));
        let [(out, _), (err, _)] = finish(relay);
        got.extend(frames(rx));
        let frames = got;
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
        // lines written around it, not after the window's stdout batch. The
        // writer goes on after a stderr line once it has been sent, as on the
        // guest's one vCPU, where the woken real-time relay runs before the
        // program: on a loaded test host a relay thread that gets no CPU for
        // a while would otherwise find later stdout lines already written.
        let mut got = Vec::new();
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
            await_sent(&rx, &mut got, Stream::Stderr, line.as_bytes());
        }
        drop((out_w, err_w));
        finish(relay);
        got.extend(frames(rx));
        let mut text = String::new();
        for (stream, data) in got {
            let data = String::from_utf8(data).unwrap();
            assert!(data.lines().all(|l| l.starts_with(if stream == Stream::Stdout { "out" } else { "err" })));
            text.push_str(&data);
        }
        assert_eq!(text, expected);
    }

    #[test]
    fn a_full_read_behind_the_other_streams_window_keeps_order() {
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, u64::MAX, tx).unwrap();
        // Stderr opens its window; one stdout write larger than a read buffer
        // then wakes the stdout thread with a full buffer, and what stderr
        // holds must still go first, followed by every stdout byte.
        let big: Vec<u8> = (0..OUTPUT_CHUNK * 3 / 2).map(|i| b'a' + (i % 26) as u8).collect();
        let mut expected: Vec<(Stream, Vec<u8>)> = Vec::new();
        for round in 0..5 {
            for j in 0..2 {
                let line = format!("err {round}.{j}\n").into_bytes();
                err_w.write_all(&line).unwrap();
                expected.push((Stream::Stderr, line));
                std::thread::sleep(Duration::from_millis(1));
            }
            out_w.write_all(&big).unwrap();
            expected.push((Stream::Stdout, big.clone()));
            std::thread::sleep(Duration::from_millis(3));
        }
        drop((out_w, err_w));
        let [(out, _), (err, _)] = finish(relay);
        assert_eq!(out.len(), big.len() * 5);
        assert_eq!(
            err.len(),
            expected.iter().filter(|(s, _)| *s == Stream::Stderr).map(|(_, d)| d.len()).sum::<usize>()
        );
        // Frames may split a stream's run of bytes, never reorder them.
        let mut got: Vec<(Stream, Vec<u8>)> = Vec::new();
        for (stream, data) in frames(rx) {
            match got.last_mut() {
                Some((s, d)) if *s == stream => d.extend_from_slice(&data),
                _ => got.push((stream, data)),
            }
        }
        let mut want: Vec<(Stream, Vec<u8>)> = Vec::new();
        for (stream, data) in expected {
            match want.last_mut() {
                Some((s, d)) if *s == stream => d.extend_from_slice(&data),
                _ => want.push((stream, data)),
            }
        }
        assert!(got == want, "streams out of order: {:?}", got.iter().map(|(s, d)| (*s, d.len())).collect::<Vec<_>>());
    }

    #[test]
    fn one_stream_closing_early_leaves_the_other_relayed() {
        let (out_r, out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let (tx, rx) = mpsc::channel();
        let relay = Relay::start(out_r, err_r, Stage::Run, u64::MAX, tx).unwrap();
        drop(out_w);
        let mut expected = Vec::new();
        for i in 0..20_000 {
            let line = format!("{i}\n");
            err_w.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        drop(err_w);
        let [(out, _), (err, err_cut)] = finish(relay);
        assert!(out.is_empty());
        assert_eq!((err, err_cut), (expected.clone(), false));
        let streamed: Vec<u8> = frames(rx)
            .into_iter()
            .flat_map(|(s, d)| {
                assert_eq!(s, Stream::Stderr);
                d
            })
            .collect();
        assert_eq!(streamed, expected);
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

    /// The agent's spare: threads started long before the stage is known,
    /// configured just before the program runs, relay exactly as a relay
    /// started for the stage (its stage label, its cap).
    #[test]
    fn a_relay_spawned_ahead_and_configured_later_relays_for_its_stage() {
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let relay = Relay::spawn(out_r, err_r).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = mpsc::channel();
        relay.configure(Stage::Compile, 5, tx);
        out_w.write_all(b"hello world\n").unwrap();
        err_w.write_all(b"e\n").unwrap();
        drop((out_w, err_w));
        let [(out, out_cut), (err, err_cut)] = finish(relay);
        assert_eq!((out.as_slice(), out_cut), (&b"hello"[..], true));
        assert_eq!((err.as_slice(), err_cut), (&b"e\n"[..], false));
        let msgs: Vec<GuestMessage> = rx.try_iter().collect();
        assert!(!msgs.is_empty());
        assert!(
            msgs.iter().all(|m| matches!(m, GuestMessage::Output { stage: Stage::Compile, .. })),
            "every frame is labelled with the configured stage: {msgs:?}"
        );
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
        let mut batch = Batch { stage: Stage::Run, stream: Stream::Stdout, data: Vec::new(), outbox: Some(tx) };
        batch.push(Stream::Stdout, &vec![b'a'; OUTPUT_CHUNK + 10]);
        batch.push(Stream::Stderr, b"e");
        batch.push(Stream::Stdout, b"b");
        batch.flush();
        drop(batch);
        let got: Vec<(Stream, usize)> = frames(rx).into_iter().map(|(s, d)| (s, d.len())).collect();
        assert_eq!(
            got,
            vec![(Stream::Stdout, OUTPUT_CHUNK), (Stream::Stdout, 10), (Stream::Stderr, 1), (Stream::Stdout, 1)]
        );
    }
}
