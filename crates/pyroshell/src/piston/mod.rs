//! Piston v2 compatibility: `POST /api/v2/execute` and `GET /api/v2/runtimes`
//! (each also with a trailing slash), on the same pool, limits and admission
//! control as API v1, so Piston clients switch by changing their base URL.
//!
//! Errors are Piston's `{"message": "..."}`: 400 for what Piston rejects as
//! invalid (and TVM's own plan errors), 401 without a configured API key,
//! 413/408 for bodies too large or too slow, 415 when the body is not JSON and
//! the content type does not say JSON either (a JSON body is accepted whatever
//! its content type: a popular client sends `text/plain`), 429/503 with
//! `Retry-After` when TVM is at capacity, draining or building the image.
//! Field by field behaviour and the deliberate differences: docs/compat.md.

mod connect;
mod names;
mod wire;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tvm_protocol::{Stage, Verdict};

use crate::api::{Encoding, ExecutionBody, FileBody, LimitsBody};
use crate::compat;
use crate::error::ApiError;
use crate::exec;
use crate::images::ImageState;
use crate::state::AppState;

pub(crate) use names::PistonRuntime;

type St = State<Arc<AppState>>;

/// The Piston routes (merged into the main router).
pub(crate) fn router(st: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v2/execute", post(execute))
        .route("/api/v2/execute/", post(execute))
        .route("/api/v2/runtimes", get(runtimes))
        .route("/api/v2/runtimes/", get(runtimes))
        .route("/api/v2/connect", get(connect::route))
        .route("/api/v2/connect/", get(connect::route))
        .route_layer(middleware::from_fn_with_state(st, require_api_key))
}

/// A Piston-shaped error: `{"message"}` with the status (and `Retry-After`,
/// `WWW-Authenticate`) TVM would answer.
pub(crate) fn error_response(status: StatusCode, message: impl Into<String>, headers: Option<&HeaderMap>) -> Response {
    let mut resp = (status, Json(json!({ "message": message.into() }))).into_response();
    if let Some(h) = headers {
        for name in [
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_VERSION,
        ] {
            if let Some(v) = h.get(&name) {
                resp.headers_mut().insert(name, v.clone());
            }
        }
    }
    resp
}

/// TVM's error in Piston's shape. Validation failures TVM finds (422) are 400, as Piston answers every invalid request.
pub(crate) fn from_api(e: ApiError) -> Response {
    let message = e.to_string();
    let original = e.into_response();
    let status = match original.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s => s,
    };
    error_response(status, message, Some(original.headers()))
}

async fn require_api_key(State(st): St, req: Request, next: Next) -> Response {
    if crate::routes::key_accepted(&st.config.api_keys, req.headers()) {
        next.run(req).await
    } else {
        from_api(ApiError::Unauthorized)
    }
}

/// Every runtime that could run (not `unavailable`), in catalog order, with its full version.
pub(crate) fn catalog_view(st: &AppState) -> Vec<PistonRuntime> {
    st.vmm
        .catalog()
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none())
        // Nor one whose OCI registry does not answer.
        .filter(|r| !matches!(st.images.state(&r.id), ImageState::Unavailable(_)))
        .map(|r| {
            let (version, _) = compat::full_version(st, r);
            let ready = st.images.state(&r.id) == ImageState::Ready;
            names::describe(r, version, ready)
        })
        .collect()
}

/// `GET /api/v2/runtimes`: `[{language, version, aliases, runtime?}]` for every runtime whose image is built.
async fn runtimes(State(st): St) -> Json<Value> {
    let list: Vec<Value> = catalog_view(&st)
        .into_iter()
        .filter(|r| r.ready)
        .map(|r| {
            let mut v = json!({"language": r.language, "version": r.version, "aliases": r.aliases});
            if let Some(rt) = r.runtime {
                v["runtime"] = json!(rt);
            }
            v
        })
        .collect();
    Json(Value::Array(list))
}

fn is_json_type(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(';').next()).is_some_and(|m| {
        let m = m.trim().to_ascii_lowercase();
        m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
    })
}

/// Reads and parses a Piston body. A body that parses as JSON is accepted whatever the content type says.
pub(crate) async fn json_body(st: &Arc<AppState>, req: Request) -> Result<Value, Response> {
    let json_type = is_json_type(req.headers());
    let bytes = compat::read_body(req, st).await.map_err(|e| from_api(e.into_api()))?;
    serde_json::from_slice::<Value>(&bytes).map_err(|e| {
        if json_type {
            error_response(StatusCode::BAD_REQUEST, format!("request body is not valid JSON: {e}"), None)
        } else {
            error_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, "requests must be of type application/json", None)
        }
    })
}

/// A resolved, validated Piston request ready for [`exec::prepare`].
pub(crate) struct Resolved {
    pub runtime: PistonRuntime,
    pub body: ExecutionBody,
}

/// Piston's `get_job`: validate, resolve the runtime, and build TVM's request.
///
/// # Errors
/// Piston's message (answered as 400).
pub(crate) fn resolve_job(st: &AppState, body: &Value) -> Result<Resolved, String> {
    let (language, version) = wire::language_and_version(body)?;
    // Piston checks the files before resolving; the rest needs the runtime (its entry name).
    wire::check_files(body)?;
    let view = catalog_view(st);
    let Some(rt) = names::resolve(&view, &language, &version).cloned() else {
        return Err(format!("{language}-{version} runtime is unknown"));
    };
    let job = wire::validate(body, &rt.entry, st.vmm.catalog().maximum())?;
    let entry = job.files[job.entry].0.clone();
    let limits = |l: wire::StageLimits| LimitsBody {
        wall_time_ms: l.wall_ms,
        cpu_time_ms: l.cpu_ms,
        memory_bytes: l.memory_bytes,
        ..Default::default()
    };
    let body = ExecutionBody {
        runtime: Some(rt.id.clone()),
        files: job
            .files
            .into_iter()
            .map(|(name, content)| FileBody { name, content: B64.encode(content), encoding: Encoding::Base64 })
            .collect(),
        entry: Some(entry),
        stdin: Some(B64.encode(&job.stdin)),
        stdin_encoding: Encoding::Base64,
        args: job.args,
        compile_limits: limits(job.compile),
        run_limits: limits(job.run),
        ..Default::default()
    };
    Ok(Resolved { runtime: rt, body })
}

/// Output of both streams per stage, in the order the agent sent it.
#[derive(Debug, Default)]
pub(crate) struct Interleaved {
    /// Compile stage output.
    pub compile: Vec<u8>,
    /// Run stage output.
    pub run: Vec<u8>,
}

impl Interleaved {
    /// Appends a chunk.
    pub fn push(&mut self, stage: Stage, data: &[u8]) {
        match stage {
            Stage::Compile => self.compile.extend_from_slice(data),
            Stage::Run => self.run.extend_from_slice(data),
        }
    }
}

/// `POST /api/v2/execute`.
async fn execute(State(st): St, req: Request) -> Response {
    let body = match json_body(&st, req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let resolved = match resolve_job(&st, &body) {
        Ok(r) => r,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message, None),
    };
    let in_flight = match st.life.begin() {
        Ok(g) => g,
        Err(e) => return from_api(e),
    };
    let prepared = match exec::prepare(&st, resolved.body).await {
        Ok(p) => p,
        Err(e) => return from_api(e),
    };
    let mut output = Interleaved::default();
    let result = exec::run(&st, prepared, |stage, _, data| output.push(stage, data)).await;
    drop(in_flight);
    let rt = resolved.runtime;
    if let Some(error) = &result.error {
        let stage = wire::internal_stage(error);
        let compile = result.compile.as_ref().map(|c| wire::stage_json(c, &output.compile));
        return Json(wire::result_json(&rt.language, &rt.version, compile, Some(stage))).into_response();
    }
    let compile = result.compile.as_ref().map(|c| wire::stage_json(c, &output.compile));
    let run = match (&result.run, result.verdict) {
        (Some(r), _) => Some(wire::stage_json(r, &output.run)),
        // No run stage: the compile stage stands in for it (compile error).
        (None, Verdict::CompileError) => None,
        (None, _) => Some(wire::internal_stage("the run stage did not start")),
    };
    Json(wire::result_json(&rt.language, &rt.version, compile, run)).into_response()
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved").field("runtime", &self.runtime.id).finish_non_exhaustive()
    }
}
