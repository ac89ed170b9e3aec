//! `tvm serve` as an attacker and a schema-driven client see it (issue 19):
//! connections that never complete a request, cross-origin browser requests
//! and DNS rebinding, conflicting file names, option-like entry files (real
//! VMs), parse bounds, the OpenAPI document against the server, malformed
//! HTTP, and the admission metrics. Every test runs a real server.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{connect, http, open_fds, read_response, wait_until, Resp, Server, STARTUP};
use common::{vmm_processes, Env};
use serde_json::json;

const IDLE: Duration = Duration::from_secs(5);

/// Lets this test process hold thousands of sockets.
fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// Sends raw bytes and reads until the server closes (or `wait` passes).
fn raw(addr: &str, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    let _ = c.write_all(bytes);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

/// Parses a raw HTTP/1.1 response with a Content-Length body.
fn parse_raw(bytes: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp { status, headers, body: body.as_bytes().to_vec() }
}

fn post_typed(addr: &str, content_type: Option<&str>, host: Option<&str>, body: &str) -> Resp {
    let mut head = format!("POST /v1/executions HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", host.unwrap_or(addr));
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut c = connect(addr);
    c.write_all(head.as_bytes()).unwrap();
    read_response(c)
}

fn get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut head = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut c = connect(addr);
    c.write_all(head.as_bytes()).unwrap();
    read_response(c)
}

fn metric(server: &Server, series: &str) -> f64 {
    server.metric(series).unwrap_or(0.0)
}

/// A connection from another loopback address (127.0.0.0/8 is all this host).
fn connect_from(src: [u8; 4], addr: &str) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(src[0], src[1], src[2], src[3], 0)).unwrap();
    let to: std::net::SocketAddrV4 = addr.parse().unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)).unwrap();
    // SAFETY: a connected TCP socket we own; the TcpStream takes it over.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// Reads what a connection got within `wait`, if it starts with a 503 from the caps.
fn refusal(c: &mut TcpStream, wait: Duration) -> Option<Resp> {
    c.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out.starts_with(b"HTTP/1.1 503").then(|| parse_raw(&out))
}

/// Kind 1. Attack: thousands of connections that never complete a request
/// (nothing sent, half a request line, half an HTTP/2 preface, a whole
/// preface and nothing after) to exhaust descriptors. Defence: every
/// connection without a request in progress is closed after --idle-timeout
/// and the server keeps serving meanwhile; its descriptors come back.
#[test]
fn idle_and_half_open_connections_are_closed() {
    raise_own_fd_limit();
    let env = Env::new();
    let idle = format!("{}ms", IDLE.as_millis());
    let caps = ["--max-connections", "4000", "--max-connections-per-ip", "4000"];
    let server = Server::start(&env, &[&["--no-build-images", "--idle-timeout", &idle][..], &caps].concat());
    let addr = server.addr.clone();
    assert_eq!(server.get("/healthz").status, 200);
    let baseline = open_fds(server.pid());

    let openers: [&[u8]; 4] = [
        b"",
        b"GET /hea",
        b"PRI * HTTP/2.0\r\n",
        // The whole preface and an empty SETTINGS frame: a live HTTP/2 connection that never asks anything.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ];
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..2000 {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.write_all(openers[i % openers.len()]).unwrap();
        held.push(c);
    }
    eprintln!("2000 connections opened in {:?}", opened.elapsed());
    let open = metric(&server, "tvm_http_connections");
    eprintln!("{open} open on the server");
    let r = server.get("/healthz");
    assert_eq!(r.status, 200, "served while {open} connections stall");

    // All of them are closed by the server after the idle timeout (its own count: a connection's idle
    // clock starts when it is accepted, which on a busy host can be seconds after the connect), and
    // its descriptors come back.
    wait_until("idle connections closed", IDLE * 20, || {
        metric(&server, "tvm_http_connections_closed_total{reason=\"idle\"}") >= 2000.0
            && open_fds(server.pid()) <= baseline + 2
    });
    eprintln!("closed {:?} after the last was opened", opened.elapsed());
    for (i, c) in held.iter_mut().enumerate().step_by(97) {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        // h2 connections get the server's SETTINGS (and pings) first, then EOF.
        let mut eof = false;
        for _ in 0..64 {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(eof, "connection {i} still open");
    }
    let m = server.get("/metrics").text();
    let closed: Vec<_> = m.lines().filter(|l| l.starts_with("tvm_http_connections_closed_total")).collect();
    assert!(metric(&server, "tvm_http_connections_closed_total{reason=\"idle\"}") >= 2000.0, "{closed:?}");
    assert_eq!(server.get("/healthz").status, 200);
    drop(held);
    server.stop();
    env.assert_clean();
}

/// Kind 1. Attack: more connections than the server (or one client) should
/// hold. Defence: per-address and server caps; past them a 503 in the
/// error shape and the connection closed at once.
#[test]
fn connections_are_capped_per_address_and_per_server() {
    let env = Env::new();
    let server = Server::start(
        &env,
        &["--no-build-images", "--max-connections", "60", "--max-connections-per-ip", "40", "--idle-timeout", "60s"],
    );
    let addr = server.addr.clone();
    let mut held: Vec<TcpStream> = (0..40).map(|_| connect_from([127, 0, 0, 2], &addr)).collect();
    // A connect returns once the kernel queued it; the server counts it when it accepts it.
    wait_until("40 connections accepted", Duration::from_secs(20), || {
        metric(&server, "tvm_http_connections") >= 41.0 // the 40 and this request's own
    });
    // This address is full: the next is refused; another address is still served.
    let mut c = connect_from([127, 0, 0, 2], &addr);
    refusal(&mut c, Duration::from_secs(5))
        .expect("refused past the per-address cap")
        .error(503, "too_many_connections");
    assert_eq!(server.get("/healthz").status, 200);
    // 20 more from a third address fill the server; then nobody gets in.
    held.extend((0..19).map(|_| connect_from([127, 0, 0, 3], &addr)));
    wait_until("59 connections accepted", Duration::from_secs(20), || {
        metric(&server, "tvm_http_connections") >= 60.0 // the 59 and this request's own
    });
    // The probe's own connection may still be counted for a moment.
    std::thread::sleep(Duration::from_millis(1000));
    held.push(connect_from([127, 0, 0, 3], &addr));
    std::thread::sleep(Duration::from_millis(1000));
    let mut c = connect_from([127, 0, 0, 4], &addr);
    let e = refusal(&mut c, Duration::from_secs(5))
        .expect("refused past the server cap")
        .error(503, "too_many_connections");
    assert!(e["message"].as_str().unwrap().contains("60"), "{e}");
    for c in &mut held {
        assert!(refusal(c, Duration::from_millis(1)).is_none(), "a connection under the caps was refused");
    }
    drop(held);
    wait_until("connections freed", Duration::from_secs(10), || server.get("/healthz").status == 200);
    // (Probes while the closes were still being processed may have been refused too.)
    assert!(metric(&server, "tvm_http_connections_closed_total{reason=\"over_ip_limit\"}") >= 1.0);
    assert!(metric(&server, "tvm_http_connections_closed_total{reason=\"over_limit\"}") >= 1.0);
    server.stop();
    env.assert_clean();
}

/// Kind 2. Attack: a web page posting work cross-origin as text/plain,
/// a form or without a type (no preflight needed), or reading answers via
/// DNS rebinding (its own name resolving to 127.0.0.1). Defence: JSON
/// endpoints take only JSON media types (415); a loopback server answers
/// only loopback names and --allowed-hosts (421); CORS headers only for
/// --cors-origins.
#[test]
fn browsers_cannot_submit_work_or_rebind() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);
    let addr = server.addr.clone();
    let body = json!({"runtime": "cobol", "files": [{"name": "a", "content": ""}]}).to_string();
    for ct in
        [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None]
    {
        let r = post_typed(&addr, ct, None, &body);
        let e = r.error(415, "unsupported_media_type");
        assert!(e["message"].as_str().unwrap().contains("application/json"), "{e}");
        assert!(r.header("access-control-allow-origin").is_none());
    }
    // JSON media types pass the check (and reach the runtime lookup).
    for ct in ["application/json", "application/json; charset=utf-8", "application/vnd.api+json"] {
        post_typed(&addr, Some(ct), None, &body).error(422, "unknown_runtime");
    }
    // The stream endpoint takes the same check; with the JSON type an empty body is malformed.
    let r = http(&addr, "POST", "/v1/executions/stream", &[("X-Probe", "1")], b"");
    assert_eq!(r.status, 400, "{}", r.text());
    let mut c = connect(&addr);
    let head = format!("POST /v1/executions/stream HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    c.write_all(head.as_bytes()).unwrap();
    read_response(c).error(415, "unsupported_media_type");
    // Rebinding: another name is refused on every route, loopback names are fine.
    for path in ["/healthz", "/v1/runtimes", "/v1/openapi.json"] {
        get_with(&addr, path, &[("Host", "evil.example")]).error(421, "host_not_allowed");
        get_with(&addr, path, &[("Host", "evil.example:80")]).error(421, "host_not_allowed");
    }
    post_typed(&addr, Some("application/json"), Some("rebind.example:8080"), &body).error(421, "host_not_allowed");
    let port = addr.rsplit_once(':').unwrap().1;
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), "[::1]".into(), "app.localhost".into()] {
        assert_eq!(get_with(&addr, "/healthz", &[("Host", &host)]).status, 200, "{host}");
    }
    // No CORS unless configured: no allow-origin header, preflight is just an unknown method.
    let r = get_with(&addr, "/healthz", &[("Origin", "https://evil.example")]);
    assert!(r.header("access-control-allow-origin").is_none());
    let mut c = connect(&addr);
    let pre = format!(
        "OPTIONS /v1/executions HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    c.write_all(pre.as_bytes()).unwrap();
    let r = read_response(c);
    assert!(r.header("access-control-allow-origin").is_none(), "{:?}", r.headers);
    r.error(405, "method_not_allowed");
    server.stop();

    // Configured: named hosts and origins only.
    let server = Server::start(
        &env,
        &["--no-build-images", "--allowed-hosts", "tvm.test,.lab.test", "--cors-origins", "https://ui.test"],
    );
    let addr = server.addr.clone();
    for host in ["tvm.test", "a.lab.test:1234", "localhost"] {
        assert_eq!(get_with(&addr, "/healthz", &[("Host", host)]).status, 200, "{host}");
    }
    get_with(&addr, "/healthz", &[("Host", "evil.example")]).error(421, "host_not_allowed");
    let r = get_with(&addr, "/healthz", &[("Origin", "https://ui.test")]);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://ui.test"));
    let r = get_with(&addr, "/healthz", &[("Origin", "https://evil.example")]);
    assert!(r.header("access-control-allow-origin").is_none());
    let mut c = connect(&addr);
    let pre = format!(
        "OPTIONS /v1/executions HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://ui.test\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
    );
    c.write_all(pre.as_bytes()).unwrap();
    let r = read_response(c);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://ui.test"), "{:?}", r.headers);
    server.stop();
    env.assert_clean();
}

/// Kinds 3, 5, 6. Requests that cannot run are refused before any VM: path
/// conflicts, counts and sizes (while parsing, also inside a 32 MiB body),
/// non-objects; integral numbers are integers; limits follow the document.
#[test]
fn request_shapes_follow_the_document_and_are_refused_before_any_vm() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);
    let addr = server.addr.clone();
    let file = |n: &str| json!({"name": n, "content": "print(1)"});

    for files in [vec![file("x"), file("x/y.py")], vec![file("x/y.py"), file("x")], vec![file("a/b"), file("a/b/c/d")]]
    {
        let e = server.execute(&json!({"runtime": "python", "files": files})).error(422, "path_conflict");
        assert_eq!(e["field"], "files");
    }
    let e = server
        .execute(&json!({"runtime": "python", "files": [file("a.py"), file("a.py")]}))
        .error(422, "duplicate_file");
    assert_eq!(e["field"], "files");
    let deep = "a/b/c/d/e/f/g/h/i.py";
    let e = server.execute(&json!({"runtime": "python", "files": [file(deep)]})).error(422, "bad_file_name");
    assert!(e["message"].as_str().unwrap().contains("8 path parts"), "{e}");

    // The worst bodies: 32 MiB of tiny array entries, refused while parsing.
    let n = (32 << 20) / 3 - 100;
    let args = format!("{{\"runtime\":\"python\",\"files\":[],\"args\":[{}]}}", vec!["\"\""; n].join(","));
    let t = Instant::now();
    let r = http(&addr, "POST", "/v1/executions", &[], args.as_bytes());
    let e = r.error(422, "bad_args");
    assert_eq!(e["field"], "args");
    let files = format!(
        "{{\"runtime\":\"python\",\"files\":[{}]}}",
        vec!["{\"name\":\"a\",\"content\":\"\"}"; 1_000_000].join(",")
    );
    http(&addr, "POST", "/v1/executions", &[], files.as_bytes()).error(422, "too_many_files");
    eprintln!("two 32 MiB-class bodies refused in {:?}", t.elapsed());
    for bad in [
        json!(["python", []]),
        json!("python"),
        json!({"runtime": "python", "files": [["main.py", "print(1)"]]}),
        json!({"runtime": "python", "files": [file("a.py")], "run_limits": [1000]}),
        json!({"runtime": "python", "files": [file("a.py")], "run_limits": {"wall_time_ms": 1.5}}),
        json!({"runtime": "python", "files": [file("a.py")], "run_limits": {"wall_time_ms": -1}}),
    ] {
        server.execute(&bad).error(400, "malformed_request");
    }

    // The document's limits are the server's: minimum 1 (1 MiB for memory: less is a unit
    // mistake), maximum from the runtimes endpoint, enforced.
    let doc = server.get("/v1/openapi.json").json();
    let maximum = server.get("/v1/runtimes").json()["maximum_limits"].clone();
    let props = &doc["components"]["schemas"]["LimitsBody"]["properties"];
    for field in ["wall_time_ms", "cpu_time_ms", "memory_bytes", "processes", "output_bytes", "file_size_bytes"] {
        let min: u64 = if field == "memory_bytes" { 1 << 20 } else { 1 };
        assert_eq!(props[field]["minimum"], min, "{field}");
        assert_eq!(props[field]["maximum"], maximum[field], "{field}");
        let max = maximum[field].as_u64().unwrap();
        for v in [json!(0), json!(min - 1), json!(max + 1)] {
            let body = json!({"runtime": "cobol", "files": [file("a.py")], "run_limits": {field: v}});
            // Ranges are checked after the runtime: an unknown runtime shows the value parsed.
            server.execute(&body).error(422, "unknown_runtime");
            let body = json!({"runtime": "python", "files": [file("a.py")], "run_limits": {field: v}});
            assert_eq!(server.execute(&body).error(422, "limit_out_of_range")["field"], "run_limits");
        }
    }
    let body =
        json!({"runtime": "cobol", "files": [file("a.py")], "run_limits": {"wall_time_ms": 64.0, "cpu_time_ms": 1e3}});
    server.execute(&body).error(422, "unknown_runtime");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["ExecutionBody"]["properties"]["files"]["maxItems"], 64);
    assert_eq!(schemas["FileBody"]["properties"]["name"]["maxLength"], 255);
    assert!(schemas["StreamEvent"]["oneOf"].is_array());
    for status in ["408", "415", "421"] {
        assert!(doc["paths"]["/v1/executions"]["post"]["responses"][status].is_object(), "{status}");
    }

    assert_eq!(metric(&server, "tvm_vm_boot_seconds_count"), 0.0, "no VM booted for any of these");
    assert!(vmm_processes(env.runtime_dir.path()).is_empty());
    server.stop();
    env.assert_clean();
}

/// Kind 4. Attack: entry files named like interpreter or compiler options.
/// Defence: every `{entry}`/`{sources}` path starting with `-` is passed as
/// `./NAME`, so each runtime runs the file (real VMs).
#[test]
fn option_like_entry_files_run_as_files() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let cases = [
        ("python", "-V", "print('ran -V')", "ran -V"),
        ("python", "--help", "print('ran --help')", "ran --help"),
        ("node", "--version", "console.log('ran --version')", "ran --version"),
        ("ruby", "-v", "puts 'ran -v'", "ran -v"),
        ("c", "-c.c", "#include <stdio.h>\nint main(void){puts(\"ran -c.c\");return 0;}", "ran -c.c"),
    ];
    for (rt, name, src, want) in cases {
        let r = server.execute(&json!({"runtime": rt, "files": [{"name": name, "content": src}]}));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["verdict"], "ok", "{rt} {name}: {v}");
        assert_eq!(v["run"]["stdout"].as_str().unwrap().trim(), want, "{rt} {name}: {v}");
    }
    server.stop();
    env.assert_clean();
}

/// Kind 7. Attack: requests hyper cannot parse. Defence: answered in the
/// API's error shape with an x-request-id; the server keeps serving.
#[test]
fn malformed_http_is_answered_in_the_error_shape() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);
    let addr = server.addr.clone();
    let wait = Duration::from_secs(10);
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let big_header = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n", "b".repeat(600_000));
    let many_headers = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n{}\r\n", "X-A: 1\r\n".repeat(200));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "bad_http_request"),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), 400, "bad_http_request"),
        (
            format!("POST /v1/executions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{{}}")
                .into_bytes(),
            400,
            "bad_http_request",
        ),
        (format!("GET / HTTP/1.1\r\nHost: {addr}\r\nBad Header: x\r\n\r\n").into_bytes(), 400, "bad_http_request"),
        (long_uri.into_bytes(), 414, "uri_too_long"),
        (big_header.into_bytes(), 431, "headers_too_large"),
        (many_headers.into_bytes(), 431, "headers_too_large"),
    ];
    for (req, status, code) in cases {
        let out = raw(&addr, &req, wait);
        let r = parse_raw(&out);
        let e = r.error(status, code);
        assert!(!e["message"].as_str().unwrap().is_empty());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(server.get("/healthz").status, 200);
    }
    assert!(metric(&server, "tvm_http_requests_total{route=\"malformed\",status=\"400\"}") >= 4.0);
    server.stop();
    env.assert_clean();
}

/// Kind 8. Refusals are counted once each, where they happen, and never as
/// pool misses; a miss is a request that really booted a VM (real VMs).
#[test]
fn refusals_and_pool_misses_are_counted_once() {
    let env = Env::new();
    let server = Arc::new(Server::start(
        &env,
        &["--max-vms", "1", "--queue", "1", "--queue-timeout", "1500ms", "--memory-budget", "900M"],
    ));
    let sleeper = |secs: u32| {
        json!({"runtime": "python", "files": [{"name": "main.py", "content": format!("import time\nprint('up', flush=True)\ntime.sleep({secs})")}],
               "run_limits": {"wall_time_ms": 30000}})
    };
    // More guest RAM than the whole budget: refused at once.
    let big = json!({"runtime": "python", "files": [{"name": "main.py", "content": ""}], "run_limits": {"memory_bytes": 1u64 << 30}});
    server.execute(&big).error(422, "exceeds_capacity");

    // One long run holds the only VM.
    let s = server.clone();
    let long = std::thread::spawn(move || s.execute(&sleeper(12)));
    wait_until("the long run holds the VM", STARTUP, || metric(&server, "tvm_vms") >= 1.0);
    // The next waits in the queue and times out; one more while it waits finds the queue full.
    let s = server.clone();
    let waiting = std::thread::spawn(move || s.execute(&sleeper(0)));
    wait_until("a request queued", Duration::from_secs(10), || metric(&server, "tvm_queue_depth") >= 1.0);
    server.execute(&sleeper(0)).error(429, "queue_full");
    waiting.join().unwrap().error(429, "queue_timeout");
    let r = long.join().unwrap();
    assert_eq!(r.json()["verdict"], "ok", "{}", r.text());

    let rt = "runtime=\"python-3.13\"";
    assert_eq!(metric(&server, &format!("tvm_pool_misses_total{{{rt}}}")), 1.0, "only the run that booted");
    assert_eq!(metric(&server, &format!("tvm_pool_hits_total{{{rt}}}")), 0.0);
    for reason in ["queue_full", "queue_timeout", "exceeds_capacity"] {
        assert_eq!(metric(&server, &format!("tvm_rejections_total{{reason=\"{reason}\"}}")), 1.0, "{reason}");
    }
    assert_eq!(metric(&server, "tvm_vm_boot_seconds_count"), 1.0);
    assert_eq!(metric(&server, "tvm_http_requests_total{route=\"/v1/executions\",status=\"429\"}"), 2.0);
    Arc::into_inner(server).unwrap().stop();
    env.assert_clean();
}
