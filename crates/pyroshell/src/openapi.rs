//! The OpenAPI document of API v1, generated from the handlers' annotations
//! and the wire types, so it cannot describe an endpoint or field that does
//! not exist.

use serde_json::{json, Value};
use tvm_protocol::Limits;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;
use crate::error::{ErrorBody, ErrorDetail};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "TVM API",
        version = "1",
        description = "Run untrusted programs, each in a fresh microVM that is destroyed afterwards.\n\n\
            Errors are `{\"error\": {\"code\", \"message\", \"field\"?}}`: 400 malformed body, 401 missing or \
            wrong API key (only when keys are configured), 408 body too slow, 413 body too large, 415 body \
            not declared JSON, 421 a Host this server does not answer to, 422 well-formed but cannot run, \
            429 at capacity (with Retry-After), 503 draining or runtime not ready (with Retry-After), runtime \
            unavailable until the operator acts (no Retry-After: do not retry), or too many connections. \
            A failure of TVM itself during a run is a 200 with verdict `internal_error` and `error` set. \
            Every response carries `x-request-id` (the client's, if sent and plain, else generated); so do \
            the 400, 414 and 431 answers to requests that are not valid HTTP/1.1. The limits in this \
            document are this server's."
    ),
    paths(
        routes::create_execution,
        routes::stream_execution,
        routes::list_runtimes,
        routes::openapi,
        routes::healthz,
        routes::readyz,
        routes::metrics,
    ),
    components(schemas(
        api::ExecutionBody,
        api::FileBody,
        api::Encoding,
        api::LimitsBody,
        api::ExecutionResult,
        api::StageBody,
        api::TestBody,
        api::TestResultBody,
        api::TestSummary,
        api::TestVerdict,
        api::OutputEvent,
        api::RuntimesBody,
        api::RuntimeInfo,
        api::ImageInfo,
        api::ImageStateName,
        api::DefaultLimits,
        api::LimitsInfo,
        api::PoolInfo,
        api::HealthBody,
        api::ReadyBody,
        ErrorBody,
        ErrorDetail,
    )),
    modifiers(&Security),
    tags(
        (name = "executions", description = "Running programs."),
        (name = "runtimes", description = "What can run here."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

/// A file name as the guest accepts it: 1 to 8 parts separated by `/`, no
/// backslash or control character (`.`/`..` parts and the 255-byte cap are
/// described, as JSON Schema cannot count bytes).
fn name_pattern() -> String {
    let part = r"[^/\\\u0000-\u001f\u007f-\u009f]+";
    format!("^{part}(/{part}){{0,{}}}$", pyrovm::MAX_FILE_NAME_PARTS - 1)
}

/// The document for a server whose operator maximum limits are `maximum`:
/// utoipa's output from the types and handlers, with the limits the server
/// enforces written in from the same constants (so the two cannot drift).
pub fn document(maximum: &Limits) -> Value {
    let mut d = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises");
    let schemas = &mut d["components"]["schemas"];
    for name in ["ExecutionBody", "FileBody", "LimitsBody"] {
        schemas[name]["additionalProperties"] = json!(false);
    }
    let body = &mut schemas["ExecutionBody"]["properties"];
    body["files"]["minItems"] = json!(1);
    body["files"]["maxItems"] = json!(pyrovm::MAX_FILES);
    body["args"]["maxItems"] = json!(pyrovm::MAX_ARGS);
    body["args"]["items"]["maxLength"] = json!(pyrovm::MAX_ARG_BYTES);
    body["entry"]["maxLength"] = json!(pyrovm::MAX_FILE_NAME_BYTES);
    body["entry"]["pattern"] = json!(name_pattern());
    let name = &mut schemas["FileBody"]["properties"]["name"];
    name["maxLength"] = json!(pyrovm::MAX_FILE_NAME_BYTES);
    name["pattern"] = json!(name_pattern());
    let limits = &mut schemas["LimitsBody"]["properties"];
    for (field, max) in [
        ("wall_time_ms", maximum.wall_ms),
        ("cpu_time_ms", maximum.cpu_ms),
        ("memory_bytes", maximum.memory_bytes),
        ("processes", maximum.pids),
        ("output_bytes", maximum.output_bytes),
        ("file_size_bytes", maximum.file_size_bytes),
    ] {
        limits[field]["minimum"] = json!(pyrovm::limit_minimum(field));
        limits[field]["maximum"] = json!(max);
    }
    // Each event as SSE clients (and schemathesis) see it: an `event` name and `data` text holding JSON.
    let event = |names: &[&str], data: &str| {
        json!({"type": "object", "required": ["event", "data"], "properties": {
            "event": {"type": "string", "enum": names},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": format!("#/components/schemas/{data}")}},
            "id": {"type": "string"}, "retry": {"type": "integer"}}})
    };
    schemas["StreamEvent"] = json!({
        "description": "One server-sent event of `POST /v1/executions/stream`: `event: stdout|stderr` whose data is an OutputEvent (JSON), then one `event: result` whose data is an ExecutionResult (JSON).",
        "oneOf": [event(&["stdout", "stderr"], "OutputEvent"), event(&["result"], "ExecutionResult")]
    });
    let ok = &mut d["paths"]["/v1/executions/stream"]["post"]["responses"]["200"];
    ok["content"]["text/event-stream"]["schema"] = json!({"$ref": "#/components/schemas/StreamEvent"});
    ok["x-events"] = json!({"$ref": "#/components/schemas/StreamEvent"});
    let request_id =
        json!({"description": "The request's id (the client's, if sent and plain).", "schema": {"type": "string"}});
    let refused_host = json!({
        "description": "The Host names a server this one is not (DNS-rebinding defence; see --allowed-hosts).",
        "headers": {"x-request-id": request_id.clone()},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    });
    if let Some(paths) = d["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|p| p.values_mut()) {
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            responses.entry("421").or_insert_with(|| refused_host.clone());
            for r in responses.values_mut() {
                r["headers"]["x-request-id"] = request_id.clone();
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_in_the_document() {
        let max = tvm_config::Catalog::builtin().maximum().to_owned();
        let d = document(&max);
        let s = &d["components"]["schemas"];
        let body = &s["ExecutionBody"]["properties"];
        assert_eq!((body["files"]["minItems"].clone(), body["files"]["maxItems"].clone()), (json!(1), json!(64)));
        assert_eq!(body["args"]["maxItems"], 256);
        assert_eq!(body["args"]["items"]["maxLength"], 4096);
        assert_eq!(s["FileBody"]["properties"]["name"]["maxLength"], 255);
        assert_eq!(s["LimitsBody"]["properties"]["wall_time_ms"]["minimum"], 1);
        assert_eq!(s["LimitsBody"]["properties"]["memory_bytes"]["maximum"], max.memory_bytes);
        assert_eq!(s["ExecutionBody"]["additionalProperties"], false);
        let stream = &d["paths"]["/v1/executions/stream"]["post"]["responses"];
        assert!(stream["200"]["x-events"].is_object() && stream["408"].is_object() && stream["415"].is_object());
        assert!(d["paths"]["/healthz"]["get"]["responses"]["421"].is_object());
        // The pattern says what the guest's check says about parts and separators.
        let re = name_pattern();
        assert!(re.contains("{0,7}"), "{re}");
        for ok in ["a", "a/b/c/d/e/f/g/h"] {
            assert_eq!(tvm_protocol::validate_file_path(ok), Ok(()), "{ok}");
        }
        assert!(tvm_protocol::validate_file_path("a/b/c/d/e/f/g/h/i").is_err());
        assert!(tvm_protocol::validate_file_path(&"x".repeat(256)).is_err());
        assert!(tvm_protocol::validate_file_path(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn every_endpoint_and_schema_is_described() {
        let d = document(tvm_config::Catalog::builtin().maximum());
        for path in [
            "/v1/executions",
            "/v1/executions/stream",
            "/v1/runtimes",
            "/v1/openapi.json",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(d["paths"][path].is_object(), "{path} missing");
        }
        let post = &d["paths"]["/v1/executions"]["post"];
        for status in ["200", "400", "401", "408", "413", "415", "421", "422", "429", "503"] {
            assert!(post["responses"][status].is_object(), "status {status} missing");
        }
        let schemas = &d["components"]["schemas"];
        let req = &schemas["ExecutionBody"]["properties"];
        for f in ["runtime", "language", "version", "files", "entry", "stdin", "args", "run_limits", "network"] {
            assert!(req[f].is_object(), "request field {f} missing");
        }
        let verdict = &schemas["ExecutionResult"]["properties"]["verdict"]["enum"];
        assert!(verdict.as_array().unwrap().iter().any(|v| v == "internal_error"), "{verdict}");
        assert!(d["components"]["securitySchemes"]["bearer"].is_object());
    }
}
