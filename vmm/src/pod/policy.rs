//! When a vCPU should follow its data: the migration policy of one node,
//! plain logic with no I/O (fed by the page engine, read by the vCPUs).
//!
//! A vCPU's state is a few KiB, about one page, while its working set may
//! be thousands of pages: when a vCPU keeps faulting on pages that one
//! other node holds, moving the vCPU there is cheaper than moving the
//! pages here. The policy keeps, per vCPU, the nodes its last
//! [`WINDOW`] remote faults pulled their bytes from; when at least
//! [`THRESHOLD`] of them came from one node, it says: move there.
//!
//! Hysteresis: the window starts empty on every node a vCPU arrives at
//! and after every decision, so a vCPU moves at most once per
//! [`THRESHOLD`] remote faults, and only towards a node that has just
//! served most of them. Faults on dormant pages (zero-filled here) and
//! faults served from this node's own memory never count: no data of
//! theirs lives elsewhere.

use std::collections::VecDeque;

use shoal_protocol::NodeId;

/// Remote faults remembered per vCPU.
pub const WINDOW: usize = 32;
/// How many of them must come from one node to move the vCPU there.
pub const THRESHOLD: usize = 24;

/// The policy's memory of one node's vCPUs.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    recent: Vec<VecDeque<NodeId>>,
}

impl Policy {
    /// A policy for `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Self {
        Policy { recent: vec![VecDeque::with_capacity(WINDOW); vcpus as usize] }
    }

    /// vCPU `vcpu`, running here, faulted on a page whose bytes came from
    /// `from`. Returns the node it should move to, if any.
    pub fn remote_fault(&mut self, vcpu: u32, from: NodeId) -> Option<NodeId> {
        let recent = self.recent.get_mut(vcpu as usize)?;
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back(from);
        let count = recent.iter().filter(|&&n| n == from).count();
        if count >= THRESHOLD {
            recent.clear();
            return Some(from);
        }
        None
    }

    /// vCPU `vcpu` arrived here (or left): its history starts again.
    pub fn reset(&mut self, vcpu: u32) {
        if let Some(r) = self.recent.get_mut(vcpu as usize) {
            r.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_follows_the_node_that_serves_most_of_its_faults() {
        let mut p = Policy::new(2);
        for i in 0..THRESHOLD - 1 {
            assert_eq!(p.remote_fault(0, 2), None, "fault {i}");
        }
        assert_eq!(p.remote_fault(0, 2), Some(2));
        // the other vCPU's history is its own
        assert_eq!(p.remote_fault(1, 2), None);
    }

    #[test]
    fn scattered_faults_move_nothing() {
        let mut p = Policy::new(1);
        for i in 0..10 * WINDOW as u32 {
            assert_eq!(p.remote_fault(0, 1 + i % 3), None);
        }
    }

    #[test]
    fn after_a_decision_a_whole_threshold_must_come_again() {
        let mut p = Policy::new(1);
        let decisions = (0..THRESHOLD * 3).filter(|_| p.remote_fault(0, 1).is_some()).count();
        assert_eq!(decisions, 3);
        p.reset(0);
        assert_eq!(p.remote_fault(0, 1), None);
        assert_eq!(p.remote_fault(7, 1), None, "an unknown vCPU is ignored");
    }
}
