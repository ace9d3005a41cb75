//! When a vCPU should follow its data: the migration policy of one node,
//! plain logic with no I/O (fed by the page engine, read by the vCPUs).
//!
//! A vCPU's state is a few KiB, about one page, while its working set may
//! be thousands of pages: when a vCPU keeps faulting on pages that one
//! other node holds, moving the vCPU there is cheaper than moving the
//! pages here. The policy keeps, per vCPU, its last [`WINDOW`] remote
//! faults: the node each one pulled its bytes from and the page. It
//! says "move to node N" when
//!
//! - at least [`THRESHOLD`] of them came from N (N holds the data this
//!   vCPU works on now), and
//! - they were on at least [`MIN_PAGES`] different pages: a few pages
//!   fetched again and again are pages other vCPUs write too (a lock, a
//!   shared counter). Moving towards them moves the contention, not the
//!   vCPU to its data; those stay where they are.
//!
//! Hysteresis, so vCPUs do not thrash: the window starts empty on every
//! node a vCPU arrives at and after every decision (a vCPU moves at most
//! once per [`THRESHOLD`] remote faults), and going straight back to the
//! node it came from takes the whole window ([`WINDOW`] faults out of
//! [`WINDOW`], on as many distinct pages as a move needs). Faults on
//! dormant pages (zero-filled here) and on pages this node evicted and
//! takes back never count: no data of theirs lives elsewhere.

use std::collections::{BTreeSet, VecDeque};

use shoal_protocol::{NodeId, Page};

/// Remote faults remembered per vCPU.
pub const WINDOW: usize = 32;
/// How many of them must come from one node to move the vCPU there.
pub const THRESHOLD: usize = 24;
/// How many different pages those faults must be on.
pub const MIN_PAGES: usize = 12;

/// One vCPU's memory.
#[derive(Clone, Debug, Default)]
struct History {
    recent: VecDeque<(NodeId, Page)>,
    /// The node the vCPU came from, when it arrived by migration.
    came_from: Option<NodeId>,
}

/// The policy's memory of one node's vCPUs.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    vcpus: Vec<History>,
}

impl Policy {
    /// A policy for `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Self {
        let empty = History { recent: VecDeque::with_capacity(WINDOW), came_from: None };
        Policy { vcpus: vec![empty; vcpus as usize] }
    }

    /// vCPU `vcpu`, running here, faulted on `page`, whose bytes came from
    /// `from`. Returns the node it should move to, if any.
    pub fn remote_fault(&mut self, vcpu: u32, from: NodeId, page: Page) -> Option<NodeId> {
        let h = self.vcpus.get_mut(vcpu as usize)?;
        if h.recent.len() == WINDOW {
            h.recent.pop_front();
        }
        h.recent.push_back((from, page));
        let needed = if h.came_from == Some(from) { WINDOW } else { THRESHOLD };
        let theirs = h.recent.iter().filter(|(n, _)| *n == from);
        if theirs.clone().count() < needed {
            return None;
        }
        let pages: BTreeSet<Page> = theirs.map(|&(_, p)| p).collect();
        if pages.len() < MIN_PAGES {
            return None;
        }
        h.recent.clear();
        Some(from)
    }

    /// vCPU `vcpu` arrived here from `from` (None: it leaves, or starts):
    /// its history starts again.
    pub fn reset(&mut self, vcpu: u32, from: Option<NodeId>) {
        if let Some(h) = self.vcpus.get_mut(vcpu as usize) {
            h.recent.clear();
            h.came_from = from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` faults of `vcpu` on pages from `from`, page numbers from
    /// `first` on (each a different page); the decisions they made.
    fn faults(p: &mut Policy, vcpu: u32, from: NodeId, first: Page, n: usize) -> Vec<NodeId> {
        (0..n as Page).filter_map(|i| p.remote_fault(vcpu, from, first + i)).collect()
    }

    #[test]
    fn a_vcpu_follows_the_node_that_serves_most_of_its_faults() {
        let mut p = Policy::new(2);
        assert!(faults(&mut p, 0, 2, 100, THRESHOLD - 1).is_empty());
        assert_eq!(p.remote_fault(0, 2, 900), Some(2));
        // the other vCPU's history is its own
        assert_eq!(p.remote_fault(1, 2, 900), None);
    }

    #[test]
    fn scattered_faults_move_nothing() {
        let mut p = Policy::new(1);
        for i in 0..10 * WINDOW as u32 {
            assert_eq!(p.remote_fault(0, 1 + i % 3, Page::from(i)), None);
        }
    }

    /// A few pages bounced between nodes (a shared counter, a lock) are
    /// contention, not data: the vCPU stays.
    #[test]
    fn a_few_contended_pages_move_nothing() {
        let mut p = Policy::new(1);
        for i in 0..10 * WINDOW as Page {
            assert_eq!(p.remote_fault(0, 1, i % (MIN_PAGES as Page - 1)), None);
        }
        // many pages from there: that is data
        assert_eq!(faults(&mut p, 0, 1, 1000, THRESHOLD), vec![1]);
    }

    #[test]
    fn after_a_decision_a_whole_threshold_must_come_again() {
        let mut p = Policy::new(1);
        assert_eq!(faults(&mut p, 0, 1, 0, THRESHOLD * 3).len(), 3);
        p.reset(0, None);
        assert_eq!(p.remote_fault(0, 1, 5), None);
        assert_eq!(p.remote_fault(7, 1, 5), None, "an unknown vCPU is ignored");
    }

    /// Back to the node it came from only on the whole window: a vCPU
    /// whose data is split between two nodes does not bounce between them.
    #[test]
    fn going_back_where_it_came_from_takes_the_whole_window() {
        let mut p = Policy::new(1);
        p.reset(0, Some(3));
        // THRESHOLD from node 3 would move it anywhere else; not back
        assert!(faults(&mut p, 0, 3, 0, THRESHOLD).is_empty());
        assert_eq!(faults(&mut p, 0, 3, 100, WINDOW - THRESHOLD), vec![3]);
        // a mixed window never takes it back
        let mut p = Policy::new(1);
        p.reset(0, Some(3));
        for i in 0..10 * WINDOW as Page {
            let from = if i % 8 == 0 { 1 } else { 3 };
            assert_eq!(p.remote_fault(0, from, i), None, "fault {i}");
        }
    }
}
