//! Splitting a PostgreSQL byte stream into frames: `tag (1) | length (4, includes
//! itself) | body`.
//!
//! Frames up to a threshold are delivered whole, as cheap `Bytes` slices of the read
//! buffer. A larger frame is either streamed through in chunks (when no stage needs to
//! see it whole: a 500 MB bytea DataRow passes without being held) or, when a stage
//! must inspect it (a Query, a masked DataRow), held whole up to `max_whole` and
//! refused beyond that. "Incomplete" is a normal state: the caller reads more.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

/// Tag + length.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL itself refuses messages over 1 GiB; anything claiming more is garbage.
pub const PROTOCOL_MAX: usize = 1 << 30;

/// Encoded messages sent in place of one: almost always one or two, so they live
/// inline (no allocation per rewritten row).
pub type Messages = smallvec::SmallVec<[Bytes; 2]>;

/// A complete typed message. `bytes` is the whole frame, header included, so it can be
/// forwarded as is.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// Wrap a complete frame (header included). The caller guarantees the length
    /// field matches; use [`Frame::build`] to make one.
    pub fn from_bytes(bytes: Bytes) -> Self {
        debug_assert!(bytes.len() >= HEADER_LEN);
        Self { bytes }
    }

    /// Build a frame from a tag and body.
    pub fn build(tag: u8, body: &[u8]) -> Self {
        let mut b = BytesMut::with_capacity(HEADER_LEN + body.len());
        b.extend_from_slice(&[tag]);
        b.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        b.extend_from_slice(body);
        Self { bytes: b.freeze() }
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= HEADER_LEN
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies may hold PHI (rows, parameters, SQL literals): never print them.
        write!(f, "Frame({:?}, <redacted {} bytes>)", self.tag() as char, self.body().len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message type {tag:?} of {len} bytes exceeds the {limit}-byte limit for messages phigate must inspect")]
    TooLarge { tag: char, len: usize, limit: usize },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

/// What [`Decoder::decode`] produced. `Debug` shows sizes, never the bytes (a
/// streamed DataRow is row data).
pub enum Item {
    /// A complete frame.
    Whole(Frame),
    /// The first part of a large frame that is streamed through: `chunk` holds its
    /// header and as much of the body as had arrived.
    StreamStart { tag: u8, total: usize, chunk: Bytes },
    /// More of the frame being streamed; `last` when it is complete.
    StreamChunk { chunk: Bytes, last: bool },
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Whole(frame) => write!(f, "Whole({frame:?})"),
            Item::StreamStart { tag, total, chunk } => write!(f, "StreamStart({:?}, {total} bytes, <redacted {} bytes>)", *tag as char, chunk.len()),
            Item::StreamChunk { chunk, last } => write!(f, "StreamChunk(<redacted {} bytes>, last: {last})", chunk.len()),
        }
    }
}

/// Frame splitter for one direction of a connection.
#[derive(Debug)]
pub struct Decoder {
    /// Frames larger than this are streamed when nobody needs them whole.
    stream_threshold: usize,
    /// Frames that must be whole may be at most this large.
    max_whole: usize,
    streaming_remaining: usize,
}

impl Decoder {
    pub fn new(stream_threshold: usize, max_whole: usize) -> Self {
        Self { stream_threshold, max_whole: max_whole.max(stream_threshold), streaming_remaining: 0 }
    }

    /// Take the next item from `buf`, or `Ok(None)` when more bytes are needed.
    /// `needs_whole(tag)` says whether a stage must see frames of that type whole.
    pub fn decode(&mut self, buf: &mut BytesMut, needs_whole: impl Fn(u8) -> bool) -> Result<Option<Item>, FrameError> {
        if self.streaming_remaining > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = self.streaming_remaining.min(buf.len());
            self.streaming_remaining -= n;
            return Ok(Some(Item::StreamChunk { chunk: buf.split_to(n).freeze(), last: self.streaming_remaining == 0 }));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = buf[0];
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 || len as usize + 1 > PROTOCOL_MAX {
            return Err(FrameError::BadLength { tag: tag as char, len: i64::from(len) });
        }
        let total = len as usize + 1;
        if buf.len() >= total && total <= self.max_whole.max(self.stream_threshold) {
            return Ok(Some(Item::Whole(Frame { bytes: buf.split_to(total).freeze() })));
        }
        if total > self.stream_threshold && !needs_whole(tag) {
            let n = total.min(buf.len());
            self.streaming_remaining = total - n;
            return Ok(Some(Item::StreamStart { tag, total, chunk: buf.split_to(n).freeze() }));
        }
        if total > self.max_whole {
            return Err(FrameError::TooLarge { tag: tag as char, len: total, limit: self.max_whole });
        }
        buf.reserve(total - buf.len());
        Ok(None)
    }
}

/// Read a NUL-terminated string from the front of `body`.
pub fn take_cstr<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a str, FrameError> {
    let end = body.iter().position(|&b| b == 0).ok_or_else(|| FrameError::Malformed { what, why: "missing NUL terminator".into() })?;
    let s = std::str::from_utf8(&body[..end]).map_err(|_| FrameError::Malformed { what, why: "not valid UTF-8".into() })?;
    *body = &body[end + 1..];
    Ok(s)
}

/// Read a big-endian i32 from the front of `body`.
pub fn take_i32(body: &mut &[u8], what: &'static str) -> Result<i32, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::Malformed { what, why: "truncated".into() });
    }
    let v = (&body[..4]).get_i32();
    *body = &body[4..];
    Ok(v)
}

/// Read a big-endian i16 from the front of `body`.
pub fn take_i16(body: &mut &[u8], what: &'static str) -> Result<i16, FrameError> {
    if body.len() < 2 {
        return Err(FrameError::Malformed { what, why: "truncated".into() });
    }
    let v = (&body[..2]).get_i16();
    *body = &body[2..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        Frame::build(tag, body).as_bytes().to_vec()
    }

    #[test]
    fn splits_back_to_back_frames_and_waits_for_partial_ones() {
        let mut d = Decoder::new(1024, 4096);
        let mut wire = frame(b'Q', b"select 1\0");
        wire.extend(frame(b'S', b""));
        let partial = frame(b'D', b"abcdef");
        wire.extend(&partial[..4]);
        let mut buf = BytesMut::from(&wire[..]);
        let all = |_| true;
        match d.decode(&mut buf, all).unwrap() {
            Some(Item::Whole(f)) => {
                assert_eq!(f.tag(), b'Q');
                assert_eq!(f.body(), b"select 1\0");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.decode(&mut buf, all).unwrap(), Some(Item::Whole(f)) if f.tag() == b'S' && f.body().is_empty()));
        assert!(d.decode(&mut buf, all).unwrap().is_none(), "incomplete is a normal state");
        buf.extend_from_slice(&partial[4..]);
        assert!(matches!(d.decode(&mut buf, all).unwrap(), Some(Item::Whole(f)) if f.body() == b"abcdef"));
    }

    #[test]
    fn rejects_impossible_lengths() {
        let mut d = Decoder::new(1024, 4096);
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(matches!(d.decode(&mut buf, |_| true), Err(FrameError::BadLength { .. })));
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(d.decode(&mut buf, |_| true), Err(FrameError::BadLength { .. })));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(d.decode(&mut buf, |_| true), Err(FrameError::BadLength { .. })));
    }

    #[test]
    fn large_frames_stream_unless_needed_whole() {
        let body = vec![7u8; 10_000];
        let wire = frame(b'D', &body);
        // Streamed: nobody needs DataRow whole.
        let mut d = Decoder::new(1024, 4096);
        let mut buf = BytesMut::from(&wire[..3000]);
        let mut got = 0;
        match d.decode(&mut buf, |_| false).unwrap() {
            Some(Item::StreamStart { tag, total, chunk }) => {
                assert_eq!((tag, total), (b'D', wire.len()));
                got += chunk.len();
            }
            other => panic!("{other:?}"),
        }
        buf.extend_from_slice(&wire[3000..]);
        buf.extend_from_slice(&frame(b'C', b"SELECT 1\0"));
        match d.decode(&mut buf, |_| false).unwrap() {
            Some(Item::StreamChunk { chunk, last }) => {
                got += chunk.len();
                assert!(last);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got, wire.len());
        assert!(matches!(d.decode(&mut buf, |_| false).unwrap(), Some(Item::Whole(f)) if f.tag() == b'C'));
        // Needed whole and over the limit: refused, not buffered without bound.
        let mut d = Decoder::new(1024, 4096);
        let mut buf = BytesMut::from(&wire[..100]);
        assert!(matches!(d.decode(&mut buf, |_| true), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn debug_never_prints_bodies() {
        let f = Frame::build(b'D', b"123-45-6789");
        let s = format!("{f:?}");
        assert!(!s.contains("123-45"), "{s}");
        assert!(s.contains("redacted 11 bytes"), "{s}");
    }

    /// Found by a review: a large DataRow streamed through is split into `Item`s,
    /// whose derived Debug printed the row's bytes (`b"...123-45-6789..."`).
    #[test]
    fn debug_of_a_streamed_item_never_prints_its_bytes() {
        let start = Item::StreamStart { tag: b'D', total: 20, chunk: Bytes::from_static(b"D\0\0\0\x13123-45-6789") };
        let chunk = Item::StreamChunk { chunk: Bytes::from_static(b"Maria Garcia"), last: true };
        for s in [format!("{start:?}"), format!("{chunk:?}")] {
            assert!(!s.contains("123-45") && !s.contains("Maria"), "{s}");
        }
    }
}
