//! vCPUs: long-mode setup and the run loop.

pub mod state;
pub mod stats;

use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd};
use shoal_guest_images::abi;

use crate::control::{Control, VmEvent};
use crate::devices::{Devices, HcResult, PortEvent};
use crate::linux;
use crate::loader::{self, BootPlan, LinuxEntry};
use crate::vcpus::Vcpus;
use state::{Sync, VcpuState};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: {what}: {source}")]
    Kvm {
        vcpu: u64,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// KVM's paravirtual feature leaf and the asynchronous page fault bits in
/// its EAX (Linux's arch/x86/include/uapi/asm/kvm_para.h).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// The CPUID the guest sees: what KVM supports, with vCPU `id`'s APIC id.
pub fn cpuid_for(kvm: &Kvm, id: u64) -> std::result::Result<CpuId, kvm_ioctls::Error> {
    cpuid_with(kvm, id, false, false)
}

/// As [`cpuid_for`]; for `linux` with the hypervisor bit set; `no_xsave`
/// hides XSAVE and what needs it (AVX and later): Linux under nested KVM
/// on TCG finds the XSAVE state sizes inconsistent there.
pub fn cpuid_with(kvm: &Kvm, id: u64, linux: bool, no_xsave: bool) -> std::result::Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            // initial APIC id in EBX[31:24]
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24),
            // x2APIC id
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
        if linux && e.function == 1 {
            // "running under a hypervisor": Linux then finds KVM's leaves
            // (0x4000_0000: kvm-clock, paravirtual features)
            e.ecx |= 1 << 31;
        }
        if linux && e.function == KVM_CPUID_FEATURES {
            // No asynchronous page faults: a vCPU must block on a page the
            // page engine is bringing in (KVM would deliver its async-PF notices
            // through guest memory that may itself be away). On a 2-node
            // pod under nested KVM a guest with async PF triple-faulted as
            // soon as pages were evicted; that harness (QEMU with two CPUs)
            // was later seen to wedge on its own, so the measurement is
            // weak, but blocking is the simpler contract either way.
            e.eax &= !(KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT);
        }
        if no_xsave {
            match e.function {
                // XSAVE, OSXSAVE, AVX, F16C, FMA
                1 => e.ecx &= !((1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 12)),
                // AVX2, AVX-512*
                7 if e.index == 0 => e.ebx &= !((1 << 5) | 0xfffc_0000 | (1 << 16) | (1 << 17)),
                0xd => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                _ => {}
            }
        }
    }
    Ok(cpuid)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Why a vCPU's thread left its run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leave {
    /// The VM is stopping, or the guest ended (reported to the VM's
    /// control already).
    Stopped,
    /// The vCPU cannot go on: the VM fails.
    Failed(String),
    /// The vCPU moves to this node (the guest asked, or the policy).
    Migrate(u32),
}

/// One vCPU, ready to run on this node.
#[derive(Debug)]
pub struct Vcpu {
    id: u64,
    fd: VcpuFd,
    /// A Linux guest: MMIO goes to the virtio devices, and stray MMIO
    /// reads all ones (no device there), as on a PC; a unikernel's is a
    /// bug that ends the VM.
    linux: bool,
    host: Arc<Vcpus>,
    exits: u64,
    /// The largest clock value the guest read (the clock never goes back,
    /// also not when the vCPU moves to a node whose clock is behind).
    clock_floor: u64,
    /// The CPUID this vCPU was given (it moves with the vCPU).
    cpuid: Vec<kvm_cpuid_entry2>,
    /// Whether KVM hands us the registers in `kvm_run` at every exit (a
    /// hypercall then needs no `KVM_GET_REGS`/`KVM_SET_REGS`).
    sync: Sync,
}

impl Vcpu {
    /// Puts vCPU `id` in 64-bit mode at the image's entry, with its stack
    /// and boot-info block from `plan`.
    pub fn new(id: u64, mut fd: VcpuFd, kvm: &Kvm, plan: &BootPlan, sync: Sync, host: Arc<Vcpus>) -> Result<Self> {
        let err = |what| move |source| Error::Kvm { vcpu: id, what, source };
        let cpuid = cpuid_with(kvm, id, plan.linux.is_some(), plan.linux.is_some_and(|l| l.no_xsave))
            .map_err(err("reading KVM's supported CPUID"))?;
        // CPUID first: KVM only accepts EFER.LME once CPUID says long mode
        fd.set_cpuid2(&cpuid).map_err(err("setting CPUID"))?;

        let mut sregs = fd.get_sregs().map_err(err("reading special registers"))?;
        let pvh = matches!(plan.linux, Some(LinuxEntry { entry: linux::Entry::Pvh { .. }, .. }));
        // 64-bit mode on our tables; a PVH kernel wants 32-bit protected
        // mode with flat segments and paging off
        sregs.cs = segment(loader::CODE_SELECTOR, 0xb, !pvh);
        let data = segment(loader::DATA_SELECTOR, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            selector: loader::TSS_SELECTOR,
            limit: 0xffff,
            type_: 0xb,
            s: 0,
            db: 0,
            l: 0,
            ..segment(loader::TSS_SELECTOR, 0xb, false)
        };
        sregs.gdt.base = plan.gdt;
        sregs.gdt.limit = (loader::GDT.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        if pvh {
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.efer = 0;
        } else {
            sregs.cr3 = plan.pml4;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        fd.set_sregs(&sregs).map_err(err("setting the entry mode (KVM_SET_SREGS)"))?;

        let regs = match plan.linux {
            // Only vCPU 0 starts at the kernel's entry; the others wait
            // for the kernel's INIT/SIPI in the in-kernel local APIC
            // (which resets what is set here), as the MP tables say.
            Some(l) => {
                set_lint(&fd).map_err(err("setting up the local APIC"))?;
                match l.entry {
                    // the 64-bit boot protocol: rsi points at the zero page
                    linux::Entry::Boot64 { rip, zero_page } => {
                        kvm_regs { rip, rsp: l.stack, rsi: zero_page, rflags: 0x2, ..Default::default() }
                    }
                    // PVH: ebx points at the start info
                    linux::Entry::Pvh { rip, start_info } => {
                        kvm_regs { rip, rsp: l.stack, rbx: start_info, rflags: 0x2, ..Default::default() }
                    }
                }
            }
            None => {
                let (boot_info, stack_top) = plan.vcpus[id as usize];
                kvm_regs { rip: plan.entry, rsp: stack_top, rdi: boot_info, rflags: 0x2, ..Default::default() }
            }
        };
        fd.set_regs(&regs).map_err(err("setting registers"))?;
        if sync == Sync::Regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        let cpuid = cpuid.as_slice().to_vec();
        Ok(Vcpu { id, fd, linux: plan.linux.is_some(), host, exits: 0, clock_floor: 0, cpuid, sync })
    }

    /// A vCPU whose state was restored into `fd` (it arrived from another
    /// node; [`VcpuState::restore`] left the registers synced, if `sync`).
    pub fn resume(id: u64, fd: VcpuFd, linux: bool, state: &VcpuState, sync: Sync, host: Arc<Vcpus>) -> Self {
        let cpuid = state.cpuid.clone();
        Vcpu { id, fd, linux, host, exits: 0, clock_floor: state.clock_floor_ns, cpuid, sync }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Exits counted since the last call.
    pub fn take_exits(&mut self) -> u64 {
        std::mem::take(&mut self.exits)
    }

    /// Captures the whole state ([`VcpuState::capture`]) and gives back
    /// the KVM vCPU, when the vCPU leaves this node (its exits were taken
    /// already: `take_exits`).
    pub fn leave(mut self, msr_list: &[u32], irqchip: bool) -> std::result::Result<(VcpuState, VcpuFd), String> {
        let id = self.id as u32;
        let mut state = VcpuState::capture(&mut self.fd, id, &self.cpuid, msr_list, irqchip, self.sync)
            .map_err(|e| format!("capturing it: {e}"))?;
        state.clock_floor_ns = self.clock_floor;
        Ok((state, self.fd))
    }

    /// The guest-physical page under the stack pointer, if its page tables
    /// map it (`KVM_TRANSLATE`; a hint, so None on any doubt): the page a
    /// vCPU that leaves writes first on its new node.
    pub fn stack_page(&mut self) -> Option<u64> {
        let rsp = self.regs().ok()?.rsp;
        let t = self.fd.translate_gva(rsp).ok()?;
        (t.valid != 0).then_some(t.physical_address / crate::memory::PAGE_SIZE)
    }

    /// The general registers as of the last exit: from `kvm_run` where KVM
    /// syncs them there, else an ioctl.
    fn regs(&mut self) -> std::result::Result<kvm_regs, kvm_ioctls::Error> {
        match self.sync {
            Sync::Regs => Ok(self.fd.sync_regs().regs),
            Sync::Ioctls => self.fd.get_regs(),
        }
    }

    /// Runs until the guest exits or halts, the VM fails or stops, or the
    /// vCPU is to move to another node.
    pub fn run(&mut self) -> Leave {
        match self.run_loop() {
            Ok(leave) => leave,
            Err(why) => Leave::Failed(why),
        }
    }

    fn run_loop(&mut self) -> std::result::Result<Leave, String> {
        let control = self.host.control().clone();
        let devices = self.host.devices().clone();
        loop {
            if control.stopping() {
                return Ok(Leave::Stopped);
            }
            if let Some(to) = self.host.take_move(self.id) {
                if to != self.host.node() {
                    return Ok(Leave::Migrate(to));
                }
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // a kick (signal) or a spurious wakeup: check for a stop,
                // and answer whether the vCPU is stopped for good if asked
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Some(round) = self.host.take_probe(self.id) {
                        if self.stopped_for_good() {
                            self.host.answer_stopped(self.id, round);
                        }
                    }
                    continue;
                }
                Err(e) => return Err(format!("KVM_RUN failed: {e}")),
            };
            self.exits += 1;
            match exit {
                VcpuExit::IoOut(port, data) if port == abi::HC_PORT => {
                    let nr = match data.try_into() {
                        Ok(b) => u32::from_le_bytes(b),
                        Err(_) => return Err(format!("hypercall with a {}-byte out; use outl", data.len())),
                    };
                    if let Some(leave) = self.hypercall(nr, &devices, &control)? {
                        return Ok(leave);
                    }
                }
                VcpuExit::IoOut(port, data) => match devices.pio_write(port, data) {
                    None => {}
                    Some(PortEvent::Exit(status)) => {
                        control.report(VmEvent::Exit { vcpu: self.id, status: status.into() });
                        return Ok(Leave::Stopped);
                    }
                    Some(PortEvent::Reset) => {
                        control.report(VmEvent::Reset { vcpu: self.id });
                        return Ok(Leave::Stopped);
                    }
                    Some(PortEvent::PowerOff) => {
                        control.report(VmEvent::PowerOff { vcpu: self.id });
                        return Ok(Leave::Stopped);
                    }
                },
                VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
                VcpuExit::Hlt => {
                    control.report(VmEvent::Halted { vcpu: self.id });
                    return Ok(Leave::Stopped);
                }
                VcpuExit::Shutdown => {
                    return Err(self.describe("the guest shut down the CPU (triple fault)"));
                }
                VcpuExit::InternalError => {
                    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the kernel
                    // filled in the `internal` arm of the exit union.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Err(self.describe(&format!(
                        "KVM internal error (suberror {suberror}; 1 = the guest used an instruction \
                         this KVM cannot emulate)"
                    )));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Err(format!("KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"));
                }
                VcpuExit::MmioRead(addr, data) if self.linux => devices.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) if self.linux => devices.mmio_write(addr, data),
                VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
                    return Err(self.describe(&format!("the guest accessed {addr:#x}, which is not RAM")));
                }
                other => return Err(format!("unexpected VM exit {other:?}")),
            }
        }
    }

    /// Handles one hypercall; Some when the vCPU leaves its loop.
    fn hypercall(
        &mut self,
        nr: u32,
        devices: &Devices,
        control: &Control,
    ) -> std::result::Result<Option<Leave>, String> {
        let regs = self.regs().map_err(|e| format!("reading registers for a hypercall: {e}"))?;
        let host = self.host.clone();
        let value = match nr {
            abi::HC_IPI => host.send_ipi(regs.rdi),
            abi::HC_WAIT_IPI => host.wait_ipi(self.id, regs.rdi),
            abi::HC_MIGRATE => {
                let to = regs.rdi;
                if to >= u64::from(host.nodes()) {
                    return Err(format!(
                        "the guest asked to move vCPU {} to node {to}; the pod has {} node(s) (0 to {})",
                        self.id,
                        host.nodes(),
                        host.nodes() - 1
                    ));
                }
                self.set_rax(regs, 0)?;
                if to as u32 == host.node() {
                    return Ok(None);
                }
                return Ok(Some(Leave::Migrate(to as u32)));
            }
            abi::HC_CLOCK_NS => {
                let HcResult::Return(now) = devices.hypercall(self.id, nr, [regs.rdi, regs.rsi, regs.rcx]) else {
                    unreachable!("the clock returns")
                };
                self.clock_floor = self.clock_floor.max(now);
                self.clock_floor
            }
            _ => match devices.hypercall(self.id, nr, [regs.rdi, regs.rsi, regs.rcx]) {
                HcResult::Exit(status) => {
                    control.report(VmEvent::Exit { vcpu: self.id, status });
                    return Ok(Some(Leave::Stopped));
                }
                HcResult::Return(value) => value,
            },
        };
        self.set_rax(regs, value)?;
        Ok(None)
    }

    /// A hypercall's return value, into `rax` of `regs` (read at its exit).
    fn set_rax(&mut self, mut regs: kvm_regs, value: u64) -> std::result::Result<(), String> {
        regs.rax = value;
        match self.sync {
            // loaded at the next entry, as a KVM_SET_REGS now would be
            Sync::Regs => {
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                Ok(())
            }
            Sync::Ioctls => self.fd.set_regs(&regs).map_err(|e| format!("returning from a hypercall: {e}")),
        }
    }

    /// Whether nothing can make this vCPU run again: halted with
    /// interrupts off (Linux's `halt` ends in `cli; hlt` on every CPU), or
    /// still waiting for the INIT the guest never sent. Only an NMI could
    /// wake the first, and no device of ours sends one. With the in-kernel
    /// local APIC KVM keeps a halted vCPU inside `KVM_RUN`, so this is
    /// asked after a kick (see `vm::wait`).
    fn stopped_for_good(&self) -> bool {
        let Ok(mp) = self.fd.get_mp_state() else { return false };
        match mp.mp_state {
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED | kvm_bindings::KVM_MP_STATE_UNINITIALIZED => true,
            kvm_bindings::KVM_MP_STATE_HALTED => {
                const IF: u64 = 1 << 9;
                let nmi_pending = self.fd.get_vcpu_events().is_ok_and(|e| e.nmi.pending != 0 || e.nmi.injected != 0);
                self.fd.get_regs().is_ok_and(|r| r.rflags & IF == 0) && !nmi_pending
            }
            _ => false,
        }
    }

    fn describe(&self, what: &str) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!("{what} at rip {:#x} (rsp {:#x})", r.rip, r.rsp),
            Err(_) => what.to_string(),
        }
    }
}

/// Local APIC LINT0 as ExtINT (the PIC's interrupts) and LINT1 as NMI,
/// as a PC's firmware leaves them.
fn set_lint(fd: &VcpuFd) -> std::result::Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 7;
    const DELIVERY_NMI: u32 = 4;
    let mut lapic = fd.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as libc::c_char;
        }
    }
    fd.set_lapic(&lapic)
}

/// Pins the calling thread to host CPU `cpu` (threads it starts later
/// inherit it). shoal's own threads pin as best effort (`--pin`: they log
/// the error and run on); a benchmark that must not report unpinned
/// numbers fails on it.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t; `cpu` is bounds-checked by CPU_SET.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the
    // size we pass.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("pinning a thread to CPU {cpu}: {e}")));
    }
    Ok(())
}

/// The host CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size we pass.
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET only reads the set.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}
