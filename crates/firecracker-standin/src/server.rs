//! The `firecracker-standin` program: a **stand-in** for Firecracker, for tests on hosts
//! where Firecracker cannot run (no KVM). It is not Firecracker and says so
//! (`--version`).
//!
//! It serves Firecracker's API on `--api-sock` (HTTP/1.1 over a Unix
//! socket), validates every request against Firecracker's own spec
//! ([`crate::ApiSpec`]) plus the semantic checks Firecracker
//! makes before boot, and answers as Firecracker does: `204` on success,
//! `400 {"fault_message": ...}` otherwise. On `PUT /actions InstanceStart`
//! it boots the configured kernel, initramfs and drives with QEMU `microvm`
//! under TCG, and serves the configured vsock device with
//! `vhost-device-vsock` (rust-vmm), whose host side speaks Firecracker's
//! hybrid vsock protocol on `uds_path` (`CONNECT <port>\n` -> `OK <port>\n`).
//! The guest's serial console goes to stdout, as Firecracker's does; the
//! stand-in exits when the guest ends the VM, and its children die with it
//! (`PR_SET_PDEATHSIG`).
//!
//! Guest time: under Firecracker (KVM) the guest keeps time with kvm-clock.
//! Under TCG it has no such clock and no PIT or HPET to calibrate its TSC
//! against, so it counts timer ticks, which a busy host loses (a guest saw
//! 8.7 s while the host saw 80 s); its wall-time limits and timings then
//! stretch by that factor. So, as TVM's QEMU backend does, the stand-in
//! gives the guest the host's TSC frequency (`tsc_early_khz=… tsc=reliable`,
//! from the `clock_args` its binary passes to [`main`]), ahead of the boot
//! arguments the API configured, which therefore still win.
//!
//! Snapshots: `PATCH /vm` pauses and resumes the guest for real (QMP `stop`
//! / `cont` on a monitor socketpair). `PUT /snapshot/create` asks QEMU
//! whether it can migrate the VM (QMP `query-migrate`, `blocked-reasons`);
//! QEMU 7.2 cannot, because `vhost-user-vsock-device` is unmigratable and
//! vhost-device-vsock lacks `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, so the
//! stand-in answers `400` with QEMU's own reasons in `fault_message`, and
//! `PUT /snapshot/load` (validated and checked as Firecracker checks it)
//! answers `400` too: the stand-in never has a snapshot to load. TVM then
//! cold boots, which is what the stand-in's tests prove.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{ApiSpec, SPEC_VERSION};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Firecracker's default API payload limit (`--http-api-max-payload-size`).
const MAX_PAYLOAD: usize = 51_200;

/// Firecracker's x86_64 kernel command line limit (bytes).
const CMDLINE_MAX: usize = 2048;

/// How long vhost-device-vsock may take to create its socket.
const VHOST_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "firecracker-standin", disable_version_flag = true)]
struct Args {
    /// Path of the API socket to create.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Instance id.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Print the version (which names this a stand-in) and exit.
    #[arg(long)]
    version: bool,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// vhost-device-vsock binary (found next to this binary, in /usr/local/bin or PATH when unset).
    #[arg(long)]
    vhost_device_vsock: Option<PathBuf>,
}

/// What the API has configured so far.
#[derive(Debug, Default)]
struct State {
    boot_source: Option<Value>,
    drives: BTreeMap<String, Value>,
    machine: Option<Value>,
    vsock: Option<Value>,
    entropy: bool,
    logger: Option<PathBuf>,
    metrics: Option<PathBuf>,
    started: bool,
    paused: bool,
    children: Vec<Child>,
    /// QEMU's QMP monitor (after InstanceStart).
    qmp: Option<Qmp>,
}

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest QMP reply line read.
const MAX_QMP_LINE: u64 = 64 << 10;

/// A QMP client on QEMU's monitor socketpair: one command at a time,
/// replies bounded in size and time, events skipped.
#[derive(Debug)]
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(stream: std::os::unix::net::UnixStream) -> Result<Self, String> {
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Self { reader: std::io::BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn execute(&mut self, command: &str) -> Result<Value, String> {
        use std::io::Write;
        writeln!(self.writer, "{}", json!({ "execute": command })).map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let reply = self.read()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("QMP {command}: {}", e["desc"].as_str().unwrap_or_default()));
            }
        }
    }

    fn read(&mut self) -> Result<Value, String> {
        use std::io::{BufRead, Read};
        let mut line = Vec::new();
        let n =
            (&mut self.reader).take(MAX_QMP_LINE).read_until(b'\n', &mut line).map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 || !line.ends_with(b"\n") {
            return Err("QMP: QEMU closed its monitor or sent an overlong line".into());
        }
        serde_json::from_slice(&line).map_err(|e| format!("QMP reply: {e}"))
    }
}

#[derive(Debug)]
struct Ctx {
    spec: ApiSpec,
    args: Args,
    state: Mutex<State>,
    /// Kernel arguments that keep the TCG guest's clock with the host's (see the module docs).
    clock_args: fn() -> Option<String>,
}

/// The stand-in's `main`: parses its command line (Firecracker's
/// `--api-sock` and `--id`, `--version`), serves the API until the guest
/// ends the VM, and returns the exit status (0 when the guest rebooted).
/// `clock_args` gives the kernel arguments that make a TCG guest keep time
/// with the host's TSC, or `None` where that cannot be done (called once per
/// InstanceStart; TVM passes `pyrovm::backend::qemu::tcg_tsc_cmdline`).
pub fn main(clock_args: fn() -> Option<String>) -> std::process::ExitCode {
    let args = Args::parse();
    if args.version {
        println!("Firecracker v{SPEC_VERSION} (stand-in: firecracker-standin, QEMU microvm under TCG + vhost-device-vsock; not Firecracker)");
        return std::process::ExitCode::SUCCESS;
    }
    let Some(sock) = args.api_sock.clone() else {
        eprintln!("firecracker-standin: --api-sock is required");
        return std::process::ExitCode::from(2);
    };
    let spec = match ApiSpec::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("firecracker-standin: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    // One thread: children get PR_SET_PDEATHSIG, which fires when the
    // *thread* that forked them ends, so every fork happens on this one.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firecracker-standin: runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let ctx = Arc::new(Ctx { spec, args, state: Mutex::new(State::default()), clock_args });
    let code = rt.block_on(serve(ctx.clone(), &sock));
    let _ = std::fs::remove_file(&sock);
    std::process::ExitCode::from(code)
}

async fn serve(ctx: Arc<Ctx>, sock: &Path) -> u8 {
    let listener = match tokio::net::UnixListener::bind(sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("firecracker-standin: cannot bind {}: {e}", sock.display());
            return 1;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = tick.tick() => {
                // The VM ends when the guest resets it (reboot=k): QEMU exits, so does the stand-in.
                if let Some(code) = guest_ended(&ctx) {
                    return code;
                }
            }
        }
    }
}

/// QEMU's exit, if the VM has ended; its helpers are stopped then.
fn guest_ended(ctx: &Ctx) -> Option<u8> {
    let mut st = ctx.state.lock().ok()?;
    let qemu = st.children.first_mut()?;
    let status = qemu.try_wait().ok()??;
    for c in st.children.iter_mut().skip(1) {
        let _ = c.kill();
        let _ = c.wait();
    }
    log(&st, &format!("guest ended: QEMU {status}"));
    Some(if status.success() { 0 } else { 1 })
}

fn log(st: &State, line: &str) {
    if let Some(p) = &st.logger {
        use std::io::Write;
        // Non-blocking, as Firecracker opens its log pipe: a full pipe loses lines, never blocks the VMM.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p) {
            let _ = writeln!(f, "[firecracker-standin] {line}");
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

fn reply(status: StatusCode, body: Option<Value>) -> Response<Full<Bytes>> {
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut r = Response::new(Full::new(bytes));
    *r.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        r.headers_mut().insert("Content-Type", hyper::header::HeaderValue::from_static("application/json"));
    }
    r
}

fn fault(message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(StatusCode::BAD_REQUEST, Some(json!({ "fault_message": message.into() })))
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(fault(format!("Request payload exceeds {MAX_PAYLOAD} bytes or could not be read: {e}"))),
    };
    let value = match ctx.spec.check(&method, &path, &body) {
        Ok(v) => v,
        Err(e) => {
            if let Ok(st) = ctx.state.lock() {
                log(&st, &format!("refused {method} {path}: {e}"));
            }
            return Ok(fault(e.to_string()));
        }
    };
    let answer = apply(&ctx, &method, &path, value);
    if let (Ok(st), Err(msg)) = (ctx.state.lock(), &answer) {
        log(&st, &format!("refused {method} {path}: {msg}"));
    }
    Ok(match answer {
        Ok(None) => reply(StatusCode::NO_CONTENT, None),
        Ok(Some(v)) => reply(StatusCode::OK, Some(v)),
        Err(msg) => fault(msg),
    })
}

fn check_file(what: &str, path: &str) -> Result<(), String> {
    std::fs::File::open(path).map(drop).map_err(|e| format!("The {what} file cannot be opened: {e}"))
}

/// Firecracker's semantic checks and the state change of one request.
fn apply(ctx: &Ctx, method: &str, path: &str, v: Value) -> Result<Option<Value>, String> {
    let mut st = ctx.state.lock().map_err(|_| "internal error".to_string())?;
    if method == "GET" && path == "/" {
        let state = if st.started { "Running" } else { "Not started" };
        return Ok(Some(
            json!({"app_name": "Firecracker", "id": ctx.args.id, "state": state, "vmm_version": SPEC_VERSION}),
        ));
    }
    if method == "GET" && path == "/version" {
        return Ok(Some(json!({ "firecracker_version": SPEC_VERSION })));
    }
    let pre_boot_only =
        matches!(path, "/boot-source" | "/machine-config" | "/vsock" | "/entropy" | "/logger" | "/metrics")
            || path.starts_with("/drives/");
    if st.started && method == "PUT" && pre_boot_only {
        return Err("The requested operation is not supported after starting the microVM.".into());
    }
    match (method, path) {
        ("PUT", "/boot-source") => {
            check_file("kernel", v["kernel_image_path"].as_str().unwrap_or_default())?;
            if let Some(i) = v["initrd_path"].as_str() {
                check_file("initrd", i)?;
            }
            let args = v["boot_args"].as_str().unwrap_or_default();
            if args.len() >= CMDLINE_MAX {
                return Err(format!(
                    "Invalid kernel command line: the command line is {} bytes, at most {} fit",
                    args.len(),
                    CMDLINE_MAX - 1
                ));
            }
            st.boot_source = Some(v);
        }
        ("PUT", p) if p.starts_with("/drives/") => {
            let id = &p["/drives/".len()..];
            if v["drive_id"].as_str() != Some(id) {
                return Err("The id from the path does not match the id from the body!".into());
            }
            match v["path_on_host"].as_str() {
                Some(f) => check_file("drive", f)?,
                None => return Err("The stand-in supports virtio-block drives only (path_on_host).".into()),
            }
            st.drives.insert(id.to_string(), v);
        }
        ("PUT", "/machine-config") => {
            let vcpus = v["vcpu_count"].as_u64().unwrap_or(0);
            if v["smt"].as_bool() == Some(true) && vcpus > 1 && vcpus % 2 == 1 {
                return Err("The number of vCPUs must be 1 or an even number when SMT is enabled.".into());
            }
            if v["mem_size_mib"].as_u64().unwrap_or(0) == 0 {
                return Err("The memory size (MiB) is either 0, or not a multiple of the configured page size.".into());
            }
            st.machine = Some(v);
        }
        ("PATCH", "/vm") => {
            if !st.started {
                return Err("The requested operation is not supported before starting the microVM.".into());
            }
            let (command, paused) = match v["state"].as_str() {
                Some("Paused") => ("stop", true),
                _ => ("cont", false),
            };
            st.qmp.as_mut().ok_or("The stand-in has no QEMU monitor.")?.execute(command)?;
            st.paused = paused;
            log(&st, &format!("PATCH /vm: QEMU {command}"));
        }
        ("PUT", "/snapshot/create") => {
            if !st.started {
                return Err("The requested operation is not supported before starting the microVM.".into());
            }
            if !st.paused {
                return Err("Cannot create a snapshot: the microVM must be paused first (PATCH /vm Paused).".into());
            }
            let qmp = st.qmp.as_mut().ok_or("The stand-in has no QEMU monitor.")?;
            let version = qmp.execute("query-version")?;
            let qemu =
                format!("{}.{}.{}", version["qemu"]["major"], version["qemu"]["minor"], version["qemu"]["micro"]);
            let info = qmp.execute("query-migrate")?;
            let blocked: Vec<&str> = info["blocked-reasons"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            return Err(if blocked.is_empty() {
                format!("The stand-in cannot create snapshots: it implements none, though its QEMU {qemu} reports no migration blocker for this VM.")
            } else {
                format!(
                    "The stand-in cannot create snapshots: its QEMU {qemu} refuses to migrate this VM: {}",
                    blocked.join(" ")
                )
            });
        }
        ("PUT", "/snapshot/load") => {
            // Firecracker: only a fresh process, with at most a logger and metrics configured.
            if st.started
                || st.boot_source.is_some()
                || !st.drives.is_empty()
                || st.machine.is_some()
                || st.vsock.is_some()
                || st.entropy
            {
                return Err("Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
            }
            check_file("snapshot", v["snapshot_path"].as_str().unwrap_or_default())?;
            match (v.get("mem_backend"), v.get("mem_file_path")) {
                (Some(b), None) if b["backend_type"] == "File" => {
                    check_file("memory", b["backend_path"].as_str().unwrap_or_default())?
                }
                (Some(_), None) => return Err("The stand-in supports the File memory backend only.".into()),
                (None, Some(p)) => check_file("memory", p.as_str().unwrap_or_default())?,
                _ => return Err("Exactly one of mem_backend and mem_file_path must be given.".into()),
            }
            return Err("The stand-in cannot load snapshots: its QEMU (7.2) cannot migrate vhost-user-vsock-device, so the stand-in never creates one to load.".into());
        }
        ("PUT", "/vsock") => st.vsock = Some(v),
        ("PUT", "/entropy") => st.entropy = true,
        ("PUT", "/logger") => {
            let p = PathBuf::from(v["log_path"].as_str().unwrap_or_default());
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
                .map_err(|e| format!("Logger error: cannot open {}: {e}", p.display()))?;
            st.logger = Some(p);
            log(&st, &format!("Running Firecracker stand-in v{SPEC_VERSION} (not Firecracker)"));
        }
        ("PUT", "/metrics") => {
            let p = PathBuf::from(v["metrics_path"].as_str().unwrap_or_default());
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
                .map_err(|e| format!("Metrics error: cannot open {}: {e}", p.display()))?;
            st.metrics = Some(p);
        }
        ("PUT", "/actions") => match v["action_type"].as_str() {
            Some("InstanceStart") => {
                if st.started {
                    return Err("The microVM is already running.".into());
                }
                start(ctx, &mut st)?;
                st.started = true;
            }
            Some("FlushMetrics") => {
                if let Some(p) = &st.metrics {
                    use std::io::Write;
                    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p) {
                        let _ = writeln!(f, "{}", json!({"standin": true, "started": st.started}));
                    }
                }
            }
            Some(other) => return Err(format!("The stand-in does not implement action {other}.")),
            None => return Err("action_type missing".into()),
        },
        _ => return Err(format!("The stand-in does not implement {method} {path}.")),
    }
    Ok(None)
}

/// The guest's kernel command line: `clock` (see the module docs) first, so
/// the configured `boot_args` after it win where they set the same parameter.
fn guest_cmdline(clock: Option<String>, boot_args: &str) -> String {
    match clock {
        Some(clock) if !boot_args.is_empty() => format!("{clock} {boot_args}"),
        Some(clock) => clock,
        None => boot_args.to_string(),
    }
}

/// Runs a helper with PR_SET_PDEATHSIG, so it dies with the stand-in.
fn spawn_child(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn find_vhost_device_vsock(args: &Args) -> Option<PathBuf> {
    if let Some(p) = &args.vhost_device_vsock {
        return Some(p.clone());
    }
    // Its environment is empty (TVM clears a VMM's): a fixed list after the sibling.
    let sibling = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    sibling
        .into_iter()
        .chain(["/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .chain(path_dirs)
        .map(|d| d.join("vhost-device-vsock"))
        .find(|p| p.is_file())
}

/// InstanceStart: vhost-device-vsock for the vsock device, then QEMU microvm.
fn start(ctx: &Ctx, st: &mut State) -> Result<(), String> {
    let boot = st.boot_source.clone().ok_or("Cannot start microvm without kernel configuration.")?;
    let machine = st.machine.clone().unwrap_or(json!({"vcpu_count": 1, "mem_size_mib": 128}));
    let mem = machine["mem_size_mib"].as_u64().unwrap_or(128);
    let vcpus = machine["vcpu_count"].as_u64().unwrap_or(1);
    let boot_args = guest_cmdline((ctx.clock_args)(), boot["boot_args"].as_str().unwrap_or_default());
    let mut qemu = Command::new(&ctx.args.qemu);
    qemu.args([
        "-M",
        "microvm,accel=tcg,acpi=off,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem",
        // TCG's CPU as the QEMU backend gives it (`pyrovm::backend::qemu::TCG_X86_64_CPU`):
        // without ERMS, whose `rep movsb` TCG runs one iteration per byte.
        "-cpu",
        "max,-erms",
        "-m",
        &format!("{mem}M"),
        "-smp",
        &vcpus.to_string(),
        // vhost-user needs guest RAM the device process can map.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        // QMP on a socketpair (descriptor named below): pause, resume, migration checks.
        "-mon",
        "chardev=qmp,mode=control",
        // Firecracker ends the VM on the i8042 reset (reboot=k); so does this.
        "-device",
        "i8042",
        "-kernel",
        boot["kernel_image_path"].as_str().unwrap_or_default(),
        "-append",
        &boot_args,
    ]);
    if let Some(i) = boot["initrd_path"].as_str() {
        qemu.args(["-initrd", i]);
    }
    for (n, (id, d)) in st.drives.iter().enumerate() {
        let ro = if d["is_read_only"].as_bool().unwrap_or(false) { "on" } else { "off" };
        let file = d["path_on_host"].as_str().unwrap_or_default();
        qemu.args(["-drive", &format!("id=d{n},file={file},format=raw,if=none,readonly={ro}")]);
        qemu.args(["-device", &format!("virtio-blk-device,drive=d{n},serial={id}")]);
    }
    if st.entropy {
        qemu.args(["-device", "virtio-rng-device"]);
    }
    let (qmp, qmp_theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot create the QMP socketpair: {e}"))?;
    let qmp_fd = std::os::fd::AsRawFd::as_raw_fd(&qmp_theirs);
    qemu.args(["-chardev", &format!("socket,id=qmp,fd={qmp_fd}")]);
    let mut helpers = Vec::new();
    if let Some(vs) = &st.vsock {
        let uds = PathBuf::from(vs["uds_path"].as_str().unwrap_or_default());
        let cid = vs["guest_cid"].as_u64().unwrap_or(3);
        let vhost_sock = PathBuf::from(format!("{}.vhost", uds.display()));
        let bin = find_vhost_device_vsock(&ctx.args)
            .ok_or("vhost-device-vsock not found (cargo install vhost-device-vsock --locked)")?;
        let child = spawn_child(
            Command::new(&bin)
                .arg("--guest-cid")
                .arg(cid.to_string())
                .arg("--socket")
                .arg(&vhost_sock)
                .arg("--uds-path")
                .arg(&uds)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        helpers.push(child);
        let until = Instant::now() + VHOST_WAIT;
        while !vhost_sock.exists() {
            if Instant::now() > until {
                for c in &mut helpers {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(format!("vhost-device-vsock did not create {} in time", vhost_sock.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        qemu.args(["-chardev", &format!("socket,id=vsock,path={}", vhost_sock.display())]);
        // The guest CID comes from the vhost-user backend (--guest-cid above).
        qemu.args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
    }
    // SAFETY: fcntl is async-signal-safe; it keeps QEMU's end of the monitor across exec.
    unsafe {
        qemu.pre_exec(move || {
            if libc::fcntl(qmp_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = spawn_child(qemu.stdin(Stdio::null())).map_err(|e| {
        for c in &mut helpers {
            let _ = c.kill();
            let _ = c.wait();
        }
        format!("cannot start {}: {e}", ctx.args.qemu.display())
    })?;
    drop(qmp_theirs);
    st.children.push(child);
    // QEMU answers its monitor once it is up; a failure here leaves the VM
    // running without pause or snapshot support.
    match Qmp::connect(qmp) {
        Ok(q) => st.qmp = Some(q),
        Err(e) => log(st, &format!("no QEMU monitor: {e}")),
    }
    st.children.extend(helpers);
    log(st, "InstanceStart: guest booting under QEMU microvm (TCG)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_arguments_come_first_so_configured_ones_win() {
        let clock = || Some("tsc_early_khz=2000000 tsc=reliable".to_string());
        assert_eq!(
            guest_cmdline(clock(), "console=ttyS0 reboot=k tsc=unstable"),
            "tsc_early_khz=2000000 tsc=reliable console=ttyS0 reboot=k tsc=unstable"
        );
        assert_eq!(guest_cmdline(clock(), ""), "tsc_early_khz=2000000 tsc=reliable");
        assert_eq!(guest_cmdline(None, "console=ttyS0"), "console=ttyS0");
    }
}
