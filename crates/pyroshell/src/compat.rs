//! What the compatibility APIs (Piston v2 in [`crate::piston`], Judge0 CE in
//! [`crate::judge0`]) share: full `x.y.z` runtime versions from image
//! metadata, raw body reading with TVM's limits, signal names.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use tvm_config::Runtime;

use crate::error::ApiError;
use crate::state::AppState;

/// Installed versions by image key. Keys are content addresses, so an entry never goes stale.
fn version_cache() -> &'static Mutex<HashMap<String, String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The leading `x.y.z` of a Debian or upstream version string: the epoch
/// (`4:`) and everything from the first character that is neither a digit
/// nor a dot (`-3`, `+dfsg`, `~deb12u1`) dropped, missing parts padded with 0.
/// `None` when it does not start with a number.
///
/// `"4:12.2.0-3"` → `12.2.0`, `"21.0.5+11-1"` → `21.0.5`, `"1.78.0+dfsg1"` → `1.78.0`, `"24"` → `24.0.0`.
pub(crate) fn semver_of(raw: &str) -> Option<String> {
    let s = raw.split_once(':').map_or(raw, |(_, rest)| rest);
    let numeric: String = s.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut parts: Vec<u64> = numeric.split('.').filter(|p| !p.is_empty()).map_while(|p| p.parse().ok()).collect();
    if parts.is_empty() {
        return None;
    }
    parts.truncate(3);
    parts.resize(3, 0);
    Some(format!("{}.{}.{}", parts[0], parts[1], parts[2]))
}

/// The catalog version as `x.y.z` (`"3.13"` → `3.13.0`, `"gcc-14"` → `14.0.0`), for runtimes whose image is not built.
fn catalog_semver(rt: &Runtime) -> String {
    let digits = rt.version.trim_start_matches(|c: char| !c.is_ascii_digit());
    semver_of(digits).unwrap_or_else(|| "0.0.0".into())
}

/// The full version of `rt`: the installed version of its principal package
/// (the Node.js build for `node` recipes, else the recipe's first package)
/// as recorded in the image's metadata, or the catalog version padded to
/// `x.y.z` while the image is not built. Returns `(version, from_image)`.
pub(crate) fn full_version(st: &AppState, rt: &Runtime) -> (String, bool) {
    let Some(recipe) = &rt.image else { return (catalog_semver(rt), false) };
    let key = recipe.key();
    if let Some(v) = version_cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return (v.clone(), true);
    }
    let Some(image) = pyrovm::image::find_image(st.vmm.settings(), recipe) else { return (catalog_semver(rt), false) };
    let installed = &image.meta.installed;
    let node = st.vmm.settings().guest_arch.node_package();
    let principal = installed.iter().find(|(p, _)| p == node).or_else(|| installed.first());
    match principal.and_then(|(_, v)| semver_of(v)) {
        Some(v) => {
            version_cache().lock().unwrap_or_else(|p| p.into_inner()).insert(key, v.clone());
            (v, true)
        }
        None => (catalog_semver(rt), false),
    }
}

/// The name of signal `n` (`9` → `SIGKILL`), or `None` for a number Linux does not name.
pub(crate) fn signal_name(n: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(n).ok().map(|s| s.as_str())
}

/// Why a raw body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Larger than `max_body_bytes` (413).
    TooLarge(ApiError),
    /// Not received within `body_timeout_ms` (408).
    Timeout(ApiError),
    /// The connection failed while reading (400).
    Broken(ApiError),
}

impl BodyError {
    /// The TVM error behind it (status and message).
    pub(crate) fn into_api(self) -> ApiError {
        match self {
            BodyError::TooLarge(e) | BodyError::Timeout(e) | BodyError::Broken(e) => e,
        }
    }
}

/// The request body with TVM's limits: refused on a declared length above
/// `max_body_bytes` before reading, 413 past it while reading, 408 when it
/// takes longer than `body_timeout_ms`. The content type is left to the caller.
///
/// # Errors
/// [`BodyError`] as above.
pub(crate) async fn read_body(req: Request, st: &std::sync::Arc<AppState>) -> Result<Bytes, BodyError> {
    let limit = st.config.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(ApiError::PayloadTooLarge { limit }));
    }
    let ms = st.config.body_timeout_ms;
    let read = tokio::time::timeout(std::time::Duration::from_millis(ms), Bytes::from_request(req, st));
    read.await.map_err(|_| BodyError::Timeout(ApiError::BodyTimeout { ms }))?.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            BodyError::TooLarge(ApiError::PayloadTooLarge { limit })
        } else {
            BodyError::Broken(ApiError::Malformed { message: e.body_text() })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_become_semver() {
        assert_eq!(semver_of("4:12.2.0-3").as_deref(), Some("12.2.0"));
        assert_eq!(semver_of("21.0.5+11-1").as_deref(), Some("21.0.5"));
        assert_eq!(semver_of("1.78.0+dfsg1-2~deb11u3").as_deref(), Some("1.78.0"));
        assert_eq!(semver_of("3.13.5-2").as_deref(), Some("3.13.5"));
        assert_eq!(semver_of("24").as_deref(), Some("24.0.0"));
        assert_eq!(semver_of("1:19.1.7-3").as_deref(), Some("19.1.7"));
        assert_eq!(semver_of("1.2.3.4").as_deref(), Some("1.2.3"));
        assert_eq!(semver_of("abc"), None);
        assert_eq!(semver_of(""), None);
    }

    #[test]
    fn signals_are_named() {
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(11), Some("SIGSEGV"));
        assert_eq!(signal_name(25), Some("SIGXFSZ"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(99), None);
    }
}
