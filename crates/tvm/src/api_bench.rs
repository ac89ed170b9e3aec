//! `tvm bench --api`: what the HTTP API adds to an execution that a warm
//! pool VM serves (issue #12's "API overhead over in-guest wall on a pool
//! hit"). A bench, not a test: it prints a table.
//!
//! An in-process `tvm serve` keeps one warm VM of the catalog's `python`;
//! before each request the bench waits until that VM is at agent-ready
//! (`tvm_pool_idle`), so every measured request is a pool hit (checked per
//! result: `pooled`). Per request it takes the client's round trip (request
//! written to result parsed, on the loopback), the server's `total_ms`
//! (admission to result) and the run stage's in-guest `wall_time_ms` (the
//! agent's spawn to exit of the program). The overhead is the round trip
//! minus the in-guest wall; the two parts under it split it into the
//! server's own work (lease, job to the agent, the agent writing the files
//! and setting up the stage, result back) and HTTP + JSON on both ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pyrovm::{ExecutionRequest, Pyrovm, SourceFile};
use tvm_protocol::Verdict;

/// The program: a Python hello, the shape of the goal.
const PROGRAM: &str = "print('hi')\n";

/// How long the pool may take to have its VM ready (a template build on
/// first use included).
const POOL_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads one figure of a [`Sample`].
type Figure = fn(&Sample) -> f64;

/// One measured request, in ms.
struct Sample {
    round_trip: f64,
    server_total: f64,
    guest_wall: f64,
    /// Server: job sent to result read (its `trace.execute_us`).
    execute: f64,
    /// The agent's steps: `(step, ms the step took since the previous mark)`.
    agent_steps: Vec<(String, f64)>,
    /// The agent's whole span: job frame decoded to result ready.
    agent_span: f64,
}

/// Runs `runs` pool-hit requests through an in-process server and prints
/// the overhead table.
///
/// # Errors
/// The server cannot start, the pool never gets a VM ready, or a request
/// fails (an API error, or a verdict other than `ok`).
pub async fn run(vmm: Pyrovm, runs: usize) -> Result<()> {
    let runtime = vmm.catalog().get("python").map(|r| r.id.clone()).context("the catalog has no `python` runtime")?;
    let vmm = Arc::new(vmm);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("free port")?.port();
    let addr = format!("127.0.0.1:{port}");
    let config = pyroshell::ServeConfig {
        listen: addr.parse().context("listen address")?,
        build_images: false,
        pool_size: 0,
        pool_sizes: [(runtime.clone(), 1)].into(),
        trace: true,
        ..pyroshell::ServeConfig::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pyroshell::serve_until(config, vmm.clone(), async {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}");
    let req = ExecutionRequest {
        runtime: runtime.clone(),
        files: vec![SourceFile { name: "main.py".into(), content: PROGRAM.as_bytes().to_vec() }],
        ..ExecutionRequest::default()
    };
    let measured = measure(&url, &runtime, &req, runs).await;
    let _ = stop_tx.send(());
    server.await.context("server task")?.context("server")?;
    let (samples, misses) = measured?;
    print_table(&runtime, &vmm, &samples, misses);
    Ok(())
}

/// The requests: one warm-up, then `runs` measured ones, each after the pool
/// has refilled. Returns the pool hits and how many requests missed the pool.
async fn measure(url: &str, runtime: &str, req: &ExecutionRequest, runs: usize) -> Result<(Vec<Sample>, usize)> {
    let mut samples = Vec::with_capacity(runs);
    let mut misses = 0;
    // The first one warms the server's and the client's code paths and connection setup.
    for i in 0..=runs {
        wait_for_idle_vm(url, runtime).await?;
        let t = Instant::now();
        let r = pyroshell::client::execute(url, None, req).await.context("execution request")?;
        let round_trip = t.elapsed().as_secs_f64() * 1000.0;
        let Some(run) = r.run.as_ref().filter(|_| r.verdict == Verdict::Ok) else {
            bail!("the hello did not run: verdict {} ({})", r.verdict, r.error.unwrap_or_default());
        };
        if i == 0 {
            continue;
        }
        if !r.pooled {
            misses += 1;
            continue;
        }
        // An agent older than the trace sends no marks: only the host's figure then.
        let trace = r.trace.clone().unwrap_or_default();
        let mut agent_steps = Vec::with_capacity(trace.agent.len());
        let mut previous = 0;
        for mark in &trace.agent {
            agent_steps.push((mark.step.clone(), ms(mark.at_us.saturating_sub(previous))));
            previous = mark.at_us;
        }
        samples.push(Sample {
            round_trip,
            server_total: r.total_ms as f64,
            guest_wall: run.wall_time_ms as f64,
            execute: ms(trace.execute_us),
            agent_steps,
            agent_span: ms(previous),
        });
    }
    Ok((samples, misses))
}

/// Waits until the server's pool holds a VM of `runtime` at agent-ready.
async fn wait_for_idle_vm(url: &str, runtime: &str) -> Result<()> {
    let series = format!("tvm_pool_idle{{runtime=\"{runtime}\"}} ");
    let started = Instant::now();
    loop {
        // The server may not listen yet on the first call.
        if let Ok(text) = pyroshell::client::metrics(url, None).await {
            let idle = text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse::<f64>().ok());
            if idle.is_some_and(|n| n >= 1.0) {
                return Ok(());
            }
        }
        if started.elapsed() > POOL_READY_TIMEOUT {
            bail!("the pool had no {runtime} VM ready within {} s", POOL_READY_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn print_table(runtime: &str, vmm: &Pyrovm, samples: &[Sample], misses: usize) {
    println!(
        "API overhead on a pool hit: {runtime} `{}`, {} requests (+{misses} pool misses not counted), accel {}, \
         loopback HTTP/1.1, in-process server",
        PROGRAM.trim_end(),
        samples.len(),
        vmm.accel().kind().as_str()
    );
    let rows: [(&str, Figure); 6] = [
        ("client round trip", |s| s.round_trip),
        ("server total_ms (admission to result)", |s| s.server_total),
        ("in-guest wall (run.wall_time_ms)", |s| s.guest_wall),
        ("overhead: round trip - in-guest wall", |s| s.round_trip - s.guest_wall),
        ("  of which server (total_ms - wall)", |s| s.server_total - s.guest_wall),
        ("  of which HTTP + JSON (round trip - total)", |s| s.round_trip - s.server_total),
    ];
    println!("{:<46} {:>9} {:>9} {:>9} {:>9}", "ms", "p50", "p95", "min", "max");
    for (name, get) in rows {
        print_row(name, samples.iter().map(get).collect());
    }
    // Where the server's part goes (issue #12: the overhead must be found before it can be cut).
    // The host's and the guest's clocks are compared by durations only; each
    // row is a percentile of its own, so the rows need not add up.
    println!("\nbreakdown of the server's part (from the results' `trace`; each row its own percentiles)");
    // total_ms is whole ms: compared with whole ms of execute, rounding cannot make it negative.
    print_row(
        "server outside the VM (total_ms - execute)",
        samples.iter().map(|s| s.server_total - s.execute.floor()).collect(),
    );
    print_row("frames' transport (execute - agent span)", samples.iter().map(|s| s.execute - s.agent_span).collect());
    print_row("agent span (job decoded to result ready)", samples.iter().map(|s| s.agent_span).collect());
    println!("agent steps, each the time since the previous mark:");
    let steps: Vec<&str> =
        samples.first().map(|s| s.agent_steps.iter().map(|(n, _)| n.as_str()).collect()).unwrap_or_default();
    for (i, step) in steps.iter().enumerate() {
        let v =
            samples.iter().filter_map(|s| s.agent_steps.get(i).filter(|(n, _)| n == step).map(|(_, d)| *d)).collect();
        let name = match *step {
            "run.exited" => "  run.exited (the program: spawn to exit)".to_string(),
            step => format!("  {step}"),
        };
        print_row(&name, v);
    }
}

/// One table row: p50, p95, min and max of `v` (ms).
fn print_row(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v.get(((v.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!("{name:<46} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", at(0.5), at(0.95), at(0.0), at(1.0));
}
