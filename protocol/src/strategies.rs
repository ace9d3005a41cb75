//! Any well-formed page message, for property tests: the codec's round
//! trips (every field over its whole range) and the hostile peer (pages,
//! nodes and epochs from small ranges, some just outside the pod, so that
//! messages meet the state they claim to answer).

use std::ops::RangeInclusive;

use proptest::prelude::*;

use crate::{Access, Msg};

pub fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Read), Just(Access::Write)]
}

/// Messages whose pages come from `p`, nodes from `n` and epochs from `e`
/// (every other number is any u64); page lists have `list` entries.
pub fn msg<P, N, E>(p: P, n: N, e: E, list: RangeInclusive<usize>) -> impl Strategy<Value = Msg>
where
    P: Strategy<Value = u64> + Clone + 'static,
    N: Strategy<Value = u32> + Clone + 'static,
    E: Strategy<Value = u64> + Clone + 'static,
{
    let b = any::<bool>();
    let x = any::<u64>();
    prop_oneof![
        (p.clone(), access(), n.clone(), x).prop_map(|(page, access, from, since)| Msg::Request {
            page,
            access,
            from,
            since
        }),
        (p.clone(), prop::collection::vec((p.clone(), e.clone()), list.clone()))
            .prop_map(|(answers, pages)| Msg::Grant { answers, pages }),
        (p.clone(), n.clone(), n.clone(), b, e.clone(), x, x).prop_map(
            |(page, from, to, dormant, epoch, digest, key)| Msg::Evicted {
                page,
                from,
                to,
                dormant,
                epoch,
                digest,
                key
            }
        ),
        (prop::collection::vec(p.clone(), list), n.clone()).prop_map(|(pages, from)| Msg::GrantDone { pages, from }),
        (p.clone(), n.clone(), x).prop_map(|(page, to, since)| Msg::Share { page, to, since }),
        (p.clone(), n.clone(), b, e.clone(), x).prop_map(|(page, to, evict, epoch, since)| Msg::Transfer {
            page,
            to,
            evict,
            epoch,
            since
        }),
        p.clone().prop_map(|page| Msg::Upgrade { page }),
        (p.clone(), n.clone(), b, b, b, e.clone(), x, x).prop_map(
            |(page, from, dormant, transfer, evict, epoch, digest, key)| Msg::Ready {
                page,
                from,
                dormant,
                transfer,
                evict,
                epoch,
                digest,
                key
            }
        ),
        (p.clone(), n.clone(), x).prop_map(|(page, from, key)| Msg::Fetched { page, from, key }),
        (p.clone(), n.clone(), x).prop_map(|(page, from, key)| Msg::Done { page, from, key }),
        (p.clone(), x).prop_map(|(page, since)| Msg::Inval { page, since }),
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
        p.clone().prop_map(|page| Msg::Freed { page }),
        (p.clone(), n).prop_map(|(page, from)| Msg::Unshare { page, from }),
        p.prop_map(|page| Msg::Unshared { page }),
    ]
}
