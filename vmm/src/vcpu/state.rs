//! The whole architectural state of one vCPU, in one place: what moves
//! when a vCPU migrates to another node of a pod (and what a checkpoint
//! will save).
//!
//! Captured and restored in the order Firecracker and Cloud Hypervisor use
//! (vCPU events last on capture: the other reads can change what is
//! pending; CPUID first on restore: KVM checks the rest against it). The
//! state crosses the fabric as bincode, with a bound on what a peer may
//! make us allocate.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// The most bytes an encoded state may take (a peer's message is bounded
/// by the fabric too; this bounds what decoding allocates).
pub const MAX_ENCODED: usize = 64 << 10;

/// Errors capturing, restoring or decoding a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: {what}: {source}")]
    Kvm {
        vcpu: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("a vCPU state from node {from} does not decode: {reason}")]
    Decode { from: u32, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Everything a vCPU is, so that it resumes elsewhere as if nothing
/// happened: registers (general, segment, control, debug), FPU/SSE/AVX
/// state (XSAVE), extended control registers, model-specific registers,
/// pending exceptions and interrupts, its run state, its local APIC (when
/// the VM has one in the kernel), its CPUID, and what the VMM keeps for it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// IPIs posted to the vCPU and not yet taken by its wait hypercall.
    pub pending_ipis: u64,
    /// The largest clock value the guest has read: a clock read on the new
    /// node never goes below it.
    pub clock_floor_ns: u64,
}

/// Runs a batch MSR ioctl over `entries`, skipping entries KVM refuses
/// (it stops at the first it cannot handle and returns how many it did);
/// returns the entries handled and how many were skipped.
fn msr_batches(
    entries: &[kvm_msr_entry],
    mut op: impl FnMut(&mut Msrs) -> std::result::Result<usize, kvm_ioctls::Error>,
) -> std::result::Result<(Vec<kvm_msr_entry>, usize), kvm_ioctls::Error> {
    let mut done = Vec::with_capacity(entries.len());
    let mut skipped = 0;
    let mut i = 0;
    while i < entries.len() {
        let mut batch = Msrs::from_entries(&entries[i..]).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = op(&mut batch)?;
        done.extend_from_slice(&batch.as_slice()[..n]);
        i += n;
        if i < entries.len() {
            // entry i was refused: leave it out and go on after it
            skipped += 1;
            i += 1;
        }
    }
    Ok((done, skipped))
}

impl VcpuState {
    /// Reads vCPU `id`'s state. `irqchip`: the VM has an in-kernel local
    /// APIC to save too.
    pub fn capture(kvm: &Kvm, fd: &VcpuFd, id: u32, irqchip: bool) -> Result<VcpuState> {
        let err = |what| move |source| Error::Kvm { vcpu: id, what, source };
        let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err("reading CPUID"))?;
        let mp_state = fd.get_mp_state().map_err(err("reading the run state"))?;
        let regs = fd.get_regs().map_err(err("reading registers"))?;
        let sregs = fd.get_sregs().map_err(err("reading special registers"))?;
        let xsave = fd.get_xsave().map_err(err("reading the XSAVE state"))?;
        let xcrs = fd.get_xcrs().map_err(err("reading XCRs"))?;
        let debugregs = fd.get_debug_regs().map_err(err("reading debug registers"))?;
        let lapic = if irqchip { Some(fd.get_lapic().map_err(err("reading the local APIC"))?) } else { None };
        let list = kvm.get_msr_index_list().map_err(err("listing MSRs"))?;
        let wanted: Vec<kvm_msr_entry> =
            list.as_slice().iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let (msrs, skipped) = msr_batches(&wanted, |b| fd.get_msrs(b)).map_err(err("reading MSRs"))?;
        if skipped > 0 {
            tracing::debug!(vcpu = id, skipped, "MSRs KVM lists but would not read");
        }
        let events = fd.get_vcpu_events().map_err(err("reading pending events"))?;
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            pending_ipis: 0,
            clock_floor_ns: 0,
        })
    }

    /// Puts this state into a vCPU that has never run (or one that ran
    /// here before and left): it resumes where the state was taken.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        let id = self.id;
        let err = |what| move |source| Error::Kvm { vcpu: id, what, source };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| Error::Kvm {
            vcpu: id,
            what: "building CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(err("setting CPUID"))?;
        fd.set_mp_state(self.mp_state).map_err(err("setting the run state"))?;
        fd.set_regs(&self.regs).map_err(err("setting registers"))?;
        fd.set_sregs(&self.sregs).map_err(err("setting special registers"))?;
        // SAFETY: the XSAVE area came from KVM_GET_XSAVE of a vCPU of the
        // same kind (the legacy 4 KiB area, which is all it holds).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("setting the XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("setting XCRs"))?;
        fd.set_debug_regs(&self.debugregs).map_err(err("setting debug registers"))?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(err("setting the local APIC"))?;
        }
        let (_, skipped) = msr_batches(&self.msrs, |b| fd.set_msrs(b)).map_err(err("setting MSRs"))?;
        if skipped > 0 {
            // measured on kvm_pvm without an in-kernel APIC: only
            // MSR_KVM_POLL_CONTROL is refused (it needs a paravirtual
            // feature the guest was not given)
            tracing::debug!(vcpu = id, skipped, "MSRs this vCPU would not take");
        }
        fd.set_vcpu_events(&self.events).map_err(err("setting pending events"))?;
        Ok(())
    }

    /// The state as bytes for the fabric.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("a vCPU state encodes")
    }

    /// A state a peer sent; any malformed input is an error.
    pub fn decode(from: u32, bytes: &[u8]) -> Result<VcpuState> {
        if bytes.len() > MAX_ENCODED {
            return Err(Error::Decode { from, reason: format!("{} bytes, more than {MAX_ENCODED}", bytes.len()) });
        }
        let config = bincode::config::standard().with_limit::<MAX_ENCODED>();
        let (state, used): (VcpuState, usize) = bincode::serde::decode_from_slice(bytes, config)
            .map_err(|e| Error::Decode { from, reason: e.to_string() })?;
        if used != bytes.len() {
            return Err(Error::Decode { from, reason: format!("{} bytes left over", bytes.len() - used) });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        VcpuState {
            id: 3,
            cpuid: vec![kvm_cpuid_entry2 { function: 1, eax: 7, ..Default::default() }],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs { rip: 0x10_0000, rax: 42, ..Default::default() },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: None,
            msrs: vec![kvm_msr_entry { index: 0x10, data: 99, ..Default::default() }],
            events: kvm_vcpu_events::default(),
            pending_ipis: 2,
            clock_floor_ns: 5,
        }
    }

    #[test]
    fn a_state_round_trips_and_fits_a_fabric_message() {
        let s = sample();
        let bytes = s.encode();
        assert!(bytes.len() < shoal_fabric::MAX_MESSAGE, "{} bytes", bytes.len());
        let back = VcpuState::decode(1, &bytes).unwrap();
        assert_eq!((back.id, back.regs.rip, back.regs.rax, back.pending_ipis), (3, 0x10_0000, 42, 2));
        assert_eq!(back.msrs[0].data, 99);
        assert_eq!(back.cpuid[0].eax, 7);
    }

    #[test]
    fn malformed_states_are_errors_not_panics() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(VcpuState::decode(1, &bytes[..len]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(VcpuState::decode(1, &long).is_err());
        assert!(VcpuState::decode(1, &vec![0xff; MAX_ENCODED + 1]).is_err());
        // a huge length prefix must not make decoding allocate it
        assert!(VcpuState::decode(1, &[3, 0xfc, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
