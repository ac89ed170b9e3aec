//! No VMM process or run dir survives an interrupted or killed `tvm`.

mod common;

use std::time::{Duration, Instant};

use common::{vmm_processes, Env};

/// Starts a long-running program and waits until its VM exists.
fn start_long_run(env: &Env) -> std::process::Child {
    let f = env.file("sleep.py", "import time\nprint('started', flush=True)\ntime.sleep(60)");
    let child = env.tvm().arg("run").arg("--time-limit").arg("60s").arg(&f).spawn().unwrap();
    let t = Instant::now();
    while vmm_processes(env.runtime_dir.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "VM never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let it reach the agent so the job is in flight.
    std::thread::sleep(Duration::from_secs(3));
    child
}

fn wait_gone(env: &Env) {
    let t = Instant::now();
    while !vmm_processes(env.runtime_dir.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "VMM survived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigint_tears_everything_down() {
    let env = Env::new();
    let mut child = start_long_run(&env);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    wait_gone(&env);
    env.assert_clean();
}

#[test]
fn sigkill_leaves_nothing_after_reap() {
    let env = Env::new();
    let mut child = start_long_run(&env);
    child.kill().unwrap();
    child.wait().unwrap();
    // The VMM dies with its parent (PDEATHSIG); only the run dir remains, for the reaper.
    wait_gone(&env);
    let out = env.tvm().arg("reap").output().unwrap();
    assert!(out.status.success());
    env.assert_clean();
}
