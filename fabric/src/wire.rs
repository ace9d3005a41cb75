//! The fabric's wire format: versioned, length-prefixed binary frames.
//! Documented in `docs/wire.md`; every change to a frame bumps
//! [`PROTOCOL_VERSION`].
//!
//! A frame is `len: u32 LE | kind: u8 | body`, where `len` counts the kind
//! byte and the body and is at most [`MAX_FRAME`]. Integers are little-endian;
//! byte strings carry a length prefix. Decoding never panics and never
//! allocates more than the frame's own length, whatever the bytes.

use std::io::{self, Read, Write};

/// Version of the fabric protocol (handshake, frames, page messages).
pub const PROTOCOL_VERSION: u16 = 4;
/// First bytes of every Hello: a peer that is not shoal fails here.
pub const MAGIC: [u8; 8] = *b"SHOALFAB";
/// Largest single read: 2 MiB (one fault-around block).
pub const MAX_READ: usize = 2 << 20;
/// Largest application message.
pub const MAX_MESSAGE: usize = 16 << 10;
/// Largest frame (`len` field): a full read's data plus its header.
pub const MAX_FRAME: usize = MAX_READ + 64;
/// Longest pod id.
pub const MAX_POD_ID: usize = 64;
/// Longest refusal reason.
pub const MAX_REASON: usize = 512;
/// Most regions a node exposes.
pub const MAX_REGIONS: usize = 64;
/// Longest frame read before a connection is authenticated (`len` field):
/// the largest Hello (kind, magic, version, backend, node, pod-id length,
/// pod id, nonce, flags). Every version's Hello must fit, so that a node
/// can always tell a peer's version.
pub const MAX_HANDSHAKE_FRAME: usize = 1 + 8 + 2 + 1 + 4 + 1 + MAX_POD_ID + 32 + 1;
/// Longest refusal reason sent during the handshake (a Refuse must fit in
/// [`MAX_HANDSHAKE_FRAME`]); longer ones are cut.
pub const MAX_HANDSHAKE_REASON: usize = MAX_HANDSHAKE_FRAME - 3;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{what} is {len} bytes; the limit is {max}")]
    FieldTooLong { what: &'static str, len: usize, max: usize },
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("{extra} unexpected bytes after a {kind} frame")]
    Trailing { kind: &'static str, extra: usize },
    #[error("bad value {value} for {what}")]
    BadValue { what: &'static str, value: u64 },
    #[error("a {0} frame before authentication")]
    NotInHandshake(&'static str),
}

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version. When it differs from ours, the
    /// fields after it are not decoded (they may mean something else).
    pub version: u16,
    /// Backend the sender runs ([`crate::Kind`] as a byte).
    pub backend: u8,
    pub node: u32,
    pub pod_id: String,
    pub nonce: [u8; 32],
    /// [`HELLO_AUTHENTICATED_FRAMES`] and future bits.
    pub flags: u8,
}

/// Hello flag: the sender authenticates every frame after the handshake
/// (both sides must agree).
pub const HELLO_AUTHENTICATED_FRAMES: u8 = 1;

/// A region a node exposes for remote reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: u32,
    pub len: u64,
}

/// How a verbs peer is reached (exchanged after authentication).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerbsEndpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// Path MTU as the verbs enum value (1 = 256 .. 5 = 4096).
    pub mtu: u8,
}

/// Why a responder refused a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    /// No region with that id.
    UnknownRegion = 1,
    /// The range is not inside the region.
    OutOfBounds = 2,
    /// Zero bytes or more than [`MAX_READ`].
    BadLength = 3,
    /// The responder cannot serve it now (e.g. registration failed).
    Unavailable = 4,
}

impl ReadFailure {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => ReadFailure::UnknownRegion,
            2 => ReadFailure::OutOfBounds,
            3 => ReadFailure::BadLength,
            4 => ReadFailure::Unavailable,
            _ => return Err(WireError::BadValue { what: "read failure", value: v.into() }),
        })
    }
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// HMAC-SHA256 proof of the pod secret over both nonces.
    Auth {
        mac: [u8; 32],
    },
    /// The sender refuses the connection; it closes next.
    Refuse {
        reason: String,
    },
    /// The regions the sender exposes.
    Regions(Vec<RegionInfo>),
    Verbs(VerbsEndpoint),
    /// Setup is complete.
    Ready,
    /// An application (page-protocol) message.
    Message(Vec<u8>),
    /// tcp: read `len` bytes at `offset` of region `region`.
    ReadRequest {
        tag: u64,
        region: u32,
        offset: u64,
        len: u32,
    },
    /// tcp: the bytes of a read.
    ReadData {
        tag: u64,
        data: Vec<u8>,
    },
    /// The read was refused.
    ReadError {
        tag: u64,
        failure: ReadFailure,
    },
    /// verbs: ask for the key of chunk `chunk` of region `region`.
    KeyRequest {
        tag: u64,
        region: u32,
        chunk: u64,
    },
    /// verbs: the chunk is registered for remote reads at `addr` with `rkey`.
    KeyGrant {
        tag: u64,
        region: u32,
        chunk: u64,
        addr: u64,
        rkey: u32,
    },
    /// The sender is shutting down cleanly.
    Goodbye,
}

const K_HELLO: u8 = 1;
const K_AUTH: u8 = 2;
const K_REFUSE: u8 = 3;
const K_REGIONS: u8 = 4;
const K_VERBS: u8 = 5;
const K_READY: u8 = 6;
const K_MESSAGE: u8 = 10;
const K_READ_REQUEST: u8 = 11;
const K_READ_DATA: u8 = 12;
const K_READ_ERROR: u8 = 13;
const K_KEY_REQUEST: u8 = 14;
const K_KEY_GRANT: u8 = 15;
const K_GOODBYE: u8 = 16;

impl Frame {
    /// A refusal that fits in a handshake frame (the reason cut to
    /// [`MAX_HANDSHAKE_REASON`] bytes).
    pub fn handshake_refusal(reason: &str) -> Frame {
        Frame::Refuse { reason: truncate_utf8(reason, MAX_HANDSHAKE_REASON).to_string() }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Auth { .. } => "Auth",
            Frame::Refuse { .. } => "Refuse",
            Frame::Regions(_) => "Regions",
            Frame::Verbs(_) => "Verbs",
            Frame::Ready => "Ready",
            Frame::Message(_) => "Message",
            Frame::ReadRequest { .. } => "ReadRequest",
            Frame::ReadData { .. } => "ReadData",
            Frame::ReadError { .. } => "ReadError",
            Frame::KeyRequest { .. } => "KeyRequest",
            Frame::KeyGrant { .. } => "KeyGrant",
            Frame::Goodbye => "Goodbye",
        }
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.0.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello(h) => {
                w.u8(K_HELLO);
                w.bytes(&MAGIC);
                w.u16(h.version);
                w.u8(h.backend);
                w.u32(h.node);
                w.str8(&h.pod_id);
                w.bytes(&h.nonce);
                w.u8(h.flags);
            }
            Frame::Auth { mac } => {
                w.u8(K_AUTH);
                w.bytes(mac);
            }
            Frame::Refuse { reason } => {
                w.u8(K_REFUSE);
                let r = truncate_utf8(reason, MAX_REASON);
                w.u16(r.len() as u16);
                w.bytes(r.as_bytes());
            }
            Frame::Regions(rs) => {
                w.u8(K_REGIONS);
                w.u16(rs.len() as u16);
                for r in rs {
                    w.u32(r.id);
                    w.u64(r.len);
                }
            }
            Frame::Verbs(v) => {
                w.u8(K_VERBS);
                w.u32(v.qpn);
                w.u32(v.psn);
                w.u16(v.lid);
                w.bytes(&v.gid);
                w.u8(v.mtu);
            }
            Frame::Ready => w.u8(K_READY),
            Frame::Message(m) => {
                w.u8(K_MESSAGE);
                w.u32(m.len() as u32);
                w.bytes(m);
            }
            Frame::ReadRequest { tag, region, offset, len } => {
                w.u8(K_READ_REQUEST);
                w.u64(*tag);
                w.u32(*region);
                w.u64(*offset);
                w.u32(*len);
            }
            Frame::ReadData { tag, data } => {
                w.u8(K_READ_DATA);
                w.u64(*tag);
                w.u32(data.len() as u32);
                w.bytes(data);
            }
            Frame::ReadError { tag, failure } => {
                w.u8(K_READ_ERROR);
                w.u64(*tag);
                w.u8(*failure as u8);
            }
            Frame::KeyRequest { tag, region, chunk } => {
                w.u8(K_KEY_REQUEST);
                w.u64(*tag);
                w.u32(*region);
                w.u64(*chunk);
            }
            Frame::KeyGrant { tag, region, chunk, addr, rkey } => {
                w.u8(K_KEY_GRANT);
                w.u64(*tag);
                w.u32(*region);
                w.u64(*chunk);
                w.u64(*addr);
                w.u32(*rkey);
            }
            Frame::Goodbye => w.u8(K_GOODBYE),
        }
        let len = (w.0.len() - 4) as u32;
        w.0[..4].copy_from_slice(&len.to_le_bytes());
        w.0
    }

    /// Decodes one frame body (kind byte and what follows, without the
    /// length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLong { len: body.len(), max: MAX_FRAME });
        }
        let mut r = Reader { buf: body, pos: 0 };
        let kind = r.u8("kind").map_err(|_| WireError::Empty)?;
        let frame = match kind {
            K_HELLO => {
                let magic = r.array::<8>("magic")?;
                if magic != MAGIC {
                    return Err(WireError::BadValue { what: "Hello magic", value: u64::from_le_bytes(magic) });
                }
                let version = r.u16("version")?;
                if version != PROTOCOL_VERSION {
                    // do not interpret another version's layout
                    return Ok(Frame::Hello(Hello {
                        version,
                        backend: 0,
                        node: 0,
                        pod_id: String::new(),
                        nonce: [0; 32],
                        flags: 0,
                    }));
                }
                let backend = r.u8("backend")?;
                let node = r.u32("node")?;
                let pod_len = r.u8("pod id length")? as usize;
                if pod_len > MAX_POD_ID {
                    return Err(WireError::FieldTooLong { what: "pod id", len: pod_len, max: MAX_POD_ID });
                }
                let pod_id = r.string(pod_len, "pod id")?;
                let nonce = r.array::<32>("nonce")?;
                let flags = r.u8("flags")?;
                if flags & !HELLO_AUTHENTICATED_FRAMES != 0 {
                    return Err(WireError::BadValue { what: "Hello flags", value: flags.into() });
                }
                Frame::Hello(Hello { version, backend, node, pod_id, nonce, flags })
            }
            K_AUTH => Frame::Auth { mac: r.array::<32>("mac")? },
            K_REFUSE => {
                let len = r.u16("reason length")? as usize;
                if len > MAX_REASON {
                    return Err(WireError::FieldTooLong { what: "reason", len, max: MAX_REASON });
                }
                Frame::Refuse { reason: r.string(len, "reason")? }
            }
            K_REGIONS => {
                let n = r.u16("region count")? as usize;
                if n > MAX_REGIONS {
                    return Err(WireError::FieldTooLong { what: "region list", len: n, max: MAX_REGIONS });
                }
                let mut rs = Vec::with_capacity(n);
                for _ in 0..n {
                    rs.push(RegionInfo { id: r.u32("region id")?, len: r.u64("region length")? });
                }
                Frame::Regions(rs)
            }
            K_VERBS => Frame::Verbs(VerbsEndpoint {
                qpn: r.u32("qpn")?,
                psn: r.u32("psn")?,
                lid: r.u16("lid")?,
                gid: r.array::<16>("gid")?,
                mtu: r.u8("mtu")?,
            }),
            K_READY => Frame::Ready,
            K_MESSAGE => {
                let len = r.u32("message length")? as usize;
                if len > MAX_MESSAGE {
                    return Err(WireError::FieldTooLong { what: "message", len, max: MAX_MESSAGE });
                }
                Frame::Message(r.take(len, "message")?.to_vec())
            }
            K_READ_REQUEST => Frame::ReadRequest {
                tag: r.u64("tag")?,
                region: r.u32("region")?,
                offset: r.u64("offset")?,
                len: r.u32("length")?,
            },
            K_READ_DATA => {
                let tag = r.u64("tag")?;
                let len = r.u32("data length")? as usize;
                if len > MAX_READ {
                    return Err(WireError::FieldTooLong { what: "read data", len, max: MAX_READ });
                }
                Frame::ReadData { tag, data: r.take(len, "read data")?.to_vec() }
            }
            K_READ_ERROR => Frame::ReadError { tag: r.u64("tag")?, failure: ReadFailure::from_u8(r.u8("failure")?)? },
            K_KEY_REQUEST => Frame::KeyRequest { tag: r.u64("tag")?, region: r.u32("region")?, chunk: r.u64("chunk")? },
            K_KEY_GRANT => Frame::KeyGrant {
                tag: r.u64("tag")?,
                region: r.u32("region")?,
                chunk: r.u64("chunk")?,
                addr: r.u64("address")?,
                rkey: r.u32("rkey")?,
            },
            K_GOODBYE => Frame::Goodbye,
            other => return Err(WireError::UnknownKind(other)),
        };
        let extra = body.len() - r.pos;
        if extra != 0 {
            return Err(WireError::Trailing { kind: frame.name(), extra });
        }
        Ok(frame)
    }
}

/// Decodes a whole frame from the start of `buf` (length prefix included);
/// returns it and the bytes it took.
pub fn decode_prefixed(buf: &[u8]) -> Result<(Frame, usize), WireError> {
    if buf.len() < 4 {
        return Err(WireError::Truncated { what: "length prefix", needed: 4 - buf.len() });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong { len, max: MAX_FRAME });
    }
    let body =
        buf.get(4..4 + len).ok_or_else(|| WireError::Truncated { what: "frame body", needed: 4 + len - buf.len() })?;
    Ok((Frame::decode(body)?, 4 + len))
}

/// Errors of reading frames from a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// An authenticated frame whose tag did not verify.
    #[error("frame #{seq} failed authentication (altered, replayed or reordered on the way)")]
    Forged { seq: u64 },
}

/// Reads one frame from a byte stream.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, StreamError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(StreamError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong { len, max: MAX_FRAME }.into());
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(StreamError::Closed),
        Err(e) => return Err(e.into()),
    }
    Ok(Frame::decode(&body)?)
}

/// Reads one frame of the handshake (Hello, Auth or Refuse) from a
/// connection that has not authenticated yet: the length is checked
/// against [`MAX_HANDSHAKE_FRAME`] before anything else is read, the kind
/// byte and a Hello's magic as soon as they arrive, and the frame lands in
/// a buffer on the stack: whatever a client sends, the first byte that
/// cannot begin a handshake frame ends the read, and nothing is allocated
/// for it.
pub fn read_handshake_frame(r: &mut impl Read) -> Result<Frame, StreamError> {
    let mut len = [0u8; 4];
    read_exact_or_closed(r, &mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HANDSHAKE_FRAME {
        return Err(WireError::TooLong { len, max: MAX_HANDSHAKE_FRAME }.into());
    }
    if len == 0 {
        return Err(WireError::Empty.into());
    }
    let mut body = [0u8; MAX_HANDSHAKE_FRAME];
    read_exact_or_closed(r, &mut body[..1])?;
    match body[0] {
        K_HELLO | K_AUTH | K_REFUSE => {}
        other => {
            return Err(match kind_name(other) {
                Some(name) => WireError::NotInHandshake(name),
                None => WireError::UnknownKind(other),
            }
            .into())
        }
    }
    let mut at = 1;
    if body[0] == K_HELLO && len > MAGIC.len() {
        read_exact_or_closed(r, &mut body[1..1 + MAGIC.len()])?;
        if body[1..1 + MAGIC.len()] != MAGIC {
            let mut magic = [0u8; 8];
            magic.copy_from_slice(&body[1..9]);
            return Err(WireError::BadValue { what: "Hello magic", value: u64::from_le_bytes(magic) }.into());
        }
        at = 1 + MAGIC.len();
    }
    read_exact_or_closed(r, &mut body[at..len])?;
    Ok(Frame::decode(&body[..len])?)
}

/// The name of a frame kind byte, None when it is no kind of ours.
fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        K_HELLO => "Hello",
        K_AUTH => "Auth",
        K_REFUSE => "Refuse",
        K_REGIONS => "Regions",
        K_VERBS => "Verbs",
        K_READY => "Ready",
        K_MESSAGE => "Message",
        K_READ_REQUEST => "ReadRequest",
        K_READ_DATA => "ReadData",
        K_READ_ERROR => "ReadError",
        K_KEY_REQUEST => "KeyRequest",
        K_KEY_GRANT => "KeyGrant",
        K_GOODBYE => "Goodbye",
        _ => return None,
    })
}

fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(StreamError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Writes one frame to a byte stream.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str8(&mut self, s: &str) {
        let s = truncate_utf8(s, MAX_POD_ID);
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked cursor: every read is checked, nothing panics.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(WireError::Truncated { what, needed: n - left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, WireError> {
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| WireError::Utf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                backend: 2,
                node: 7,
                pod_id: "pod-é".into(),
                nonce: [9; 32],
                flags: HELLO_AUTHENTICATED_FRAMES,
            }),
            Frame::Auth { mac: [3; 32] },
            Frame::Refuse { reason: "wrong pod secret".into() },
            Frame::Regions(vec![RegionInfo { id: 0, len: 1 << 30 }, RegionInfo { id: 5, len: 4096 }]),
            Frame::Verbs(VerbsEndpoint { qpn: 0x11, psn: 0xabcdef, lid: 0, gid: [1; 16], mtu: 5 }),
            Frame::Ready,
            Frame::Message(b"page 17 is yours".to_vec()),
            Frame::ReadRequest { tag: 1, region: 0, offset: 8192, len: 4096 },
            Frame::ReadData { tag: 1, data: vec![0xaa; 4096] },
            Frame::ReadError { tag: 2, failure: ReadFailure::OutOfBounds },
            Frame::KeyRequest { tag: 3, region: 0, chunk: 12 },
            Frame::KeyGrant { tag: 3, region: 0, chunk: 12, addr: 0x7f00_0000_0000, rkey: 0x1234 },
            Frame::Goodbye,
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = f.encode();
            let (back, used) = decode_prefixed(&bytes).unwrap();
            assert_eq!(back, f);
            assert_eq!(used, bytes.len());
            let mut cursor = std::io::Cursor::new(bytes);
            assert_eq!(read_frame(&mut cursor).unwrap(), f);
        }
    }

    #[test]
    fn another_version_is_read_only_as_far_as_its_version() {
        let mut bytes = samples()[0].encode();
        bytes[4 + 1 + 8..4 + 1 + 8 + 2].copy_from_slice(&99u16.to_le_bytes());
        bytes.truncate(4 + 1 + 8 + 2 + 3); // its layout may differ after the version
        let body = &bytes[4..];
        match Frame::decode(body).unwrap() {
            Frame::Hello(h) => assert_eq!(h.version, 99),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let mut huge = vec![0u8; 4];
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_prefixed(&huge), Err(WireError::TooLong { .. })));
        let mut cursor = std::io::Cursor::new(huge);
        assert!(matches!(read_frame(&mut cursor), Err(StreamError::Wire(WireError::TooLong { .. }))));
        // a message claiming 4 GiB inside a small frame
        let mut body = vec![K_MESSAGE];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Frame::decode(&body), Err(WireError::FieldTooLong { .. })));
        assert_eq!(Frame::decode(&[]), Err(WireError::Empty));
        assert_eq!(Frame::decode(&[200]), Err(WireError::UnknownKind(200)));
        assert!(matches!(Frame::decode(&[K_READY, 0]), Err(WireError::Trailing { .. })));
    }

    /// A reader that counts what was taken from it.
    struct Counting<'a> {
        bytes: &'a [u8],
        taken: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.bytes.len() - self.taken);
            buf[..n].copy_from_slice(&self.bytes[self.taken..self.taken + n]);
            self.taken += n;
            Ok(n)
        }
    }

    #[test]
    fn a_handshake_frame_over_the_bound_is_refused_without_reading_it() {
        // a 2 MiB frame is fine after authentication, not before it
        let mut big = ((MAX_FRAME) as u32).to_le_bytes().to_vec();
        big.extend(std::iter::repeat_n(0u8, 64));
        let mut r = Counting { bytes: &big, taken: 0 };
        let e = read_handshake_frame(&mut r).unwrap_err();
        assert!(matches!(e, StreamError::Wire(WireError::TooLong { max: MAX_HANDSHAKE_FRAME, .. })), "{e}");
        assert_eq!(r.taken, 4, "only the length prefix was read");
        // one byte over the largest Hello
        let mut r = Counting { bytes: &((MAX_HANDSHAKE_FRAME + 1) as u32).to_le_bytes(), taken: 0 };
        assert!(matches!(read_handshake_frame(&mut r), Err(StreamError::Wire(WireError::TooLong { .. }))));
        // the largest Hello fits, exactly
        let hello = Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            backend: 2,
            node: 1,
            pod_id: "p".repeat(MAX_POD_ID),
            nonce: [0; 32],
            flags: 1,
        });
        let bytes = hello.encode();
        assert_eq!(bytes.len(), 4 + MAX_HANDSHAKE_FRAME);
        assert_eq!(read_handshake_frame(&mut std::io::Cursor::new(bytes)).unwrap(), hello);
    }

    #[test]
    fn a_handshake_read_stops_at_the_first_bad_byte() {
        // HTTP, say: its first four bytes make a length far over the bound
        let mut r = Counting { bytes: b"GET / HTTP/1.1\r\n\r\n", taken: 0 };
        assert!(read_handshake_frame(&mut r).is_err());
        assert_eq!(r.taken, 4);
        // a plausible length, then a kind that is no handshake frame
        let mut r = Counting { bytes: &[20, 0, 0, 0, K_READ_DATA, 1, 2, 3], taken: 0 };
        let e = read_handshake_frame(&mut r).unwrap_err();
        assert!(matches!(e, StreamError::Wire(WireError::NotInHandshake("ReadData"))), "{e}");
        assert_eq!(r.taken, 5);
        let mut r = Counting { bytes: &[20, 0, 0, 0, 99, 1, 2, 3], taken: 0 };
        assert!(matches!(read_handshake_frame(&mut r), Err(StreamError::Wire(WireError::UnknownKind(99)))));
        assert_eq!(r.taken, 5);
        // a Hello whose magic is wrong: stops after the magic
        let mut bad = samples()[0].encode();
        bad[5] = b'X';
        let mut r = Counting { bytes: &bad, taken: 0 };
        assert!(read_handshake_frame(&mut r).is_err());
        assert_eq!(r.taken, 4 + 1 + 8);
        // a refusal is cut to fit
        let long = Frame::handshake_refusal(&"é".repeat(400));
        assert!(long.encode().len() <= 4 + MAX_HANDSHAKE_FRAME);
        assert!(read_handshake_frame(&mut std::io::Cursor::new(long.encode())).is_ok());
    }

    #[test]
    fn eof_is_closed_not_an_error_of_format() {
        let mut cursor = std::io::Cursor::new(Vec::<u8>::new());
        assert!(matches!(read_frame(&mut cursor), Err(StreamError::Closed)));
        let mut cursor = std::io::Cursor::new(vec![10, 0, 0, 0, K_READY]);
        assert!(matches!(read_frame(&mut cursor), Err(StreamError::Closed)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The fuzz target: any bytes decode to a frame or an error, never
        /// a panic; what decodes re-encodes to the same bytes.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(f) = Frame::decode(&bytes) {
                if !matches!(&f, Frame::Hello(h) if h.version != PROTOCOL_VERSION) {
                    prop_assert_eq!(&f.encode()[4..], &bytes[..]);
                }
            }
            let _ = decode_prefixed(&bytes);
        }

        /// Valid frames with one byte changed or cut short still never panic.
        #[test]
        fn mutated_frames_never_panic(idx in 0usize..13, pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
            let mut bytes = samples()[idx].encode();
            let p = pos % bytes.len();
            bytes[p] = byte;
            let _ = decode_prefixed(&bytes);
            let c = cut % (bytes.len() + 1);
            let _ = decode_prefixed(&bytes[..c]);
            let _ = Frame::decode(&bytes[4.min(c)..c]);
        }
    }
}
