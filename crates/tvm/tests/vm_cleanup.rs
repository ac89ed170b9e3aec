//! No VMM process or run dir survives an interrupted or killed `tvm`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_no_cgroups_of, vmm_processes, Env};

/// A `tvm run` of a long-running program, kept with its stdout (closing it
/// would end `tvm` with SIGPIPE rather than the signal under test).
struct LongRun {
    child: std::process::Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

/// Starts a long-running program and waits until it printed, so its VM is
/// the execution's (not one building the runtime's template, which a first
/// run starts before) and the job is in flight.
fn start_long_run(env: &Env) -> LongRun {
    let f = env.file("sleep.py", "import time\nprint('started', flush=True)\ntime.sleep(60)");
    let mut child = env.tvm().arg("run").arg("--time-limit").arg("60s").arg(&f).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // Bounded by `tvm` itself: it prints the line or exits (end of file).
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n", "the program did not start");
    assert!(!vmm_processes(env.runtime_dir.path()).is_empty(), "its VM runs");
    LongRun { child, _stdout: stdout }
}

fn wait_gone(env: &Env) {
    let t = Instant::now();
    while !vmm_processes(env.runtime_dir.path()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "VMM survived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ctrl-C, and its siblings: `timeout`, CI cancellation and systemd send
/// SIGTERM, a closed terminal SIGHUP. Each ends `tvm` with 128 + the signal's
/// number and leaves no VMM, run dir or host cgroup, without a reap.
#[test]
fn sigint_sigterm_and_sighup_tear_everything_down() {
    use nix::sys::signal::Signal;
    let env = Env::new();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let mut run = start_long_run(&env);
        let pid = run.child.id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
        let status = run.child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig as i32), "{sig}");
        wait_gone(&env);
        env.assert_clean();
        assert_no_cgroups_of(pid);
    }
}

#[test]
fn sigkill_leaves_nothing_after_reap() {
    let env = Env::new();
    let mut run = start_long_run(&env);
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    // The VMM dies with its parent (PDEATHSIG); only the run dir remains, for the reaper.
    wait_gone(&env);
    let out = env.tvm().arg("reap").output().unwrap();
    assert!(out.status.success());
    env.assert_clean();
}
