//! A real `tvm serve` for tests, and a raw HTTP/1.1 client over `TcpStream`
//! (the tests need control over headers, bodies and timing).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Env;

pub const STARTUP: Duration = Duration::from_secs(180);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the API error shape and returns the error object.
    pub fn error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(self.header("x-request-id").is_some(), "errors carry a request id too");
        v["error"].clone()
    }
}

pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    s
}

/// Writes one request; a body (and any POST) gets a correct Content-Length.
pub fn write_request(s: &mut TcpStream, addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
}

/// Sends one request and reads the whole response.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = connect(addr);
    write_request(&mut s, addr, method, path, headers, body);
    read_response(s)
}

/// Sends `body` with a correct Content-Length.
pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Resp {
    http(addr, method, path, &[], body)
}

/// Reads the status line and headers.
pub fn read_head(r: &mut BufReader<TcpStream>) -> (u16, BTreeMap<String, String>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    (status, headers)
}

/// Calls `on_data` with body bytes as they arrive (de-chunked), until the body ends.
pub fn read_body(r: &mut BufReader<TcpStream>, headers: &BTreeMap<String, String>, mut on_data: impl FnMut(&[u8])) {
    if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).unwrap() == 0 {
                return;
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap();
            if n == 0 {
                return;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            on_data(&chunk[..n]);
        }
    } else if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        on_data(&body);
    } else {
        let mut body = Vec::new();
        let _ = r.read_to_end(&mut body);
        on_data(&body);
    }
}

/// Reads one response (Content-Length, chunked, or until close).
pub fn read_response(s: TcpStream) -> Resp {
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let mut body = Vec::new();
    read_body(&mut r, &headers, |b| body.extend_from_slice(b));
    Resp { status, headers, body }
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

/// `tvm` of this build, or `TVM_TEST_SERVER_BIN` to run the suite against another binary.
fn server_command(env: &Env) -> Command {
    match std::env::var_os("TVM_TEST_SERVER_BIN") {
        None => env.tvm(),
        Some(bin) => {
            let mut c = Command::new(bin);
            c.env("TVM_RUNTIME_DIR", env.runtime_dir.path()).env_remove("TVM_LOG").stdin(Stdio::null());
            c
        }
    }
}

impl Server {
    pub fn start(env: &Env, args: &[&str]) -> Server {
        Self::start_with_env(env, args, &[])
    }

    /// [`Server::start`] with extra environment variables (a cache of the
    /// test's own, templates on or off).
    pub fn start_with_env(env: &Env, args: &[&str], vars: &[(&str, &std::ffi::OsStr)]) -> Server {
        let mut child = server_command(env)
            .envs(vars.iter().copied())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("TVM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(STARTUP) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server { child, addr, log }
    }

    pub fn execute(&self, body: &Value) -> Resp {
        self.post("/v1/executions", &[], body)
    }

    pub fn get(&self, path: &str) -> Resp {
        request(&self.addr, "GET", path, b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
        http(&self.addr, "POST", path, headers, body.to_string().as_bytes())
    }

    pub fn metric(&self, series: &str) -> Option<f64> {
        let m = self.get("/metrics").text();
        m.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    pub fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool, what: &str) {
        let t = Instant::now();
        while !self.metric(series).is_some_and(&pred) {
            assert!(t.elapsed() < STARTUP, "timed out waiting for {what}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until no template build runs in the background. With templates
    /// on (the default), a VM whose template is missing cold boots while the
    /// server builds that template in a VM of its own (an extra VMM process,
    /// child, run dir and host cgroup); a test that counts those waits here
    /// after the request (or pool refill) that may have started a build:
    /// builds are claimed before the VM that needed one starts.
    pub fn wait_templates_idle(&self) {
        self.wait_metric("tvm_template_builds_running ", |v| v == 0.0, "background template builds to finish");
    }

    /// Waits until no background template build runs and every VM holding
    /// capacity is a parked pool VM (`tvm_vms` = the pools' idle VMs): a VM
    /// that served its job is destroyed off the response path, so for a few
    /// ms after a response its VMM may still be exiting. A test that takes a
    /// footprint as its baseline waits here first.
    pub fn wait_settled(&self) {
        self.wait_templates_idle();
        wait_until("every served VM torn down", Duration::from_secs(30), || {
            let m = self.get("/metrics").text();
            let vms = m.lines().find_map(|l| l.strip_prefix("tvm_vms ")?.trim().parse::<f64>().ok());
            let parked: f64 = m
                .lines()
                .filter(|l| l.starts_with("tvm_pool_idle{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            vms == Some(parked)
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < timeout, "server did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the server exits cleanly.
    pub fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait(Duration::from_secs(60));
        assert!(status.success(), "server exit {status:?}; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only reached with the server still up when a test failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A snapshot of what a TVM server may leak on the host, for before/after
/// comparisons: its child processes and open descriptors, VMM processes and
/// run dirs of its runtime dir, host VM cgroups, and mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFootprint {
    pub children: usize,
    pub fds: usize,
    pub vmms: usize,
    pub run_dirs: usize,
    pub cgroups: usize,
    pub mounts: usize,
}

pub fn footprint(env: &Env, server_pid: Option<u32>) -> HostFootprint {
    HostFootprint {
        children: server_pid.map(|p| children(p).len()).unwrap_or(0),
        fds: server_pid.map(open_fds).unwrap_or(0),
        vmms: super::vmm_processes(env.runtime_dir.path()).len(),
        run_dirs: std::fs::read_dir(env.runtime_dir.path()).map(|d| d.count()).unwrap_or(0),
        cgroups: server_pid.map(host_vm_cgroups).unwrap_or(0),
        mounts: mounts_under(&[env.runtime_dir.path(), env.work.path(), &super::cache::shared_cache()]),
    }
}

/// Mounts whose mount point lies under one of `dirs`: the places a TVM
/// server or its builds mount anything. Counting every mount of the host
/// would make a test fail for another process's mount (a parallel test, an
/// image build of another checkout) instead of a leak of its own.
fn mounts_under(dirs: &[&std::path::Path]) -> usize {
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| dirs.iter().any(|d| std::path::Path::new(m).starts_with(d)))
        .count()
}

/// Waits (up to `timeout`) until the host footprint of `server_pid` is back
/// at `before`: same children, VMMs, run dirs, host cgroups and mounts, and
/// at most two descriptors more (the runtime keeps a few lazily, e.g. for
/// its blocking pool). On timeout it panics showing both footprints, so a
/// failure says what was left, not only that something was.
pub fn wait_for_footprint(env: &Env, server_pid: u32, before: &HostFootprint, timeout: Duration) {
    let t = Instant::now();
    loop {
        let now = footprint(env, Some(server_pid));
        let back = now.children == before.children
            && now.vmms == before.vmms
            && now.run_dirs == before.run_dirs
            && now.cgroups == before.cgroups
            && now.mounts == before.mounts
            && now.fds <= before.fds + 2;
        if back {
            return;
        }
        assert!(
            t.elapsed() < timeout,
            "footprint not back to the baseline after {timeout:?}: before {before:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// VMs with host cgroups owned by process `owner` (0 where host cgroups are
/// unused). Names are `vm-<id>.<owner pid>.<start>`; a VM has one cgroup in
/// each hierarchy in use (cgroup2 and v1 ones), counted once here, and it
/// must have it in every hierarchy.
pub fn host_vm_cgroups(owner: u32) -> usize {
    let Ok(c) = pyrovm::hostcg::HostCgroups::detect() else { return 0 };
    let tag = format!(".{owner}.");
    let dirs: Vec<_> = c.vm_cgroups().into_iter().filter(|p| p.to_string_lossy().contains(&tag)).collect();
    let names: std::collections::BTreeSet<_> =
        dirs.iter().filter_map(|p| p.file_name().map(|n| n.to_owned())).collect();
    assert_eq!(dirs.len(), names.len() * c.parents().len(), "a VM's cgroup missing in some hierarchy: {dirs:?}");
    names.len()
}

/// Pids of live processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// One server-sent event: its name, its JSON data, and when it was read.
#[derive(Debug)]
pub struct TimedEvent {
    pub event: String,
    pub data: Value,
    pub at: Instant,
}

/// POSTs `body` to an event-stream endpoint and reads every event until the
/// server closes the stream: the status and the events, in arrival order.
pub fn sse(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<TimedEvent>) {
    let mut s = connect(addr);
    write_request(&mut s, addr, "POST", path, headers, body);
    let mut r = BufReader::new(s);
    let (status, h) = read_head(&mut r);
    let mut events = Vec::new();
    let mut buf = String::new();
    read_body(&mut r, &h, |b| {
        buf.push_str(&String::from_utf8_lossy(b));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !data.is_empty() {
                events.push(TimedEvent { event, data: serde_json::from_str(&data).unwrap(), at: Instant::now() });
            }
        }
    });
    (status, events)
}
