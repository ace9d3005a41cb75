//! End-to-end checks of pulled pages (`--verify-pages`).
//!
//! A page moves between nodes by a one-sided read of its owner's memory.
//! Over tcp with `--frame-auth on` those bytes travel in authenticated
//! frames; over verbs an RDMA READ carries no tag at all (the fabric's
//! own integrity check protects against corruption, not against someone
//! on the path). With `--verify-pages on` the owner, once it has
//! protected its copy, sends a digest of the bytes in its answer
//! (`Msg::Ready`, or `Msg::Evicted` for an eviction; the home keeps the
//! digest of a page parked on another node, whose bytes cannot change
//! there, for its direct reads), and the reader checks what it pulled
//! before the page reaches its guest. The digest is HMAC-SHA256 of the
//! page number and bytes, truncated to 64 bits, under a key every node
//! derives from the pod secret: with frames authenticated, an attacker
//! can neither alter the answer nor forge a digest for other bytes.
//! Cost: one HMAC of 4 KiB on each side of a transfer (about 3 µs each on
//! the development machine, see `bench/results/pod.md`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key of a pod's page digests, from its secret and id.
fn key(secret: &[u8], pod_id: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(pod_id.as_bytes()), secret)
        .expand(b"shoal page digests v1", &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// Digests of pages under one pod's key.
#[derive(Clone)]
pub struct PageDigests(Hmac<Sha256>);

impl std::fmt::Debug for PageDigests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageDigests { .. }")
    }
}

impl PageDigests {
    /// The digests of the pod with this secret and id (every node derives
    /// the same key; it never leaves this value).
    pub fn for_pod(secret: &[u8], pod_id: &str) -> Self {
        PageDigests(Hmac::<Sha256>::new_from_slice(&key(secret, pod_id)).expect("HMAC takes a key of any length"))
    }

    /// The digest of page `page` holding `bytes`.
    pub fn of(&self, page: u64, bytes: &[u8]) -> u64 {
        let mut mac = self.0.clone();
        mac.update(&page.to_le_bytes());
        mac.update(bytes);
        let tag = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_depends_on_the_bytes_the_page_and_the_pod() {
        let d = PageDigests::for_pod(b"a pod secret of 16+", "p");
        let page = vec![7u8; 4096];
        let mut other = page.clone();
        other[4095] ^= 1;
        assert_eq!(d.of(3, &page), d.of(3, &page));
        assert_ne!(d.of(3, &page), d.of(3, &other));
        assert_ne!(d.of(3, &page), d.of(4, &page));
        let e = PageDigests::for_pod(b"another pod secret!", "p");
        assert_ne!(d.of(3, &page), e.of(3, &page));
        let f = PageDigests::for_pod(b"a pod secret of 16+", "q");
        assert_ne!(d.of(3, &page), f.of(3, &page));
    }
}
