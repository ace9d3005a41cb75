//! Fabric frames after the handshake (`shoal_fabric::wire`): any bytes are
//! a frame or an error, never a panic; a frame re-encodes to the bytes it
//! came from (the format has one encoding per frame); the three ways in
//! (a body, a prefixed buffer, a stream) agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fabric::wire::{decode_prefixed, read_frame, Frame, StreamError, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    // as a frame body (kind byte first)
    if let Ok(frame) = Frame::decode(data) {
        // a Hello of another version is read only as far as its version
        if !matches!(&frame, Frame::Hello(h) if h.version != PROTOCOL_VERSION) {
            assert_eq!(&frame.encode()[4..], data, "{frame:?} re-encodes differently");
        }
    }
    // as a length-prefixed frame, and as a stream of them
    let prefixed = decode_prefixed(data);
    let mut stream = std::io::Cursor::new(data);
    let streamed = read_frame(&mut stream);
    match (&prefixed, &streamed) {
        (Ok((a, used)), Ok(b)) => {
            assert_eq!(a, b);
            assert_eq!(*used as u64, stream.position());
        }
        (Ok(_), Err(e)) => panic!("decode_prefixed took a frame read_frame refused: {e}"),
        // a short buffer is an error for one, a closed stream for the other
        (Err(_), Ok(f)) => panic!("read_frame took a frame decode_prefixed refused: {f:?}"),
        (Err(_), Err(StreamError::Closed | StreamError::Wire(_))) => {}
        (Err(_), Err(e)) => panic!("unexpected stream error {e}"),
    }
    // every frame after the first, as a peer's reader thread reads them
    let mut stream = std::io::Cursor::new(data);
    while read_frame(&mut stream).is_ok() {}
});
