//! Length-prefixed frames with a hard size cap on every read: JSON bodies,
//! and for the guest's output chunks a binary body (see [`OUTPUT_FRAME`]).

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::{GuestMessage, Stage, Stream, OUTPUT_CHUNK};

/// First body byte of a binary output frame (protocol 4): the body is this
/// byte, the stage (0 compile, 1 run), the stream (1 stdout, 2 stderr, as
/// their descriptors) and then the raw bytes, at most [`OUTPUT_CHUNK`] of
/// them. A JSON body never starts with a NUL byte, so the two kinds of body
/// cannot be confused. Output is the only message sent at the rate a
/// program writes; carrying it raw leaves the relay and the host's reader
/// one `memcpy` per byte instead of base64 and JSON string escaping.
pub const OUTPUT_FRAME: u8 = 0;

/// Bytes before the data in a binary output body: kind, stage, stream.
const OUTPUT_HEADER: usize = 3;

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
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The underlying transport failed.
    #[error("transport failed")]
    Io(#[from] std::io::Error),
    /// A binary output frame that breaks its layout (see [`OUTPUT_FRAME`]).
    #[error("malformed output frame")]
    BadOutput(#[source] BadOutput),
}

/// How a binary output frame broke its layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadOutput {
    /// The body is shorter than its header (kind, stage, stream).
    #[error("{0}-byte body is shorter than the 3-byte header")]
    Short(usize),
    /// The stage byte names no stage.
    #[error("unknown stage {0}")]
    Stage(u8),
    /// The stream byte names no stream.
    #[error("unknown stream {0}")]
    Stream(u8),
    /// More data than one output chunk may carry.
    #[error("{0} bytes of data exceed the output chunk")]
    Oversize(usize),
}

/// Serialises a guest message into one frame: output chunks as a binary
/// body ([`OUTPUT_FRAME`]), everything else as JSON ([`encode`]).
pub fn encode_guest(msg: &GuestMessage) -> Vec<u8> {
    let GuestMessage::Output { stage, stream, data } = msg else {
        return encode(msg);
    };
    let stage = match stage {
        Stage::Compile => 0,
        Stage::Run => 1,
    };
    let stream = match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    };
    let mut out = Vec::with_capacity(4 + OUTPUT_HEADER + data.len());
    out.extend_from_slice(&((OUTPUT_HEADER + data.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[OUTPUT_FRAME, stage, stream]);
    out.extend_from_slice(data);
    out
}

/// Parses one guest frame body: binary output or JSON.
fn decode_guest(body: &[u8]) -> Result<GuestMessage, FrameError> {
    if body.first() != Some(&OUTPUT_FRAME) {
        return serde_json::from_slice(body).map_err(FrameError::Malformed);
    }
    let [_, stage, stream, data @ ..] = body else {
        return Err(FrameError::BadOutput(BadOutput::Short(body.len())));
    };
    let stage = match stage {
        0 => Stage::Compile,
        1 => Stage::Run,
        other => return Err(FrameError::BadOutput(BadOutput::Stage(*other))),
    };
    let stream = match stream {
        1 => Stream::Stdout,
        2 => Stream::Stderr,
        other => return Err(FrameError::BadOutput(BadOutput::Stream(*other))),
    };
    if data.len() > OUTPUT_CHUNK {
        return Err(FrameError::BadOutput(BadOutput::Oversize(data.len())));
    }
    Ok(GuestMessage::Output { stage, stream, data: data.to_vec() })
}

/// Serialises `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our message types contain no maps with non-string keys, so this cannot fail.
    let body = serde_json::to_vec(msg).expect("protocol messages always serialise");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
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
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.complete()? else { return Ok(None) };
        let msg = serde_json::from_slice(&self.buf[4..4 + len]).map_err(FrameError::Malformed);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// [`FrameDecoder::next_frame`] for the guest's frames, which may be
    /// binary output frames ([`OUTPUT_FRAME`]) as well as JSON.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] before buffering a body past the cap,
    /// [`FrameError::BadOutput`] for a binary frame that breaks its layout,
    /// [`FrameError::Malformed`] for anything else that is not a message.
    pub fn next_guest_frame(&mut self) -> Result<Option<GuestMessage>, FrameError> {
        let Some(len) = self.complete()? else { return Ok(None) };
        let msg = decode_guest(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// The length of the first frame once all of it is buffered.
    fn complete(&self) -> Result<Option<usize>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok((self.buf.len() >= 4 + len).then_some(len))
    }
}

/// Blocking read of one frame. `Ok(None)` on a clean end of stream.
pub fn read_frame<T: DeserializeOwned, R: Read>(r: &mut R, max: usize) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    serde_json::from_slice(&body).map(Some).map_err(FrameError::Malformed)
}

/// Blocking write of one guest frame ([`encode_guest`]: output chunks binary).
///
/// # Errors
/// [`FrameError::Io`] when the transport fails.
pub fn write_guest_frame<W: Write>(w: &mut W, msg: &GuestMessage) -> Result<(), FrameError> {
    w.write_all(&encode_guest(msg))?;
    w.flush()?;
    Ok(())
}

/// Blocking write of one frame.
pub fn write_frame<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg))?;
    w.flush()?;
    Ok(())
}

/// Async read of one frame. `Ok(None)` on a clean end of stream.
#[cfg(feature = "tokio")]
pub async fn read_frame_async<T, R>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    serde_json::from_slice(&body).map(Some).map_err(FrameError::Malformed)
}

/// Async write of one frame.
#[cfg(feature = "tokio")]
pub async fn write_frame_async<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
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

    #[test]
    fn decoder_reassembles_split_frames() {
        let msg = GuestMessage::Output { stage: Stage::Run, stream: Stream::Stdout, data: b"hello".to_vec() };
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

    #[test]
    fn output_travels_as_a_binary_frame_and_others_as_json() {
        let out = GuestMessage::Output { stage: Stage::Compile, stream: Stream::Stderr, data: b"\x00\xffraw".to_vec() };
        let bytes = encode_guest(&out);
        assert_eq!(&bytes[..7], &[0, 0, 0, 8, OUTPUT_FRAME, 0, 2], "length, kind, stage, stream");
        assert_eq!(&bytes[7..], b"\x00\xffraw", "the data as it is");
        let ready = GuestMessage::Ready { protocol: 4, agent_version: "x".into(), uptime_ms: 5 };
        assert_eq!(encode_guest(&ready), encode(&ready));
        let run = GuestMessage::Output { stage: Stage::Run, stream: Stream::Stdout, data: vec![b'x'; OUTPUT_CHUNK] };
        let mut d = FrameDecoder::new(OUTPUT_CHUNK + 16);
        let mut all = bytes.clone();
        all.extend(encode_guest(&ready));
        all.extend(encode_guest(&run));
        all.extend(encode(&out));
        // Split anywhere, the frames come back whole and in order.
        for piece in all.chunks(1000) {
            d.push(piece);
        }
        let mut got = Vec::new();
        while let Some(msg) = d.next_guest_frame().unwrap() {
            got.push(msg);
        }
        assert_eq!(got, vec![out.clone(), ready, run, out], "binary and JSON output decode alike");
        assert_eq!(d.pending(), 0);
        let mut w = Vec::new();
        write_guest_frame(&mut w, &GuestMessage::Output { stage: Stage::Run, stream: Stream::Stdout, data: vec![] })
            .unwrap();
        let mut d = FrameDecoder::new(16);
        d.push(&w);
        assert_eq!(
            d.next_guest_frame().unwrap(),
            Some(GuestMessage::Output { stage: Stage::Run, stream: Stream::Stdout, data: vec![] })
        );
    }

    /// Each way a hostile guest can break the binary layout is an error
    /// naming it, and the decoder never buffers past its cap.
    #[test]
    fn malformed_binary_output_frames_are_refused() {
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let bad = |body: &[u8]| {
            let mut d = FrameDecoder::new(OUTPUT_CHUNK + 64);
            d.push(&frame(body));
            match d.next_guest_frame() {
                Err(FrameError::BadOutput(why)) => why,
                other => panic!("{body:?}: expected a malformed output frame, got {other:?}"),
            }
        };
        assert_eq!(bad(&[OUTPUT_FRAME]), BadOutput::Short(1));
        assert_eq!(bad(&[OUTPUT_FRAME, 1]), BadOutput::Short(2));
        assert_eq!(bad(&[OUTPUT_FRAME, 2, 1, b'x']), BadOutput::Stage(2));
        assert_eq!(bad(&[OUTPUT_FRAME, 1, 0, b'x']), BadOutput::Stream(0));
        assert_eq!(bad(&[OUTPUT_FRAME, 1, 3, b'x']), BadOutput::Stream(3));
        let mut over = vec![OUTPUT_FRAME, 1, 1];
        over.resize(3 + OUTPUT_CHUNK + 1, b'x');
        assert_eq!(bad(&over), BadOutput::Oversize(OUTPUT_CHUNK + 1));
        let mut exact = vec![OUTPUT_FRAME, 1, 1];
        exact.resize(3 + OUTPUT_CHUNK, b'x');
        let mut d = FrameDecoder::new(OUTPUT_CHUNK + 64);
        d.push(&frame(&exact));
        assert!(
            matches!(d.next_guest_frame(), Ok(Some(GuestMessage::Output { data, .. })) if data.len() == OUTPUT_CHUNK)
        );
        // The length is checked before the body is buffered, binary or not.
        let mut d = FrameDecoder::new(16);
        d.push(&(17u32).to_be_bytes());
        d.push(&[OUTPUT_FRAME]);
        assert!(matches!(d.next_guest_frame(), Err(FrameError::TooLarge { len: 17, max: 16 })));
        // Neither binary nor JSON.
        let mut d = FrameDecoder::new(64);
        d.push(&frame(b"\x01garbage"));
        assert!(matches!(d.next_guest_frame(), Err(FrameError::Malformed(_))));
    }
}
