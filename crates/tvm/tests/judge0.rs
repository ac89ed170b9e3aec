//! Judge0 CE compatibility against a real `tvm serve` with real VMs: every
//! route, Judge0's error shapes (422 by attribute, 400 for fields and
//! batches, 401 with X-Auth-Token), statuses from real programs (accepted,
//! wrong answer, TLE, compilation error, SIGSEGV, SIGFPE, SIGABRT, NZEC,
//! memory limit), compiler options and arguments, redirected stderr,
//! `number_of_runs`, `additional_files` (and its zip defences), callbacks
//! (and their SSRF defence), async tokens and batches, and token resolution
//! across two nodes.
//!
//! Seven VM boots in all: the statuses from one Python program come from one
//! batch whose submissions share a build, so they (and their runs) are the
//! tests of one execution, which is itself under test (compile once, run many).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::server::{http, wait_until, Resp, Server};
use common::Env;
use serde_json::{json, Value};

fn zip_of(entries: &[(&str, &[u8])]) -> String {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.start_file(*name, SimpleFileOptions::default()).unwrap();
        w.write_all(data).unwrap();
    }
    B64.encode(w.finish().unwrap().into_inner())
}

fn submit(server: &Server, query: &str, body: &Value) -> Resp {
    server.post(&format!("/submissions?{query}"), &[], body)
}

/// `wait=true`, all fields; asserts 201.
fn run(server: &Server, body: Value) -> Value {
    let r = submit(server, "wait=true&fields=*", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn status(v: &Value) -> u64 {
    v["status"]["id"].as_u64().unwrap_or_else(|| panic!("no status: {v}"))
}

fn poll(server: &Server, token: &str) -> Value {
    let mut last = Value::Null;
    wait_until("submission finished", Duration::from_secs(300), || {
        last = server.get(&format!("/submissions/{token}?fields=*")).json();
        last["status"]["id"].as_u64().is_some_and(|s| s > 2)
    });
    last
}

const PY: u64 = 109; // Judge0's id for Python 3.13
const C: u64 = 103; // C (GCC 14)
const CPP: u64 = 105; // C++ (GCC 14), the same image as C

#[test]
fn judge0_routes_statuses_and_options() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);

    // Informational routes.
    let langs = server.get("/languages").json();
    let langs = langs.as_array().unwrap();
    assert!(
        langs.iter().any(|l| l["id"] == 92 && l["name"].as_str().unwrap().starts_with("Python (3.11.")),
        "{langs:?}"
    );
    assert!(langs.iter().any(|l| l["id"] == PY));
    assert!(!langs.iter().any(|l| l["id"] == 71), "Python 3.8.1 cannot run here, so it is not listed");
    let l = server.get("/languages/103").json();
    assert_eq!((l["source_file"].clone(), l["is_archived"].clone()), (json!("main.c"), json!(false)), "{l}");
    assert!(l["compile_cmd"].as_str().unwrap().contains("main.c"));
    assert_eq!(server.get("/languages/71").status, 404);
    let st = server.get("/statuses").json();
    assert_eq!(st.as_array().unwrap().len(), 14);
    assert_eq!(st[6], json!({"id": 7, "description": "Runtime Error (SIGSEGV)"}));
    assert_eq!(server.get("/about").json()["version"], "1.14.0");
    assert_eq!(server.get("/version").text(), "1.14.0");
    let c = server.get("/config_info").json();
    for k in
        ["max_cpu_time_limit", "max_memory_limit", "max_submission_batch_size", "enable_callbacks", "wall_time_limit"]
    {
        assert!(!c[k].is_null(), "config_info lacks {k}: {c}");
    }
    assert_eq!(c["enable_callbacks"], false);
    assert!(server.get("/system_info").json()["CPU(s)"].is_string());
    let w = server.get("/workers").json();
    assert!(w[0]["available"].as_u64().unwrap() >= 1, "{w}");

    // Errors in Judge0's shapes.
    let r = submit(&server, "wait=true", &json!({"language_id": 71, "cpu_time_limit": 1000, "memory_limit": "x"}));
    assert_eq!(r.status, 422, "{}", r.text());
    let e = r.json();
    assert_eq!(e["source_code"], json!(["can't be blank"]));
    assert_eq!(e["language_id"], json!(["language with id 71 doesn't exist"]));
    assert_eq!(e["cpu_time_limit"], json!(["must be less than or equal to 120.0"]));
    assert_eq!(e["memory_limit"], json!(["is not a number"]));
    let r = submit(
        &server,
        "",
        &json!({"source_code": "x", "language_id": PY, "enable_network": true, "callback_url": "http://example.com/"}),
    );
    assert_eq!(r.json()["enable_network"], json!(["this option cannot be enabled"]));
    assert_eq!(r.json()["callback_url"], json!(["callbacks are disabled on this server"]));
    let r = server.get("/submissions/00000000-0000-4000-8000-000000000000?fields=stdout,nope");
    assert_eq!((r.status, r.json()["error"].clone()), (400, json!("invalid fields: [nope]")));
    assert_eq!(server.get("/submissions/00000000-0000-4000-8000-000000000000").status, 404);
    let r = server.post("/submissions/batch", &[], &json!({"submissions": []}));
    assert_eq!(r.json()["error"], "there should be at least one submission in a batch");
    let many: Vec<Value> = (0..21).map(|_| json!({"source_code": "x", "language_id": PY})).collect();
    let r = server.post("/submissions/batch", &[], &json!({ "submissions": many }));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("number of submissions in a batch should be less than or equal to 20"))
    );
    // Zip defences: traversal and a bomb are refused before anything runs.
    for zip in [zip_of(&[("../evil.py", b"x")]), zip_of(&[("big", &vec![0u8; 17 << 20])])] {
        let r = submit(&server, "", &json!({"source_code": "x", "language_id": PY, "additional_files": zip}));
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(r.json()["additional_files"][0].is_string());
    }

    // One batch, three builds: a Python program with one behaviour per stdin
    // (every submission of it shares its limits and zip, so all of them,
    // with their runs, are the tests of ONE execution: one VM), a C++ one and
    // a C one. Base64 both ways.
    let py = r#"import os, signal, sys
cmd, _, rest = sys.stdin.read().partition("\n")
if cmd == "rev": print(rest.strip()[::-1])
elif cmd == "zip": print(open("data/in.txt").read().strip())
elif cmd == "args": print("|".join(sys.argv[1:]))
elif cmd == "nzec": print("e", file=sys.stderr); sys.exit(4)
elif cmd == "segv": os.kill(os.getpid(), signal.SIGSEGV)
elif cmd == "abrt": os.abort()
elif cmd == "tle":
    while True: pass
elif cmd == "mem": x = "a" * (400 << 20)
"#;
    let zip = zip_of(&[("data/in.txt", b"from the zip\n")]);
    let py_item = |stdin: &str, extra: Value| {
        let mut v = json!({
            "source_code": B64.encode(py), "language_id": PY, "stdin": B64.encode(stdin), "additional_files": zip,
            "cpu_time_limit": 5, "cpu_extra_time": 0.5, "wall_time_limit": 15, "memory_limit": 65536,
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    // `c / z`, not `1 / z`: GCC folds `1 / X` into `X >= -1 && X <= 1 ? X : 0` (no division, no
    // trap), so `1 / 0` exits 0 there; a numerator unknown at compile time keeps the `idiv`.
    let fpe = "int main(int c, char**v){volatile int z = c - 1; return c / z;}";
    // The limits are generous for TCG on a busy host: filling 64 MiB until the OOM kill took 2.6 s of CPU there.
    let items = vec![
        py_item("rev\nabc", json!({"expected_output": B64.encode("cba  \n\n")})),
        py_item("zip", json!({"number_of_runs": 3})),
        py_item("rev\nx", json!({"expected_output": B64.encode("y")})),
        py_item("args", json!({"command_line_arguments": "'a b' \"c;rm -rf /\""})),
        py_item("nzec", json!({})),
        py_item("segv", json!({})),
        py_item("abrt", json!({})),
        py_item("tle", json!({})),
        py_item("mem", json!({})),
        json!({"source_code": B64.encode("print(2)"), "language_id": 71}),
        // C++ through the same wrapper as C: the signal reaches Judge0's status (SIGSEGV 7).
        json!({"source_code": B64.encode("#include <csignal>\nint main(){std::raise(SIGSEGV);}"), "language_id": CPP}),
        json!({"source_code": B64.encode(fpe), "language_id": C}),
    ];
    let py_runs = |s: &Server| {
        let m = |k: &str| s.metric(&format!("{k}{{runtime=\"python-3.13\"}}")).unwrap_or(0.0);
        m("tvm_pool_misses_total") + m("tvm_pool_hits_total")
    };
    let py_before = py_runs(&server);
    let r = server.post("/submissions/batch?base64_encoded=true", &[], &json!({ "submissions": items }));
    assert_eq!(r.status, 201, "{}", r.text());
    let out = r.json();
    assert_eq!(out[9]["language_id"], json!(["language with id 71 doesn't exist"]));
    let tokens: Vec<String> =
        (0..items.len()).filter(|&i| i != 9).map(|i| out[i]["token"].as_str().unwrap().to_string()).collect();
    let mut all = Value::Null;
    wait_until("batch finished", Duration::from_secs(600), || {
        all = server.get(&format!("/submissions/batch?tokens={}&fields=*", tokens.join(","))).json();
        all["submissions"].as_array().unwrap().iter().all(|v| v["status"]["id"].as_u64().is_some_and(|s| s > 2))
    });
    let v: Vec<&Value> = all["submissions"].as_array().unwrap().iter().collect();
    // Accepted (trailing whitespace ignored); default fields; base64 on request only.
    assert_eq!(status(v[0]), 3, "trailing whitespace is ignored: {}", v[0]);
    assert_eq!(v[0]["stdout"], "cba\n");
    assert_eq!(v[0]["stdin"], "rev\nabc", "plain text without base64_encoded");
    assert!(v[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v[0]["language"]["id"], PY);
    assert!(v[0]["time"].as_str().unwrap().parse::<f64>().is_ok(), "seconds as a decimal string: {}", v[0]);
    assert!(v[0]["memory"].as_u64().unwrap() > 0, "KB: {}", v[0]);
    let d = server.get(&format!("/submissions/{}?base64_encoded=true", tokens[0])).json();
    assert_eq!(d.as_object().unwrap().len(), 8, "the default fields: {d}");
    assert_eq!(B64.decode(d["stdout"].as_str().unwrap()).unwrap(), b"cba\n");
    // Additional files, three runs (times and memory are their means, as Judge0 reports).
    assert_eq!(
        (status(v[1]), v[1]["stdout"].clone(), v[1]["number_of_runs"].clone()),
        (3, json!("from the zip\n"), json!(3)),
        "{}",
        v[1]
    );
    // Wrong answer; per-submission arguments (shell-word split, never a shell) inside the shared execution.
    assert_eq!(status(v[2]), 4, "{}", v[2]);
    assert_eq!((status(v[3]), v[3]["stdout"].clone()), (3, json!("a b|c;rm -rf /\n")), "{}", v[3]);
    // NZEC; signals; TLE; memory.
    assert_eq!(
        (status(v[4]), v[4]["exit_code"].clone(), v[4]["stderr"].clone()),
        (11, json!(4), json!("e\n")),
        "{}",
        v[4]
    );
    assert_eq!(v[4]["message"], "Exited with error status 4");
    assert_eq!((status(v[5]), v[5]["exit_signal"].clone()), (7, json!(11)), "{}", v[5]);
    assert_eq!((status(v[6]), v[6]["exit_signal"].clone()), (10, json!(6)), "{}", v[6]);
    assert_eq!(status(v[7]), 5, "{}", v[7]);
    assert_eq!((status(v[8]), v[8]["message"].clone()), (12, json!("Memory limit exceeded")), "{}", v[8]);
    assert_eq!(py_runs(&server) - py_before, 1.0, "nine Python submissions (eleven runs), one execution");
    // C++ SIGSEGV (7) and C SIGFPE (9).
    assert_eq!((status(v[9]), v[9]["exit_signal"].clone()), (7, json!(11)), "{}", v[9]);
    assert_eq!((status(v[10]), v[10]["exit_signal"].clone()), (9, json!(8)), "{}", v[10]);
    // A token id unknown to the batch lookup is null.
    let b = server
        .get(&format!(
            "/submissions/batch?tokens={},00000000-0000-4000-8000-000000000000&fields=stdout,status",
            tokens[0]
        ))
        .json();
    assert_eq!(b["submissions"][0], json!({"stdout": "cba\n", "status": {"id": 3, "description": "Accepted"}}));
    assert_eq!(b["submissions"][1], Value::Null);

    // Async single submission: a token now, the result later. A compile error
    // over two runs (one execution, compiled once) stays a compile error.
    let r = submit(&server, "", &json!({"source_code": "int main( {", "language_id": C, "number_of_runs": 2}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json().as_object().unwrap().len(), 1, "only the token");
    let v = poll(&server, r.json()["token"].as_str().unwrap());
    assert_eq!(status(&v), 6, "{v}");
    assert!(v["compile_output"].as_str().unwrap().contains("error"), "{v}");
    assert_eq!(v["time"], Value::Null, "{v}");

    // wait=true: compiler options, shell-split arguments, redirected stderr (in write order).
    let src = "#include <stdio.h>\nint main(int c, char**v){fprintf(stderr, \"E\\n\"); fflush(stderr); printf(\"%d %s|%s\\n\", VALUE, v[1], v[2]); return 0;}";
    let v = run(
        &server,
        json!({
            "source_code": src, "language_id": C, "compiler_options": "-DVALUE=42 -Wall",
            "command_line_arguments": "'a b' \"c;rm -rf /\"", "redirect_stderr_to_stdout": true,
        }),
    );
    assert_eq!(status(&v), 3, "{v}");
    assert_eq!(v["stdout"], "E\n42 a b|c;rm -rf /\n", "options reach the compiler, words are not a shell: {v}");
    assert_eq!(v["stderr"], Value::Null);
    let r = submit(
        &server,
        "",
        &json!({"source_code": "package main\nfunc main(){}", "language_id": 106, "compiler_options": "-x"}),
    );
    assert_eq!(r.status, 422, "Go's build script takes no compiler options: {}", r.text());

    server.stop();
    env.assert_clean();
}

/// Accepts one connection and returns the request line and body.
fn accept_one(listener: TcpListener) -> std::thread::JoinHandle<(String, Vec<u8>)> {
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut s = s;
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        (line, body)
    })
}

#[test]
fn judge0_callbacks_auth_and_two_nodes() {
    let env = Env::new();
    let a = Server::start(&env, &["--no-build-images", "--judge0-node", "a", "--judge0-callbacks", "--api-key", "k"]);
    let auth = [("X-Auth-Token", "k")];
    assert_eq!(a.get("/languages").status, 401, "keys configured: X-Auth-Token required");
    assert_eq!(http(&a.addr, "GET", "/languages", &auth, b"").status, 200);

    // SSRF: a callback to loopback is refused when private targets are not allowed.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cb", listener.local_addr().unwrap());
    let r = a.post(
        "/submissions?wait=true",
        &auth,
        &json!({"source_code": "print('on a')", "language_id": PY, "callback_url": url}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let token_a = r.json()["token"].as_str().unwrap().to_string();
    wait_until("callback refusal logged", Duration::from_secs(30), || a.log().contains("callback refused"));
    assert!(a.log().contains("not a public address"), "{}", a.log());

    // Two nodes: b forwards lookups of a's tokens to a.
    let env_b = Env::new();
    let b = Server::start(
        &env_b,
        &[
            "--no-build-images",
            "--judge0-node",
            "b",
            "--judge0-peer",
            &format!("a=http://{}", a.addr),
            "--api-key",
            "k",
            "--judge0-callbacks",
            "--judge0-callbacks-allow-private",
        ],
    );
    let via_b = http(&b.addr, "GET", &format!("/submissions/{token_a}?fields=stdout,token"), &auth, b"");
    assert_eq!(via_b.status, 200, "{}", via_b.text());
    assert_eq!(via_b.json(), json!({"stdout": "on a\n", "token": token_a}));

    // A callback from b (private targets allowed there) arrives as a PUT with the result.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cb", listener.local_addr().unwrap());
    let got = accept_one(listener);
    let r =
        b.post("/submissions", &auth, &json!({"source_code": "print('on b')", "language_id": PY, "callback_url": url}));
    let token_b = r.json()["token"].as_str().unwrap().to_string();
    let (line, body) = got.join().unwrap();
    assert!(line.starts_with("PUT /cb "), "{line}");
    let cb: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(cb["token"], token_b.as_str());
    assert_eq!(B64.decode(cb["stdout"].as_str().unwrap()).unwrap(), b"on b\n");

    // A batch on b mixing both nodes' tokens; a never forwards a token back (it has no peers).
    let batch =
        http(&b.addr, "GET", &format!("/submissions/batch?tokens={token_a},{token_b}&fields=stdout"), &auth, b"")
            .json();
    assert_eq!(batch["submissions"], json!([{"stdout": "on a\n"}, {"stdout": "on b\n"}]));
    assert_eq!(http(&a.addr, "GET", &format!("/submissions/{token_b}"), &auth, b"").status, 404);

    b.stop();
    a.stop();
    env.assert_clean();
    env_b.assert_clean();
}
