//! Piston v2 compatibility against a real `tvm serve` with real VMs: routes
//! (with trailing slashes), Piston's validation messages and statuses, the
//! content-type rule, auth, semver resolution, and the result shape of each
//! stage kind (ok, RE, SG, TO, compile failure).

mod common;

use std::io::Write;

use common::server::{connect, http, read_response, Resp, Server};
use common::Env;
use serde_json::{json, Value};

/// A POST with the given content type (the shared helper always says JSON).
fn post_typed(addr: &str, path: &str, content_type: &str, body: &[u8], extra: &[(&str, &str)]) -> Resp {
    let mut s = connect(addr);
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_response(s)
}

fn execute(server: &Server, body: &Value) -> Value {
    let r = server.post("/api/v2/execute", &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn message(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    r.json()["message"].as_str().unwrap_or_else(|| panic!("no message: {}", r.text())).to_string()
}

fn is_semver(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn piston_routes_errors_and_results() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);

    // Runtimes, with and without the trailing slash: Piston's names and full versions.
    let list = server.get("/api/v2/runtimes").json();
    assert_eq!(server.get("/api/v2/runtimes/").json(), list);
    let list = list.as_array().unwrap().clone();
    assert!(!list.is_empty());
    for rt in &list {
        assert!(is_semver(&rt["version"]), "{rt}");
        assert!(rt["aliases"].is_array(), "{rt}");
    }
    let lang = |name: &str| list.iter().filter(|r| r["language"] == name).cloned().collect::<Vec<_>>();
    for name in ["python", "javascript", "c", "c++", "java", "go", "rust", "ruby"] {
        assert!(!lang(name).is_empty(), "no {name} in {list:?}");
    }
    assert!(lang("javascript").iter().all(|r| r["runtime"] == "node"));
    assert!(lang("c++")
        .iter()
        .all(|r| r["runtime"] == "gcc" && r["aliases"].as_array().unwrap().contains(&json!("cpp"))));
    assert!(lang("python").iter().all(|r| r.get("runtime").is_none()), "no runtime key for single-language packages");
    let newest_python = lang("python").iter().map(|r| r["version"].as_str().unwrap().to_string()).max_by(|a, b| {
        let key = |s: &str| s.split('.').map(|p| p.parse::<u64>().unwrap()).collect::<Vec<_>>();
        key(a).cmp(&key(b))
    });

    // Piston's validation messages, as 400 {"message"}.
    let bad = |body: Value| message(&server.post("/api/v2/execute", &[], &body), 400);
    assert_eq!(bad(json!({})), "language is required as a string");
    assert_eq!(bad(json!({"language": "python"})), "version is required as a string");
    assert_eq!(bad(json!({"language": "python", "version": "*"})), "files is required as an array");
    assert_eq!(
        bad(json!({"language": "python", "version": "*", "files": [{"name": "a"}]})),
        "files[0].content is required as a string"
    );
    assert_eq!(
        bad(json!({"language": "cobol", "version": "*", "files": [{"content": ""}]})),
        "cobol-* runtime is unknown"
    );
    assert_eq!(
        bad(json!({"language": "python", "version": "9", "files": [{"content": ""}]})),
        "python-9 runtime is unknown"
    );
    assert_eq!(
        bad(json!({"language": "python", "version": "*", "files": [{"content": ""}], "run_timeout": 10_000_000})),
        "run_timeout cannot exceed the configured limit of 120000"
    );
    assert_eq!(
        bad(json!({"language": "python", "version": "*", "files": [{"content": ""}], "run_memory_limit": "1"})),
        "If specified, run_memory_limit must be a number"
    );
    assert_eq!(
        bad(json!({"language": "python", "version": "*", "files": [{"content": "eA==", "encoding": "base64"}]})),
        "files must include at least one utf8 encoded file"
    );

    // Content types: a JSON body is accepted whatever it is labelled; anything else is 415.
    let r = post_typed(&server.addr, "/api/v2/execute/", "text/plain", br#"{"language": "python"}"#, &[]);
    assert_eq!(message(&r, 400), "version is required as a string", "text/plain JSON is parsed");
    let r = post_typed(&server.addr, "/api/v2/execute", "text/html", b"<html>", &[]);
    assert_eq!(message(&r, 415), "requests must be of type application/json");
    let r = post_typed(&server.addr, "/api/v2/execute", "application/json", b"{oops", &[]);
    assert!(message(&r, 400).contains("not valid JSON"));
    let r = http(&server.addr, "GET", "/api/v2/execute", &[], b"");
    assert_eq!(r.status, 405);

    // A run: interleaved output, measurements always filled, full version, stdin gets Piston's newline.
    // Arrival order is the order of the writes, back to back across the two pipes.
    let src = "import sys\nprint('out1', flush=True)\nprint('err1', file=sys.stderr, flush=True)\nprint('out2', flush=True)\nprint(repr(sys.stdin.read()), sys.argv[1:])";
    let v = execute(
        &server,
        &json!({"language": "python", "version": "*", "files": [{"content": src}], "stdin": "in", "args": ["a b", "c"]}),
    );
    assert_eq!(v["language"], "python");
    assert_eq!(Some(v["version"].as_str().unwrap().to_string()), newest_python, "`*` is the newest");
    assert!(v.get("compile").is_none());
    let run = &v["run"];
    assert_eq!(run["stdout"], "out1\nout2\n'in\\n' ['a b', 'c']\n", "{v}");
    assert_eq!(run["stderr"], "err1\n");
    assert_eq!(run["output"], "out1\nerr1\nout2\n'in\\n' ['a b', 'c']\n", "arrival order: {v}");
    assert_eq!(
        (run["code"].clone(), run["signal"].clone(), run["status"].clone()),
        (json!(0), Value::Null, Value::Null)
    );
    assert!(run["wall_time"].as_u64().unwrap() > 0 && run["memory"].as_u64().unwrap() > 0, "{run}");
    assert!(run["cpu_time"].is_u64());

    // Semver ranges pick the newest match.
    let v = execute(
        &server,
        &json!({"language": "py", "version": ">=3.9 <3.12", "files": [{"content": "import sys; print(sys.version_info[:2])"}]}),
    );
    assert_eq!(v["run"]["stdout"], "(3, 11)\n", "{v}");
    assert!(v["version"].as_str().unwrap().starts_with("3.11."));

    // Alternating stdout and stderr on every write, no pause: `output` keeps the order of the writes.
    let alternating: String = (0..100).map(|i| format!("o{i}\ne{i}\n")).collect();
    for (language, src) in [
        ("python", "import sys\nfor i in range(100):\n    sys.stdout.write(f'o{i}\\n')\n    sys.stdout.flush()\n    sys.stderr.write(f'e{i}\\n')\n    sys.stderr.flush()\n"),
        ("c", "#include <stdio.h>\nint main(void) {\n    for (int i = 0; i < 100; i++) {\n        printf(\"o%d\\n\", i);\n        fflush(stdout);\n        fprintf(stderr, \"e%d\\n\", i);\n    }\n    return 0;\n}\n"),
    ] {
        let v = execute(&server, &json!({"language": language, "version": "*", "files": [{"content": src}]}));
        assert_eq!(v["run"]["code"], 0, "{language}: {v}");
        assert_eq!(v["run"]["output"], alternating.as_str(), "{language}: arrival order");
    }

    // Non-zero exit, a signal, a timeout (output before the kill kept).
    let v = execute(
        &server,
        &json!({"language": "python", "version": "3", "files": [{"content": "import sys; sys.exit(3)"}]}),
    );
    assert_eq!((v["run"]["status"].clone(), v["run"]["code"].clone()), (json!("RE"), json!(3)), "{v}");
    assert_eq!(v["run"]["message"], "Exited with error status 3");
    let v = execute(
        &server,
        &json!({"language": "python", "version": "3.x", "files": [{"content": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"}]}),
    );
    assert_eq!((v["run"]["status"].clone(), v["run"]["signal"].clone()), (json!("SG"), json!("SIGSEGV")), "{v}");
    let v = execute(
        &server,
        &json!({"language": "python", "version": "*", "run_timeout": 6000,
                "files": [{"content": "import time\nprint('before', flush=True)\nwhile True: pass"}]}),
    );
    assert_eq!((v["run"]["status"].clone(), v["run"]["signal"].clone()), (json!("TO"), json!("SIGKILL")), "{v}");
    assert_eq!(v["run"]["stdout"], "before\n", "output before the kill is kept");

    // Compiled: success has a compile stage; a failed compile is also the run, as in Piston.
    let v = execute(
        &server,
        &json!({"language": "c", "version": "*", "files": [{"content": "#include <stdio.h>\nint main(){puts(\"hi\");return 0;}"}]}),
    );
    assert_eq!(v["compile"]["code"], 0, "{v}");
    assert_eq!(v["run"]["stdout"], "hi\n");
    // A compiled program killed by a hardware trap reports the signal through the `stdbuf` wrapper
    // (`c / z`: GCC folds `1 / X` to a compare, which never traps).
    let v = execute(
        &server,
        &json!({"language": "c", "version": "*", "files": [{"content": "int main(int c, char**v){volatile int z = c - 1; return c / z;}"}]}),
    );
    assert_eq!((v["run"]["status"].clone(), v["run"]["signal"].clone()), (json!("SG"), json!("SIGFPE")), "{v}");
    assert_eq!(v["run"]["code"], Value::Null, "{v}");
    let v = execute(
        &server,
        &json!({"language": "gcc", "version": "*", "files": [{"name": "main.c", "content": "int main( { }"}]}),
    );
    assert_eq!(v["run"], v["compile"], "{v}");
    assert_eq!(v["compile"]["status"], "RE");
    assert!(v["compile"]["stderr"].as_str().unwrap().contains("error"), "{v}");

    server.stop();
    env.assert_clean();
}

#[test]
fn piston_requires_the_api_key_when_configured() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images", "--api-key", "k1"]);
    let r = server.get("/api/v2/runtimes");
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].as_str().unwrap().contains("API key"));
    let r = http(&server.addr, "GET", "/api/v2/runtimes", &[("Authorization", "Bearer k1")], b"");
    assert_eq!(r.status, 200);
    let r = post_typed(&server.addr, "/api/v2/execute", "application/json", b"{}", &[("X-API-Key", "k1")]);
    assert_eq!(message(&r, 400), "language is required as a string");
    server.stop();
    env.assert_clean();
}
