//! Builds a node's KVM VM over its guest memory: the VM, one memslot per
//! RAM region of the guest view, and, for a Linux guest, a PC's interrupt
//! controllers and timer. Every node of a pod builds one (the same layout
//! over its own memfd), so that it can run the vCPUs placed on it and
//! receive vCPUs that move to it; running them is `vcpus.rs`'s part.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Errors building a VM (the host's, not the user's).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot make the serial port's interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A built VM: KVM, the VM and, with a PC platform, the eventfd that
/// raises the serial port's IRQ 4.
#[derive(Debug)]
pub struct Built {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub serial_irq: Option<EventFd>,
}

/// Opens KVM and builds a VM whose RAM is `mem`'s guest view; with
/// `pc_platform`, also the in-kernel PIC, IOAPIC, local APICs and PIT.
pub fn build(mem: &GuestMemory, pc_platform: bool) -> Result<Built, Error> {
    let kvm_err = |what: &str| {
        let what = what.to_string();
        move |source| Error::Kvm { what: what.clone(), source }
    };
    let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("cannot create a KVM VM"))?;
    for (slot, r) in mem.layout().regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.gpa,
            memory_size: r.len,
            userspace_addr: mem.guest_view_base() + r.offset,
            flags: 0,
        };
        // SAFETY: the guest view stays mapped for as long as the VM exists:
        // the caller keeps `mem` alive beyond the VM (a node drops its VM
        // before its memory).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err(&format!(
            "cannot give KVM {} MiB of guest memory at {:#x}",
            r.len >> 20,
            r.gpa
        )))?;
    }
    let serial_irq = if pc_platform { Some(setup_pc_platform(&vm)?) } else { None };
    Ok(Built { kvm, vm, serial_irq })
}

/// The in-kernel PIC, IOAPIC, local APICs and PIT of a PC, for a Linux
/// guest; returns the eventfd that raises the serial port's IRQ 4.
fn setup_pc_platform(vm: &VmFd) -> Result<EventFd, Error> {
    let kvm_err = |what: &str| {
        let what = what.to_string();
        move |source| Error::Kvm { what: what.clone(), source }
    };
    // KVM needs three pages of guest-physical space for the TSS of real
    // mode emulation: in the MMIO hole, below the 4 GiB boundary
    vm.set_tss_address(0xfffb_d000).map_err(kvm_err("setting the TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("creating the in-kernel interrupt controllers"))?;
    let pit = kvm_bindings::kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("creating the in-kernel PIT"))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&irq, 4).map_err(kvm_err("wiring the serial port to IRQ 4"))?;
    Ok(irq)
}
