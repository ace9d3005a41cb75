//! The vCPU roster (`shoal_protocol::roster::Roster`) fed messages from
//! peers that may send anything (`receive`), between the calls its own
//! node makes (`ipi` and `leave` with what a guest's hypercalls ask,
//! `take`): every call ends with actions or an error, never a panic, and
//! what the roster says stays within the pod.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shoal_protocol::roster::{RAction, RMsg, Roster, VcpuId};
use shoal_protocol::NodeId;

#[derive(Arbitrary, Debug)]
enum Msg {
    Migrate { vcpu: VcpuId, moves: u64, pending: u64 },
    Location { vcpu: VcpuId, node: NodeId, moves: u64 },
    Ipi { vcpu: VcpuId },
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A message from a peer (any sender id, any contents).
    Receive { from: NodeId, msg: Msg },
    /// A vCPU here sends an IPI (the guest names the target).
    Ipi { vcpu: VcpuId },
    /// A vCPU here leaves (the guest names the target node).
    Leave { vcpu: VcpuId, to: NodeId },
    /// A vCPU's wait hypercall takes its IPIs.
    Take { vcpu: VcpuId },
}

#[derive(Arbitrary, Debug)]
struct Input {
    me: u8,
    nodes: u8,
    placement: Vec<u8>,
    ops: Vec<Op>,
}

/// Small ids stay likely: most of the input then names vCPUs and nodes
/// that exist, and some name ones that do not.
fn small(v: u32) -> u32 {
    if v & 0x8000_0000 != 0 {
        v
    } else {
        v % 8
    }
}

fuzz_target!(|input: Input| {
    let nodes = u32::from(input.nodes % 8) + 1;
    let me = u32::from(input.me) % nodes;
    let placement: Vec<NodeId> = input.placement.iter().take(16).map(|&n| u32::from(n) % nodes).collect();
    let mut roster = Roster::new(me, nodes, &placement);
    for op in input.ops {
        let actions = match op {
            Op::Receive { from, msg } => {
                let msg = match msg {
                    Msg::Migrate { vcpu, moves, pending } => RMsg::Migrate { vcpu: small(vcpu), moves, pending },
                    Msg::Location { vcpu, node, moves } => {
                        RMsg::Location { vcpu: small(vcpu), node: small(node), moves }
                    }
                    Msg::Ipi { vcpu } => RMsg::Ipi { vcpu: small(vcpu) },
                };
                roster.receive(small(from), msg).unwrap_or_default()
            }
            Op::Ipi { vcpu } => roster.ipi(small(vcpu)).unwrap_or_default(),
            Op::Leave { vcpu, to } => roster.leave(small(vcpu), small(to)).unwrap_or_default(),
            Op::Take { vcpu } => {
                roster.take(small(vcpu));
                Vec::new()
            }
        };
        for a in &actions {
            match a {
                RAction::Send { to, msg } => {
                    assert!(*to < nodes && *to != me, "{a:?} from node {me} of {nodes}");
                    if let RMsg::Location { node, .. } = msg {
                        assert!(*node < nodes);
                    }
                }
                RAction::Posted { vcpu } | RAction::Arrived { vcpu } => assert!(roster.here(*vcpu), "{a:?}"),
            }
        }
        for v in 0..roster.len() as u32 {
            assert!(roster.location(v).is_some_and(|n| n < nodes));
        }
    }
});
