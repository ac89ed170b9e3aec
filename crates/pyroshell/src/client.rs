//! A client for API v1, used by `tvm run --server URL`.
//!
//! It sends the same [`ExecutionRequest`] the CLI runs locally, so the two
//! paths cannot drift apart. Plain HTTP only: TVM servers sit behind a load
//! balancer that terminates TLS.

use std::time::Duration;

use pyrovm::ExecutionRequest;
use tvm_protocol::{Stage, Stream};

use crate::api::{ExecutionBody, ExecutionResult, OutputEvent, RuntimesBody};
use crate::error::ErrorBody;
use crate::sse::SseParser;

/// Why a remote execution produced no result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not usable.
    #[error("invalid server URL {url:?}: {message}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("cannot reach {url}")]
    Http {
        /// The endpoint.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an API error.
    #[error("server refused the request ({status} {code}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code (`unknown_runtime`, `queue_full`, ...).
        code: String,
        /// Explanation.
        message: String,
        /// Request field at fault.
        field: Option<String>,
        /// Retry-After seconds, for 429 and 503.
        retry_after_secs: Option<u64>,
    },
    /// The server's answer is not what API v1 promises.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the request itself was at fault (4xx other than 429), as
    /// opposed to the server or the network.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if (400..500).contains(status) && *status != 429)
    }
}

fn endpoint(base: &str, path: &str) -> Result<String, ClientError> {
    let url = base.trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ClientError::Url { url: base.into(), message: "must start with http:// or https://".into() });
    }
    if url.starts_with("https://") {
        return Err(ClientError::Url {
            url: base.into(),
            message: "https is not supported by this client; reach the server over plain HTTP".into(),
        });
    }
    Ok(format!("{url}{path}"))
}

fn client() -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|source| ClientError::Http { url: String::new(), source })
}

async fn send(
    url: &str,
    api_key: Option<&str>,
    req: &ExecutionRequest,
    accept: &str,
) -> Result<reqwest::Response, ClientError> {
    let mut rb = client()?.post(url).header(reqwest::header::ACCEPT, accept).json(&ExecutionBody::from_request(req));
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.map_err(|source| ClientError::Http { url: url.into(), source })?;
    checked(url, resp).await
}

/// `resp` if it is a success, else the API error it carries.
async fn checked(url: &str, resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let retry_after_secs =
        resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let text = resp.text().await.map_err(|source| ClientError::Http { url: url.into(), source })?;
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => Err(ClientError::Api {
            status,
            code: b.error.code,
            message: b.error.message,
            field: b.error.field,
            retry_after_secs,
        }),
        Err(_) => Err(ClientError::Protocol(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()))),
    }
}

/// The runtimes of the server at `base_url` (`GET /v1/runtimes`): catalog
/// entries with their image state there, and the operator's maximum limits.
///
/// # Errors
/// [`ClientError`]: a bad URL, an unreachable server, an API error, or an
/// answer that is not a [`RuntimesBody`].
pub async fn runtimes(base_url: &str, api_key: Option<&str>) -> Result<RuntimesBody, ClientError> {
    let url = endpoint(base_url, "/v1/runtimes")?;
    let mut rb = client()?.get(&url);
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
    let bytes =
        checked(&url, resp).await?.bytes().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("runtimes list is not valid: {e}")))
}

/// The Prometheus text of the server at `base_url` (`GET /metrics`).
///
/// # Errors
/// [`ClientError`]: a bad URL, an unreachable server, or an API error.
pub async fn metrics(base_url: &str, api_key: Option<&str>) -> Result<String, ClientError> {
    let url = endpoint(base_url, "/metrics")?;
    let mut rb = client()?.get(&url);
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
    checked(&url, resp).await?.text().await.map_err(|source| ClientError::Http { url, source })
}

/// Runs `req` on the server at `base_url` and returns the result when done.
pub async fn execute(
    base_url: &str,
    api_key: Option<&str>,
    req: &ExecutionRequest,
) -> Result<ExecutionResult, ClientError> {
    let url = endpoint(base_url, "/v1/executions")?;
    let resp = send(&url, api_key, req, "application/json").await?;
    let bytes = resp.bytes().await.map_err(|source| ClientError::Http { url: url.clone(), source })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("result is not valid: {e}")))
}

/// Like [`execute`], calling `on_output` with output text as the program produces it.
pub async fn execute_streaming(
    base_url: &str,
    api_key: Option<&str>,
    req: &ExecutionRequest,
    mut on_output: impl FnMut(Stage, Stream, &str),
) -> Result<ExecutionResult, ClientError> {
    let url = endpoint(base_url, "/v1/executions/stream")?;
    let mut resp = send(&url, api_key, req, "text/event-stream").await?;
    let mut parser = SseParser::default();
    while let Some(chunk) = resp.chunk().await.map_err(|source| ClientError::Http { url: url.clone(), source })? {
        for ev in parser.push(&chunk) {
            let stream = match ev.event.as_str() {
                "stdout" => Stream::Stdout,
                "stderr" => Stream::Stderr,
                "result" => {
                    return serde_json::from_str(&ev.data)
                        .map_err(|e| ClientError::Protocol(format!("result event is not valid: {e}")));
                }
                _ => continue,
            };
            let out: OutputEvent = serde_json::from_str(&ev.data)
                .map_err(|e| ClientError::Protocol(format!("{} event is not valid: {e}", ev.event)))?;
            on_output(out.stage, stream, &out.data);
        }
    }
    Err(ClientError::Protocol("the event stream ended without a result".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_join_and_refuse_what_cannot_work() {
        assert_eq!(endpoint("http://h:8080/", "/v1/x").unwrap(), "http://h:8080/v1/x");
        assert!(matches!(endpoint("h:8080", "/v1/x"), Err(ClientError::Url { .. })));
        assert!(matches!(endpoint("https://h", "/v1/x"), Err(ClientError::Url { .. })));
    }

    #[test]
    fn bad_request_classification() {
        let api = |status| ClientError::Api {
            status,
            code: String::new(),
            message: String::new(),
            field: None,
            retry_after_secs: None,
        };
        assert!(api(422).is_bad_request());
        assert!(!api(429).is_bad_request());
        assert!(!api(503).is_bad_request());
    }

    #[test]
    fn an_unreachable_server_names_each_cause_once() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let url = "http://127.0.0.1:1/v1/runtimes".to_string();
        let source = rt.block_on(client().unwrap().get(&url).send()).unwrap_err();
        let err = ClientError::Http { url, source };
        let mut chain = err.to_string();
        let mut cause = std::error::Error::source(&err);
        while let Some(c) = cause {
            chain.push_str(&format!(": {c}"));
            cause = c.source();
        }
        assert_eq!(chain.matches("error sending request").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot reach http://127.0.0.1:1/v1/runtimes: "), "{chain}");
    }
}
