//! API errors: one enum, one JSON shape (`{"error": {"code", "message", "field"?}}`), one status each.
//!
//! 400 means the body is not a well-formed request (syntax, types, unknown
//! fields); 422 means it is well-formed but cannot run (unknown runtime, limit
//! above the maximum, bad base64, unsafe file name, too many or too large
//! files, network refused). Failures of TVM itself during an execution are
//! not errors here: they are a 200 with verdict `internal_error`, so clients
//! handle one result shape (see [`crate::api::ExecutionResult`]).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pyrovm::PlanError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::AdmitError;

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not a well-formed request.
    #[error("{message}")]
    Malformed {
        /// What is wrong (serde's message, with line and column).
        message: String,
    },
    /// The request names or asks for something that cannot run.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Other semantic problems found before planning.
    #[error("{message}")]
    Invalid {
        /// Stable machine-readable code.
        code: &'static str,
        /// Explanation.
        message: String,
        /// Request field at fault.
        field: Option<String>,
    },
    /// API keys are configured and the request has none or a wrong one.
    #[error("missing or invalid API key (send `Authorization: Bearer KEY` or `X-API-Key: KEY`)")]
    Unauthorized,
    /// The body is larger than the configured maximum.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client did not finish sending its body in time (a slow or stuck
    /// client must not hold a connection and a task forever).
    #[error("request body not received within {ms} ms")]
    BodyTimeout {
        /// The limit.
        ms: u64,
    },
    /// No capacity now and none soon enough.
    #[error("server is at capacity: {reason}; retry later")]
    Overloaded {
        /// Why (in the message; not also a `source`, or it would print twice).
        reason: AdmitError,
        /// Seconds for Retry-After.
        retry_after_secs: u64,
    },
    /// The server is shutting down and takes no new executions.
    #[error("server is shutting down; send the request to another instance")]
    Draining,
    /// The runtime's image is not there yet: it is being built, or will be
    /// (503 with Retry-After).
    #[error("runtime {runtime} is not ready: {reason}")]
    NotReady {
        /// Runtime id.
        runtime: String,
        /// Why.
        reason: String,
    },
    /// The runtime cannot run on this server until an operator acts: its
    /// image build failed, or its OCI registry does not answer, or the
    /// catalog says it cannot run here. Waiting does not help, so the 503
    /// has no Retry-After and clients should not retry.
    #[error("runtime {runtime} is unavailable on this server: {reason}")]
    RuntimeUnavailable {
        /// Runtime id.
        runtime: String,
        /// Why, with the operator's fix where known.
        reason: String,
    },
    /// A JSON endpoint got a body that is not declared as JSON (a browser
    /// can send text/plain or a form cross-origin without asking first).
    #[error("the request body must be sent as `Content-Type: application/json` (got {got})")]
    UnsupportedMediaType {
        /// The Content-Type sent, or `none`.
        got: String,
    },
    /// The `Host` is not one this server answers to (DNS-rebinding defence).
    #[error("this server does not answer to host {host:?} (see --allowed-hosts)")]
    HostNotAllowed {
        /// The host named by the request.
        host: String,
    },
    /// A WebSocket endpoint got a plain HTTP request (or a handshake of a
    /// WebSocket version other than 13): answered 426 with `Upgrade:
    /// websocket` and `Sec-WebSocket-Version: 13`, as RFC 7231 §6.5.15 and
    /// RFC 6455 §4.4 ask.
    #[error("this endpoint speaks WebSocket only (RFC 6455, version 13): {missing}")]
    UpgradeRequired {
        /// What the request lacks, e.g. "the Upgrade header does not name websocket".
        missing: &'static str,
    },
    /// A WebSocket handshake that cannot be accepted even so (no
    /// `Sec-WebSocket-Key`, a bad HTTP/2 `:protocol`).
    #[error("malformed WebSocket handshake: {problem}")]
    BadHandshake {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// No such route.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A fault of the server that has no better description.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Error response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `unknown_runtime`, `queue_full`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The request field at fault, when there is one (`runtime`, `files`, `run_limits`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

fn plan_code(e: &PlanError) -> &'static str {
    match e {
        PlanError::UnknownRuntime(_) => "unknown_runtime",
        PlanError::RuntimeUnavailable { .. } => "runtime_unavailable",
        PlanError::NoFiles => "no_files",
        PlanError::TooManyFiles(_) => "too_many_files",
        PlanError::FilesTooLarge(_) => "files_too_large",
        PlanError::BadFileName(_) => "bad_file_name",
        PlanError::DuplicateFile(_) => "duplicate_file",
        PlanError::PathConflict { .. } => "path_conflict",
        PlanError::EntryNotFound(_) => "entry_not_found",
        PlanError::StdinTooLarge(_) => "stdin_too_large",
        PlanError::BadArgs(_) => "bad_args",
        PlanError::BadTests(_) => "bad_tests",
        PlanError::LimitOutOfRange { .. } => "limit_out_of_range",
    }
}

impl ApiError {
    /// Shorthand for [`ApiError::Invalid`].
    pub fn invalid(code: &'static str, message: impl Into<String>, field: impl Into<String>) -> Self {
        ApiError::Invalid { code, message: message.into(), field: Some(field.into()) }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed { .. } | ApiError::BadHandshake { .. } => StatusCode::BAD_REQUEST,
            ApiError::UpgradeRequired { .. } => StatusCode::UPGRADE_REQUIRED,
            ApiError::Plan(_) | ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded { reason: AdmitError::TooLarge { .. }, .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Draining | ApiError::NotReady { .. } | ApiError::RuntimeUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HostNotAllowed { .. } => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed { .. } => "malformed_request",
            ApiError::UpgradeRequired { .. } => "upgrade_required",
            ApiError::BadHandshake { .. } => "bad_websocket_handshake",
            ApiError::Plan(e) => plan_code(e),
            ApiError::Invalid { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::Overloaded { reason: AdmitError::QueueFull(_), .. } => "queue_full",
            ApiError::Overloaded { reason: AdmitError::Timeout(_), .. } => "queue_timeout",
            ApiError::Overloaded { reason: AdmitError::TooLarge { .. }, .. } => "exceeds_capacity",
            ApiError::Draining => "draining",
            ApiError::NotReady { .. } => "runtime_not_ready",
            ApiError::RuntimeUnavailable { .. } => "runtime_unavailable",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::HostNotAllowed { .. } => "host_not_allowed",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The request field at fault.
    pub fn field(&self) -> Option<String> {
        match self {
            ApiError::Plan(e) => e.field().map(str::to_string),
            ApiError::Invalid { field, .. } => field.clone(),
            ApiError::NotReady { .. } | ApiError::RuntimeUnavailable { .. } => Some("runtime".into()),
            ApiError::Overloaded { reason: AdmitError::TooLarge { .. }, .. } => Some("run_limits".into()),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.to_string(), field: self.field() } }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded { reason: AdmitError::TooLarge { .. }, .. } => None,
            ApiError::Overloaded { retry_after_secs, .. } => Some(*retry_after_secs),
            // An image build takes minutes; polling every few seconds is pointless.
            ApiError::NotReady { .. } => Some(30),
            // Nothing was started: the client (or its load balancer) may retry at once, elsewhere.
            ApiError::Draining => Some(1),
            _ => None,
        }
    }
}

impl From<AdmitError> for ApiError {
    fn from(reason: AdmitError) -> Self {
        ApiError::Overloaded { reason, retry_after_secs: 1 }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::UpgradeRequired { .. }) {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        // The rest of a timed-out body may never come: do not wait for it
        // to reuse the connection.
        if matches!(self, ApiError::BodyTimeout { .. }) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_codes_and_fields() {
        let cases: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            (ApiError::Malformed { message: "x".into() }, 400, "malformed_request", None),
            (ApiError::BodyTimeout { ms: 10 }, 408, "request_timeout", None),
            (PlanError::UnknownRuntime("cobol".into()).into(), 422, "unknown_runtime", Some("runtime")),
            (PlanError::BadFileName("../x".into()).into(), 422, "bad_file_name", Some("files")),
            (
                PlanError::LimitOutOfRange { stage: "compile", field: "memory_bytes", value: 1, min: 1 << 20, max: 0 }
                    .into(),
                422,
                "limit_out_of_range",
                Some("compile_limits"),
            ),
            (ApiError::invalid("bad_base64", "x", "files[0].content"), 422, "bad_base64", Some("files[0].content")),
            (ApiError::Unauthorized, 401, "unauthorized", None),
            (ApiError::PayloadTooLarge { limit: 10 }, 413, "payload_too_large", None),
            (AdmitError::QueueFull(3).into(), 429, "queue_full", None),
            (AdmitError::Timeout(100).into(), 429, "queue_timeout", None),
            (AdmitError::TooLarge { need_mib: 2, budget_mib: 1 }.into(), 422, "exceeds_capacity", Some("run_limits")),
            (ApiError::Draining, 503, "draining", None),
            (ApiError::NotFound("/x".into()), 404, "not_found", None),
            (ApiError::UnsupportedMediaType { got: "text/plain".into() }, 415, "unsupported_media_type", None),
            (ApiError::HostNotAllowed { host: "evil.example".into() }, 421, "host_not_allowed", None),
            (
                PlanError::PathConflict { file: "x".into(), other: "x/y".into() }.into(),
                422,
                "path_conflict",
                Some("files"),
            ),
            (ApiError::Internal("boom".into()), 500, "internal_error", None),
            (ApiError::UpgradeRequired { missing: "x" }, 426, "upgrade_required", None),
            (ApiError::BadHandshake { problem: "x" }, 400, "bad_websocket_handshake", None),
        ];
        for (e, status, code, field) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            let b = e.body();
            assert_eq!(b.error.code, code);
            assert_eq!(b.error.field.as_deref(), field, "{e:?}");
            assert!(!b.error.message.is_empty());
        }
    }

    #[test]
    fn overload_carries_retry_after_and_unauthorized_a_challenge() {
        let r = ApiError::Overloaded { reason: AdmitError::QueueFull(1), retry_after_secs: 7 }.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r = ApiError::Unauthorized.into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(ApiError::Draining.into_response().headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn field_is_omitted_when_absent() {
        let j = serde_json::to_value(ApiError::Unauthorized.body()).unwrap();
        assert!(j["error"].get("field").is_none(), "{j}");
        assert_eq!(j["error"]["code"], "unauthorized");
    }
}
