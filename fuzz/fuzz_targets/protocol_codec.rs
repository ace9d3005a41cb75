//! The page protocol's messages (`shoal_protocol::codec::decode`) and the
//! batches a fabric frame carries (`decode_batch`): any bytes are a message
//! (or a batch) or an error, never a panic, and what decodes encodes back
//! to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::codec::{decode, decode_batch, encode, encode_batch};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let mut back = Vec::new();
        encode(&msg, &mut back);
        assert_eq!(back, data, "{msg:?} re-encodes differently");
    }
    if let Ok(msgs) = decode_batch(data) {
        let mut back = Vec::new();
        for m in &msgs {
            encode_batch(m, &mut back);
        }
        assert_eq!(back, data, "{msgs:?} re-encode differently");
    }
});
