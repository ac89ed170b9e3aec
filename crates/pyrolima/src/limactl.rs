//! Driving `limactl`, Lima's command-line tool, as a child process.
//!
//! Every call is bounded by a timeout, and the child is killed if the call's
//! future is dropped (`kill_on_drop`), so an interrupted `tvm lima` leaves
//! no `limactl` behind. Instance facts come from `limactl list --json`: one
//! JSON object per line, shaped like Lima's `limatype.Instance`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tracing::debug;

/// How long listing instances may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// Stopping and deleting: Lima waits for the guest to shut down.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// Starting: boot, provisioning (first boot builds the guest kernel and the
/// default images) and Lima's readiness probes, which it retries for ~35 min.
pub const START_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// Stderr lines kept for an error message.
const STDERR_TAIL: usize = 5;

/// The one-line install instruction for this host.
pub fn install_hint() -> &'static str {
    if cfg!(target_os = "macos") {
        "brew install lima"
    } else if cfg!(target_os = "windows") {
        "download Lima 2.x for Windows from https://github.com/lima-vm/lima/releases and put limactl.exe on PATH"
    } else {
        "brew install lima, or unpack a release from https://github.com/lima-vm/lima/releases into /usr/local"
    }
}

/// Why `limactl` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// Not on `PATH` (and `TVM_LIMACTL` unset).
    #[error("limactl not found on PATH: install Lima first: {hint}")]
    NotInstalled {
        /// The install command for this host.
        hint: &'static str,
    },
    /// `TVM_LIMACTL` names something that is not a file.
    #[error("TVM_LIMACTL={0} is not a file")]
    Override(PathBuf),
}

/// A failed `limactl` invocation.
#[derive(Debug, thiserror::Error)]
pub enum LimactlError {
    /// The process could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The executable.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
    /// It did not finish in time (and was killed).
    #[error("`{command}` did not finish within {secs} s and was stopped")]
    TimedOut {
        /// The command line.
        command: String,
        /// The limit.
        secs: u64,
    },
    /// Its output is not what Lima prints.
    #[error("`{command}` printed something that is not Lima's JSON")]
    Parse {
        /// The command line.
        command: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
}

impl LimactlError {
    /// Whether limactl said the instance already exists.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, LimactlError::Failed { stderr, .. } if stderr.contains("already exists"))
    }
}

/// One instance as `limactl list --json` describes it (Lima's
/// `limatype.Instance`; fields TVM does not read are ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Instance name.
    pub name: String,
    /// `Running`, `Stopped`, `Broken`, `Installing`, `Uninitialized` or empty.
    #[serde(default)]
    pub status: String,
    /// Lima's directory for the instance.
    #[serde(default)]
    pub dir: String,
    /// Driver.
    #[serde(default)]
    pub vm_type: String,
    /// Guest architecture.
    #[serde(default)]
    pub arch: String,
    /// Virtual CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Guest RAM in bytes.
    #[serde(default)]
    pub memory: u64,
    /// Disk size in bytes.
    #[serde(default)]
    pub disk: u64,
    /// Problems Lima found.
    #[serde(default)]
    pub errors: Vec<String>,
    /// The instance's template with Lima's defaults filled in (`LimaYAML` as JSON).
    #[serde(default)]
    pub config: serde_json::Value,
}

impl Instance {
    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.status == "Running"
    }

    /// Whether its provision scripts include TVM's (it was made by `tvm lima up`).
    pub fn is_tvm(&self) -> bool {
        self.config["provision"].as_array().is_some_and(|p| {
            p.iter().any(|s| s["script"].as_str().is_some_and(|s| s.contains(crate::template::PROVISION_MARKER)))
        })
    }

    /// The host port forwarded to TVM's API in the guest.
    pub fn api_port(&self) -> Option<u16> {
        self.config["portForwards"].as_array()?.iter().find_map(|rule| {
            let guest = rule["guestPort"].as_u64()?;
            (guest == u64::from(crate::template::GUEST_PORT) && rule["ignore"] != true)
                .then(|| rule["hostPort"].as_u64().and_then(|p| u16::try_from(p).ok()))
                .flatten()
        })
    }

    /// Host directories shared with the guest, as `location -> mountPoint (ro|rw)`.
    pub fn mounts(&self) -> Vec<String> {
        let Some(mounts) = self.config["mounts"].as_array() else { return Vec::new() };
        mounts
            .iter()
            .map(|m| {
                let location = m["location"].as_str().unwrap_or("?");
                let point = m["mountPoint"].as_str().unwrap_or(location);
                let mode = if m["writable"] == true { "rw" } else { "ro" };
                format!("{location} -> {point} ({mode})")
            })
            .collect()
    }
}

/// The `limactl` executable.
#[derive(Debug, Clone)]
pub struct Limactl {
    program: PathBuf,
}

impl Limactl {
    /// Finds `limactl`: `TVM_LIMACTL` if set, else the first on `PATH`.
    ///
    /// # Errors
    ///
    /// [`LocateError::NotInstalled`] with the install command for this host.
    pub fn locate() -> Result<Self, LocateError> {
        Self::locate_in(std::env::var_os("TVM_LIMACTL"), std::env::var_os("PATH"))
    }

    /// [`Limactl::locate`] with explicit environment values.
    ///
    /// # Errors
    ///
    /// As [`Limactl::locate`].
    pub fn locate_in(override_path: Option<OsString>, path: Option<OsString>) -> Result<Self, LocateError> {
        if let Some(p) = override_path.filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return if p.is_file() { Ok(Limactl { program: p }) } else { Err(LocateError::Override(p)) };
        }
        let exe = if cfg!(windows) { "limactl.exe" } else { "limactl" };
        path.iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(exe))
            .find(|p| p.is_file())
            .map(|program| Limactl { program })
            .ok_or(LocateError::NotInstalled { hint: install_hint() })
    }

    /// A specific executable.
    pub fn at(program: impl Into<PathBuf>) -> Self {
        Limactl { program: program.into() }
    }

    /// The executable's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    fn describe(args: &[&str]) -> String {
        format!("limactl {}", args.join(" "))
    }

    /// Runs to completion and returns stdout.
    async fn run(&self, args: &[&str], limit: Duration) -> Result<String, LimactlError> {
        let out = self.run_raw(args, limit).await?;
        if !out.status.success() {
            let command = Self::describe(args);
            return Err(LimactlError::Failed { command, status: out.status.to_string(), stderr: tail(&out.stderr) });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs to completion, whatever the exit status.
    async fn run_raw(&self, args: &[&str], limit: Duration) -> Result<std::process::Output, LimactlError> {
        let command = Self::describe(args);
        debug!(%command, "running");
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LimactlError::Spawn { program: self.program.display().to_string(), source })?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Err(_) => return Err(LimactlError::TimedOut { command, secs: limit.as_secs() }),
            Ok(Err(source)) => return Err(LimactlError::Spawn { program: self.program.display().to_string(), source }),
            Ok(Ok(out)) => out,
        };
        Ok(out)
    }

    /// Runs to completion, passing each stderr line (Lima's progress log) to `progress`.
    async fn run_streaming(
        &self,
        args: &[&str],
        limit: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), LimactlError> {
        let command = Self::describe(args);
        debug!(%command, "running");
        let spawn_err = |source| LimactlError::Spawn { program: self.program.display().to_string(), source };
        let mut child = self.command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(spawn_err)?;
        let stderr = child.stderr.take().map(BufReader::new);
        let mut last: Vec<String> = Vec::new();
        let mut keep = |line: String, progress: &mut (dyn FnMut(&str) + Send)| {
            progress(&line);
            last.push(line);
            if last.len() > STDERR_TAIL {
                last.remove(0);
            }
        };
        let work = async {
            let Some(mut lines) = stderr.map(|r| r.lines()) else { return child.wait().await };
            // Read until limactl exits, not until EOF: a process it leaves running (Lima's host
            // agent) could hold the pipe open. Then take what is still buffered, briefly.
            let status = loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => keep(l, progress),
                        _ => break child.wait().await,
                    },
                    status = child.wait() => break status,
                }
            };
            let drain = async {
                while let Ok(Some(l)) = lines.next_line().await {
                    keep(l, progress);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            status
        };
        let status = match tokio::time::timeout(limit, work).await {
            Err(_) => return Err(LimactlError::TimedOut { command, secs: limit.as_secs() }),
            Ok(Err(source)) => return Err(spawn_err(source)),
            Ok(Ok(status)) => status,
        };
        if !status.success() {
            return Err(LimactlError::Failed { command, status: status.to_string(), stderr: last.join(" | ") });
        }
        Ok(())
    }

    /// `limactl list --json`: every instance.
    ///
    /// # Errors
    ///
    /// [`LimactlError`] if it fails or prints something else than JSON lines.
    pub async fn list(&self) -> Result<Vec<Instance>, LimactlError> {
        let args = ["list", "--json"];
        let out = self.run(&args, LIST_TIMEOUT).await?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|source| LimactlError::Parse { command: Self::describe(&args), source })
    }

    /// The instance called `name`, if any.
    ///
    /// # Errors
    ///
    /// As [`Limactl::list`].
    pub async fn instance(&self, name: &str) -> Result<Option<Instance>, LimactlError> {
        Ok(self.list().await?.into_iter().find(|i| i.name == name))
    }

    /// `limactl start --name=NAME --tty=false TEMPLATE`: creates and boots a new instance.
    ///
    /// # Errors
    ///
    /// [`LimactlError`]; [`LimactlError::is_already_exists`] tells a name clash.
    pub async fn create_and_start(
        &self,
        name: &str,
        template: &Path,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), LimactlError> {
        let name_arg = format!("--name={name}");
        let template = template.to_string_lossy();
        self.run_streaming(&["start", &name_arg, "--tty=false", &template], START_TIMEOUT, progress).await
    }

    /// `limactl start --tty=false NAME`: boots an existing instance.
    ///
    /// # Errors
    ///
    /// [`LimactlError`].
    pub async fn start(&self, name: &str, progress: &mut (dyn FnMut(&str) + Send)) -> Result<(), LimactlError> {
        self.run_streaming(&["start", "--tty=false", name], START_TIMEOUT, progress).await
    }

    /// `limactl stop NAME`.
    ///
    /// # Errors
    ///
    /// [`LimactlError`].
    pub async fn stop(&self, name: &str) -> Result<(), LimactlError> {
        self.run(&["stop", name], STOP_TIMEOUT).await.map(drop)
    }

    /// `limactl delete --force NAME` (stops it first if it runs).
    ///
    /// # Errors
    ///
    /// [`LimactlError`].
    pub async fn delete(&self, name: &str) -> Result<(), LimactlError> {
        self.run(&["delete", "--force", name], STOP_TIMEOUT).await.map(drop)
    }

    /// `limactl shell NAME -- ARGS...`, captured, within `limit`.
    ///
    /// # Errors
    ///
    /// [`LimactlError`] (including the command's own failure).
    pub async fn shell_output(&self, name: &str, args: &[&str], limit: Duration) -> Result<String, LimactlError> {
        let mut all = vec!["shell", name, "--"];
        all.extend_from_slice(args);
        self.run(&all, limit).await
    }

    /// `limactl shell NAME -- ARGS...`: its stdout whatever its exit status
    /// (for commands such as `tvm doctor --json` that print their answer and
    /// exit 1 when a check fails).
    ///
    /// # Errors
    ///
    /// [`LimactlError`] if it cannot run or times out.
    pub async fn shell_stdout(&self, name: &str, args: &[&str], limit: Duration) -> Result<String, LimactlError> {
        let mut all = vec!["shell", name, "--"];
        all.extend_from_slice(args);
        let out = self.run_raw(&all, limit).await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `limactl shell NAME [-- ARGS...]` for interactive use (stdio inherited by the caller).
    pub fn shell_command(&self, name: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("shell").arg(name);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        cmd.kill_on_drop(true);
        cmd
    }
}

fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(STDERR_TAIL)..].join(" | ")
}
