//! Interactive sessions over WebSocket: TVM's own `/v1/sessions` and
//! Piston's `/api/v2/connect` (in [`crate::piston`]), both on one driver.
//!
//! A session is one execution (same validation, admission control, pool and
//! limits as `POST /v1/executions`) whose run stage reads stdin from the
//! client while it runs. The driver ([`drive`]) relays client input to the
//! VM and the VM's events to the client, and bounds what a client can do:
//! at most [`MAX_SESSION_STDIN`] stdin bytes in all, [`MAX_MESSAGES_PER_SEC`]
//! messages per second, messages of at most [`MAX_MESSAGE_BYTES`], and
//! [`IDLE_TIMEOUT`] without input or output. A client that disconnects ends
//! the VM at once: the execution future is dropped, and with it the VM.
//!
//! Native protocol (JSON text messages, `type` names the kind):
//! - client → server: `start` (the fields of an execution request), then
//!   `stdin` (`data`, optional `encoding`: `utf8`/`base64`; a binary message
//!   is raw stdin too), `eof`, `signal` (`signal`: `"SIGINT"`, `"INT"` or 2).
//! - server → client: `started` (`id`, `runtime`), `stage` (`stage`),
//!   `stdout`/`stderr` (`stage`, `data` text), `exit` (`stage`, `status`,
//!   `exit_code`, `signal`), `result` (the execution result), `error`
//!   (`code`, `message`) before an abnormal close.
//! - close codes: 1000 after `result` (reason: the verdict); 4000 + the HTTP
//!   status an equivalent request would get otherwise (4400 bad message,
//!   4401 no API key, 4408 idle or no `start` in time, 4413 too much stdin or
//!   too large a message, 4422 invalid request, 4429 overloaded or too many
//!   messages, 4500 internal, 4503 draining or runtime not ready).

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::response::IntoResponse;
use pyrovm::{SessionEvent, SessionInput};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;
use tvm_protocol::{Stage, StageStatus, Stream, MAX_STDIN_PENDING};

use crate::api::ExecutionResult;
use crate::error::ApiError;
use crate::exec::{self, Prepared};
use crate::sse::Utf8Chunks;
use crate::state::AppState;

/// Stdin a session may send in all (the agent's buffer for unread input,
/// so nothing a client sends is ever dropped).
pub const MAX_SESSION_STDIN: usize = MAX_STDIN_PENDING;

/// Messages per second a client may send (averaged over one-second windows).
pub const MAX_MESSAGES_PER_SEC: u32 = 200;

/// Largest WebSocket message a client may send.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A session with neither client input nor program output for this long is
/// closed (4408 natively).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a native client has to send `start` after connecting.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Inputs queued for the VM; more means the client outruns the host link.
const INPUT_QUEUE: usize = 256;

/// An owned session event, queued between the VM callback and the socket.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A stage starts.
    Stage(Stage),
    /// Text output (UTF-8 sequences kept whole across chunks).
    Output(Stage, Stream, String),
    /// A stage ended.
    Exit { stage: Stage, status: StageStatus, exit_code: Option<i32>, signal: Option<i32> },
}

/// Why a session closes early, as a close code and a short reason.
#[derive(Debug, Clone)]
pub(crate) struct Close {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason (at most 123 bytes; longer text goes in an error message first).
    pub reason: String,
    /// A JSON message sent before the close frame, if any.
    pub notice: Option<Value>,
}

/// How a dialect turns client messages into inputs and events into messages.
pub(crate) trait Dialect {
    /// Parses a client message received after the start.
    ///
    /// # Errors
    /// A [`Close`] for a message the dialect does not accept.
    fn input(&mut self, msg: &Message) -> Result<Option<SessionInput>, Close>;
    /// The message(s) for one event.
    fn event(&mut self, ev: &Event) -> Vec<Value>;
    /// Messages and close after the execution finished.
    fn finish(&mut self, result: &ExecutionResult) -> (Vec<Value>, Close);
    /// The close for an idle session.
    fn idle(&self) -> Close;
    /// The close for a client breaking the session's bounds (rate, stdin size).
    fn flood(&self, what: &str) -> Close;
}

/// Sends one JSON message; `false` when the client is gone.
pub(crate) async fn send_json(ws: &mut WebSocket, v: &Value) -> bool {
    ws.send(Message::Text(Utf8Bytes::from(v.to_string()))).await.is_ok()
}

/// Sends the close's notice (if any) and the close frame.
pub(crate) async fn close(ws: &mut WebSocket, c: Close) {
    if let Some(n) = &c.notice {
        let _ = send_json(ws, n).await;
    }
    let mut reason = c.reason;
    truncate_utf8(&mut reason, 123);
    let _ = ws.send(Message::Close(Some(CloseFrame { code: c.code, reason: Utf8Bytes::from(reason) }))).await;
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Runs a prepared execution as a session on `ws`. Returns when the
/// execution finished (result sent, socket closed), the client left, or a
/// bound was broken (socket closed with the dialect's code).
///
/// `early` holds client messages read while the session waited for a VM
/// ([`while_queued`]); they are taken as input first, in order.
pub(crate) async fn drive(
    st: &AppState,
    ws: &mut WebSocket,
    prepared: Prepared,
    early: Vec<Message>,
    dialect: &mut impl Dialect,
) {
    let id = prepared.id.clone();
    let (in_tx, mut in_rx) = mpsc::channel::<SessionInput>(INPUT_QUEUE);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let mut chunks = Utf8Chunks::default();
    let execution = exec::run_session(st, prepared, &mut in_rx, move |ev| {
        let owned = match ev {
            SessionEvent::StageStarted(stage) => Some(Event::Stage(stage)),
            SessionEvent::Output { stage, stream, data } => {
                chunks.push(stage, stream, data).map(|text| Event::Output(stage, stream, text))
            }
            SessionEvent::StageExited { stage, status, exit_code, signal } => {
                // A stage's last bytes come before its exit.
                for (s, stream, text) in chunks.finish() {
                    let _ = ev_tx.send(Event::Output(s, stream, text));
                }
                Some(Event::Exit { stage, status, exit_code, signal })
            }
        };
        if let Some(ev) = owned {
            let _ = ev_tx.send(ev);
        }
    });
    tokio::pin!(execution);
    let mut gate = InputGate::new();
    for msg in early {
        let full = match gate.admit(&msg, dialect) {
            Ok(Some(input)) => in_tx.try_send(input).is_err(),
            Ok(None) => false,
            Err(c) => return close(ws, c).await,
        };
        if full {
            return close(ws, dialect.flood("input faster than the VM takes it")).await;
        }
    }
    let mut idle_at = Instant::now() + IDLE_TIMEOUT;
    let ended = loop {
        tokio::select! {
            biased;
            Some(ev) = ev_rx.recv() => {
                idle_at = Instant::now() + IDLE_TIMEOUT;
                for m in dialect.event(&ev) {
                    if !send_json(ws, &m).await {
                        info!(session = %id, "client gone; ending the VM");
                        return;
                    }
                }
            }
            result = &mut execution => break result,
            msg = ws.recv() => {
                let msg = match msg {
                    Some(Ok(Message::Close(_))) | None => {
                        info!(session = %id, "client disconnected; ending the VM");
                        return;
                    }
                    Some(Err(e)) => {
                        info!(session = %id, error = %e, "client connection failed; ending the VM");
                        return;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => m,
                };
                idle_at = Instant::now() + IDLE_TIMEOUT;
                let input = match gate.admit(&msg, dialect) {
                    Ok(Some(i)) => i,
                    Ok(None) => continue,
                    Err(c) => return close(ws, c).await,
                };
                if in_tx.try_send(input).is_err() {
                    return close(ws, dialect.flood("input faster than the VM takes it")).await;
                }
            }
            _ = tokio::time::sleep_until(idle_at) => {
                info!(session = %id, "idle; ending the VM");
                return close(ws, dialect.idle()).await;
            }
        }
    };
    // Events queued before the result still go out first.
    while let Ok(ev) = ev_rx.try_recv() {
        for m in dialect.event(&ev) {
            let _ = send_json(ws, &m).await;
        }
    }
    let (messages, c) = dialect.finish(&ended);
    for m in messages {
        let _ = send_json(ws, &m).await;
    }
    close(ws, c).await;
}

/// Signal number from a name (`SIGINT`, `INT`) or a number; standard signals only.
pub(crate) fn parse_signal(v: &Value) -> Option<i32> {
    let n = match v {
        Value::Number(n) => i32::try_from(n.as_i64()?).ok()?,
        Value::String(s) => {
            let upper = s.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
            name.parse::<nix::sys::signal::Signal>().ok()? as i32
        }
        _ => return None,
    };
    (1..=31).contains(&n).then_some(n)
}

/// Signal name of a number (`SIGKILL`), as Piston reports it.
pub(crate) fn signal_name(n: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(n).ok().map(|s| s.as_str())
}

/// Snake-case name of a stage status, as in JSON.
pub(crate) fn status_name(s: StageStatus) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// Snake-case name of a stream.
pub(crate) fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// TVM's own session protocol (`/v1/sessions`).
#[derive(Debug, Default)]
pub(crate) struct Native;

impl Native {
    /// The close for a message that is not understood.
    pub(crate) fn bad(message: String) -> Close {
        Close {
            code: 4400,
            reason: "bad message".into(),
            notice: Some(json!({"type": "error", "code": "bad_message", "message": message})),
        }
    }
}

impl Dialect for Native {
    fn input(&mut self, msg: &Message) -> Result<Option<SessionInput>, Close> {
        let text = match msg {
            Message::Binary(b) => return Ok(Some(SessionInput::Stdin(b.to_vec()))),
            Message::Text(t) => t.as_str(),
            _ => return Ok(None),
        };
        let v: Value = serde_json::from_str(text).map_err(|e| Native::bad(format!("message is not JSON: {e}")))?;
        match v.get("type").and_then(Value::as_str) {
            Some("stdin") => {
                let data = v
                    .get("data")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Native::bad("stdin needs `data` as a string".into()))?;
                let bytes = match v.get("encoding").and_then(Value::as_str).unwrap_or("utf8") {
                    "utf8" => data.as_bytes().to_vec(),
                    "base64" => {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .map_err(|e| Native::bad(format!("stdin data is not valid base64: {e}")))?
                    }
                    other => return Err(Native::bad(format!("unknown encoding {other:?}; use utf8 or base64"))),
                };
                Ok(Some(SessionInput::Stdin(bytes)))
            }
            Some("eof") => Ok(Some(SessionInput::Eof)),
            Some("signal") => {
                let raw = v.get("signal").unwrap_or(&Value::Null);
                parse_signal(raw).map(|n| Some(SessionInput::Signal(n))).ok_or_else(|| {
                    Native::bad(format!("invalid signal {raw}; use a name like \"SIGINT\" or a number from 1 to 31"))
                })
            }
            Some("start") => Err(Native::bad("the session has already started".into())),
            Some(other) => Err(Native::bad(format!("unknown message type {other:?}; expected stdin, eof or signal"))),
            None => Err(Native::bad("message has no `type`".into())),
        }
    }

    fn event(&mut self, ev: &Event) -> Vec<Value> {
        vec![match ev {
            Event::Stage(stage) => json!({"type": "stage", "stage": stage.as_str()}),
            Event::Output(stage, stream, text) => {
                json!({"type": stream_name(*stream), "stage": stage.as_str(), "data": text})
            }
            Event::Exit { stage, status, exit_code, signal } => json!({
                "type": "exit", "stage": stage.as_str(), "status": status_name(*status),
                "exit_code": exit_code, "signal": signal,
            }),
        }]
    }

    fn finish(&mut self, result: &ExecutionResult) -> (Vec<Value>, Close) {
        let mut v = serde_json::to_value(result).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert("type".into(), json!("result"));
        }
        (vec![v], Close { code: 1000, reason: result.verdict.as_str().into(), notice: None })
    }

    fn idle(&self) -> Close {
        let secs = IDLE_TIMEOUT.as_secs();
        Close {
            code: 4408,
            reason: "idle".into(),
            notice: Some(json!({"type": "error", "code": "idle",
                "message": format!("no input or output for {secs} s; the session ended")})),
        }
    }

    fn flood(&self, what: &str) -> Close {
        let code = if what.contains("bytes") { 4413 } else { 4429 };
        Close {
            code,
            reason: "limit exceeded".into(),
            notice: Some(
                json!({"type": "error", "code": "session_limit", "message": format!("{what}; the session ended")}),
            ),
        }
    }
}

/// The close for a request that failed before the session started.
pub(crate) fn api_error_close(e: &crate::error::ApiError) -> Close {
    let body = e.body();
    Close {
        code: 4000 + e.status().as_u16(),
        reason: body.error.code.clone(),
        notice: Some(json!({"type": "error", "code": body.error.code, "message": body.error.message,
            "field": body.error.field})),
    }
}

/// The bounds on what a client sends: messages per second and stdin in all.
struct InputGate {
    stdin_total: usize,
    window: (Instant, u32),
}

impl InputGate {
    fn new() -> Self {
        Self { stdin_total: 0, window: (Instant::now(), 0) }
    }

    /// The input `msg` carries (`None` for messages that carry none), or the
    /// close that a broken bound or a bad message earns.
    fn admit(&mut self, msg: &Message, dialect: &mut impl Dialect) -> Result<Option<SessionInput>, Close> {
        let now = Instant::now();
        if now.duration_since(self.window.0) >= Duration::from_secs(1) {
            self.window = (now, 0);
        }
        self.window.1 += 1;
        if self.window.1 > MAX_MESSAGES_PER_SEC {
            return Err(dialect.flood(&format!("more than {MAX_MESSAGES_PER_SEC} messages per second")));
        }
        let input = dialect.input(msg)?;
        if let Some(SessionInput::Stdin(data)) = &input {
            self.stdin_total += data.len();
            if self.stdin_total > MAX_SESSION_STDIN {
                return Err(dialect.flood(&format!("more than {MAX_SESSION_STDIN} bytes of stdin")));
            }
        }
        Ok(input)
    }
}

/// Awaits `admission` (validation and the wait for a VM, which under load
/// can take minutes) while still reading `ws`, so that the client's
/// keepalive pings are answered: standard clients (Python `websockets`,
/// browsers behind proxies) otherwise give up with "keepalive ping timeout"
/// while the session is queued. Data messages read meanwhile are kept, in
/// order, in `early` for [`drive`]; after [`INPUT_QUEUE`] of them reading
/// pauses until admission. `None` when the client left (the wait, and any
/// place in the queue, is dropped with it).
pub(crate) async fn while_queued<T>(
    ws: &mut WebSocket,
    admission: impl std::future::Future<Output = T>,
    early: &mut Vec<Message>,
) -> Option<T> {
    tokio::pin!(admission);
    loop {
        if early.len() >= INPUT_QUEUE {
            return Some(admission.await);
        }
        tokio::select! {
            biased;
            done = &mut admission => return Some(done),
            msg = ws.recv() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
                Some(Ok(m)) => early.push(m),
            },
        }
    }
}

/// The next data message (text or binary); `None` when the client left.
pub(crate) async fn next_message(ws: &mut WebSocket) -> Option<Message> {
    loop {
        match ws.recv().await? {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(m) => return Some(m),
        }
    }
}

/// The upgrade settings both session routes share.
pub(crate) fn bounded(ws: axum::extract::ws::WebSocketUpgrade) -> axum::extract::ws::WebSocketUpgrade {
    ws.max_message_size(MAX_MESSAGE_BYTES).max_frame_size(MAX_MESSAGE_BYTES)
}

/// Why a request to a session route is not a WebSocket handshake TVM can
/// accept, as an API error: 426 when it is not a (version 13) handshake at
/// all, 400 when it is a broken one.
pub(crate) fn not_a_handshake(r: &WebSocketUpgradeRejection) -> ApiError {
    use WebSocketUpgradeRejection as R;
    match r {
        R::InvalidConnectionHeader(_) => {
            ApiError::UpgradeRequired { missing: "the Connection header does not name Upgrade" }
        }
        R::InvalidUpgradeHeader(_) => {
            ApiError::UpgradeRequired { missing: "the Upgrade header does not name websocket" }
        }
        R::InvalidWebSocketVersionHeader(_) => ApiError::UpgradeRequired { missing: "Sec-WebSocket-Version is not 13" },
        R::ConnectionNotUpgradable(_) => {
            ApiError::UpgradeRequired { missing: "this connection cannot be upgraded (HTTP/1.1 is needed)" }
        }
        R::WebSocketKeyHeaderMissing(_) => {
            ApiError::BadHandshake { problem: "the Sec-WebSocket-Key header is missing" }
        }
        R::InvalidProtocolPseudoheader(_) => {
            ApiError::BadHandshake { problem: "the :protocol pseudo-header is not websocket" }
        }
        R::MethodNotGet(_) | R::MethodNotConnect(_) => ApiError::MethodNotAllowed,
        // The enum is non-exhaustive: a rejection added later is still not an upgrade.
        _ => ApiError::UpgradeRequired { missing: "not a WebSocket handshake" },
    }
}

/// `GET /v1/sessions` (WebSocket): an interactive execution. A request that
/// is not a WebSocket handshake gets the API's error shape (426 `upgrade_required`).
pub(crate) async fn native_route(
    axum::extract::State(st): axum::extract::State<std::sync::Arc<AppState>>,
    ws: Result<axum::extract::ws::WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> axum::response::Response {
    match ws {
        Ok(ws) => bounded(ws).on_upgrade(move |socket| native(st, socket)),
        Err(r) => not_a_handshake(&r).into_response(),
    }
}

async fn native(st: std::sync::Arc<AppState>, mut ws: WebSocket) {
    let _in_flight = match st.life.begin() {
        Ok(g) => g,
        Err(e) => return close(&mut ws, api_error_close(&e)).await,
    };
    let first = match tokio::time::timeout(START_TIMEOUT, next_message(&mut ws)).await {
        Err(_) => {
            let secs = START_TIMEOUT.as_secs();
            let notice = json!({"type": "error", "code": "no_start",
                "message": format!("no start message within {secs} s")});
            return close(&mut ws, Close { code: 4408, reason: "no start message".into(), notice: Some(notice) }).await;
        }
        Ok(None) => return,
        Ok(Some(m)) => m,
    };
    let body = match parse_start(&first) {
        Ok(b) => b,
        Err(c) => return close(&mut ws, c).await,
    };
    let mut early = Vec::new();
    let prepared = match while_queued(&mut ws, exec::prepare(&st, body), &mut early).await {
        None => return info!("client left while waiting for a VM"),
        Some(Ok(p)) => p,
        Some(Err(e)) => return close(&mut ws, api_error_close(&e)).await,
    };
    if prepared.has_tests() {
        let notice = json!({"type": "error", "code": "invalid_request", "field": "tests",
            "message": "a session runs one program interactively; send tests to POST /v1/executions"});
        return close(&mut ws, Close { code: 4422, reason: "tests in a session".into(), notice: Some(notice) }).await;
    }
    let started = json!({"type": "started", "id": prepared.id, "runtime": prepared.runtime()});
    if !send_json(&mut ws, &started).await {
        return;
    }
    drive(&st, &mut ws, prepared, early, &mut Native).await;
}

/// The `start` message: `type` plus the fields of an execution request.
fn parse_start(msg: &Message) -> Result<crate::api::ExecutionBody, Close> {
    let Message::Text(text) = msg else {
        return Err(Native::bad("the first message must be a JSON text message of type start".into()));
    };
    let mut v: Value =
        serde_json::from_str(text.as_str()).map_err(|e| Native::bad(format!("message is not JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(Native::bad("the start message must be a JSON object".into()));
    };
    match obj.remove("type") {
        Some(Value::String(t)) if t == "start" => {}
        _ => return Err(Native::bad("the first message must have type start".into())),
    }
    serde_json::from_value(v).map_err(|e| Close {
        code: 4422,
        reason: "invalid start".into(),
        notice: Some(json!({"type": "error", "code": "invalid_request", "message": format!("invalid start: {e}")})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rejection(headers: &[(&str, &str)]) -> WebSocketUpgradeRejection {
        use axum::extract::FromRequestParts;
        let mut b = axum::http::Request::get("/v1/sessions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await.err().unwrap()
    }

    #[tokio::test]
    async fn a_request_that_is_no_handshake_is_426_with_upgrade_headers() {
        type Headers = &'static [(&'static str, &'static str)];
        const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
        let cases: [(Headers, u16, &str); 5] = [
            (&[], 426, "upgrade_required"),
            (&[("connection", "upgrade")], 426, "upgrade_required"),
            (
                &[
                    ("connection", "upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", KEY),
                    ("sec-websocket-version", "8"),
                ],
                426,
                "upgrade_required",
            ),
            // A well-formed handshake on a connection hyper cannot upgrade (none here).
            (
                &[
                    ("connection", "upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", KEY),
                    ("sec-websocket-version", "13"),
                ],
                426,
                "upgrade_required",
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13")],
                400,
                "bad_websocket_handshake",
            ),
        ];
        for (headers, status, code) in cases {
            let e = not_a_handshake(&rejection(headers).await);
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{headers:?}: {e}");
            let r = e.into_response();
            if status == 426 {
                assert_eq!(r.headers()["upgrade"], "websocket");
                assert_eq!(r.headers()["sec-websocket-version"], "13");
            }
        }
    }

    #[test]
    fn signals_by_name_or_number_standard_only() {
        assert_eq!(parse_signal(&json!("SIGINT")), Some(2));
        assert_eq!(parse_signal(&json!("kill")), Some(9));
        assert_eq!(parse_signal(&json!(15)), Some(15));
        for bad in [json!("SIGNOPE"), json!(0), json!(32), json!(-9), json!(null), json!([2])] {
            assert_eq!(parse_signal(&bad), None, "{bad}");
        }
        assert_eq!(signal_name(9), Some("SIGKILL"));
    }

    #[test]
    fn native_messages_parse_or_close_with_4400() {
        let mut n = Native;
        let text = |s: &str| Message::Text(Utf8Bytes::from(s.to_string()));
        assert_eq!(
            n.input(&text(r#"{"type":"stdin","data":"hi\n"}"#)).unwrap(),
            Some(SessionInput::Stdin(b"hi\n".to_vec()))
        );
        assert_eq!(
            n.input(&text(r#"{"type":"stdin","data":"AP8=","encoding":"base64"}"#)).unwrap(),
            Some(SessionInput::Stdin(vec![0, 255]))
        );
        assert_eq!(n.input(&text(r#"{"type":"eof"}"#)).unwrap(), Some(SessionInput::Eof));
        assert_eq!(n.input(&text(r#"{"type":"signal","signal":"SIGTERM"}"#)).unwrap(), Some(SessionInput::Signal(15)));
        for bad in [
            "nope",
            "{}",
            r#"{"type":"dance"}"#,
            r#"{"type":"stdin"}"#,
            r#"{"type":"signal","signal":99}"#,
            r#"{"type":"start"}"#,
            r#"{"type":"stdin","data":"x","encoding":"rot13"}"#,
        ] {
            let c = n.input(&text(bad)).unwrap_err();
            assert_eq!(c.code, 4400, "{bad}");
            assert!(c.notice.is_some());
        }
    }
}
