//! The page protocol's messages (`shoal_protocol::codec::decode`): any
//! bytes are a message or an error, never a panic, and a message encodes
//! back to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::codec::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let mut back = Vec::new();
        encode(&msg, &mut back);
        assert_eq!(back, data, "{msg:?} re-encodes differently");
    }
});
