//! Interactive sessions over WebSocket against a real `tvm serve` and real
//! VMs: TVM's `/v1/sessions` and Piston's `/api/v2/connect`. Six boots in
//! all (echo + EOF + signal, a bad message, a disconnect, a session queued
//! behind another, Piston's echo);
//! every refusal before a VM is checked without one.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use common::Env;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Generous: a boot under TCG on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn open(addr: &str, path: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON message, or `{"close": code, "reason": ...}` when the
/// server closed (`{"close": null}` when the stream just ended).
async fn next(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("no message from the server in time");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Close(frame))) => {
                return match frame {
                    Some(f) => json!({"close": u16::from(f.code), "reason": f.reason.as_str()}),
                    None => json!({"close": null}),
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return json!({"close": null}),
        }
    }
}

/// Messages up to and including the first that satisfies `until`; stdout
/// text is collected on the way.
async fn collect(ws: &mut Ws, mut until: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = next(ws).await;
        let done = until(&v);
        let closed = v.get("close").is_some();
        seen.push(v);
        if done {
            return seen;
        }
        assert!(!closed, "the server closed early: {seen:?}");
    }
}

/// Messages up to the one after which the output seen so far (every
/// message's `data`, both streams) contains `needle`: programs' writes
/// arrive in chunks of any size, so no single message need hold it.
async fn collect_text(ws: &mut Ws, needle: &str) -> Vec<Value> {
    let mut text = String::new();
    collect(ws, |v| {
        text.push_str(v["data"].as_str().unwrap_or(""));
        text.contains(needle)
    })
    .await
}

fn stdout_text(msgs: &[Value], kind: &str) -> String {
    msgs.iter().filter(|m| m["type"] == kind && m["stream"] != "stderr").filter_map(|m| m["data"].as_str()).collect()
}

/// Waits (boundedly) until no VMM process and no run dir of this server is
/// left, once no template builds in the background (a session whose
/// template was missing cold booted while the server built it in a VM of its own).
fn assert_nothing_left(env: &Env, server: &Server) {
    server.wait_templates_idle();
    let t = Instant::now();
    loop {
        let dirs = std::fs::read_dir(env.runtime_dir.path()).map(|d| d.count()).unwrap_or(0);
        if dirs == 0 && common::vmm_processes(env.runtime_dir.path()).is_empty() {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the session's VM outlived it: {dirs} run dirs");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ECHO: &str = r#"import signal, sys
signal.signal(signal.SIGTERM, lambda *a: (print("terminated", flush=True), sys.exit(3)))
print("ready", flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    print("echo:", line.strip(), flush=True)
print("eof", flush=True)
while True:
    signal.pause()
"#;

const SLEEPER: &str = "import time\nprint('up', flush=True)\ntime.sleep(60)\n";

fn start(src: &str) -> Value {
    json!({"type": "start", "runtime": "python", "files": [{"name": "main.py", "content": src}],
           "run_limits": {"wall_time_ms": 30000, "cpu_time_ms": 20000}})
}

#[test]
fn native_sessions_stream_stdin_eof_signals_and_end_their_vms() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);
    let addr = server.addr.clone();
    let t0 = Instant::now();
    runtime().block_on(async {
        // Refusals before any VM: not JSON, not a start, an invalid start, an unknown runtime.
        for (first, code) in [
            (Message::Text("hello".into()), 4400u16),
            (Message::Text(json!({"type": "stdin", "data": "x"}).to_string().into()), 4400),
            (Message::Text(json!({"type": "start", "files": "nope"}).to_string().into()), 4422),
            (
                Message::Text(
                    json!({"type": "start", "runtime": "cobol-1", "files": [{"name": "a", "content": ""}]})
                        .to_string()
                        .into(),
                ),
                4422,
            ),
        ] {
            let mut ws = open(&addr, "/v1/sessions").await;
            ws.send(first.clone()).await.unwrap();
            let err = next(&mut ws).await;
            assert_eq!(err["type"], "error", "{first:?}: {err}");
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
            let close = next(&mut ws).await;
            assert_eq!(close["close"], code, "{first:?}: {close}");
        }
        // A plain HTTP GET is not a session: 426 in the API's error shape, saying how to upgrade.
        let r = server.get("/v1/sessions");
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (426, json!("upgrade_required")), "{}", r.text());
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("WebSocket"), "{}", r.text());
        assert_eq!(r.header("upgrade"), Some("websocket"));

        // Echo, EOF, then a signal the program handles.
        let mut ws = open(&addr, "/v1/sessions").await;
        send(&mut ws, start(ECHO)).await;
        let started = next(&mut ws).await;
        assert_eq!(
            (started["type"].clone(), started["runtime"].as_str().is_some()),
            (json!("started"), true),
            "{started}"
        );
        let m = collect_text(&mut ws, "ready\n").await;
        assert!(m.iter().any(|v| v["type"] == "stage" && v["stage"] == "run"), "{m:?}");
        send(&mut ws, json!({"type": "stdin", "data": "hello\n"})).await;
        // Binary messages are raw stdin too.
        ws.send(Message::Binary(b"world\n".to_vec().into())).await.unwrap();
        let m = collect_text(&mut ws, "echo: world").await;
        assert!(stdout_text(&m, "stdout").contains("echo: hello\necho: world"), "{m:?}");
        send(&mut ws, json!({"type": "eof"})).await;
        let m = collect_text(&mut ws, "eof").await;
        assert!(m.last().unwrap()["type"] == "stdout", "{m:?}");
        send(&mut ws, json!({"type": "signal", "signal": "SIGTERM"})).await;
        let m = collect(&mut ws, |v| v["type"] == "result").await;
        assert!(stdout_text(&m, "stdout").contains("terminated"), "{m:?}");
        let exit = m.iter().find(|v| v["type"] == "exit" && v["stage"] == "run").unwrap_or_else(|| panic!("{m:?}"));
        assert_eq!((exit["exit_code"].clone(), exit["status"].clone()), (json!(3), json!("failed")), "{exit}");
        let result = m.last().unwrap();
        assert_eq!(result["verdict"], "runtime_error", "{result}");
        assert!(result["run"]["stdout"].as_str().unwrap().contains("echo: hello"), "{result}");
        let close = next(&mut ws).await;
        assert_eq!((close["close"].clone(), close["reason"].clone()), (json!(1000), json!("runtime_error")));
        assert_nothing_left(&env, &server);

        // A bad message mid-session ends it (and its VM) with 4400.
        let mut ws = open(&addr, "/v1/sessions").await;
        send(&mut ws, start(SLEEPER)).await;
        collect_text(&mut ws, "up").await;
        send(&mut ws, json!({"type": "signal", "signal": "SIGNOPE"})).await;
        let m = collect(&mut ws, |v| v["type"] == "error").await;
        let err = m.last().unwrap();
        assert_eq!((err["type"].clone(), err["code"].clone()), (json!("error"), json!("bad_message")), "{err}");
        assert_eq!(next(&mut ws).await["close"], 4400);
        assert_nothing_left(&env, &server);

        // A client that just goes away ends the VM.
        let mut ws = open(&addr, "/v1/sessions").await;
        send(&mut ws, start(SLEEPER)).await;
        collect_text(&mut ws, "up").await;
        assert!(!common::vmm_processes(env.runtime_dir.path()).is_empty());
        drop(ws);
        assert_nothing_left(&env, &server);
    });
    eprintln!("native sessions: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(server.get("/healthz").status == 200, "the server keeps serving");
}

#[test]
fn a_queued_session_answers_pings_and_keeps_early_stdin() {
    // One VM at most: a second session waits for the first one's VM. Standard
    // clients ping while they wait and give up when no pong comes back.
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images", "--max-vms", "1", "--pool-size", "0"]);
    let addr = server.addr.clone();
    runtime().block_on(async {
        let mut first = open(&addr, "/v1/sessions").await;
        send(&mut first, start(SLEEPER)).await;
        collect_text(&mut first, "up").await;

        let mut queued = open(&addr, "/v1/sessions").await;
        send(&mut queued, start(ECHO)).await;
        // Stdin sent before the VM exists is kept for it, in order.
        send(&mut queued, json!({"type": "stdin", "data": "early\n"})).await;
        for round in 0..3u8 {
            queued.send(Message::Ping(vec![round].into())).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), queued.next()).await;
            match reply {
                Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(p.as_ref(), [round]),
                other => panic!("a queued session must answer pings, got {other:?}"),
            }
        }
        drop(first);
        let started = next(&mut queued).await;
        assert_eq!(started["type"], "started", "{started}");
        let m = collect_text(&mut queued, "echo: early\n").await;
        assert!(stdout_text(&m, "stdout").starts_with("ready\necho: early"), "{m:?}");
        send(&mut queued, json!({"type": "eof"})).await;
        collect_text(&mut queued, "eof\n").await;
        drop(queued);
        assert_nothing_left(&env, &server);
    });
    assert!(server.get("/healthz").status == 200, "the server keeps serving");
}

#[test]
fn piston_connect_speaks_pistons_protocol() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);
    let addr = server.addr.clone();
    let t0 = Instant::now();
    // A plain HTTP GET: Piston's error shape, 426.
    for path in ["/api/v2/connect", "/api/v2/connect/"] {
        let r = server.get(path);
        assert_eq!(r.status, 426, "{}", r.text());
        assert!(r.json()["message"].as_str().unwrap().contains("WebSocket"), "{}", r.text());
        assert_eq!(r.header("upgrade"), Some("websocket"));
    }
    runtime().block_on(async {
        // No init within a second: 4001.
        let mut ws = open(&addr, "/api/v2/connect").await;
        let c = next(&mut ws).await;
        assert_eq!((c["close"].clone(), c["reason"].clone()), (json!(4001), json!("Initialization Timeout")));
        // data or signal before init: 4003.
        for early in [json!({"type": "data", "stream": "stdin", "data": "x"}), json!({"type": "signal", "signal": "SIGKILL"})] {
            let mut ws = open(&addr, "/api/v2/connect/").await;
            send(&mut ws, early).await;
            assert_eq!(next(&mut ws).await, json!({"close": 4003, "reason": "Not yet initialized"}));
        }
        // Not JSON, or a job Piston would refuse: an error message, then 4002.
        for (first, message) in [
            (Message::Text("{".into()), "JSON"),
            (Message::Text(json!({"type": "init", "language": "cobol", "version": "*", "files": [{"content": ""}]}).to_string().into()), "cobol-* runtime is unknown"),
        ] {
            let mut ws = open(&addr, "/api/v2/connect").await;
            ws.send(first).await.unwrap();
            let err = next(&mut ws).await;
            assert_eq!(err["type"], "error", "{err}");
            assert!(err["message"].as_str().unwrap().contains(message), "{err}");
            assert_eq!(next(&mut ws).await, json!({"close": 4002, "reason": "Notified Error"}));
        }

        // A job: runtime, stage, stdin in, EOF (TVM's addition), output, exit, 4999.
        let mut ws = open(&addr, "/api/v2/connect").await;
        let src = "import sys\nprint('hello', sys.stdin.readline().strip(), flush=True)\nprint('rest', len(sys.stdin.read()))\n";
        // As upstream, init's stdin is not written in this mode.
        let init = json!({"type": "init", "language": "python", "version": "3.13", "stdin": "ignored\n", "files": [{"content": src}]});
        send(&mut ws, init).await;
        let rt = next(&mut ws).await;
        assert_eq!((rt["type"].clone(), rt["language"].clone()), (json!("runtime"), json!("python")), "{rt}");
        assert!(rt["version"].as_str().unwrap().starts_with("3.13."), "{rt}");
        let early = collect(&mut ws, |v| v["type"] == "stage").await;
        assert_eq!(early.last().unwrap(), &json!({"type": "stage", "stage": "run"}), "{early:?}\n{}", server.log());
        send(&mut ws, json!({"type": "data", "stream": "stdin", "data": "world\n"})).await;
        let m = collect_text(&mut ws, "world").await;
        assert!(m.last().unwrap().get("close").is_none(), "{m:?}\n{}", server.log());
        send(&mut ws, json!({"type": "data", "stream": "stdin", "data": "abc"})).await;
        send(&mut ws, json!({"type": "eof"})).await;
        let m = collect(&mut ws, |v| v.get("close").is_some()).await;
        let data: String = m.iter().filter(|v| v["type"] == "data").filter_map(|v| v["data"].as_str()).collect();
        assert!(data.contains("rest 3"), "{m:?}");
        assert!(m.iter().any(|v| *v == json!({"type": "exit", "stage": "run", "code": 0, "signal": null})), "{m:?}");
        assert_eq!(m.last().unwrap(), &json!({"close": 4999, "reason": "Job Completed"}));
        assert_nothing_left(&env, &server);
    });
    eprintln!("piston connect: {:.1} s", t0.elapsed().as_secs_f64());
}
