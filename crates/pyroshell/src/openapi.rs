//! The OpenAPI document of API v1, generated from the handlers' annotations
//! and the wire types, so it cannot describe an endpoint or field that does
//! not exist.

use std::sync::OnceLock;

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
            wrong API key (only when keys are configured), 413 body too large, 422 well-formed but cannot \
            run, 429 at capacity (with Retry-After), 503 draining or runtime not ready. A failure of TVM \
            itself during a run is a 200 with verdict `internal_error` and `error` set. Every response \
            carries `x-request-id` (the client's, if sent and plain, else generated)."
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

/// The document as JSON (built once).
pub fn document() -> serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises")).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_and_schema_is_described() {
        let d = document();
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
        for status in ["200", "400", "401", "413", "422", "429", "503"] {
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
