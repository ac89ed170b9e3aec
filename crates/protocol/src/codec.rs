//! Length-prefixed JSON frames with a hard size cap on every read.

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Serialize};

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
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&self.buf[4..4 + len]).map_err(FrameError::Malformed);
        self.buf.drain(..4 + len);
        msg.map(Some)
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
}
