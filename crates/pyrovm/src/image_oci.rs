//! Runtime images from OCI images: pulled from a registry (Distribution API
//! v2 with [`oci_client`]: Docker Hub's token auth, HTTP Basic, manifest lists
//! resolved to the guest's platform (linux/amd64, or linux/arm64 for aarch64
//! guests), every manifest and blob checked against its
//! digest) or imported from an OCI image layout or a `docker save` archive for
//! hosts without a registry. The layers are applied in order into a scratch
//! root (whiteouts and opaque directories as the OCI image spec's "Applying
//! Changesets" says; no path may leave the root, no device nodes, size caps),
//! the runner account is added as in Debian images, and the root becomes the
//! same read-only erofs image, published atomically under the recipe's key.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tracing::{info, warn};
use tvm_config::{GuestArch, ImageRecipe, Settings};

use super::{customize, find_image, io_err, pack_and_publish, Image, ImageBuildError, ImageMeta};
use crate::cache::{remove_tree, BuildCancel, Cache};
use crate::progress::Progress;

/// Largest compressed layer (or imported archive member) accepted.
pub const MAX_BLOB_BYTES: u64 = 8 << 30;
/// Largest unpacked root (sum of all regular files written).
pub const MAX_ROOT_BYTES: u64 = 16 << 30;
/// Most entries in all layers together.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// A registry that sends nothing for this long is given up on.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// One layer on local disk, with the digest that names it.
#[derive(Debug)]
struct LocalLayer {
    digest: String,
    path: PathBuf,
}

/// An image whose blobs are on local disk: its manifest digest and layers in order.
#[derive(Debug)]
struct LocalImage {
    manifest_digest: String,
    layers: Vec<LocalLayer>,
}

/// Builds the image of an OCI recipe: pulls `reference` into the scratch
/// directory, unpacks and packs it. Called by `ensure_image` with the image
/// lock held.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    reference: &str,
    arch: GuestArch,
    required: Option<&RequiredCommands>,
    cache: &Cache,
    key: &str,
    label: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    let started = Instant::now();
    let parsed = parse_reference(reference)?;
    let scratch = cache.scratch("image").map_err(io_err("creating a scratch directory in", &cache.tmp_dir()))?;
    let blobs = scratch.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
    progress.set_message(format!("{label}: pulling {reference}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the pull runtime for", &blobs))?;
    let pulled = rt.block_on(async {
        tokio::select! {
            r = pull(&parsed, reference, arch, &blobs, label, progress) => r,
            () = cancelled(cancel) => Err(ImageBuildError::Cancelled),
        }
    })?;
    drop(rt);
    let root = scratch.join("root");
    unpack_all(&pulled, &root, label, progress, cancel)?;
    if let Some(required) = required {
        required.check(&root, reference)?;
    }
    let source = Source { reference: reference.to_string(), manifest_digest: pulled.manifest_digest };
    finish(&scratch, &root, cache, key, source, started, label, progress, cancel)
}

/// Resolves once `cancel` is set (polled; the pull has no process to kill).
async fn cancelled(cancel: &BuildCancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn parse_reference(reference: &str) -> Result<Reference, ImageBuildError> {
    reference.parse().map_err(|source| ImageBuildError::OciReference { reference: reference.to_string(), source })
}

/// Whether `registry` (`host[:port]`) is on this machine; Docker talks plain
/// HTTP to those without configuration, and so does TVM.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for `reference`'s registry from the Docker config file
/// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, credential
/// helpers included); anonymous when it names none.
///
/// # Errors
/// [`ImageBuildError::Credentials`] when an entry exists but cannot be read.
fn credentials(reference: &Reference) -> Result<RegistryAuth, ImageBuildError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let registry = reference.registry();
    // Docker Hub's entry is keyed by its v1 index URL.
    let server = if registry == "docker.io" { "https://index.docker.io/v1/" } else { registry };
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(RegistryAuth::Basic(user, password)),
        Ok(DockerCredential::IdentityToken(_)) => {
            warn!(
                registry,
                "the Docker config holds an identity token, which the registry client cannot use; pulling anonymously"
            );
            Ok(RegistryAuth::Anonymous)
        }
        Err(E::NoCredentialConfigured | E::ConfigNotFound | E::ConfigReadError) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(ImageBuildError::Credentials { registry: registry.to_string(), problem: format!("{e:?}") }),
    }
}

/// The CPU variant every guest of `arch` runs (the OCI image index spec's
/// platform variants: `v8` for arm64; GOAMD64's `v1` for amd64). Later
/// variants need CPU features a guest may lack (under KVM it has the host's
/// CPU), so they are never chosen.
fn baseline_variant(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "v1",
        GuestArch::Aarch64 => "v8",
    }
}

/// Whether an index entry is an image for guests of `arch`: `os` linux, the
/// GOARCH name (`amd64`, `arm64`), and no variant or the baseline one.
fn is_for(entry: &ImageIndexEntry, arch: GuestArch) -> bool {
    entry.platform.as_ref().is_some_and(|p| {
        p.os == "linux"
            && p.architecture == arch.debian()
            && p.variant.as_deref().is_none_or(|v| v == baseline_variant(arch))
    })
}

/// The digest of the first image for guests of `arch` in an index's entries
/// ([`is_for`]), in the index's order.
fn platform_image(manifests: &[ImageIndexEntry], arch: GuestArch) -> Option<String> {
    manifests.iter().find(|e| is_for(e, arch)).map(|e| e.digest.clone())
}

/// An index's platforms for an error: `linux/amd64, linux/arm/v7,
/// unknown/unknown`, `none` when it lists nothing, `?` for an entry without one.
fn offered_platforms(manifests: &[ImageIndexEntry]) -> String {
    let names: Vec<String> = manifests
        .iter()
        .map(|e| match &e.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "?".into(),
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// What the registry client's platform resolver saw in an index that had no
/// image for the guests ([`offered_platforms`]); `None` while it found one or
/// saw no index. The client reports that case only as "not found".
type Unmatched = Arc<Mutex<Option<String>>>;

/// The pull error for `text`: [`ImageBuildError::NoPlatform`] when the
/// resolver found no image for `arch` in the index, else the client's error.
fn pull_error(
    text: &str,
    arch: GuestArch,
    unmatched: &Unmatched,
    source: oci_client::errors::OciDistributionError,
) -> ImageBuildError {
    match unmatched.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(offered) => ImageBuildError::NoPlatform { reference: text.to_string(), arch: arch.debian(), offered },
        None => ImageBuildError::Pull { reference: text.to_string(), source },
    }
}

/// Pulls the manifest (an index resolved to the guest's linux platform) and
/// every layer into `dir`; the client checks each against its digest.
async fn pull(
    reference: &Reference,
    text: &str,
    arch: GuestArch,
    dir: &Path,
    label: &str,
    progress: &Progress,
) -> Result<LocalImage, ImageBuildError> {
    let (client, auth, unmatched) = client_for(reference, text, arch)?;
    let pull_err = |source| pull_error(text, arch, &unmatched, source);
    let (manifest, manifest_digest) = client.pull_image_manifest(reference, &auth).await.map_err(pull_err)?;
    check_layers(&manifest)?;
    check_config_platform(&client, reference, text, arch, &manifest).await?;
    let mut layers = Vec::new();
    for (i, desc) in manifest.layers.iter().enumerate() {
        progress.set_message(format!(
            "{label}: layer {}/{} ({} MB)",
            i + 1,
            manifest.layers.len(),
            desc.size.max(0) >> 20
        ));
        let path = dir.join(format!("layer-{i}"));
        let file = tokio::fs::File::create(&path).await.map_err(io_err("creating", &path))?;
        let mut out = CappedWriter { inner: file, left: MAX_BLOB_BYTES };
        client.pull_blob(reference, desc, &mut out).await.map_err(pull_err)?;
        layers.push(LocalLayer { digest: desc.digest.clone(), path });
    }
    info!(reference = text, manifest_digest, layers = layers.len(), "pulled");
    Ok(LocalImage { manifest_digest, layers })
}

/// Largest image config accepted (read for its platform).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Fails when the image's config names another architecture than the
/// guests' ([`ImageBuildError::WrongPlatform`]): a reference that is one image
/// rather than an index is what the registry serves for every platform. The
/// config blob is checked against its digest by the client and capped at
/// [`MAX_CONFIG_BYTES`]; [`config_platform`] judges it.
///
/// # Errors
/// [`ImageBuildError::Pull`] (the blob), [`ImageBuildError::OciImage`] (not
/// JSON), [`ImageBuildError::WrongPlatform`].
async fn check_config_platform(
    client: &Client,
    reference: &Reference,
    text: &str,
    arch: GuestArch,
    manifest: &OciImageManifest,
) -> Result<(), ImageBuildError> {
    let mut out = CappedWriter { inner: Vec::new(), left: MAX_CONFIG_BYTES };
    client
        .pull_blob(reference, &manifest.config, &mut out)
        .await
        .map_err(|source| ImageBuildError::Pull { reference: text.to_string(), source })?;
    config_platform(&out.inner, text, arch)
}

/// Whether the image config `config` (JSON, the OCI image spec's
/// `architecture`, `os`, `variant`) is for guests of `arch`: a config naming
/// no architecture passes (nothing says it would not run); `text` names the
/// image in errors.
///
/// # Errors
/// [`ImageBuildError::OciImage`] (not JSON), [`ImageBuildError::WrongPlatform`].
fn config_platform(config: &[u8], text: &str, arch: GuestArch) -> Result<(), ImageBuildError> {
    #[derive(Deserialize)]
    struct Platform {
        #[serde(default)]
        architecture: Option<String>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        variant: Option<String>,
    }
    let config: Platform = serde_json::from_slice(config)
        .map_err(|e| ImageBuildError::OciImage { problem: format!("the image config of {text} is unreadable: {e}") })?;
    match config.architecture {
        Some(a) if a != arch.debian() => {
            let os = config.os.unwrap_or_else(|| "?".into());
            let found = match config.variant {
                Some(v) => format!("{os}/{a}/{v}"),
                None => format!("{os}/{a}"),
            };
            Err(ImageBuildError::WrongPlatform { reference: text.to_string(), found, arch: arch.debian() })
        }
        _ => Ok(()),
    }
}

/// A registry client for `reference` (plain HTTP to this machine's
/// registries, index manifests resolved to linux/`arch` by [`platform_image`]),
/// its credentials, and what its resolver saw when an index had no image for
/// `arch` (for [`pull_error`]).
fn client_for(
    reference: &Reference,
    text: &str,
    arch: GuestArch,
) -> Result<(Client, RegistryAuth, Unmatched), ImageBuildError> {
    let auth = credentials(reference)?;
    let protocol = if is_loopback(reference.resolve_registry()) { ClientProtocol::Http } else { ClientProtocol::Https };
    let unmatched = Unmatched::default();
    let seen = unmatched.clone();
    let resolver = move |m: &[ImageIndexEntry]| {
        let found = platform_image(m, arch);
        if found.is_none() {
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(offered_platforms(m));
        }
        found
    };
    let config = ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(resolver)),
        read_timeout: Some(READ_TIMEOUT),
        connect_timeout: Some(CONNECT_TIMEOUT),
        ..ClientConfig::default()
    };
    let client =
        Client::try_from(config).map_err(|source| ImageBuildError::Pull { reference: text.to_string(), source })?;
    Ok((client, auth, unmatched))
}

/// Whether `recipe` takes its root from an OCI reference that names a tag
/// (or nothing, meaning `latest`) and no digest: its content is whatever the
/// registry says the tag is, so the image is keyed by what it resolves to.
pub fn is_tag_only(recipe: &ImageRecipe) -> bool {
    recipe.oci.as_deref().and_then(|r| r.parse::<Reference>().ok()).is_some_and(|r| r.digest().is_none())
}

/// The digest-pinned form of `reference` for the image manifest `digest`:
/// `registry/repository@digest`, the tag dropped so that one content under
/// two tags is one image.
fn pinned_reference(reference: &Reference, digest: &str) -> String {
    format!("{}/{}@{digest}", reference.registry(), reference.repository())
}

/// Resolves the tag of `text` to the digest of its linux/`arch` image
/// manifest, as the registry answers now: the manifest is fetched and checked
/// against the digest that names it (an index is resolved to the platform's
/// entry, whose manifest is checked against the entry's digest). Returns the
/// pinned reference ([`pinned_reference`]).
///
/// # Errors
/// [`ImageBuildError::OciReference`], [`ImageBuildError::Credentials`],
/// [`ImageBuildError::Pull`] (unreachable, refused, no such tag, digest mismatch),
/// [`ImageBuildError::NoPlatform`] (an index without an image for `arch`).
pub(crate) fn resolve_tag(text: &str, arch: GuestArch) -> Result<String, ImageBuildError> {
    let reference = parse_reference(text)?;
    let io = |source| ImageBuildError::Io { action: "starting the resolve runtime for", path: text.into(), source };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io)?;
    let digest = rt.block_on(async {
        let (client, auth, unmatched) = client_for(&reference, text, arch)?;
        let (_, digest) = client
            .pull_image_manifest(&reference, &auth)
            .await
            .map_err(|source| pull_error(text, arch, &unmatched, source))?;
        Ok::<_, ImageBuildError>(digest)
    })?;
    info!(reference = text, digest, "tag resolved");
    Ok(pinned_reference(&reference, &digest))
}

/// What a tag-only reference resolved to, recorded in `images/tags/<key of
/// the tag recipe>.json`: the image of the tag recipe is the image of `pinned`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct TagRecord {
    /// The reference as the recipe names it (`python:3.8-slim`).
    pub reference: String,
    /// What it resolved to (`docker.io/library/python@sha256:...`).
    pub pinned: String,
    /// When (Unix seconds).
    pub resolved_unix: u64,
}

fn tag_record_path(cache: &Cache, tag_key: &str) -> PathBuf {
    cache.images_dir().join("tags").join(format!("{tag_key}.json"))
}

/// The pinned recipe a tag-only `recipe` (already for its architecture) last
/// resolved to here, if it was ever built or imported.
pub(crate) fn recorded_pin(cache: &Cache, recipe: &ImageRecipe) -> Option<ImageRecipe> {
    let bytes = std::fs::read(tag_record_path(cache, &recipe.key())).ok()?;
    let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
    Some(ImageRecipe { oci: Some(record.pinned), ..recipe.clone() })
}

/// Records that the tag-only `recipe` (for its architecture) now means
/// `pinned` (written to a temporary file, then renamed over the old record).
pub(crate) fn record_tag(cache: &Cache, recipe: &ImageRecipe, pinned: &str) -> Result<(), ImageBuildError> {
    let path = tag_record_path(cache, &recipe.key());
    let dir = cache.images_dir().join("tags");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let record = TagRecord {
        reference: recipe.oci.clone().unwrap_or_default(),
        pinned: pinned.to_string(),
        resolved_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let tmp =
        dir.join(format!(".{}.{}", std::process::id(), path.file_name().and_then(|n| n.to_str()).unwrap_or("tag")));
    let json = serde_json::to_vec_pretty(&record).map_err(|e| io_err("serializing", &tmp)(e.into()))?;
    std::fs::write(&tmp, json).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("publishing", &path))
}

/// Every tag record in the cache (for `tvm image list`).
pub fn tag_records(settings: &Settings) -> Vec<TagRecord> {
    let dir = Cache::new(&settings.cache_dir).images_dir().join("tags");
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<TagRecord> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json") && !n.starts_with('.')))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| a.reference.cmp(&b.reference));
    out
}

/// The commands a runtime's stages start, which an OCI root must hold before
/// it is packed (a Debian recipe's packages are checked by dpkg instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredCommands {
    /// The runtime's id, for the error.
    pub runtime: String,
    /// `argv[0]` of the compile and run templates: absolute paths, or names
    /// looked up in `path`. Relative paths (`./main`, made by the compile
    /// stage) and templates (`{entry}`) are not checked.
    pub commands: Vec<String>,
    /// The `PATH` the guest's stages get (the runtime's environment; the
    /// image's own `ENV` is not applied in guests).
    pub path: String,
}

/// The guest's `PATH` when a runtime's environment names none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl RequiredCommands {
    /// What `runtime`'s stages need from its image.
    pub fn of(runtime: &tvm_config::Runtime) -> Self {
        let mut commands = Vec::new();
        for argv in runtime.compile.iter().chain(std::iter::once(&runtime.run)) {
            let Some(cmd) = argv.first() else { continue };
            let checkable = !cmd.contains('{') && (cmd.starts_with('/') || !cmd.contains('/'));
            if checkable && !cmd.is_empty() && !commands.contains(cmd) {
                commands.push(cmd.clone());
            }
        }
        let path = runtime.env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        Self { runtime: runtime.id.clone(), commands, path: path.to_string() }
    }

    /// Checks that every command is an executable regular file in `root`,
    /// symlinks resolved inside it.
    ///
    /// # Errors
    /// [`ImageBuildError::MissingCommand`] for the first one that is not.
    pub fn check(&self, root: &Path, image: &str) -> Result<(), ImageBuildError> {
        for cmd in &self.commands {
            let candidates: Vec<String> = if cmd.starts_with('/') {
                vec![cmd.clone()]
            } else {
                self.path.split(':').filter(|d| d.starts_with('/')).map(|d| format!("{d}/{cmd}")).collect()
            };
            if !candidates.iter().any(|c| resolve_in_root(root, Path::new(c)).is_some_and(|p| is_executable(&p))) {
                return Err(ImageBuildError::MissingCommand {
                    image: image.to_string(),
                    runtime: self.runtime.clone(),
                    command: cmd.clone(),
                    searched: if cmd.starts_with('/') { cmd.clone() } else { format!("PATH {}", self.path) },
                });
            }
        }
        Ok(())
    }
}

/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_SYMLINKS: u32 = 40;

/// The host path of `path` as the guest would see it with `root` as `/`:
/// every symlink is resolved inside the root (an absolute target restarts at
/// the root, `..` stops at it), so no link can lead out of it. `None` when
/// a component is missing or too many links are followed.
fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    use std::ffi::OsString;
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = path.components().rev().filter_map(component_name).collect();
    let mut at: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            at.pop();
            continue;
        }
        let mut here: PathBuf = root.to_path_buf();
        here.extend(&at);
        here.push(&c);
        let meta = std::fs::symlink_metadata(&here).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return None;
            }
            let target = std::fs::read_link(&here).ok()?;
            if target.is_absolute() {
                at.clear();
            }
            pending.extend(target.components().rev().filter_map(component_name));
        } else {
            at.push(c);
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&at);
    Some(out)
}

/// A path component as a name to walk (`..` kept; `/` and `.` dropped).
fn component_name(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    }
}

/// A regular file some execute bit is set on (what `execve` needs of it here).
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Refuses manifests TVM cannot apply before anything is downloaded.
fn check_layers(manifest: &OciImageManifest) -> Result<(), ImageBuildError> {
    for d in &manifest.layers {
        if u64::try_from(d.size).map_or(true, |s| s > MAX_BLOB_BYTES) {
            return Err(ImageBuildError::OciImage {
                problem: format!("layer {} has size {}, above the {} byte cap", d.digest, d.size, MAX_BLOB_BYTES),
            });
        }
        if d.media_type.contains("zstd") || d.media_type.contains("nondistributable") {
            return Err(ImageBuildError::OciImage {
                problem: format!("layer {} has media type {}, which TVM does not unpack", d.digest, d.media_type),
            });
        }
    }
    Ok(())
}

/// A file writer that fails once more than `left` bytes arrive, so a registry
/// cannot fill the disk with a blob larger than its descriptor's cap.
struct CappedWriter<W> {
    inner: W,
    left: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CappedWriter<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(io::Error::other("blob larger than the size cap")));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.left -= n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where an OCI root came from, for its metadata.
struct Source {
    /// The reference pulled or imported (digest-pinned when it was resolved from a tag).
    reference: String,
    /// The image manifest's digest (a legacy `docker save` archive's config digest).
    manifest_digest: String,
}

/// Adds what the guest needs (runner account, mount points, host files) and
/// packs and publishes the image.
#[allow(clippy::too_many_arguments)]
fn finish(
    scratch: &crate::cache::ScratchDir,
    root: &Path,
    cache: &Cache,
    key: &str,
    source: Source,
    started: Instant,
    label: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<Image, ImageBuildError> {
    if cancel.is_cancelled() {
        return Err(ImageBuildError::Cancelled);
    }
    progress.set_message(format!("{label}: adding the runner user"));
    // Minimal images (distroless, scratch-based) may have no account files.
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(io_err("creating", &etc))?;
    for (file, first) in [("passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("group", "root:x:0:\n")] {
        let p = etc.join(file);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::write(&p, first).map_err(io_err("writing", &p))?;
        }
    }
    customize(root)?;
    let meta = ImageMeta {
        key: key.to_string(),
        suite: String::new(),
        packages: Vec::new(),
        created_unix: 0,
        size_bytes: 0,
        build_seconds: 0.0,
        installed: Vec::new(),
        manifest_digest: Some(source.manifest_digest),
        oci_reference: Some(source.reference),
    };
    pack_and_publish(scratch, root, cache, meta, started, label, progress, cancel)
}

/// Applies every layer in order into `root` (created here).
fn unpack_all(
    image: &LocalImage,
    root: &Path,
    label: &str,
    progress: &Progress,
    cancel: &BuildCancel,
) -> Result<(), ImageBuildError> {
    std::fs::create_dir_all(root).map_err(io_err("creating", root))?;
    let mut budget = Budget { bytes: MAX_ROOT_BYTES, entries: MAX_ENTRIES };
    for (i, layer) in image.layers.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(ImageBuildError::Cancelled);
        }
        progress.set_message(format!("{label}: unpacking layer {}/{}", i + 1, image.layers.len()));
        apply_layer(&layer.path, &layer.digest, root, &mut budget)?;
    }
    Ok(())
}

/// What is left of the size caps.
struct Budget {
    bytes: u64,
    entries: u64,
}

/// Opens a layer file, gunzipping it when it starts with gzip's magic bytes
/// (registries and `docker save` use both forms whatever the media type says).
fn open_layer(path: &Path, digest: &str) -> Result<Box<dyn Read>, ImageBuildError> {
    let mut f = BufReader::new(File::open(path).map_err(io_err("opening", path))?);
    let mut magic = [0u8; 4];
    let n = read_prefix(&mut f, &mut magic).map_err(io_err("reading", path))?;
    let f = io::Cursor::new(magic[..n].to_vec()).chain(f);
    match magic {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::GzDecoder::new(f))),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(ImageBuildError::OciImage {
            problem: format!("layer {digest} is zstd-compressed, which TVM does not unpack"),
        }),
        _ => Ok(Box::new(f)),
    }
}

fn read_prefix(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The whiteout prefix and the opaque-directory marker (OCI image spec, layer.md).
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Applies one layer: a first pass carries out its whiteouts (which remove
/// only what lower layers made), a second writes its entries.
fn apply_layer(path: &Path, digest: &str, root: &Path, budget: &mut Budget) -> Result<(), ImageBuildError> {
    let refuse = |entry: &Path, problem: String| ImageBuildError::Layer {
        layer: digest.to_string(),
        entry: entry.display().to_string(),
        problem,
    };
    let read_err = |source: io::Error| ImageBuildError::Layer {
        layer: digest.to_string(),
        entry: String::new(),
        problem: format!("the tarball is unreadable: {source}"),
    };

    let mut archive = tar::Archive::new(open_layer(path, digest)?);
    for entry in archive.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let rel = contained(&raw).map_err(|p| refuse(&raw, p))?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else { continue };
        if !name.starts_with(WHITEOUT) {
            continue;
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = resolve_parent(root, parent).map_err(|p| refuse(&raw, p))?;
        if name == OPAQUE {
            // Everything lower layers put in the directory goes; the directory stays.
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    remove_tree(&child.path()).map_err(io_err("removing", &child.path()))?;
                }
            }
        } else {
            let target = dir.join(&name[WHITEOUT.len()..]);
            remove_tree(&target).map_err(io_err("removing", &target))?;
        }
    }

    let mut archive = tar::Archive::new(open_layer(path, digest)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let rel = contained(&raw).map_err(|p| refuse(&raw, p))?;
        if rel.as_os_str().is_empty() {
            continue; // the root directory itself
        }
        if rel.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(WHITEOUT)) {
            continue;
        }
        budget.entries = budget
            .entries
            .checked_sub(1)
            .ok_or_else(|| refuse(&raw, format!("more than {MAX_ENTRIES} entries in the image")))?;
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link => {}
            // Device nodes would give the guest's root raw hardware access; FIFOs
            // and the rest have no place in a read-only runtime root.
            _ => continue,
        }
        let size = entry.header().size().map_err(read_err)?;
        budget.bytes = budget
            .bytes
            .checked_sub(size)
            .ok_or_else(|| refuse(&raw, format!("the unpacked image exceeds {MAX_ROOT_BYTES} bytes")))?;
        let parent = resolve_parent(root, rel.parent().unwrap_or(Path::new(""))).map_err(|p| refuse(&raw, p))?;
        std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        let dst = parent.join(rel.file_name().unwrap_or_default());
        // Replace what a lower layer left unless both are directories (a
        // directory entry only updates its metadata), never writing through a symlink.
        if let Ok(old) = std::fs::symlink_metadata(&dst) {
            if !(old.is_dir() && kind == T::Directory) {
                remove_tree(&dst).map_err(io_err("removing", &dst))?;
            }
        }
        if kind == T::Link {
            let link = entry
                .link_name()
                .map_err(read_err)?
                .ok_or_else(|| refuse(&raw, "hard link without a target".into()))?;
            let target_rel =
                contained(&link).map_err(|p| refuse(&raw, format!("hard link target {}: {p}", link.display())))?;
            let target_parent =
                resolve_parent(root, target_rel.parent().unwrap_or(Path::new(""))).map_err(|p| refuse(&raw, p))?;
            let target = target_parent.join(target_rel.file_name().unwrap_or_default());
            let meta = std::fs::symlink_metadata(&target)
                .map_err(|_| refuse(&raw, format!("hard link target {} is not in the image", link.display())))?;
            if !meta.is_file() {
                return Err(refuse(&raw, format!("hard link target {} is not a regular file", link.display())));
            }
            std::fs::hard_link(&target, &dst).map_err(io_err("linking", &dst))?;
            continue;
        }
        entry.unpack(&dst).map_err(|e| refuse(&raw, format!("writing it failed: {e}")))?;
    }
    Ok(())
}

/// The entry path relative to the root: leading `/` and `.` dropped; `..`
/// anywhere refused (layers made by real tools never need it).
fn contained(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("the path contains `..` (it would escape the root)".into()),
            Component::Prefix(_) => return Err("not a Unix path".into()),
        }
    }
    Ok(out)
}

/// `root/rel` for a directory path that must not pass through a symlink
/// (which could point anywhere on the host); missing parts are fine (created later).
fn resolve_parent(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "its parent {} is a symlink in the image; writing through it could leave the root",
                    at.strip_prefix(root).unwrap_or(&at).display()
                ))
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!("its parent {} is not a directory", at.strip_prefix(root).unwrap_or(&at).display()))
            }
            _ => {}
        }
    }
    Ok(at)
}

/// `sha256:<hex>` of a file.
fn file_digest(path: &Path) -> Result<String, ImageBuildError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_err("reading", path))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// `tvm image import`: builds the image of `runtime` (an OCI recipe) from a
/// local OCI image layout directory or a `docker save` tarball (either
/// format Docker writes) instead of a registry, for hosts without one. The
/// image is the one whose digest the recipe pins, else the one tagged as the
/// recipe names it, else the only one. Every blob read is checked against its
/// digest (legacy `docker save` layers against the config's `diff_ids`), and
/// the runtime's commands must be in the root. A tag-only recipe is keyed by
/// the digest found, as a pull keys it, and its tag record updated.
///
/// # Errors
/// [`ImageBuildError::OciImage`] when `runtime` has no OCI recipe or the
/// input holds no matching image; [`ImageBuildError::DigestMismatch`],
/// [`ImageBuildError::Layer`], [`ImageBuildError::MissingCommand`], and the
/// errors of packing and publishing.
pub fn import(
    settings: &Settings,
    runtime: &tvm_config::Runtime,
    input: &Path,
    progress: &Progress,
) -> Result<Image, ImageBuildError> {
    let Some(recipe) = &runtime.image else {
        return Err(ImageBuildError::OciImage { problem: format!("runtime {} has no image recipe", runtime.id) });
    };
    let Some(text) = &recipe.oci else {
        return Err(ImageBuildError::OciImage {
            problem: format!("the runtime's recipe takes its root from {}, not from an OCI image", recipe.source()),
        });
    };
    let reference = parse_reference(text)?;
    let tag_only = reference.digest().is_none();
    if !tag_only {
        if let Some(image) = find_image(settings, recipe) {
            progress.clear();
            return Ok(image);
        }
    }
    // Keyed by architecture as `ensure_image` keys it.
    let arch = settings.guest_arch;
    let recipe = &recipe.for_arch(arch);
    let started = Instant::now();
    let cache = Cache::new(&settings.cache_dir);
    let label = progress.message();
    cache.sweep_stale_scratch();
    let scratch = cache.scratch("image").map_err(io_err("creating a scratch directory in", &cache.tmp_dir()))?;
    let meta = std::fs::metadata(input).map_err(io_err("reading", input))?;
    let layout = if meta.is_dir() {
        input.to_path_buf()
    } else {
        progress.set_message(format!("{label}: reading {}", input.display()));
        let dir = scratch.join("archive");
        extract_archive(input, &dir)?;
        dir
    };
    let image = if layout.join("oci-layout").is_file() {
        from_layout(&layout, &reference, arch)?
    } else if layout.join("manifest.json").is_file() {
        from_docker_archive(&layout, &reference, arch)?
    } else {
        return Err(ImageBuildError::OciImage {
            problem: format!("{} is neither an OCI image layout nor a docker save archive", input.display()),
        });
    };
    let (keyed, source_ref) = if tag_only {
        let pinned = pinned_reference(&reference, &image.manifest_digest);
        (ImageRecipe { oci: Some(pinned.clone()), ..recipe.clone() }, pinned)
    } else {
        (recipe.clone(), text.clone())
    };
    let key = keyed.key();
    let lock_name = format!("image-{key}");
    let _lock = cache.lock(&lock_name).map_err(io_err("locking", &cache.root().join("locks").join(&lock_name)))?;
    let built = match super::load(&cache, &key) {
        // The same content imported or pulled before (under this or another tag).
        Some(found) => found,
        None => {
            let root = scratch.join("root");
            let cancel = BuildCancel::new();
            unpack_all(&image, &root, &label, progress, &cancel)?;
            RequiredCommands::of(runtime).check(&root, text)?;
            let source = Source { reference: source_ref.clone(), manifest_digest: image.manifest_digest };
            finish(&scratch, &root, &cache, &key, source, started, &label, progress, &cancel)?
        }
    };
    if tag_only {
        record_tag(&cache, recipe, &source_ref)?;
    }
    progress.finish(format!("{label}: imported {key}"));
    Ok(built)
}

/// Unpacks a `docker save` tarball (regular files and directories only, no
/// path out of `dir`, size-capped) so it can be read as a layout.
fn extract_archive(input: &Path, dir: &Path) -> Result<(), ImageBuildError> {
    let digest = input.display().to_string();
    let read_err = |source: io::Error| ImageBuildError::Layer {
        layer: digest.clone(),
        entry: String::new(),
        problem: format!("the archive is unreadable: {source}"),
    };
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let mut archive = tar::Archive::new(open_layer(input, &digest)?);
    let mut left = MAX_ROOT_BYTES;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let refuse = |problem: String| ImageBuildError::Layer {
            layer: digest.clone(),
            entry: raw.display().to_string(),
            problem,
        };
        let rel = contained(&raw).map_err(refuse)?;
        let dst = dir.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&dst).map_err(io_err("creating", &dst))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(read_err)?;
                left = left.checked_sub(size).ok_or_else(|| refuse("the archive is too large".into()))?;
                resolve_parent(dir, rel.parent().unwrap_or(Path::new(""))).map_err(refuse)?;
                if let Some(p) = dst.parent() {
                    std::fs::create_dir_all(p).map_err(io_err("creating", p))?;
                }
                let mut out = File::create(&dst).map_err(io_err("creating", &dst))?;
                io::copy(&mut entry, &mut out).map_err(io_err("writing", &dst))?;
            }
            // Older docker save archives link identical layers; the manifest names the files.
            _ => {}
        }
    }
    Ok(())
}

/// The path of blob `digest` in a layout, after checking its content.
fn layout_blob(layout: &Path, digest: &str) -> Result<PathBuf, ImageBuildError> {
    let (alg, hex_part) = digest.split_once(':').unwrap_or(("", digest));
    if alg != "sha256" || hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageBuildError::OciImage { problem: format!("unsupported or malformed digest {digest:?}") });
    }
    let path = layout.join("blobs").join(alg).join(hex_part);
    let actual = file_digest(&path)?;
    if actual != digest {
        return Err(ImageBuildError::DigestMismatch {
            what: format!("blob {}", path.display()),
            expected: digest.into(),
            actual,
        });
    }
    Ok(path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ImageBuildError> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ImageBuildError::OciImage { problem: format!("{} does not parse: {e}", path.display()) })
}

/// Whether an annotated name (`python:3.8-slim`, `docker.io/library/python:3.8-slim`, `3.8-slim`) is `reference`.
fn names(reference: &Reference, name: &str) -> bool {
    let tag = reference.tag().unwrap_or("latest");
    name == tag
        || name.parse::<Reference>().is_ok_and(|r| {
            r.resolve_registry() == reference.resolve_registry()
                && r.repository() == reference.repository()
                && r.tag().unwrap_or("latest") == tag
        })
}

/// Picks the image for `reference` in an OCI image layout.
fn from_layout(layout: &Path, reference: &Reference, arch: GuestArch) -> Result<LocalImage, ImageBuildError> {
    let index: OciImageIndex = read_json(&layout.join("index.json"))?;
    let annotated = |e: &ImageIndexEntry, key: &str| e.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    let named: Vec<ImageIndexEntry> = match reference.digest() {
        Some(d) => index.manifests.iter().filter(|e| e.digest == d).cloned().collect(),
        None => index
            .manifests
            .iter()
            .filter(|e| {
                ["io.containerd.image.name", "org.opencontainers.image.ref.name"]
                    .iter()
                    .any(|k| annotated(e, k).is_some_and(|n| names(reference, &n)))
            })
            .cloned()
            .collect(),
    };
    let named = if named.is_empty() && index.manifests.len() == 1 && reference.digest().is_none() {
        index.manifests.clone()
    } else {
        named
    };
    // One name may label an image per platform (a layout written with every
    // platform of an index): the guests' one, else the only one.
    let chosen = if named.iter().any(|e| e.platform.is_some()) {
        let digest = platform_image(&named, arch).ok_or_else(|| ImageBuildError::NoPlatform {
            reference: format!("{} (in {})", reference.whole(), layout.display()),
            arch: arch.debian(),
            offered: offered_platforms(&named),
        })?;
        named.iter().find(|e| e.digest == digest)
    } else {
        named.first()
    }
    .ok_or_else(|| ImageBuildError::OciImage {
        problem: format!("{} holds no image {}", layout.display(), reference.whole()),
    })?;
    let mut entry = chosen.clone();
    // Indexes nest (docker save writes index -> index -> manifest); bounded.
    for _ in 0..4 {
        let path = layout_blob(layout, &entry.digest)?;
        let value: serde_json::Value = read_json(&path)?;
        if value.get("manifests").is_some() {
            let inner: OciImageIndex = read_json(&path)?;
            let digest = platform_image(&inner.manifests, arch).ok_or_else(|| ImageBuildError::NoPlatform {
                reference: format!("{} (index {})", reference.whole(), entry.digest),
                arch: arch.debian(),
                offered: offered_platforms(&inner.manifests),
            })?;
            entry = inner.manifests.into_iter().find(|e| e.digest == digest).unwrap_or(entry);
            continue;
        }
        let manifest: OciImageManifest = read_json(&path)?;
        check_layers(&manifest)?;
        // As for a pulled image: an entry without a platform may still be
        // another architecture's image, which its config says.
        let config = layout_blob(layout, &manifest.config.digest)?;
        let size = std::fs::metadata(&config).map_err(io_err("reading", &config))?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ImageBuildError::OciImage {
                problem: format!("the image config {} is {size} bytes (at most {MAX_CONFIG_BYTES})", config.display()),
            });
        }
        let bytes = std::fs::read(&config).map_err(io_err("reading", &config))?;
        config_platform(&bytes, &format!("{} (in {})", reference.whole(), layout.display()), arch)?;
        let layers = manifest
            .layers
            .iter()
            .map(|d: &OciDescriptor| Ok(LocalLayer { digest: d.digest.clone(), path: layout_blob(layout, &d.digest)? }))
            .collect::<Result<Vec<_>, ImageBuildError>>()?;
        return Ok(LocalImage { manifest_digest: entry.digest, layers });
    }
    Err(ImageBuildError::OciImage { problem: "image indexes nested more than four deep".into() })
}

/// One image of a legacy `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The part of an image config that names the uncompressed layers and the
/// platform (GOARCH names; absent in some hand-made images).
#[derive(Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
    #[serde(default)]
    architecture: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// Picks the image for `reference` in a legacy `docker save` archive. Its
/// config file is named by its digest (the image ID) and lists each layer's
/// digest, which is checked.
fn from_docker_archive(dir: &Path, reference: &Reference, arch: GuestArch) -> Result<LocalImage, ImageBuildError> {
    let entries: Vec<DockerArchiveEntry> = read_json(&dir.join("manifest.json"))?;
    let single = entries.len() == 1;
    let entry =
        entries.into_iter().find(|e| single || e.repo_tags.iter().flatten().any(|t| names(reference, t))).ok_or_else(
            || ImageBuildError::OciImage { problem: format!("the archive holds no image {}", reference.whole()) },
        )?;
    let under = |rel: &str| {
        contained(Path::new(rel))
            .map(|r| dir.join(r))
            .map_err(|p| ImageBuildError::OciImage { problem: format!("{rel:?}: {p}") })
    };
    let config_path = under(&entry.config)?;
    let config_digest = file_digest(&config_path)?;
    let stem = config_path.file_name().and_then(|n| n.to_str()).unwrap_or_default().trim_end_matches(".json");
    if !config_digest.ends_with(stem) {
        return Err(ImageBuildError::DigestMismatch {
            what: format!("config {}", entry.config),
            expected: format!("sha256:{stem}"),
            actual: config_digest,
        });
    }
    if reference.digest().is_some_and(|d| d != config_digest) {
        return Err(ImageBuildError::DigestMismatch {
            what: "the archive's image".into(),
            expected: reference.digest().unwrap_or_default().into(),
            actual: config_digest,
        });
    }
    let config: ImageConfig = read_json(&config_path)?;
    if let Some(a) = config.architecture.as_deref().filter(|a| *a != arch.debian()) {
        return Err(ImageBuildError::OciImage {
            problem: format!("the archive's image is for {a}, the guests are {}", arch.debian()),
        });
    }
    if config.rootfs.diff_ids.len() != entry.layers.len() {
        return Err(ImageBuildError::OciImage { problem: "the config's diff_ids do not match the layer list".into() });
    }
    let mut layers = Vec::new();
    for (rel, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
        let path = under(rel)?;
        let actual = uncompressed_digest(&path, diff_id)?;
        if &actual != diff_id {
            return Err(ImageBuildError::DigestMismatch {
                what: format!("layer {rel}"),
                expected: diff_id.clone(),
                actual,
            });
        }
        layers.push(LocalLayer { digest: diff_id.clone(), path });
    }
    Ok(LocalImage { manifest_digest: config_digest, layers })
}

/// `sha256:` of a layer's uncompressed tar stream (its diff_id).
fn uncompressed_digest(path: &Path, name: &str) -> Result<String, ImageBuildError> {
    let mut r = open_layer(path, name)?;
    let mut h = Sha256::new();
    io::copy(&mut r, &mut h).map_err(io_err("reading", path))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Whether the filesystem under `root` has an inode that is a device node
/// (for tests: unpacking never creates one).
pub fn has_device_nodes(root: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(dir) = std::fs::read_dir(root) else { return false };
    dir.flatten().any(|e| {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else { return false };
        let t = m.file_type();
        t.is_block_device() || t.is_char_device() || (m.is_dir() && has_device_nodes(&e.path()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer tarball from `(path, kind, content)` rows; paths are written raw
    /// into the header so hostile ones (`..`) can be made.
    fn layer(dir: &Path, name: &str, rows: &[(&str, tar::EntryType, &str, &str)]) -> PathBuf {
        let path = dir.join(name);
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        for (p, kind, data, link) in rows {
            let mut h = tar::Header::new_gnu();
            let bytes = p.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append(&h, data.as_bytes()).unwrap();
        }
        b.finish().unwrap();
        path
    }

    fn apply(root: &Path, layer: &Path) -> Result<(), ImageBuildError> {
        let mut budget = Budget { bytes: MAX_ROOT_BYTES, entries: MAX_ENTRIES };
        apply_layer(layer, "sha256:test", root, &mut budget)
    }

    use tar::EntryType as T;

    #[test]
    fn whiteouts_and_opaque_dirs_remove_only_lower_layer_files() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let l1 = layer(
            t.path(),
            "l1",
            &[
                ("etc/", T::Directory, "", ""),
                ("etc/gone", T::Regular, "x", ""),
                ("etc/kept", T::Regular, "k", ""),
                ("opt/", T::Directory, "", ""),
                ("opt/old", T::Regular, "o", ""),
                ("dev/null", T::Char, "", ""),
            ],
        );
        let l2 = layer(
            t.path(),
            "l2",
            &[
                ("etc/.wh.gone", T::Regular, "", ""),
                ("opt/new", T::Regular, "n", ""),
                ("opt/.wh..wh..opq", T::Regular, "", ""),
                ("etc/link", T::Link, "", "etc/kept"),
            ],
        );
        apply(&root, &l1).unwrap();
        apply(&root, &l2).unwrap();
        assert!(!root.join("etc/gone").exists());
        assert_eq!(std::fs::read_to_string(root.join("etc/kept")).unwrap(), "k");
        assert_eq!(std::fs::read_to_string(root.join("etc/link")).unwrap(), "k");
        assert!(!root.join("opt/old").exists());
        assert_eq!(std::fs::read_to_string(root.join("opt/new")).unwrap(), "n");
        assert!(!root.join("etc/.wh.gone").exists() && !root.join("opt/.wh..wh..opq").exists());
        assert!(!has_device_nodes(&root), "a device node was created");
    }

    #[test]
    fn escaping_paths_symlinked_parents_and_outside_hard_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for (name, rows) in [
            ("dotdot", vec![("../outside/x", T::Regular, "x", "")]),
            ("deep", vec![("a/../../outside/x", T::Regular, "x", "")]),
            ("hardlink", vec![("x", T::Link, "", "../outside/y")]),
            ("symlink", vec![("s", T::Symlink, "", "/"), ("s/outside/x", T::Regular, "x", "")]),
        ] {
            let root = t.path().join(format!("root-{name}"));
            std::fs::create_dir(&root).unwrap();
            std::fs::write(outside.join("y"), "y").unwrap();
            let l = layer(t.path(), name, &rows);
            let err = apply(&root, &l).unwrap_err();
            assert!(matches!(err, ImageBuildError::Layer { .. }), "{name}: {err}");
            assert!(!outside.join("x").exists(), "{name} wrote outside the root");
        }
    }

    /// A legacy `docker save` directory (`manifest.json`, `<config digest>.json`,
    /// `<id>/layer.tar`) of one image tagged `tag`, for `architecture`.
    fn legacy_archive(dir: &Path, tag: &str, architecture: &str) -> (String, PathBuf) {
        let layer = layer(dir, "layer.tar", &[("etc/", T::Directory, "", ""), ("etc/hi", T::Regular, "hi", "")]);
        let diff_id = file_digest(&layer).unwrap();
        std::fs::create_dir_all(dir.join("abc")).unwrap();
        std::fs::rename(&layer, dir.join("abc/layer.tar")).unwrap();
        let config = serde_json::json!({
            "architecture": architecture, "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        })
        .to_string();
        let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(config.as_bytes())));
        let config_name = format!("{}.json", &config_digest["sha256:".len()..]);
        std::fs::write(dir.join(&config_name), config).unwrap();
        let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": [tag], "Layers": ["abc/layer.tar"] }]);
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        (config_digest, dir.join("abc/layer.tar"))
    }

    #[test]
    fn legacy_docker_save_archives_are_read_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let (config_digest, layer_path) = legacy_archive(t.path(), "python:3.8-slim", "amd64");
        let reference: Reference = "docker.io/library/python:3.8-slim".parse().unwrap();
        let image = from_docker_archive(t.path(), &reference, GuestArch::X86_64).unwrap();
        assert_eq!(image.manifest_digest, config_digest);
        assert_eq!(image.layers.len(), 1);
        let root = t.path().join("root");
        unpack_all(&image, &root, "test", &Progress::hidden(), &BuildCancel::new()).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("etc/hi")).unwrap(), "hi");

        // Another architecture's image, a tag the archive lacks among several
        // images, a pinned digest it does not have: clear errors.
        let err = from_docker_archive(t.path(), &reference, GuestArch::Aarch64).unwrap_err();
        assert!(err.to_string().contains("for amd64, the guests are arm64"), "{err}");
        let pinned: Reference = format!("python@sha256:{}", "0".repeat(64)).parse().unwrap();
        let err = from_docker_archive(t.path(), &pinned, GuestArch::X86_64).unwrap_err();
        assert!(matches!(err, ImageBuildError::DigestMismatch { .. }), "{err}");

        // A layer whose content no longer matches the config's diff_id.
        let mut data = std::fs::read(&layer_path).unwrap();
        data[600] ^= 0xff;
        std::fs::write(&layer_path, data).unwrap();
        let err = from_docker_archive(t.path(), &reference, GuestArch::X86_64).unwrap_err();
        assert!(matches!(err, ImageBuildError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn commands_are_resolved_inside_the_root_only() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        for d in ["usr/bin", "usr/local/bin", "opt/py/bin", "bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let exe = |p: &str, mode: u32| {
            std::fs::write(root.join(p), "x").unwrap();
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("opt/py/bin/python3.8", 0o755);
        exe("usr/bin/data", 0o644);
        // Absolute and relative links that stay inside, one chained through another.
        symlink("/opt/py/bin/python3.8", root.join("usr/local/bin/python3")).unwrap();
        symlink("python3", root.join("usr/local/bin/python")).unwrap();
        // Links that would leave the root on the host: `..` stops at the root, and
        // `/` is the root, so both name files the image does not have.
        symlink("../../../../../../../../bin/sh", root.join("usr/bin/sh")).unwrap();
        symlink("/bin/true", root.join("usr/bin/true")).unwrap();
        symlink("loop", root.join("usr/bin/loop")).unwrap();
        let found = |p: &str| resolve_in_root(&root, Path::new(p)).filter(|p| is_executable(p));
        assert_eq!(found("/usr/local/bin/python"), Some(root.join("opt/py/bin/python3.8")));
        assert_eq!(found("/usr/local/bin/../../../../usr/local/bin/python3"), Some(root.join("opt/py/bin/python3.8")));
        for missing in ["/usr/bin/sh", "/usr/bin/true", "/usr/bin/loop", "/usr/bin/data", "/usr/bin/none"] {
            assert_eq!(found(missing), None, "{missing}");
        }

        let required = |run: &[&str], compile: Option<&[&str]>, path: &str| RequiredCommands {
            runtime: "rt".into(),
            commands: {
                let mut rt = tvm_config::Catalog::builtin().get("python").unwrap().clone();
                rt.run = run.iter().map(|s| s.to_string()).collect();
                rt.compile = compile.map(|c| c.iter().map(|s| s.to_string()).collect());
                RequiredCommands::of(&rt).commands
            },
            path: path.into(),
        };
        let ok = required(
            &["python", "{entry}"],
            Some(&["/opt/py/bin/python3.8", "-c", "1"][..]),
            "/usr/local/bin:/usr/bin",
        );
        assert_eq!(ok.commands, ["/opt/py/bin/python3.8", "python"]);
        ok.check(&root, "img").unwrap();
        // `./main` is made by the compile stage; templates are not commands.
        assert!(required(&["./main"], Some(&["{entry}"][..]), "/usr/bin").commands.is_empty());
        let err = required(&["sh", "x"], None, "/usr/bin:/bin").check(&root, "img:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the OCI image img:1 has no executable sh for runtime rt (looked for PATH /usr/bin:/bin)"
        );
        let err = required(&["/usr/bin/true"], None, "/usr/bin").check(&root, "img:1").unwrap_err();
        assert!(
            err.to_string().contains("no executable /usr/bin/true for runtime rt (looked for /usr/bin/true)"),
            "{err}"
        );
        // The guest's PATH is the runtime's environment, the last value winning.
        let mut rt = tvm_config::Catalog::builtin().get("python").unwrap().clone();
        rt.env.push(("PATH".into(), "/opt/py/bin".into()));
        assert_eq!(RequiredCommands::of(&rt).path, "/opt/py/bin");
    }

    /// Index entries with `(architecture, variant)` platforms (`os` linux, but
    /// `unknown` for Docker's attestation manifests); digest `i` is `sha256:<i>...`.
    fn index(platforms: &[(&str, Option<&str>)]) -> Vec<ImageIndexEntry> {
        let entries: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (arch, variant))| {
                let os = if *arch == "unknown" { "unknown" } else { "linux" };
                let mut platform = serde_json::json!({ "architecture": arch, "os": os });
                if let Some(v) = variant {
                    platform["variant"] = (*v).into();
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(i), "size": 1000, "platform": platform,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!(entries)).unwrap()
    }

    fn digest(i: usize) -> String {
        format!("sha256:{}", i.to_string().repeat(64).chars().take(64).collect::<String>())
    }

    #[test]
    fn an_index_resolves_to_the_guests_platform_or_names_what_it_offers() {
        use GuestArch::{Aarch64, X86_64};
        // As Docker Hub serves official images: arm/v7 (32-bit) before arm64/v8,
        // attestation manifests last.
        let hub = index(&[
            ("amd64", None),
            ("arm", Some("v7")),
            ("arm64", Some("v8")),
            ("unknown", Some("unknown")),
            ("unknown", Some("unknown")),
        ]);
        assert_eq!(platform_image(&hub, X86_64), Some(digest(0)));
        assert_eq!(platform_image(&hub, Aarch64), Some(digest(2)));
        // The variant is optional; later variants need CPU features guests may lack.
        let plain = index(&[("arm64", Some("v9")), ("amd64", Some("v3")), ("arm64", None), ("amd64", Some("v1"))]);
        assert_eq!(platform_image(&plain, Aarch64), Some(digest(2)));
        assert_eq!(platform_image(&plain, X86_64), Some(digest(3)));
        // No arm64 image: none chosen, and the error says what there is.
        let amd64_only = index(&[("amd64", None), ("arm", Some("v7")), ("unknown", Some("unknown"))]);
        assert_eq!(platform_image(&amd64_only, Aarch64), None);
        assert_eq!(offered_platforms(&amd64_only), "linux/amd64, linux/arm/v7, unknown/unknown/unknown");
        assert_eq!(offered_platforms(&[]), "none");
        let unmatched = Unmatched::new(Mutex::new(Some(offered_platforms(&amd64_only))));
        let not_found = || oci_client::errors::OciDistributionError::ImageManifestNotFoundError("no entry".into());
        let e = pull_error("127.0.0.1:5000/tvm/py:1", Aarch64, &unmatched, not_found());
        assert_eq!(
            e.to_string(),
            "the OCI image 127.0.0.1:5000/tvm/py:1 has no linux/arm64 image \
             (its index offers linux/amd64, linux/arm/v7, unknown/unknown/unknown)"
        );
        // Taken once: any other failure of the client is its own.
        assert!(matches!(pull_error("r", Aarch64, &unmatched, not_found()), ImageBuildError::Pull { .. }));
    }

    /// The index entries of a whole manifest document, parsed as the registry
    /// client parses what a registry serves (`OciManifest`, untagged).
    fn entries_of(document: &str) -> Vec<ImageIndexEntry> {
        match serde_json::from_str::<oci_client::manifest::OciManifest>(document).unwrap() {
            oci_client::manifest::OciManifest::ImageIndex(i) => i.manifests,
            oci_client::manifest::OciManifest::Image(_) => panic!("parsed as an image manifest"),
        }
    }

    #[test]
    fn real_index_documents_resolve_to_the_guests_platform() {
        use GuestArch::{Aarch64, X86_64};
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        // A Docker manifest list (schema 2) as Docker Hub serves the official
        // images that predate attestations: amd64, arm/v5, arm/v7, arm64/v8,
        // 386, mips64le, ppc64le, s390x.
        let list = format!(
            r#"{{
   "manifests": [
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "amd64", "os": "linux"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "arm", "os": "linux", "variant": "v5"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "arm", "os": "linux", "variant": "v7"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "arm64", "os": "linux", "variant": "v8"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "386", "os": "linux"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "mips64le", "os": "linux"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "ppc64le", "os": "linux"}}, "size": 529}},
      {{"digest": "{}", "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "platform": {{"architecture": "s390x", "os": "linux"}}, "size": 529}}
   ],
   "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "schemaVersion": 2
}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('d'),
            d('e'),
            d('f'),
            d('1'),
            d('2')
        );
        let list = entries_of(&list);
        assert_eq!(platform_image(&list, X86_64), Some(d('a')));
        assert_eq!(platform_image(&list, Aarch64), Some(d('d')));

        // An OCI image index as `docker buildx` pushes it (Docker Hub's
        // official images today): arm64 first, Windows and attestation
        // manifests (`unknown/unknown`, annotated) beside the Linux images.
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1022,
  "annotations":{{"org.opencontainers.image.base.name":"debian:trixie-slim"}},
  "platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1022,
  "platform":{{"architecture":"amd64","os":"windows","os.version":"10.0.20348.2966"}}}},
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1022,
  "platform":{{"architecture":"amd64","os":"linux"}}}},
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":566,
  "annotations":{{"vnd.docker.reference.digest":"{}","vnd.docker.reference.type":"attestation-manifest"}},
  "platform":{{"architecture":"unknown","os":"unknown"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('d'),
            d('a')
        );
        let index = entries_of(&index);
        assert_eq!(platform_image(&index, X86_64), Some(d('c')), "not the Windows image listed first");
        assert_eq!(platform_image(&index, Aarch64), Some(d('a')));

        // The image-spec's own example (image-index.md): ppc64le and an amd64
        // image with `os.features`; nothing for arm64, and the error says so.
        let spec = format!(
            r#"{{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {{"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 7143, "digest": "{}",
      "platform": {{"architecture": "ppc64le", "os": "linux"}}}},
    {{"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 7682, "digest": "{}",
      "platform": {{"architecture": "amd64", "os": "linux", "os.features": ["sse4"]}}}}
  ],
  "annotations": {{"com.example.key1": "value1"}}}}"#,
            d('a'),
            d('b')
        );
        let spec = entries_of(&spec);
        assert_eq!(platform_image(&spec, X86_64), Some(d('b')));
        assert_eq!(platform_image(&spec, Aarch64), None);
        assert_eq!(offered_platforms(&spec), "linux/ppc64le, linux/amd64");
    }

    #[test]
    fn an_image_without_an_index_must_be_for_the_guests_architecture() {
        use GuestArch::{Aarch64, X86_64};
        let arm = br#"{"architecture": "arm64", "os": "linux", "variant": "v8", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}"#;
        assert!(config_platform(arm, "r", Aarch64).is_ok());
        let e = config_platform(arm, "127.0.0.1:5000/tvm/py@sha256:ab", X86_64).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the OCI image 127.0.0.1:5000/tvm/py@sha256:ab is for linux/arm64/v8, not for the guests' linux/amd64"
        );
        // No architecture: nothing says it would not run.
        assert!(config_platform(br#"{"rootfs": {"type": "layers", "diff_ids": []}}"#, "r", Aarch64).is_ok());
        assert!(matches!(config_platform(b"not json", "r", X86_64), Err(ImageBuildError::OciImage { .. })));
    }

    #[test]
    fn tags_are_pinned_by_digest_without_the_tag() {
        let r: Reference = "python:3.8-slim".parse().unwrap();
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(pinned_reference(&r, &d), format!("docker.io/library/python@{d}"));
        let pinned = pinned_reference(&"127.0.0.1:5000/tvm/py:1".parse().unwrap(), &d);
        assert_eq!(pinned, format!("127.0.0.1:5000/tvm/py@{d}"));
        assert!(is_tag_only(&ImageRecipe::oci("python:3.8-slim")));
        assert!(is_tag_only(&ImageRecipe::oci("127.0.0.1:5000/tvm/py")));
        assert!(!is_tag_only(&ImageRecipe::oci(&pinned)));
        assert!(!is_tag_only(&ImageRecipe::debian("bookworm", &["gcc"])));

        // The record maps the tag recipe to the pinned one; the image is found through it.
        let t = tempfile::tempdir().unwrap();
        let settings = Settings { cache_dir: t.path().to_path_buf(), ..Settings::default() };
        let cache = Cache::new(t.path());
        let tag = ImageRecipe::oci("127.0.0.1:5000/tvm/py:1");
        assert!(recorded_pin(&cache, &tag).is_none());
        record_tag(&cache, &tag, &pinned).unwrap();
        assert_eq!(recorded_pin(&cache, &tag), Some(ImageRecipe::oci(&pinned)));
        let records = tag_records(&settings);
        assert_eq!((records.len(), records[0].pinned.as_str()), (1, pinned.as_str()));
        let key = ImageRecipe::oci(&pinned).key();
        std::fs::write(cache.image_path(&key), b"erofs").unwrap();
        let meta = ImageMeta {
            key: key.clone(),
            suite: String::new(),
            packages: Vec::new(),
            created_unix: 1,
            size_bytes: 5,
            build_seconds: 0.0,
            installed: Vec::new(),
            manifest_digest: Some(d.clone()),
            oci_reference: Some(pinned.clone()),
        };
        std::fs::write(cache.image_meta(&key), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert_eq!(find_image(&settings, &tag).map(|i| i.key), Some(key));
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for r in ["localhost:5000", "127.0.0.1:5000", "[::1]:5000", "localhost"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["index.docker.io", "ghcr.io", "10.0.0.1:5000"] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
