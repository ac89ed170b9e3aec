//! `tvm bench --relay`: how fast a program's short writes get through the
//! output relay, next to the same program writing to `/dev/null` in the guest.
//!
//! Each program times its own write loop (monotonic clock, inside the
//! guest) and reports it on stderr; the only difference between the two runs
//! of a row is whether fd 1 is the relay's pipe or `/dev/null` (the program
//! `dup2`s it when given `null`), so the ratio is the relay's cost per write.
//! A relay run only counts if every byte arrived, in order.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pyrovm::{ExecutionRequest, LimitRequest, Pyrovm, SourceFile};
use tvm_protocol::{Stage, Stream, Verdict};

/// One program of the bench: prints `0\n1\n...` up to `lines - 1`, one
/// write per line, and reports `loop_ns=<n>` on stderr.
struct Program {
    name: &'static str,
    runtime: &'static str,
    file: &'static str,
    source: &'static str,
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "C write(2) per line",
        runtime: "c",
        file: "main.c",
        source: r#"#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    if (argc > 2 && strcmp(argv[2], "null") == 0) dup2(open("/dev/null", O_WRONLY), 1);
    struct timespec a, b;
    char buf[32];
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        int len = snprintf(buf, sizeof buf, "%ld\n", i);
        if (write(1, buf, len) != len) return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    fprintf(stderr, "loop_ns=%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"#,
    },
    Program {
        name: "C printf+fflush per line",
        runtime: "c",
        file: "main.c",
        source: r#"#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    if (argc > 2 && strcmp(argv[2], "null") == 0) dup2(open("/dev/null", O_WRONLY), 1);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        printf("%ld\n", i);
        fflush(stdout);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    fprintf(stderr, "loop_ns=%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"#,
    },
    Program {
        // No flush of its own: how the runtime's stdout buffering behaves on a pipe
        // (C and C++ stdout is line-buffered in TVM, as on a terminal).
        name: "C printf per line, no fflush",
        runtime: "c",
        file: "main.c",
        source: r#"#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    if (argc > 2 && strcmp(argv[2], "null") == 0) dup2(open("/dev/null", O_WRONLY), 1);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) printf("%ld\n", i);
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &b);
    fprintf(stderr, "loop_ns=%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"#,
    },
    Program {
        name: "Python print per line",
        runtime: "python",
        file: "main.py",
        source: r#"import os, sys, time
n = int(sys.argv[1])
if sys.argv[2:] == ["null"]:
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
t = time.monotonic_ns()
for i in range(n):
    print(i)
print(f"loop_ns={time.monotonic_ns() - t}", file=sys.stderr)
"#,
    },
];

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
}

async fn measure(vmm: &Pyrovm, p: &Program, lines: u64, null: bool) -> Result<Measured> {
    let expected = expected_output(lines);
    let mut args = vec![lines.to_string()];
    if null {
        args.push("null".into());
    }
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
    Ok(Measured { writes_per_sec: lines as f64 / secs, wall_ms: run.wall_ms, frames })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every program `runs` times through the relay and to `/dev/null`,
/// `lines` writes each, and prints a Markdown table (medians).
///
/// # Errors
/// A VM that cannot boot, a verdict other than `ok`, or output that did not
/// arrive complete and in order.
pub async fn run(vmm: &Pyrovm, runs: usize, lines: u64) -> Result<()> {
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!("{lines} short writes per run, {runs} run(s) per cell, medians; each run boots a fresh VM\n");
    println!("| program | relay writes/s | /dev/null writes/s | relay / null | run wall (relay) | stdout frames |");
    println!("|---|---:|---:|---:|---:|---:|");
    for p in PROGRAMS {
        let (mut relay, mut null, mut wall, mut frames) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs.max(1) {
            let m = measure(vmm, p, lines, false).await?;
            relay.push(m.writes_per_sec);
            wall.push(m.wall_ms as f64);
            frames.push(m.frames as f64);
            null.push(measure(vmm, p, lines, true).await?.writes_per_sec);
        }
        let (relay, null) = (median(relay), median(null));
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | {:.0} ms | {:.0} |",
            p.name,
            relay,
            null,
            null / relay,
            median(wall),
            median(frames)
        );
    }
    println!("\nwrites/s: lines / the program's own write-loop time (monotonic clock in the guest);");
    println!("relay / null: how many times longer a write takes when fd 1 is the relay's pipe (1.00x = free);");
    println!("run wall: the run stage's wall time, startup and exit included; stdout frames: Output chunks received.");
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
    }
}
