//! The `tvm lima` verbs: up, status, down, delete (and the paths they use).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::limactl::{Limactl, LimactlError};
use crate::limayaml::Arch;
use crate::template::{self, TemplateError, TemplateOptions};

/// Where TVM keeps an instance's host-side files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePaths {
    /// `<base>/<name>`: removed by `tvm lima delete`.
    pub root: PathBuf,
    /// `<root>/share`: the only host directory the VM sees (read-only).
    pub share: PathBuf,
    /// `<root>/lima.yaml`: the template the instance was created from.
    pub template: PathBuf,
}

impl InstancePaths {
    /// Paths of instance `name` under `base`.
    pub fn new(base: &Path, name: &str) -> Self {
        let root = base.join(name);
        InstancePaths { share: root.join("share"), template: root.join("lima.yaml"), root }
    }

    /// Paths under the default base: `$TVM_LIMA_HOME`, else `~/.cache/tvm-lima`
    /// (home from `HOME`, or `USERPROFILE` on Windows).
    ///
    /// # Errors
    ///
    /// [`UpError::NoHome`] when no home directory is known.
    pub fn default_for(name: &str) -> Result<Self, UpError> {
        if let Some(base) = std::env::var_os("TVM_LIMA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::new(Path::new(&base), name));
        }
        let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).ok_or(UpError::NoHome)?;
        Ok(Self::new(&Path::new(&home).join(".cache").join("tvm-lima"), name))
    }
}

/// Why `tvm lima up` stopped.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The instance name is not one Lima accepts.
    #[error("instance name {0:?}: use letters, digits and single '.', '_' or '-' between them")]
    Name(String),
    /// No home directory for the staging files.
    #[error("no home directory (HOME/USERPROFILE) for TVM's Lima files; set TVM_LIMA_HOME")]
    NoHome,
    /// The template options are invalid.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// TVM's Linux binaries are missing or not Linux executables for the VM's architecture.
    #[error(
        "{path}: {problem}. The VM is {}, so it needs TVM's {} Linux binaries `tvm` and `tvm-agent` in one \
         directory (pass --bin-dir DIR; {})", .arch.as_str(), .arch.as_str(), build_hint(*.arch)
    )]
    Binaries {
        /// The file at fault.
        path: String,
        /// What is wrong with it.
        problem: String,
        /// The VM's architecture (the host's: Lima runs the host's architecture natively).
        arch: Arch,
    },
    /// Writing the host-side files failed.
    #[error("cannot write {path}")]
    Files {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An instance of that name exists but was not made by `tvm lima up`.
    #[error(
        "a Lima instance named {0:?} exists but was not created by `tvm lima up` (no TVM provision script); \
         pick another --name, or remove it with `limactl delete {0}`"
    )]
    NotTvm(String),
    /// limactl reports the name as taken although it was not listed (a race with another limactl).
    #[error("limactl says instance {0:?} already exists: run `tvm lima status --name {0}`, then `tvm lima up` again")]
    Exists(String),
    /// The instance is in a state it cannot be started from.
    #[error("instance {name:?} is {status}{}: `tvm lima delete --name {name}`, then `tvm lima up`", errors_suffix(.errors))]
    Broken {
        /// Instance name.
        name: String,
        /// Lima's status.
        status: String,
        /// Lima's errors.
        errors: Vec<String>,
    },
    /// limactl failed.
    #[error("limactl failed")]
    Limactl(#[source] LimactlError),
    /// Booting failed.
    #[error("starting instance {name:?} failed (inside the VM: `tvm lima shell --name {name} -- sudo tail -n 50 /var/log/tvm-lima/provision.log`)")]
    Start {
        /// Instance name.
        name: String,
        /// What limactl said.
        #[source]
        source: LimactlError,
    },
    /// The API did not become ready in time.
    #[error("TVM's API at {url} was not ready within {secs} s (last step inside: {progress}); `tvm lima status` shows where it stands")]
    NotReady {
        /// The forwarded URL.
        url: String,
        /// The limit.
        secs: u64,
        /// Last provision step reported by the VM.
        progress: String,
    },
}

fn errors_suffix(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" ({})", errors.join("; "))
    }
}

/// Why a verb other than `up` failed.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// No instance of that name.
    #[error("no Lima instance named {0:?}; create it with `tvm lima up`")]
    NotFound(String),
    /// limactl failed.
    #[error("limactl failed")]
    Limactl(#[from] LimactlError),
    /// Removing TVM's host-side files failed.
    #[error("cannot remove {path}")]
    Files {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What `tvm lima up` does.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Instance name (Lima's).
    pub name: String,
    /// The template's inputs (host, sizes, port, driver, image); its
    /// `staging_dir` is replaced by `paths.share`.
    pub template: TemplateOptions,
    /// Directory holding the Linux `tvm` and `tvm-agent` for the VM's
    /// architecture (`template.host.arch`).
    pub bin_dir: PathBuf,
    /// Host-side files of the instance.
    pub paths: InstancePaths,
    /// How long to wait for the API after `limactl start` returns.
    pub ready_timeout: Duration,
    /// Pause between readiness polls.
    pub poll_interval: Duration,
}

/// What `tvm lima up` achieved.
#[derive(Debug, Clone, Serialize)]
pub struct UpReport {
    /// Instance name.
    pub name: String,
    /// Whether the instance was created now.
    pub created: bool,
    /// The API on the host (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The API's readiness when `up` returned.
    pub api: Readiness,
}

/// TVM's API as seen from the host through Lima's port forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Readiness {
    /// `/readyz` says ready: every image built, pools warm.
    Ready,
    /// Serving, while these runtimes' images still build in the background.
    Serving {
        /// Runtimes whose image is not ready yet, with their state.
        images_not_ready: Vec<String>,
    },
    /// Shutting down.
    Draining,
    /// Nothing answers (or not TVM).
    Unreachable {
        /// Why.
        reason: String,
    },
}

impl Readiness {
    /// Whether programs can be run now.
    pub fn usable(&self) -> bool {
        matches!(self, Readiness::Ready | Readiness::Serving { .. })
    }
}

/// `GET /readyz` of `tvm serve` (pyroshell's `ReadyBody`).
#[derive(Debug, Deserialize)]
struct ReadyBody {
    ready: bool,
    draining: bool,
    #[serde(default)]
    images_not_ready: Vec<String>,
}

/// Asks `url/readyz` (5 s limit).
pub async fn probe_api(url: &str) -> Readiness {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => return Readiness::Unreachable { reason: e.to_string() },
    };
    let body = match client.get(format!("{url}/readyz")).send().await {
        Ok(resp) => resp.json::<ReadyBody>().await,
        Err(e) => return Readiness::Unreachable { reason: format!("no answer: {e}") },
    };
    match body {
        Ok(b) if b.ready => Readiness::Ready,
        Ok(b) if b.draining => Readiness::Draining,
        Ok(b) => Readiness::Serving { images_not_ready: b.images_not_ready },
        Err(e) => Readiness::Unreachable { reason: format!("not TVM's /readyz: {e}") },
    }
}

/// Checks Lima's instance-name rule (letters and digits, separated by single `.`, `_` or `-`).
pub fn valid_name(name: &str) -> bool {
    let mut prev_sep = true;
    for c in name.chars() {
        let sep = matches!(c, '.' | '_' | '-');
        if !(c.is_ascii_alphanumeric() || sep) || (sep && prev_sep) {
            return false;
        }
        prev_sep = sep;
    }
    !name.is_empty() && !prev_sep && name.len() <= 76
}

/// How to build the binaries for `arch` (the fix in [`UpError::Binaries`]).
fn build_hint(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "build them on Debian 12 with `cargo build --release -p tvm` and scripts/build-agent.sh",
        Arch::Aarch64 => {
            "build them on arm64 Linux with glibc <= 2.36 (Debian 12, as in the VM) with `cargo build --release \
             -p tvm` and scripts/build-agent.sh, or cross-build the static agent on x86_64 with \
             scripts/build-agent-aarch64.sh (docs/lima.md#tvms-linux-binaries)"
        }
    }
}

/// Checks that `path` is a 64-bit little-endian Linux ELF executable for `arch`.
///
/// # Errors
///
/// A description of what it is instead.
pub fn check_linux_elf(path: &Path, arch: Arch) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    f.read_exact(&mut head).map_err(|_| "too short to be an executable".to_string())?;
    if &head[..4] != b"\x7fELF" {
        return Err("not a Linux (ELF) executable".into());
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian; e_machine (ELF gABI): 62 = x86-64, 183 = AArch64.
    let machine = u16::from_le_bytes([head[18], head[19]]);
    let found = match machine {
        62 => Some(Arch::X86_64),
        183 => Some(Arch::Aarch64),
        _ => None,
    };
    if head[4] != 2 || head[5] != 1 || found != Some(arch) {
        let what = found.map_or_else(|| format!("e_machine {machine}"), |a| a.as_str().to_string());
        return Err(format!("an ELF file for {what}, not for {}", arch.as_str()));
    }
    Ok(())
}

/// Where `tvm lima up` looks for TVM's Linux binaries for a VM of `arch`
/// without `--bin-dir`: next to the running `tvm` when that is itself a
/// Linux build for `arch` with `tvm-agent` beside it (a Linux host), else
/// `linux-<arch>/` next to it (`linux-x86_64/`, `linux-aarch64/`: where a
/// macOS or Windows release ships them).
pub fn default_bin_dir(exe: &Path, arch: Arch) -> PathBuf {
    let dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if check_linux_elf(exe, arch).is_ok() && dir.join("tvm-agent").is_file() {
        dir
    } else {
        dir.join(format!("linux-{}", arch.as_str()))
    }
}

/// Copies `tvm` and `tvm-agent` from `bin_dir` into `share/bin` (only when changed).
fn stage_binaries(bin_dir: &Path, share: &Path, arch: Arch) -> Result<(), UpError> {
    let dest = share.join("bin");
    let files_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| UpError::Files { path, source }
    };
    std::fs::create_dir_all(&dest).map_err(files_err(&dest))?;
    for name in ["tvm", "tvm-agent"] {
        let src = bin_dir.join(name);
        check_linux_elf(&src, arch).map_err(|problem| UpError::Binaries {
            path: src.display().to_string(),
            problem,
            arch,
        })?;
        let dst = dest.join(name);
        let same = std::fs::read(&src).ok().zip(std::fs::read(&dst).ok()).is_some_and(|(a, b)| a == b);
        if !same {
            std::fs::copy(&src, &dst).map_err(files_err(&dst))?;
        }
    }
    Ok(())
}

/// `tvm lima up`: creates or starts the instance, waits for TVM's API on
/// the host and returns its URL. `progress` gets one line per step (Lima's
/// log lines and the provision steps inside).
///
/// # Errors
///
/// [`UpError`]: bad options, binaries missing or not for the VM's
/// architecture (both before anything is created), a foreign instance of that name, limactl failures, or an API
/// not ready within `ready_timeout`.
pub async fn up(
    limactl: &Limactl,
    opts: &UpOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<UpReport, UpError> {
    if !valid_name(&opts.name) {
        return Err(UpError::Name(opts.name.clone()));
    }
    let mut topts = opts.template.clone();
    topts.staging_dir = opts.paths.share.display().to_string();
    let yaml = template::render(&template::build(&topts)?)?;
    let name = opts.name.as_str();
    let existing = limactl.instance(name).await.map_err(UpError::Limactl)?;
    if existing.as_ref().is_some_and(|i| !i.is_tvm()) {
        return Err(UpError::NotTvm(name.into()));
    }
    stage_binaries(&opts.bin_dir, &opts.paths.share, opts.template.host.arch)?;
    let start_err = |source| UpError::Start { name: name.into(), source };
    let created = match &existing {
        None => {
            std::fs::write(&opts.paths.template, &yaml)
                .map_err(|source| UpError::Files { path: opts.paths.template.display().to_string(), source })?;
            progress(&format!(
                "creating Lima instance {name}: the first boot installs packages and builds the guest kernel \
                 and default images (15-30 min)"
            ));
            info!(name, template = %opts.paths.template.display(), "creating Lima instance");
            match limactl.create_and_start(name, &opts.paths.template, progress).await {
                Err(e) if e.is_already_exists() => return Err(UpError::Exists(name.into())),
                r => r.map_err(start_err)?,
            }
            true
        }
        Some(i) if i.is_running() => {
            progress(&format!("instance {name} is already running"));
            false
        }
        Some(i) if i.status == "Stopped" => {
            progress(&format!("starting instance {name}"));
            limactl.start(name, progress).await.map_err(start_err)?;
            false
        }
        Some(i) => {
            return Err(UpError::Broken { name: name.into(), status: i.status.clone(), errors: i.errors.clone() })
        }
    };
    // The port of an existing instance is the one it was created with.
    let port = match limactl.instance(name).await.map_err(UpError::Limactl)?.and_then(|i| i.api_port()) {
        Some(p) => p,
        None => topts.port,
    };
    if port != topts.port {
        progress(&format!("instance {name} forwards the API to port {port} (set when it was created)"));
    }
    let url = format!("http://127.0.0.1:{port}");
    let api = wait_ready(limactl, name, &url, opts, progress).await?;
    Ok(UpReport { name: name.into(), created, url, api })
}

async fn wait_ready(
    limactl: &Limactl,
    name: &str,
    url: &str,
    opts: &UpOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Readiness, UpError> {
    let deadline = Instant::now() + opts.ready_timeout;
    let mut last_step = String::new();
    loop {
        let api = probe_api(url).await;
        if api.usable() {
            return Ok(api);
        }
        let step = guest_progress(limactl, name).await.unwrap_or_default();
        if !step.is_empty() && step != last_step {
            progress(&format!("inside the VM: {step}"));
            last_step = step;
        }
        if Instant::now() >= deadline {
            return Err(UpError::NotReady {
                url: url.into(),
                secs: opts.ready_timeout.as_secs(),
                progress: if last_step.is_empty() { "unknown".into() } else { last_step },
            });
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
}

/// The provision step the VM reports (`/var/log/tvm-lima/progress`).
async fn guest_progress(limactl: &Limactl, name: &str) -> Option<String> {
    let out = limactl.shell_output(name, &["cat", "/var/log/tvm-lima/progress"], Duration::from_secs(30)).await.ok()?;
    Some(out.trim().to_string())
}

/// The accelerator TVM uses inside the VM (`tvm doctor --json`'s `accel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accelerator {
    /// `kvm` or `tcg`.
    pub kind: String,
    /// TVM's reason.
    pub reason: String,
}

/// `tvm lima status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Instance name.
    pub name: String,
    /// Lima's status (`Running`, `Stopped`, ...).
    pub state: String,
    /// Driver.
    pub vm_type: String,
    /// Guest architecture.
    pub arch: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Disk, bytes.
    pub disk_bytes: u64,
    /// Whether `tvm lima up` made it.
    pub tvm_instance: bool,
    /// The API's URL on the host, if a forward is configured.
    pub url: Option<String>,
    /// Host directories mounted in the VM.
    pub mounts: Vec<String>,
    /// The accelerator inside (running instances with TVM installed).
    pub accelerator: Option<Accelerator>,
    /// The API through the port forward (running instances).
    pub api: Option<Readiness>,
    /// The last provision step inside.
    pub provision: Option<String>,
    /// Things the user should know (TCG, unexpected mounts, Lima's errors).
    pub notes: Vec<String>,
}

/// `tvm lima status`: Lima's view, the accelerator TVM uses inside, and
/// the API's readiness through the forward.
///
/// # Errors
///
/// [`InstanceError::NotFound`], or limactl failing to list.
pub async fn status(limactl: &Limactl, name: &str, share: Option<&Path>) -> Result<Status, InstanceError> {
    let inst = limactl.instance(name).await?.ok_or_else(|| InstanceError::NotFound(name.into()))?;
    let url = inst.api_port().map(|p| format!("http://127.0.0.1:{p}"));
    let mut notes: Vec<String> = inst.errors.iter().map(|e| format!("Lima: {e}")).collect();
    let mounts = inst.mounts();
    let ours = share.map(|s| s.display().to_string());
    for m in &mounts {
        if !ours.as_ref().is_some_and(|o| m.starts_with(&format!("{o} -> "))) {
            notes.push(format!(
                "host directory mounted into the VM: {m}; code that escapes a microVM could reach it \
                 (remove it from Lima's _config/default.yaml or override.yaml)"
            ));
        }
    }
    let (mut accelerator, mut api, mut provision) = (None, None, None);
    if inst.is_running() {
        accelerator = guest_accelerator(limactl, name).await;
        match &accelerator {
            Some(a) if a.kind == "tcg" => notes.push(format!(
                "TVM runs its microVMs under TCG (software emulation, several times slower) because the Lima VM \
                 has no usable KVM: {}. Nested virtualization needs vmType vz on Apple M3 or later with macOS 15 \
                 or later, or nested virtualization enabled for WSL2/Hyper-V on Windows",
                a.reason
            )),
            None => notes.push("the accelerator inside is unknown: `tvm doctor` did not answer in the VM".into()),
            _ => {}
        }
        if let Some(u) = &url {
            api = Some(probe_api(u).await);
        }
        provision = guest_progress(limactl, name).await.filter(|p| !p.is_empty());
    }
    if !inst.is_tvm() {
        notes.push("this instance was not created by `tvm lima up`".into());
    }
    Ok(Status {
        name: inst.name.clone(),
        state: inst.status.clone(),
        vm_type: inst.vm_type.clone(),
        arch: inst.arch.clone(),
        cpus: inst.cpus,
        memory_bytes: inst.memory,
        disk_bytes: inst.disk,
        tvm_instance: inst.is_tvm(),
        url,
        mounts,
        accelerator,
        api,
        provision,
        notes,
    })
}

/// Asks `tvm doctor --json` in the VM, as root like the service, which accelerator TVM uses.
async fn guest_accelerator(limactl: &Limactl, name: &str) -> Option<Accelerator> {
    let args = ["sudo", "-n", "/usr/local/bin/tvm", "doctor", "--json"];
    // doctor exits 1 when any check fails (an image not built yet, say) but still prints its JSON.
    let out = limactl.shell_stdout(name, &args, Duration::from_secs(120)).await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    serde_json::from_value(v.get("accel")?.clone()).ok()
}

/// `tvm lima down`: stops the instance (its disk, kernel and images stay).
/// Returns whether it was running.
///
/// # Errors
///
/// [`InstanceError::NotFound`] or limactl failing.
pub async fn down(limactl: &Limactl, name: &str) -> Result<bool, InstanceError> {
    let inst = limactl.instance(name).await?.ok_or_else(|| InstanceError::NotFound(name.into()))?;
    if inst.status == "Stopped" {
        return Ok(false);
    }
    limactl.stop(name).await?;
    Ok(true)
}

/// `tvm lima delete`: removes the instance (stopping it first) and TVM's
/// host-side files for it.
///
/// # Errors
///
/// [`InstanceError::NotFound`], limactl failing, or the files not removable.
pub async fn delete(limactl: &Limactl, name: &str, paths: &InstancePaths) -> Result<(), InstanceError> {
    limactl.instance(name).await?.ok_or_else(|| InstanceError::NotFound(name.into()))?;
    limactl.delete(name).await?;
    match std::fs::remove_dir_all(&paths.root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(InstanceError::Files { path: paths.root.display().to_string(), source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lima_names() {
        for ok in ["tvm", "tvm-2", "a.b_c", "X1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-tvm", "tvm-", "a..b", "a b", "ä", "../x", "a/b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn binaries_default_next_to_a_linux_tvm_of_the_vm_arch_else_in_linux_arch() {
        let dir = tempfile::tempdir().unwrap();
        let tvm = dir.path().join("tvm");
        std::fs::write(&tvm, b"MZ not a Linux binary").unwrap();
        assert_eq!(default_bin_dir(&tvm, Arch::X86_64), dir.path().join("linux-x86_64"));
        assert_eq!(default_bin_dir(&tvm, Arch::Aarch64), dir.path().join("linux-aarch64"));
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            std::fs::copy(std::env::current_exe().unwrap(), &tvm).unwrap();
            assert_eq!(default_bin_dir(&tvm, Arch::X86_64), dir.path().join("linux-x86_64"), "no agent beside it");
            std::fs::write(dir.path().join("tvm-agent"), b"").unwrap();
            assert_eq!(default_bin_dir(&tvm, Arch::X86_64), dir.path());
            // An x86_64 tvm is no use to an arm64 VM: look in linux-aarch64/.
            assert_eq!(default_bin_dir(&tvm, Arch::Aarch64), dir.path().join("linux-aarch64"));
        }
    }

    /// The first 20 bytes of a 64-bit little-endian ELF header for `machine`.
    fn elf_head(machine: u16) -> Vec<u8> {
        let mut h = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
        h.extend_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn elf_check_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"#!/bin/sh\necho not elf\n").unwrap();
        assert_eq!(check_linux_elf(&p, Arch::X86_64), Err("not a Linux (ELF) executable".into()));
        std::fs::write(&p, elf_head(183)).unwrap();
        assert_eq!(check_linux_elf(&p, Arch::X86_64), Err("an ELF file for aarch64, not for x86_64".into()));
        assert_eq!(check_linux_elf(&p, Arch::Aarch64), Ok(()));
        std::fs::write(&p, elf_head(62)).unwrap();
        assert_eq!(check_linux_elf(&p, Arch::Aarch64), Err("an ELF file for x86_64, not for aarch64".into()));
        std::fs::write(&p, elf_head(243)).unwrap(); // RISC-V
        assert_eq!(check_linux_elf(&p, Arch::Aarch64), Err("an ELF file for e_machine 243, not for aarch64".into()));
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(check_linux_elf(&std::env::current_exe().unwrap(), Arch::X86_64), Ok(()));
        }
        assert!(check_linux_elf(&dir.path().join("missing"), Arch::X86_64).unwrap_err().starts_with("cannot open"));
    }
}
