//! Every available runtime of the catalog, in real VMs: a hello world that
//! also prints its arguments and echoes its stdin, a compile error (a syntax
//! error for interpreted languages), and a runtime error with its exit code.
//! One multi-file submission per language. A runtime added to the catalog
//! without a program here fails `every_available_runtime_has_programs`.
//!
//! Every language's executions start from their runtime's VM template (built
//! on first use, or beforehand by `tvm image build` with templates on), and
//! the test fails if one cold boots instead.
//! `the_cold_path_still_runs_every_stage` boots its VMs from scratch.

mod common;

use common::langs::lang;
use common::{lossy, Env};
use serde_json::Value;
use tvm_config::Catalog;

/// How the VMs of [`run`] start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Restored from the runtime's template.
    Template,
    /// Booted from scratch (templates off).
    Cold,
}

/// `tvm run --json --runtime ID` on files written into a fresh directory,
/// in a VM that started as `start` says (asserted).
fn run(env: &Env, start: Start, runtime: &str, files: &[(&str, &str)], stdin: Option<&str>, args: &[&str]) -> Value {
    let dir = tempfile::tempdir_in(env.work.path()).unwrap();
    let mut paths = Vec::new();
    for (name, content) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        paths.push(p);
    }
    let mut cmd = env.tvm_templates(start == Start::Template);
    cmd.args(["run", "--json", "--runtime", runtime]);
    if let Some(input) = stdin {
        let p = dir.path().join("stdin.txt");
        std::fs::write(&p, input).unwrap();
        cmd.arg("--stdin").arg(p);
    }
    let out = cmd.args(&paths).arg("--").args(args).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{runtime}: not JSON ({e}): stdout={} stderr={}", lossy(&out.stdout), lossy(&out.stderr))
    });
    env.assert_clean();
    match start {
        // A template that cannot be built or restored falls back to a cold
        // boot without failing the execution; here that is a failure to see.
        Start::Template => assert_eq!(v["start"], "template", "{runtime}: not restored from its template: {v}"),
        Start::Cold => {
            assert_eq!(v["start"], "cold", "{runtime}: {v}");
            assert!(v["start_note"].is_null(), "{runtime}: templates off is not a fallback: {v}");
        }
    }
    v
}

fn text(v: &Value, stage: &str, stream: &str) -> String {
    v[stage][stream].as_str().unwrap_or_default().to_string()
}

/// The four programs of `language` against every available version of it,
/// each in a VM that starts as `start` says.
fn check_language(language: &str, start: Start) {
    let catalog = Catalog::builtin();
    let l = lang(language);
    // An OCI entry counts where its registry answers (or its image is built): the seed
    // versions from Docker Hub are tested on hosts that reach it.
    let settings = tvm_config::Settings::load().unwrap();
    pyrovm::registry::probe_blocking(pyrovm::registry::registries_of(&settings, catalog.runtimes()));
    let versions: Vec<_> = catalog
        .runtimes()
        .iter()
        .filter(|r| r.language == language && r.unavailable.is_none())
        .filter(|r| !matches!(pyrovm::image::runtime_state(&settings, r), pyrovm::image::RuntimeState::Unavailable(_)))
        .collect();
    assert!(!versions.is_empty(), "no available {language} runtime");
    let env = Env::new();
    for r in &versions {
        let id = r.id.as_str();
        let compiled = r.compile.is_some();

        let v = run(&env, start, id, &[(l.entry, l.hello)], Some("one\ntwo\n"), &["x", "y z"]);
        assert_eq!(v["verdict"], "ok", "{id} hello: {v}");
        assert_eq!(v["runtime"], id);
        assert_eq!(text(&v, "run", "stdout"), "hello\nargs: x,y z\none\ntwo\n", "{id} hello: {v}");

        let v = run(&env, start, id, &[(l.entry, l.broken)], None, &[]);
        let (verdict, stage) = if compiled { ("compile_error", "compile") } else { ("runtime_error", "run") };
        assert_eq!(v["verdict"], verdict, "{id} broken: {v}");
        let said = format!("{}{}", text(&v, stage, "stderr"), text(&v, stage, "stdout")).to_lowercase();
        assert!(said.contains(l.broken_says), "{id}: the {stage} output names the problem: {said}");
        if compiled {
            assert!(v["run"].is_null(), "{id}: nothing runs after a compile error: {v}");
        }

        let v = run(&env, start, id, &[(l.entry, l.fails)], None, &[]);
        assert_eq!(v["verdict"], "runtime_error", "{id} fails: {v}");
        assert_eq!(v["run"]["exit_code"], 3, "{id} fails: {v}");
        assert_eq!(text(&v, "run", "stderr"), "boom\n", "{id} fails: {v}");
    }
    // Multi-file: once, with the language's default version.
    let default = catalog.for_extension(l.entry.rsplit('.').next().unwrap()).unwrap();
    let v = run(&env, start, &default.id, l.multi, None, &[]);
    assert_eq!(v["verdict"], "ok", "{} multi-file: {v}", default.id);
    assert_eq!(text(&v, "run", "stdout"), "multi 42\n", "{} multi-file: {v}", default.id);
}

#[test]
fn every_available_runtime_has_programs() {
    for r in Catalog::builtin().runtimes().iter().filter(|r| r.unavailable.is_none()) {
        let l = lang(&r.language);
        assert!(r.extensions.iter().any(|e| l.entry.ends_with(&format!(".{e}"))), "{}: entry {}", r.id, l.entry);
    }
}

/// The cold path (templates off, a kernel boot per VM) with an interpreted
/// and a compiled runtime: stdin, arguments, compile and run stages.
#[test]
fn the_cold_path_still_runs_every_stage() {
    let catalog = Catalog::builtin();
    let env = Env::new();
    for language in ["python", "c"] {
        let l = lang(language);
        let r = catalog.for_extension(l.entry.rsplit('.').next().unwrap()).unwrap();
        let v = run(&env, Start::Cold, &r.id, &[(l.entry, l.hello)], Some("one\ntwo\n"), &["x", "y z"]);
        assert_eq!(v["verdict"], "ok", "{} cold hello: {v}", r.id);
        assert_eq!(text(&v, "run", "stdout"), "hello\nargs: x,y z\none\ntwo\n", "{} cold hello: {v}", r.id);
        assert_eq!(v["compile"].is_null(), r.compile.is_none(), "{} compile stage: {v}", r.id);
    }
}

#[test]
fn python() {
    check_language("python", Start::Template);
}

#[test]
fn javascript() {
    check_language("javascript", Start::Template);
}

#[test]
fn ruby() {
    check_language("ruby", Start::Template);
}

#[test]
fn go() {
    check_language("go", Start::Template);
}

#[test]
fn rust() {
    check_language("rust", Start::Template);
}

#[test]
fn java() {
    check_language("java", Start::Template);
}

#[test]
fn c() {
    check_language("c", Start::Template);
}

#[test]
fn cpp() {
    check_language("cpp", Start::Template);
}
