//! `tvm bench --relay`: how fast a program's short writes get through the
//! output relay, next to the same program writing to `/dev/null` in the guest.
//!
//! Each program times its own write loop (monotonic clock, inside the
//! guest) and reports it on stderr; the only difference between the two runs
//! of a row is whether fd 1 is the stage's stdout (TVM's output channel,
//! read by the relay) or `/dev/null` (the program `dup2`s it when given
//! `null`), so the ratio is the relay's cost per write. The pipe floor
//! column shows what a pipe would cost instead (stages had pipes before the
//! channel).
//! A relay run only counts if every byte arrived, in order.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pyrovm::{ExecutionRequest, LimitRequest, Pyrovm, SourceFile};
use tvm_protocol::{Stage, Stream, Verdict};

/// One program of the bench: prints `0\n1\n...` up to `lines - 1`, one
/// write per line, and reports `loop_ns=<n>` on stderr. Its second argument
/// says where fd 1 goes: absent, the stage's stdout (the output channel);
/// `null`, `/dev/null`;
/// `pipe`, a pipe of the program's own that nobody else reads (the floor:
/// what the pipe write itself costs), emptied by the program every
/// [`FLOOR_DRAIN_LINES`] lines so it never blocks.
struct Program {
    name: &'static str,
    runtime: &'static str,
    file: &'static str,
    source: &'static str,
    /// Whether the program has the `pipe` mode (Java cannot put a pipe of
    /// its own on a file descriptor it writes with `write(2)` per line).
    floor: bool,
}

/// How often the `pipe` mode empties its pipe: 4096 lines of at most 7 bytes
/// fit the smallest (64 KiB) pipe, should `F_SETPIPE_SZ` be refused.
const FLOOR_DRAIN_LINES: u64 = 4096;

/// Where fd 1 goes, for every C program, and the check the loop makes each
/// line in every mode (so the modes differ only in the descriptor).
macro_rules! c_prelude {
    () => {
        r#"#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static int floor_pipe = -1;
static char sink[1 << 16];
static void setup(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[2], "null") == 0) dup2(open("/dev/null", O_WRONLY), 1);
    if (argc > 2 && strcmp(argv[2], "pipe") == 0) {
        int p[2];
        if (pipe(p) != 0) exit(2);
        fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
        fcntl(p[0], F_SETFL, O_NONBLOCK);
        dup2(p[1], 1);
        close(p[1]);
        floor_pipe = p[0];
    }
}
static void floor_drain(long i) {
    if (floor_pipe >= 0 && (i & 4095) == 0)
        while (read(floor_pipe, sink, sizeof sink) > 0) {}
}
static void report(struct timespec a) {
    struct timespec b;
    clock_gettime(CLOCK_MONOTONIC, &b);
    fprintf(stderr, "loop_ns=%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
}
"#
    };
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "C write(2) per line",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: concat!(
            c_prelude!(),
            r#"int main(int argc, char **argv) {
    long n = atol(argv[1]);
    setup(argc, argv);
    struct timespec a;
    char buf[32];
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        int len = snprintf(buf, sizeof buf, "%ld\n", i);
        if (write(1, buf, len) != len) return 1;
        floor_drain(i);
    }
    report(a);
    return 0;
}
"#
        ),
    },
    Program {
        name: "C printf+fflush per line",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: concat!(
            c_prelude!(),
            r#"int main(int argc, char **argv) {
    long n = atol(argv[1]);
    setup(argc, argv);
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        printf("%ld\n", i);
        fflush(stdout);
        floor_drain(i);
    }
    report(a);
    return 0;
}
"#
        ),
    },
    Program {
        // No flush of its own: how the runtime's stdout buffering behaves on a pipe
        // (C and C++ stdout is line-buffered in TVM, as on a terminal).
        name: "C printf per line, no fflush",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: concat!(
            c_prelude!(),
            r#"int main(int argc, char **argv) {
    long n = atol(argv[1]);
    setup(argc, argv);
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        printf("%ld\n", i);
        floor_drain(i);
    }
    fflush(stdout);
    report(a);
    return 0;
}
"#
        ),
    },
    Program {
        name: "Python print per line",
        runtime: "python",
        file: "main.py",
        floor: true,
        source: r#"import fcntl, os, sys, time
n = int(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "relay"
floor = None
if mode == "null":
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
elif mode == "pipe":
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass
    os.set_blocking(r, False)
    os.dup2(w, 1)
    os.close(w)
    floor = r
def floor_drain():
    try:
        while os.read(floor, 65536):
            pass
    except BlockingIOError:
        pass
t = time.monotonic_ns()
for i in range(n):
    print(i)
    if floor is not None and i & 4095 == 0:
        floor_drain()
print(f"loop_ns={time.monotonic_ns() - t}", file=sys.stderr)
"#,
    },
    Program {
        // Ruby's $stdout is written through (sync) in TVM so that output before a
        // limit kill is kept; the next row is the same with Ruby's own buffering.
        name: "Ruby puts per line (sync)",
        runtime: "ruby",
        file: "main.rb",
        source: RUBY,
        floor: true,
    },
    Program { name: "Ruby puts per line, buffered", runtime: "ruby", file: "buffered.rb", source: RUBY, floor: true },
    Program {
        // `System.out` is a PrintStream flushing each line: one write(2) per
        // println. The `null` mode's stream is built the same way.
        name: "Java System.out.println per line",
        runtime: "java",
        file: "Main.java",
        source: r#"import java.io.*;

public class Main {
    public static void main(String[] args) throws IOException {
        int n = Integer.parseInt(args[0]);
        if (args.length > 1 && args[1].equals("null")) {
            System.setOut(new PrintStream(new BufferedOutputStream(new FileOutputStream("/dev/null"), 8192), true));
        }
        long t = System.nanoTime();
        for (int i = 0; i < n; i++) System.out.println(i);
        System.out.flush();
        System.err.println("loop_ns=" + (System.nanoTime() - t));
    }
}
"#,
        floor: false,
    },
];

/// The Ruby row's program; named `buffered.rb` it turns `$stdout.sync` off.
const RUBY: &str = r#"n = ARGV[0].to_i
$stdout.sync = false if __FILE__.end_with?("buffered.rb")
floor = nil
sync = $stdout.sync
case ARGV[1]
when "null"
  $stdout.reopen(File.open("/dev/null", "w"))
when "pipe"
  r, w = IO.pipe
  begin
    w.fcntl(1031, 1 << 20) # F_SETPIPE_SZ
  rescue StandardError
  end
  $stdout.reopen(w)
  w.close
  floor = r
end
$stdout.sync = sync
t = Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)
n.times do |i|
  puts i
  next unless floor && (i & 4095).zero?
  begin
    loop { floor.read_nonblock(65536) }
  rescue IO::WaitReadable
  end
end
$stdout.flush
$stderr.puts "loop_ns=#{Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond) - t}"
"#;

/// The bytes `0\n1\n...(lines-1)\n`.
fn expected_output(lines: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..lines {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

fn loop_ns(stderr: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(stderr).lines().find_map(|l| l.strip_prefix("loop_ns=")?.trim().parse().ok())
}

/// One measured run: in-loop writes per second, run-stage wall time, and
/// how many output frames carried the stdout bytes.
struct Measured {
    writes_per_sec: f64,
    wall_ms: u64,
    frames: usize,
    /// Why there is no rate (the run hit its time limit).
    note: Option<String>,
}

/// Where a run's fd 1 goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// The stage's stdout, through the relay: every byte must arrive.
    Relay,
    /// A pipe the program empties itself: nothing reaches the relay.
    Pipe,
    /// `/dev/null`.
    Null,
}

impl Sink {
    /// The program's second argument, if any.
    fn arg(self) -> Option<&'static str> {
        match self {
            Sink::Relay => None,
            Sink::Pipe => Some("pipe"),
            Sink::Null => Some("null"),
        }
    }
}

async fn measure(vmm: &Pyrovm, p: &Program, lines: u64, sink: Sink) -> Result<Measured> {
    let expected = expected_output(lines);
    let mut args = vec![lines.to_string()];
    args.extend(sink.arg().map(String::from));
    let null = sink != Sink::Relay;
    let req = ExecutionRequest {
        runtime: p.runtime.into(),
        files: vec![SourceFile { name: p.file.into(), content: p.source.as_bytes().to_vec() }],
        args,
        run_limits: LimitRequest {
            output_bytes: Some((expected.len() as u64 + (64 << 10)).max(1 << 20)),
            wall_time_ms: Some(60_000),
            cpu_time_ms: Some(60_000),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let mut frames = 0;
    let exec = vmm
        .execute(&req, |stage, stream, data| {
            if stage == Stage::Run && stream == Stream::Stdout {
                streamed.extend_from_slice(data);
                frames += 1;
            }
        })
        .await
        .with_context(|| format!("{}: execution", p.name))?;
    let r = exec.result;
    let run = r.run.as_ref().with_context(|| format!("{}: no run stage (verdict {})", p.name, r.verdict))?;
    if r.verdict == Verdict::TimeLimitExceeded {
        // What the relay costs can be the time limit itself: say how far the output got.
        return Ok(Measured {
            writes_per_sec: f64::NAN,
            wall_ms: run.wall_ms,
            frames,
            note: Some(format!(
                "{} after {:.1} s, {} of {} bytes delivered",
                r.verdict,
                run.wall_ms as f64 / 1000.0,
                streamed.len(),
                if null { 0 } else { expected.len() }
            )),
        });
    }
    if r.verdict != Verdict::Ok {
        bail!("{}: verdict {}; stderr: {}", p.name, r.verdict, String::from_utf8_lossy(&run.stderr));
    }
    let ns = loop_ns(&run.stderr).with_context(|| format!("{}: no loop_ns on stderr", p.name))?;
    let want: &[u8] = if null { b"" } else { &expected };
    if run.stdout != want || streamed != want {
        bail!(
            "{}: output incomplete or out of order ({} bytes kept, {} streamed, {} expected)",
            p.name,
            run.stdout.len(),
            streamed.len(),
            want.len()
        );
    }
    let secs = Duration::from_nanos(ns.max(1)).as_secs_f64();
    Ok(Measured { writes_per_sec: lines as f64 / secs, wall_ms: run.wall_ms, frames, note: None })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Whether a row named `name` is asked for: no filter, or one it contains
/// (case-insensitive).
fn selected(name: &str, only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|o| name.to_lowercase().contains(&o.to_lowercase()))
}

/// Runs every program (or those whose name contains one of `only`,
/// case-insensitive) `runs` times through the relay, to its own pipe (the
/// floor, where it has one) and to `/dev/null`, `lines` writes each, and
/// prints a Markdown table (medians).
///
/// A run that fails (a VM that cannot boot, a verdict other than `ok`,
/// output that did not arrive complete and in order) is reported in its
/// row's note.
///
/// # Errors
/// None of its own today; kept fallible for the command's signature.
pub async fn run(vmm: &Pyrovm, runs: usize, lines: u64, only: &[String]) -> Result<()> {
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!("{lines} short writes per run, {runs} run(s) per cell, medians; each run boots a fresh VM\n");
    println!(
        "| program | relay writes/s | pipe floor writes/s | /dev/null writes/s | relay / floor | relay / null | run wall (relay) | stdout frames | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for p in PROGRAMS.iter().filter(|p| selected(p.name, only)) {
        let (mut relay, mut floor, mut null, mut wall, mut frames, mut notes) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs.max(1) {
            // A failing row (a runtime without its image, say) is reported in
            // its note; the other rows still run.
            let failed = |e: anyhow::Error| Measured {
                writes_per_sec: f64::NAN,
                wall_ms: 0,
                frames: 0,
                // One line: the note is a Markdown table cell.
                note: Some(format!("failed: {}", format!("{e:#}").lines().next().unwrap_or_default())),
            };
            let m = measure(vmm, p, lines, Sink::Relay).await.unwrap_or_else(failed);
            relay.push(m.writes_per_sec);
            wall.push(m.wall_ms as f64);
            frames.push(m.frames as f64);
            notes.extend(m.note);
            if p.floor {
                let f = measure(vmm, p, lines, Sink::Pipe).await.unwrap_or_else(failed);
                floor.push(f.writes_per_sec);
                notes.extend(f.note.map(|n| format!("pipe floor: {n}")));
            }
            let n = measure(vmm, p, lines, Sink::Null).await.unwrap_or_else(failed);
            null.push(n.writes_per_sec);
            notes.extend(n.note.map(|n| format!("/dev/null: {n}")));
        }
        let (relay, floor, null) = (median(relay), median(floor), median(null));
        let rate = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.0}") };
        let ratio = |base: f64| {
            if relay.is_nan() || base.is_nan() {
                "-".to_string()
            } else {
                format!("{:.2}x", base / relay)
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} | {} |",
            p.name,
            rate(relay),
            rate(floor),
            rate(null),
            ratio(floor),
            ratio(null),
            median(wall),
            median(frames),
            notes.join("; ")
        );
    }
    println!("\nwrites/s: lines / the program's own write-loop time (monotonic clock in the guest);");
    println!("pipe floor: fd 1 is a pipe nobody else reads (the program empties it every {FLOOR_DRAIN_LINES} lines),");
    println!(
        "i.e. what the pipe write alone costs (none for Java); relay / floor and relay / null: how many times longer a"
    );
    println!("write takes through the relay (1.00x = free); run wall: the run stage's wall time, startup and");
    println!("exit included; stdout frames: Output chunks received.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_output_and_loop_time_parse() {
        assert_eq!(expected_output(3), b"0\n1\n2\n");
        assert_eq!(loop_ns(b"warn\nloop_ns=1234\n"), Some(1234));
        assert_eq!(loop_ns(b"nothing"), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(vec![]).is_nan(), "a row without a floor shows none");
        assert!(selected("C write(2) per line", &[]));
        assert!(selected("C write(2) per line", &["c WRITE".into(), "python".into()]));
        assert!(!selected("Ruby puts per line (sync)", &["C write".into()]));
    }
}
