//! Server-sent events: turning output chunks into text events (server) and
//! events back into values (client).
//!
//! The guest streams raw byte chunks that may end in the middle of a UTF-8
//! sequence; [`Utf8Chunks`] holds such a tail back until the rest arrives so
//! a multi-byte character is never turned into two replacement characters.

use std::collections::HashMap;

use tvm_protocol::{Stage, Stream};

/// Longest incomplete UTF-8 sequence worth holding back.
const MAX_TAIL: usize = 3;

/// Per (stage, stream) carry-over of incomplete UTF-8 sequences.
#[derive(Debug, Default)]
pub struct Utf8Chunks {
    tails: HashMap<(Stage, Stream), Vec<u8>>,
}

impl Utf8Chunks {
    /// Text to emit for `data`, or `None` when it is all held back.
    pub fn push(&mut self, stage: Stage, stream: Stream, data: &[u8]) -> Option<String> {
        let tail = self.tails.entry((stage, stream)).or_default();
        let mut buf = std::mem::take(tail);
        buf.extend_from_slice(data);
        // Hold back a trailing incomplete sequence (error_len() == None means "ran out of input").
        let keep = match std::str::from_utf8(&buf) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() && buf.len() - e.valid_up_to() <= MAX_TAIL => buf.len() - e.valid_up_to(),
            Err(_) => incomplete_suffix(&buf),
        };
        *tail = buf.split_off(buf.len() - keep);
        (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
    }

    /// Whatever is still held back (the stream ended mid-sequence).
    pub fn finish(&mut self) -> Vec<(Stage, Stream, String)> {
        let mut out: Vec<_> = self
            .tails
            .drain()
            .filter(|(_, t)| !t.is_empty())
            .map(|((stage, stream), t)| (stage, stream, String::from_utf8_lossy(&t).into_owned()))
            .collect();
        out.sort_by_key(|(stage, stream, _)| (*stage == Stage::Run, *stream == Stream::Stderr));
        out
    }
}

/// Length of an incomplete UTF-8 sequence at the very end of `b` (invalid bytes earlier are lossy anyway).
fn incomplete_suffix(b: &[u8]) -> usize {
    for n in 1..=MAX_TAIL.min(b.len()) {
        let start = b[b.len() - n];
        let need = match start {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            0x80..=0xBF => continue,
            _ => return 0,
        };
        return if need > n { n } else { 0 };
    }
    0
}

/// One parsed server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` field (`message` when absent).
    pub event: String,
    /// `data:` lines joined by `\n`.
    pub data: String,
}

/// Incremental SSE parser for a byte stream.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || self.event.is_some() {
                    out.push(SseEvent {
                        event: self.event.take().unwrap_or_else(|| "message".into()),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // comment (keep-alive)
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_multibyte_characters_are_joined() {
        let mut c = Utf8Chunks::default();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(c.push(Stage::Run, Stream::Stdout, &[b'a', euro[0]]).as_deref(), Some("a"));
        assert_eq!(c.push(Stage::Run, Stream::Stdout, &euro[1..2]), None);
        // Another stream keeps its own tail.
        assert_eq!(c.push(Stage::Run, Stream::Stderr, b"x").as_deref(), Some("x"));
        assert_eq!(c.push(Stage::Run, Stream::Stdout, &[euro[2], b'b']).as_deref(), Some("€b"));
        assert!(c.finish().is_empty());
    }

    #[test]
    fn invalid_bytes_are_replaced_and_dangling_tails_flushed() {
        let mut c = Utf8Chunks::default();
        assert_eq!(c.push(Stage::Compile, Stream::Stdout, &[0xff, b'a']).as_deref(), Some("\u{fffd}a"));
        // Invalid in the middle, then an incomplete sequence at the end.
        assert_eq!(c.push(Stage::Run, Stream::Stdout, &[0xff, b'z', 0xE2, 0x82]).as_deref(), Some("\u{fffd}z"));
        assert_eq!(c.finish(), vec![(Stage::Run, Stream::Stdout, "\u{fffd}".to_string())]);
    }

    #[test]
    fn parser_handles_split_events_comments_and_multiline_data() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\nevent: stdout\ndata: {\"a\"").is_empty());
        let ev = p.push(b":1}\n\ndata: x\ndata: y\r\n\r\n");
        assert_eq!(
            ev,
            vec![
                SseEvent { event: "stdout".into(), data: "{\"a\":1}".into() },
                SseEvent { event: "message".into(), data: "x\ny".into() }
            ]
        );
    }
}
