//! A test's own cache directory: its templates are its own to build,
//! corrupt and delete while other tests run; kernel, images, initramfs, probe
//! results and packages are links into the shared cache.

use std::path::{Path, PathBuf};

use super::TempDir;

/// The shared cache, as `Settings` finds it.
pub fn shared_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("TVM_CACHE_DIR") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    base.join("tvm")
}

/// A test's own cache: its templates live here, the rest links to the shared cache.
pub struct Cache {
    pub dir: TempDir,
}

impl Cache {
    pub fn new() -> Self {
        let dir = TempDir::default();
        let shared = shared_cache();
        for sub in ["kernel", "images", "initrd", "probe", "debs"] {
            std::fs::create_dir_all(shared.join(sub)).unwrap();
            std::os::unix::fs::symlink(shared.join(sub), dir.path().join(sub)).unwrap();
        }
        Self { dir }
    }

    pub fn templates(&self) -> PathBuf {
        self.dir.path().join("templates")
    }

    /// Directories of the built templates.
    pub fn built(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.templates()) else { return Vec::new() };
        let mut dirs: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.join("meta.json").is_file()).collect();
        dirs.sort();
        dirs
    }

    /// The one template built so far.
    pub fn only(&self) -> PathBuf {
        let built = self.built();
        assert_eq!(built.len(), 1, "exactly one template: {built:?}");
        built.into_iter().next().unwrap()
    }

    /// No build left a scratch directory behind.
    pub fn assert_no_scratch(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir.path().join("tmp"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "scratch left in the cache: {left:?}");
    }
}

/// Replaces the saved VM state of template `dir` with `state` and rewrites
/// its metadata to match, as a template saved by a broken VMM would be: it
/// passes the integrity check, and only the restore can find it is no VM.
pub fn replace_state_keeping_checksums(dir: &Path, state: &[u8]) {
    use sha2::Digest;
    std::fs::write(dir.join("state"), state).unwrap();
    let meta_path = dir.join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["state_sha256"] = hex::encode(sha2::Sha256::digest(state)).into();
    meta["state_bytes"] = state.len().into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
}
