//! The template cache's size cap: templates are a cache, so past
//! [`Templates::with_max_bytes`] the least recently used ones are removed.
//!
//! "Used" is the mtime of a `used` file in the template's directory, set on
//! every restore ([`Templates::open_state`]); a template never restored
//! counts from when it was built (its `meta.json`). The cap is enforced
//! after each build, the only time the cache grows, and never removes the
//! template just built; and when a process prepares to run VMs
//! (`Pyrovm::prepare`), so a lowered cap holds at once. Removal is [`Templates::remove`]: renamed aside
//! first, so a process restoring from it meanwhile keeps its open state
//! file and others see the template whole or not at all.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::{info, warn};

use super::{Template, Templates};

/// The file whose mtime says when a template was last restored from.
const USED: &str = "used";

/// One template directory as the cap sees it.
#[derive(Debug)]
struct Entry {
    key: String,
    bytes: u64,
    used: SystemTime,
}

impl Templates {
    /// Caps the templates in the cache at `max_bytes` (0: no cap).
    pub fn with_max_bytes(self, max_bytes: u64) -> Self {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        self
    }

    /// The cap (0: none).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Bytes the templates take in the cache (every file of every template
    /// directory; failure markers and scratch space are not templates).
    pub fn total_bytes(&self) -> u64 {
        self.entries().iter().map(|e| e.bytes).sum()
    }

    /// Records that `t` is being restored from now (best effort: a template
    /// whose mark cannot be written only looks older to the cap).
    pub(super) fn mark_used(&self, t: &Template) {
        mark_used(&t.key, &t.dir);
    }

    /// Removes the least recently used templates other than `keep` until
    /// the rest fit under the cap. Returns the keys removed.
    pub fn evict_to_fit(&self, keep: &str) -> Vec<String> {
        let max = self.max_bytes();
        if max == 0 {
            return Vec::new();
        }
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        // Oldest first; the key breaks ties so the order is stable.
        entries.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.key.cmp(&b.key)));
        let mut removed = Vec::new();
        for e in entries {
            if total <= max {
                break;
            }
            if e.key == keep {
                continue;
            }
            match self.remove(&e.key) {
                Ok(true) => {
                    info!(key = %e.key, bytes = e.bytes, total, max, "template evicted (least recently used)");
                    removed.push(e.key);
                    total = total.saturating_sub(e.bytes);
                }
                // Another process removed it meanwhile: its bytes are gone too.
                Ok(false) => total = total.saturating_sub(e.bytes),
                Err(err) => warn!(key = %e.key, error = %crate::error_chain(&err), "cannot evict template"),
            }
        }
        removed
    }

    /// Every template directory (a hex-named directory under `templates/`).
    fn entries(&self) -> Vec<Entry> {
        let Ok(dirs) = std::fs::read_dir(self.dir()) else { return Vec::new() };
        dirs.flatten()
            .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|d| {
                let key = d.file_name().to_str()?.to_string();
                key.bytes().all(|b| b.is_ascii_hexdigit()).then(|| entry(key, &d.path()))
            })
            .collect()
    }
}

fn mark_used(key: &str, dir: &Path) {
    let marked = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(USED))
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = marked {
        warn!(key, error = %e, "cannot mark the template as used");
    }
}

/// The bytes a file takes: its length, or less for a sparse file (a
/// template's `ram` is mostly holes).
fn disk_bytes(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.len().min(m.blocks().saturating_mul(512))
}

fn entry(key: String, dir: &Path) -> Entry {
    let mtime = |name: &str| std::fs::metadata(dir.join(name)).and_then(|m| m.modified()).ok();
    let used = mtime(USED).or_else(|| mtime("meta.json")).or_else(|| mtime(".")).unwrap_or(SystemTime::UNIX_EPOCH);
    let bytes = std::fs::read_dir(dir)
        .map(|files| {
            files.flatten().filter_map(|f| f.metadata().ok()).filter(|m| m.is_file()).map(|m| disk_bytes(&m)).sum()
        })
        .unwrap_or(0);
    Entry { key, bytes, used }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A template directory of `bytes` state last used `age_s` seconds ago.
    fn template(store: &Templates, key: &str, bytes: usize, age_s: u64) {
        let dir = store.dir().join(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), vec![0u8; bytes]).unwrap();
        let used = std::fs::File::create(dir.join(USED)).unwrap();
        used.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_new_one_stays() {
        let cache = tempfile::tempdir().unwrap();
        let store = Templates::new(cache.path()).with_max_bytes(2500);
        template(&store, "aa", 1000, 300);
        template(&store, "bb", 1000, 100);
        template(&store, "cc", 1000, 200);
        // The newest build is also the oldest-looking one: it is kept anyway.
        template(&store, "dd", 1000, 400);
        std::fs::write(store.dir().join("ee.failed"), b"a failure marker is no template").unwrap();
        assert_eq!(store.total_bytes(), 4000);
        assert_eq!(store.evict_to_fit("dd"), ["aa", "cc"]);
        assert_eq!(store.total_bytes(), 2000);
        assert!(store.dir().join("bb").is_dir() && store.dir().join("dd").is_dir());
        assert!(store.dir().join("ee.failed").is_file());
        assert!(store.evict_to_fit("dd").is_empty(), "under the cap nothing goes");
    }

    #[test]
    fn no_cap_removes_nothing_and_a_restore_marks_use() {
        let cache = tempfile::tempdir().unwrap();
        let store = Templates::new(cache.path());
        template(&store, "aa", 10_000, 10);
        assert!(store.evict_to_fit("").is_empty());
        let store = store.with_max_bytes(1);
        let before = entry("aa".into(), &store.dir().join("aa")).used;
        mark_used("aa", &store.dir().join("aa"));
        assert!(entry("aa".into(), &store.dir().join("aa")).used > before);
        // Alone, over the cap, and not the one kept: it goes.
        assert_eq!(store.evict_to_fit("other"), ["aa"]);
        assert_eq!(store.total_bytes(), 0);
    }
}
