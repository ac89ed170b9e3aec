//! Faults below the API: the VMM is killed mid-run, or the guest stops
//! (SIGSTOP of the VMM: a hung agent or a frozen guest look the same to the
//! host). In each case the caller gets a clear `internal_error`, the server
//! keeps serving, and the host footprint (server children and descriptors,
//! VMM processes, run dirs, host cgroups, mounts) returns to where it was.
//! (SIGKILL of the server itself is in http_api.rs, `kill_9_then_restart_leaves_nothing`.)

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::server::{footprint, wait_for_footprint, Server};
use common::{vmm_processes, Env};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

fn sleeper(wall_ms: u64) -> Value {
    json!({"runtime": "python", "files": [{"name": "main.py", "content": "import time\nprint('up', flush=True)\ntime.sleep(600)"}],
           "run_limits": {"wall_time_ms": wall_ms}})
}

/// Starts a long execution on the streaming endpoint, waits until the
/// program's first output arrives (so the guest is booted and the program
/// running), sends `sig` to the VMM, and returns the final result event.
fn fault_mid_run(env: &Env, server: &Server, sig: Signal, wall_ms: u64) -> Value {
    let mut c = common::server::connect(&server.addr);
    let body = sleeper(wall_ms).to_string();
    let head = format!(
        "POST /v1/executions/stream HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("event: stdout") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before output: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let vmms = vmm_processes(env.runtime_dir.path());
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmms[0] as i32), sig).unwrap();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let result = text.split("event: result").nth(1).unwrap_or_else(|| panic!("no result event: {text}"));
    let data = result.split("data: ").nth(1).and_then(|d| d.split('\n').next()).unwrap_or_default();
    serde_json::from_str(data).unwrap_or_else(|e| panic!("bad result ({e}): {text}"))
}

/// A server whose Python template is built: its first execution may cold
/// boot while the template builds in a VM of its own, which the footprint
/// and the VM count of [`fault_mid_run`] would otherwise see.
fn settled_server(env: &Env) -> Server {
    let server = Server::start(env, &[]);
    assert_still_serving(&server);
    server.wait_settled();
    server
}

fn assert_still_serving(server: &Server) {
    let r = server.execute(&json!({"runtime": "python", "files": [{"name": "main.py", "content": "print('alive')"}]}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["run"]["stdout"], "alive\n", "{}", r.text());
}

/// Fault: the VMM (QEMU) is SIGKILLed while the program runs. Expected: the
/// caller gets internal_error saying the VM exited without a result; the
/// run dir and host cgroup are gone; the next execution works.
#[test]
fn vmm_killed_mid_run() {
    let env = Env::new();
    let server = settled_server(&env);
    let before = footprint(&env, Some(server.pid()));
    let v = fault_mid_run(&env, &server, Signal::SIGKILL, 60_000);
    assert_eq!(v["verdict"], "internal_error", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("VM exited before reporting a result"), "{v}");
    wait_for_footprint(&env, server.pid(), &before, Duration::from_secs(30));
    assert_still_serving(&server);
    assert_eq!(footprint(&env, Some(server.pid())).vmms, 0);
    server.stop();
    env.assert_clean();
}

/// Fault: the guest freezes (SIGSTOP of its VMM, as a hung agent or a
/// livelocked guest kernel would look). Expected: the host deadline
/// (2 × wall + 15 s) kills the VM and the caller gets internal_error naming
/// the deadline; nothing is left; the next execution works.
#[test]
fn stalled_guest_hits_the_host_deadline() {
    let env = Env::new();
    let server = settled_server(&env);
    let before = footprint(&env, Some(server.pid()));
    let v = fault_mid_run(&env, &server, Signal::SIGSTOP, 5_000);
    assert_eq!(v["verdict"], "internal_error", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("host deadline of 25000 ms"), "{v}");
    wait_for_footprint(&env, server.pid(), &before, Duration::from_secs(30));
    assert_still_serving(&server);
    server.stop();
    env.assert_clean();
}

/// Fault: the guest kernel panics (injected through the operator's extra
/// kernel arguments: an init that does not exist, so the kernel panics with
/// "No working init found" or cannot mount a root). Expected: a clear error
/// naming the panic, exit status 70 (internal), nothing left behind, and the
/// next execution without the fault works.
#[test]
fn guest_kernel_panic_is_reported() {
    let env = Env::new();
    let f = env.file("main.py", "print('never runs')");
    let out = env.tvm().env("TVM_KERNEL_ARGS", "rdinit=/nonexistent").arg("run").arg(&f).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{stderr}");
    assert!(stderr.contains("guest kernel panicked") && stderr.contains("Kernel panic"), "{stderr}");
    env.assert_clean();
    let out = env.tvm().arg("run").arg(&f).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "never runs\n", "{}", String::from_utf8_lossy(&out.stderr));
    env.assert_clean();
}
