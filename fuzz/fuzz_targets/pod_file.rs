//! Pod files (`toml::from_str::<shoal_vmm::pod::launch::PodFile>`): any
//! text is a pod file or an error, never a panic; a pod file serialises
//! (`shoal run --nodes N` writes one for its child nodes) to text that
//! parses back to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::pod::launch::PodFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(pod) = toml::from_str::<PodFile>(text) else { return };
    let written = toml::to_string(&pod).expect("a pod file serialises");
    let back: PodFile = toml::from_str(&written).unwrap_or_else(|e| panic!("{written:?} does not parse back: {e}"));
    assert_eq!(toml::to_string(&back).expect("a pod file serialises"), written);
});
