//! The join handshake, run on every new connection before anything else:
//!
//! 1. both sides send `Hello` (magic, protocol version, backend, node id,
//!    pod id, a fresh 32-byte nonce, flags);
//! 2. each checks the other's version, pod id, backend, flags (frame
//!    authentication on or off) and node id, and refuses (`Refuse`, then
//!    close) on any mismatch;
//! 3. the dialing side proves it knows the pod secret first: `Auth` =
//!    HMAC-SHA256 keyed with the secret over a label, the flags, its role,
//!    both node ids and both nonces. The accepting side verifies it in
//!    constant time and only then sends its own proof (with its own role),
//!    which the dialer verifies. A wrong proof is refused;
//! 4. both derive the connection's frame keys from the secret and both
//!    nonces ([`crate::framing`]): every frame after this is tagged.
//!
//! Every frame of the handshake is read with
//! [`crate::wire::read_handshake_frame`]: at most a Hello's worth of bytes,
//! dropped at the first byte that cannot begin one.
//!
//! Only after this do regions, memfds or queue-pair details cross. A
//! replayed `Auth` fails (fresh nonces); a reflected one fails (the role is
//! signed); and because a listener never signs anything for a peer that
//! has not proven itself, connecting to two nodes and relaying between
//! them gets an attacker nowhere: the only dialer proofs are the ones
//! honest nodes send to the nodes they dial. (The fabric authenticates; it
//! does not encrypt. Someone who controls the network path can read the
//! traffic, not alter it undetected: run pods on the cluster's own
//! network.)

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::framing::{FrameKeys, MessageOpener, MessageSealer, Opener, Sealer};
use crate::wire::{
    read_handshake_frame, write_frame, Frame, Hello, StreamError, HELLO_AUTHENTICATED_FRAMES, PROTOCOL_VERSION,
};
use crate::{Error, Kind, NodeId};

type HmacSha256 = Hmac<Sha256>;

const LABEL: &[u8] = b"shoal fabric auth v2";

/// Who signs: the side that dialed, or the side that accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Dialer,
    Acceptor,
}

/// Who this node is in its pod.
#[derive(Clone)]
pub struct Identity {
    pub node: NodeId,
    /// Names the pod; every node of a pod uses the same.
    pub pod_id: String,
    /// The shared pod secret (any length; 32 random bytes are plenty).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("node", &self.node).field("pod_id", &self.pod_id).finish_non_exhaustive()
    }
}

/// A connection that passed the handshake: who is at the other end, and
/// how frames go to it and come from it from now on.
#[derive(Debug)]
pub struct Session {
    pub peer: NodeId,
    /// Seals what we send (tags it, when frames are authenticated).
    pub sealer: Sealer,
    /// Checks what we receive.
    pub opener: Opener,
    /// Tags the messages we send outside the stream (verbs' SENDs).
    pub msg_sealer: MessageSealer,
    /// Checks the messages we receive outside the stream.
    pub msg_opener: MessageOpener,
}

#[allow(clippy::too_many_arguments)]
fn mac(
    secret: &[u8],
    flags: u8,
    role: Role,
    from: NodeId,
    to: NodeId,
    from_nonce: &[u8; 32],
    to_nonce: &[u8; 32],
    pod: &str,
) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(LABEL);
    m.update(&[flags]);
    m.update(match role {
        Role::Dialer => b"dialer",
        Role::Acceptor => b"acceptr",
    });
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.update(from_nonce);
    m.update(to_nonce);
    m.update(pod.as_bytes());
    m
}

fn nonce() -> Result<[u8; 32], Error> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(|e| Error::Io {
        what: "reading random bytes for a handshake nonce".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(n)
}

fn stream_err(peer: Option<NodeId>, step: &'static str, e: StreamError) -> Error {
    match e {
        StreamError::Closed => Error::Handshake { peer, reason: format!("connection closed during {step}") },
        StreamError::Io(source) => Error::Handshake { peer, reason: format!("{step}: {source}") },
        StreamError::Wire(w) => Error::Handshake { peer, reason: format!("{step}: {w}") },
        f @ StreamError::Forged { .. } => Error::Handshake { peer, reason: format!("{step}: {f}") },
    }
}

/// Runs the handshake on a fresh connection. `expect` is the node we dialed
/// (None when we accepted); `authenticate` whether frames after it carry
/// tags (both sides must agree). Returns the peer and, when frames are
/// authenticated, the sealer and opener keyed for this connection.
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    me: &Identity,
    backend: Kind,
    expect: Option<NodeId>,
    authenticate: bool,
) -> Result<Session, Error> {
    let my_nonce = nonce()?;
    let flags = if authenticate { HELLO_AUTHENTICATED_FRAMES } else { 0 };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        backend: backend as u8,
        node: me.node,
        pod_id: me.pod_id.clone(),
        nonce: my_nonce,
        flags,
    };
    write_frame(stream, &Frame::Hello(hello)).map_err(|e| stream_err(expect, "sending Hello", e.into()))?;
    let theirs = match read_handshake_frame(stream).map_err(|e| stream_err(expect, "waiting for Hello", e))? {
        Frame::Hello(h) => h,
        Frame::Refuse { reason } => return Err(Error::Refused { peer: expect, reason }),
        other => {
            return Err(Error::Handshake { peer: expect, reason: format!("expected Hello, got {}", other.name()) });
        }
    };
    let peer = Some(theirs.node);
    let refusal = if theirs.version != PROTOCOL_VERSION {
        Some(Error::Version { peer: expect, theirs: theirs.version, ours: PROTOCOL_VERSION })
    } else if theirs.pod_id != me.pod_id {
        Some(Error::PodMismatch { peer, theirs: theirs.pod_id.clone(), ours: me.pod_id.clone() })
    } else if theirs.backend != backend as u8 {
        Some(Error::BackendMismatch { peer, theirs: theirs.backend, ours: backend })
    } else if theirs.flags != flags {
        Some(Error::FrameAuthMismatch { peer, theirs: theirs.flags & HELLO_AUTHENTICATED_FRAMES != 0 })
    } else if theirs.node == me.node {
        Some(Error::Handshake { peer, reason: format!("the peer claims our own node id {}", me.node) })
    } else if expect.is_some_and(|e| e != theirs.node) {
        Some(Error::Handshake {
            peer,
            reason: format!("dialed node {} but node {} answered", expect.unwrap_or(0), theirs.node),
        })
    } else {
        None
    };
    if let Some(err) = refusal {
        let _ = write_frame(stream, &Frame::handshake_refusal(&err.to_string()));
        return Err(err);
    }

    let (mine, their_role) = match expect {
        Some(_) => (Role::Dialer, Role::Acceptor),
        None => (Role::Acceptor, Role::Dialer),
    };
    let send_proof = |stream: &mut S| {
        let proof = mac(&me.secret, flags, mine, me.node, theirs.node, &my_nonce, &theirs.nonce, &me.pod_id)
            .finalize()
            .into_bytes();
        write_frame(stream, &Frame::Auth { mac: proof.into() }).map_err(|e| stream_err(peer, "sending Auth", e.into()))
    };
    if mine == Role::Dialer {
        send_proof(stream)?;
    }
    let their_mac = match read_handshake_frame(stream).map_err(|e| stream_err(peer, "waiting for Auth", e))? {
        Frame::Auth { mac } => mac,
        Frame::Refuse { reason } => return Err(Error::Refused { peer, reason }),
        other => {
            return Err(Error::Handshake { peer, reason: format!("expected Auth, got {}", other.name()) });
        }
    };
    let expected = mac(&me.secret, flags, their_role, theirs.node, me.node, &theirs.nonce, &my_nonce, &me.pod_id);
    if expected.verify_slice(&their_mac).is_err() {
        let err = Error::WrongSecret { peer };
        let _ = write_frame(stream, &Frame::handshake_refusal("authentication failed: wrong pod secret"));
        return Err(err);
    }
    if mine == Role::Acceptor {
        // only now: the dialer has proven it knows the secret
        send_proof(stream)?;
    }
    let ((sealer, opener), (msg_sealer, msg_opener)) = if authenticate {
        let keys = match mine {
            Role::Dialer => FrameKeys::derive(&me.secret, &me.pod_id, me.node, theirs.node, &my_nonce, &theirs.nonce),
            Role::Acceptor => FrameKeys::derive(&me.secret, &me.pod_id, theirs.node, me.node, &theirs.nonce, &my_nonce),
        };
        (keys.split(mine == Role::Dialer), keys.split_messages(mine == Role::Dialer))
    } else {
        ((Sealer::new(None), Opener::new(None)), (MessageSealer::new(None), MessageOpener::new(None)))
    };
    Ok(Session { peer: theirs.node, sealer, opener, msg_sealer, msg_opener })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn id(node: NodeId, pod: &str, secret: &[u8]) -> Identity {
        Identity { node, pod_id: pod.into(), secret: secret.to_vec() }
    }

    fn pair(a: Identity, b: Identity, kind_b: Kind) -> (Result<NodeId, Error>, Result<NodeId, Error>) {
        pair_with(a, b, kind_b, true, true)
    }

    fn pair_with(
        a: Identity,
        b: Identity,
        kind_b: Kind,
        auth_a: bool,
        auth_b: bool,
    ) -> (Result<NodeId, Error>, Result<NodeId, Error>) {
        let (mut sa, mut sb) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || handshake(&mut sb, &b, kind_b, None, auth_b).map(|s| s.peer));
        let ra = handshake(&mut sa, &a, Kind::Tcp, Some(1), auth_a).map(|s| s.peer);
        drop(sa);
        (ra, t.join().unwrap())
    }

    #[test]
    fn same_secret_joins() {
        let (a, b) = pair(id(0, "p", b"s3cret"), id(1, "p", b"s3cret"), Kind::Tcp);
        assert_eq!(a.unwrap(), 1);
        assert_eq!(b.unwrap(), 0);
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (a, b) = pair(id(0, "p", b"s3cret"), id(1, "p", b"guess"), Kind::Tcp);
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(matches!(a, Error::WrongSecret { .. } | Error::Refused { .. }), "{a}");
        assert!(matches!(b, Error::WrongSecret { .. } | Error::Refused { .. }), "{b}");
        assert!(a.to_string().contains("secret") || b.to_string().contains("secret"));
    }

    #[test]
    fn other_pod_or_backend_is_refused() {
        let (a, _) = pair(id(0, "p", b"s"), id(1, "q", b"s"), Kind::Tcp);
        assert!(a.unwrap_err().to_string().contains("pod"));
        let (a, _) = pair(id(0, "p", b"s"), id(1, "p", b"s"), Kind::Shm);
        assert!(a.unwrap_err().to_string().contains("backend"));
    }

    #[test]
    fn disagreeing_on_frame_authentication_is_refused() {
        let (a, b) = pair_with(id(0, "p", b"s"), id(1, "p", b"s"), Kind::Tcp, true, false);
        let a = a.unwrap_err().to_string();
        assert!(a.contains("node 1 does not authenticate its frames") && a.contains("authenticate_frames"), "{a}");
        assert!(b.is_err());
        let (a, b) = pair_with(id(0, "p", b"s"), id(1, "p", b"s"), Kind::Tcp, false, false);
        assert_eq!((a.unwrap(), b.unwrap()), (1, 0), "both off joins");
    }

    #[test]
    fn both_sides_derive_matching_frame_keys() {
        let (mut sa, mut sb) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || handshake(&mut sb, &id(1, "p", b"s"), Kind::Tcp, None, true).unwrap());
        let mut a = handshake(&mut sa, &id(0, "p", b"s"), Kind::Tcp, Some(1), true).unwrap();
        let mut b = t.join().unwrap();
        let f = Frame::Message(b"hi".to_vec());
        assert_eq!(b.opener.open(&a.sealer.seal(&f)).unwrap(), f);
        assert_eq!(a.opener.open(&b.sealer.seal(&f)).unwrap(), f);
    }

    #[test]
    fn dialing_the_wrong_node_is_refused() {
        let (a, _) = pair(id(0, "p", b"s"), id(2, "p", b"s"), Kind::Tcp);
        assert!(a.unwrap_err().to_string().contains("dialed node 1 but node 2 answered"));
    }

    #[test]
    fn a_reflected_proof_does_not_verify() {
        let n1 = [1u8; 32];
        let n2 = [2u8; 32];
        let forward = mac(b"k", 1, Role::Dialer, 0, 1, &n1, &n2, "p").finalize().into_bytes();
        assert!(mac(b"k", 1, Role::Dialer, 1, 0, &n2, &n1, "p").verify_slice(&forward).is_err());
        assert!(mac(b"k", 1, Role::Acceptor, 0, 1, &n1, &n2, "p").verify_slice(&forward).is_err());
        assert!(mac(b"k", 0, Role::Dialer, 0, 1, &n1, &n2, "p").verify_slice(&forward).is_err());
        assert!(mac(b"k", 1, Role::Dialer, 0, 1, &n1, &n2, "p").verify_slice(&forward).is_ok());
    }

    /// The relay attack: connect to two nodes' listeners and pass each one's
    /// messages to the other. A listener signs nothing before the dialer
    /// proves itself, so the attacker never gets a proof to relay.
    #[test]
    fn relaying_between_two_listeners_gets_no_proof() {
        use crate::wire::{read_frame, write_frame};
        let (mut to0, mut node0) = UnixStream::pair().unwrap();
        let (mut to1, mut node1) = UnixStream::pair().unwrap();
        let a = std::thread::spawn(move || handshake(&mut node0, &id(0, "p", b"s"), Kind::Tcp, None, true).map(|_| ()));
        let b = std::thread::spawn(move || handshake(&mut node1, &id(1, "p", b"s"), Kind::Tcp, None, true).map(|_| ()));
        let Frame::Hello(h0) = read_frame(&mut to0).unwrap() else { panic!() };
        let Frame::Hello(h1) = read_frame(&mut to1).unwrap() else { panic!() };
        // impersonate node 1 towards node 0 and node 0 towards node 1
        write_frame(&mut to0, &Frame::Hello(Hello { node: 1, nonce: h1.nonce, ..h1.clone() })).unwrap();
        write_frame(&mut to1, &Frame::Hello(Hello { node: 0, nonce: h0.nonce, ..h0.clone() })).unwrap();
        // both listeners now wait for a proof; nothing arrives to relay
        to0.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
        to1.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
        assert!(read_frame(&mut to0).is_err(), "node 0 must not sign first");
        assert!(read_frame(&mut to1).is_err(), "node 1 must not sign first");
        drop((to0, to1));
        assert!(a.join().unwrap().is_err());
        assert!(b.join().unwrap().is_err());
    }
}
