//! A peer that sends arbitrary well-formed messages: the protocol answers
//! each with actions or an error, never a panic, whatever state it is in
//! and whatever the messages claim (pages and nodes in range or not,
//! answers to nothing, transactions that never began). The VMM ends the
//! pod on the first error, naming the peer (see the pod engine).

use proptest::prelude::*;
use shoal_protocol::{Access, Action, Config, Msg, Node};

/// Pages 0..16 exist; 16..20 do not. Nodes 0..3 exist; 3 does not.
fn msg() -> impl Strategy<Value = Msg> {
    let p = 0u64..20;
    let n = 0u32..4;
    let b = any::<bool>();
    let e = 0u64..4;
    let access = prop_oneof![Just(Access::Read), Just(Access::Write)];
    prop_oneof![
        (p.clone(), access, n.clone()).prop_map(|(page, access, from)| Msg::Request { page, access, from }),
        prop::collection::vec((p.clone(), e.clone()), 0..6).prop_map(|pages| Msg::Grant { pages }),
        (prop::collection::vec(p.clone(), 0..6), n.clone()).prop_map(|(pages, from)| Msg::GrantDone { pages, from }),
        (p.clone(), n.clone()).prop_map(|(page, to)| Msg::Share { page, to }),
        (p.clone(), n.clone(), b, e.clone()).prop_map(|(page, to, evict, epoch)| Msg::Transfer {
            page,
            to,
            evict,
            epoch
        }),
        p.clone().prop_map(|page| Msg::Upgrade { page }),
        (p.clone(), n.clone(), b, b, b, e.clone()).prop_map(|(page, from, dormant, transfer, evict, epoch)| {
            Msg::Ready { page, from, dormant, transfer, evict, epoch }
        }),
        (p.clone(), n.clone()).prop_map(|(page, from)| Msg::Fetched { page, from }),
        (p.clone(), n.clone()).prop_map(|(page, from)| Msg::Done { page, from }),
        p.clone().prop_map(|page| Msg::Inval { page }),
        (p.clone(), n.clone()).prop_map(|(page, from)| Msg::InvalAck { page, from }),
        (p.clone(), n.clone(), n.clone(), e.clone()).prop_map(|(page, from, to, epoch)| Msg::Evict {
            page,
            from,
            to,
            epoch
        }),
        (p.clone(), n.clone(), e).prop_map(|(page, from, epoch)| Msg::Redormant { page, from, epoch }),
        p.clone().prop_map(|page| Msg::Refused { page }),
        p.clone().prop_map(|page| Msg::Dormanted { page }),
        (p.clone(), n.clone()).prop_map(|(page, from)| Msg::Free { page, from }),
        p.clone().prop_map(|page| Msg::Forget { page }),
        p.prop_map(|page| Msg::Freed { page }),
    ]
}

/// What the node itself does between messages.
#[derive(Clone, Debug)]
enum Local {
    Fault(u64, Access),
    Evict(u64, Option<u32>),
    /// Answer the oldest Fetch or Offer the node asked for.
    Complete(bool),
    Message(Msg),
}

fn step() -> impl Strategy<Value = Local> {
    let access = prop_oneof![Just(Access::Read), Just(Access::Write)];
    prop_oneof![
        (0u64..16, access).prop_map(|(p, a)| Local::Fault(p, a)),
        (0u64..16, prop::option::of(0u32..3)).prop_map(|(p, t)| Local::Evict(p, t)),
        any::<bool>().prop_map(Local::Complete),
        msg().prop_map(Local::Message),
        msg().prop_map(Local::Message),
        msg().prop_map(Local::Message),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_messages_never_panic_the_protocol(me in 0u32..3, steps in prop::collection::vec(step(), 1..40)) {
        let config = Config::new(3, 4, 16).unwrap();
        let mut node = Node::new(me, config);
        // a start like a pod's: the loader's page 0 owned by node 0
        node.preload(0, 0).unwrap();
        let mut pending: Vec<Action> = Vec::new();
        for s in steps {
            let result = match s {
                Local::Fault(p, a) => node.fault(p, a),
                Local::Evict(p, t) => node.evict(p, t),
                Local::Message(m) => node.receive(m),
                Local::Complete(zero) => match pending.iter().position(|a| matches!(a, Action::Fetch { .. } | Action::Offer { .. })) {
                    Some(i) => match pending.remove(i) {
                        Action::Fetch { page, from, transfer, evict, epoch } => node.fetched(page, from, transfer, evict, epoch),
                        Action::Offer { page, to, transfer, evict, epoch } => node.offer(page, to, transfer, evict, epoch, zero),
                        _ => unreachable!(),
                    },
                    None => Ok(Vec::new()),
                },
            };
            // an error is the VMM's cue to end the pod: stop there
            match result {
                Ok(acts) => pending.extend(acts),
                Err(_) => break,
            }
        }
    }
}
