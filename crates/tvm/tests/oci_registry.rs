//! OCI image sources end to end, against a real registry: Debian's
//! `docker-registry` (the CNCF Distribution registry) on 127.0.0.1 with
//! htpasswd auth. The test writes its own OCI image (the root of the cached
//! default Python image, extracted with `fsck.erofs`, as a gzip layer, plus a
//! second layer with a whiteout and an opaque directory), pushes it with the
//! `oci-client` crate, and `tvm image build` pulls it with credentials from a
//! Docker config file; a program then runs in it in a real VM (the only boot
//! of this file). Also: an image imported from an OCI layout and from a
//! tarball of it (what `docker save` writes), a registry refusing missing
//! credentials, a tampered blob, a layer with a path traversal, and the
//! registry killed mid-pull: each a clean error, and nothing of theirs in the
//! image cache (no image, no metadata, no scratch directory of the failed
//! `tvm` process).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{lossy, stdout_of, Env};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tvm_config::{Catalog, ImageRecipe, Settings};

const USER: &str = "tvm-test";
const PASSWORD: &str = "s3cret-pass";

/// A `docker-registry` serving on a free 127.0.0.1 port with htpasswd auth,
/// killed on drop.
struct Registry {
    child: Arc<Mutex<Child>>,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash(PASSWORD, 5).unwrap();
        std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
        let storage = dir.path().join("storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: tvm-test\n    path: {}\n",
                storage.display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry) runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child: Arc::new(Mutex::new(child)), port, storage, _dir: dir }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The data file of blob `digest` in the registry's filesystem storage.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Docker config directory holding credentials for `hosts`.
fn docker_config(dir: &Path, hosts: &[String]) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let auths: serde_json::Map<String, serde_json::Value> =
        hosts.iter().map(|h| (h.clone(), serde_json::json!({ "auth": auth }))).collect();
    let d = dir.join("docker");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), serde_json::json!({ "auths": auths }).to_string()).unwrap();
    d
}

/// An uncompressed layer tarball from `(path, content)` rows (directories end
/// in `/`); names go raw into the header so hostile ones can be written.
fn tar_of(rows: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in rows {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
        let dir = p.ends_with('/');
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer of directories, regular files and symlinks: `(path, content)`
/// rows as in [`tar_of`], and a content starting with `->` makes a symlink
/// to the rest.
fn tar_with_links(rows: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in rows {
        let mut h = tar::Header::new_gnu();
        h.set_path(p).unwrap();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        if let Some(target) = data.strip_prefix("->") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_link_name(target).unwrap();
            h.set_mode(0o777);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
            continue;
        }
        let dir = p.ends_with('/');
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_mode(0o755); // directories, and files that must pass as executables
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer of one regular file.
fn tar_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An image: gzip layers, their uncompressed digests, and its config.
struct Image {
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
}

impl Image {
    fn new(uncompressed: &[Vec<u8>]) -> Self {
        let diff_ids: Vec<String> = uncompressed.iter().map(|l| sha256(l)).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {}, "rootfs": { "type": "layers", "diff_ids": diff_ids },
        })
        .to_string()
        .into_bytes();
        Self { layers: uncompressed.iter().map(|l| gzip(l)).collect(), config }
    }

    /// Pushes it as `reference` with the test's credentials; returns the manifest digest.
    fn push(&self, reference: &str) -> String {
        let r: Reference = reference.parse().unwrap();
        let layers: Vec<ImageLayer> = self.layers.iter().map(|l| ImageLayer::oci_v1_gzip(l.clone(), None)).collect();
        let config = Config::oci_v1(self.config.clone(), None);
        let client = Client::try_from(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() }).unwrap();
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let resp = rt.block_on(client.push(&r, &layers, config, &auth, None)).expect("push");
        resp.manifest_url.rsplit('/').next().unwrap().to_string()
    }

    /// Writes it as an OCI image layout tagged `name`; returns the manifest digest.
    fn write_layout(&self, dir: &Path, name: &str) -> String {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = sha256(data);
            std::fs::write(blobs.join(d.strip_prefix("sha256:").unwrap()), data).unwrap();
            serde_json::json!({ "digest": d, "size": data.len() })
        };
        let mut config = put(&self.config);
        config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|l| {
                let mut d = put(l);
                d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
                d
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers,
        })
        .to_string();
        let mut m = put(manifest.as_bytes());
        m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        m["annotations"] = serde_json::json!({ "io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap() });
        let digest = m["digest"].as_str().unwrap().to_string();
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [m] });
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        digest
    }
}

/// The root of the cached default Python image (built if missing), as a tar layer.
fn python_root_layer(settings: &Settings, work: &Path) -> Vec<u8> {
    let catalog = Catalog::builtin();
    let python = catalog.get("python").unwrap();
    let recipe = python.image.as_ref().unwrap();
    if pyrovm::image::find_image(settings, recipe).is_none() {
        let out = Env::new().tvm().args(["image", "build", &python.id]).output().unwrap();
        assert!(out.status.success(), "{}", lossy(&out.stderr));
    }
    let image = pyrovm::image::find_image(settings, recipe).unwrap();
    let root = work.join("python-root");
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", root.display()))
        .arg("--preserve")
        .arg(&image.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fsck.erofs --extract: {}", lossy(&out.stderr));
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &root).unwrap();
    b.into_inner().unwrap()
}

/// The second layer: removes one lower-layer file by whiteout and empties a
/// lower-layer directory with an opaque marker before adding a file to it.
fn upper_layer() -> Vec<u8> {
    tar_of(&[
        ("opt/tvm/", ""),
        ("opt/tvm/.wh.removed.txt", ""),
        ("opt/tvm/upper.txt", "upper\n"),
        ("opt/opq/", ""),
        ("opt/opq/.wh..wh..opq", ""),
        ("opt/opq/new.txt", "new\n"),
    ])
}

fn lower_extra() -> Vec<u8> {
    tar_of(&[
        ("opt/tvm/", ""),
        ("opt/tvm/lower.txt", "lower\n"),
        ("opt/tvm/removed.txt", "gone\n"),
        ("opt/opq/", ""),
        ("opt/opq/old.txt", "old\n"),
    ])
}

/// An overlay runtime `id` running Python from the OCI image `reference`.
fn overlay(dir: &Path, id: &str, reference: &str) {
    let python = Catalog::builtin().get("python").unwrap().run[0].clone();
    overlay_running(dir, id, reference, &python);
}

/// An overlay runtime `id` whose run stage starts `command`, from the OCI image `reference`.
fn overlay_running(dir: &Path, id: &str, reference: &str, python: &str) {
    std::fs::write(
        dir.join(format!("50-{id}.toml")),
        format!(
            "[[runtime]]\nid = \"{id}\"\nlanguage = \"python\"\nversion = \"oci-{id}\"\nextensions = [\"py\"]\n\
             entry = \"main.py\"\nrun = [\"{python}\", \"{{entry}}\"]\nimage = {{ oci = \"{reference}\" }}\n"
        ),
    )
    .unwrap();
}

/// Runs `cmd` to the end; its output and its pid (scratch directories in the
/// cache are named after the process that made them).
fn run_with_pid(mut cmd: Command) -> (Output, u32) {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// Nothing of `reference` in the image cache (neither image nor metadata), and
/// no scratch directory of the `tvm` process `pid` left in the cache's tmp dir.
fn assert_not_cached(settings: &Settings, reference: &str, pid: u32) {
    let recipe = ImageRecipe::oci(reference);
    assert!(pyrovm::image::find_image(settings, &recipe).is_none(), "{reference} counts as built");
    let dir = settings.cache_dir.join("images");
    for ext in ["erofs", "json"] {
        let p = dir.join(format!("{}.{ext}", recipe.key()));
        assert!(!p.exists(), "{} was left in the cache", p.display());
    }
    let prefix = format!("{pid}-");
    let left: Vec<_> = std::fs::read_dir(settings.cache_dir.join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<_> = left.into_iter().filter(|n: &String| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "scratch directories of the failed build were left: {left:?}");
}

/// The regular files under `/opt` of the cached image of `reference`, sorted
/// (extracted with `fsck.erofs`).
fn files_in(settings: &Settings, reference: &str, work: &Path) -> Vec<String> {
    let image = pyrovm::image::find_image(settings, &ImageRecipe::oci(reference)).expect("imported image");
    let root = work.join("imported-root");
    let out =
        Command::new("fsck.erofs").arg(format!("--extract={}", root.display())).arg(&image.path).output().unwrap();
    assert!(out.status.success(), "fsck.erofs --extract: {}", lossy(&out.stderr));
    let mut found = Vec::new();
    let mut dirs = vec![root.join("opt")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                found.push(e.path().strip_prefix(root.join("opt")).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Removes what the test published into the shared cache (the image the
/// reference's tag record points at).
fn remove(settings: &Settings, reference: &str) {
    if let Some(image) = pyrovm::image::find_image(settings, &ImageRecipe::oci(reference)) {
        let _ = pyrovm::image::remove_image(settings, &image.key);
    }
}

/// The key the image of `pinned` (`registry/repo@sha256:...`) would have.
fn pinned_key(pinned: &str) -> String {
    ImageRecipe::oci(pinned).key()
}

/// `tvm runtimes --json`: each runtime's state by id.
fn states(out: &Output) -> std::collections::BTreeMap<String, String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", lossy(&out.stdout), lossy(&out.stderr)));
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().into(), r["state"].as_str().unwrap().into()))
        .collect()
}

/// A TCP proxy to `registry` that kills the registry once 256 KiB of a blob
/// response have passed: the "registry died mid-pull" fault, at a fixed point.
fn killing_proxy(registry: &Registry) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = registry.port;
    let child = registry.child.clone();
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().take(64) {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { break };
            let blob = Arc::new(AtomicBool::new(false));
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let b = blob.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = c_in.read(&mut buf) {
                    if buf[..n].windows(13).any(|w| w == b"/blobs/sha256") {
                        b.store(true, Ordering::SeqCst);
                    }
                    if s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let (mut s_in, mut c_out) = (server, client);
            let (child, k) = (child.clone(), k.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut sent = 0usize;
                while let Ok(n @ 1..) = s_in.read(&mut buf) {
                    if blob.load(Ordering::SeqCst) {
                        sent += n;
                        if sent > 256 << 10 {
                            let mut c = child.lock().unwrap();
                            let _ = c.kill();
                            let _ = c.wait();
                            k.store(true, Ordering::SeqCst);
                            let _ = c_out.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, killed)
}

#[test]
fn an_image_pulled_with_auth_from_a_real_registry_runs_and_faults_leave_nothing() {
    // Each step's output and time go to stderr (shown on failure or with --nocapture).
    let started = Instant::now();
    let env = Env::new();
    let settings = Settings::load().unwrap();
    let registry = Registry::start();
    let host = registry.host();
    let runtimes = env.work.path().join("runtimes.d");
    std::fs::create_dir_all(&runtimes).unwrap();
    let docker = docker_config(env.work.path(), std::slice::from_ref(&host));
    let tvm = |docker_dir: &Path| {
        let mut c = env.tvm();
        c.env("TVM_RUNTIMES_DIR", &runtimes).env("DOCKER_CONFIG", docker_dir);
        c
    };

    // Availability is the registry's answer to `GET /v2/` (401 here: auth is on),
    // for the CLI and the server; a closed port is unreachable, with the cause.
    let closed = format!("127.0.0.1:{}", free_port());
    overlay(&runtimes, "py-answers", &format!("{host}/tvm/not-pushed:1"));
    overlay(&runtimes, "py-closed", &format!("{closed}/tvm/python:1"));
    let out = tvm(&docker).args(["runtimes", "--json"]).output().unwrap();
    let listed = states(&out);
    eprintln!(
        "[{:5.1}s] py-answers {:?}, py-closed {:?}",
        started.elapsed().as_secs_f64(),
        listed["py-answers"],
        listed["py-closed"]
    );
    assert_eq!(listed["py-answers"], "buildable");
    let want = format!("unavailable: registry unreachable (GET http://{closed}/v2/: ");
    assert!(
        listed["py-closed"].starts_with(&want) && listed["py-closed"].contains("refused"),
        "{}",
        listed["py-closed"]
    );
    let out = tvm(&docker).args(["runtimes", "--matrix"]).output().unwrap();
    let matrix = lossy(&out.stdout);
    let row = |id: &str| matrix.lines().find(|l| l.contains(&format!(" {id} "))).unwrap_or_default().to_string();
    assert!(row("py-answers").contains(" buildable "), "{matrix}");
    assert!(
        row("py-closed").contains(" unavailable ") && row("py-closed").contains("registry unreachable (GET"),
        "{matrix}"
    );
    {
        // The server never waits for a probe: it says `missing` (checking) until the answer is in.
        let vars = [("TVM_RUNTIMES_DIR", runtimes.as_os_str()), ("DOCKER_CONFIG", docker.as_os_str())];
        let server = common::server::Server::start_with_env(&env, &["--no-build-images", "--pool-size", "0"], &vars);
        let api_state = |id: &str| {
            let v = server.get("/v1/runtimes").json();
            let r = v["runtimes"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap().clone();
            (r["image"]["state"].as_str().unwrap().to_string(), r["image"]["reason"].as_str().unwrap_or("").to_string())
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, closed_state) = (api_state("py-answers"), api_state("py-closed"));
            if !ok.1.contains("checking") && !closed_state.1.contains("checking") {
                assert_eq!(ok, ("missing".to_string(), "the image is not built".to_string()));
                assert_eq!(closed_state.0, "unavailable");
                assert!(closed_state.1.starts_with("registry unreachable (GET http://"), "{closed_state:?}");
                // Waiting does not bring the registry back: 503 without Retry-After, so
                // clients (the SDK) give up at once instead of retrying.
                let body =
                    serde_json::json!({"runtime": "py-closed", "files": [{"name": "main.py", "content": "print(1)"}]});
                let r = server.execute(&body);
                let e = r.error(503, "runtime_unavailable");
                assert_eq!(r.header("retry-after"), None, "{e}");
                assert!(e["message"].as_str().unwrap().contains("registry unreachable"), "{e}");
                assert_eq!(e["field"], "runtime");
                // The CLI through the server and on its own host: exit status 69
                // (unavailable), not 70 (a fault in TVM), with the cause on one line.
                let prog = env.file("closed.py", "print(1)\n");
                let url = format!("http://{}", server.addr);
                for remote in [true, false] {
                    let mut cmd = tvm(&docker);
                    cmd.args(["run", "--runtime", "py-closed"]);
                    if remote {
                        cmd.args(["--server", &url]);
                    }
                    let out = cmd.arg(&prog).output().unwrap();
                    let err = lossy(&out.stderr);
                    assert_eq!(out.status.code(), Some(69), "remote {remote}: {err}");
                    assert!(err.contains("registry unreachable") || err.contains(&closed), "remote {remote}: {err}");
                }
                env.assert_clean();
                break;
            }
            assert!(Instant::now() < deadline, "the server's probes did not finish: {ok:?} {closed_state:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        server.stop();
    }
    std::fs::remove_file(runtimes.join("50-py-closed.toml")).unwrap();
    eprintln!("[{:5.1}s] probes checked", started.elapsed().as_secs_f64());

    // The image: the Python root, a layer of test files, a layer of whiteouts,
    // and a version file, pushed as tag 1.
    let python_root = python_root_layer(&settings, env.work.path());
    let version = |v: &str| tar_of(&[("opt/", ""), ("opt/version.txt", v)]);
    let image = Image::new(&[python_root.clone(), lower_extra(), upper_layer(), version("A\n")]);
    let good = format!("{host}/tvm/python:1");
    let digest = image.push(&good);
    eprintln!("[{:5.1}s] pushed {good} {digest}", started.elapsed().as_secs_f64());
    overlay(&runtimes, "py-oci", &good);

    // Without credentials the registry refuses the pull.
    let nobody = env.work.path().join("no-docker-config");
    std::fs::create_dir_all(&nobody).unwrap();
    let mut cmd = tvm(&nobody);
    cmd.args(["image", "build", "py-oci"]);
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    assert!(!out.status.success() && text.contains("pulling") && text.contains("failed"), "{text}");
    assert_not_cached(&settings, &good, pid);

    let out = tvm(&docker).args(["image", "build", "py-oci"]).output().unwrap();
    assert!(out.status.success(), "image build: {} {}", lossy(&out.stdout), lossy(&out.stderr));
    let built = pyrovm::image::find_image(&settings, &ImageRecipe::oci(&good)).unwrap();
    assert_eq!(built.meta.manifest_digest.as_deref(), Some(digest.as_str()));
    // Keyed by the manifest digest the tag resolved to, not by the tag's text.
    let pinned_a = format!("{host}/tvm/python@{digest}");
    assert_eq!(built.meta.oci_reference.as_deref(), Some(pinned_a.as_str()));
    assert_eq!(built.key, pinned_key(&pinned_a));
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), lossy(&out.stdout).trim_end());

    let prog = env.file(
        "main.py",
        "import os\nfor p in ['lower.txt', 'removed.txt', 'upper.txt']:\n    print(p, os.path.exists('/opt/tvm/' + p))\n\
         print(sorted(os.listdir('/opt/opq')))\nprint(open('/etc/hostname').read().strip())\nprint(open('/opt/version.txt').read().strip())\n",
    );
    let run_prog = || {
        let out = tvm(&docker)
            .args(["run", "--json", "--runtime", "py-oci", "--time-limit", "60s"])
            .arg(&prog)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", lossy(&out.stdout), lossy(&out.stderr)));
        env.assert_clean();
        assert_eq!(v["run"]["exit_code"], 0, "{v}");
        eprintln!("[{:5.1}s] ran: {:?}", started.elapsed().as_secs_f64(), stdout_of(&v));
        stdout_of(&v)
    };
    assert_eq!(run_prog(), "lower.txt True\nremoved.txt False\nupper.txt True\n['new.txt']\ntvm\nA\n");

    // The tag moves to new content: `tvm image build` asks the registry again and
    // builds a new image, which the program then sees. The same content under
    // another tag is the same image (found, not built).
    let moved = Image::new(&[python_root, lower_extra(), upper_layer(), version("B\n")]);
    let digest_b = moved.push(&good);
    assert_ne!(digest_b, digest);
    let out = tvm(&docker).args(["image", "build", "py-oci"]).output().unwrap();
    assert!(out.status.success(), "image build: {} {}", lossy(&out.stdout), lossy(&out.stderr));
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), lossy(&out.stdout).trim_end());
    let pinned_b = format!("{host}/tvm/python@{digest_b}");
    let rebuilt = pyrovm::image::find_image(&settings, &ImageRecipe::oci(&good)).unwrap();
    assert_eq!(
        (rebuilt.key.as_str(), rebuilt.meta.manifest_digest.as_deref()),
        (pinned_key(&pinned_b).as_str(), Some(digest_b.as_str()))
    );
    assert!(lossy(&out.stdout).contains(&format!("built  {}", rebuilt.key)), "{}", lossy(&out.stdout));
    assert!(run_prog().ends_with("\nB\n"));
    let other_tag = format!("{host}/tvm/python:other");
    assert_eq!(moved.push(&other_tag), digest_b);
    overlay(&runtimes, "py-other-tag", &other_tag);
    let out = tvm(&docker).args(["image", "build", "py-other-tag"]).output().unwrap();
    assert!(out.status.success(), "image build: {} {}", lossy(&out.stdout), lossy(&out.stderr));
    assert!(lossy(&out.stdout).contains(&format!("cached {}", rebuilt.key)), "{}", lossy(&out.stdout));
    let out = tvm(&docker).args(["image", "list"]).output().unwrap();
    let list = lossy(&out.stdout);
    let line = list.lines().find(|l| l.starts_with(&rebuilt.key)).unwrap_or_else(|| panic!("{list}"));
    assert!(
        line.contains(&format!("{good}, {other_tag} -> {digest_b}")) && line.contains("py-oci,py-other-tag"),
        "{line}"
    );
    eprintln!("[{:5.1}s] {line}", started.elapsed().as_secs_f64());
    let _ = pyrovm::image::remove_image(&settings, &pinned_key(&pinned_a));
    remove(&settings, &good);

    // An image without the command the runtime's run stage starts: `python3` is a
    // symlink climbing out of the root to the host's `/usr/bin/python3`, which must
    // be resolved inside the image (where nothing is) and refused before packing.
    let lacking = Image::new(&[tar_with_links(&[
        ("etc/", ""),
        ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ("usr/", ""),
        ("usr/local/", ""),
        ("usr/local/bin/", ""),
        ("usr/local/bin/python3", "->../../../../../../../usr/bin/python3"),
        ("usr/bin/", ""),
        ("usr/bin/env", "#!not really\n"),
    ])]);
    let no_cmd = format!("{host}/tvm/no-python:1");
    let digest_n = lacking.push(&no_cmd);
    overlay_running(&runtimes, "py-nocmd", &no_cmd, "python3");
    let mut cmd = tvm(&docker);
    cmd.args(["image", "build", "py-nocmd"]);
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    let want = format!(
        "the OCI image {host}/tvm/no-python@{digest_n} has no executable python3 for runtime py-nocmd \
         (looked for PATH /usr/local/bin:/usr/bin:/bin)"
    );
    assert!(!out.status.success() && text.contains(&want), "{text}");
    assert_not_cached(&settings, &no_cmd, pid);
    let key = pinned_key(&format!("{host}/tvm/no-python@{digest_n}"));
    assert!(!settings.cache_dir.join("images").join(format!("{key}.erofs")).exists());
    std::fs::remove_file(runtimes.join("50-py-nocmd.toml")).unwrap();

    // An image from an OCI layout, and from a tarball of it (what `docker save`
    // writes). A small one: the whiteouts were checked in the VM above, and
    // a Python root would cost two more erofs packs.
    let layout = env.work.path().join("layout");
    let imported = "tvm.invalid/tvm/files:1";
    // The runtime's command must be in it (checked before packing): an executable
    // file under the name the overlay's run stage starts (no VM runs this image).
    let python = Catalog::builtin().get("python").unwrap().run[0].clone();
    let exe = format!("usr/bin/{python}");
    let command_file = tar_with_links(&[("usr/", ""), ("usr/bin/", ""), (exe.as_str(), "#!/bin/sh\n")]);
    let files = Image::new(&[lower_extra(), upper_layer(), command_file]);
    let layout_digest = files.write_layout(&layout, imported);
    overlay(&runtimes, "py-import", imported);
    let out = tvm(&nobody).args(["image", "import"]).arg(&layout).arg("py-import").output().unwrap();
    assert!(out.status.success(), "import: {} {}", lossy(&out.stdout), lossy(&out.stderr));
    assert!(lossy(&out.stdout).contains(&layout_digest), "{}", lossy(&out.stdout));
    assert_eq!(files_in(&settings, imported, env.work.path()), ["opq/new.txt", "tvm/lower.txt", "tvm/upper.txt"]);
    remove(&settings, imported);
    let tarball = env.work.path().join("saved.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    drop(b);
    let out = tvm(&nobody).args(["image", "import"]).arg(&tarball).arg("py-import").output().unwrap();
    assert!(out.status.success(), "import tar: {} {}", lossy(&out.stdout), lossy(&out.stderr));
    assert!(lossy(&out.stdout).contains(&layout_digest), "{}", lossy(&out.stdout));
    remove(&settings, imported);

    // A layout whose layer does not match its digest.
    let hex = sha256(&files.layers[0]).strip_prefix("sha256:").unwrap().to_string();
    let layer = layout.join("blobs/sha256").join(hex);
    let mut data = std::fs::read(&layer).unwrap();
    data[20] ^= 0xff;
    std::fs::write(&layer, data).unwrap();
    let mut cmd = tvm(&nobody);
    cmd.args(["image", "import"]).arg(&layout).arg("py-import");
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    assert!(!out.status.success() && text.contains("does not match its digest"), "{text}");
    assert_not_cached(&settings, imported, pid);

    // A tampered blob: the registry serves bytes that do not match the digest.
    let small = Image::new(&[tar_of(&[("etc/", ""), ("etc/passwd", "root:x:0:0::/root:/bin/sh\n")])]);
    let tampered = format!("{host}/tvm/tampered:1");
    small.push(&tampered);
    let blob = registry.blob_file(&sha256(&small.layers[0]));
    let mut data = std::fs::read(&blob).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&blob, data).unwrap();
    overlay(&runtimes, "py-tampered", &tampered);
    let mut cmd = tvm(&docker);
    cmd.args(["image", "build", "py-tampered"]);
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    assert!(!out.status.success() && text.to_lowercase().contains("digest"), "{text}");
    assert_not_cached(&settings, &tampered, pid);

    // A layer that climbs out of the root.
    let escape = Image::new(&[tar_of(&[("../../../tmp/tvm-oci-escape", "x")])]);
    let traversal = format!("{host}/tvm/escape:1");
    escape.push(&traversal);
    overlay(&runtimes, "py-escape", &traversal);
    let mut cmd = tvm(&docker);
    cmd.args(["image", "build", "py-escape"]);
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    assert!(!out.status.success() && text.contains("escape the root"), "{text}");
    assert!(!Path::new("/tmp/tvm-oci-escape").exists());
    assert_not_cached(&settings, &traversal, pid);

    // The registry dies while a 4 MiB incompressible layer is being pulled.
    let mut noise = vec![0u8; 4 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let big = Image::new(&[tar_file("noise.bin", &noise)]);
    big.push(&format!("{host}/tvm/big:1"));
    let (proxy, killed) = killing_proxy(&registry);
    let dying = format!("127.0.0.1:{proxy}/tvm/big:1");
    let docker2 = docker_config(&env.work.path().join("d2"), &[format!("127.0.0.1:{proxy}")]);
    overlay(&runtimes, "py-dying", &dying);
    let mut cmd = tvm(&docker2);
    cmd.args(["image", "build", "py-dying"]);
    let (out, pid) = run_with_pid(cmd);
    let text = lossy(&out.stdout);
    eprintln!("[{:5.1}s] {}", started.elapsed().as_secs_f64(), text.trim_end());
    assert!(killed.load(Ordering::SeqCst), "the proxy never saw the blob: {text}");
    assert!(!out.status.success() && text.contains("pulling"), "{text}");
    assert_not_cached(&settings, &dying, pid);
}
