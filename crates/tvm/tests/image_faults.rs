//! Faults in the image cache: a build killed mid-way (tvm and mmdebstrap
//! SIGKILLed together while the chroot has /proc, /sys and /dev mounted), a
//! server stopped (SIGTERM) during its background build, `tvm kernel build`
//! stopped by SIGTERM, and a cache disk that fills up. Each uses a private cache dir; afterwards no
//! build process, mount or scratch dir may remain (after the sweep the next
//! build runs, for the killed one).
//!
//! The private cache is removed with `pyrovm::cache::remove_tree`, never
//! `remove_dir_all`: a leftover bind mount of /dev must be detached, not
//! emptied.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Env;

/// A private cache dir, optionally a tiny tmpfs; detached and removed safely on drop.
struct CacheDir {
    path: PathBuf,
    tmpfs: bool,
}

impl CacheDir {
    fn new(tmpfs_size: Option<&str>) -> Self {
        Self::named(if tmpfs_size.is_some() { "true" } else { "false" }, tmpfs_size)
    }

    /// A cache dir of its own for each test (tests of this file run in parallel).
    fn named(label: &str, tmpfs_size: Option<&str>) -> Self {
        let path = std::env::temp_dir().join(format!("tvm-image-fault-{}-{label}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        if let Some(size) = tmpfs_size {
            let data = format!("size={size}");
            nix::mount::mount(Some("tmpfs"), &path, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(data.as_str()))
                .unwrap();
        }
        Self { path, tmpfs: tmpfs_size.is_some() }
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = pyrovm::cache::remove_tree(&self.path.join("tmp"));
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = pyrovm::cache::remove_tree(&self.path);
    }
}

fn mounts_under(dir: &Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&needle) && *m != needle)
        .count()
}

/// Processes whose command line mentions `dir` (tvm, mmdebstrap, apt in the chroot).
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

fn scratch_dirs(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("tmp")).map(|d| d.count()).unwrap_or(0)
}

fn image_build(env: &Env, cache: &Path) -> std::process::Command {
    let mut c = env.tvm();
    c.args(["image", "build", "python"])
        .env("TVM_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    c
}

/// Fault: the image cache is stopped mid-build the hard way: `tvm image
/// build` and mmdebstrap SIGKILLed together while mmdebstrap has /proc,
/// /sys and /dev mounted in its chroot. Expected: nothing keeps running; the
/// stale scratch dir and its mounts are swept (mounts detached, never
/// followed) by the next cache user.
#[test]
fn image_build_killed_mid_way_leaves_nothing_after_the_sweep() {
    let env = Env::new();
    let cache = CacheDir::new(None);
    let mounts_before = mounts_under(&cache.path);
    let mut child = image_build(&env, &cache.path).spawn().unwrap();
    let t = Instant::now();
    // Wait for the chroot phase (mounts inside the scratch root), or the end.
    while mounts_under(&cache.path) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "build ended before its chroot phase");
        assert!(t.elapsed() < Duration::from_secs(300), "no chroot mounts after 5 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounted = mounts_under(&cache.path);
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while !processes_mentioning(&cache.path).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "build processes survive: {:?}",
            processes_mentioning(&cache.path)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "killed with {mounted} mounts in the chroot; now {} mounts, {} scratch dirs",
        mounts_under(&cache.path),
        scratch_dirs(&cache.path)
    );
    assert_eq!(scratch_dirs(&cache.path), 1, "a SIGKILLed build cannot clean up");

    // The sweep every build starts with.
    let removed = pyrovm::cache::Cache::new(&cache.path).sweep_stale_scratch();
    assert_eq!(removed, 1);
    assert_eq!(scratch_dirs(&cache.path), 0);
    assert_eq!(mounts_under(&cache.path), mounts_before, "leftover chroot mounts detached");
    assert!(
        std::fs::read_dir(cache.path.join("images")).map(|d| d.count()).unwrap_or(0) == 0,
        "no half image published"
    );
}

/// Fault: the cache disk fills up mid-build (a 64 MiB tmpfs as the cache).
/// Expected: a clear error naming the lack of space, exit status non-zero,
/// and no scratch dir, mount or process left.
#[test]
fn full_cache_disk_fails_the_build_cleanly() {
    let env = Env::new();
    let cache = CacheDir::new(Some("64m"));
    let out = image_build(&env, &cache.path).stdout(Stdio::piped()).output().unwrap();
    // The per-runtime summary (with the cause) is on stdout, progress on stderr.
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("FAILED") && err.contains("No space left on device"), "{err}");
    assert!(processes_mentioning(&cache.path).is_empty());
    assert_eq!(scratch_dirs(&cache.path), 0, "{err}");
    assert_eq!(mounts_under(&cache.path), 0);
}

/// Links the shared cache's guest kernel into `cache`, so a server can start
/// there without building one (the kernel is only read).
fn link_kernel(cache: &Path) {
    let shared = tvm_config::Settings::load().unwrap();
    let kernel = pyrovm::kernel::find_kernel(&shared)
        .unwrap()
        .unwrap_or_else(|| panic!("no guest kernel in {}: run `tvm kernel build`", shared.cache_dir.display()));
    let dir = kernel.bzimage.parent().unwrap();
    std::fs::create_dir_all(cache.join("kernel")).unwrap();
    std::os::unix::fs::symlink(dir, cache.join("kernel").join(&kernel.key)).unwrap();
}

/// Hard-links the shared cache's downloaded packages into `cache`, so a build
/// there reaches its chroot phase without downloading (the shared files are
/// never written: apt only adds and removes names). Nothing is linked across
/// filesystems; the build then downloads.
fn link_debs(cache: &Path) {
    let shared = tvm_config::Settings::load().unwrap().cache_dir.join("debs");
    let Ok(suites) = std::fs::read_dir(&shared) else { return };
    for suite in suites.flatten() {
        let to = cache.join("debs").join(suite.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for deb in std::fs::read_dir(suite.path()).unwrap().flatten() {
            if deb.file_type().is_ok_and(|t| t.is_file())
                && std::fs::hard_link(deb.path(), to.join(deb.file_name())).is_err()
            {
                return;
            }
        }
    }
}

/// Starts `tvm ARGS` on a private cache holding the shared kernel and
/// packages but no image, sends `signal` once its image build is in the
/// chroot phase (the package cache bound in, /proc, /sys and /dev mounted in
/// the new root), and checks that at exit no build process, scratch dir or
/// mount is left, without any later sweep. Returns the exit status and stderr.
fn stop_mid_build(label: &str, args: &[&str], signal: nix::sys::signal::Signal) -> (std::process::ExitStatus, String) {
    let env = Env::new();
    let cache = CacheDir::named(label, None);
    link_kernel(&cache.path);
    link_debs(&cache.path);
    let mounts_before = mounts_under(&cache.path);
    let mut child = env
        .tvm()
        .args(args)
        .env("TVM_CACHE_DIR", &cache.path)
        .env("TVM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let t = Instant::now();
    while mounts_under(&cache.path) < 3 {
        if child.try_wait().unwrap().is_some() {
            panic!("tvm {args:?} ended before its build's chroot phase:\n{}", log.join().unwrap());
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no chroot mounts after 5 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounted = mounts_under(&cache.path);
    assert_eq!(scratch_dirs(&cache.path), 1, "one build running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "tvm {args:?} still running 60 s after {signal}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = log.join().unwrap();
    eprintln!("tvm {args:?}: {signal} with {mounted} build mounts; exited {status}");
    // Checked right at exit: no sweep has run since.
    assert_eq!(processes_mentioning(&cache.path), Vec::<u32>::new(), "build processes survive");
    assert_eq!(scratch_dirs(&cache.path), 0, "scratch dir left behind\n{log}");
    assert_eq!(mounts_under(&cache.path), mounts_before, "mounts left behind\n{log}");
    assert!(
        std::fs::read_dir(cache.path.join("images")).map(|d| d.count()).unwrap_or(0) == 0,
        "no half image published"
    );
    (status, log)
}

/// Fault: `tvm serve` gets SIGTERM while it builds a missing image in the
/// background (every image is missing from its cache). Expected: the drain
/// cancels the build and removes what it made before the process exits 0.
#[test]
fn serve_stopped_mid_build_cancels_it_and_leaves_nothing() {
    let (status, log) =
        stop_mid_build("serve", &["serve", "--listen", "127.0.0.1:0"], nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "a drained server exits 0: {status}\n{log}");
    assert!(log.contains("cancelling the image build"), "{log}");
}

/// Sibling: `tvm image build` stopped by Ctrl-C (SIGINT; SIGTERM takes the
/// same path, `pyroshell::shutdown_signal`) mid-build. Expected: the build is
/// cancelled and cleaned up the same way; exit 130.
#[test]
fn image_build_interrupted_cleans_up_before_exit() {
    let (status, log) = stop_mid_build("int", &["image", "build", "python"], nix::sys::signal::Signal::SIGINT);
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("was cancelled and cleaned up"), "{log}");
}

/// Processes working in `dir` or naming it (the kernel build's tar, make and
/// compilers run in the source tree inside the scratch directory).
fn processes_in(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = processes_mentioning(dir);
    pids.extend(
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))),
    );
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Fault: `tvm kernel build` gets SIGTERM (what `timeout`, CI cancellation
/// and systemd send) once the source is unpacked and configured in its
/// scratch directory (~1.5 GB when compiled). Expected: the build's tools are
/// killed and the scratch directory is removed before tvm exits 143, without
/// any later sweep, and no kernel is published. Deleting the unpacked tree
/// (~75,000 files) is most of the wait: seconds on an idle host, but 60 s
/// was not enough at a load average of 15 (the arm64 suite's SIGTERMed
/// build, 70% compiled, took ~150 s there), hence the generous bound.
#[test]
fn kernel_build_stopped_cleans_up_before_exit() {
    let env = Env::new();
    let cache = CacheDir::named("kernel", None);
    let mut child = env
        .tvm()
        .args(["kernel", "build"])
        .env("TVM_CACHE_DIR", &cache.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    // The configured tree: `.config` in the scratch directory's source tree.
    let configured = || {
        std::fs::read_dir(cache.path.join("tmp"))
            .map(|d| d.flatten().any(|e| e.path().join("src/.config").is_file()))
            .unwrap_or(false)
    };
    let t = Instant::now();
    while !configured() {
        if child.try_wait().unwrap().is_some() {
            panic!("tvm kernel build ended before configuring:\n{}", log.join().unwrap());
        }
        assert!(t.elapsed() < Duration::from_secs(600), "no configured source tree after 10 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(scratch_dirs(&cache.path), 1, "one build running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "tvm kernel build still running 600 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = log.join().unwrap();
    eprintln!("tvm kernel build: exited {status} {:.1} s after SIGTERM", t.elapsed().as_secs_f64());
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("the kernel build was cancelled and cleaned up"), "{log}");
    // Checked right at exit: no sweep has run since.
    assert_eq!(processes_in(&cache.path), Vec::<u32>::new(), "build processes survive");
    assert_eq!(scratch_dirs(&cache.path), 0, "scratch dir left behind\n{log}");
    assert!(
        std::fs::read_dir(cache.path.join("kernel")).map(|d| d.count()).unwrap_or(0) == 0,
        "no half kernel published"
    );
}

/// `tvm image build --defaults` for aarch64 guests (what the Lima VM of an
/// Apple silicon Mac runs at its first boot) skips the defaults whose catalog
/// entry lacks aarch64 with the reason, rather than building images no
/// execution may use (or failing the provisioning on them). The mirror is
/// unreachable, so the supported ones fail at once: only which were tried
/// matters here.
#[test]
fn defaults_for_another_architecture_skip_what_it_lacks() {
    let env = Env::new();
    let cache = CacheDir::named("arm64-defaults", None);
    let out = env
        .tvm()
        .args(["image", "build", "--defaults", "--no-templates", "--jobs", "1"])
        .env("TVM_CACHE_DIR", &cache.path)
        .env("TVM_GUEST_ARCH", "aarch64")
        .env("TVM_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
        .output()
        .unwrap();
    let stdout = common::lossy(&out.stdout);
    let catalog = tvm_config::Catalog::builtin();
    let defaults: Vec<_> = catalog.runtimes().iter().filter(|r| tvm_config::matrix::is_default(&catalog, r)).collect();
    let (supported, lacking): (Vec<&tvm_config::Runtime>, Vec<&tvm_config::Runtime>) =
        defaults.into_iter().partition(|r| r.architectures.contains(&tvm_config::GuestArch::Aarch64));
    assert!(!lacking.is_empty() && !supported.is_empty(), "{supported:?} / {lacking:?}");
    for r in &lacking {
        let line = format!(
            "unavailable: not supported on aarch64 guests (architectures: {})",
            tvm_config::matrix::architectures_of(r)
        );
        assert!(stdout.lines().any(|l| l.starts_with(&r.id) && l.contains(&line)), "{}: no {line:?} in {stdout}", r.id);
        assert!(!stdout.lines().any(|l| l.starts_with(&r.id) && l.contains("FAILED")), "{} was tried: {stdout}", r.id);
    }
    for r in &supported {
        assert!(stdout.lines().any(|l| l.starts_with(&r.id) && l.contains("FAILED")), "{} not tried: {stdout}", r.id);
    }
    assert_eq!(out.status.code(), Some(1), "the supported ones failed (no mirror): {stdout}");
    assert_eq!(scratch_dirs(&cache.path), 0);
    assert_eq!(mounts_under(&cache.path), 0);
}
