//! A peer that sends arbitrary well-formed messages: the protocol answers
//! each with actions or an error, never a panic, whatever state it is in
//! and whatever the messages claim (pages and nodes in range or not,
//! answers to nothing, transactions that never began). The VMM ends the
//! pod on the first error, naming the peer (see the pod engine).

use crate::{Access, Action, Config, Msg, Node};
use proptest::prelude::*;

/// Pages 0..16 exist; 16..20 do not. Nodes 0..3 exist; 3 does not.
fn msg() -> impl Strategy<Value = Msg> {
    crate::strategies::msg(0u64..20, 0u32..4, 0u64..4, 0..=5)
}

/// What the node itself does between messages.
#[derive(Clone, Debug)]
enum Local {
    Fault(u64, Access),
    Evict(u64, Option<u32>),
    /// Drop a read copy (memory pressure).
    Unshare(u64),
    /// Answer the oldest Fetch or Offer the node asked for.
    Complete(bool),
    Message(Msg),
}

fn step() -> impl Strategy<Value = Local> {
    prop_oneof![
        (0u64..16, crate::strategies::access()).prop_map(|(p, a)| Local::Fault(p, a)),
        (0u64..16, prop::option::of(0u32..3)).prop_map(|(p, t)| Local::Evict(p, t)),
        (0u64..16).prop_map(Local::Unshare),
        any::<bool>().prop_map(Local::Complete),
        msg().prop_map(Local::Message),
        msg().prop_map(Local::Message),
        msg().prop_map(Local::Message),
    ]
}

/// Whether accepting `msg` kept to what a peer may make a node do: a page
/// arrives only as the answer to our request (a block's grant answers
/// one page and brings its dormant neighbours; an eviction's Ready is
/// the one exception, and the VMM takes that only from the page's home),
/// and only the node we hand a page to may say it has it.
fn honest_effect(before: &Node, after: &Node, msg: &Msg) -> Result<(), String> {
    let asked = |p: u64| before.local(p).requested;
    match *msg {
        Msg::Ready { page, evict: false, .. } if !asked(page) => Err(format!("took {msg:?} unasked")),
        Msg::Grant { answers, .. } if !asked(answers) => Err(format!("took {msg:?} unasked")),
        Msg::Fetched { page, from, .. }
            if before.local(page).handing != Some(from)
                && !(before.local(page).parked && from == before.config.home(page)) =>
        {
            Err(format!("dropped page {page} on {msg:?}, handing it to {:?}", before.local(page).handing))
        }
        // an answer to our request (checked above), or an eviction (the
        // engine takes those only from the page's home)
        Msg::Ready { .. } | Msg::Grant { .. } => Ok(()),
        _ => {
            for p in msg.pages().into_iter().filter(|&p| p < before.config.pages) {
                let (b, a) = (before.local(p), after.local(p));
                if (!b.owner && a.owner) || (b.copy == Default::default() && a.copy != Default::default()) {
                    return Err(format!("{msg:?} gave page {p}: {b:?} -> {a:?}"));
                }
            }
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Never a panic, and what is accepted is honest (`honest_effect`):
    /// this fails on a protocol that takes a Ready it did not ask for.
    #[test]
    fn arbitrary_messages_never_panic_the_protocol_nor_give_pages_unasked(
        me in 0u32..3,
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let config = Config::new(3, 4, 16).unwrap();
        let mut node = Node::new(me, config);
        // a start like a pod's: the loader's page 0 owned by node 0
        node.preload(0, 0).unwrap();
        let mut pending: Vec<Action> = Vec::new();
        for s in steps {
            let before = node.clone();
            let message = if let Local::Message(m) = &s { Some(m.clone()) } else { None };
            // the VMM refuses a message in our own name (a message's sender
            // is the connection it came on): it never reaches the protocol
            if message.as_ref().is_some_and(|m| m.claimed_sender() == Some(me)) {
                continue;
            }
            let result = match s {
                Local::Fault(p, a) => node.fault(p, a),
                Local::Evict(p, t) => node.evict(p, t),
                Local::Unshare(p) => node.unshare(p),
                Local::Message(m) => node.receive(m),
                Local::Complete(zero) => match pending.iter().position(|a| matches!(a, Action::Fetch(_) | Action::Offer { .. })) {
                    Some(i) => match pending.remove(i) {
                        Action::Fetch(f) => node.fetched(f.page, f.from, f.transfer, f.evict, f.epoch, 9),
                        Action::Offer { page, to, transfer, evict, epoch } => node.offer(page, to, transfer, evict, epoch, zero, 7, 5),
                        _ => unreachable!(),
                    },
                    None => Ok(Vec::new()),
                },
            };
            // an error is the VMM's cue to end the pod: stop there
            match result {
                Ok(acts) => {
                    if let Some(m) = &message {
                        if let Err(e) = honest_effect(&before, &node, m) {
                            prop_assert!(false, "node {}: {}", me, e);
                        }
                    }
                    pending.extend(acts)
                }
                Err(_) => break,
            }
        }
    }
}
