//! Catalog overlays end to end: an overlay file in `TVM_RUNTIMES_DIR` adds a
//! runtime (Python 3.13 with Debian's `python3-numpy`, on the python-3.13
//! recipe's suite); `tvm runtimes` shows the file as its source, `tvm image
//! build` builds its image and a program importing numpy runs in a real VM.
//! A `pip` list is installed from PyPI into an image at build time.
//! A broken overlay stops `tvm` with an error naming file, line and field.

mod common;

use common::{lossy, stdout_of, Env};
use tvm_config::Catalog;

/// The overlay, on the suite of the built-in python-3.13 recipe so its .deb cache is shared.
fn numpy_overlay() -> String {
    let base = Catalog::builtin();
    let suite = &base.get("python-3.13").unwrap().image.as_ref().unwrap().suite;
    format!(
        r#"# A data-course Python: the built-in 3.13 plus numpy from Debian.
[[runtime]]
id = "python-numpy"
language = "python"
version = "3.13-numpy"
aliases = ["numpy"]
extensions = ["py"]
entry = "main.py"
run = ["python3.13", "{{entry}}"]
env = {{ PYTHONDONTWRITEBYTECODE = "1", PYTHONUNBUFFERED = "1", OPENBLAS_NUM_THREADS = "1" }}
image = {{ suite = "{suite}", packages = ["python3.13", "python3-numpy"] }}
"#
    )
}

#[test]
fn an_overlay_runtime_is_listed_built_and_runs_numpy() {
    let env = Env::new();
    let dir = env.work.path().join("runtimes.d");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("50-numpy.toml");
    std::fs::write(&file, numpy_overlay()).unwrap();
    let tvm = || {
        let mut c = env.tvm();
        c.env("TVM_RUNTIMES_DIR", &dir);
        c
    };

    let out = tvm().args(["runtimes", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = list.as_array().unwrap();
    let added = rows.iter().find(|r| r["id"] == "python-numpy").expect("overlay runtime listed");
    assert_eq!(added["source"], file.display().to_string());
    let builtin = rows.iter().find(|r| r["id"] == "python-3.13").unwrap();
    assert_eq!(builtin["source"], "built-in");

    let out = tvm().args(["image", "build", "python-numpy"]).output().unwrap();
    assert!(out.status.success(), "image build failed: {}", lossy(&out.stderr));

    let prog = env.file("main.py", "import numpy\nprint(numpy.__version__)\nprint(int(numpy.arange(10).sum()))\n");
    // A generous wall limit: numpy's import takes seconds of CPU under TCG on a loaded host.
    let out = tvm().args(["run", "--json", "--runtime", "numpy", "--time-limit", "60s"]).arg(&prog).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", lossy(&out.stdout), lossy(&out.stderr)));
    env.assert_clean();
    assert_eq!(v["run"]["exit_code"], 0, "{v}");
    let stdout = stdout_of(&v);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].split('.').take(2).all(|n| n.parse::<u32>().is_ok()), "not a numpy version: {stdout}");
    assert_eq!(lines[1], "45");
}

#[test]
fn a_broken_overlay_stops_tvm_naming_file_line_and_field() {
    let env = Env::new();
    let dir = env.work.path().join("runtimes.d");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("50-numpy.toml");
    std::fs::write(&file, numpy_overlay().replace("{entry}", "{entyr}")).unwrap();
    let out = env.tvm().env("TVM_RUNTIMES_DIR", &dir).args(["runtimes"]).output().unwrap();
    assert!(!out.status.success());
    let err = lossy(&out.stderr);
    let want = format!("{}:9: runtime python-numpy, field `run`: unknown placeholder {{entyr}}", file.display());
    assert!(err.contains(&want), "{err}");
}

/// A recipe's `pip` list is installed from PyPI at image-build time (the
/// guest has no network), into the image's /usr/local.
#[test]
fn pip_packages_of_an_overlay_recipe_are_in_the_image() {
    let env = Env::new();
    let dir = env.work.path().join("runtimes.d");
    std::fs::create_dir_all(&dir).unwrap();
    let base = Catalog::builtin();
    let suite = &base.get("python-3.13").unwrap().image.as_ref().unwrap().suite;
    let overlay = format!(
        "[[runtime]]\nid = \"python-six\"\nlanguage = \"python\"\nversion = \"3.13-six\"\nextensions = [\"py\"]\n\
         entry = \"main.py\"\nrun = [\"python3.13\", \"{{entry}}\"]\n\
         image = {{ suite = \"{suite}\", packages = [\"python3.13\", \"python3-pip\"], pip = [\"six==1.16.0\"] }}\n"
    );
    std::fs::write(dir.join("50-six.toml"), overlay).unwrap();
    let tvm = || {
        let mut c = env.tvm();
        c.env("TVM_RUNTIMES_DIR", &dir);
        c
    };
    let out = tvm().args(["image", "build", "python-six"]).output().unwrap();
    assert!(out.status.success(), "image build failed: {}", lossy(&out.stderr));
    let prog = env.file("main.py", "import six\nprint(six.__version__, six.__file__)\n");
    let out =
        tvm().args(["run", "--json", "--runtime", "python-six", "--time-limit", "60s"]).arg(&prog).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", lossy(&out.stdout), lossy(&out.stderr)));
    env.assert_clean();
    assert_eq!(stdout_of(&v), "1.16.0 /usr/local/lib/python3.13/dist-packages/six.py\n", "{v}");
}
