//! Connection hygiene: how many connections, for how long, and what hyper
//! says on its own.
//!
//! - [`ConnLimits`]: a cap on open connections per server and per client
//!   address, below the descriptor limit; connections past it are answered
//!   503 (best effort, in the API's error shape) and closed at once.
//! - [`Activity`] + [`watchdog`]: every connection is closed once it has had
//!   no request in progress for the idle timeout (whatever the protocol and
//!   wherever it stalls: before protocol detection, inside a partial HTTP/1
//!   request line or HTTP/2 preface, or idle between requests), or once a
//!   write to it has been blocked that long (a client that never reads).
//!   A request counts as in progress from the moment hyper hands it to the
//!   service until its response body ends, so long executions and event
//!   streams are never cut.
//! - [`TrackedIo`]: hyper answers an unparsable HTTP/1 request (bad request
//!   line, conflicting Content-Length, URI or headers too large) by itself
//!   with an empty body. The write of such a response (an error status, no
//!   request in progress, no `x-request-id`: every response of the router
//!   has one) is replaced by the same status in the API's error shape.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorBody;
use crate::metrics::Metrics;

/// Why a connection was refused or closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server-wide cap is reached.
    Total,
    /// This client address has its cap.
    PerIp,
}

/// Open connections, capped per server and per client address.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max: usize,
    per_ip: usize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection's place; freed on drop.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        let mut m = self.limits.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    /// At most `max` connections, `per_ip` of them from one address.
    pub fn new(max: usize, per_ip: usize) -> Self {
        Self { max: max.max(1), per_ip: per_ip.max(1), open: AtomicUsize::new(0), by_ip: Mutex::default() }
    }

    /// A place for a connection from `ip`, or why not.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let mut m = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Acquire) >= self.max {
            return Err(Refusal::Total);
        }
        let n = m.entry(ip).or_default();
        if *n >= self.per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(ConnSlot { limits: self.clone(), ip })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The server-wide cap.
    pub fn max(&self) -> usize {
        self.max
    }
}

const NEVER: u64 = u64::MAX;

/// What one connection is doing, as the watchdog sees it. Times are ms since `start`.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    idle_since: AtomicU64,
    write_blocked_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(NEVER),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A request reached the service; in progress until the guard (kept in its response body) drops.
    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves with the reason once the connection must be closed: no request
/// in progress for `idle`, or a write blocked for `idle`.
pub(crate) async fn watchdog(act: Arc<Activity>, idle: Duration) -> &'static str {
    let idle_ms = idle.as_millis() as u64;
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let now = act.now();
        if !act.busy() && now.saturating_sub(act.idle_since.load(Ordering::Acquire)) >= idle_ms {
            return "idle";
        }
        let blocked = act.write_blocked_since.load(Ordering::Acquire);
        if blocked != NEVER && now.saturating_sub(blocked) >= idle_ms {
            return "write_stalled";
        }
    }
}

/// A response body that keeps its request "in progress" until it ends.
pub(crate) struct Guarded {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router as a hyper service that records requests in progress.
#[derive(Clone)]
pub(crate) struct Tracked {
    inner: hyper_util::service::TowerToHyperService<axum::Router>,
    act: Arc<Activity>,
}

impl Tracked {
    pub fn new(app: axum::Router, act: Arc<Activity>) -> Self {
        Self { inner: hyper_util::service::TowerToHyperService::new(app), act }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Guarded>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Guarded>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.act.begin();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Guarded { inner, _guard: guard }))
        })
    }
}

/// The socket as hyper sees it: records blocked writes and rewrites hyper's own error answers.
pub(crate) struct TrackedIo<T> {
    inner: T,
    act: Arc<Activity>,
    metrics: Arc<Metrics>,
    peer: std::net::SocketAddr,
    /// Our replacement answer still to be written, and how much of it is.
    replacement: Option<(Vec<u8>, usize)>,
    /// After a replacement, hyper's own bytes go nowhere (it closes the connection next).
    swallowing: bool,
}

impl<T> TrackedIo<T> {
    pub fn new(inner: T, act: Arc<Activity>, metrics: Arc<Metrics>, peer: std::net::SocketAddr) -> Self {
        Self { inner, act, metrics, peer, replacement: None, swallowing: false }
    }
}

/// The status of an automatic answer of hyper, if `buf` is one: an HTTP/1
/// head with a 4xx/5xx status and no `x-request-id`.
fn automatic_error_status(buf: &[u8]) -> Option<u16> {
    if !(buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 ")) || buf.len() < 12 {
        return None;
    }
    let status: u16 = std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    ((400..600).contains(&status) && !head.contains("\r\nx-request-id:")).then_some(status)
}

/// A complete HTTP/1.1 response in the API's error shape.
pub(crate) fn error_response_bytes(status: u16, code: &str, message: &str, request_id: &str) -> Vec<u8> {
    let reason = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let body = serde_json::to_vec(&ErrorBody {
        error: crate::error::ErrorDetail { code: code.into(), message: message.into(), field: None },
    })
    .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nx-request-id: {request_id}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn automatic_error_message(status: u16) -> (&'static str, &'static str) {
    match status {
        414 => ("uri_too_long", "the request URI is too long"),
        431 => ("headers_too_large", "the request headers are too large"),
        _ => ("bad_http_request", "the request is not valid HTTP/1.1 (request line, headers or framing)"),
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> TrackedIo<T> {
    /// Writes what is left of the replacement; Ready once all of it is out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.replacement {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    if *done == bytes.len() {
                        self.replacement = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn note(&self, blocked: bool) {
        let a = &self.act;
        if blocked {
            let _ = a.write_blocked_since.compare_exchange(NEVER, a.now(), Ordering::AcqRel, Ordering::Acquire);
        } else {
            a.write_blocked_since.store(NEVER, Ordering::Release);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if !self.swallowing && !self.act.busy() {
            if let Some(status) = automatic_error_status(buf) {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let (code, message) = automatic_error_message(status);
                tracing::info!(request_id = %id, peer = %self.peer, status, code, "malformed HTTP request answered");
                self.metrics.request("malformed", status);
                self.replacement = Some((error_response_bytes(status, code, message, &id), 0));
                self.swallowing = true;
            }
        }
        if self.swallowing {
            let r = self.poll_replacement(cx);
            self.note(r.is_pending());
            return r.map_ok(|()| buf.len());
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_replacement(cx)?.is_pending() {
            self.note(true);
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_replacement(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises the soft descriptor limit to the hard one and returns it (the
/// default soft limit of 1024 would cap the server far below what it can serve).
pub(crate) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Descriptors kept back from connections: the server's own files and
/// sockets, and per VM its QEMU pipes, sockets and run-dir files.
pub(crate) fn reserved_fds(max_vms: usize) -> u64 {
    256 + 32 * max_vms as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_server_and_per_address_and_free_on_drop() {
        let l = Arc::new(ConnLimits::new(3, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = l.try_open(a).unwrap();
        let _a2 = l.try_open(a).unwrap();
        assert_eq!(l.try_open(a).unwrap_err(), Refusal::PerIp);
        let _b1 = l.try_open(b).unwrap();
        assert_eq!(l.try_open(b).unwrap_err(), Refusal::Total);
        assert_eq!(l.open(), 3);
        drop(a1);
        assert!(l.try_open(a).is_ok());
    }

    #[test]
    fn only_heads_without_a_request_id_are_automatic_errors() {
        let auto = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_error_status(auto), Some(400));
        assert_eq!(automatic_error_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n"), Some(431));
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nx-request-id: 1\r\n\r\n{}";
        assert_eq!(automatic_error_status(ours), None);
        assert_eq!(automatic_error_status(b"HTTP/1.1 100 Continue\r\n\r\n"), None);
        assert_eq!(automatic_error_status(b"{\"x\":1}"), None);
        let r = error_response_bytes(400, "bad_http_request", "m", "abc");
        let text = String::from_utf8(r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n") && head.contains("x-request-id: abc"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "bad_http_request");
    }
}
