//! `tvm bench --relay`: how fast a program's short writes get through the
//! output relay, next to the same program writing to `/dev/null` in the guest.
//!
//! Each run boots one fresh VM in which the program runs its write loop once
//! per sink, fd 1 pointing at each in turn: the stage's stdout (TVM's output
//! channel, read by the relay), a pipe of its own (the floor: what a pipe
//! write alone costs; stages had pipes before the channel) and `/dev/null`.
//! It times each loop itself (monotonic clock, in the guest) and reports it
//! on stderr; 100 ms pass before each loop, so the relay has sent one loop's
//! output before the next starts. Rounds of one VM are seconds apart, so the
//! host's load moves them together, and the order alternates between runs;
//! the ratios are the relay's cost per write. A relay loop only counts if
//! every byte arrived, in order.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pyrovm::{ExecutionRequest, LimitRequest, Pyrovm, SourceFile};
use tvm_protocol::{Stage, Stream, Verdict};

/// One program of the bench: prints `0\n1\n...` up to `lines - 1`, one
/// write per line, once per sink named in its second argument (a
/// comma-separated list of `relay`, `null`, `pipe`; default `relay`), and
/// reports `<sink>_ns=<n>` on stderr for each loop. `relay` is the stage's
/// stdout (the output channel), `null` is `/dev/null`, `pipe` a pipe of the
/// program's own that nobody else reads, emptied by the program every
/// [`FLOOR_DRAIN_LINES`] lines so it never blocks.
struct Program {
    name: &'static str,
    runtime: &'static str,
    file: &'static str,
    source: &'static str,
    /// Whether the program has the `pipe` sink (Java cannot put a pipe of
    /// its own on a file descriptor it writes with `write(2)` per line).
    floor: bool,
}

/// How often the `pipe` sink is emptied: 4096 lines of at most 7 bytes fit
/// the smallest (64 KiB) pipe, should `F_SETPIPE_SZ` be refused.
const FLOOR_DRAIN_LINES: u64 = 4096;

/// Where fd 1 goes, for every C program, and the check each loop makes per
/// line for every sink (so the sinks differ only in the descriptor).
macro_rules! c_prelude {
    () => {
        r#"#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static int floor_pipe = -1, stage_out = -1;
static char sink[1 << 16];
/* Points fd 1 at a sink: the stage's stdout ("relay"), /dev/null or a pipe. */
static void point(const char *name) {
    fflush(stdout);
    if (stage_out < 0) stage_out = dup(1);
    if (floor_pipe >= 0) { close(floor_pipe); floor_pipe = -1; }
    if (strcmp(name, "null") == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        close(fd);
    } else if (strcmp(name, "pipe") == 0) {
        int p[2];
        if (pipe(p) != 0) exit(2);
        fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
        fcntl(p[0], F_SETFL, O_NONBLOCK);
        dup2(p[1], 1);
        close(p[1]);
        floor_pipe = p[0];
    } else {
        dup2(stage_out, 1);
    }
    usleep(100000);
}
static void floor_drain(long i) {
    if (floor_pipe >= 0 && (i & 4095) == 0)
        while (read(floor_pipe, sink, sizeof sink) > 0) {}
}
static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}
static void report(const char *name, long long start) {
    fprintf(stderr, "%s_ns=%lld\n", name, now_ns() - start);
}
/* Each sink of argv[2] (default "relay"), in order. */
#define EACH_SINK(name) \
    for (char *list_ = strdup(argc > 2 ? argv[2] : "relay"), *name = strtok(list_, ","); name; \
         name = strtok(NULL, ","))
"#
    };
}

/// A C program of the bench: `$line` is what each line of the loop does
/// (after it the pipe floor is emptied when due; stdio is flushed after the
/// loop, before its time is taken).
macro_rules! c_main {
    ($line:literal) => {
        concat!(
            c_prelude!(),
            "int main(int argc, char **argv) {\n",
            "    long n = atol(argv[1]);\n",
            "    EACH_SINK(name) {\n",
            "        point(name);\n",
            "        long long a = now_ns();\n",
            "        for (long i = 0; i < n; i++) {\n",
            $line,
            "            floor_drain(i);\n",
            "        }\n",
            "        fflush(stdout);\n",
            "        report(name, a);\n",
            "    }\n",
            "    return 0;\n",
            "}\n"
        )
    };
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "C write(2) per line",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: c_main!("            char buf[32];\n            int len = snprintf(buf, sizeof buf, \"%ld\\n\", i);\n            if (write(1, buf, len) != len) return 1;\n"),
    },
    Program {
        name: "C printf+fflush per line",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: c_main!("            printf(\"%ld\\n\", i);\n            fflush(stdout);\n"),
    },
    Program {
        // No flush of its own: how the runtime's stdout buffering behaves
        // (C and C++ stdout is line-buffered in TVM, as on a terminal).
        name: "C printf per line, no fflush",
        runtime: "c",
        file: "main.c",
        floor: true,
        source: c_main!("            printf(\"%ld\\n\", i);\n"),
    },
    Program {
        name: "Python print per line",
        runtime: "python",
        file: "main.py",
        floor: true,
        source: r#"import fcntl, os, sys, time
n = int(sys.argv[1])
sinks = (sys.argv[2] if len(sys.argv) > 2 else "relay").split(",")
stage_out = os.dup(1)
floor = None
def point(name):
    global floor
    sys.stdout.flush()
    if floor is not None:
        os.close(floor)
        floor = None
    if name == "null":
        fd = os.open("/dev/null", os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    elif name == "pipe":
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        os.set_blocking(r, False)
        os.dup2(w, 1)
        os.close(w)
        floor = r
    else:
        os.dup2(stage_out, 1)
    time.sleep(0.1)
def floor_drain():
    try:
        while os.read(floor, 65536):
            pass
    except BlockingIOError:
        pass
for name in sinks:
    point(name)
    t = time.monotonic_ns()
    for i in range(n):
        print(i)
        if floor is not None and i & 4095 == 0:
            floor_drain()
    sys.stdout.flush()
    print(f"{name}_ns={time.monotonic_ns() - t}", file=sys.stderr)
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
        // println. The `null` sink's stream is built the same way.
        name: "Java System.out.println per line",
        runtime: "java",
        file: "Main.java",
        source: r#"import java.io.*;

public class Main {
    public static void main(String[] args) throws Exception {
        int n = Integer.parseInt(args[0]);
        String[] sinks = (args.length > 1 ? args[1] : "relay").split(",");
        PrintStream stageOut = System.out;
        PrintStream devNull =
            new PrintStream(new BufferedOutputStream(new FileOutputStream("/dev/null"), 8192), true);
        for (String name : sinks) {
            System.out.flush();
            System.setOut(name.equals("null") ? devNull : stageOut);
            Thread.sleep(100);
            long t = System.nanoTime();
            for (int i = 0; i < n; i++) System.out.println(i);
            System.out.flush();
            System.err.println(name + "_ns=" + (System.nanoTime() - t));
        }
    }
}
"#,
        floor: false,
    },
];

/// The Ruby row's program; named `buffered.rb` it turns `$stdout.sync` off.
const RUBY: &str = r##"n = ARGV[0].to_i
$stdout.sync = false if __FILE__.end_with?("buffered.rb")
sync = $stdout.sync
sinks = (ARGV[1] || "relay").split(",")
stage_out = $stdout.dup
floor = nil
sinks.each do |name|
  $stdout.flush
  floor&.close
  floor = nil
  case name
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
  else
    $stdout.reopen(stage_out)
  end
  $stdout.sync = sync
  sleep 0.1
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
  $stderr.puts "#{name}_ns=#{Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond) - t}"
end
"##;

/// The bytes `0\n1\n...(lines-1)\n`.
fn expected_output(lines: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..lines {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

/// Where fd 1 goes during one loop of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sink {
    /// The stage's stdout, through the relay: every byte must arrive.
    Relay,
    /// A pipe the program empties itself: nothing reaches the relay.
    Pipe,
    /// `/dev/null`.
    Null,
}

impl Sink {
    /// The sink's name in the program's argument and its stderr report.
    fn name(self) -> &'static str {
        match self {
            Sink::Relay => "relay",
            Sink::Pipe => "pipe",
            Sink::Null => "null",
        }
    }
}

/// The loop time (ns) a program reported for `sink` on stderr.
fn loop_ns(stderr: &[u8], sink: Sink) -> Option<u64> {
    let prefix = format!("{}_ns=", sink.name());
    String::from_utf8_lossy(stderr).lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
}

/// One measured run (one VM): in-loop writes per second for each sink, the
/// run stage's wall time, and how many output frames carried the stdout bytes.
struct Measured {
    rates: HashMap<Sink, f64>,
    wall_ms: u64,
    frames: usize,
    /// Why there are no rates (the run hit its time limit).
    note: Option<String>,
}

/// Runs `p` once in a fresh VM, its loop writing `lines` lines to each sink
/// of `order` in turn.
async fn measure(vmm: &Pyrovm, p: &Program, lines: u64, order: &[Sink]) -> Result<Measured> {
    let expected = expected_output(lines);
    let list: Vec<&str> = order.iter().map(|s| s.name()).collect();
    let req = ExecutionRequest {
        runtime: p.runtime.into(),
        files: vec![SourceFile { name: p.file.into(), content: p.source.as_bytes().to_vec() }],
        args: vec![lines.to_string(), list.join(",")],
        run_limits: LimitRequest {
            output_bytes: Some((expected.len() as u64 + (64 << 10)).max(1 << 20)),
            wall_time_ms: Some(120_000),
            cpu_time_ms: Some(120_000),
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
            rates: HashMap::new(),
            wall_ms: run.wall_ms,
            frames,
            note: Some(format!(
                "{} after {:.1} s, {} of {} bytes delivered",
                r.verdict,
                run.wall_ms as f64 / 1000.0,
                streamed.len(),
                expected.len()
            )),
        });
    }
    if r.verdict != Verdict::Ok {
        bail!("{}: verdict {}; stderr: {}", p.name, r.verdict, String::from_utf8_lossy(&run.stderr));
    }
    if run.stdout != expected || streamed != expected {
        bail!(
            "{}: output incomplete or out of order ({} bytes kept, {} streamed, {} expected)",
            p.name,
            run.stdout.len(),
            streamed.len(),
            expected.len()
        );
    }
    let mut rates = HashMap::new();
    for &sink in order {
        let ns = loop_ns(&run.stderr, sink).with_context(|| format!("{}: no {}_ns on stderr", p.name, sink.name()))?;
        rates.insert(sink, lines as f64 / Duration::from_nanos(ns.max(1)).as_secs_f64());
    }
    Ok(Measured { rates, wall_ms: run.wall_ms, frames, note: None })
}

/// The middle value (the mean of the two middle ones for an even count);
/// NaN for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether a row named `name` is asked for: no filter, or one it contains
/// (case-insensitive).
fn selected(name: &str, only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|o| name.to_lowercase().contains(&o.to_lowercase()))
}

/// The sinks of run number `run` of `p`, in the order its loops write them:
/// relay, pipe floor (where the program has one), `/dev/null`, reversed on
/// every other run so that neither end of a run is always the same sink.
fn sink_order(p: &Program, run: usize) -> Vec<Sink> {
    let mut order = vec![Sink::Relay];
    if p.floor {
        order.push(Sink::Pipe);
    }
    order.push(Sink::Null);
    if run % 2 == 1 {
        order.reverse();
    }
    order
}

/// Runs every program (or those whose name contains one of `only`,
/// case-insensitive) `runs` times, each run one fresh VM in which the
/// program writes `lines` lines through the relay, to its own pipe (the
/// floor, where it has one) and to `/dev/null`, and prints a Markdown table
/// (medians of the rates, and of each run's own ratios).
///
/// A run that fails (a VM that cannot boot, a verdict other than `ok`,
/// output that did not arrive complete and in order) is reported in its
/// row's note.
///
/// # Errors
/// None of its own today; kept fallible for the command's signature.
pub async fn run(vmm: &Pyrovm, runs: usize, lines: u64, only: &[String]) -> Result<()> {
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!(
        "{lines} short writes per loop, {runs} run(s) per row, medians; each run boots a fresh VM and writes one loop per sink"
    );
    println!();
    println!(
        "| program | relay writes/s | pipe floor writes/s | /dev/null writes/s | relay / floor | relay / null | run wall (all loops) | stdout frames | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for p in PROGRAMS.iter().filter(|p| selected(p.name, only)) {
        let mut rates: HashMap<Sink, Vec<f64>> = HashMap::new();
        // Ratios of one run's loops (one VM): the same guest's rates move
        // together, while two VMs' can differ by 20% on this host.
        let (mut per_floor, mut per_null) = (vec![], vec![]);
        let (mut wall, mut frames, mut notes) = (vec![], vec![], vec![]);
        for i in 0..runs.max(1) {
            match measure(vmm, p, lines, &sink_order(p, i)).await {
                Ok(m) => {
                    if let Some(relay) = m.rates.get(&Sink::Relay) {
                        per_floor.extend(m.rates.get(&Sink::Pipe).map(|floor| floor / relay));
                        per_null.extend(m.rates.get(&Sink::Null).map(|null| null / relay));
                    }
                    for (sink, rate) in m.rates {
                        rates.entry(sink).or_default().push(rate);
                    }
                    wall.push(m.wall_ms as f64);
                    frames.push(m.frames as f64);
                    notes.extend(m.note);
                }
                // A failing row (a runtime without its image, say) is reported in
                // its note; the other rows still run. One line: a Markdown cell.
                Err(e) => notes.push(format!("failed: {}", format!("{e:#}").lines().next().unwrap_or_default())),
            }
        }
        let rate_of = |sink: Sink| median(rates.get(&sink).cloned().unwrap_or_default());
        let (relay, floor, null) = (rate_of(Sink::Relay), rate_of(Sink::Pipe), rate_of(Sink::Null));
        let rate = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.0}") };
        let ratio = |per_run: Vec<f64>| {
            let m = median(per_run);
            if m.is_nan() {
                "-".to_string()
            } else {
                format!("{m:.2}x")
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} | {} |",
            p.name,
            rate(relay),
            rate(floor),
            rate(null),
            ratio(per_floor),
            ratio(per_null),
            median(wall),
            median(frames),
            notes.join("; ")
        );
    }
    println!("\nwrites/s: lines / the program's own write-loop time (monotonic clock in the guest); each run");
    println!("writes one loop to every sink of its row, 100 ms apart, in an order that alternates between runs.");
    println!("pipe floor: fd 1 is a pipe nobody else reads (the program empties it every {FLOOR_DRAIN_LINES} lines),");
    println!(
        "i.e. what the pipe write alone costs (none for Java); relay / floor and relay / null: how many times longer a"
    );
    println!("write takes through the relay (1.00x = free), the median of each run's own ratio; run wall: the run stage's wall time, every loop,");
    println!("startup and exit included; stdout frames: output frames that carried stdout.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_output_and_loop_time_parse() {
        assert_eq!(expected_output(3), b"0\n1\n2\n");
        let stderr = b"warn\nnull_ns=99\nrelay_ns=1234\n";
        assert_eq!(loop_ns(stderr, Sink::Relay), Some(1234));
        assert_eq!(loop_ns(stderr, Sink::Null), Some(99));
        assert_eq!(loop_ns(stderr, Sink::Pipe), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5, "two runs' loops that alternate sinks weigh the same");
        assert!(median(vec![]).is_nan(), "a row without a floor shows none");
        assert!(selected("C write(2) per line", &[]));
        assert!(selected("C write(2) per line", &["c WRITE".into(), "python".into()]));
        assert!(!selected("Ruby puts per line (sync)", &["C write".into()]));
    }

    #[test]
    fn runs_alternate_the_order_of_their_sinks() {
        let c = &PROGRAMS[0];
        assert_eq!(sink_order(c, 0), [Sink::Relay, Sink::Pipe, Sink::Null]);
        assert_eq!(sink_order(c, 1), [Sink::Null, Sink::Pipe, Sink::Relay]);
        let java = PROGRAMS.iter().find(|p| !p.floor).unwrap();
        assert_eq!(sink_order(java, 2), [Sink::Relay, Sink::Null]);
    }
}
