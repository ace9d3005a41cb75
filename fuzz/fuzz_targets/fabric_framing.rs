//! Frames after the handshake as a connection's reader takes them
//! (`shoal_fabric::framing::Opener`): untagged, a stream of any bytes is
//! frames then an error; tagged, bytes nobody sealed never verify, and
//! whatever decodes seals and opens back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fabric::framing::{FrameKeys, Opener, Sealer};
use shoal_fabric::wire::{Frame, StreamError};

fuzz_target!(|data: &[u8]| {
    // frame authentication off: the stream as the peer's reader reads it
    let mut plain = Opener::new(None);
    let mut stream = std::io::Cursor::new(data);
    let mut frames = 0;
    while plain.read_frame(&mut stream).is_ok() {
        frames += 1;
    }
    assert!(frames <= data.len() / 5, "{frames} frames from {} bytes", data.len());
    let _ = Opener::new(None).open(data);

    // frame authentication on: only what the sealer made verifies (the
    // seeds hold one frame sealed under these keys)
    let keys = FrameKeys::derive(b"pod secret", "fuzz", 1, 0, &[1; 32], &[2; 32]);
    let (mut sealer, _) = keys.split(true);
    let (_, mut opener) = keys.split(false);
    let mut stream = std::io::Cursor::new(data);
    match opener.read_frame(&mut stream) {
        Ok(f) => {
            let used = stream.position() as usize;
            let resealed = keys.split(true).0.seal(&f);
            assert_eq!(resealed, &data[..used], "{f:?} verified, but is not what the sealer makes of it");
        }
        Err(StreamError::Closed | StreamError::Wire(_) | StreamError::Forged { .. }) => {}
        Err(e) => panic!("unexpected stream error {e}"),
    }
    let (_, mut opener) = keys.split(false);
    if let Ok(f) = opener.open(data) {
        assert_eq!(keys.split(true).0.seal(&f), data, "{f:?} verified, but is not what the sealer makes of it");
    }

    // a frame that decodes, sealed, opens as itself (twice: the sequence
    // numbers advance together)
    if let Ok(frame) = Frame::decode(data) {
        let (_, mut opener) = keys.split(false);
        for _ in 0..2 {
            let sealed = sealer.seal(&frame);
            let opened = opener.open(&sealed).expect("a sealed frame opens");
            if matches!(&frame, Frame::Hello(h) if h.version != shoal_fabric::PROTOCOL_VERSION) {
                continue;
            }
            assert_eq!(opened, frame);
        }
        let _ = Sealer::new(None).seal(&frame);
    }
});
