//! Capturing a stage's output under the per-stream cap.

/// What one stream produced so far, never more than `cap` bytes: kept, or
/// only counted when the bytes go to the host as they come (a streamed
/// stage, protocol 6: the host keeps them, and a copy here cost the writing
/// program a fresh guest page per 4 KiB).
#[derive(Debug)]
pub struct Capture {
    cap: usize,
    /// Bytes taken so far (kept or not).
    len: usize,
    /// The bytes themselves, when kept.
    data: Option<Vec<u8>>,
    truncated: bool,
}

impl Capture {
    /// An empty capture keeping at most `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Self::with(cap, true)
    }

    /// An empty capture taking at most `cap` bytes, which it keeps only
    /// with `keep` (without, [`Capture::take`] gives no bytes, only the
    /// truncation flag: a streamed stage's).
    pub fn with(cap: u64, keep: bool) -> Self {
        // A cap beyond the address space is no cap at all.
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Self { cap, len: 0, data: keep.then(Vec::new), truncated: false }
    }

    /// Adds a chunk read from the stream and returns the part that was kept
    /// (to be streamed to the host). Keeping stops at exactly `cap` bytes;
    /// the first byte beyond it marks the capture truncated.
    pub fn push<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        if self.truncated {
            return &[];
        }
        let room = self.cap - self.len;
        let kept = if chunk.len() > room {
            self.truncated = true;
            &chunk[..room]
        } else {
            chunk
        };
        self.len += kept.len();
        if let Some(data) = &mut self.data {
            data.extend_from_slice(kept);
        }
        kept
    }

    /// Whether the stream went past the cap.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The kept bytes (none if only counted) and whether anything was cut.
    pub fn take(&mut self) -> (Vec<u8>, bool) {
        (self.data.as_mut().map(std::mem::take).unwrap_or_default(), self.truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_up_to_the_cap() {
        let mut c = Capture::new(10);
        assert_eq!(c.push(b"hello"), b"hello");
        assert_eq!(c.push(b"world"), b"world");
        assert!(!c.truncated(), "exactly the cap is not truncation");
        assert_eq!(c.push(b""), b"");
        assert!(!c.truncated());
        assert_eq!(c.take(), (b"helloworld".to_vec(), false));
    }

    #[test]
    fn cuts_at_exactly_the_cap() {
        let mut c = Capture::new(8);
        assert_eq!(c.push(b"12345"), b"12345");
        assert_eq!(c.push(b"67890"), b"678");
        assert!(c.truncated());
        assert_eq!(c.push(b"more"), b"");
        assert_eq!(c.take(), (b"12345678".to_vec(), true));
    }

    #[test]
    fn one_byte_over_a_full_capture_truncates() {
        let mut c = Capture::new(3);
        assert_eq!(c.push(b"abc"), b"abc");
        assert!(!c.truncated());
        assert_eq!(c.push(b"d"), b"");
        assert!(c.truncated());
    }

    #[test]
    fn zero_cap_truncates_on_first_byte() {
        let mut c = Capture::new(0);
        assert_eq!(c.push(b""), b"");
        assert!(!c.truncated());
        assert_eq!(c.push(b"x"), b"");
        assert_eq!(c.take(), (Vec::new(), true));
    }

    #[test]
    fn a_counting_capture_cuts_at_the_same_byte_and_keeps_nothing() {
        let mut c = Capture::with(8, false);
        assert_eq!(c.push(b"12345"), b"12345");
        assert!(!c.truncated());
        assert_eq!(c.push(b"67890"), b"678", "the part to stream is the kept one");
        assert!(c.truncated());
        assert_eq!(c.push(b"more"), b"");
        assert_eq!(c.take(), (Vec::new(), true));
        let mut exact = Capture::with(3, false);
        assert_eq!(exact.push(b"abc"), b"abc");
        assert_eq!(exact.take(), (Vec::new(), false), "exactly the cap is not truncation");
    }

    #[test]
    fn huge_cap_is_unbounded() {
        let mut c = Capture::new(u64::MAX);
        assert_eq!(c.push(b"data"), b"data");
        assert!(!c.truncated());
    }
}
