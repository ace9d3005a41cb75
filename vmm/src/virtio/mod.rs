//! virtio devices of a Linux guest over MMIO, on node 0.
//!
//! Each device takes one slot: 4 KiB of registers in the MMIO hole at
//! [`MMIO_BASE`] plus slot × 4 KiB and one interrupt line, GSI
//! [`GSI_BASE`] plus slot on KVM's I/O APIC (pins 16–23: no ISA device uses them, and the
//! PIC never sees them). The DSDT describes every slot in use as an
//! `LNRO0005` device (`acpi.rs`), which Linux's `virtio_mmio` binds to.
//!
//! - **Registers**: a vCPU's MMIO exit in a slot reaches the device's
//!   transport (`mmio.rs`, I/O-free) under its lock.
//! - **Notifications**: the queue-notify register is an ioeventfd, so a
//!   guest's notification is a KVM exit that never reaches shoal's vCPU
//!   thread; one worker thread per device waits on it and serves the
//!   queues (a notification that does arrive as an MMIO exit is passed to
//!   the same eventfd).
//! - **Interrupts**: an irqfd on the device's GSI, raised by the worker
//!   (edge-triggered, active high, as the DSDT says); the guest reads the
//!   interrupt status and acknowledges it through the registers.
//!
//! Guest memory is the guest view (`GuestMemory::device_view`): a buffer
//! page the guest never touched is faulted in through the page engine like a
//! vCPU's touch, so page counts stay exact on one node and on a pod.

pub mod balloon;
pub mod blk;
pub mod mmio;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::DiskConfig;
use crate::memory::GuestMemory;
use mmio::{Device, Transport, REGION_SIZE};

/// The first slot's registers: in the MMIO hole, below the I/O APIC.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The first slot's interrupt line.
pub const GSI_BASE: u32 = 16;
/// Slots: KVM's I/O APIC has 24 pins.
pub const SLOTS: usize = 8;
/// virtio-mmio's queue-notify register.
const QUEUE_NOTIFY: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Where slot `i`'s registers are and its interrupt line.
pub fn slot(i: usize) -> (u64, u64, u32) {
    (MMIO_BASE + i as u64 * REGION_SIZE, REGION_SIZE, GSI_BASE + i as u32)
}

/// Errors making the devices (the host's: the disks were checked before).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("more virtio devices ({0}) than slots ({SLOTS})")]
    Slots(usize),
    #[error(transparent)]
    Disk(#[from] crate::config::Error),
    #[error("virtio device {slot}: {what}: {source}")]
    Kvm {
        slot: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("virtio device {slot}: {what}: {source}")]
    Io {
        slot: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the bus and the worker need of a transport, whatever its device.
trait Slot: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32>;
    fn serve(&mut self);
    fn take_irq(&mut self) -> bool;
}

impl<D: Device> Slot for Transport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Transport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        Transport::write(self, offset, data)
    }
    fn serve(&mut self) {
        for q in 0..self.device().queues() {
            self.serve_queue(q);
        }
    }
    fn take_irq(&mut self) -> bool {
        Transport::take_irq(self)
    }
}

/// One device in its slot.
struct Mmio {
    base: u64,
    transport: Mutex<Box<dyn Slot>>,
    /// The queue-notify ioeventfd the worker waits on.
    notify: EventFd,
    /// The irqfd of the device's GSI.
    irq: EventFd,
}

impl Mmio {
    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Slot>> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self, t: &mut dyn Slot) {
        if t.take_irq() {
            if let Err(e) = self.irq.write(1) {
                tracing::warn!(error = %e, "virtio: cannot raise an interrupt");
            }
        }
    }
}

/// The virtio devices of a VM and their workers.
pub struct VirtioDevices {
    devices: Vec<Arc<Mmio>>,
    stop: EventFd,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Keeps the guest view, which the transports' memory points into,
    /// mapped while they live.
    _mem: Arc<GuestMemory>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevices").field("devices", &self.devices.len()).finish_non_exhaustive()
    }
}

impl VirtioDevices {
    /// The block devices of `disks`, in slots 0.., then the balloon (when
    /// `balloon` says how to free pages), wired to `vm` (irqfds,
    /// ioeventfds), each with a worker thread.
    pub fn new(
        vm: &VmFd,
        mem: &Arc<GuestMemory>,
        disks: &[DiskConfig],
        balloon: Option<Arc<dyn balloon::Pages>>,
    ) -> Result<Self, Error> {
        let count = Self::count(disks.len(), balloon.is_some());
        if count > SLOTS {
            return Err(Error::Slots(count));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io { slot: 0, what: "eventfd", source })?;
        let mut this = VirtioDevices { devices: Vec::new(), stop, workers: Mutex::new(Vec::new()), _mem: mem.clone() };
        for (i, disk) in disks.iter().enumerate() {
            let (file, len) = disk.open()?;
            let device = blk::Block::new(file, len, disk.readonly, format!("shoal-disk{i}"));
            let transport: Box<dyn Slot> = Box::new(Transport::new(device, mem.device_view().clone()));
            this.add(vm, i, transport)?;
        }
        if let Some(pages) = balloon {
            let slot = disks.len();
            let device = balloon::Balloon::new(mem.layout().clone(), pages).map_err(|source| Error::Io {
                slot,
                what: "starting its thread",
                source,
            })?;
            let transport: Box<dyn Slot> = Box::new(Transport::new(device, mem.device_view().clone()));
            this.add(vm, disks.len(), transport)?;
        }
        Ok(this)
    }

    /// How many slots `disks` disks and a balloon (if `balloon`) take.
    pub fn count(disks: usize, balloon: bool) -> usize {
        disks + usize::from(balloon)
    }

    fn add(&mut self, vm: &VmFd, slot: usize, transport: Box<dyn Slot>) -> Result<(), Error> {
        let (base, _, gsi) = self::slot(slot);
        let io = |what| move |source| Error::Io { slot, what, source };
        let kvm = |what| move |source| Error::Kvm { slot, what, source };
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_irqfd(&irq, gsi).map_err(kvm("wiring its interrupt (irqfd)"))?;
        vm.register_ioevent(&notify, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), NoDatamatch)
            .map_err(kvm("wiring its queue notifications (ioeventfd)"))?;
        let dev = Arc::new(Mmio { base, transport: Mutex::new(transport), notify, irq });
        let stop = self.stop.try_clone().map_err(io("eventfd"))?;
        let worker = dev.clone();
        let handle = std::thread::Builder::new()
            .name(format!("shoal-virtio{slot}"))
            .spawn(move || serve(&worker, &stop))
            .map_err(io("starting its thread"))?;
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
        self.devices.push(dev);
        Ok(())
    }

    /// How many slots are in use (the DSDT describes them).
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn find(&self, addr: u64) -> Option<(&Mmio, u64)> {
        let i = usize::try_from(addr.checked_sub(MMIO_BASE)? / REGION_SIZE).ok()?;
        let dev = self.devices.get(i)?;
        Some((dev, addr - dev.base))
    }

    /// A vCPU's MMIO read; false when no device is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((dev, offset)) = self.find(addr) else { return false };
        dev.lock().read(offset, data);
        true
    }

    /// A vCPU's MMIO write; false when no device is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((dev, offset)) = self.find(addr) else { return false };
        let mut t = dev.lock();
        if t.write(offset, data).is_some() {
            // the ioeventfd takes these; one that came here anyway goes
            // the same way
            if let Err(e) = dev.notify.write(1) {
                tracing::warn!(error = %e, "virtio: cannot pass a queue notification on");
            }
        }
        dev.raise(t.as_mut());
        true
    }

    /// Stops the workers (after the vCPUs: nothing notifies any more).
    pub fn stop(&self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!(error = %e, "virtio: cannot stop the device threads");
            return;
        }
        for h in self.workers.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for VirtioDevices {
    /// A VM that never started (an error after the devices were made)
    /// still ends its workers.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// A device's worker: waits for a notification (or the stop), serves the
/// queues, raises the interrupt.
fn serve(dev: &Mmio, stop: &EventFd) {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = [
            libc::pollfd { fd: dev.notify.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "virtio: the device thread cannot wait; the device stops");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            // resets the count; EAGAIN (a racing read) is harmless
            let _ = dev.notify.read();
            let mut t = dev.lock();
            t.serve();
            dev.raise(t.as_mut());
        }
    }
}
