//! virtio-balloon with free page reporting (`VIRTIO_BALLOON_F_REPORTING`):
//! memory the guest frees goes back to being dormant.
//!
//! Linux reports free memory in chunks (2 MiB on x86: `pageblock_order`),
//! a few seconds after it was freed; each report is a buffer on the
//! reporting queue naming guest-physical ranges the guest will not touch
//! until the device hands the buffer back. The device hands each range to
//! the page engine ([`Free`]), which makes every page in it dormant again
//! wherever it is held (on a pod, the node that holds a page drops it
//! there: nothing moves) and returns when that is done; then the buffer
//! goes back. The next touch of such a page anywhere zero-fills it, as
//! any dormant page.
//!
//! The device offers no inflation target (`num_pages` stays 0): pages a
//! guest puts on the inflate queue anyway are freed the same way, the
//! deflate queue has nothing to do (a deflated page is dormant, and comes
//! back on its first touch).
//!
//! Queues, as Linux numbers them when only reporting is offered: 0
//! inflate, 1 deflate, 2 reporting (Linux skips the absent statistics and
//! free-page-hint queues when it assigns indices).

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{Broken, Device};
use crate::memory::{Layout, PAGE_SIZE};

/// The virtio device type of a memory balloon.
const DEVICE_TYPE: u32 = 5;
/// Free page reporting.
const F_REPORTING: u64 = 1 << 5;
/// A queue's size: Linux needs 32 entries for a report
/// (`PAGE_REPORTING_CAPACITY`).
const QUEUE_SIZE: u16 = 128;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;

/// Makes guest pages (memfd page indices) dormant again; returns when
/// they are.
pub type Free = Arc<dyn Fn(std::ops::Range<u64>) -> Result<(), String> + Send + Sync>;

/// A balloon that only takes what the guest reports free.
pub struct Balloon {
    layout: Layout,
    free: Free,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon").finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon over guest memory laid out as `layout`, freeing through
    /// `free`.
    pub fn new(layout: Layout, free: Free) -> Self {
        Balloon { layout, free }
    }

    /// The whole pages of guest-physical `[gpa, gpa + len)`, as memfd page
    /// indices; an error when the range is not guest RAM.
    fn pages(&self, gpa: u64, len: u64) -> Result<std::ops::Range<u64>, Broken> {
        let outside = || Broken(format!("the guest freed {len:#x} bytes at {gpa:#x}, which is not its RAM"));
        let end = gpa.checked_add(len).ok_or_else(outside)?;
        let region = self.layout.region_of_gpa(gpa).ok_or_else(outside)?;
        if end > region.end() {
            return Err(outside());
        }
        let offset = self.layout.gpa_to_offset(gpa).ok_or_else(outside)?;
        // whole pages only (Linux reports 2 MiB chunks)
        Ok(offset.div_ceil(PAGE_SIZE)..(offset + len) / PAGE_SIZE)
    }

    fn release(&self, pages: std::ops::Range<u64>) -> Result<(), Broken> {
        if pages.is_empty() {
            return Ok(());
        }
        (self.free)(pages).map_err(|e| Broken(format!("freeing reported pages: {e}")))
    }

    /// An inflate buffer: little-endian u32 page frame numbers (4 KiB).
    fn inflate(&self, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), Broken> {
        for d in chain {
            let len = d.len() as usize;
            if !len.is_multiple_of(4) {
                return Err(Broken(format!("an inflate buffer of {len} bytes, not whole page numbers")));
            }
            let mut pfns = vec![0u8; len];
            mem.read_slice(&mut pfns, GuestAddress(d.addr().0))
                .map_err(|e| Broken(format!("an inflate buffer outside guest memory: {e}")))?;
            // runs of consecutive frames go as one range
            let mut run: Option<(u64, u64)> = None;
            for b in pfns.chunks_exact(4) {
                let gpa = u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))) * PAGE_SIZE;
                let pages = self.pages(gpa, PAGE_SIZE)?;
                run = match run {
                    Some((first, end)) if end == pages.start => Some((first, pages.end)),
                    Some((first, end)) => {
                        self.release(first..end)?;
                        Some((pages.start, pages.end))
                    }
                    None => Some((pages.start, pages.end)),
                };
            }
            if let Some((first, end)) = run {
                self.release(first..end)?;
            }
        }
        Ok(())
    }

    /// A free page report: each buffer is a free range of guest memory.
    fn report(&self, chain: &[Descriptor]) -> Result<(), Broken> {
        for d in chain {
            let pages = self.pages(d.addr().0, u64::from(d.len()))?;
            self.release(pages)?;
        }
        Ok(())
    }
}

impl Device for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        F_REPORTING
    }

    fn queues(&self) -> usize {
        3
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    /// `num_pages` (the target: 0, never inflate) and `actual`, both 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = [0u8; 8];
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn serve(&mut self, queue: usize, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Broken> {
        match queue {
            INFLATE => self.inflate(chain, mem)?,
            DEFLATE => {}
            REPORTING => self.report(chain)?,
            _ => return Err(Broken(format!("the balloon has no queue {queue}"))),
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn balloon(size: u64) -> (Balloon, Arc<Mutex<Vec<std::ops::Range<u64>>>>) {
        let freed = Arc::new(Mutex::new(Vec::new()));
        let f = freed.clone();
        let free: Free = Arc::new(move |r| {
            f.lock().unwrap().push(r);
            Ok(())
        });
        (Balloon::new(Layout::new(size).unwrap(), free), freed)
    }

    fn desc(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    #[test]
    fn a_report_frees_the_whole_pages_of_each_range() {
        let (b, freed) = balloon(64 << 20);
        b.report(&[desc(2 << 20, 2 << 20), desc(0x1800, 0x3000)]).unwrap();
        // 2 MiB at 2 MiB; and 0x1800..0x4800 holds pages 2 and 3 whole
        assert_eq!(*freed.lock().unwrap(), vec![512..1024, 2..4]);
    }

    #[test]
    fn a_range_outside_guest_ram_fails_the_device_and_frees_nothing() {
        let (b, freed) = balloon(64 << 20);
        let e = b.report(&[desc(63 << 20, 2 << 20)]).unwrap_err();
        assert!(e.0.contains("not its RAM"), "{e:?}");
        let e = b.report(&[desc(u64::MAX - 10, 4096)]).unwrap_err();
        assert!(e.0.contains("not its RAM"), "{e:?}");
        assert!(freed.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failed_free_fails_the_device() {
        let free: Free = Arc::new(|_| Err("the VM is ending".into()));
        let b = Balloon::new(Layout::new(64 << 20).unwrap(), free);
        assert!(b.report(&[desc(0, 4096)]).unwrap_err().0.contains("the VM is ending"));
    }

    #[test]
    fn the_config_space_asks_for_no_inflation() {
        let (b, _) = balloon(64 << 20);
        let mut d = [0xffu8; 4];
        b.read_config(0, &mut d);
        assert_eq!(d, [0; 4]);
        b.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(b.features(), F_REPORTING);
        assert_eq!(b.queues(), 3);
    }
}
