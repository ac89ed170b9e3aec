//! HTTP surface: router, handlers, request-id and auth middleware, JSON extraction.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream as FutStream;
use serde::de::DeserializeOwned;
use tracing::{info, info_span, Instrument, Span};
use tvm_protocol::Stream;

use crate::api::{
    DefaultLimits, ExecutionBody, ExecutionResult, HealthBody, LimitsInfo, OutputEvent, PoolInfo, ReadyBody,
    RuntimeInfo, RuntimesBody,
};
use crate::error::{ApiError, ErrorBody};
use crate::exec;
use crate::images::ImageState;
use crate::sse::Utf8Chunks;
use crate::state::AppState;

type St = State<Arc<AppState>>;

/// Builds the whole application.
pub(crate) fn router(st: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/executions", post(create_execution))
        .route("/v1/executions/stream", post(stream_execution))
        .route("/v1/runtimes", get(list_runtimes))
        .route("/v1/sessions", get(crate::session::native_route))
        .route_layer(middleware::from_fn_with_state(st.clone(), require_api_key));
    let mut app = Router::new()
        .merge(protected)
        .merge(crate::piston::router(st.clone()))
        .merge(crate::judge0::router(st.clone()))
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(st.config.max_body_bytes));
    if let Some(cors) = cors_layer(&st.config.cors_origins) {
        app = app.layer(cors);
    }
    app.layer(middleware::from_fn_with_state(st.clone(), check_host))
        .layer(middleware::from_fn_with_state(st.clone(), request_context))
        .with_state(st)
}

/// CORS only for origins the operator named: with none, no CORS header is
/// sent and browsers keep other origins from reading any answer.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            "x-api-key".parse().unwrap(),
            "x-request-id".parse().unwrap(),
        ])
        .expose_headers(["x-request-id".parse().unwrap(), header::RETRY_AFTER]);
    Some(layer)
}

/// The host a request names (`Host`, or the HTTP/2 `:authority`), without port, lowercase.
fn request_host(req: &Request) -> Option<String> {
    let raw = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string);
    let raw = raw.or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    let raw = raw.rsplit_once('@').map_or(raw.as_str(), |(_, h)| h).to_ascii_lowercase();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        format!("[{}]", rest.split_once(']').map_or(rest, |(h, _)| h))
    } else {
        raw.split_once(':').map_or(raw.as_str(), |(h, _)| h).to_string()
    };
    Some(host.trim_end_matches('.').to_string())
}

/// Names that always mean this machine: `localhost` (and its subdomains,
/// which browsers resolve to loopback themselves), 127.0.0.0/8 and `[::1]`.
fn is_loopback_name(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `host` passes: a loopback name when listening on loopback, or
/// one of `allowed` (`name`, `.suffix`, `*`); anything when neither applies.
pub(crate) fn host_allowed(host: &str, loopback_listener: bool, allowed: &[String]) -> bool {
    let listed = allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == "*" || a == host || (a.starts_with('.') && (host.ends_with(&a) || host == &a[1..]))
    });
    if listed || (loopback_listener && is_loopback_name(host)) {
        return true;
    }
    !loopback_listener && allowed.is_empty()
}

/// DNS-rebinding defence: a page served from another name that resolves to
/// this server sends its own name as `Host`; such requests are refused.
/// A request without any host (HTTP/1.0) cannot come from a browser and passes.
async fn check_host(State(st): St, req: Request, next: Next) -> Response {
    if let Some(host) = request_host(&req) {
        if !host_allowed(&host, st.config.listen.ip().is_loopback(), &st.config.allowed_hosts) {
            return ApiError::HostNotAllowed { host }.into_response();
        }
    }
    next.run(req).await
}

/// A client-supplied id is kept if it is short and plain, so it can go into logs and headers verbatim.
fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_string())
}

/// Outermost layer: request id, tracing span, access log, request metrics.
async fn request_context(State(st): St, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    // The route template, not the path: bounded label values for metrics.
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "other".into());
    let span = info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let started = Instant::now();
    let mut pending = Unanswered { st: st.clone(), route, span: span.clone(), started, answered: false };
    let mut resp = next.run(req).instrument(span).await;
    pending.answered = true;
    let status = resp.status().as_u16();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    pending.st.metrics.request(&pending.route, status);
    pending.span.in_scope(|| info!(status, ms = started.elapsed().as_millis() as u64, "request answered"));
    resp
}

/// Notices a request whose client hung up first: hyper then drops the
/// handler (and with it any VM), and this records it as status 499, the
/// usual "client closed request".
struct Unanswered {
    st: Arc<AppState>,
    route: String,
    span: Span,
    started: Instant,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            self.st.metrics.request(&self.route, 499);
            let ms = self.started.elapsed().as_millis() as u64;
            self.span.in_scope(|| info!(ms, "client disconnected before the answer; work abandoned"));
        }
    }
}

/// Compares without an early exit, so response time does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, key) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

pub(crate) fn key_accepted(keys: &[String], headers: &HeaderMap) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(given) = presented_key(headers) else { return false };
    // Check every key, whatever matches first.
    keys.iter().fold(false, |ok, k| ok | constant_time_eq(k.as_bytes(), given.as_bytes()))
}

async fn require_api_key(State(st): St, req: Request, next: Next) -> Response {
    if key_accepted(&st.config.api_keys, req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// JSON body extraction with API-shaped errors: 415 unless the body is
/// declared JSON (`application/json` or `application/*+json`: the media
/// types a browser cannot send cross-origin without a CORS preflight), 413
/// past the body limit, 408 when the body (with the wait for a parse slot)
/// takes longer than `body_timeout_ms`, 400 with serde's message (line,
/// column, field) for anything malformed, 422 for counts and sizes over
/// their limits (see [`crate::wire`]). serde_json also refuses nesting
/// deeper than 128 levels, so no body can exhaust the stack.
pub(crate) struct ApiJson<T>(pub T);

/// [`ApiJson`] without the media-type check, for compatibility APIs whose
/// clients send JSON as `text/plain` (Piston's do). Such routes are open to
/// cross-origin browser requests: use only where the peer API requires it.
// Used by the compatibility API routes (Piston); kept here next to ApiJson so both read bodies alike.
#[allow(dead_code)]
pub(crate) struct JsonAnyType<T>(pub T);

/// Whether a Content-Type names JSON: `application/json` or `application/*+json`, any parameters.
pub(crate) fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<T: DeserializeOwned + Send + 'static> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE);
        if !ct.and_then(|v| v.to_str().ok()).is_some_and(is_json_media_type) {
            let got = ct.map_or("none".to_string(), |v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            return Err(ApiError::UnsupportedMediaType { got });
        }
        read_json(req, st).await.map(ApiJson)
    }
}

impl<T: DeserializeOwned + Send + 'static> FromRequest<Arc<AppState>> for JsonAnyType<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ApiError> {
        read_json(req, st).await.map(JsonAnyType)
    }
}

/// Reads a body, then parses it under a parse slot: at most
/// `max_concurrent_parses` bodies are parsed at once, so the CPU and memory
/// of parsing before admission are bounded by slots × what one body can
/// cost (see [`crate::wire`]). The slot is taken only once the body is in:
/// a slow client never holds one.
async fn read_json<T: DeserializeOwned + Send + 'static>(req: Request, st: &Arc<AppState>) -> Result<T, ApiError> {
    let ms = st.config.body_timeout_ms;
    let work = async {
        let bytes = read_body(req, st).await?;
        let slot = st.parses.clone().acquire_owned().await.map_err(|_| ApiError::Draining)?;
        // Parsing is CPU work of up to ~100 ms for the largest bodies: off the async workers.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            crate::wire::parse::<T>(&bytes)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request parsing failed: {e}")))?
    };
    tokio::time::timeout(std::time::Duration::from_millis(ms), work).await.map_err(|_| ApiError::BodyTimeout { ms })?
}

async fn read_body(req: Request, st: &Arc<AppState>) -> Result<Bytes, ApiError> {
    let limit = st.config.max_body_bytes;
    // Refuse on the declared length alone, before the client spends time sending it all.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Bytes::from_request(req, st).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::Malformed { message: e.body_text() }
        }
    })
}

/// Run a program and answer when it is done.
#[utoipa::path(
    post, path = "/v1/executions", tag = "executions",
    request_body = ExecutionBody,
    responses(
        (status = 200, description = "The execution ran (or TVM failed: verdict `internal_error`).", body = ExecutionResult),
        (status = 400, description = "Malformed JSON, wrong types, unknown fields, or not a JSON object.", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key.", body = ErrorBody),
        (status = 408, description = "The body (with the wait for a parse slot) took longer than the server's body timeout.", body = ErrorBody),
        (status = 413, description = "Body larger than the server's limit.", body = ErrorBody),
        (status = 415, description = "Body not declared as JSON (`Content-Type: application/json`).", body = ErrorBody),
        (status = 422, description = "Cannot run: unknown runtime, limit out of range, bad base64, unsafe or conflicting file names, too many/large files or arguments, network refused, more guest RAM than the server has.", body = ErrorBody),
        (status = 429, description = "Queue full or queueing deadline passed; see Retry-After.", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "Draining (Retry-After), the runtime's image not built yet (`runtime_not_ready`, Retry-After), or the runtime unavailable until the operator acts (`runtime_unavailable`: a failed image build or an unreachable registry; no Retry-After, do not retry).", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn create_execution(
    State(st): St,
    ApiJson(body): ApiJson<ExecutionBody>,
) -> Result<Json<ExecutionResult>, ApiError> {
    let _in_flight = st.life.begin()?;
    let prepared = exec::prepare(&st, body).await?;
    // If the client goes away, this future is dropped and the VM with it.
    Ok(Json(exec::run(&st, prepared, |_, _, _| {}).await))
}

/// Run a program and stream its output as server-sent events.
///
/// Events: `stdout` and `stderr` (data: `OutputEvent` JSON) as output is
/// produced, then one `result` (data: `ExecutionResult` JSON). Errors before
/// the run starts are answered with the same statuses as `POST /v1/executions`.
#[utoipa::path(
    post, path = "/v1/executions/stream", tag = "executions",
    request_body = ExecutionBody,
    responses(
        (status = 200, description = "Server-sent events (see `x-events` and the `StreamEvent` schema): `stdout`/`stderr` events whose data is an OutputEvent, then one `result` event whose data is an ExecutionResult; comment lines keep the connection alive.", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed JSON, wrong types, unknown fields, or not a JSON object.", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key.", body = ErrorBody),
        (status = 408, description = "The body (with the wait for a parse slot) took longer than the server's body timeout.", body = ErrorBody),
        (status = 413, description = "Body larger than the server's limit.", body = ErrorBody),
        (status = 415, description = "Body not declared as JSON (`Content-Type: application/json`).", body = ErrorBody),
        (status = 422, description = "Cannot run: unknown runtime, limit out of range, bad base64, unsafe or conflicting file names, too many/large files or arguments, network refused, more guest RAM than the server has.", body = ErrorBody),
        (status = 429, description = "Queue full or queueing deadline passed; see Retry-After.", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "Draining (Retry-After), the runtime's image not built yet (`runtime_not_ready`, Retry-After), or the runtime unavailable until the operator acts (`runtime_unavailable`: a failed image build or an unreachable registry; no Retry-After, do not retry).", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn stream_execution(
    State(st): St,
    ApiJson(body): ApiJson<ExecutionBody>,
) -> Result<Sse<impl FutStream<Item = Result<Event, Infallible>>>, ApiError> {
    let in_flight = st.life.begin()?;
    let prepared = exec::prepare(&st, body).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let task = async move {
        let _in_flight = in_flight;
        let mut chunks = Utf8Chunks::default();
        let out = tx.clone();
        let execution = exec::run(&st, prepared, |stage, stream, data| {
            if let Some(text) = chunks.push(stage, stream, data) {
                let _ = out.send(output_event(stage, stream, text));
            }
        });
        let result = tokio::select! {
            r = execution => r,
            // Nobody is listening any more: dropping the execution destroys the VM.
            _ = tx.closed() => {
                info!("client disconnected; execution abandoned");
                return;
            }
        };
        for (stage, stream, text) in chunks.finish() {
            let _ = tx.send(output_event(stage, stream, text));
        }
        let ev =
            Event::default().event("result").json_data(&result).unwrap_or_else(|_| Event::default().event("result"));
        let _ = tx.send(ev);
    };
    tokio::spawn(task.instrument(Span::current()));
    let events = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

fn output_event(stage: tvm_protocol::Stage, stream: Stream, data: String) -> Event {
    let name = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    let body = OutputEvent { stage, data };
    Event::default().event(name).json_data(&body).unwrap_or_else(|_| Event::default().event(name))
}

/// The runtime catalog with image state, default limits and pool state.
#[utoipa::path(
    get, path = "/v1/runtimes", tag = "runtimes",
    responses(
        (status = 200, description = "Every runtime.", body = RuntimesBody),
        (status = 401, description = "Missing or wrong API key.", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn list_runtimes(State(st): St) -> Json<RuntimesBody> {
    let catalog = st.vmm.catalog();
    let runtimes = catalog
        .runtimes()
        .iter()
        .map(|r| {
            let pool = st.pool.pools().iter().find(|p| p.id() == r.id);
            RuntimeInfo {
                id: r.id.clone(),
                language: r.language.clone(),
                version: r.version.clone(),
                aliases: r.aliases.clone(),
                extensions: r.extensions.clone(),
                compiled: r.compile.is_some(),
                entry: r.entry.clone(),
                image: st.images.state(&r.id).info(),
                default_limits: DefaultLimits {
                    run: LimitsInfo::from(&r.run_limits),
                    compile: r.compile.as_ref().map(|_| LimitsInfo::from(&r.compile_limits)),
                },
                pool: PoolInfo {
                    target: pool.map_or(0, |p| p.target()),
                    idle: pool.map_or(0, |p| p.idle()),
                    memory_mib: pool.map_or(0, |p| p.memory_mib()),
                },
                source: r.origin.clone(),
            }
        })
        .collect();
    Json(RuntimesBody { runtimes, maximum_limits: LimitsInfo::from(catalog.maximum()) })
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = HealthBody)))]
pub(crate) async fn healthz() -> Json<HealthBody> {
    Json(HealthBody { status: "ok".into() })
}

/// Readiness: not draining, every available runtime's image built, every pool filled once (a pool
/// emptied by traffic later does not count: the server is busy, not unready).
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic.", body = ReadyBody),
        (status = 503, description = "Not ready (or draining); the body says why.", body = ReadyBody),
    )
)]
pub(crate) async fn readyz(State(st): St) -> (StatusCode, Json<ReadyBody>) {
    let images_not_ready: Vec<String> = st
        .vmm
        .catalog()
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none())
        .filter_map(|r| match st.images.state(&r.id) {
            // One that can never be ready here (its OCI registry does not answer) does not hold readiness.
            ImageState::Ready | ImageState::Unavailable(_) => None,
            s => Some(format!("{} {:?}", r.id, s.info().state).to_lowercase()),
        })
        .collect();
    let pools_not_warm = st.pool.not_warm_yet_except(|id| matches!(st.images.state(id), ImageState::Unavailable(_)));
    let draining = st.life.draining();
    let ready = !draining && images_not_ready.is_empty() && pools_not_warm.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(ReadyBody { ready, draining, images_not_ready, pools_not_warm }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4.", content_type = "text/plain", body = String))
)]
pub(crate) async fn metrics(State(st): St) -> impl IntoResponse {
    let text = st.metrics.render(&st.gauges());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 description of API v1.", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi(State(st): St) -> Json<serde_json::Value> {
    Json(st.openapi.clone())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(req.uri().path().to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn api_keys_via_bearer_or_header() {
        let keys = vec!["k1".to_string(), "secret-2".to_string()];
        assert!(key_accepted(&[], &headers(&[])), "no keys configured: open");
        assert!(!key_accepted(&keys, &headers(&[])));
        assert!(key_accepted(&keys, &headers(&[("authorization", "Bearer secret-2")])));
        assert!(key_accepted(&keys, &headers(&[("authorization", "bearer k1")])));
        assert!(key_accepted(&keys, &headers(&[("x-api-key", "k1")])));
        assert!(!key_accepted(&keys, &headers(&[("authorization", "Basic k1")])));
        assert!(!key_accepted(&keys, &headers(&[("authorization", "Bearer k")])));
        assert!(!key_accepted(&keys, &headers(&[("x-api-key", "k11")])));
    }

    #[test]
    fn json_media_types() {
        for ok in ["application/json", "Application/JSON; charset=utf-8", "application/problem+json"] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "json"] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }

    #[test]
    fn hosts_on_loopback_and_elsewhere() {
        for ok in ["localhost", "api.localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(host_allowed(ok, true, &[]), "{ok}");
        }
        for bad in ["evil.example", "10.0.0.1", "[::2]", "localhost.evil.example"] {
            assert!(!host_allowed(bad, true, &[]), "{bad}");
        }
        let allowed = vec!["tvm.example".to_string(), ".lab.example".to_string()];
        assert!(host_allowed("tvm.example", true, &allowed));
        assert!(host_allowed("a.lab.example", false, &allowed) && host_allowed("lab.example", false, &allowed));
        assert!(!host_allowed("evil.example", false, &allowed));
        assert!(host_allowed("anything.example", false, &[]), "not loopback, nothing configured: open");
        assert!(host_allowed("x", true, &["*".to_string()]));
        let req = |h: &str| Request::builder().uri("/").header("host", h).body(axum::body::Body::empty()).unwrap();
        assert_eq!(request_host(&req("LocalHost:8080")).as_deref(), Some("localhost"));
        assert_eq!(request_host(&req("[::1]:80")).as_deref(), Some("[::1]"));
        assert_eq!(request_host(&req("evil.example.")).as_deref(), Some("evil.example"));
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        let v = |s: &str| sane_request_id(&HeaderValue::from_str(s).unwrap());
        assert_eq!(v("abc-123_X.y:z").as_deref(), Some("abc-123_X.y:z"));
        assert_eq!(v("has space"), None);
        assert_eq!(v(""), None);
        assert_eq!(v(&"a".repeat(129)), None);
    }
}
