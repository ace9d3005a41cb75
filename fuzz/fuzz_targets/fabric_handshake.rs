//! The handshake, fed by a peer that sends anything: the bounded reader of
//! handshake frames (`read_handshake_frame`: never more than a Hello's
//! worth of bytes, nothing else accepted) and the whole exchange
//! (`auth::handshake`, as dialer and as acceptor, with frame
//! authentication on and off) over a stream whose incoming bytes are the
//! input. It must end with a session or an error, never a panic; without
//! the pod secret no session is possible.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use shoal_fabric::auth::handshake;
use shoal_fabric::wire::{read_handshake_frame, Frame, MAX_HANDSHAKE_FRAME, PROTOCOL_VERSION};
use shoal_fabric::{Identity, Kind};

/// A connection whose peer sends `input` and then closes; what we send is
/// dropped, but counted.
struct Peer<'a> {
    input: &'a [u8],
    at: usize,
    sent: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // trickle: at most 7 bytes a call, as a slow peer might
        let n = buf.len().min(self.input.len() - self.at).min(7);
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };

    let mut peer = Peer { input, at: 0, sent: 0 };
    if let Ok(frame) = read_handshake_frame(&mut peer) {
        assert!(matches!(frame, Frame::Hello(_) | Frame::Auth { .. } | Frame::Refuse { .. }), "{frame:?}");
        assert!(peer.at <= 4 + MAX_HANDSHAKE_FRAME, "read {} bytes before authenticating", peer.at);
        if !matches!(&frame, Frame::Hello(h) if h.version != PROTOCOL_VERSION) {
            assert_eq!(frame.encode(), &input[..peer.at]);
        }
    }

    let me =
        Identity { node: u32::from(mode & 3), pod_id: "fuzz".into(), secret: b"the fuzzer does not know it".to_vec() };
    let kind = [Kind::Shm, Kind::Tcp, Kind::Verbs][usize::from(mode >> 2) % 3];
    let expect = (mode & 0x20 != 0).then_some(u32::from(mode >> 6));
    let mut peer = Peer { input, at: 0, sent: 0 };
    let r = handshake(&mut peer, &me, kind, expect, mode & 0x40 != 0);
    // two frames at most: a Hello and an Auth (a refusal ends it)
    assert!(peer.at <= 2 * (4 + MAX_HANDSHAKE_FRAME), "read {} bytes before authenticating", peer.at);
    assert!(r.is_err(), "a peer that does not know the secret joined");
});
