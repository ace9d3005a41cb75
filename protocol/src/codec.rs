//! The page protocol's messages on the wire: one byte naming the message,
//! then its fields in order, integers little-endian (`u64` pages and
//! epochs, `u32` node ids, one byte per flag, `Access` as 0 = read /
//! 1 = write), a grant's page list prefixed with its `u32` length.
//!
//! A batch ([`encode_batch`], [`decode_batch`]) is one or more messages,
//! each prefixed with its length as a little-endian `u16`: what one fabric
//! frame carries, so that the messages one event sends a peer (the frees
//! of a 2 MiB chunk, say) cost one frame, not one each.
//!
//! [`decode`] reads anything a peer may send: it returns an error for
//! every malformed input (unknown tag, short or trailing bytes, a flag that
//! is not 0 or 1, a grant longer than [`MAX_GRANT`]) and never panics. The
//! fabric's frame carries the message and bounds its length; the protocol
//! version is checked once, at join, by the fabric's handshake.

use crate::{Access, Msg, NodeId, Page};

/// Most pages one grant may carry (a block of 2 MiB is 512 pages; the
/// fabric's 16 KiB message limit allows about 1000).
pub const MAX_GRANT: usize = 1000;

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("message {tag} ends after {len} bytes, before its fields do")]
    Short { tag: u8, len: usize },
    #[error("message {tag} has {extra} bytes after its fields")]
    Trailing { tag: u8, extra: usize },
    #[error("message {tag}: a flag byte is {value}, not 0 or 1")]
    Flag { tag: u8, value: u8 },
    #[error("message {tag}: a grant of {count} pages; the limit is {MAX_GRANT}")]
    GrantTooLong { tag: u8, count: u32 },
    #[error("a batch of messages ends inside a message's length or bytes (at byte {at} of {len})")]
    BatchCut { at: usize, len: usize },
}

const REQUEST: u8 = 1;
const GRANT: u8 = 2;
const GRANT_DONE: u8 = 3;
const SHARE: u8 = 4;
const TRANSFER: u8 = 5;
const UPGRADE: u8 = 6;
const READY: u8 = 7;
const FETCHED: u8 = 8;
const DONE: u8 = 9;
const INVAL: u8 = 10;
const INVAL_ACK: u8 = 11;
const EVICT: u8 = 12;
const REDORMANT: u8 = 13;
const REFUSED: u8 = 14;
const DORMANTED: u8 = 15;
const FREE: u8 = 16;
const FORGET: u8 = 17;
const FREED: u8 = 18;
const UNSHARE: u8 = 20;
const UNSHARED: u8 = 21;
const EVICTED: u8 = 19;

/// Appends `msg`'s encoding to `out`.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    match msg {
        Msg::Request { page, access, from, since } => {
            w.u8(REQUEST).u64(*page).u8(matches!(access, Access::Write) as u8).u32(*from).u64(*since);
        }
        Msg::Grant { answers, pages } => {
            w.u8(GRANT).u64(*answers).u32(pages.len() as u32);
            for (p, e) in pages {
                w.u64(*p).u64(*e);
            }
        }
        Msg::GrantDone { pages, from } => {
            w.u8(GRANT_DONE).u32(*from).u32(pages.len() as u32);
            for p in pages {
                w.u64(*p);
            }
        }
        Msg::Share { page, to, since } => {
            w.u8(SHARE).u64(*page).u32(*to).u64(*since);
        }
        Msg::Transfer { page, to, evict, epoch, since } => {
            w.u8(TRANSFER).u64(*page).u32(*to).flag(*evict).u64(*epoch).u64(*since);
        }
        Msg::Upgrade { page } => {
            w.u8(UPGRADE).u64(*page);
        }
        Msg::Ready { page, from, dormant, transfer, evict, epoch, digest, key } => {
            w.u8(READY).u64(*page).u32(*from).flag(*dormant).flag(*transfer).flag(*evict).u64(*epoch).u64(*digest);
            w.u64(*key);
        }
        Msg::Evicted { page, from, to, dormant, epoch, digest, key } => {
            w.u8(EVICTED).u64(*page).u32(*from).u32(*to).flag(*dormant).u64(*epoch).u64(*digest).u64(*key);
        }
        Msg::Fetched { page, from, key } => {
            w.u8(FETCHED).u64(*page).u32(*from).u64(*key);
        }
        Msg::Done { page, from, key } => {
            w.u8(DONE).u64(*page).u32(*from).u64(*key);
        }
        Msg::Inval { page, since } => {
            w.u8(INVAL).u64(*page).u64(*since);
        }
        Msg::InvalAck { page, from } => {
            w.u8(INVAL_ACK).u64(*page).u32(*from);
        }
        Msg::Evict { page, from, to, epoch } => {
            w.u8(EVICT).u64(*page).u32(*from).u32(*to).u64(*epoch);
        }
        Msg::Redormant { page, from, epoch } => {
            w.u8(REDORMANT).u64(*page).u32(*from).u64(*epoch);
        }
        Msg::Refused { page } => {
            w.u8(REFUSED).u64(*page);
        }
        Msg::Dormanted { page } => {
            w.u8(DORMANTED).u64(*page);
        }
        Msg::Free { page, from } => {
            w.u8(FREE).u64(*page).u32(*from);
        }
        Msg::Forget { page } => {
            w.u8(FORGET).u64(*page);
        }
        Msg::Freed { page } => {
            w.u8(FREED).u64(*page);
        }
        Msg::Unshare { page, from } => {
            w.u8(UNSHARE).u64(*page).u32(*from);
        }
        Msg::Unshared { page } => {
            w.u8(UNSHARED).u64(*page);
        }
    }
}

/// Reads one message that fills `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Msg, DecodeError> {
    let (&tag, _) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { bytes, at: 1, tag };
    let msg = match tag {
        REQUEST => {
            let page = r.u64()?;
            let access = if r.flag()? { Access::Write } else { Access::Read };
            Msg::Request { page, access, from: r.u32()?, since: r.u64()? }
        }
        GRANT => {
            let answers = r.u64()?;
            let count = r.count()?;
            let mut pages = Vec::with_capacity(count);
            for _ in 0..count {
                pages.push((r.u64()?, r.u64()?));
            }
            Msg::Grant { answers, pages }
        }
        GRANT_DONE => {
            let from = r.u32()?;
            let count = r.count()?;
            let mut pages = Vec::with_capacity(count);
            for _ in 0..count {
                pages.push(r.u64()?);
            }
            Msg::GrantDone { pages, from }
        }
        SHARE => Msg::Share { page: r.u64()?, to: r.u32()?, since: r.u64()? },
        TRANSFER => Msg::Transfer { page: r.u64()?, to: r.u32()?, evict: r.flag()?, epoch: r.u64()?, since: r.u64()? },
        UPGRADE => Msg::Upgrade { page: r.u64()? },
        READY => Msg::Ready {
            page: r.u64()?,
            from: r.u32()?,
            dormant: r.flag()?,
            transfer: r.flag()?,
            evict: r.flag()?,
            epoch: r.u64()?,
            digest: r.u64()?,
            key: r.u64()?,
        },
        EVICTED => Msg::Evicted {
            page: r.u64()?,
            from: r.u32()?,
            to: r.u32()?,
            dormant: r.flag()?,
            epoch: r.u64()?,
            digest: r.u64()?,
            key: r.u64()?,
        },
        FETCHED => Msg::Fetched { page: r.u64()?, from: r.u32()?, key: r.u64()? },
        DONE => Msg::Done { page: r.u64()?, from: r.u32()?, key: r.u64()? },
        INVAL => Msg::Inval { page: r.u64()?, since: r.u64()? },
        INVAL_ACK => Msg::InvalAck { page: r.u64()?, from: r.u32()? },
        EVICT => Msg::Evict { page: r.u64()?, from: r.u32()?, to: r.u32()?, epoch: r.u64()? },
        REDORMANT => Msg::Redormant { page: r.u64()?, from: r.u32()?, epoch: r.u64()? },
        REFUSED => Msg::Refused { page: r.u64()? },
        DORMANTED => Msg::Dormanted { page: r.u64()? },
        FREE => Msg::Free { page: r.u64()?, from: r.u32()? },
        FORGET => Msg::Forget { page: r.u64()? },
        FREED => Msg::Freed { page: r.u64()? },
        UNSHARE => Msg::Unshare { page: r.u64()?, from: r.u32()? },
        UNSHARED => Msg::Unshared { page: r.u64()? },
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match bytes.len() - r.at {
        0 => Ok(msg),
        extra => Err(DecodeError::Trailing { tag, extra }),
    }
}

/// Appends `msg` to a batch in `out` (its length, then its encoding).
pub fn encode_batch(msg: &Msg, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    encode(msg, out);
    let len = u16::try_from(out.len() - at - 2).expect("a message is far shorter than 64 KiB");
    out[at..at + 2].copy_from_slice(&len.to_le_bytes());
}

/// Reads a batch: one or more length-prefixed messages filling `bytes`
/// exactly. An empty batch is an error, as is any malformed message.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Msg>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut msgs = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let cut = DecodeError::BatchCut { at, len: bytes.len() };
        let head: [u8; 2] = bytes.get(at..at + 2).ok_or(cut.clone())?.try_into().expect("2 bytes");
        let len = usize::from(u16::from_le_bytes(head));
        let body = bytes.get(at + 2..at + 2 + len).ok_or(cut)?;
        msgs.push(decode(body)?);
        at += 2 + len;
    }
    Ok(msgs)
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn flag(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }
    fn u32(&mut self, v: NodeId) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: Page) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    tag: u8,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at.checked_add(N).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(DecodeError::Short { tag: self.tag, len: self.bytes.len() })?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.at..end]);
        self.at = end;
        Ok(out)
    }
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.take::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::Flag { tag: self.tag, value }),
        }
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// A list length, bounded before anything is allocated for it.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let count = self.u32()?;
        if count as usize > MAX_GRANT {
            return Err(DecodeError::GrantTooLong { tag: self.tag, count });
        }
        Ok(count as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any message, every field over its whole range.
    fn msg() -> impl Strategy<Value = Msg> {
        crate::strategies::msg(any::<u64>(), any::<u32>(), any::<u64>(), 0..=MAX_GRANT)
    }

    proptest! {
        #[test]
        fn every_message_reads_back_as_itself(m in msg()) {
            let mut bytes = Vec::new();
            encode(&m, &mut bytes);
            prop_assert_eq!(decode(&bytes), Ok(m));
        }

        #[test]
        fn any_bytes_decode_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn every_batch_reads_back_as_itself(ms in prop::collection::vec(msg(), 1..8)) {
            let mut bytes = Vec::new();
            for m in &ms {
                encode_batch(m, &mut bytes);
            }
            prop_assert_eq!(decode_batch(&bytes), Ok(ms));
        }

        #[test]
        fn a_cut_batch_is_an_error(ms in prop::collection::vec(msg(), 1..4), cut in 1usize..8) {
            let mut bytes = Vec::new();
            for m in &ms {
                encode_batch(m, &mut bytes);
            }
            prop_assert!(decode_batch(&bytes[..bytes.len().saturating_sub(cut)]).is_err());
        }

        #[test]
        fn a_cut_or_padded_message_is_an_error(m in msg(), cut in 1usize..8, pad in 1usize..8) {
            let mut bytes = Vec::new();
            encode(&m, &mut bytes);
            let short = &bytes[..bytes.len().saturating_sub(cut)];
            prop_assert!(decode(short).is_err());
            bytes.extend(std::iter::repeat_n(0u8, pad));
            prop_assert!(decode(&bytes).is_err());
        }
    }

    #[test]
    fn a_grant_of_the_most_pages_fits_in_a_fabric_message() {
        let mut bytes = Vec::new();
        encode(&Msg::Grant { answers: 1, pages: vec![(1, 1); MAX_GRANT] }, &mut bytes);
        assert!(bytes.len() <= 16 * 1024, "{} bytes", bytes.len());
    }

    #[test]
    fn a_huge_grant_length_is_refused_before_allocating() {
        let mut bytes = vec![GRANT];
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::GrantTooLong { tag: GRANT, count: u32::MAX }));
        assert_eq!(decode(&[0xee]), Err(DecodeError::UnknownTag(0xee)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }
}
