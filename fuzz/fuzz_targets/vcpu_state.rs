//! A migrating vCPU's whole state (`shoal_vmm::vcpu::state::VcpuState::
//! decode`, bincode from a peer, bounded): any bytes are a state or an
//! error, never a panic or an allocation beyond the bound; a state
//! round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::vcpu::state::VcpuState;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = VcpuState::decode(1, data) else { return };
    let bytes = state.encode();
    let again = VcpuState::decode(1, &bytes).expect("an encoded state decodes");
    assert_eq!(again.encode(), bytes);
});
