//! `tvm soak`: a bench (not a test) that runs N mixed hostile and normal
//! executions through an in-process `tvm serve`, bounded in time, and prints
//! the host's footprint before and after (processes, open files, memory,
//! disk of the runtime and cache scratch dirs, VMMs, host cgroups) next to
//! the verdict counts. A leak shows as an "after" that does not match the
//! "before".

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pyrovm::{ExecutionRequest, LimitRequest, Pyrovm, SourceFile};

/// One kind of execution in the mix.
struct Kind {
    name: &'static str,
    source: &'static str,
    limits: LimitRequest,
}

fn kinds() -> Vec<Kind> {
    let lim = |wall: u64, cpu: u64| LimitRequest {
        wall_time_ms: Some(wall),
        cpu_time_ms: Some(cpu),
        ..LimitRequest::default()
    };
    vec![
        Kind { name: "normal", source: "print(sum(range(1000)))", limits: LimitRequest::default() },
        Kind { name: "cpu_loop", source: "while True: pass", limits: lim(10_000, 1_000) },
        Kind { name: "sleeper", source: "import time\ntime.sleep(600)", limits: lim(1_500, 10_000) },
        Kind {
            name: "fork_bomb",
            source: "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
            limits: LimitRequest { processes: Some(32), ..lim(3_000, 3_000) },
        },
        Kind {
            name: "memory_bomb",
            source: "x = bytearray(1 << 30)\nfor i in range(0, len(x), 4096): x[i] = 1",
            limits: LimitRequest { memory_bytes: Some(128 << 20), ..lim(30_000, 30_000) },
        },
        Kind {
            name: "stdout_flood",
            source: "import sys\nb = b'y' * 65536\nwhile True: sys.stdout.buffer.write(b)",
            limits: LimitRequest { output_bytes: Some(1 << 20), ..LimitRequest::default() },
        },
        Kind {
            name: "daemon",
            source: "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10000)\nprint('bye')",
            limits: LimitRequest::default(),
        },
        Kind {
            name: "disk_fill",
            source: "n = 0\ntry:\n    while True:\n        open(f'/work/f{n}', 'wb').write(b'x' * (1 << 20)); n += 1\n\
                     except OSError as e:\n    print(n, e.errno)",
            limits: LimitRequest::default(),
        },
    ]
}

/// Reads one figure of a [`Footprint`].
type Figure = fn(&Footprint) -> u64;

/// What the host looks like at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    processes: u64,
    tvm_children: u64,
    host_open_files: u64,
    tvm_fds: u64,
    tvm_rss_kib: u64,
    mem_available_kib: u64,
    runtime_dir_bytes: u64,
    cache_tmp_bytes: u64,
    vmms: u64,
    host_cgroups: u64,
}

fn footprint(vmm: &Pyrovm) -> Footprint {
    let proc_entries = || std::fs::read_dir("/proc").into_iter().flatten().flatten();
    let processes = proc_entries().filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()).count() as u64;
    let host_open_files = std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let me = std::process::id().to_string();
    let tvm_children = proc_entries()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|st| st.rsplit_once(") ").and_then(|(_, r)| r.split_whitespace().nth(1).map(|p| p == me)))
                .unwrap_or(false)
        })
        .count() as u64;
    let tvm_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let kib = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let s = vmm.settings();
    let vmms = pyrovm::reaper::vmm_processes(&s.runtime_dir).len() as u64;
    let host_cgroups = vmm.host_cgroups().map(|c| c.vm_cgroups().len() as u64).unwrap_or(0);
    Footprint {
        processes,
        tvm_children,
        host_open_files,
        tvm_fds,
        tvm_rss_kib: kib(&status, "VmRSS:"),
        mem_available_kib: kib(&meminfo, "MemAvailable:"),
        runtime_dir_bytes: du(&s.runtime_dir),
        cache_tmp_bytes: du(&s.cache_dir.join("tmp")),
        vmms,
        host_cgroups,
    }
}

/// Bytes of regular files under `dir` (not crossing into other filesystems is
/// not needed here: these dirs hold no mounts in a healthy state).
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// A malformed request straight over TCP (the hostile-client part of the mix).
fn malformed_request(addr: &str) -> String {
    let run = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = "[".repeat(10_000);
        write!(
            s,
            "POST /v1/executions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp.split_whitespace().nth(1).unwrap_or("?").to_string())
    };
    run().map(|status| format!("http_{status}")).unwrap_or_else(|e| format!("client_error: {e}"))
}

/// Runs the soak and prints the tables. The server runs in this process, so
/// the "tvm" figures include it.
pub async fn run(vmm: Pyrovm, executions: usize, concurrency: usize, duration: Duration) -> Result<()> {
    let vmm = Arc::new(vmm);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("free port")?.port();
    let addr = format!("127.0.0.1:{port}");
    let config = pyroshell::ServeConfig {
        listen: addr.parse().context("listen address")?,
        build_images: false,
        ..pyroshell::ServeConfig::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pyroshell::serve_until(config, vmm.clone(), async {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}");
    // Warm up (and wait for the server to listen) before the baseline.
    let warm = ExecutionRequest {
        runtime: "python".into(),
        files: vec![SourceFile { name: "main.py".into(), content: b"print('warm')".to_vec() }],
        ..ExecutionRequest::default()
    };
    let t = Instant::now();
    loop {
        match pyroshell::client::execute(&url, None, &warm).await {
            Ok(_) => break,
            Err(_) if t.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e).context("warm-up execution"),
        }
    }
    let before = footprint(&vmm);

    let kinds = Arc::new(kinds());
    let next = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Mutex<BTreeMap<(String, String), u64>>> = Arc::default();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (kinds, next, counts, url, addr) = (kinds.clone(), next.clone(), counts.clone(), url.clone(), addr.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= executions || started.elapsed() >= duration {
                    return;
                }
                // Every ninth request is a malformed body instead of an execution.
                let (name, outcome) = if i % 9 == 8 {
                    let addr = addr.clone();
                    (
                        "malformed_body",
                        tokio::task::spawn_blocking(move || malformed_request(&addr)).await.unwrap_or_default(),
                    )
                } else {
                    let k = &kinds[i % kinds.len()];
                    let req = ExecutionRequest {
                        runtime: "python".into(),
                        files: vec![SourceFile { name: "main.py".into(), content: k.source.as_bytes().to_vec() }],
                        run_limits: k.limits,
                        ..ExecutionRequest::default()
                    };
                    let outcome = match pyroshell::client::execute(&url, None, &req).await {
                        Ok(r) => r.verdict.to_string(),
                        Err(e) => format!("client_error: {e}"),
                    };
                    (k.name, outcome)
                };
                *counts.lock().unwrap_or_else(|p| p.into_inner()).entry((name.to_string(), outcome)).or_default() += 1;
            }
        }));
    }
    for w in workers {
        w.await.context("soak worker")?;
    }
    let elapsed = started.elapsed();
    // Let the last VMs be torn down before measuring.
    let settle = Instant::now();
    while footprint(&vmm).vmms > before.vmms && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = footprint(&vmm);
    let _ = stop_tx.send(());
    server.await.context("server task")?.context("server")?;
    let stopped = footprint(&vmm);

    let counts = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let total: u64 = counts.values().sum();
    println!("soak: {total} requests in {:.1} s at concurrency {concurrency}\n", elapsed.as_secs_f64());
    println!("{:<16} {:<28} {:>6}", "kind", "outcome", "count");
    for ((kind, outcome), n) in &counts {
        println!("{kind:<16} {outcome:<28} {n:>6}");
    }
    println!("\n{:<28} {:>14} {:>14} {:>14}", "host figure", "before", "after", "server stopped");
    let rows: [(&str, Figure); 10] = [
        ("processes (host)", |f| f.processes),
        ("tvm child processes", |f| f.tvm_children),
        ("open files (host)", |f| f.host_open_files),
        ("tvm open fds", |f| f.tvm_fds),
        ("tvm RSS KiB", |f| f.tvm_rss_kib),
        ("MemAvailable KiB", |f| f.mem_available_kib),
        ("runtime dir bytes", |f| f.runtime_dir_bytes),
        ("cache tmp bytes", |f| f.cache_tmp_bytes),
        ("VMM processes", |f| f.vmms),
        ("host VM cgroups", |f| f.host_cgroups),
    ];
    for (name, get) in rows {
        println!("{name:<28} {:>14} {:>14} {:>14}", get(&before), get(&after), get(&stopped));
    }
    Ok(())
}
