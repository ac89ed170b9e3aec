//! Piston's WebSocket `/api/v2/connect`, on TVM's session driver.
//!
//! Piston's messages and close codes (engineer-man/piston `api/src/api/v2.js`):
//! the client sends `init` (the fields of `POST /api/v2/execute`) within
//! one second, then `data` (`stream: "stdin"`, `data`) and `signal`
//! (`signal: "SIGINT"`...); the server answers `runtime` (`language`,
//! `version`), then `stage`, `data` (`stream`, `data`) and `exit` (`stage`,
//! `code`, `signal` as a name) as the job runs (`init`'s `stdin` is not
//! written, as upstream: input comes as `data`), `error` (`message`) before
//! a 4002 close. Close codes: 4000 already initialized, 4001 no `init`
//! within a second, 4002 error notified, 4003 `data`/`signal` before
//! `init`, 4004 `data` for another stream than stdin, 4005 invalid signal,
//! 4999 job completed. Unknown message types are ignored, as upstream.
//!
//! Improvements that keep Piston clients working: `{"type": "eof"}` closes
//! the program's stdin (upstream never closes it), signals really reach the
//! program, and the session is bounded like TVM's own (stdin, message rate,
//! idle time: each ends it with an `error` and 4002).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use pyrovm::SessionInput;
use serde_json::{json, Value};

use crate::api::ExecutionResult;
use crate::exec;
use crate::session::{self, Close, Dialect, Event};
use crate::state::AppState;

/// How long a client has to send `init`, as upstream.
const INIT_TIMEOUT: Duration = Duration::from_secs(1);

fn closing(code: u16, reason: &str) -> Close {
    Close { code, reason: reason.into(), notice: None }
}

/// Piston's 4002: the message goes in an `error` message first (a close
/// reason holds only 123 bytes).
fn notified(message: impl Into<String>) -> Close {
    Close {
        code: 4002,
        reason: "Notified Error".into(),
        notice: Some(json!({"type": "error", "message": message.into()})),
    }
}

/// `GET /api/v2/connect` (WebSocket). A request that is not a WebSocket
/// handshake gets Piston's error shape, `{"message"}` (426 Upgrade Required).
pub(crate) async fn route(
    State(st): State<Arc<AppState>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => session::bounded(ws).on_upgrade(move |socket| connect(st, socket)),
        Err(r) => super::from_api(session::not_a_handshake(&r)),
    }
}

fn parse(msg: &Message) -> Result<Option<Value>, Close> {
    let text = match msg {
        Message::Text(t) => t.as_str().to_string(),
        // Upstream parses whatever arrives as JSON text.
        Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        _ => return Ok(None),
    };
    serde_json::from_str::<Value>(&text).map(Some).map_err(|e| notified(format!("Unexpected token in JSON: {e}")))
}

async fn connect(st: Arc<AppState>, mut ws: WebSocket) {
    let _in_flight = match st.life.begin() {
        Ok(g) => g,
        Err(e) => return session::close(&mut ws, notified(e.to_string())).await,
    };
    let deadline = tokio::time::Instant::now() + INIT_TIMEOUT;
    let init = loop {
        let msg = match tokio::time::timeout_at(deadline, session::next_message(&mut ws)).await {
            Err(_) => return session::close(&mut ws, closing(4001, "Initialization Timeout")).await,
            Ok(None) => return,
            Ok(Some(m)) => m,
        };
        let v = match parse(&msg) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(c) => return session::close(&mut ws, c).await,
        };
        match v.get("type").and_then(Value::as_str) {
            Some("init") => break v,
            Some("data" | "signal" | "eof") => {
                return session::close(&mut ws, closing(4003, "Not yet initialized")).await
            }
            _ => continue,
        }
    };
    let resolved = match super::resolve_job(&st, &init) {
        Ok(r) => r,
        Err(message) => return session::close(&mut ws, notified(message)).await,
    };
    // Upstream writes `stdin` only in `/execute`; a connection's input comes as `data`.
    let mut body = resolved.body;
    body.stdin = None;
    body.stdin_encoding = Default::default();
    let mut early = Vec::new();
    let prepared = match session::while_queued(&mut ws, exec::prepare(&st, body), &mut early).await {
        None => return tracing::info!("client left while waiting for a VM"),
        Some(Ok(p)) => p,
        Some(Err(e)) => return session::close(&mut ws, notified(e.to_string())).await,
    };
    let runtime =
        json!({"type": "runtime", "language": resolved.runtime.language, "version": resolved.runtime.version});
    if !session::send_json(&mut ws, &runtime).await {
        return;
    }
    session::drive(&st, &mut ws, prepared, early, &mut Piston).await;
}

/// Piston's side of a running session.
#[derive(Debug, Default)]
struct Piston;

impl Dialect for Piston {
    fn input(&mut self, msg: &Message) -> Result<Option<SessionInput>, Close> {
        let Some(v) = parse(msg)? else {
            return Ok(None);
        };
        match v.get("type").and_then(Value::as_str) {
            Some("init") => Err(closing(4000, "Already Initialized")),
            Some("data") => {
                if v.get("stream").and_then(Value::as_str) != Some("stdin") {
                    return Err(closing(4004, "Can only write to stdin"));
                }
                match v.get("data") {
                    Some(Value::String(s)) => Ok(Some(SessionInput::Stdin(s.as_bytes().to_vec()))),
                    // Upstream writes whatever it got; TVM needs text.
                    _ => Err(notified("data must be a string")),
                }
            }
            Some("signal") => match v.get("signal") {
                Some(Value::String(name)) if name.starts_with("SIG") => session::parse_signal(&json!(name))
                    .map(|n| Some(SessionInput::Signal(n)))
                    .ok_or_else(|| closing(4005, "Invalid signal")),
                _ => Err(closing(4005, "Invalid signal")),
            },
            Some("eof") => Ok(Some(SessionInput::Eof)),
            _ => Ok(None),
        }
    }

    fn event(&mut self, ev: &Event) -> Vec<Value> {
        vec![match ev {
            Event::Stage(stage) => json!({"type": "stage", "stage": stage.as_str()}),
            Event::Output(_, stream, text) => {
                json!({"type": "data", "stream": session::stream_name(*stream), "data": text})
            }
            Event::Exit { stage, exit_code, signal, .. } => json!({
                "type": "exit", "stage": stage.as_str(), "code": exit_code,
                "signal": signal.and_then(session::signal_name),
            }),
        }]
    }

    fn finish(&mut self, result: &ExecutionResult) -> (Vec<Value>, Close) {
        match &result.error {
            // Upstream reports a failure inside the runner as a notified error.
            Some(error) => (vec![], notified(error.clone())),
            None => (vec![], closing(4999, "Job Completed")),
        }
    }

    fn idle(&self) -> Close {
        notified(format!("no input or output for {} s; the session ended", session::IDLE_TIMEOUT.as_secs()))
    }

    fn flood(&self, what: &str) -> Close {
        notified(format!("{what}; the session ended"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn text(s: &str) -> Message {
        Message::Text(Utf8Bytes::from(s.to_string()))
    }

    #[test]
    fn pistons_close_codes_for_bad_messages() {
        let mut p = Piston;
        let code = |p: &mut Piston, s: &str| p.input(&text(s)).unwrap_err().code;
        assert_eq!(code(&mut p, r#"{"type":"init"}"#), 4000);
        assert_eq!(code(&mut p, r#"{"type":"data","stream":"stdout","data":"x"}"#), 4004);
        assert_eq!(code(&mut p, r#"{"type":"signal","signal":"SIGNOPE"}"#), 4005);
        assert_eq!(code(&mut p, r#"{"type":"signal","signal":9}"#), 4005);
        assert_eq!(code(&mut p, "not json"), 4002);
        assert_eq!(p.input(&text(r#"{"type":"whatever"}"#)).unwrap(), None);
        assert_eq!(
            p.input(&text(r#"{"type":"data","stream":"stdin","data":"1 2\n"}"#)).unwrap(),
            Some(SessionInput::Stdin(b"1 2\n".to_vec()))
        );
        assert_eq!(p.input(&text(r#"{"type":"signal","signal":"SIGINT"}"#)).unwrap(), Some(SessionInput::Signal(2)));
        assert_eq!(p.input(&text(r#"{"type":"eof"}"#)).unwrap(), Some(SessionInput::Eof));
    }
}
