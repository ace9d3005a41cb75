//! A pod's control messages (`shoal_vmm::pod::Control`, JSON on channel 1
//! of the fabric, from any node): any bytes are a message or an error,
//! never a panic; a message encodes, and what it encodes to decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::pod::Control;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = serde_json::from_slice::<Control>(data) {
        let json = serde_json::to_vec(&msg).expect("a control message encodes");
        let again: Control = serde_json::from_slice(&json).expect("an encoded control message decodes");
        // (not compared with `msg`: floats in the metrics may round)
        let _ = again;
    }
});
