//! Where each vCPU is, and IPIs that find it: the cross-node vCPU protocol
//! of a pod as plain logic, no I/O (the VMM's `vcpus.rs` carries out its
//! actions; the model checker in [`crate::roster_model`] explores it).
//!
//! Every node keeps a [`Roster`]: for every vCPU the node it last heard
//! the vCPU is on, with the count of moves that told it so, and for the
//! vCPUs here their mailbox of IPIs not yet taken.
//!
//! - An IPI is posted to the mailbox when the vCPU is here, else sent to
//!   the node the roster names, which forwards it the same way.
//! - A vCPU leaving takes its pending IPIs with it ([`RMsg::Migrate`]);
//!   the roster then names the target, so IPIs arriving later follow it.
//! - The target takes the vCPU and its IPIs, and tells every node but the
//!   one it came from where the vCPU is now ([`RMsg::Location`]); a
//!   location with fewer moves than the roster knows is old and ignored.
//!
//! Messages between two nodes arrive in the order they were sent (every
//! fabric backend keeps it: one stream, or one RC queue pair, per pair);
//! that is what keeps a forwarded IPI behind the vCPU it chases.

use crate::NodeId;

/// A vCPU of the VM.
pub type VcpuId = u32;

/// What nodes tell each other about vCPUs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RMsg {
    /// The vCPU moves to the receiver (its state travels beside this),
    /// with the IPIs posted to it and not taken.
    Migrate { vcpu: VcpuId, moves: u64, pending: u64 },
    /// The vCPU is on `node`, after `moves` moves.
    Location { vcpu: VcpuId, node: NodeId, moves: u64 },
    /// An IPI for the vCPU.
    Ipi { vcpu: VcpuId },
}

/// What the VMM must do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RAction {
    Send {
        to: NodeId,
        msg: RMsg,
    },
    /// IPIs were posted to this vCPU's mailbox here: wake it if it waits.
    Posted {
        vcpu: VcpuId,
    },
    /// The vCPU arrived: run it here.
    Arrived {
        vcpu: VcpuId,
    },
}

/// A peer broke the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RError {
    #[error("node {from} named vCPU {vcpu}, which does not exist")]
    NoSuchVcpu { from: NodeId, vcpu: VcpuId },
    #[error("node {from} named node {node}, outside the pod")]
    NoSuchNode { from: NodeId, node: NodeId },
    #[error("node {from} sent vCPU {vcpu}, which runs here already")]
    AlreadyHere { from: NodeId, vcpu: VcpuId },
    #[error("vCPU {vcpu} does not run on node {node}")]
    NotHere { node: NodeId, vcpu: VcpuId },
    #[error("node {from} said vCPU {vcpu} runs on node {node}: only the node a vCPU arrived at says where it is")]
    NotItsOwn { from: NodeId, vcpu: VcpuId, node: NodeId },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Entry {
    location: NodeId,
    moves: u64,
    pending: u64,
}

/// One node's view of the VM's vCPUs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Roster {
    me: NodeId,
    nodes: u32,
    vcpus: Vec<Entry>,
}

impl Roster {
    /// The roster of node `me` in a pod of `nodes`, every vCPU on its
    /// `placement` node.
    pub fn new(me: NodeId, nodes: u32, placement: &[NodeId]) -> Self {
        Roster {
            me,
            nodes,
            vcpus: placement.iter().map(|&location| Entry { location, moves: 0, pending: 0 }).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Whether `vcpu` runs here.
    pub fn here(&self, vcpu: VcpuId) -> bool {
        self.vcpus.get(vcpu as usize).is_some_and(|e| e.location == self.me)
    }

    /// The node the roster names for `vcpu`.
    pub fn location(&self, vcpu: VcpuId) -> Option<NodeId> {
        self.vcpus.get(vcpu as usize).map(|e| e.location)
    }

    /// IPIs posted to `vcpu` here and not taken.
    pub fn pending(&self, vcpu: VcpuId) -> u64 {
        self.vcpus.get(vcpu as usize).map_or(0, |e| e.pending)
    }

    /// Takes the IPIs posted to `vcpu` (its wait hypercall).
    pub fn take(&mut self, vcpu: VcpuId) -> u64 {
        self.vcpus.get_mut(vcpu as usize).map_or(0, |e| std::mem::take(&mut e.pending))
    }

    /// A vCPU here sends an IPI to `vcpu`; None when there is no such vCPU.
    pub fn ipi(&mut self, vcpu: VcpuId) -> Option<Vec<RAction>> {
        self.vcpus.get(vcpu as usize)?;
        Some(self.deliver(vcpu))
    }

    fn deliver(&mut self, vcpu: VcpuId) -> Vec<RAction> {
        let me = self.me;
        let e = &mut self.vcpus[vcpu as usize];
        if e.location == me {
            // saturating: a peer's Migrate may have brought any count
            e.pending = e.pending.saturating_add(1);
            vec![RAction::Posted { vcpu }]
        } else {
            vec![RAction::Send { to: e.location, msg: RMsg::Ipi { vcpu } }]
        }
    }

    /// `vcpu`, here, leaves for `to`: its IPIs go with it, later ones
    /// follow it.
    pub fn leave(&mut self, vcpu: VcpuId, to: NodeId) -> Result<Vec<RAction>, RError> {
        if !self.here(vcpu) {
            return Err(RError::NotHere { node: self.me, vcpu });
        }
        if to >= self.nodes {
            return Err(RError::NoSuchNode { from: self.me, node: to });
        }
        if to == self.me {
            return Ok(Vec::new());
        }
        let e = &mut self.vcpus[vcpu as usize];
        e.location = to;
        // saturating: the count came from a peer's Migrate, which may
        // carry any value
        e.moves = e.moves.saturating_add(1);
        let pending = std::mem::take(&mut e.pending);
        Ok(vec![RAction::Send { to, msg: RMsg::Migrate { vcpu, moves: e.moves, pending } }])
    }

    /// A message from `from`.
    pub fn receive(&mut self, from: NodeId, msg: RMsg) -> Result<Vec<RAction>, RError> {
        let vcpu = match msg {
            RMsg::Migrate { vcpu, .. } | RMsg::Location { vcpu, .. } | RMsg::Ipi { vcpu } => vcpu,
        };
        if vcpu as usize >= self.vcpus.len() {
            return Err(RError::NoSuchVcpu { from, vcpu });
        }
        match msg {
            RMsg::Ipi { vcpu } => Ok(self.deliver(vcpu)),
            RMsg::Location { vcpu, node, moves } => {
                if node >= self.nodes {
                    return Err(RError::NoSuchNode { from, node });
                }
                // the node a vCPU arrived at is the one that says so (a
                // location naming another node, this one above all, would
                // make IPIs vanish into a mailbox nobody takes)
                if node != from {
                    return Err(RError::NotItsOwn { from, vcpu, node });
                }
                let me = self.me;
                let e = &mut self.vcpus[vcpu as usize];
                // an older location, or one about a vCPU that has since
                // come here, changes nothing
                if moves > e.moves && e.location != me {
                    e.location = node;
                    e.moves = moves;
                }
                Ok(Vec::new())
            }
            RMsg::Migrate { vcpu, moves, pending } => {
                let me = self.me;
                let nodes = self.nodes;
                let e = &mut self.vcpus[vcpu as usize];
                if e.location == me {
                    return Err(RError::AlreadyHere { from, vcpu });
                }
                e.location = me;
                e.moves = moves;
                e.pending = e.pending.saturating_add(pending);
                let mut out = vec![RAction::Arrived { vcpu }];
                if e.pending > 0 {
                    out.push(RAction::Posted { vcpu });
                }
                for n in (0..nodes).filter(|&n| n != me && n != from) {
                    out.push(RAction::Send { to: n, msg: RMsg::Location { vcpu, node: me, moves } });
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipi_follows_a_vcpu_that_moved() {
        let mut a = Roster::new(0, 3, &[0, 1]);
        let mut b = Roster::new(1, 3, &[0, 1]);
        let mut c = Roster::new(2, 3, &[0, 1]);
        // vCPU 1 moves from node 1 to node 0
        let acts = b.leave(1, 0).unwrap();
        assert_eq!(acts, vec![RAction::Send { to: 0, msg: RMsg::Migrate { vcpu: 1, moves: 1, pending: 0 } }]);
        // node 2 still thinks it is on node 1: its IPI is forwarded
        let acts = c.ipi(1).unwrap();
        assert_eq!(acts, vec![RAction::Send { to: 1, msg: RMsg::Ipi { vcpu: 1 } }]);
        let fwd = b.receive(2, RMsg::Ipi { vcpu: 1 }).unwrap();
        assert_eq!(fwd, vec![RAction::Send { to: 0, msg: RMsg::Ipi { vcpu: 1 } }]);
        let arrived = a.receive(1, RMsg::Migrate { vcpu: 1, moves: 1, pending: 0 }).unwrap();
        assert!(arrived.contains(&RAction::Arrived { vcpu: 1 }));
        assert!(arrived.contains(&RAction::Send { to: 2, msg: RMsg::Location { vcpu: 1, node: 0, moves: 1 } }));
        assert_eq!(a.receive(1, RMsg::Ipi { vcpu: 1 }).unwrap(), vec![RAction::Posted { vcpu: 1 }]);
        assert_eq!(a.take(1), 1);
        c.receive(0, RMsg::Location { vcpu: 1, node: 0, moves: 1 }).unwrap();
        assert_eq!(c.location(1), Some(0));
        // an older location is ignored
        c.receive(1, RMsg::Location { vcpu: 1, node: 1, moves: 0 }).unwrap();
        assert_eq!(c.location(1), Some(0));
    }

    #[test]
    fn pending_ipis_move_with_the_vcpu() {
        let mut a = Roster::new(0, 2, &[0]);
        let mut b = Roster::new(1, 2, &[0]);
        a.ipi(0).unwrap();
        a.ipi(0).unwrap();
        let acts = a.leave(0, 1).unwrap();
        let RAction::Send { msg, .. } = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(*msg, RMsg::Migrate { vcpu: 0, moves: 1, pending: 2 });
        b.receive(0, msg.clone()).unwrap();
        assert_eq!(b.pending(0), 2);
        assert_eq!(a.pending(0), 0);
    }

    #[test]
    fn counts_from_a_peer_at_their_limit_do_not_overflow() {
        // found by fuzz/ (roster): a Migrate bringing u64::MAX pending
        // IPIs, then one more IPI, overflowed the mailbox's count
        let mut a = Roster::new(0, 2, &[1]);
        a.receive(1, RMsg::Migrate { vcpu: 0, moves: u64::MAX, pending: u64::MAX }).unwrap();
        assert_eq!(a.ipi(0).unwrap(), vec![RAction::Posted { vcpu: 0 }]);
        assert_eq!(a.receive(1, RMsg::Ipi { vcpu: 0 }).unwrap(), vec![RAction::Posted { vcpu: 0 }]);
        assert_eq!(a.pending(0), u64::MAX);
        // and leaving after u64::MAX moves
        let acts = a.leave(0, 1).unwrap();
        assert_eq!(
            acts,
            vec![RAction::Send { to: 1, msg: RMsg::Migrate { vcpu: 0, moves: u64::MAX, pending: u64::MAX } }]
        );
        // a vCPU that left and comes back with more pending IPIs
        let mut b = Roster::new(1, 2, &[1]);
        b.ipi(0).unwrap();
        b.leave(0, 0).unwrap();
        b.receive(0, RMsg::Migrate { vcpu: 0, moves: 2, pending: u64::MAX }).unwrap();
        assert_eq!(b.pending(0), u64::MAX);
    }

    #[test]
    fn bad_messages_are_errors() {
        let mut a = Roster::new(0, 2, &[0, 1]);
        assert!(a.receive(1, RMsg::Ipi { vcpu: 9 }).is_err());
        assert!(a.receive(1, RMsg::Location { vcpu: 1, node: 5, moves: 3 }).is_err());
        // only the node a vCPU arrived at says where it is
        assert!(a.receive(1, RMsg::Location { vcpu: 1, node: 0, moves: 3 }).is_err());
        assert!(a.here(0) && !a.here(1));
        assert!(a.receive(1, RMsg::Migrate { vcpu: 0, moves: 1, pending: 0 }).is_err(), "vCPU 0 is here");
        assert!(a.leave(1, 0).is_err(), "vCPU 1 is not here");
        assert!(a.leave(0, 7).is_err());
        assert!(a.ipi(5).is_none());
    }
}
