//! Pod files (`toml::from_str::<shoal_vmm::pod::launch::PodFile>`): any
//! text is a pod file or an error, never a panic; a pod file serialises
//! (`shoal run --nodes N` writes one for its child nodes) to text that
//! parses back to the same. Then what `shoal node --pod FILE` reads from
//! it before joining, without I/O: its sizes, and where each node listens
//! (`launch::place` over shm: no name is resolved), for rank 0 with no
//! launcher in the environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fabric::Kind;
use shoal_vmm::config::parse_size;
use shoal_vmm::pod::launch::{place, PodFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(pod) = toml::from_str::<PodFile>(text) else { return };
    let written = toml::to_string(&pod).expect("a pod file serialises");
    let back: PodFile = toml::from_str(&written).unwrap_or_else(|e| panic!("{written:?} does not parse back: {e}"));
    assert_eq!(toml::to_string(&back).expect("a pod file serialises"), written);

    let _ = parse_size(&pod.memory);
    let _ = pod.node_memory.as_deref().map(parse_size);
    if let Ok(p) = place(&pod, Kind::Shm, Some(0), &|_| None) {
        assert_eq!(p.addresses.map(|a| a.len()), Some(p.nodes as usize));
    }
});
