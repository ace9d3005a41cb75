//! An exhaustive explorer of the vCPU roster ([`crate::roster`]): every
//! node runs the real [`Roster`]; messages between two nodes arrive in the
//! order they were sent (as the fabric guarantees per pair) but pairs
//! interleave in any order; vCPUs move and send IPIs at any time, up to a
//! bound. Every reachable state must satisfy:
//!
//! 1. **A vCPU is never lost or duplicated**: it runs on exactly one node,
//!    or exactly one migration of it is in flight (and then it runs
//!    nowhere).
//! 2. **No IPI is lost or doubled**: every IPI sent is taken by its vCPU's
//!    wait, posted to its mailbox on the node it runs on, or in flight
//!    (as an IPI, or carried by the vCPU's migration); none sits in a
//!    mailbox on a node the vCPU has left.
//! 3. **Rosters agree once the network is quiet**: every node names the
//!    node each vCPU runs on.

use std::collections::{HashSet, VecDeque};

use crate::roster::{RAction, RMsg, Roster, VcpuId};
use crate::NodeId;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    rosters: Vec<Roster>,
    /// chans[from][to], in order.
    chans: Vec<Vec<VecDeque<RMsg>>>,
    moves_left: u32,
    ipis_left: u32,
    ipis_sent: u64,
    ipis_taken: u64,
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Deliver(NodeId, NodeId),
    Move(VcpuId, NodeId),
    Ipi(NodeId, VcpuId),
    Take(NodeId, VcpuId),
}

/// What the exploration covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RosterCoverage {
    pub states: usize,
    pub quiet_states: usize,
    /// IPIs that reached a node the vCPU had left (and were forwarded).
    pub forwards_seen: bool,
    /// Migrations that carried pending IPIs.
    pub carried_seen: bool,
}

impl World {
    fn new(nodes: u32, placement: &[NodeId], moves: u32, ipis: u32) -> Self {
        let n = nodes as usize;
        World {
            rosters: (0..nodes).map(|i| Roster::new(i, nodes, placement)).collect(),
            chans: vec![vec![VecDeque::new(); n]; n],
            moves_left: moves,
            ipis_left: ipis,
            ipis_sent: 0,
            ipis_taken: 0,
        }
    }

    fn vcpus(&self) -> u32 {
        self.rosters[0].len() as u32
    }

    fn host(&self, v: VcpuId) -> Option<NodeId> {
        self.rosters.iter().position(|r| r.here(v)).map(|n| n as NodeId)
    }

    fn steps(&self) -> Vec<Step> {
        let n = self.rosters.len() as NodeId;
        let mut out = Vec::new();
        for from in 0..n {
            for to in 0..n {
                if !self.chans[from as usize][to as usize].is_empty() {
                    out.push(Step::Deliver(from, to));
                }
            }
        }
        for v in 0..self.vcpus() {
            let Some(h) = self.host(v) else { continue };
            if self.moves_left > 0 {
                for to in (0..n).filter(|&t| t != h) {
                    out.push(Step::Move(v, to));
                }
            }
            if self.rosters[h as usize].pending(v) > 0 {
                out.push(Step::Take(h, v));
            }
            // a vCPU running on h sends an IPI to any vCPU
            if self.ipis_left > 0 {
                for target in 0..self.vcpus() {
                    out.push(Step::Ipi(h, target));
                }
            }
        }
        out
    }

    fn apply(&mut self, node: NodeId, acts: Vec<RAction>, cov: &mut RosterCoverage) {
        for a in acts {
            if let RAction::Send { to, msg } = a {
                if let RMsg::Migrate { pending, .. } = msg {
                    cov.carried_seen |= pending > 0;
                }
                self.chans[node as usize][to as usize].push_back(msg);
            }
        }
    }

    fn step(&mut self, s: Step, cov: &mut RosterCoverage) -> Result<(), String> {
        match s {
            Step::Deliver(from, to) => {
                let msg = self.chans[from as usize][to as usize].pop_front().expect("a message");
                if let RMsg::Ipi { vcpu } = msg {
                    cov.forwards_seen |= !self.rosters[to as usize].here(vcpu);
                }
                let acts = self.rosters[to as usize].receive(from, msg).map_err(|e| e.to_string())?;
                self.apply(to, acts, cov);
            }
            Step::Move(v, to) => {
                self.moves_left -= 1;
                let h = self.host(v).expect("a host");
                let acts = self.rosters[h as usize].leave(v, to).map_err(|e| e.to_string())?;
                self.apply(h, acts, cov);
            }
            Step::Ipi(node, target) => {
                self.ipis_left -= 1;
                self.ipis_sent += 1;
                let acts = self.rosters[node as usize].ipi(target).ok_or("no such vCPU")?;
                self.apply(node, acts, cov);
            }
            Step::Take(node, v) => {
                self.ipis_taken += self.rosters[node as usize].take(v);
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        let quiet = self.chans.iter().flatten().all(VecDeque::is_empty);
        let mut accounted = self.ipis_taken;
        for v in 0..self.vcpus() {
            let hosts = self.rosters.iter().filter(|r| r.here(v)).count();
            let mut flying = 0;
            for m in self.chans.iter().flatten().flatten() {
                match *m {
                    RMsg::Migrate { vcpu, pending, .. } if vcpu == v => {
                        flying += 1;
                        accounted += pending;
                    }
                    RMsg::Ipi { vcpu } if vcpu == v => accounted += 1,
                    _ => {}
                }
            }
            if hosts + flying != 1 {
                return Err(format!("vCPU {v} runs on {hosts} node(s) with {flying} migration(s) in flight"));
            }
            for (n, r) in self.rosters.iter().enumerate() {
                if r.here(v) {
                    accounted += r.pending(v);
                } else if r.pending(v) > 0 {
                    return Err(format!("node {n} keeps IPIs for vCPU {v}, which is not there"));
                }
            }
            if quiet {
                let h = self.host(v).expect("quiet: the vCPU runs somewhere");
                if let Some(n) = self.rosters.iter().position(|r| r.location(v) != Some(h)) {
                    return Err(format!(
                        "quiet, vCPU {v} runs on node {h}, node {n} names {:?}",
                        self.rosters[n].location(v)
                    ));
                }
            }
        }
        if accounted != self.ipis_sent {
            return Err(format!("{} IPIs sent, {accounted} accounted for", self.ipis_sent));
        }
        Ok(())
    }
}

/// Explores every state of `nodes` nodes with vCPUs placed as `placement`,
/// up to `moves` migrations and `ipis` IPIs in all.
pub fn explore_roster(nodes: u32, placement: &[NodeId], moves: u32, ipis: u32) -> Result<RosterCoverage, String> {
    let start = World::new(nodes, placement, moves, ipis);
    let mut seen = HashSet::new();
    let mut stack = vec![(start.clone(), Vec::<String>::new())];
    seen.insert(start);
    let mut cov = RosterCoverage::default();
    while let Some((w, trace)) = stack.pop() {
        cov.states += 1;
        w.check().map_err(|e| format!("{e}\nafter: {}", trace.join(", ")))?;
        if w.chans.iter().flatten().all(VecDeque::is_empty) {
            cov.quiet_states += 1;
        }
        for s in w.steps() {
            let mut next = w.clone();
            next.step(s, &mut cov).map_err(|e| format!("{e}\nafter: {}, {s:?}", trace.join(", ")))?;
            if seen.insert(next.clone()) {
                let mut t = trace.clone();
                t.push(format!("{s:?}"));
                stack.push((next, t));
            }
        }
    }
    Ok(cov)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_two_vcpus() {
        let c = explore_roster(2, &[0, 1], 3, 3).unwrap();
        assert!(c.carried_seen && c.forwards_seen, "{c:?}");
    }

    #[test]
    fn a_roster_that_forgets_pending_ipis_is_caught() {
        // sabotage: a migration that drops the IPIs it should carry is
        // found as a lost IPI (the check counts what the messages carry)
        let mut w = World::new(2, &[0], 1, 1);
        let mut cov = RosterCoverage::default();
        w.step(Step::Ipi(0, 0), &mut cov).unwrap();
        w.step(Step::Move(0, 1), &mut cov).unwrap();
        if let Some(RMsg::Migrate { pending, .. }) = w.chans[0][1].front_mut() {
            *pending = 0;
        }
        assert!(w.check().unwrap_err().contains("1 IPIs sent, 0 accounted"));
    }
}
