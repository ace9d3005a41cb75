//! virtio-balloon with free page reporting (`VIRTIO_BALLOON_F_REPORTING`):
//! memory the guest frees goes back to being dormant.
//!
//! Linux reports free memory in chunks (2 MiB on x86: `pageblock_order`),
//! a few seconds after it was freed; each report is a buffer on the
//! reporting queue naming guest-physical ranges the guest will not touch
//! until the device hands the buffer back. The device hands each range to
//! the page engine ([`Pages::report`]), which takes the pages out of the
//! guest view at once, and the buffer goes back: the guest has its memory
//! again within the time of a `madvise`, not of the messages a pod needs.
//! The balloon's own thread then has the engine make them dormant
//! ([`Pages::free`]) wherever they are held (on a pod, the node that holds
//! a page drops it there: nothing moves). A page the guest touches before
//! that waits for its free (the engine's fault path), then zero-fills, as
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

use std::ops::Range;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

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

/// What the balloon asks of guest memory (memfd page indices): the page
/// engine.
pub trait Pages: Send + Sync {
    /// The guest reported these pages free: take them from the guest now
    /// (its next touch of one waits for its free). Quick.
    fn report(&self, pages: Range<u64>) -> Result<(), String>;
    /// Make reported pages dormant again wherever they are; returns when
    /// they are (on a pod, after messages).
    fn free(&self, pages: Range<u64>) -> Result<(), String>;
}

/// A balloon that only takes what the guest reports free.
pub struct Balloon {
    layout: Layout,
    pages: Arc<dyn Pages>,
    /// To the thread that frees what was reported.
    freer: Mutex<Sender<Range<u64>>>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon").finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon over guest memory laid out as `layout`, freeing through
    /// `pages`, with a thread that frees what the guest reported (it ends
    /// with the balloon).
    pub fn new(layout: Layout, pages: Arc<dyn Pages>) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Range<u64>>();
        let p = pages.clone();
        std::thread::Builder::new().name("shoal-balloon".into()).spawn(move || {
            while let Ok(range) = rx.recv() {
                // a real failure ended the VM already (the engine's); what
                // is left is the VM ending under a free
                if let Err(e) = p.free(range.clone()) {
                    tracing::debug!(first = range.start, error = %e, "balloon: a free did not complete");
                }
            }
        })?;
        Ok(Balloon { layout, pages, freer: Mutex::new(tx) })
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

    fn release(&self, pages: Range<u64>) -> Result<(), Broken> {
        if pages.is_empty() {
            return Ok(());
        }
        self.pages.report(pages.clone()).map_err(|e| Broken(format!("freeing reported pages: {e}")))?;
        self.freer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(pages)
            .map_err(|_| Broken("the balloon's freeing thread is gone".into()))
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
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
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

    /// Records what the balloon asked; `fail` makes reports fail.
    #[derive(Default)]
    struct Record {
        reported: Mutex<Vec<Range<u64>>>,
        freed: Mutex<Vec<Range<u64>>>,
        fail: bool,
    }

    impl Pages for Record {
        fn report(&self, pages: Range<u64>) -> Result<(), String> {
            if self.fail {
                return Err("the VM is ending".into());
            }
            self.reported.lock().unwrap().push(pages);
            Ok(())
        }
        fn free(&self, pages: Range<u64>) -> Result<(), String> {
            self.freed.lock().unwrap().push(pages);
            Ok(())
        }
    }

    fn balloon(size: u64) -> (Balloon, Arc<Record>) {
        let r = Arc::new(Record::default());
        (Balloon::new(Layout::new(size).unwrap(), r.clone()).unwrap(), r)
    }

    fn desc(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    #[test]
    fn a_report_takes_the_whole_pages_of_each_range_then_frees_them() {
        let (b, r) = balloon(64 << 20);
        b.report(&[desc(2 << 20, 2 << 20), desc(0x1800, 0x3000)]).unwrap();
        // 2 MiB at 2 MiB; and 0x1800..0x4800 holds pages 2 and 3 whole
        assert_eq!(*r.reported.lock().unwrap(), vec![512..1024, 2..4]);
        // the balloon's thread frees them (after the report returned)
        let start = std::time::Instant::now();
        while r.freed.lock().unwrap().len() < 2 && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(*r.freed.lock().unwrap(), vec![512..1024, 2..4]);
    }

    #[test]
    fn a_range_outside_guest_ram_fails_the_device_and_frees_nothing() {
        let (b, r) = balloon(64 << 20);
        let e = b.report(&[desc(63 << 20, 2 << 20)]).unwrap_err();
        assert!(e.0.contains("not its RAM"), "{e:?}");
        let e = b.report(&[desc(u64::MAX - 10, 4096)]).unwrap_err();
        assert!(e.0.contains("not its RAM"), "{e:?}");
        assert!(r.reported.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failed_report_fails_the_device() {
        let r = Arc::new(Record { fail: true, ..Record::default() });
        let b = Balloon::new(Layout::new(64 << 20).unwrap(), r).unwrap();
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
