//! An exhaustive explorer of the protocol: every node runs the real
//! [`Node`] state machine; the "network" delivers in-flight messages in any
//! order (no FIFO assumed), one-sided reads complete at any time, and
//! every node may read, write, evict or re-dormant any page, up to a bound
//! of operations per node. Every reachable state is visited once and must
//! satisfy:
//!
//! 1. **One writer or many readers**: at most one node may write a page,
//!    and then no other may read it.
//! 2. **Every read sees the last write**: any copy the guest may read holds
//!    the last value written to that page.
//! 3. **Zero pages never travel**: no one-sided read ever moves a page that
//!    is all zeros (in particular, no dormant page's data).
//! 4. **A page is read only from a protected copy**: its owner cannot
//!    write while a peer reads it.
//! 5. **A read gets what was offered**: the bytes a one-sided read
//!    takes are those whose digest the reader was given (the owner's
//!    offer, or the one the home kept for a page parked by an eviction):
//!    what `--verify-pages` checks end to end.
//! 6. **A read names a live exposure**: the key a one-sided read
//!    carries is that of its source's exposure of the page now (every
//!    exposure gets a fresh key, and ends when the copy is dropped): over
//!    verbs a key that outlived its registration breaks the connection.
//! 7. **No deadlock**: a state where nothing can happen has no fault
//!    waiting, no transaction open, nobody handing a page over, and a
//!    directory that matches the nodes.
//!
//! Memory is modelled as a value per page per node (0 = zeros); writes
//! store fresh non-zero values, or zero (what an OS does when it frees).
//! Any node may also free a page (a balloon's report): as a guest that
//! keeps the contract does, no node touches the page from then until the
//! free is complete ([`Action::Freed`]), after which every read of it sees
//! zeros; property 2 is not asked of a page while it is being freed (its
//! contents no longer matter), and a state where nothing can happen has
//! no free left unanswered.

use std::collections::HashSet;

use crate::{Access, Action, Config, Fetch, Held, Node, NodeId, Page};

/// What is in one node's memory for one page.
type Content = Option<u64>;

/// The whole pod, as the explorer sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct World {
    nodes: Vec<Node>,
    /// In-flight messages (a sorted multiset: order carries no meaning).
    net: Vec<(NodeId, crate::Msg)>,
    /// One-sided reads under way, with their readers.
    fetches: Vec<(NodeId, Fetch)>,
    /// exposed[node][page]: the key of the node's exposure of its copy
    /// (0: none), as the engine registers a copy it offers or parks.
    exposed: Vec<Vec<u64>>,
    /// Exposures so far of each page at each node: every one gets a key
    /// of its own.
    exposures: Vec<Vec<u64>>,
    /// memory[node][page]
    memory: Vec<Vec<Content>>,
    /// The last value written to each page (0: zeros).
    last: Vec<u64>,
    /// Operations each node may still start.
    ops_left: Vec<u32>,
    /// The next fresh value a write stores.
    next_value: u64,
    /// Pages the guest freed whose free is not complete yet.
    freeing: Vec<bool>,
}

/// A broken property, with the steps that led there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.what)?;
        for (i, s) in self.trace.iter().enumerate() {
            writeln!(f, "  {i:3}: {s}")?;
        }
        Ok(())
    }
}

/// What the exploration covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub states: usize,
    pub terminal_states: usize,
    pub fetches: usize,
    pub grants_seen: bool,
    pub transfers_seen: bool,
    pub shares_seen: bool,
    pub evictions_seen: bool,
    pub redormants_seen: bool,
    /// A free dropped a copy with data.
    pub frees_seen: bool,
    /// The home read a page parked on another node directly.
    pub parked_reads_seen: bool,
    /// A reader dropped its read copy and the home took it off.
    pub unshares_seen: bool,
    /// An owner evicted (or re-dormanted) a page others read: the home
    /// invalidated them first.
    pub shared_evictions_seen: bool,
}

/// One step from a state.
#[derive(Clone, Debug)]
enum Step {
    Deliver(usize),
    Fetch(usize),
    Read(NodeId, Page),
    Write(NodeId, Page, bool),
    Evict(NodeId, Page, NodeId),
    Redormant(NodeId, Page),
    Free(NodeId, Page),
    Unshare(NodeId, Page),
}

impl World {
    pub fn new(config: Config, ops_per_node: u32) -> Self {
        World {
            nodes: (0..config.nodes).map(|i| Node::new(i, config)).collect(),
            net: Vec::new(),
            fetches: Vec::new(),
            memory: vec![vec![None; config.pages as usize]; config.nodes as usize],
            exposed: vec![vec![0; config.pages as usize]; config.nodes as usize],
            exposures: vec![vec![0; config.pages as usize]; config.nodes as usize],
            last: vec![0; config.pages as usize],
            ops_left: vec![ops_per_node; config.nodes as usize],
            next_value: 1,
            freeing: vec![false; config.pages as usize],
        }
    }

    fn config(&self) -> Config {
        self.nodes[0].config
    }

    /// Node `n` exposes its copy of `page` (if it does not already): the
    /// key of the exposure, fresh for each new one.
    fn expose(&mut self, n: NodeId, page: Page) -> u64 {
        let (n, p) = (n as usize, page as usize);
        if self.exposed[n][p] == 0 {
            self.exposures[n][p] += 1;
            self.exposed[n][p] = self.exposures[n][p] * u64::from(self.config().nodes) + n as u64 + 1;
        }
        self.exposed[n][p]
    }

    fn steps(&self) -> Vec<Step> {
        let mut out = Vec::new();
        for i in 0..self.net.len() {
            // identical messages are interchangeable: deliver one of them
            if i == 0 || self.net[i] != self.net[i - 1] {
                out.push(Step::Deliver(i));
            }
        }
        for i in 0..self.fetches.len() {
            out.push(Step::Fetch(i));
        }
        let c = self.config();
        for n in 0..c.nodes {
            if self.ops_left[n as usize] == 0 {
                continue;
            }
            for p in 0..c.pages {
                let l = self.nodes[n as usize].local(p);
                let freeing = self.freeing[p as usize];
                if l.waiting.is_none() && !freeing {
                    out.push(Step::Read(n, p));
                    out.push(Step::Write(n, p, false));
                    out.push(Step::Write(n, p, true));
                }
                // the guest frees a page nobody is touching
                let touched = (0..c.nodes).any(|m| self.nodes[m as usize].local(p).waiting.is_some());
                if !freeing && !touched {
                    out.push(Step::Free(n, p));
                }
                // a reader short of memory drops its read copy
                if !l.owner && l.copy == Held::Data && l.waiting.is_none() && !l.requested && !l.unsharing {
                    out.push(Step::Unshare(n, p));
                }
                let content = self.memory[n as usize][p as usize];
                // (shared and parked pages too: the engine evicts what
                // its clock picks)
                if l.evictable() {
                    if content == Some(0) {
                        out.push(Step::Redormant(n, p));
                    } else {
                        for t in (0..c.nodes).filter(|t| *t != n) {
                            out.push(Step::Evict(n, p, t));
                        }
                    }
                }
            }
        }
        out
    }

    /// Runs the actions node `n` returned, in order.
    fn apply(&mut self, n: NodeId, actions: Vec<Action>, cov: &mut Coverage) -> Result<(), String> {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Send { to, msg } => {
                    match &msg {
                        crate::Msg::Grant { .. } => cov.grants_seen = true,
                        crate::Msg::Transfer { .. } => cov.transfers_seen = true,
                        crate::Msg::Share { .. } => cov.shares_seen = true,
                        crate::Msg::Evicted { .. } | crate::Msg::Ready { evict: true, .. } => cov.evictions_seen = true,
                        crate::Msg::Dormanted { .. } => cov.redormants_seen = true,
                        crate::Msg::Unshared { .. } => cov.unshares_seen = true,
                        crate::Msg::Inval { page, .. } => {
                            // a home invalidating for an eviction: the
                            // page left (or went dormant) while shared
                            let busy = self.nodes[n as usize].dir(*page).busy;
                            if busy.is_some_and(|t| t.evict || t.kind == crate::TxnKind::Redormant) {
                                cov.shared_evictions_seen = true;
                            }
                        }
                        _ => {}
                    }
                    if to == n {
                        return Err(format!("node {n} sent itself {msg:?}"));
                    }
                    let at = self.net.partition_point(|m| m < &(to, msg.clone()));
                    self.net.insert(at, (to, msg));
                }
                Action::ZeroFill { page } => self.memory[n as usize][page as usize] = Some(0),
                Action::Fetch(f) => self.fetches.push((n, f)),
                Action::Drop { page, .. } => {
                    self.memory[n as usize][page as usize] = None;
                    self.exposed[n as usize][page as usize] = 0;
                }
                Action::Forget { page } => {
                    cov.frees_seen = true;
                    self.memory[n as usize][page as usize] = None;
                    self.exposed[n as usize][page as usize] = 0;
                }
                Action::Freed { page } => {
                    if !self.freeing[page as usize] {
                        return Err(format!("node {n} was told page {page} is freed, which nobody freed"));
                    }
                    self.freeing[page as usize] = false;
                }
                Action::Offer { page, to, transfer, evict, epoch } => {
                    let content = self.memory[n as usize][page as usize];
                    let zero = content == Some(0);
                    // the digest of the bytes offered: their value here
                    let digest = content.unwrap_or(0);
                    let key = if zero { 0 } else { self.expose(n, page) };
                    let more = self.nodes[n as usize]
                        .offer(page, to, transfer, evict, epoch, zero, digest, key)
                        .map_err(|e| e.to_string())?;
                    for (i, m) in more.into_iter().enumerate() {
                        queue.insert(i, m);
                    }
                }
                Action::Map { .. }
                | Action::WriteProtect { .. }
                | Action::Unmap { .. }
                | Action::Wake { .. }
                | Action::Refused { .. } => {}
            }
        }
        Ok(())
    }

    fn take(&mut self, step: &Step, cov: &mut Coverage) -> Result<(), String> {
        match *step {
            Step::Deliver(i) => {
                let (to, msg) = self.net.remove(i);
                let acts = self.nodes[to as usize].receive(msg).map_err(|e| e.to_string())?;
                self.apply(to, acts, cov)?;
            }
            Step::Fetch(i) => {
                let (n, Fetch { page, from, transfer, evict, epoch, digest, key }) = self.fetches.remove(i);
                cov.fetches += 1;
                let src = self.memory[from as usize][page as usize];
                let sl = self.nodes[from as usize].local(page);
                match src {
                    None => return Err(format!("node {n} read page {page} from node {from}, which holds no copy")),
                    Some(0) => {
                        return Err(format!("a zero page travelled: node {n} read page {page} from node {from}"))
                    }
                    Some(_) => {}
                }
                if sl.allows(Access::Write) {
                    return Err(format!("node {n} read page {page} from node {from} while node {from} could write it"));
                }
                if src != Some(digest) {
                    return Err(format!(
                        "node {n} read page {page} from node {from}: {src:?}, but was told it hashes to {digest}"
                    ));
                }
                let live = self.exposed[from as usize][page as usize];
                if key == 0 || key != live {
                    return Err(format!(
                        "node {n} read page {page} from node {from} with key {key}, but node {from}'s exposure of it \
                         is {live} (0: none)"
                    ));
                }
                if sl.parked && n == self.config().home(page) {
                    cov.parked_reads_seen = true;
                }
                self.memory[n as usize][page as usize] = src;
                // an eviction's target exposes the copy it parks
                let key = if evict { self.expose(n, page) } else { 0 };
                let acts = self.nodes[n as usize]
                    .fetched(page, from, transfer, evict, epoch, key)
                    .map_err(|e| e.to_string())?;
                self.apply(n, acts, cov)?;
            }
            Step::Read(n, p) | Step::Write(n, p, _) => {
                let access = if matches!(step, Step::Read(..)) { Access::Read } else { Access::Write };
                self.ops_left[n as usize] -= 1;
                let l = self.nodes[n as usize].local(p);
                if l.allows(access) && l.copy == Held::Data {
                    if let Step::Write(_, _, zero) = *step {
                        let v = if zero { 0 } else { self.next_value };
                        self.next_value += u64::from(!zero);
                        self.memory[n as usize][p as usize] = Some(v);
                        self.last[p as usize] = v;
                    }
                } else {
                    let acts = self.nodes[n as usize].fault(p, access).map_err(|e| e.to_string())?;
                    self.apply(n, acts, cov)?;
                }
            }
            Step::Evict(n, p, t) => {
                self.ops_left[n as usize] -= 1;
                let acts = self.nodes[n as usize].evict(p, Some(t)).map_err(|e| e.to_string())?;
                self.apply(n, acts, cov)?;
            }
            Step::Redormant(n, p) => {
                self.ops_left[n as usize] -= 1;
                let acts = self.nodes[n as usize].evict(p, None).map_err(|e| e.to_string())?;
                self.apply(n, acts, cov)?;
            }
            Step::Unshare(n, p) => {
                self.ops_left[n as usize] -= 1;
                let acts = self.nodes[n as usize].unshare(p).map_err(|e| e.to_string())?;
                self.apply(n, acts, cov)?;
            }
            Step::Free(n, p) => {
                self.ops_left[n as usize] -= 1;
                self.freeing[p as usize] = true;
                self.last[p as usize] = 0;
                let acts = self.nodes[n as usize].free(p).map_err(|e| e.to_string())?;
                self.apply(n, acts, cov)?;
            }
        }
        Ok(())
    }

    /// Properties 1, 2 and 4 hold in every state.
    fn check(&self) -> Result<(), String> {
        let c = self.config();
        for p in 0..c.pages {
            let writers: Vec<NodeId> =
                (0..c.nodes).filter(|n| self.nodes[*n as usize].local(p).allows(Access::Write)).collect();
            let readers: Vec<NodeId> =
                (0..c.nodes).filter(|n| self.nodes[*n as usize].local(p).allows(Access::Read)).collect();
            if writers.len() > 1 || (writers.len() == 1 && readers.len() > 1) {
                return Err(format!("page {p}: writers {writers:?} and readers {readers:?} at once"));
            }
            if self.freeing[p as usize] {
                continue;
            }
            for n in readers {
                let l = self.nodes[n as usize].local(p);
                let value = match l.copy {
                    Held::Dormant => 0,
                    Held::Data => match self.memory[n as usize][p as usize] {
                        Some(v) => v,
                        None => return Err(format!("node {n} maps page {p} but holds no memory for it")),
                    },
                    Held::None => unreachable!("allows(Read) needs a copy"),
                };
                if value != self.last[p as usize] {
                    return Err(format!(
                        "node {n} reads page {p} as {value}, but the last write stored {}",
                        self.last[p as usize]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Property 6, in a state where nothing can happen.
    fn check_quiet(&self) -> Result<(), String> {
        let c = self.config();
        for p in 0..c.pages {
            let home = &self.nodes[c.home(p) as usize];
            let d = home.dir(p);
            if d.busy.is_some() || !d.queue.is_empty() {
                return Err(format!("deadlock: page {p}'s home is stuck in {d:?}"));
            }
            if self.freeing[p as usize] {
                return Err(format!("deadlock: page {p}'s free is never answered"));
            }
            let owners: Vec<NodeId> = (0..c.nodes).filter(|n| self.nodes[*n as usize].local(p).owner).collect();
            match d.owner {
                None if !owners.is_empty() => {
                    return Err(format!("page {p} is dormant at home but owned by {owners:?}"))
                }
                Some(o) if owners != vec![o] => {
                    return Err(format!("page {p} is owned by {o} at home but by {owners:?} on the nodes"));
                }
                _ => {}
            }
            for n in 0..c.nodes {
                let l = self.nodes[n as usize].local(p);
                if l.waiting.is_some() || l.handing.is_some() || l.protected || l.freeing || l.unsharing {
                    return Err(format!("deadlock: node {n} is stuck on page {p}: {l:?}"));
                }
                let reader = !l.owner && l.copy != Held::None;
                if reader != d.readers.contains(&n) {
                    return Err(format!("page {p}: node {n} holds {l:?} but the home's readers are {:?}", d.readers));
                }
                if l.copy == Held::None && self.memory[n as usize][p as usize].is_some() {
                    return Err(format!("page {p}: node {n} leaks the memory of a copy it dropped"));
                }
            }
        }
        Ok(())
    }
}

/// Explores every state reachable from the start with `ops_per_node`
/// operations per node. Returns what it covered, or the first violation
/// with the steps that led to it.
pub fn explore(config: Config, ops_per_node: u32) -> Result<Coverage, Violation> {
    explore_from(World::new(config, ops_per_node))
}

/// As [`explore`], from a start where node 0 owns `preloaded` pages with
/// contents (what the loader wrote), every other page dormant.
pub fn explore_preloaded(config: Config, ops_per_node: u32, preloaded: &[Page]) -> Result<Coverage, Violation> {
    let mut w = World::new(config, ops_per_node);
    for &p in preloaded {
        for n in &mut w.nodes {
            n.preload(p, 0).map_err(|e| Violation { what: e.to_string(), trace: Vec::new() })?;
        }
        w.memory[0][p as usize] = Some(w.next_value);
        w.last[p as usize] = w.next_value;
        w.next_value += 1;
    }
    explore_from(w)
}

fn explore_from(start: World) -> Result<Coverage, Violation> {
    let mut seen: HashSet<World> = HashSet::new();
    let mut cov = Coverage {
        states: 0,
        terminal_states: 0,
        fetches: 0,
        grants_seen: false,
        transfers_seen: false,
        shares_seen: false,
        evictions_seen: false,
        redormants_seen: false,
        frees_seen: false,
        parked_reads_seen: false,
        unshares_seen: false,
        shared_evictions_seen: false,
    };
    // depth-first, with the path kept for the report
    let mut stack: Vec<(World, Vec<Step>, usize)> = Vec::new();
    let mut path: Vec<String> = Vec::new();
    seen.insert(start.clone());
    let steps = start.steps();
    stack.push((start, steps, 0));
    while let Some((world, steps, next)) = stack.last_mut() {
        if *next == 0 {
            cov.states += 1;
            if let Err(what) = world.check() {
                return Err(Violation { what, trace: path.clone() });
            }
            if steps.is_empty() {
                cov.terminal_states += 1;
                if let Err(what) = world.check_quiet() {
                    return Err(Violation { what, trace: path.clone() });
                }
            }
        }
        if *next == steps.len() {
            stack.pop();
            path.pop();
            continue;
        }
        let step = steps[*next].clone();
        *next += 1;
        let mut w = world.clone();
        let label = describe(&w, &step);
        if let Err(what) = w.take(&step, &mut cov) {
            let mut trace = path.clone();
            trace.push(label);
            return Err(Violation { what, trace });
        }
        if seen.insert(w.clone()) {
            let s = w.steps();
            path.push(label);
            stack.push((w, s, 0));
        }
    }
    Ok(cov)
}

fn describe(w: &World, step: &Step) -> String {
    match step {
        Step::Deliver(i) => format!("deliver to node {}: {:?}", w.net[*i].0, w.net[*i].1),
        Step::Fetch(i) => {
            let (n, Fetch { page: p, from, transfer: t, .. }) = w.fetches[*i];
            format!("node {n} finishes reading page {p} from node {from} (transfer {t})")
        }
        Step::Read(n, p) => format!("node {n} reads page {p}"),
        Step::Write(n, p, zero) => format!("node {n} writes {} to page {p}", if *zero { "zeros" } else { "data" }),
        Step::Evict(n, p, t) => format!("node {n} evicts page {p} to node {t}"),
        Step::Redormant(n, p) => format!("node {n} makes page {p} dormant again"),
        Step::Free(n, p) => format!("the guest on node {n} frees page {p}"),
        Step::Unshare(n, p) => format!("node {n} drops its read copy of page {p}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sabotage;

    fn sabotaged(s: Sabotage) -> Result<Coverage, Violation> {
        let config = Config { nodes: 2, block_pages: 1, pages: 1 };
        let mut w = World::new(config, 3);
        for n in &mut w.nodes {
            n.sabotage = s;
        }
        explore_from(w)
    }

    #[test]
    fn the_checker_catches_a_writer_let_in_beside_readers() {
        let v = sabotaged(Sabotage::SkipInvalidation).unwrap_err();
        // (a free that skips them leaves a reader the home forgot)
        assert!(v.what.contains("at once") || v.what.contains("last write") || v.what.contains("readers are"), "{v}");
    }

    #[test]
    fn the_checker_catches_an_owner_writing_while_shared() {
        let v = sabotaged(Sabotage::NoWriteProtect).unwrap_err();
        assert!(v.what.contains("at once") || v.what.contains("could write"), "{v}");
    }

    #[test]
    fn the_checker_catches_zero_pages_on_the_wire() {
        let v = sabotaged(Sabotage::ShipZeroPages).unwrap_err();
        assert!(v.what.contains("zero page travelled"), "{v}");
    }

    #[test]
    fn the_checker_catches_a_home_reading_a_copy_that_is_not_parked() {
        let v = sabotaged(Sabotage::DirectUnparked).unwrap_err();
        assert!(v.what.contains("could write") || v.what.contains("last write") || v.what.contains("zero page"), "{v}");
    }

    #[test]
    fn the_checker_catches_a_parked_page_read_without_its_digest() {
        let v = sabotaged(Sabotage::ForgetParkedDigest).unwrap_err();
        assert!(v.what.contains("was told it hashes to"), "{v}");
    }

    #[test]
    fn the_checker_catches_a_parked_page_read_with_a_key_that_outlived_its_exposure() {
        let v = sabotaged(Sabotage::KeepParkedKey).unwrap_err();
        assert!(v.what.contains("with key"), "{v}");
    }

    #[test]
    fn the_unsabotaged_protocol_passes_the_same_bound() {
        let c = sabotaged(Sabotage::None).unwrap();
        assert!(c.parked_reads_seen, "{c:?}");
    }
}
