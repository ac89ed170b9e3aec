//! Length-prefixed frames with a hard size cap on every read: JSON, except
//! the guest's output chunks, which are binary.
//!
//! A frame is a big-endian `u32` then the body. Bit 31 of the `u32` clear:
//! the rest is the body's length and the body is one JSON message. Bit 31
//! set ([`RAW_BIT`]): a binary body, for [`GuestMessage::OutputRecords`]
//! only, `[stage u8][tag u8][records…]` (stage 0 compile, 1 run; tag 2; tags
//! 0 and 1 were protocol 4's single-stream output and are refused). Output is the bulk of what a guest sends; as JSON its
//! bytes would be base64-encoded and scanned for escapes one by one, which
//! under TCG cost the writing program's vCPU more than the guest kernel's
//! output channel itself (docs/performance.md, "Output relay").

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::{GuestMessage, Stage};

/// The second tag byte of a binary [`GuestMessage::OutputRecords`] frame.
const RECORDS_TAG: u8 = 2;

/// Bit 31 of a frame's length prefix: the body is binary, not JSON.
pub const RAW_BIT: u32 = 1 << 31;

/// A message that travels in frames: JSON, unless it has a binary form.
pub trait Message: Serialize + DeserializeOwned {
    /// The binary body of `self`, when it has one: its two tag bytes and the
    /// bytes that follow them (borrowed, so a frame is written without
    /// copying them).
    fn raw_parts(&self) -> Option<([u8; 2], &[u8])> {
        None
    }

    /// The message of a binary body.
    ///
    /// # Errors
    /// [`FrameError::Raw`] if this type has no binary form or the body is
    /// not a valid one.
    fn from_raw(_body: &[u8]) -> Result<Self, FrameError> {
        Err(FrameError::Raw("this message type has no binary frames"))
    }
}

impl Message for crate::HostMessage {}

impl Message for GuestMessage {
    fn raw_parts(&self) -> Option<([u8; 2], &[u8])> {
        let stage_tag = |stage: &Stage| match stage {
            Stage::Compile => 0,
            Stage::Run => 1,
        };
        match self {
            GuestMessage::OutputRecords { stage, records } => Some(([stage_tag(stage), RECORDS_TAG], records)),
            _ => None,
        }
    }

    fn from_raw(body: &[u8]) -> Result<Self, FrameError> {
        let [stage, tag, data @ ..] = body else {
            return Err(FrameError::Raw("an output frame shorter than its two tag bytes"));
        };
        let stage = match stage {
            0 => Stage::Compile,
            1 => Stage::Run,
            _ => return Err(FrameError::Raw("an output frame with an unknown stage")),
        };
        if *tag != RECORDS_TAG {
            return Err(FrameError::Raw("an output frame with an unknown tag"));
        }
        Ok(GuestMessage::OutputRecords { stage, records: data.to_vec() })
    }
}

/// The length prefix and tag bytes of a binary frame whose body is `tags`
/// then `data`.
fn raw_head(tags: [u8; 2], data: &[u8]) -> [u8; 6] {
    // Frames are capped far below 2 GiB (MAX_HOST_FRAME), so the length
    // never reaches the flag bit.
    let len = u32::try_from(data.len() + 2).expect("frames are far below 2 GiB") | RAW_BIT;
    let [a, b, c, d] = len.to_be_bytes();
    [a, b, c, d, tags[0], tags[1]]
}

/// `(body length, binary?)` of a length prefix.
fn split_prefix(prefix: [u8; 4]) -> (usize, bool) {
    let word = u32::from_be_bytes(prefix);
    ((word & !RAW_BIT) as usize, word & RAW_BIT != 0)
}

/// The message of a body read in full.
fn decode_body<T: Message>(body: &[u8], raw: bool) -> Result<T, FrameError> {
    if raw {
        T::from_raw(body)
    } else {
        serde_json::from_slice(body).map_err(FrameError::Malformed)
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than the reader allows.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The frame was not valid JSON for the expected message type.
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
    /// A binary frame that the expected message type does not have, or
    /// whose body is not valid (what is wrong with it).
    #[error("malformed binary frame: {0}")]
    Raw(&'static str),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The underlying transport failed.
    #[error("transport failed")]
    Io(#[from] std::io::Error),
}

/// Serialises `msg` into one frame (length prefix included): binary when
/// the message has a binary form, else JSON.
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    if let Some((tags, data)) = msg.raw_parts() {
        let mut out = Vec::with_capacity(6 + data.len());
        out.extend_from_slice(&raw_head(tags, data));
        out.extend_from_slice(data);
        return out;
    }
    let mut out = vec![0u8; 4];
    // Our message types contain no maps with non-string keys, so this cannot fail.
    serde_json::to_writer(&mut out, msg).expect("protocol messages always serialise");
    let len = u32::try_from(out.len() - 4).expect("frames are far below 2 GiB");
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Incremental decoder for a byte stream that may arrive in arbitrary pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    /// The length is checked before any body is buffered past the cap.
    pub fn next_frame<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let (len, raw) = split_prefix([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_body(&self.buf[4..4 + len], raw);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

/// Blocking read of one frame. `Ok(None)` on a clean end of stream.
pub fn read_frame<T: Message, R: Read>(r: &mut R, max: usize) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, raw) = split_prefix(len);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_body(&body, raw).map(Some)
}

/// Blocking write of one frame.
pub fn write_frame<T: Message, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    // A binary frame's bytes go out as they are, not copied into a frame
    // first (under TCG a copy of every output byte is paid by the program's
    // vCPU).
    match msg.raw_parts() {
        Some((tags, data)) => {
            w.write_all(&raw_head(tags, data))?;
            w.write_all(data)?;
        }
        None => w.write_all(&encode(msg))?,
    }
    w.flush()?;
    Ok(())
}

/// Async read of one frame. `Ok(None)` on a clean end of stream.
#[cfg(feature = "tokio")]
pub async fn read_frame_async<T, R>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    T: Message,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, raw) = split_prefix(len);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_body(&body, raw).map(Some)
}

/// Async write of one frame.
#[cfg(feature = "tokio")]
pub async fn write_frame_async<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Message,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    w.write_all(&encode(msg)).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMessage, Stage, Stream};

    /// One stage's output of one stream as a records message.
    fn output(stage: Stage, stream: Stream, data: &[u8]) -> GuestMessage {
        let mut r = crate::OutputRecords::with_capacity(64);
        r.push(stream, data);
        GuestMessage::OutputRecords { stage, records: r.into_blob() }
    }

    #[test]
    fn decoder_reassembles_split_frames() {
        let msg = output(Stage::Run, Stream::Stdout, b"hello");
        let bytes = encode(&msg);
        let mut d = FrameDecoder::new(1024);
        for b in &bytes[..bytes.len() - 1] {
            d.push(std::slice::from_ref(b));
            assert!(d.next_frame::<GuestMessage>().unwrap().is_none());
        }
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(d.next_frame::<GuestMessage>().unwrap(), Some(msg));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn output_travels_as_a_binary_frame_and_back() {
        for (stage, stream) in [(Stage::Compile, Stream::Stdout), (Stage::Run, Stream::Stderr)] {
            let msg = output(stage, stream, b"\x00\xffbytes\n");
            let bytes = encode(&msg);
            assert_eq!(u32::from_be_bytes(bytes[..4].try_into().unwrap()), RAW_BIT | (2 + 5 + 8));
            assert_eq!(&bytes[11..], b"\x00\xffbytes\n", "the bytes themselves, not base64");
            let mut r: &[u8] = &bytes;
            assert_eq!(read_frame::<GuestMessage, _>(&mut r, 64).unwrap(), Some(msg.clone()));
            let mut d = FrameDecoder::new(64);
            d.push(&bytes);
            assert_eq!(d.next_frame::<GuestMessage>().unwrap(), Some(msg));
        }
        let empty = GuestMessage::OutputRecords { stage: Stage::Run, records: vec![] };
        let mut r: &[u8] = &encode(&empty);
        assert_eq!(read_frame::<GuestMessage, _>(&mut r, 64).unwrap(), Some(empty));
        // Everything else stays JSON.
        let ready = encode(&GuestMessage::Ready { protocol: 5, agent_version: "x".into(), uptime_ms: 1 });
        assert_eq!(ready[0] & 0x80, 0);
        assert_eq!(ready[4], b'{');
    }

    #[test]
    fn records_travel_as_a_binary_frame_and_parse_back_in_order() {
        let mut r = crate::OutputRecords::with_capacity(64);
        r.push(Stream::Stdout, b"a");
        r.push(Stream::Stdout, b"b\n");
        r.push(Stream::Stderr, b"");
        r.push(Stream::Stderr, b"e\n");
        r.push(Stream::Stdout, b"c\n");
        assert_eq!(r.len(), 7);
        let msg = GuestMessage::OutputRecords { stage: Stage::Compile, records: r.into_blob() };
        let mut rd: &[u8] = &encode(&msg);
        let Some(GuestMessage::OutputRecords { stage: Stage::Compile, records }) = read_frame(&mut rd, 64).unwrap()
        else {
            panic!("not records");
        };
        let got = crate::OutputRecords::parse(&records).unwrap();
        assert_eq!(
            got,
            vec![(Stream::Stdout, &b"ab\n"[..]), (Stream::Stderr, &b"e\n"[..]), (Stream::Stdout, &b"c\n"[..])]
        );
        for bad in [&b"\x00\x00\x00"[..], b"\x03\x00\x00\x00\x00", b"\x00\x00\x00\x00\x05abc"] {
            assert!(crate::OutputRecords::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_binary_frame_written_in_place_is_the_encoded_frame() {
        let msg = output(Stage::Run, Stream::Stderr, b"abc");
        let mut written = Vec::new();
        write_frame(&mut written, &msg).unwrap();
        assert_eq!(written, encode(&msg));
    }

    #[test]
    fn bad_binary_frames_are_errors_not_panics() {
        // Too short, an unknown stage, an unknown tag, protocol 4's single-stream tags.
        for body in [&b""[..], b"\x01", b"\x02\x02x", b"\x01\x03x", b"\x01\x00x", b"\x00\x01x"] {
            let mut bytes = (RAW_BIT | body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(body);
            let mut r: &[u8] = &bytes;
            assert!(matches!(read_frame::<GuestMessage, _>(&mut r, 64), Err(FrameError::Raw(_))), "{body:?}");
        }
        // The host accepts no binary frames at all, and the flag does not
        // smuggle a length past the cap.
        let mut bytes = (RAW_BIT | 3).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"\x01\x00x");
        let mut r: &[u8] = &bytes;
        assert!(matches!(read_frame::<crate::HostMessage, _>(&mut r, 64), Err(FrameError::Raw(_))));
        let mut d = FrameDecoder::new(16);
        d.push(&(RAW_BIT | 17).to_be_bytes());
        assert!(matches!(d.next_frame::<GuestMessage>(), Err(FrameError::TooLarge { len: 17, max: 16 })));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering_body() {
        let mut d = FrameDecoder::new(16);
        d.push(&(1u32 << 30).to_be_bytes());
        assert!(matches!(d.next_frame::<GuestMessage>(), Err(FrameError::TooLarge { len, max: 16 }) if len == 1 << 30));
        let mut r: &[u8] = &(17u32).to_be_bytes();
        assert!(matches!(read_frame::<GuestMessage, _>(&mut r, 16), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"\xff{]x!");
        let mut d = FrameDecoder::new(64);
        d.push(&bytes);
        assert!(matches!(d.next_frame::<GuestMessage>(), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn blocking_roundtrip_and_clean_eof() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &GuestMessage::Ready { protocol: 1, agent_version: "x".into(), uptime_ms: 5 }).unwrap();
        let mut r: &[u8] = &buf;
        let got: GuestMessage = read_frame(&mut r, 1024).unwrap().unwrap();
        assert!(matches!(got, GuestMessage::Ready { uptime_ms: 5, .. }));
        assert!(read_frame::<GuestMessage, _>(&mut r, 1024).unwrap().is_none());
        let mut half: &[u8] = &buf[..buf.len() - 2];
        assert!(matches!(read_frame::<GuestMessage, _>(&mut half, 1024), Err(FrameError::Truncated)));
    }
}
