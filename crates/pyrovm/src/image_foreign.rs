//! Roots of another architecture than the build host's, assembled without
//! emulation ([`tvm_config::Assembly::Extracted`]).
//!
//! mmdebstrap's `extract` variant unpacks the essential set and the recipe's
//! packages without running a single maintainer script; running them would
//! mean one qemu-user process per command they start (the arm64 Python
//! image took 36 minutes that way on 2 cores). What those scripts set up
//! that a guest needs is done here by the build host instead:
//!
//! - the dpkg database (`/var/lib/dpkg/status`) from the packages' control
//!   files, so `dpkg-query` in and outside the image sees what is installed;
//! - `/etc/passwd` and `/etc/group` from base-passwd's master files
//!   (base-passwd's postinst), `/etc/shells` (`add-shell` of bash and dash);
//! - base-files' defaults: `/etc/profile`, `/etc/motd`, root's dot files,
//!   `/mnt`, `/srv`, `/opt`, `/media`, `/run/lock`,
//!   the `/usr/local` tree;
//! - `/etc/localtime` as tzdata's postinst sets it without a debconf answer
//!   (`Etc/UTC`);
//! - the CA store as `update-ca-certificates` writes it: the list in
//!   `/etc/ca-certificates.conf`, a `.pem` link per certificate, the bundle
//!   `ca-certificates.crt` and the OpenSSL hash links (hashes from the host's
//!   `openssl`: certificates are not architecture-specific);
//! - alternatives registered with literal arguments by `update-alternatives
//!   --install` in postinst scripts (awk, which, pager, ...): the highest
//!   priority wins, as in auto mode;
//! - Python byte-code for each `python3.N` in the root: one `compileall` of
//!   its standard library and `dist-packages`, run emulated by an explicit
//!   `qemu-<arch>-static` (a single process; no binfmt_misc needed). `.pyc`
//!   files are architecture-independent.
//!
//! Not done: `ldconfig` (glibc's loader searches the multiarch directories
//! without a cache), debconf's database, triggers, services. A catalog entry
//! lists an architecture only once its programs were run on it.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{debug, info};
use tvm_config::GuestArch;

use super::{io_err, tool_failed, ImageBuildError};
use crate::cache::{remove_tree, run_cancellable, run_streaming, which, BuildCancel};

/// Host tools the extracted assembly runs, with the Debian package of each.
pub(crate) const TOOLS: &[(&str, &str)] = &[("dpkg-deb", "dpkg"), ("openssl", "openssl")];

/// Where tzdata's postinst points `/etc/localtime` without a debconf answer.
const DEFAULT_ZONE: &str = "/usr/share/zoneinfo/Etc/UTC";

/// Login shells `add-shell` registers for the essential set (bash, dash),
/// in the order Debian's `/etc/shells` lists them; only those present are written.
const SHELLS: &[&str] =
    &["/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/bash", "/bin/rbash", "/usr/bin/rbash", "/usr/bin/dash"];

/// base-files' postinst: defaults copied into place when absent.
const BASE_FILES: &[(&str, &str)] = &[
    ("dot.profile", "root/.profile"),
    ("dot.bashrc", "root/.bashrc"),
    ("profile", "etc/profile"),
    ("motd", "etc/motd"),
];

/// base-files' postinst: top-level directories with their modes.
const BASE_DIRS: &[(&str, u32)] = &[
    ("mnt", 0o755),
    ("srv", 0o755),
    ("opt", 0o755),
    ("etc/opt", 0o755),
    ("var/opt", 0o755),
    ("media", 0o755),
    ("run/lock", 0o1777),
];

/// base-files' postinst: `/usr/local` and its standard subdirectories.
const LOCAL_DIRS: &[&str] = &[
    "usr/local/bin",
    "usr/local/etc",
    "usr/local/games",
    "usr/local/include",
    "usr/local/lib",
    "usr/local/libexec",
    "usr/local/man",
    "usr/local/sbin",
    "usr/local/share",
    "usr/local/src",
];

/// Sets up, natively, what the maintainer scripts of the packages unpacked
/// into `root` would have (the module docs list it). `control` holds one
/// directory per package with its control files (`dpkg-deb --control`);
/// `arch` is the root's architecture, for the emulated byte-compilation.
///
/// # Errors
/// [`ImageBuildError::Io`] for filesystem work, [`ImageBuildError::ToolMissing`]
/// without `qemu-<arch>-static` when the root has Python,
/// [`ImageBuildError::Configure`] when openssl or the byte-compilation fails,
/// [`ImageBuildError::Cancelled`] when `cancel` fires.
pub(crate) fn configure(
    root: &Path,
    control: &[PathBuf],
    arch: GuestArch,
    cancel: &BuildCancel,
) -> Result<(), ImageBuildError> {
    write_status(root, control)?;
    accounts(root)?;
    base_files(root)?;
    time_zone(root)?;
    ca_store(root)?;
    alternatives(root, control)?;
    byte_compile(root, arch, cancel)
}

/// `dpkg-deb --control` of each package in `debs` into `dir/<n>`; the
/// directories in the order of `debs`.
///
/// # Errors
/// [`ImageBuildError::Configure`] when dpkg-deb fails, [`ImageBuildError::Io`].
pub(crate) fn unpack_control(debs: &[PathBuf], dir: &Path) -> Result<Vec<PathBuf>, ImageBuildError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let mut dirs = Vec::with_capacity(debs.len());
    for (i, deb) in debs.iter().enumerate() {
        let out = dir.join(i.to_string());
        let mut c = Command::new("dpkg-deb");
        c.arg("--control").arg(deb).arg(&out);
        run_streaming(&mut c, |_| {}, |_| {}).map_err(|e| ImageBuildError::Configure {
            step: "reading the control files of the packages",
            tail: format!("{}: {}", deb.display(), e.describe()),
        })?;
        dirs.push(out);
    }
    Ok(dirs)
}

/// `/var/lib/dpkg/status`: each package's control paragraph, marked installed.
fn write_status(root: &Path, control: &[PathBuf]) -> Result<(), ImageBuildError> {
    let mut status = String::new();
    for dir in control {
        let file = dir.join("control");
        let text = std::fs::read_to_string(&file).map_err(io_err("reading", &file))?;
        status.push_str(&status_paragraph(&text));
    }
    let path = root.join("var/lib/dpkg/status");
    std::fs::create_dir_all(root.join("var/lib/dpkg")).map_err(io_err("creating", &root.join("var/lib/dpkg")))?;
    std::fs::write(&path, status).map_err(io_err("writing", &path))
}

/// A control file as a dpkg status paragraph: `Status: install ok installed`
/// after the `Package:` line, a blank line after it.
fn status_paragraph(control: &str) -> String {
    let mut out = String::new();
    for line in control.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("Package:") {
            out.push_str("Status: install ok installed\n");
        }
    }
    out.push('\n');
    out
}

/// base-passwd's postinst: `/etc/passwd` and `/etc/group` from its master
/// files when absent; `/etc/shells` with the shells present.
fn accounts(root: &Path) -> Result<(), ImageBuildError> {
    for (master, target) in [("passwd.master", "etc/passwd"), ("group.master", "etc/group")] {
        let (from, to) = (root.join("usr/share/base-passwd").join(master), root.join(target));
        if from.is_file() && !to.exists() {
            std::fs::copy(&from, &to).map_err(io_err("copying to", &to))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err("setting permissions of", &to))?;
        }
    }
    let shells = root.join("etc/shells");
    if !shells.exists() {
        let mut text = String::from("# /etc/shells: valid login shells\n");
        for s in SHELLS.iter().filter(|s| root.join(s.trim_start_matches('/')).exists()) {
            text.push_str(s);
            text.push('\n');
        }
        std::fs::write(&shells, text).map_err(io_err("writing", &shells))?;
    }
    Ok(())
}

/// base-files' postinst: default files and the `/usr/local` tree.
fn base_files(root: &Path) -> Result<(), ImageBuildError> {
    let defaults = root.join("usr/share/base-files");
    if !defaults.is_dir() {
        return Ok(());
    }
    for (from, to) in BASE_FILES {
        let (from, to) = (defaults.join(from), root.join(to));
        if from.is_file() && !to.exists() {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            }
            std::fs::copy(&from, &to).map_err(io_err("copying to", &to))?;
        }
    }
    for (dir, mode) in BASE_DIRS {
        let p = root.join(dir);
        if !p.is_dir() {
            std::fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                .map_err(io_err("setting permissions of", &p))?;
        }
    }
    for dir in LOCAL_DIRS {
        let p = root.join(dir);
        std::fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
    }
    Ok(())
}

/// tzdata's postinst without a debconf answer: `/etc/localtime` -> `Etc/UTC`.
fn time_zone(root: &Path) -> Result<(), ImageBuildError> {
    let link = root.join("etc/localtime");
    if root.join(DEFAULT_ZONE.trim_start_matches('/')).is_file() && link.symlink_metadata().is_err() {
        symlink(DEFAULT_ZONE, &link).map_err(io_err("linking", &link))?;
    }
    Ok(())
}

/// `update-ca-certificates` as ca-certificates' postinst runs it: every
/// certificate under `/usr/share/ca-certificates` enabled in
/// `/etc/ca-certificates.conf`, linked as `/etc/ssl/certs/<name>.pem`,
/// concatenated into `ca-certificates.crt`, and reachable by OpenSSL's
/// `<subject hash>.<n>` links.
fn ca_store(root: &Path) -> Result<(), ImageBuildError> {
    let store = root.join("usr/share/ca-certificates");
    if !store.is_dir() {
        return Ok(());
    }
    let mut certs = Vec::new();
    collect_certs(&store, &store, &mut certs)?;
    certs.sort();
    let certs_dir = root.join("etc/ssl/certs");
    std::fs::create_dir_all(&certs_dir).map_err(io_err("creating", &certs_dir))?;
    let mut conf = String::from(
        "# Automatically generated by TVM (as update-ca-certificates does): every\n\
         # certificate under /usr/share/ca-certificates is enabled.\n",
    );
    let mut bundle = Vec::new();
    let mut hashes: BTreeMap<String, u32> = BTreeMap::new();
    for rel in &certs {
        conf.push_str(rel);
        conf.push('\n');
        let file = store.join(rel);
        let name = Path::new(rel).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let pem = format!("{name}.pem");
        let link = certs_dir.join(&pem);
        remove_tree(&link).map_err(io_err("removing", &link))?;
        symlink(Path::new("/usr/share/ca-certificates").join(rel), &link).map_err(io_err("linking", &link))?;
        let text = std::fs::read(&file).map_err(io_err("reading", &file))?;
        bundle.extend_from_slice(&text);
        if !text.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        let hash = subject_hash(&file)?;
        let n = hashes.entry(hash.clone()).or_insert(0);
        let hash_link = certs_dir.join(format!("{hash}.{n}"));
        *n += 1;
        remove_tree(&hash_link).map_err(io_err("removing", &hash_link))?;
        symlink(&pem, &hash_link).map_err(io_err("linking", &hash_link))?;
    }
    let conf_path = root.join("etc/ca-certificates.conf");
    std::fs::write(&conf_path, conf).map_err(io_err("writing", &conf_path))?;
    let bundle_path = certs_dir.join("ca-certificates.crt");
    std::fs::write(&bundle_path, bundle).map_err(io_err("writing", &bundle_path))?;
    info!(certificates = certs.len(), "CA store written");
    Ok(())
}

/// The `.crt` files under `dir`, as paths relative to `base`.
fn collect_certs(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ImageBuildError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("reading", &path))?;
        if kind.is_dir() {
            collect_certs(base, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "crt") {
            if let Ok(rel) = path.strip_prefix(base) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    Ok(())
}

/// OpenSSL's subject name hash of the certificate in `file` (8 hex digits).
fn subject_hash(file: &Path) -> Result<String, ImageBuildError> {
    let mut out = Vec::new();
    let mut c = Command::new("openssl");
    c.args(["x509", "-noout", "-subject_hash", "-in"]).arg(file);
    run_streaming(&mut c, |l| out.push(l.trim().to_string()), |_| {}).map_err(|e| ImageBuildError::Configure {
        step: "hashing the CA certificates",
        tail: format!("{}: {}", file.display(), e.describe()),
    })?;
    match out.first() {
        Some(h) if h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h.clone()),
        _ => Err(ImageBuildError::Configure {
            step: "hashing the CA certificates",
            tail: format!("{}: openssl printed {out:?}", file.display()),
        }),
    }
}

/// One `update-alternatives --install` of a postinst: the link group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alternative {
    /// The generic name (`awk`).
    name: String,
    /// The public link (`/usr/bin/awk`).
    link: String,
    /// The file it resolves to (`/usr/bin/mawk`).
    path: String,
    /// Priority; the highest wins.
    priority: i64,
    /// `(link, name, path)` of each `--slave`.
    slaves: Vec<(String, String, String)>,
}

/// The alternatives `script` installs with literal arguments; calls with
/// shell variables or substitutions are left out (nothing can be known of them).
fn parse_alternatives(script: &str) -> Vec<Alternative> {
    // Continuation lines joined, so one call is one line.
    let joined = script.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.windows(2).position(|w| w[0].ends_with("update-alternatives") && w[1] == "--install")
        else {
            continue;
        };
        let args: Vec<&str> =
            words[at + 2..].iter().copied().take_while(|w| !matches!(*w, ";" | "||" | "&&" | "|")).collect();
        if args.iter().any(|w| w.contains(['$', '`', '"', '\'', '*'])) || args.len() < 4 {
            debug!(line, "alternative with non-literal arguments left out");
            continue;
        }
        let Ok(priority) = args[3].trim_end_matches(';').parse() else { continue };
        let mut alt = Alternative {
            link: args[0].into(),
            name: args[1].into(),
            path: args[2].into(),
            priority,
            slaves: Vec::new(),
        };
        let mut rest = &args[4..];
        while rest.len() >= 4 && rest[0] == "--slave" {
            alt.slaves.push((rest[1].into(), rest[2].into(), rest[3].trim_end_matches(';').into()));
            rest = &rest[4..];
        }
        found.push(alt);
    }
    found
}

/// update-alternatives in auto mode for every alternative the packages'
/// postinst scripts install with literal arguments whose target is in the
/// root: `/etc/alternatives/<name>` -> target, the public link ->
/// `/etc/alternatives/<name>`, slaves likewise when their target exists.
fn alternatives(root: &Path, control: &[PathBuf]) -> Result<(), ImageBuildError> {
    let mut best: BTreeMap<String, Alternative> = BTreeMap::new();
    for dir in control {
        let Ok(script) = std::fs::read_to_string(dir.join("postinst")) else { continue };
        for alt in parse_alternatives(&script) {
            if !root.join(alt.path.trim_start_matches('/')).exists() {
                continue;
            }
            if best.get(&alt.name).is_none_or(|b| alt.priority > b.priority) {
                best.insert(alt.name.clone(), alt);
            }
        }
    }
    let etc = root.join("etc/alternatives");
    std::fs::create_dir_all(&etc).map_err(io_err("creating", &etc))?;
    for alt in best.values() {
        let groups =
            std::iter::once((&alt.link, &alt.name, &alt.path)).chain(alt.slaves.iter().map(|(l, n, p)| (l, n, p)));
        for (link, name, path) in groups {
            if !root.join(path.trim_start_matches('/')).exists() || name.contains('/') {
                continue;
            }
            let entry = etc.join(name);
            remove_tree(&entry).map_err(io_err("removing", &entry))?;
            symlink(path, &entry).map_err(io_err("linking", &entry))?;
            let public = root.join(link.trim_start_matches('/'));
            if public.symlink_metadata().is_ok() && !public.is_symlink() {
                // A real file of a package is never replaced.
                continue;
            }
            if let Some(parent) = public.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            }
            remove_tree(&public).map_err(io_err("removing", &public))?;
            symlink(Path::new("/etc/alternatives").join(name), &public).map_err(io_err("linking", &public))?;
        }
    }
    info!(alternatives = best.len(), "alternatives linked");
    Ok(())
}

/// The `python3.N` interpreters in `root/usr/bin`, by name.
fn pythons(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("usr/bin")) else { return Vec::new() };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_prefix("python3.").is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())))
        .collect();
    found.sort();
    found
}

/// Byte-compiles each Python's standard library and `dist-packages` as the
/// packages' postinst scripts do (py3compile): one `python3.N -m compileall`
/// per interpreter, run by `qemu-<arch>-static` given explicitly inside a
/// chroot, so no binfmt_misc handler is needed. The emulator copy is removed
/// afterwards.
fn byte_compile(root: &Path, arch: GuestArch, cancel: &BuildCancel) -> Result<(), ImageBuildError> {
    let pythons = pythons(root);
    if pythons.is_empty() {
        return Ok(());
    }
    let tool = match arch {
        GuestArch::X86_64 => "qemu-x86_64-static",
        GuestArch::Aarch64 => "qemu-aarch64-static",
    };
    let qemu = which(tool).ok_or(ImageBuildError::ToolMissing { tool, package: "qemu-user-static" })?;
    // Absolute: the command's own PATH (the root's) is where a bare name would be looked up.
    let chroot = which("chroot").ok_or(ImageBuildError::ToolMissing { tool: "chroot", package: "coreutils" })?;
    let inside = root.join("tvm-qemu-user");
    std::fs::copy(&qemu, &inside).map_err(io_err("copying the emulator to", &inside))?;
    let _remove = EmulatorCopy(inside.clone());
    for python in &pythons {
        let version = python.trim_start_matches("python");
        let mut dirs = vec![format!("/usr/lib/python{version}")];
        if root.join("usr/lib/python3/dist-packages").is_dir() {
            dirs.push("/usr/lib/python3/dist-packages".into());
        }
        let mut c = Command::new(&chroot);
        c.arg(root).arg("/tvm-qemu-user").arg(format!("/usr/bin/{python}"));
        c.args(["-E", "-S", "-m", "compileall", "-q"]).args(&dirs);
        c.env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8");
        run_cancellable(&mut c, Some(cancel), |_| {}, |_| {}).map_err(|e| {
            tool_failed(e, |tail| ImageBuildError::Configure { step: "byte-compiling Python's library", tail })
        })?;
        info!(python, "byte-compiled");
    }
    Ok(())
}

/// Removes the emulator copied into a root, on every way out.
struct EmulatorCopy(PathBuf);

impl Drop for EmulatorCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the list of `.deb` paths mmdebstrap's extract hook recorded
/// (`MMDEBSTRAP_ESSENTIAL`, paths inside the root) as paths in `archives`.
pub(crate) fn debs_of(list: &Path, archives: &Path) -> Result<Vec<PathBuf>, ImageBuildError> {
    let text = std::fs::read_to_string(list).map_err(io_err("reading", list))?;
    Ok(text.split_whitespace().filter_map(|p| Path::new(p).file_name()).map(|name| archives.join(name)).collect())
}

/// The extract hook that records the unpacked packages in `list` (a path on the host).
pub(crate) fn record_hook(list: &Path) -> String {
    format!("printf '%s\\n' $MMDEBSTRAP_ESSENTIAL > {}", super::shell_quote(&list.to_string_lossy()))
}

/// Appends `text` to `file`, creating it.
#[cfg(test)]
fn append(file: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_files_become_installed_status_paragraphs() {
        let p =
            status_paragraph("Package: dash\nVersion: 0.5.12-12\nArchitecture: arm64\nDescription: shell\n more\n\n");
        assert_eq!(p, "Package: dash\nStatus: install ok installed\nVersion: 0.5.12-12\nArchitecture: arm64\nDescription: shell\n more\n\n");
    }

    #[test]
    fn literal_alternatives_are_parsed_and_variables_left_out() {
        let script = "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n  update-alternatives --install /usr/bin/awk awk /usr/bin/mawk 5 \\\n    --slave /usr/share/man/man1/awk.1.gz awk.1.gz /usr/share/man/man1/mawk.1.gz \\\n    --slave /usr/bin/nawk nawk /usr/bin/mawk\nfi\nupdate-alternatives --install /usr/bin/x x \"$target\" 10\nupdate-alternatives --install /usr/bin/which which /usr/bin/which.debianutils 0 || true\n";
        let found = parse_alternatives(script);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].name.as_str(), found[0].path.as_str(), found[0].priority), ("awk", "/usr/bin/mawk", 5));
        assert_eq!(found[0].slaves[1], ("/usr/bin/nawk".into(), "nawk".into(), "/usr/bin/mawk".into()));
        assert_eq!((found[1].name.as_str(), found[1].slaves.len()), ("which", 0));
    }

    #[test]
    fn a_root_gets_accounts_zone_alternatives_and_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["etc", "usr/bin", "usr/share/base-passwd", "usr/share/base-files", "usr/share/zoneinfo/Etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("usr/share/base-passwd/passwd.master"), "root:*:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(root.join("usr/share/base-passwd/group.master"), "root:*:0:\n").unwrap();
        std::fs::write(root.join("usr/share/base-files/profile"), "# profile\n").unwrap();
        std::fs::write(root.join("usr/share/zoneinfo/Etc/UTC"), "TZif").unwrap();
        for f in ["usr/bin/mawk", "usr/bin/dash", "usr/bin/bash"] {
            std::fs::write(root.join(f), "").unwrap();
        }
        symlink("dash", root.join("usr/bin/sh")).unwrap();
        let control = dir.path().join("control/0");
        std::fs::create_dir_all(&control).unwrap();
        std::fs::write(control.join("control"), "Package: mawk\nVersion: 1.3.4\n").unwrap();
        append(
            &control.join("postinst"),
            "update-alternatives --install /usr/bin/awk awk /usr/bin/mawk 5 --slave /usr/bin/nawk nawk /usr/bin/mawk\n",
        );
        append(&control.join("postinst"), "update-alternatives --install /usr/bin/pager pager /bin/more 50\n");

        write_status(&root, std::slice::from_ref(&control)).unwrap();
        accounts(&root).unwrap();
        base_files(&root).unwrap();
        time_zone(&root).unwrap();
        alternatives(&root, std::slice::from_ref(&control)).unwrap();

        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("var/lib/dpkg/status"), "Package: mawk\nStatus: install ok installed\nVersion: 1.3.4\n\n");
        assert_eq!(read("etc/passwd"), "root:*:0:0:root:/root:/bin/bash\n");
        assert_eq!(read("etc/group"), "root:*:0:\n");
        assert_eq!(
            read("etc/shells"),
            "# /etc/shells: valid login shells\n/usr/bin/sh\n/usr/bin/bash\n/usr/bin/dash\n"
        );
        assert_eq!(read("etc/profile"), "# profile\n");
        assert!(root.join("usr/local/bin").is_dir());
        let lock = std::fs::metadata(root.join("run/lock")).unwrap();
        assert_eq!(lock.permissions().mode() & 0o7777, 0o1777);
        assert_eq!(std::fs::read_link(root.join("etc/localtime")).unwrap(), Path::new(DEFAULT_ZONE));
        assert_eq!(std::fs::read_link(root.join("usr/bin/awk")).unwrap(), Path::new("/etc/alternatives/awk"));
        assert_eq!(std::fs::read_link(root.join("etc/alternatives/awk")).unwrap(), Path::new("/usr/bin/mawk"));
        assert_eq!(std::fs::read_link(root.join("usr/bin/nawk")).unwrap(), Path::new("/etc/alternatives/nawk"));
        // /bin/more is not in this root: no pager link pointing nowhere.
        assert!(root.join("usr/bin/pager").symlink_metadata().is_err());
        // Nothing to byte-compile without a Python: no emulator needed.
        byte_compile(&root, GuestArch::Aarch64, &BuildCancel::new()).unwrap();
    }

    #[test]
    fn only_python_interpreters_are_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        for f in ["python3.13", "python3.13-config", "python3", "python3.9"] {
            std::fs::write(dir.path().join("usr/bin").join(f), "").unwrap();
        }
        assert_eq!(pythons(dir.path()), ["python3.13", "python3.9"]);
    }
}
