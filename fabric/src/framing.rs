//! Frames after the handshake, authenticated: every frame a node sends on
//! a connection carries an HMAC-SHA256 tag under that direction's key
//! over a per-direction sequence number and the frame's bytes, so that a
//! frame altered, replayed, reordered or dropped on the way fails to
//! verify at the receiver (docs/wire.md, "Authenticated frames").
//!
//! The keys come from [`FrameKeys::derive`]: HKDF-SHA256 over the pod
//! secret, salted with both handshake nonces, one key per direction. The
//! sequence numbers are not sent: each side counts the frames it sent and
//! received on the connection, from 0.
//!
//! With authentication off ([`crate::Options::authenticate_frames`], the
//! default), frames travel as the handshake's do: no tag.
//!
//! Messages that do not travel on the stream (verbs' RDMA SENDs) are
//! tagged the same way under keys of their own ([`MessageSealer`],
//! [`MessageOpener`]): a reliable connected queue pair delivers them in
//! order, so they too carry no sequence number.

use std::io::{self, Read, Write};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{Frame, StreamError, WireError, MAX_FRAME};
use crate::NodeId;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the tag after every authenticated frame.
pub const TAG_LEN: usize = 32;

/// The label HKDF expands the frame keys with.
const LABEL: &[u8] = b"shoal fabric frame keys v2";

/// The keys of one connection, derived after a successful handshake: one
/// per direction for the stream's frames, one per direction for messages
/// sent outside the stream.
#[derive(Clone)]
pub struct FrameKeys {
    /// Authenticates what the dialing node sends.
    pub dialer_to_acceptor: [u8; 32],
    /// Authenticates what the accepting node sends.
    pub acceptor_to_dialer: [u8; 32],
    /// Authenticates the dialing node's messages outside the stream.
    pub messages_dialer_to_acceptor: [u8; 32],
    /// Authenticates the accepting node's messages outside the stream.
    pub messages_acceptor_to_dialer: [u8; 32],
}

impl std::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKeys { .. }")
    }
}

impl FrameKeys {
    /// HKDF-SHA256: extract with salt `dialer nonce | acceptor nonce` from
    /// the pod secret, expand with a label, the direction, both node ids
    /// and the pod id. Fresh nonces make the keys of every connection new.
    pub fn derive(
        secret: &[u8],
        pod_id: &str,
        dialer: NodeId,
        acceptor: NodeId,
        dialer_nonce: &[u8; 32],
        acceptor_nonce: &[u8; 32],
    ) -> FrameKeys {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(dialer_nonce);
        salt[32..].copy_from_slice(acceptor_nonce);
        let hk = Hkdf::<Sha256>::new(Some(&salt), secret);
        let expand = |direction: &[u8]| {
            let mut key = [0u8; 32];
            let info: [&[u8]; 5] =
                [LABEL, direction, &dialer.to_le_bytes(), &acceptor.to_le_bytes(), pod_id.as_bytes()];
            hk.expand_multi_info(&info, &mut key).expect("32 bytes is a valid HKDF-SHA256 output length");
            key
        };
        FrameKeys {
            dialer_to_acceptor: expand(b"dialer->acceptor"),
            acceptor_to_dialer: expand(b"acceptor->dialer"),
            messages_dialer_to_acceptor: expand(b"messages dialer->acceptor"),
            messages_acceptor_to_dialer: expand(b"messages acceptor->dialer"),
        }
    }

    /// The sealer and opener of the side that dialed (`dialer`) or
    /// accepted.
    pub fn split(&self, dialer: bool) -> (Sealer, Opener) {
        let (send, recv) = if dialer {
            (&self.dialer_to_acceptor, &self.acceptor_to_dialer)
        } else {
            (&self.acceptor_to_dialer, &self.dialer_to_acceptor)
        };
        (Sealer::new(Some(send)), Opener::new(Some(recv)))
    }

    /// The message sealer and opener of the side that dialed (`dialer`)
    /// or accepted.
    pub fn split_messages(&self, dialer: bool) -> (MessageSealer, MessageOpener) {
        let (send, recv) = if dialer {
            (&self.messages_dialer_to_acceptor, &self.messages_acceptor_to_dialer)
        } else {
            (&self.messages_acceptor_to_dialer, &self.messages_dialer_to_acceptor)
        };
        (MessageSealer::new(Some(send)), MessageOpener::new(Some(recv)))
    }
}

/// One direction's tag count: the HMAC keyed once (cloned per tag) and
/// the number of the next frame or message. Every sealer and opener is
/// one of these.
#[derive(Clone)]
struct Count {
    mac: Option<HmacSha256>,
    seq: u64,
}

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Count").field("authenticated", &self.mac.is_some()).field("seq", &self.seq).finish()
    }
}

impl Count {
    fn new(key: Option<&[u8; 32]>) -> Count {
        Count { mac: key.map(keyed), seq: 0 }
    }

    /// The tag of `bytes` as the next one (None when untagged).
    fn sign(&mut self, bytes: &[u8]) -> Option<[u8; TAG_LEN]> {
        let mac = self.mac.as_ref()?;
        let t = tag(mac, self.seq, bytes).finalize().into_bytes().into();
        self.seq += 1;
        Some(t)
    }

    /// Whether `t` is the tag of `bytes` as the next one.
    fn verify(&mut self, bytes: &[u8], t: &[u8]) -> Result<(), StreamError> {
        let Some(mac) = &self.mac else { return Ok(()) };
        if tag(mac, self.seq, bytes).verify_slice(t).is_err() {
            return Err(StreamError::Forged { seq: self.seq });
        }
        self.seq += 1;
        Ok(())
    }
}

/// Tags messages sent outside the stream, in order: the tag of message
/// number `seq` is HMAC-SHA256 over `seq` and the message, appended to it.
#[derive(Clone, Debug)]
pub struct MessageSealer(Count);

impl MessageSealer {
    /// A sealer with `key`, or one that adds no tag.
    pub fn new(key: Option<&[u8; 32]>) -> MessageSealer {
        MessageSealer(Count::new(key))
    }

    /// The tag of the next message (None when messages are not tagged),
    /// to send right after `msg`.
    pub fn tag(&mut self, msg: &[u8]) -> Option<[u8; TAG_LEN]> {
        self.0.sign(msg)
    }
}

/// Checks the tags of messages received outside the stream, in order.
#[derive(Clone, Debug)]
pub struct MessageOpener(Count);

impl MessageOpener {
    /// An opener checking tags under `key`, or one taking messages as
    /// they come.
    pub fn new(key: Option<&[u8; 32]>) -> MessageOpener {
        MessageOpener(Count::new(key))
    }

    /// The message in `bytes` (message, then tag) if its tag is that of
    /// the next message the peer sent; [`StreamError::Forged`] otherwise.
    pub fn open<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], StreamError> {
        if self.0.mac.is_none() {
            return Ok(bytes);
        }
        if bytes.len() < TAG_LEN {
            return Err(StreamError::Forged { seq: self.0.seq });
        }
        let (msg, t) = bytes.split_at(bytes.len() - TAG_LEN);
        self.0.verify(msg, t)?;
        Ok(msg)
    }
}

fn keyed(key: &[u8; 32]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// The tag of frame or message number `seq` (`bytes`: a frame as sent,
/// length prefix included, tag excluded; or a message).
fn tag(mac: &HmacSha256, seq: u64, bytes: &[u8]) -> HmacSha256 {
    let mut m = mac.clone();
    m.update(&seq.to_le_bytes());
    m.update(bytes);
    m
}

/// The sending half: encodes frames and tags them.
#[derive(Clone, Debug)]
pub struct Sealer(Count);

impl Sealer {
    /// A sealer with `key`, or one that sends frames untagged.
    pub fn new(key: Option<&[u8; 32]>) -> Sealer {
        Sealer(Count::new(key))
    }

    /// Appends `frame`, tagged, to `out`.
    pub fn seal_into(&mut self, frame: &Frame, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&frame.encode());
        if self.0.mac.is_none() {
            return;
        }
        let len = (out.len() - start - 4 + TAG_LEN) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        if let Some(t) = self.0.sign(&out[start..]) {
            out.extend_from_slice(&t);
        }
    }

    /// `frame`, tagged.
    pub fn seal(&mut self, frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(frame, &mut out);
        out
    }

    /// Writes `frame`, tagged.
    pub fn write_frame(&mut self, w: &mut impl Write, frame: &Frame) -> io::Result<()> {
        w.write_all(&self.seal(frame))
    }
}

/// The receiving half: reads frames and checks their tags in order.
#[derive(Clone, Debug)]
pub struct Opener(Count);

impl Opener {
    /// An opener checking tags under `key`, or one taking frames untagged.
    pub fn new(key: Option<&[u8; 32]>) -> Opener {
        Opener(Count::new(key))
    }

    /// Checks and decodes one frame (length prefix included) as received.
    /// A tag that does not verify is [`StreamError::Forged`]: the frame
    /// was altered, or is not the next one the peer sent.
    pub fn open(&mut self, bytes: &[u8]) -> Result<Frame, StreamError> {
        if self.0.mac.is_none() {
            return Ok(Frame::decode(bytes.get(4..).unwrap_or_default())?);
        }
        if bytes.len() < 4 + 1 + TAG_LEN {
            return Err(WireError::Truncated { what: "frame tag", needed: 4 + 1 + TAG_LEN - bytes.len() }.into());
        }
        let (framed, t) = bytes.split_at(bytes.len() - TAG_LEN);
        self.0.verify(framed, t)?;
        Ok(Frame::decode(&framed[4..])?)
    }

    /// Reads, checks and decodes one frame.
    pub fn read_frame(&mut self, r: &mut impl Read) -> Result<Frame, StreamError> {
        let extra = if self.0.mac.is_some() { TAG_LEN } else { 0 };
        let mut len = [0u8; 4];
        read_all(r, &mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME + extra {
            return Err(WireError::TooLong { len: n, max: MAX_FRAME + extra }.into());
        }
        let mut bytes = vec![0u8; 4 + n];
        bytes[..4].copy_from_slice(&len);
        read_all(r, &mut bytes[4..])?;
        self.open(&bytes)
    }
}

fn read_all(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(StreamError::Closed),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> FrameKeys {
        FrameKeys::derive(b"pod secret", "p", 1, 0, &[1; 32], &[2; 32])
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Regions(vec![crate::RegionInfo { id: 0, len: 1 << 20 }]),
            Frame::ReadRequest { tag: 7, region: 0, offset: 4096, len: 4096 },
            Frame::ReadData { tag: 7, data: vec![0x5a; 4096] },
            Frame::Message(b"page 3 is yours".to_vec()),
            Frame::Goodbye,
        ]
    }

    #[test]
    fn messages_outside_the_stream_open_in_order_and_only_as_sent() {
        let (mut tx, _) = keys().split_messages(true);
        let (_, mut rx) = keys().split_messages(false);
        let sent: Vec<Vec<u8>> =
            [&b"one"[..], b"two", b""].iter().map(|m| [*m, &tx.tag(m).unwrap()[..]].concat()).collect();
        assert!(sent.iter().all(|s| s.len() >= TAG_LEN));
        // in order: each opens to what was sent
        for (s, m) in sent.iter().zip([&b"one"[..], b"two", b""]) {
            assert_eq!(rx.open(s).unwrap(), m);
        }
        // replayed, reordered, altered, cut, or sealed under the stream's
        // key or the other direction's: refused
        let (_, mut rx) = keys().split_messages(false);
        assert!(matches!(rx.open(&sent[1]), Err(StreamError::Forged { seq: 0 })));
        assert!(rx.open(&sent[0]).is_ok());
        assert!(rx.open(&sent[0]).is_err(), "a replay");
        let mut bad = sent[1].clone();
        bad[0] ^= 1;
        assert!(rx.open(&bad).is_err() && rx.open(&sent[1][..8]).is_err());
        let (mut stream_tx, _) = keys().split(true);
        let (mut back_tx, _) = keys().split_messages(false);
        let (_, mut rx) = keys().split_messages(false);
        assert!(rx.open(&[&b"one"[..], &back_tx.tag(b"one").unwrap()[..]].concat()).is_err());
        assert!(rx.open(&stream_tx.seal(&Frame::Message(b"one".to_vec()))).is_err());
        // untagged: as they come, nothing added
        let mut plain = MessageSealer::new(None);
        assert_eq!(plain.tag(b"x"), None);
        assert_eq!(MessageOpener::new(None).open(b"x").unwrap(), b"x");
    }

    #[test]
    fn sealed_frames_open_in_order() {
        let (mut tx, _) = keys().split(true);
        let (_, mut rx) = keys().split(false);
        let mut wire = Vec::new();
        for f in frames() {
            tx.write_frame(&mut wire, &f).unwrap();
        }
        let mut cursor = std::io::Cursor::new(wire);
        for f in frames() {
            assert_eq!(rx.read_frame(&mut cursor).unwrap(), f);
        }
    }

    #[test]
    fn a_frame_with_any_byte_flipped_is_refused() {
        let (mut tx, _) = keys().split(true);
        let sealed = tx.seal(&Frame::ReadData { tag: 1, data: vec![7; 64] });
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x80;
            let (_, mut rx) = keys().split(false);
            let r = rx.read_frame(&mut std::io::Cursor::new(bad));
            // a flipped length byte is refused as too long or truncated
            // before the tag is checked; every other flip fails the tag
            assert!(r.is_err(), "flipping byte {at} went unnoticed");
            if at >= 4 {
                assert!(matches!(r, Err(StreamError::Forged { seq: 0 })), "byte {at}: {r:?}");
            }
        }
    }

    #[test]
    fn a_replayed_or_reordered_frame_is_refused() {
        let (mut tx, _) = keys().split(true);
        let first = tx.seal(&Frame::Message(b"one".to_vec()));
        let second = tx.seal(&Frame::Message(b"two".to_vec()));
        // replayed: the first frame again after it was accepted
        let (_, mut rx) = keys().split(false);
        rx.open(&first).unwrap();
        assert!(matches!(rx.open(&first), Err(StreamError::Forged { seq: 1 })));
        // reordered: the second frame first
        let (_, mut rx) = keys().split(false);
        assert!(matches!(rx.open(&second), Err(StreamError::Forged { seq: 0 })));
    }

    #[test]
    fn keys_differ_by_direction_connection_and_secret() {
        let k = keys();
        assert_ne!(k.dialer_to_acceptor, k.acceptor_to_dialer);
        // a frame reflected back to its sender does not verify
        let (mut tx, mut own_rx) = k.split(true);
        assert!(matches!(own_rx.open(&tx.seal(&Frame::Goodbye)), Err(StreamError::Forged { .. })));
        let other_nonce = FrameKeys::derive(b"pod secret", "p", 1, 0, &[1; 32], &[3; 32]);
        assert_ne!(other_nonce.dialer_to_acceptor, k.dialer_to_acceptor);
        let other_secret = FrameKeys::derive(b"guess", "p", 1, 0, &[1; 32], &[2; 32]);
        assert_ne!(other_secret.dialer_to_acceptor, k.dialer_to_acceptor);
    }

    #[test]
    fn without_keys_frames_are_plain() {
        let mut tx = Sealer::new(None);
        assert_eq!(tx.seal(&Frame::Goodbye), Frame::Goodbye.encode());
        let mut rx = Opener::new(None);
        assert_eq!(rx.open(&Frame::Goodbye.encode()).unwrap(), Frame::Goodbye);
    }
}
