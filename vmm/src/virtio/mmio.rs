//! The virtio-mmio transport (virtio 1.x, the "modern" register layout,
//! version 2), without I/O: register reads and writes in, effects out (a
//! queue to serve, an interrupt to raise). The queues are rust-vmm's
//! `virtio-queue`; a [`Device`] serves one descriptor chain at a time.
//!
//! A guest that breaks the virtio contract (a queue outside its memory, a
//! descriptor chain that loops or is longer than its queue, a request
//! without room for its status) fails the device, never the VM: the
//! device sets NEEDS_RESET in its status, raises a configuration-change
//! interrupt, logs one warning and serves nothing until the driver resets
//! it (writes 0 to the status register).

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// "virt", the magic value at offset 0.
const MAGIC: u32 = 0x7472_6976;
/// The register layout of virtio 1.x ("modern" virtio-mmio).
const VERSION: u32 = 2;
/// Where the device's configuration space starts.
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Bytes of register space each device takes.
pub const REGION_SIZE: u64 = 0x1000;

/// A guest's breach of the virtio contract: the device fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken(pub String);

/// What a virtio device is to its transport.
pub trait Device: Send {
    /// The virtio device type (2: block).
    fn device_type(&self) -> u32;
    /// The features the device offers (the transport adds VERSION_1 and
    /// EVENT_IDX).
    fn features(&self) -> u64;
    /// How many queues, and the largest size of each.
    fn queues(&self) -> usize;
    fn queue_max_size(&self) -> u16;
    /// Reads the device's configuration space at `offset`; bytes past its
    /// end read as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves one available descriptor chain of queue `queue` (its
    /// descriptors in order, indirect tables followed); returns the bytes
    /// written into the chain's device-writable buffers.
    fn serve(&mut self, queue: usize, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Broken>;
}

/// A virtio device behind its MMIO registers.
#[derive(Debug)]
pub struct Transport<D> {
    device: D,
    mem: GuestMemoryMmap,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    /// An interrupt to raise (the caller takes it: [`Transport::take_irq`]).
    irq: bool,
    /// The guest broke the contract; nothing is served until a reset.
    failed: Option<String>,
}

impl<D: Device> Transport<D> {
    /// The device over guest memory `mem` (as the device sees it).
    pub fn new(device: D, mem: GuestMemoryMmap) -> Self {
        let queues = (0..device.queues())
            .map(|_| Queue::new(device.queue_max_size()).expect("a device's queue size is a power of two"))
            .collect();
        Transport {
            device,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            irq: false,
            failed: None,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Why the device failed, if it did (until the driver resets it).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn offered(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    /// Whether an interrupt is to be raised (and forgets it).
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` in the device's region.
    /// Registers are 32 bits wide: another width reads as zeros; the
    /// configuration space may be read at any width.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            data.fill(0);
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) else {
            data.fill(0);
            return;
        };
        let q = self.queues.get(self.queue_sel as usize);
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => 0,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // no shared memory regions: their length reads as all ones
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // the configuration space never changes
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        *word = v.to_le_bytes();
    }

    /// A write of `data` at `offset`; the queue the driver notified, if
    /// it did. Writes of another width than 32 bits, to the configuration
    /// space, or to read-only registers are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(offset, len = data.len(), "virtio-mmio: a write of another width than 32 bits; ignored");
            return None;
        };
        let v = u32::from_le_bytes(word);
        let queue_is_ready = self.queues.get(self.queue_sel as usize).is_some_and(|q| q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                // only while the driver negotiates
                if self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            // a queue's setup may change only while it is not ready
            VIRTIO_MMIO_QUEUE_NUM if !queue_is_ready => {
                if let Some(q) = self.selected() {
                    if q.try_set_size(v.try_into().unwrap_or(0)).is_err() {
                        tracing::debug!(
                            size = v,
                            "virtio-mmio: a queue size that is no power of two up to the maximum; ignored"
                        );
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if !queue_is_ready => {
                self.set_address(|q, lo| q.set_desc_table_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if !queue_is_ready => {
                self.set_address(|q, hi| q.set_desc_table_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if !queue_is_ready => {
                self.set_address(|q, lo| q.set_avail_ring_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if !queue_is_ready => {
                self.set_address(|q, hi| q.set_avail_ring_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if !queue_is_ready => {
                self.set_address(|q, lo| q.set_used_ring_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if !queue_is_ready => {
                self.set_address(|q, hi| q.set_used_ring_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => return Some(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => tracing::debug!(offset, "virtio-mmio: a write to a read-only or unknown register; ignored"),
        }
        None
    }

    fn set_address(&mut self, set: impl FnOnce(&mut Queue, Option<u32>), v: u32) {
        if let Some(q) = self.selected() {
            set(q, Some(v));
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered();
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // the driver reads FEATURES_OK back and gives up
                tracing::debug!(
                    features = self.driver_features,
                    unknown,
                    "virtio-mmio: the driver's features are not ours or lack VERSION_1"
                );
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        self.status = v;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            if let Some(i) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
                self.fail(format!("queue {i} lies outside guest memory (or is misaligned)"));
            }
        }
        if self.failed.is_some() {
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.failed = None;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// The guest broke the contract: NEEDS_RESET, a configuration-change
    /// interrupt, one warning.
    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        tracing::warn!(
            device = self.device.device_type(),
            "virtio device failed: {why}; it serves nothing until the guest resets it"
        );
        self.failed = Some(why);
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.irq = true;
    }

    /// Serves what the driver made available on queue `index` (after a
    /// notification); raises the used-buffer interrupt when the driver
    /// wants one.
    pub fn serve_queue(&mut self, index: usize) {
        if self.failed.is_some() || self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return;
        }
        let Some(q) = self.queues.get(index) else {
            tracing::debug!(queue = index, "virtio-mmio: notified a queue the device does not have");
            return;
        };
        if !q.ready() {
            return;
        }
        if !q.is_valid(&self.mem) {
            return self.fail(format!("queue {index} lies outside guest memory (or is misaligned)"));
        }
        match self.drain(index) {
            Ok(true) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.irq = true;
            }
            Ok(false) => {}
            Err(Broken(why)) => self.fail(why),
        }
    }

    /// Serves every available chain; whether to interrupt.
    fn drain(&mut self, index: usize) -> Result<bool, Broken> {
        let mem = &self.mem;
        let q = &mut self.queues[index];
        let guest = |e: virtio_queue::Error| Broken(format!("queue {index}: {e}"));
        let mut used = false;
        loop {
            q.disable_notification(mem).map_err(guest)?;
            loop {
                let (head, chain) = {
                    let mut avail = q.iter(mem).map_err(guest)?;
                    let Some(chain) = avail.next() else { break };
                    (chain.head_index(), walk(chain, index)?)
                };
                let len = self.device.serve(index, &chain, mem)?;
                q.add_used(mem, head, len).map_err(guest)?;
                used = true;
            }
            // with EVENT_IDX: the driver may have added more meanwhile
            if !q.enable_notification(mem).map_err(guest)? {
                break;
            }
        }
        Ok(used && q.needs_notification(mem).map_err(guest)?)
    }

    /// The next index the device will take from queue `index`'s available
    /// ring (tests).
    #[cfg(test)]
    pub fn next_avail(&self, index: usize) -> u16 {
        self.queues[index].next_avail()
    }
}

/// The descriptors of a chain, in order. A chain still asking for a next
/// descriptor when the queue's count runs out loops or is longer than the
/// queue (or names a descriptor outside its table): the guest broke it.
fn walk<M>(mut chain: virtio_queue::DescriptorChain<M>, queue: usize) -> Result<Vec<Descriptor>, Broken>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut descs = Vec::new();
    for d in chain.by_ref() {
        descs.push(d);
    }
    match descs.last() {
        None => Err(Broken(format!("queue {queue}: chain head {head} is outside its descriptor table"))),
        Some(last) if last.has_next() => Err(Broken(format!(
            "queue {queue}: descriptor chain {head} loops, is longer than its queue or leaves its table \
             (after {} descriptors)",
            descs.len()
        ))),
        Some(_) => Ok(descs),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_NEEDS_RESET};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Address, Bytes, GuestAddress};

    /// A fake guest: 1 MiB of memory, one queue of 16 at fixed places.
    pub const MEM_SIZE: u64 = 1 << 20;
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const QSIZE: u16 = 16;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    pub fn rd<D: Device>(t: &mut Transport<D>, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr<D: Device>(t: &mut Transport<D>, reg: u32, v: u32) -> Option<u32> {
        t.write(u64::from(reg), &v.to_le_bytes())
    }

    /// What Linux's virtio_mmio does up to DRIVER_OK, with queue 0 at
    /// `desc`, `avail`, `used`.
    pub fn bring_up<D: Device>(t: &mut Transport<D>, desc: u64, avail: u64, used: u64) {
        wr(t, VIRTIO_MMIO_STATUS, 0);
        wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, lo & !(1 << VIRTIO_RING_F_EVENT_IDX));
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        wr(t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_FEATURES_OK);
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QSIZE));
        wr(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (lo, hi, a) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used),
        ] {
            wr(t, lo, a as u32);
            wr(t, hi, (a >> 32) as u32);
        }
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Writes descriptor `i` of the table at [`DESC`].
    pub fn put_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags as u16, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Makes chain `head` available (the next slot of the avail ring).
    pub fn offer(mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % QSIZE))).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
    }

    /// The used ring's index and its entry `i` (head, len).
    pub fn used(mem: &GuestMemoryMmap, i: u16) -> (u16, u32, u32) {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        (idx, mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    /// A device that counts the chains it serves and writes nothing.
    #[derive(Debug, Default)]
    struct Counter {
        served: Vec<usize>,
    }

    impl Device for Counter {
        fn device_type(&self) -> u32 {
            99
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queues(&self) -> usize {
            1
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn serve(&mut self, _: usize, chain: &[Descriptor], _: &GuestMemoryMmap) -> Result<u32, Broken> {
            self.served.push(chain.len());
            Ok(0)
        }
    }

    #[test]
    fn registers_identify_a_modern_device_and_negotiate() {
        let mut t = Transport::new(Counter::default(), memory());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 99);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), (1 << 3) | (1 << VIRTIO_RING_F_EVENT_IDX));
        // a 16-bit register read reads nothing; the config space any width
        let mut half = [0xaa; 2];
        t.read(0, &mut half);
        assert_eq!(half, [0, 0]);
        let mut cfg = [0u8; 3];
        t.read(CONFIG_START + 5, &mut cfg);
        assert_eq!(cfg, [5, 6, 7]);
        // a driver without VERSION_1 does not get FEATURES_OK
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // nor one asking for a feature not offered
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 4);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let mem = memory();
        let mut t = Transport::new(Counter::default(), mem.clone());
        bring_up(&mut t, DESC, AVAIL, USED);
        assert!(t.failure().is_none());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        // a ready queue's size and addresses stay as they are
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(t.queues[0].desc_table(), DESC);
        assert_eq!(wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), Some(0));
        // a queue past the device's reads as absent
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn chains_are_served_and_interrupt() {
        let mem = memory();
        let mut t = Transport::new(Counter::default(), mem.clone());
        bring_up(&mut t, DESC, AVAIL, USED);
        put_desc(&mem, 0, 0x10000, 16, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, 0x11000, 1, VRING_DESC_F_WRITE, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert_eq!(t.device().served, [2]);
        assert_eq!(used(&mem, 0), (1, 0, 0));
        assert!(t.take_irq());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // nothing new: no interrupt
        t.serve_queue(0);
        assert!(!t.take_irq());
        assert_eq!(t.next_avail(0), 1);
    }

    fn assert_failed<D: Device>(t: &mut Transport<D>, what: &str) {
        let why = t.failure().unwrap_or_else(|| panic!("the device did not fail ({what})")).to_string();
        assert!(why.contains(what), "{why}");
        assert_ne!(rd(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_ne!(rd(t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
        assert!(t.take_irq(), "a configuration-change interrupt");
    }

    #[test]
    fn a_queue_outside_guest_memory_fails_the_device_until_a_reset() {
        let mem = memory();
        let mut t = Transport::new(Counter::default(), mem.clone());
        // the used ring past the end of memory
        bring_up(&mut t, DESC, AVAIL, MEM_SIZE - 8);
        assert_failed(&mut t, "queue 0 lies outside guest memory");
        // failed: notifications serve nothing
        put_desc(&mem, 0, 0x10000, 16, 0, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert!(t.device().served.is_empty());
        assert!(!t.take_irq(), "one failure, one interrupt");
        // a reset, and a proper setup, serve again
        bring_up(&mut t, DESC, AVAIL, USED);
        assert!(t.failure().is_none());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        t.serve_queue(0);
        assert_eq!(t.device().served, [1]);
        // a descriptor table at an address beyond 4 GiB of a 1 MiB guest
        let mut t = Transport::new(Counter::default(), mem.clone());
        bring_up(&mut t, 0x1_0000_0000, AVAIL, USED);
        assert_failed(&mut t, "outside guest memory");
    }

    #[test]
    fn a_looping_or_overlong_chain_fails_the_device() {
        let mem = memory();
        let mut t = Transport::new(Counter::default(), mem.clone());
        bring_up(&mut t, DESC, AVAIL, USED);
        // 0 → 1 → 0 → ...
        put_desc(&mem, 0, 0x10000, 16, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, 0x11000, 16, VRING_DESC_F_NEXT, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert_failed(&mut t, "loops");
        assert!(t.device().served.is_empty());
        assert_eq!(used(&mem, 0).0, 0, "nothing used");

        // a chain of 17 in a queue of 16: each descriptor names the next,
        // the last one past the table
        let mut t = Transport::new(Counter::default(), mem.clone());
        bring_up(&mut t, DESC, AVAIL, USED);
        for i in 0..QSIZE {
            put_desc(&mem, i, 0x10000, 16, VRING_DESC_F_NEXT, i + 1);
        }
        offer(&mem, 0);
        t.serve_queue(0);
        assert_failed(&mut t, "longer than its queue");

        // an available index far ahead of what the queue holds
        let mut t = Transport::new(Counter::default(), mem.clone());
        mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        bring_up(&mut t, DESC, AVAIL, USED);
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        t.serve_queue(0);
        assert_failed(&mut t, "queue 0");
    }
}
