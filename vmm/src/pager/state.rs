//! Page states of one node and the fault-around planner: plain logic, no
//! I/O, unit-tested without KVM.

use std::sync::atomic::{AtomicU64, Ordering};

/// Pages in a fault-around block: 2 MiB, aligned in guest-physical terms.
pub const BLOCK_PAGES: u64 = 512;

/// Which pages of guest memory this node holds. A page that is not
/// resident is *dormant* on one node: it has no storage and reads as zeros.
#[derive(Debug)]
pub struct PageStates {
    pages: u64,
    bits: Box<[AtomicU64]>,
}

impl PageStates {
    /// `pages` dormant pages. The bitmap is allocated zeroed (calloc), so
    /// the kernel backs only the words that are ever set: a 64 GiB guest
    /// does not pay 2 MiB of bitmap up front.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        let zeroed = Box::<[AtomicU64]>::new_zeroed_slice(words);
        // SAFETY: an all-zero AtomicU64 is a valid AtomicU64 holding 0.
        let bits = unsafe { zeroed.assume_init() };
        PageStates { pages, bits }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether `page` is resident here.
    pub fn is_resident(&self, page: u64) -> bool {
        debug_assert!(page < self.pages);
        self.bits[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Marks `[first, first + count)` resident; returns how many of them
    /// were not resident before.
    pub fn set_resident(&self, first: u64, count: u64) -> u64 {
        let mut newly = 0;
        let mut page = first;
        let end = first + count;
        debug_assert!(end <= self.pages);
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let old = self.bits[(page / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((mask & !old).count_ones());
            page += n;
        }
        newly
    }

    /// Number of resident pages (a full scan: for reports, not hot paths).
    pub fn count_resident(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

/// The pages one fault resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First page index.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
}

impl Run {
    /// At most `max` pages of this run, still holding `fault`, and kept
    /// starting at the fault where it must be cut, since guests touch
    /// memory upwards far more often than downwards. `None` when `max` is
    /// 0.
    pub fn trim(self, fault: u64, max: u64) -> Option<Run> {
        debug_assert!(self.first <= fault && fault < self.first + self.count);
        if max == 0 {
            return None;
        }
        if self.count <= max {
            return Some(self);
        }
        let first = fault.min(self.first + self.count - max);
        Some(Run { first, count: max })
    }
}

/// The maximal run of non-resident pages around the non-resident page
/// `fault` inside the block `[lo, hi)`: what one fault resolves when the
/// memory budget allows (see [`Run::trim`]).
pub fn plan_run(fault: u64, lo: u64, hi: u64, resident: impl Fn(u64) -> bool) -> Run {
    debug_assert!(lo <= fault && fault < hi);
    let mut start = fault;
    while start > lo && !resident(start - 1) {
        start -= 1;
    }
    let mut end = fault + 1;
    while end < hi && !resident(end) {
        end += 1;
    }
    Run { first: start, count: end - start }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_resident_counts_only_new_pages() {
        let s = PageStates::new(1000);
        assert_eq!(s.set_resident(10, 100), 100);
        assert_eq!(s.set_resident(60, 100), 50);
        assert_eq!(s.set_resident(0, 64), 10);
        assert_eq!(s.count_resident(), 160);
        assert!(s.is_resident(159) && !s.is_resident(160));
        assert_eq!(s.set_resident(936, 64), 64);
        assert!(s.is_resident(999));
    }

    #[test]
    fn a_fault_in_an_empty_block_takes_the_whole_block() {
        let run = plan_run(700, 512, 1024, |_| false);
        assert_eq!(run, Run { first: 512, count: 512 });
    }

    #[test]
    fn the_run_stops_at_resident_pages() {
        let resident = |p: u64| p == 600 || p == 800;
        assert_eq!(plan_run(700, 512, 1024, resident), Run { first: 601, count: 199 });
        assert_eq!(plan_run(512, 512, 1024, resident), Run { first: 512, count: 88 });
    }

    #[test]
    fn the_budget_trims_from_the_fault_upwards() {
        let whole = plan_run(700, 512, 1024, |_| false);
        assert_eq!(whole.trim(700, 16), Some(Run { first: 700, count: 16 }));
        // near the block's end the window slides down to stay full
        assert_eq!(whole.trim(1020, 16), Some(Run { first: 1008, count: 16 }));
        assert_eq!(whole.trim(700, 0), None);
        assert_eq!(whole.trim(700, 10_000), Some(whole));
    }

    #[test]
    fn a_short_block_at_the_end_of_memory() {
        assert_eq!(plan_run(1030, 1024, 1040, |_| false), Run { first: 1024, count: 16 });
    }
}
