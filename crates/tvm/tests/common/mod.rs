//! Helpers for tests that drive the real `tvm` binary against real VMs.
#![allow(dead_code)]

pub mod cache;
pub mod langs;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One test's sandbox: its own runtime dir, so leftovers are attributable.
#[derive(Debug, Default)]
pub struct Env {
    pub runtime_dir: TempDir,
    pub work: TempDir,
}

/// A temp dir (Default so Env can derive it).
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl Default for TempDir {
    fn default() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
}

impl TempDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Env {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tvm(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tvm"));
        c.env("TVM_RUNTIME_DIR", self.runtime_dir.path()).env_remove("TVM_LOG").stdin(std::process::Stdio::null());
        c
    }

    /// [`Env::tvm`] with VM templates explicitly on or off (`TVM_TEMPLATES`),
    /// whatever the default: suites that run many executions per runtime
    /// restore them from templates; a cold-path test boots every VM.
    pub fn tvm_templates(&self, on: bool) -> Command {
        let mut c = self.tvm();
        c.env("TVM_TEMPLATES", if on { "1" } else { "0" });
        c
    }

    /// Writes a source file into the work dir.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.work.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// `tvm run --json FILE [extra...]`, parsed; nothing of it is left.
    pub fn run_json(&self, file: &Path, extra: &[&str]) -> (serde_json::Value, Output) {
        let run = self.run_json_only(file, extra);
        self.assert_clean();
        run
    }

    /// [`Env::run_json`] without the check that nothing is left: with
    /// `--server`, the server destroys the VM off its response path, so its
    /// test waits for the server to settle before checking.
    pub fn run_json_only(&self, file: &Path, extra: &[&str]) -> (serde_json::Value, Output) {
        let out = self.tvm().arg("run").arg("--json").args(extra).arg(file).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): stdout={} stderr={}", lossy(&out.stdout), lossy(&out.stderr)));
        (v, out)
    }

    /// No run dir and no VMM process of this test survives.
    pub fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.runtime_dir.path())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "run dirs left behind: {left:?}");
        let procs = vmm_processes(self.runtime_dir.path());
        assert!(procs.is_empty(), "VMM processes left behind: {procs:?}");
    }
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// No host cgroup of a VM started by `tvm` process `pid` is left (host
/// cgroups are named after their owner's pid).
pub fn assert_no_cgroups_of(pid: u32) {
    let Ok(cgs) = pyrovm::hostcg::HostCgroups::detect() else { return };
    let mine = format!(".{pid}.");
    let left: Vec<_> = cgs
        .vm_cgroups()
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(&mine)))
        .collect();
    assert!(left.is_empty(), "host cgroups left: {left:?}");
}

/// Pids of the VMM processes whose run dir lies in `dir`.
pub fn vmm_processes(dir: &Path) -> Vec<u32> {
    pyrovm::reaper::vmm_processes(dir)
}

pub fn stdout_of(v: &serde_json::Value) -> String {
    v["run"]["stdout"].as_str().unwrap_or("").to_string()
}
