//! vCPU messages between nodes (`shoal_vmm::vcpus::VcpuMsg::decode`,
//! bincode on channel 2 of the fabric): any bytes are a message or an
//! error, never a panic, and a message round-trips; a migration's state
//! goes through `VcpuState::decode` as the receiving node's would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::vcpu::state::VcpuState;
use shoal_vmm::vcpus::VcpuMsg;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = VcpuMsg::decode(1, data) else { return };
    let bytes = msg.encode();
    assert_eq!(VcpuMsg::decode(1, &bytes[1..]).as_ref(), Ok(&msg));
    if let VcpuMsg::Migrate { state, .. } = &msg {
        let _ = VcpuState::decode(1, state);
    }
});
