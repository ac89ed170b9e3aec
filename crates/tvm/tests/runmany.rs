//! Compile once, run many (`tests` in `POST /v1/executions`) against a real
//! `tvm serve` with one real VM: per-test verdicts (accepted, wrong_answer
//! with its comparison rule, a signal, a time limit), each test in a fresh
//! work dir with the compiled program and nothing left by the test before,
//! the summary, and the validation of `tests` (no VM).

mod common;

use common::server::Server;
use common::Env;
use serde_json::{json, Value};

/// One C++ program, its mode in argv[1]. `look` prints whether the previous
/// test's files are there, whether the compiled program is, and how many
/// other processes of the runner exist. `fpe` divides by a zero unknown at
/// compile time (`argc / z`: GCC folds `1 / X` into a compare that never traps).
const PROGRAM: &str = r#"#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "sum";
    if (!std::strcmp(m, "sum")) {
        long a, b;
        if (std::scanf("%ld %ld", &a, &b) != 2) return 3;
        std::printf("%ld  \n\n", a + b);
        return 0;
    }
    if (!std::strcmp(m, "leave")) {
        std::FILE *f = std::fopen("left.txt", "w");
        std::fputs("x", f);
        std::fclose(f);
        std::fclose(std::fopen("/tmp/left.txt", "w"));
        if (fork() == 0) { sleep(100); return 0; }
        std::puts("left");
        return 0;
    }
    if (!std::strcmp(m, "look")) {
        int others = 0;
        DIR *d = opendir("/proc");
        struct dirent *e;
        while ((e = readdir(d))) {
            int pid = std::atoi(e->d_name);
            struct stat st;
            char path[64];
            std::snprintf(path, sizeof path, "/proc/%s", e->d_name);
            if (pid > 0 && pid != getpid() && stat(path, &st) == 0 && st.st_uid == getuid()) others++;
        }
        std::printf("%d %d %d %d\n", access("left.txt", F_OK) == 0, access("/tmp/left.txt", F_OK) == 0,
                    access("main", X_OK) == 0, others);
        return 0;
    }
    if (!std::strcmp(m, "fpe")) {
        volatile int z = argc - 2;
        return argc / z;
    }
    for (;;) {}
}
"#;

#[test]
fn compile_once_run_many() {
    let env = Env::new();
    let server = Server::start(&env, &["--no-build-images"]);

    // Validation, before any VM.
    let base = |tests: Value| json!({"runtime": "cpp-gcc-14", "files": [{"name": "main.cpp", "content": PROGRAM}], "tests": tests});
    let many: Vec<Value> = (0..65).map(|_| json!({"stdin": "1 2"})).collect();
    let e = server.execute(&base(json!(many))).error(422, "bad_tests");
    assert!(e["message"].as_str().unwrap().contains("65 given, 1 to 64"), "{e}");
    let mut both = base(json!([{"stdin": "1 2"}]));
    both["stdin"] = json!("3 4");
    server.execute(&both).error(422, "bad_tests");
    server.execute(&base(json!([{"stdin": "%%", "stdin_encoding": "base64"}]))).error(422, "bad_base64");
    assert_eq!(server.execute(&base(json!([{"input": "x"}]))).status, 400, "unknown test field");

    // One VM: compile once, six runs.
    let mut body = base(json!([
        {"stdin": "2 3", "expected_output": "5"},
        {"stdin": "2 2", "expected_output": "5\n"},
        {"args": ["leave"]},
        {"args": ["look"]},
        {"args": ["fpe"]},
        {"args": ["spin"]},
    ]));
    body["run_limits"] = json!({"wall_time_ms": 4000, "cpu_time_ms": 1500});
    let r = server.execute(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["verdict"], "ok", "the build went through: {v}");
    assert_eq!(v["compile"]["status"], "ok", "{v}");
    assert!(v["run"].is_null(), "{v}");
    let tests = v["tests"].as_array().unwrap_or_else(|| panic!("no tests: {v}"));
    let verdicts: Vec<&str> = tests.iter().map(|t| t["verdict"].as_str().unwrap()).collect();
    assert_eq!(
        verdicts,
        ["accepted", "wrong_answer", "accepted", "accepted", "runtime_error", "time_limit_exceeded"],
        "{v}"
    );
    for (i, t) in tests.iter().enumerate() {
        assert_eq!(t["index"], i, "{t}");
    }
    assert_eq!(tests[0]["comparison"], "trailing_whitespace", "trailing spaces and blank lines ignored");
    assert_eq!(tests[0]["run"]["stdout"], "5  \n\n");
    assert_eq!(tests[1]["comparison"], "trailing_whitespace");
    assert!(tests[2].get("comparison").is_none(), "no expected output, no comparison: {}", tests[2]);
    assert_eq!(tests[2]["run"]["stdout"], "left\n");
    assert_eq!(
        tests[3]["run"]["stdout"], "0 0 1 0\n",
        "fresh work dir and /tmp, the compiled program there, no process of the test before: {v}"
    );
    assert_eq!((tests[4]["run"]["signal"].clone(), tests[4]["run"]["exit_code"].clone()), (json!(8), Value::Null));
    assert!(tests[0]["run"]["wall_time_ms"].is_u64() && tests[0]["run"]["peak_memory_bytes"].as_u64() > Some(0));
    let s = &v["summary"];
    assert_eq!(
        (s["total"].clone(), s["ran"].clone(), s["accepted"].clone(), s["failed"].clone()),
        (json!(6), json!(6), json!(3), json!(3)),
        "{s}"
    );
    assert!(s["max_cpu_time_ms"].as_u64() >= Some(1000), "the spinning test's CPU time: {s}");

    server.stop();
    env.assert_clean();
}
