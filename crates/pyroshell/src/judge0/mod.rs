//! Judge0 CE compatibility: `/submissions` (single, batch, `wait`,
//! `base64_encoded`, `fields`), `/languages`, `/statuses`, `/about`,
//! `/config_info`, `/system_info`, `/version`, `/workers`, on the same pool,
//! limits and admission control as API v1.
//!
//! Submissions live in memory only ([`store`]): bounded in count and age,
//! gone on restart. Tokens name their node, and a node forwards lookups of
//! another node's tokens to it (`--judge0-node`, `--judge0-peer`). Errors use
//! Judge0's shapes: 422 `{"attribute": ["message"]}` for invalid submissions,
//! 400/404/503 `{"error": "..."}` otherwise, 401 with an empty body when API
//! keys are configured and none of `X-Auth-Token`, `Authorization: Bearer`
//! or `X-API-Key` carries one. Field-by-field behaviour: docs/compat.md.

mod callback;
pub mod config;
mod files;
mod languages;
mod runs;
mod store;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use pyrovm::Plan;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tracing::{info, Instrument, Span};
use tvm_config::Runtime;

use crate::api::{Encoding, ExecutionBody, FileBody, LimitsBody};
use crate::error::ApiError;
use crate::exec;
use crate::images::ImageState;
use crate::piston::Interleaved;
use crate::state::AppState;

pub use config::{Judge0Args, Judge0Config};
use store::Store;
use wire::{Errors, Outcome, Record, Spec};

/// The Judge0 version TVM speaks; clients pick their language-id table by it (the Python SDK knows 1.13.1 and 1.14.0).
pub(crate) const VERSION: &str = "1.14.0";
/// Most submissions in one batch (Judge0's `MAX_SUBMISSION_BATCH_SIZE`).
pub(crate) const MAX_BATCH: usize = 20;
/// Header marking a request one node forwarded to another, so it is never forwarded again.
const FORWARDED: &str = "x-tvm-judge0-forwarded";

type St = State<Arc<AppState>>;

/// Per-server Judge0 state.
#[derive(Debug)]
pub(crate) struct Judge0 {
    store: Store,
    workers: Arc<Semaphore>,
    worker_count: usize,
    node: Option<String>,
    own_tag: Option<String>,
    peers: Vec<(String, String)>,
    http: reqwest::Client,
}

impl Judge0 {
    fn new(st: &AppState) -> Self {
        let c = &st.config.judge0;
        let worker_count = c.workers.unwrap_or_else(|| st.admission.max_vms()).max(1);
        Judge0 {
            store: Store::new(c.max_submissions, Duration::from_millis(c.submission_ttl_ms)),
            workers: Arc::new(Semaphore::new(worker_count)),
            worker_count,
            node: c.node.clone(),
            own_tag: c.node.as_deref().map(store::node_tag),
            peers: c.peers.iter().map(|(n, u)| (store::node_tag(n), u.trim_end_matches('/').to_string())).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
        }
    }

    /// The base URL of the peer owning `token`, when it is not this node.
    fn owner(&self, token: &str) -> Option<&str> {
        let tag = store::token_tag(token)?;
        if self.own_tag.as_deref() == Some(tag) {
            return None;
        }
        self.peers.iter().find(|(t, _)| t == tag).map(|(_, u)| u.as_str())
    }
}

/// The Judge0 routes (merged into the main router).
pub(crate) fn router(st: Arc<AppState>) -> Router<Arc<AppState>> {
    let j = Arc::new(Judge0::new(&st));
    Router::new()
        .route("/submissions", post(create))
        .route("/submissions/", post(create))
        .route("/submissions/batch", post(batch_create).get(batch_show))
        .route("/submissions/{token}", get(show))
        .route("/languages", get(list_languages))
        .route("/languages/all", get(list_languages))
        .route("/languages/{id}", get(show_language))
        .route("/statuses", get(statuses))
        .route("/about", get(about))
        .route("/config_info", get(config_info))
        .route("/system_info", get(system_info))
        .route("/version", get(version))
        .route("/workers", get(workers))
        .route_layer(middleware::from_fn_with_state(st, require_auth))
        .layer(Extension(j))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Judge0 authenticates with `X-Auth-Token`; TVM's own headers work too. A refusal has no body, as in Judge0.
async fn require_auth(State(st): St, req: Request, next: Next) -> Response {
    let keys = &st.config.api_keys;
    let token_ok = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| keys.iter().fold(false, |ok, k| ok | (k.as_bytes() == t.trim().as_bytes())));
    if token_ok || crate::routes::key_accepted(keys, req.headers()) {
        next.run(req).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

/// Runtimes that may run (not `unavailable`) with their Judge0 id.
fn runtimes(st: &AppState) -> impl Iterator<Item = (u32, &Runtime)> {
    st.vmm.catalog().runtimes().iter().filter(|r| r.unavailable.is_none()).map(|r| (languages::judge0_id(&r.id), r))
}

fn runtime_by_id(st: &AppState, id: u32) -> Option<&Runtime> {
    runtimes(st).find(|(i, _)| *i == id).map(|(_, r)| r)
}

fn language_name(st: &AppState, rt: &Runtime) -> String {
    let (version, _) = crate::compat::full_version(st, rt);
    languages::display_name(rt, &version)
}

fn bounds(st: &AppState) -> wire::Bounds {
    wire::Bounds::from_maximum(st.vmm.catalog().maximum())
}

fn query_flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v == "true")
}

async fn json_body(st: &Arc<AppState>, req: Request) -> Result<Value, Response> {
    let bytes = crate::compat::read_body(req, st).await.map_err(|e| {
        let e = e.into_api();
        error(e.status(), e.to_string())
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("request body is not valid JSON: {e}")))
}

/// The execution body of a submission and the split compiler options.
struct Built {
    runtime: Runtime,
    body: ExecutionBody,
    compiler_options: Vec<String>,
}

/// Inserts `options` before the first source file on the compile command
/// line, where Judge0 puts them (`gcc %s main.c`). A compile command that
/// names no source file (Go's build script) cannot take them.
fn add_compiler_options(plan: &mut Plan, options: &[String]) -> Result<(), String> {
    if options.is_empty() {
        return Ok(());
    }
    // Interpreted languages have no compile command; Judge0 ignores the options there too.
    let Some(cmd) = plan.job.compile.as_mut() else { return Ok(()) };
    let names: Vec<&str> = plan.job.files.iter().map(|f| f.path.as_str()).collect();
    let Some(at) = cmd.argv.iter().position(|a| names.contains(&a.as_str())) else {
        return Err("are not supported by this language's compile step".into());
    };
    cmd.argv.splice(at..at, options.iter().cloned());
    Ok(())
}

fn push(errors: &mut Errors, field: &str, message: String) {
    errors.entry(field.to_string()).or_default().push(message);
}

/// Builds TVM's request for `spec`, checking what only TVM knows (file names, limits, options).
fn build(st: &AppState, spec: &Spec) -> Result<Built, Errors> {
    let mut errors = Errors::new();
    let Some(rt) = runtime_by_id(st, spec.language_id).cloned() else {
        push(&mut errors, "language_id", format!("language with id {} doesn't exist", spec.language_id));
        return Err(errors);
    };
    let mut files =
        vec![FileBody { name: rt.entry.clone(), content: B64.encode(&spec.source_code), encoding: Encoding::Base64 }];
    if let Some(zip) = &spec.additional_files {
        match files::unpack(zip) {
            Ok(extra) => files.extend(extra.into_iter().map(|(name, content)| FileBody {
                name,
                content: B64.encode(content),
                encoding: Encoding::Base64,
            })),
            Err(e) => push(&mut errors, "additional_files", e.to_string()),
        }
    }
    let mut words = |field: &str, s: &Option<String>| match s.as_deref().map(shell_words::split).transpose() {
        Ok(w) => w.unwrap_or_default(),
        Err(e) => {
            push(&mut errors, field, format!("cannot be split into words: {e}"));
            Vec::new()
        }
    };
    let args = words("command_line_arguments", &spec.command_line_arguments);
    let compiler_options = words("compiler_options", &spec.compiler_options);
    if !errors.is_empty() {
        return Err(errors);
    }
    let max = st.vmm.catalog().maximum();
    let cpu_ms = ((spec.cpu_time_limit + spec.cpu_extra_time) * 1000.0).round() as u64;
    let body = ExecutionBody {
        runtime: Some(rt.id.clone()),
        files,
        entry: Some(rt.entry.clone()),
        stdin: spec.stdin.as_ref().map(|s| B64.encode(s)),
        stdin_encoding: Encoding::Base64,
        args,
        run_limits: LimitsBody {
            wall_time_ms: Some((spec.wall_time_limit * 1000.0).round().max(1.0) as u64),
            // The extra time lets a program finish past its limit so its time is measured (then: Time Limit Exceeded).
            cpu_time_ms: Some(cpu_ms.clamp(1, max.cpu_ms)),
            memory_bytes: Some(spec.memory_limit.saturating_mul(1024)),
            processes: Some(spec.max_processes_and_or_threads),
            output_bytes: None,
            file_size_bytes: Some(spec.max_file_size.saturating_mul(1024)),
        },
        ..Default::default()
    };
    let built = Built { runtime: rt, body, compiler_options };
    // What pyrovm would refuse, refused now as a 422 rather than later as an Internal Error.
    let checked = built
        .body
        .clone()
        .into_request(st.vmm.catalog(), false)
        .map_err(|e| (e.field().unwrap_or_else(|| "base".into()), e.to_string()))
        .and_then(|req| {
            pyrovm::plan(st.vmm.catalog(), &req, st.vmm.settings().vm_overhead_mib).map_err(|e| match &e {
                pyrovm::PlanError::LimitOutOfRange { stage: "run", field, value, min, max } => {
                    judge0_limit_error(field, *value, *min, *max)
                        .unwrap_or_else(|| (judge0_field(e.field()), e.to_string()))
                }
                _ => (judge0_field(e.field()), e.to_string()),
            })
        })
        .and_then(|mut plan| {
            add_compiler_options(&mut plan, &built.compiler_options).map_err(|m| ("compiler_options".into(), m))
        });
    if let Err((field, message)) = checked {
        push(&mut errors, &field, message);
        return Err(errors);
    }
    Ok(built)
}

/// A run limit out of range, as the Judge0 attribute it came from, in that
/// attribute's unit (KB, seconds) and Rails' wording: `memory_limit` "must be
/// greater than or equal to 8192". `None` for a limit no Judge0 attribute sets.
fn judge0_limit_error(field: &str, value: u64, min: u64, max: u64) -> Option<(String, String)> {
    let (attr, unit): (&str, fn(u64) -> String) = match field {
        "memory_bytes" => ("memory_limit", |b| (b / 1024).to_string()),
        "file_size_bytes" => ("max_file_size", |b| (b / 1024).to_string()),
        "processes" => ("max_processes_and_or_threads", |n| n.to_string()),
        "wall_time_ms" => ("wall_time_limit", |ms| wire_seconds(ms)),
        "cpu_time_ms" => ("cpu_time_limit", |ms| wire_seconds(ms)),
        _ => return None,
    };
    let message = if value < min {
        // Rounded up, so the bound named is one that passes.
        let min = if field.ends_with("_bytes") { min.div_ceil(1024) * 1024 } else { min };
        format!("must be greater than or equal to {}", unit(min))
    } else {
        format!("must be less than or equal to {}", unit(max))
    };
    Some((attr.to_string(), message))
}

/// Milliseconds as Judge0 writes seconds: `2.5`, `0.001`, `10`.
fn wire_seconds(ms: u64) -> String {
    let s = format!("{:.3}", ms as f64 / 1000.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A TVM request field as the Judge0 attribute it came from.
fn judge0_field(f: Option<&str>) -> String {
    match f {
        Some("files") | Some("entry") => "additional_files",
        Some("stdin") => "stdin",
        Some("args") => "command_line_arguments",
        _ => "base",
    }
    .to_string()
}

fn validate(st: &AppState, body: &Value, base64: bool) -> Result<(Spec, Built), Errors> {
    let defaults = |id: u32| runtime_by_id(st, id).map(|r| wire::Defaults::from_limits(&r.run_limits));
    let spec = wire::validate(body, base64, &bounds(st), st.config.judge0.allow_callbacks, defaults)?;
    let built = build(st, &spec)?;
    Ok((spec, built))
}

fn new_record(st: &AppState, j: &Judge0, spec: Spec, rt: &Runtime) -> Record {
    Record {
        token: store::new_token(j.node.as_deref()),
        spec,
        language_name: language_name(st, rt),
        created_at: SystemTime::now(),
        finished_at: None,
        outcome: Outcome { status_id: 1, ..Default::default() },
    }
}

/// Runs a submission `number_of_runs` times and reports as Judge0 does
/// (see [`runs::combine`]): more than one run goes through TVM's
/// compile-once-run-many path, one VM and one compile for all of them.
async fn execute(st: &AppState, built: &Built, spec: &Spec) -> Outcome {
    let outcome = if spec.number_of_runs > 1 && runs::can_share(spec) {
        runs::execute_shared(st, &[(spec, built)]).await.pop().unwrap_or_default()
    } else {
        // One execution per run: a single run, or runs whose stderr joins stdout in write order.
        let mut outcomes = Vec::new();
        for _ in 0..spec.number_of_runs {
            let o = execute_once(st, built, spec).await;
            let accepted = o.status_id == 3;
            outcomes.push(o);
            if !accepted {
                break;
            }
        }
        runs::combine(outcomes)
    };
    info!(runtime = %built.runtime.id, status = outcome.status_id, "judge0 submission finished");
    outcome
}

/// One execution of a submission.
async fn execute_once(st: &AppState, built: &Built, spec: &Spec) -> Outcome {
    let options = built.compiler_options.clone();
    let prepared = exec::prepare_with(st, built.body.clone(), move |plan| {
        add_compiler_options(plan, &options)
            .map_err(|m| ApiError::invalid("bad_compiler_options", m, "compiler_options"))
    })
    .await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return Outcome { status_id: 13, message: Some(e.to_string()), ..Default::default() },
    };
    let mut out = Interleaved::default();
    let result = exec::run(st, prepared, |stage, _, data| out.push(stage, data)).await;
    wire::outcome(result.compile.as_ref(), result.run.as_ref(), &out.compile, &out.run, result.error.as_deref(), spec)
}

/// Runs a stored submission, records the outcome, then calls back if asked.
async fn process(st: Arc<AppState>, j: Arc<Judge0>, token: String, spec: Spec, built: Built) {
    j.store.update(&token, |r| r.outcome.status_id = 2);
    let outcome = execute(&st, &built, &spec).await;
    finish(&st, &j, &token, &spec, outcome);
}

/// Runs stored submissions of one build as one execution (see [`runs`]).
async fn process_shared(st: Arc<AppState>, j: Arc<Judge0>, members: Vec<(String, Spec, Built)>) {
    for (token, _, _) in &members {
        j.store.update(token, |r| r.outcome.status_id = 2);
    }
    let refs: Vec<(&Spec, &Built)> = members.iter().map(|(_, s, b)| (s, b)).collect();
    let outcomes = runs::execute_shared(&st, &refs).await;
    info!(submissions = members.len(), "judge0 submissions of one build finished");
    for ((token, spec, _), outcome) in members.iter().zip(outcomes) {
        finish(&st, &j, token, spec, outcome);
    }
}

/// Records a submission's outcome, then calls back if asked.
fn finish(st: &AppState, j: &Judge0, token: &str, spec: &Spec, outcome: Outcome) {
    let token = token.to_string();
    j.store.update(&token, |r| {
        r.outcome = outcome;
        r.finished_at = Some(SystemTime::now());
    });
    if let (Some(url), Some(rec)) = (spec.callback_url.clone(), j.store.get(&token)) {
        // Judge0 sends the default attributes, base64-encoded so any bytes survive.
        if let Ok(body) = wire::serialize(&rec, wire::DEFAULT_FIELDS, true) {
            let private = st.config.judge0.callbacks_allow_private;
            tokio::spawn(callback::deliver(url, body, private, token).in_current_span());
        }
    }
}

fn rendered(rec: &Record, fields: &[&str], base64: bool, status: StatusCode) -> Response {
    match wire::serialize(rec, fields, base64) {
        Ok(v) => (status, Json(v)).into_response(),
        Err(wire::NotUtf8) if status == StatusCode::CREATED => {
            (status, Json(json!({"error": wire::NOT_UTF8, "token": rec.token}))).into_response()
        }
        Err(wire::NotUtf8) => error(StatusCode::BAD_REQUEST, wire::NOT_UTF8),
    }
}

/// `POST /submissions`.
async fn create(
    State(st): St,
    Extension(j): Extension<Arc<Judge0>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let base64 = query_flag(&q, "base64_encoded");
    let wait = query_flag(&q, "wait");
    let fields = match wire::parse_fields(q.get("fields").map(String::as_str)) {
        Ok(f) => f,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let body = match json_body(&st, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (spec, built) = match validate(&st, &body, base64) {
        Ok(v) => v,
        Err(errors) => return (StatusCode::UNPROCESSABLE_ENTITY, Json(errors)).into_response(),
    };
    let in_flight = match st.life.begin() {
        Ok(g) => g,
        Err(e) => return error(e.status(), e.to_string()),
    };
    let rec = new_record(&st, &j, spec.clone(), &built.runtime);
    let token = rec.token.clone();
    if j.store.insert(rec).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "queue is full");
    }
    if wait {
        process(st.clone(), j.clone(), token.clone(), spec, built).await;
        drop(in_flight);
        return match j.store.get(&token) {
            Some(rec) => rendered(&rec, &fields, base64, StatusCode::CREATED),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "the submission expired before it finished"),
        };
    }
    spawn_background(st, j, token.clone(), spec, built, in_flight);
    (StatusCode::CREATED, Json(json!({ "token": token }))).into_response()
}

fn spawn_background(
    st: Arc<AppState>,
    j: Arc<Judge0>,
    token: String,
    spec: Spec,
    built: Built,
    in_flight: crate::state::InFlight,
) {
    let task = async move {
        let _in_flight = in_flight;
        // Background submissions wait here, not in the admission queue, so a large batch cannot time out there.
        let Ok(_worker) = j.workers.clone().acquire_owned().await else { return };
        process(st, j, token, spec, built).await;
    };
    tokio::spawn(task.instrument(Span::current()));
}

/// Forwards a lookup to the node owning the token; `None` if it was already forwarded once.
async fn forward(j: &Judge0, base: &str, path_and_query: &str, headers: &HeaderMap) -> Option<Response> {
    if headers.contains_key(FORWARDED) {
        return None;
    }
    let mut req = j.http.get(format!("{base}{path_and_query}")).header(FORWARDED, "1");
    for name in ["x-auth-token", "authorization", "x-api-key", "x-request-id"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.clone());
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Some(error(StatusCode::BAD_GATEWAY, format!("the node owning this submission did not answer: {e}")))
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await.unwrap_or_default();
    Some((status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body).into_response())
}

/// `GET /submissions/{token}`.
async fn show(
    State(_st): St,
    Extension(j): Extension<Arc<Judge0>>,
    Path(token): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let fields = match wire::parse_fields(q.get("fields").map(String::as_str)) {
        Ok(f) => f,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    if let Some(base) = j.owner(&token) {
        let pq = req.uri().path_and_query().map_or(req.uri().path(), |p| p.as_str()).to_string();
        if let Some(r) = forward(&j, base, &pq, req.headers()).await {
            return r;
        }
    }
    match j.store.get(&token) {
        Some(rec) => rendered(&rec, &fields, query_flag(&q, "base64_encoded"), StatusCode::OK),
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// `POST /submissions/batch`: `{"submissions": [...]}` → `[{"token"} | errors]`; 201 when any was accepted.
async fn batch_create(
    State(st): St,
    Extension(j): Extension<Arc<Judge0>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let base64 = query_flag(&q, "base64_encoded");
    let body = match json_body(&st, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let items = body.get("submissions").and_then(Value::as_array).cloned().unwrap_or_default();
    if items.len() > MAX_BATCH {
        return error(
            StatusCode::BAD_REQUEST,
            format!("number of submissions in a batch should be less than or equal to {MAX_BATCH}"),
        );
    }
    if items.is_empty() {
        return error(StatusCode::BAD_REQUEST, "there should be at least one submission in a batch");
    }
    let mut out = Vec::with_capacity(items.len());
    let mut accepted = Vec::new();
    for item in &items {
        let (spec, built) = match validate(&st, item, base64) {
            Ok(v) => v,
            Err(errors) => {
                out.push(json!(errors));
                continue;
            }
        };
        let in_flight = match st.life.begin() {
            Ok(g) => g,
            Err(e) => return error(e.status(), e.to_string()),
        };
        let rec = new_record(&st, &j, spec.clone(), &built.runtime);
        let token = rec.token.clone();
        if j.store.insert(rec).is_err() {
            out.push(json!({"error": "queue is full"}));
            continue;
        }
        out.push(json!({ "token": token }));
        accepted.push((token, spec, built, in_flight));
    }
    let status = if accepted.is_empty() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::CREATED };
    // Submissions of one build run as one execution: one VM, one compile.
    let specs: Vec<&Spec> = accepted.iter().map(|a| &a.1).collect();
    let groups = runs::groups(&specs);
    let mut slots: Vec<Option<_>> = accepted.into_iter().map(Some).collect();
    for group in groups {
        let mut members: Vec<_> = group.iter().filter_map(|&i| slots[i].take()).collect();
        if members.len() == 1 {
            let (token, spec, built, in_flight) = members.remove(0);
            spawn_background(st.clone(), j.clone(), token, spec, built, in_flight);
            continue;
        }
        let (st, j) = (st.clone(), j.clone());
        let task = async move {
            let (members, _in_flight): (Vec<_>, Vec<_>) =
                members.into_iter().map(|(t, s, b, g)| ((t, s, b), g)).unzip();
            let Ok(_worker) = j.workers.clone().acquire_owned().await else { return };
            process_shared(st, j, members).await;
        };
        tokio::spawn(task.instrument(Span::current()));
    }
    (status, Json(Value::Array(out))).into_response()
}

/// `GET /submissions/batch?tokens=a,b,c` → `{"submissions": [submission | null]}`.
async fn batch_show(
    State(_st): St,
    Extension(j): Extension<Arc<Judge0>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let fields = match wire::parse_fields(q.get("fields").map(String::as_str)) {
        Ok(f) => f,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let base64 = query_flag(&q, "base64_encoded");
    let raw = headers.get("tokens").and_then(|v| v.to_str().ok()).or(q.get("tokens").map(String::as_str)).unwrap_or("");
    let tokens: Vec<&str> = raw.trim().split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
    if tokens.len() > MAX_BATCH {
        return error(
            StatusCode::BAD_REQUEST,
            format!("number of submissions in a batch should be less than or equal to {MAX_BATCH}"),
        );
    }
    if tokens.is_empty() {
        return error(StatusCode::BAD_REQUEST, "there should be at least one submission in a batch");
    }
    let field_param = fields.join(",");
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        if let Some(base) = j.owner(t) {
            let pq = format!("/submissions/{t}?base64_encoded={base64}&fields={field_param}");
            if let Some(r) = forward(&j, base, &pq, &headers).await {
                let (parts, body) = r.into_parts();
                let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
                let v = if parts.status.is_success() {
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                } else {
                    Value::Null
                };
                out.push(v);
                continue;
            }
        }
        match j.store.get(t) {
            Some(rec) => match wire::serialize(&rec, &fields, base64) {
                Ok(v) => out.push(v),
                Err(wire::NotUtf8) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "some attributes for one or more submissions cannot be converted to UTF-8, use base64_encoded=true query parameter",
                    )
                }
            },
            None => out.push(Value::Null),
        }
    }
    Json(json!({ "submissions": out })).into_response()
}

/// `GET /languages`: `[{id, name}]` of the runtimes that can run now (image built), by name.
async fn list_languages(State(st): St) -> Json<Value> {
    let mut list: Vec<(String, u32)> = runtimes(&st)
        .filter(|(_, r)| st.images.state(&r.id) == ImageState::Ready)
        .map(|(id, r)| (language_name(&st, r), id))
        .collect();
    list.sort();
    Json(Value::Array(list.into_iter().map(|(name, id)| json!({"id": id, "name": name})).collect()))
}

/// `GET /languages/{id}`: `{id, name, is_archived, source_file, compile_cmd, run_cmd}`.
async fn show_language(State(st): St, Path(id): Path<String>) -> Response {
    let Some(rt) = id.parse::<u32>().ok().and_then(|id| runtime_by_id(&st, id)) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let render = |argv: &[String]| {
        argv.iter()
            .map(|a| a.replace("{entry}", &rt.entry).replace("{sources}", &rt.entry))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Json(json!({
        "id": languages::judge0_id(&rt.id),
        "name": language_name(&st, rt),
        "is_archived": false,
        "source_file": rt.entry,
        "compile_cmd": rt.compile.as_deref().map(render),
        "run_cmd": render(&rt.run),
    }))
    .into_response()
}

/// `GET /statuses`.
async fn statuses() -> Json<Value> {
    Json(Value::Array(wire::STATUSES.iter().map(|(id, d)| json!({"id": id, "description": d})).collect()))
}

/// `GET /about`.
async fn about() -> Json<Value> {
    Json(json!({
        "version": VERSION,
        "homepage": "https://judge0.com",
        "source_code": "https://github.com/judge0/judge0",
        "maintainer": "TVM: the Judge0 CE API over fresh microVMs (see docs/compat.md)",
    }))
}

/// `GET /version`: the version as plain text.
async fn version() -> &'static str {
    VERSION
}

/// `GET /config_info`: Judge0's configuration keys with TVM's values (seconds, KB).
async fn config_info(State(st): St) -> Json<Value> {
    let b = bounds(&st);
    // Defaults differ per runtime in TVM; these are the first available runtime's, each runtime's apply to it.
    let d = runtimes(&st).next().map(|(_, r)| wire::Defaults::from_limits(&r.run_limits)).unwrap_or(wire::Defaults {
        cpu_time_limit: 10.0,
        wall_time_limit: 10.0,
        memory_limit: 262_144,
        max_processes: 64,
        max_file_size: 16_384,
    });
    let c = &st.config.judge0;
    Json(json!({
        "maintenance_mode": st.life.draining(),
        "enable_wait_result": true,
        "enable_compiler_options": true,
        "allowed_languages_for_compile_options": [],
        "enable_command_line_arguments": true,
        "enable_submission_delete": false,
        "enable_callbacks": c.allow_callbacks,
        "callbacks_max_tries": callback::MAX_TRIES,
        "callbacks_timeout": callback::TIMEOUT.as_secs_f64(),
        "enable_additional_files": true,
        "max_queue_size": c.max_submissions,
        "cpu_time_limit": d.cpu_time_limit,
        "max_cpu_time_limit": b.max_cpu_time_limit,
        "cpu_extra_time": wire::CPU_EXTRA_TIME,
        "max_cpu_extra_time": b.max_cpu_extra_time,
        "wall_time_limit": d.wall_time_limit,
        "max_wall_time_limit": b.max_wall_time_limit,
        "memory_limit": d.memory_limit,
        "max_memory_limit": b.max_memory_limit,
        "stack_limit": wire::STACK_LIMIT,
        "max_stack_limit": b.max_stack_limit,
        "max_processes_and_or_threads": d.max_processes,
        "max_max_processes_and_or_threads": b.max_processes,
        "enable_per_process_and_thread_time_limit": false,
        "allow_enable_per_process_and_thread_time_limit": false,
        "enable_per_process_and_thread_memory_limit": false,
        "allow_enable_per_process_and_thread_memory_limit": false,
        "max_file_size": d.max_file_size,
        "max_max_file_size": b.max_file_size,
        "number_of_runs": 1,
        "max_number_of_runs": b.max_number_of_runs,
        "redirect_stderr_to_stdout": false,
        "max_extract_size": files::MAX_TOTAL_BYTES / 1024,
        "enable_batched_submissions": true,
        "max_submission_batch_size": MAX_BATCH,
        "submission_cache_duration": 0.0,
        "use_docs_as_homepage": false,
        "allow_enable_network": false,
        "enable_network": false,
    }))
}

/// `GET /system_info`: `lscpu`-style keys from /proc.
async fn system_info() -> Json<Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or(String::new(), |(_, v)| v.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Json(json!({
        "Architecture": std::env::consts::ARCH,
        "CPU(s)": cpus.to_string(),
        "Model name": model,
        "Mem": format!("{}M", kb("MemTotal:") / 1024),
        "Swap": format!("{}M", kb("SwapTotal:") / 1024),
    }))
}

/// `GET /workers`: the background executor as Judge0 reports its queue.
async fn workers(Extension(j): Extension<Arc<Judge0>>) -> Json<Value> {
    let idle = j.workers.available_permits();
    Json(json!([{
        "queue": VERSION,
        "size": j.store.queued(),
        "available": j.worker_count,
        "idle": idle,
        "working": j.worker_count - idle,
        "paused": 0,
        "failed": 0,
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_limits_out_of_range_are_named_as_judge0_attributes_in_their_units() {
        let e = |f, v, min, max| judge0_limit_error(f, v, min, max).unwrap();
        assert_eq!(
            e("memory_bytes", 1024, 8 << 20, 4 << 30),
            ("memory_limit".into(), "must be greater than or equal to 8192".into())
        );
        assert_eq!(
            e("memory_bytes", 8 << 30, 8 << 20, 4 << 30),
            ("memory_limit".into(), "must be less than or equal to 4194304".into())
        );
        // A byte minimum that is not whole KB names the next whole KB, a value that passes.
        assert_eq!(e("memory_bytes", 0, 1500, 4096).1, "must be greater than or equal to 2");
        assert_eq!(e("wall_time_ms", 90_000, 1, 20_500).1, "must be less than or equal to 20.5");
        assert_eq!(e("cpu_time_ms", 0, 1, 15_000).1, "must be greater than or equal to 0.001");
        assert_eq!(e("file_size_bytes", 1 << 40, 1, 4 << 20).0, "max_file_size");
        assert_eq!(
            e("processes", 10_000, 1, 256),
            ("max_processes_and_or_threads".into(), "must be less than or equal to 256".into())
        );
        assert_eq!(judge0_limit_error("output_bytes", 0, 1, 2), None);
    }
}
