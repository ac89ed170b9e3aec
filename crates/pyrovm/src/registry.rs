//! Whether the registry of an OCI image source answers, which decides whether
//! a runtime with an OCI recipe and no built image is `buildable` or
//! `unavailable: registry unreachable (...)`.
//!
//! The probe is the Distribution API's version check: `GET /v2/` (HTTPS; plain
//! HTTP for registries on this machine, as the puller talks to them), bounded
//! by [`PROBE_TIMEOUT`]. A registry answers when it replies 200 (no auth) or
//! 401 (auth required: Docker Hub, htpasswd), as the distribution spec's
//! "determining support" section says. Registries are named as the OCI client
//! resolves them (`docker.io` is `index.docker.io`). Each registry is probed
//! once per process, in a background thread of its own, so several probe
//! concurrently and no caller ever waits unless it asks to
//! ([`probe_blocking`]); the answer is kept for the life of the process.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use oci_client::Reference;
use tvm_config::{Runtime, Settings};

/// How long one probe may take, connection and answer together.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// A registry's answer to the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// It answered the v2 API (200 or 401).
    Answers,
    /// It did not: why, in one line (`GET https://host/v2/: dns error: ...`).
    Unreachable(String),
}

/// The registry host (`host[:port]`) an OCI reference pulls from, as the
/// OCI client resolves it (`python:3.8` → `index.docker.io`); `None` when the
/// reference does not parse.
pub fn registry_of(reference: &str) -> Option<String> {
    reference.parse::<Reference>().ok().map(|r| r.resolve_registry().to_string())
}

/// Probe results of this process: `None` while a probe runs.
struct Probes {
    results: Mutex<HashMap<String, Option<Reachability>>>,
    changed: Condvar,
}

fn probes() -> &'static Probes {
    static PROBES: OnceLock<Probes> = OnceLock::new();
    PROBES.get_or_init(|| Probes { results: Mutex::new(HashMap::new()), changed: Condvar::new() })
}

fn lock(p: &Probes) -> MutexGuard<'_, HashMap<String, Option<Reachability>>> {
    p.results.lock().unwrap_or_else(|e| e.into_inner())
}

/// The known answer of `registry`, starting its probe in the background when
/// none has started yet (`None` until the probe finishes). Never blocks.
pub fn reachability(registry: &str) -> Option<Reachability> {
    let p = probes();
    let mut results = lock(p);
    if let Some(known) = results.get(registry) {
        return known.clone();
    }
    results.insert(registry.to_string(), None);
    drop(results);
    let host = registry.to_string();
    let spawned = std::thread::Builder::new().name("registry-probe".into()).spawn(move || {
        let answer = probe(&host);
        tracing::info!(registry = %host, ?answer, "registry probed");
        record(&host, answer);
    });
    if let Err(e) = spawned {
        record(registry, Reachability::Unreachable(format!("the probe could not start: {e}")));
    }
    None
}

fn record(registry: &str, answer: Reachability) {
    let p = probes();
    lock(p).insert(registry.to_string(), Some(answer));
    p.changed.notify_all();
}

/// Probes `registries` (concurrently, those not probed yet) and waits until
/// every one has an answer, at most [`PROBE_TIMEOUT`] plus a second; for
/// commands that print states (`tvm runtimes`, `tvm doctor`), never for a
/// server's request.
pub fn probe_blocking<I: IntoIterator<Item = String>>(registries: I) {
    let registries: Vec<String> = registries.into_iter().collect();
    for r in &registries {
        reachability(r);
    }
    let p = probes();
    let deadline = Instant::now() + PROBE_TIMEOUT + Duration::from_secs(1);
    let mut results = lock(p);
    while registries.iter().any(|r| matches!(results.get(r), Some(None))) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { return };
        results = p.changed.wait_timeout(results, left).unwrap_or_else(|e| e.into_inner()).0;
    }
}

/// The registries whose answer decides the state of `runtimes` here: those
/// of OCI recipes whose image is not built, of entries the catalog does not
/// mark unavailable.
pub fn registries_of<'a>(settings: &Settings, runtimes: impl IntoIterator<Item = &'a Runtime>) -> Vec<String> {
    let mut out: Vec<String> = runtimes
        .into_iter()
        .filter(|r| r.unavailable.is_none())
        .filter_map(|r| r.image.as_ref())
        .filter(|recipe| recipe.oci.is_some() && super::find_image(settings, recipe).is_none())
        .filter_map(|recipe| recipe.oci.as_deref().and_then(registry_of))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One probe of `registry`, in a runtime of its own (called on a probe thread).
fn probe(registry: &str) -> Reachability {
    let scheme = if super::oci::is_loopback(registry) { "http" } else { "https" };
    let url = format!("{scheme}://{registry}/v2/");
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Reachability::Unreachable(format!("the probe could not start: {e}")),
    };
    rt.block_on(async {
        let client = match reqwest::Client::builder()
            .connect_timeout(PROBE_TIMEOUT)
            .timeout(PROBE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
        {
            Ok(c) => c,
            Err(e) => return Reachability::Unreachable(format!("GET {url}: {}", innermost(&e))),
        };
        match client.get(&url).send().await {
            Ok(resp) => classify(&url, resp.status().as_u16()),
            Err(e) if e.is_timeout() => {
                Reachability::Unreachable(format!("GET {url}: no answer within {} s", PROBE_TIMEOUT.as_secs()))
            }
            Err(e) => Reachability::Unreachable(format!("GET {url}: {}", innermost(&e))),
        }
    })
}

/// 200 and 401 are the v2 API's answers; anything else is something else.
fn classify(url: &str, status: u16) -> Reachability {
    match status {
        200 | 401 => Reachability::Answers,
        s => Reachability::Unreachable(format!("GET {url} answered HTTP {s}, not the registry v2 API")),
    }
}

/// The deepest cause of an error chain (reqwest's own message only names the
/// URL; the cause says what happened: DNS, refused, TLS), on one line.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut at = e;
    while let Some(next) = at.source() {
        at = next;
    }
    at.to_string().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_named_as_the_client_resolves_them() {
        assert_eq!(registry_of("python:3.8-slim").as_deref(), Some("index.docker.io"));
        assert_eq!(registry_of("docker.io/library/python:3.8-slim").as_deref(), Some("index.docker.io"));
        assert_eq!(registry_of("127.0.0.1:5000/tvm/python:1").as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(registry_of("Not A Reference"), None);
    }

    #[test]
    fn only_200_and_401_mean_the_v2_api_answers() {
        assert_eq!(classify("u", 200), Reachability::Answers);
        assert_eq!(classify("u", 401), Reachability::Answers);
        for s in [301, 403, 404, 500, 502] {
            assert!(matches!(classify("u", s), Reachability::Unreachable(why) if why.contains(&s.to_string())), "{s}");
        }
    }

    #[test]
    fn a_closed_port_is_unreachable_with_the_cause_and_asked_once() {
        // A port that was just free and is closed again: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let registry = format!("127.0.0.1:{port}");
        probe_blocking([registry.clone()]);
        let Some(Reachability::Unreachable(why)) = reachability(&registry) else { panic!("not unreachable") };
        assert!(why.starts_with(&format!("GET http://{registry}/v2/: ")) && why.contains("refused"), "{why}");
        assert!(!why.contains('\n'));
        // Known now: asking again neither probes nor waits.
        assert_eq!(reachability(&registry), Some(Reachability::Unreachable(why)));
    }
}
