//! `tvm run` as a user meets it, with real VMs: tvm's own stdin reaches the
//! program (a pipe, a redirected file; `--stdin FILE` wins; /dev/null and a
//! closed stdin read as empty), a program killed by a signal gets a shell's
//! one-line notice, and `--json` prints the API's result document with the
//! same keys locally and through `--server`. Also: `tvm runtimes` and the
//! server's `/v1/runtimes` report the same state for every runtime.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use common::{lossy, Env};
use serde_json::Value;

/// A program echoing its stdin upper-cased, then whether stdin hit EOF.
const ECHO_PY: &str =
    "import sys\ndata = sys.stdin.read()\nprint('got ' + data.upper().strip() + ' (' + str(len(data)) + ')')";
/// The same in C, reading with stdio.
const ECHO_C: &str = "#include <stdio.h>\n#include <ctype.h>\nint main(void){int c,n=0;printf(\"got \");\
while((c=getchar())!=EOF){n++;if(c!='\\n')putchar(toupper(c));}printf(\" (%d)\\n\",n);return 0;}";

/// `tvm run` with a generous run-stage limit: these tests are about stdin
/// and reporting, and a loaded host (TCG) must not turn them into time limits.
fn run(env: &Env) -> std::process::Command {
    let mut c = env.tvm();
    c.args(["run", "--time-limit", "60s"]);
    c
}

fn piped(env: &Env, file: &std::path::Path, input: &[u8]) -> Output {
    let mut child = env
        .tvm()
        .args(["run", "--time-limit", "60s"])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn stdin_pipe_and_redirect_reach_the_program() {
    let env = Env::new();
    for (name, src) in [("echo.py", ECHO_PY), ("echo.c", ECHO_C)] {
        let f = env.file(name, src);
        // `echo data | tvm run prog`
        let out = piped(&env, &f, b"data\n");
        assert!(out.status.success(), "{name}: {}", lossy(&out.stderr));
        assert_eq!(lossy(&out.stdout), "got DATA (5)\n", "{name} via a pipe");
        // `tvm run prog < input.txt`
        let input = env.file("input.txt", "from a file\n");
        let out = run(&env).arg(&f).stdin(std::fs::File::open(&input).unwrap()).output().unwrap();
        assert_eq!(lossy(&out.stdout), "got FROM A FILE (12)\n", "{name} via a redirect: {}", lossy(&out.stderr));
        env.assert_clean();
    }
}

#[test]
fn stdin_flag_wins_and_empty_or_closed_stdin_is_eof() {
    let env = Env::new();
    let f = env.file("echo.py", ECHO_PY);
    let file = env.file("flag.txt", "flag");
    // --stdin FILE wins over a piped stdin.
    let mut child = env
        .tvm()
        .args(["run", "--time-limit", "60s"])
        .arg("--stdin")
        .arg(&file)
        .arg(&f)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"pipe").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(lossy(&out.stdout), "got FLAG (4)\n", "{}", lossy(&out.stderr));
    // /dev/null (CI), an empty pipe, and a closed descriptor 0: empty stdin, no hang.
    let null = run(&env).arg(&f).output().unwrap();
    assert_eq!(lossy(&null.stdout), "got  (0)\n", "{}", lossy(&null.stderr));
    let empty = piped(&env, &f, b"");
    assert_eq!(lossy(&empty.stdout), "got  (0)\n", "{}", lossy(&empty.stderr));
    let mut cmd = run(&env);
    cmd.arg(&f);
    // SAFETY: close(2) is async-signal-safe; the child has not started running Rust code of its own.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::close(0).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let closed = cmd.output().unwrap();
    assert!(closed.status.success(), "{}", lossy(&closed.stderr));
    assert_eq!(lossy(&closed.stdout), "got  (0)\n", "{}", lossy(&closed.stderr));
    // The issue's `ask.py`: input() reads the piped line instead of raising EOFError.
    let ask = env.file("ask.py", "name = input()\nprint('hi ' + name)");
    let out = piped(&env, &ask, b"tvm\n");
    assert_eq!(lossy(&out.stdout), "hi tvm\n", "{}", lossy(&out.stderr));
    env.assert_clean();
}

/// The stderr lines tvm itself wrote (the program's own stderr is empty here).
fn tvm_lines(out: &Output) -> Vec<String> {
    lossy(&out.stderr).lines().filter(|l| l.starts_with("tvm: ")).map(str::to_string).collect()
}

#[test]
fn a_signal_death_is_reported_like_a_shell() {
    let env = Env::new();
    let cases = [
        (
            "segv.py",
            "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)",
            11,
            "SIGSEGV",
        ),
        (
            "abort.c",
            "#include <stdlib.h>\n#include <stdio.h>\nint main(void){puts(\"before\");fflush(stdout);abort();}",
            6,
            "SIGABRT",
        ),
        (
            "segv.cpp",
            "#include <cstdio>\nint main(){std::puts(\"before\");std::fflush(stdout);int*volatile p=nullptr;return *p;}",
            11,
            "SIGSEGV",
        ),
    ];
    for (name, src, sig, sig_name) in cases {
        let f = env.file(name, src);
        let out = run(&env).arg(&f).output().unwrap();
        assert_eq!(lossy(&out.stdout), "before\n", "{name}: {}", lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(128 + sig), "{name}: {}", lossy(&out.stderr));
        assert_eq!(tvm_lines(&out), vec![format!("tvm: killed by signal {sig} ({sig_name})")], "{name}");
    }
    // A program that exits with a code of its own gets no notice.
    let f = env.file("exit.py", "raise SystemExit(3)");
    let out = run(&env).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(tvm_lines(&out).is_empty(), "{}", lossy(&out.stderr));
    env.assert_clean();
}

/// Every key path of a JSON document (`run.wall_time_ms`, ...).
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            out.insert(path.clone());
            key_paths(child, &path, out);
        }
    }
}

fn paths(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    key_paths(v, "", &mut out);
    out
}

#[test]
fn json_is_the_api_document_locally_and_through_a_server() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let url = format!("http://{}", server.addr);
    let cases = [
        ("ok.py", "import sys\nprint('out ' + sys.stdin.read())\nprint('err', file=sys.stderr)", "ok"),
        ("segv.py", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "runtime_error"),
        ("bad.c", "int main(void) { return undefined_symbol; }", "compile_error"),
    ];
    for (name, src, verdict) in cases {
        let f = env.file(name, src);
        let input = env.file("in.txt", "x");
        let stdin = input.to_str().unwrap();
        let local = env.run_json(&f, &["--time-limit", "60s", "--stdin", stdin]).0;
        let remote = env.run_json_only(&f, &["--time-limit", "60s", "--stdin", stdin, "--server", &url]).0;
        server.wait_settled();
        env.assert_clean();
        assert_eq!(local["verdict"], verdict, "{local}");
        assert_eq!(remote["verdict"], verdict, "{remote}");
        assert_eq!(paths(&local), paths(&remote), "{name}: one shape\nlocal: {local}\nremote: {remote}");
        for key in ["id", "verdict", "runtime", "boot_ms", "queue_ms", "total_ms", "accel", "pooled"] {
            assert!(local.get(key).is_some(), "{name}: {key} in {local}");
        }
        for gone in ["vm_id", "wall_ms", "cpu_ms"] {
            assert!(local.get(gone).is_none() && local["run"].get(gone).is_none(), "{name}: {gone} in {local}");
        }
        let stage = if verdict == "compile_error" { "compile" } else { "run" };
        assert!(local[stage]["wall_time_ms"].is_u64() && local[stage]["cpu_time_ms"].is_u64(), "{local}");
        assert_eq!(local[stage]["stdout"], remote[stage]["stdout"], "{name}");
        assert_eq!(local[stage]["signal"], remote[stage]["signal"], "{name}");
    }
    // One runtime state for the CLI and the server: ready = ready, buildable = missing.
    let cli = env.tvm().args(["runtimes", "--json"]).output().unwrap();
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    let api = server.get("/v1/runtimes").json();
    let api_states: std::collections::BTreeMap<String, String> = api["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r["image"]["state"].as_str().unwrap().to_string()))
        .collect();
    for r in cli.as_array().unwrap() {
        let id = r["id"].as_str().unwrap();
        let state = r["state"].as_str().unwrap().split(':').next().unwrap();
        let api_state = api_states[id].as_str();
        let same = match state {
            "ready" => api_state == "ready",
            // The server builds missing images in the background meanwhile.
            "buildable" => ["missing", "building", "failed", "ready"].contains(&api_state),
            "unavailable" => api_state == "unavailable",
            other => panic!("{id}: unknown CLI state {other}"),
        };
        assert!(same, "{id}: CLI {state}, server {api_state}");
    }
    server.stop();
    env.assert_clean();
}

/// `--accel` and `--vmm` belong to the commands that start VMs here; the
/// others neither list nor take them (clap's usual refusal, exit status 2),
/// and `TVM_VMM` still reaches the ones that do. Argument parsing only: no VM.
#[test]
fn vm_flags_are_offered_only_where_vms_start() {
    let env = Env::new();
    let out = env.tvm().args(["lima", "up", "--vmm", "qemu"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", lossy(&out.stderr));
    assert!(lossy(&out.stderr).contains("unexpected argument '--vmm'"), "{}", lossy(&out.stderr));
    let help = |args: &[&str]| {
        let out = env.tvm().args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", lossy(&out.stderr));
        lossy(&out.stdout)
    };
    for args in [
        &["lima", "up"][..],
        &["lima", "template"],
        &["lima", "status"],
        &["runtimes"],
        &["kernel", "build"],
        &["reap"],
        &["image", "list"],
        &["template", "list"],
    ] {
        let text = help(args);
        assert!(!text.contains("--accel <") && !text.contains("--vmm <"), "{args:?} offers VM flags:\n{text}");
    }
    for args in [&["run"][..], &["serve"], &["bench"], &["soak"], &["doctor"], &["image", "build"]] {
        let text = help(args);
        assert!(text.contains("--accel <") && text.contains("--vmm <"), "{args:?} lacks VM flags:\n{text}");
    }
    // The environment is read where the flag is: a bad value is a parse error naming the flag.
    let out = env.tvm().arg("doctor").env("TVM_VMM", "bochs").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", lossy(&out.stderr));
    assert!(lossy(&out.stderr).contains("'--vmm <VMM>'"), "{}", lossy(&out.stderr));
}

/// A runtime the guests' architecture lacks is refused from the catalog
/// alone, before the guest kernel (minutes under TCG), an image or a
/// template is built: exit status 69 with the reason, and nothing in a
/// fresh cache.
#[test]
fn a_runtime_the_guest_arch_lacks_is_refused_before_any_build() {
    let env = Env::new();
    let cache = common::TempDir::default();
    let catalog = tvm_config::Catalog::builtin();
    let ruby = catalog.for_extension("rb").unwrap();
    assert!(!ruby.architectures.contains(&tvm_config::GuestArch::Aarch64), "ruby now runs on aarch64: pick another");
    let f = env.file("hello.rb", "puts 'hello'\n");
    let started = Instant::now();
    let out = env
        .tvm()
        .arg("run")
        .arg(&f)
        .env("TVM_GUEST_ARCH", "aarch64")
        .env("TVM_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(
        err,
        format!(
            "tvm: runtime {} is unavailable: not supported on aarch64 guests (architectures: {}); \
             `tvm runtimes` shows what runs on aarch64 guests\n",
            ruby.id,
            tvm_config::matrix::architectures_of(ruby)
        )
    );
    assert!(out.stdout.is_empty(), "{}", lossy(&out.stdout));
    let made: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(made.is_empty(), "the cache was written (a kernel build started?): {made:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    env.assert_clean();
}
