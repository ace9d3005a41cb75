//! What a node holds and may hold, plain logic with no I/O: the record of
//! each page here (resident, how the guest view maps it, pinned by the
//! loader, on its way), the memory bound's accounting (pages held plus
//! pages coming must stay within `--node-memory`; faults beyond it park),
//! and the eviction decisions (which page next, which node takes it; a
//! node alone evicts nothing). The page engine asks
//! and carries out; where a page is owned and who reads it is the
//! protocol's business, not this record's.

use std::collections::{HashMap, VecDeque};

use shoal_protocol::{NodeId, Page};

// per-page flags
const RESIDENT: u16 = 1; // the memfd holds the page here
const MAPPED: u16 = 2; // the guest view maps it
const PINNED: u16 = 4; // the loader's: never evicted
const QUEUED: u16 = 8; // in the eviction queue
const PENDING_ZERO: u16 = 16; // a zero-fill of this batch, not done yet
const WAITING: u16 = 32; // a fault waits on it
const PARKED: u16 = 64; // a fault waits for room
const COUNTED: u16 = 256; // a waiting fault's page is counted in `incoming`
const WRITABLE: u16 = 512; // the guest view maps it writable (with MAPPED)
const WRITTEN: u16 = 1024; // the guest here wrote it once (kept when it leaves)
const REFERENCED: u16 = 2048; // the guest touched it since the clock hand last passed
const PROBED: u16 = 4096; // taken out of the guest view by the clock hand, to see if it comes back

/// Where evictions ahead of need aim: some room stays free so that faults
/// rarely wait for an eviction.
pub fn evict_level(budget: u64) -> u64 {
    budget.saturating_sub((budget / 8).clamp(1, 1024))
}

/// Which resident page leaves first when the node is over its bound.
/// The most pages the clock's front hand takes out of the guest view at
/// one event.
const PROBES_PER_EVENT: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Eviction {
    /// The page that arrived first (the guest's accesses are not seen).
    #[value(help = "the oldest arrival leaves first")]
    Fifo,
    /// A clock with two hands over the same queue. The guest's accesses
    /// to mapped pages leave no trace we can read, so the front hand makes
    /// one: it takes pages half a queue ahead of the eviction point out of
    /// the guest view (a *probe*); a page the guest touches again comes
    /// back with a cheap minor fault, which marks it referenced, and gets
    /// a second chance (to the back of the queue) when it reaches the
    /// front; a page still untouched there is cold and leaves.
    #[default]
    #[value(help = "pages the guest keeps touching stay (see docs/ARCHITECTURE.md)")]
    Clock,
}

impl Eviction {
    /// The policy when none is asked for: the clock, except for a Linux
    /// guest. Measured in the test harness (Debian's kernel under nested
    /// KVM inside QEMU/TCG, one CPU): a Linux boot on a 2-node pod with
    /// `--node-memory 80M` stalled the harness VM in 3 boots of 3 with the
    /// clock (its ticks stopped; not understood yet: the probes' minor
    /// faults on a Linux guest under nested KVM are the suspect) and
    /// finished with fifo. Measured again on 2026-12-05, after parked
    /// pages stopped bouncing between full nodes: 3 boots of 3 finished
    /// with the clock, init reached after 29.8-35.9 s against 40.9-44.1 s
    /// with fifo (one node: 9.0 s), but the whole run took 61.5-67.5 s
    /// against 53.4-56.9 s (bench/results/linux-boot.md holds the last
    /// run), with 40 600-40 900 zero-fills against 33 700.
    /// Measured on 2026-12-06 (same boot, node 0's counters): the clock
    /// re-dormanted 7 253 more all-zero pages than fifo and zero-filled
    /// 7 748 more (its extra zero-fills are those pages, touched again),
    /// took 17 819 probe faults and fetched back 7 774 pages against
    /// fifo's 6 465. A trace of node 0 under fifo: every fetch-back was a
    /// write fault, 86% of them in guest-physical 120-160 MiB, none in the
    /// kernel image: memory the kernel used early, left alone, then
    /// allocated again. No recency policy can foresee that; only the guest
    /// can say the memory is free, and its free page reporting starts
    /// when init loads virtio_balloon, after the boot this measures.
    /// (`init_on_free=1` made it worse, 86.9 s to init: every freed page
    /// written; `init_on_alloc=0` changed nothing, 43.0 s.)
    /// Host timestamps on the serial console (2026-12-06, after the tap)
    /// show where the clock's whole-run cost goes: from shoal's start to
    /// the kernel's clock zero (the bzImage's decompressor, writing its
    /// scratch) took 23.0 s with the clock, 12.5 s with fifo, 6.2 s on one
    /// node; the kernel itself then ran 23.3 s with the clock to 39.8 s
    /// with fifo (13.2 s on one node). Whole runs: clock 46.6 s, fifo
    /// 52.6 s there; in bench/results/linux-boot.md's run 41.5 s against
    /// 38.9 s. Neither wins both phases; fifo ends sooner.
    /// Since a bzImage is entered through its vmlinux's PVH entry (the
    /// scratch never written; `--bzimage-entry`), the same pod in three
    /// pairs of runs (2026-12-06): the clock reached init after 14.9-15.4
    /// s against fifo's 15.8-17.2 s, ended after 21.7-22.6 s against
    /// 23.0-23.4 s, and fetched back 4 722-4 973 pages against 6 353-6 376.
    /// So the clock is every guest's default but one entered through the
    /// 64-bit boot protocol (`--bzimage-entry boot64`, as asked: a bzImage
    /// that `auto` enters that way because shoal cannot decompress it gets
    /// the clock).
    pub fn default_for(guest_decompressor: bool) -> Eviction {
        if guest_decompressor {
            Eviction::Fifo
        } else {
            Eviction::Clock
        }
    }
}

/// What the clock hand found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// Evict this page.
    Evict(Page),
    /// A page that reached the front unprobed: take it out of the guest
    /// view (then call [`Residency::probed_at_front`], which queues it
    /// again); if the guest wants it, it faults it back.
    Probe(Page),
}

/// What to do with a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A fault on the page is under way already: its wake covers this one.
    OnItsWay,
    /// No room under the bound: the fault waits until evictions make some.
    Parked,
    /// Go ahead (the page's room is counted).
    Go,
}

/// How a dropped page left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Our eviction to this node settled.
    Evicted(NodeId),
    /// Our re-dormanting settled: it is zeros nowhere now.
    Redormanted,
    /// Handed over, or a read copy invalidated.
    Other,
}

/// The record of one node's pages and its memory bound.
#[derive(Debug)]
pub struct Residency {
    me: NodeId,
    eviction: Eviction,
    nodes: u32,
    budget: Option<u64>,
    peer_budget: Option<u64>,
    flags: Vec<u16>,
    resident: u64,
    pinned: u64,
    /// Faults on their way (each will bring one page here).
    incoming: u64,
    /// Pages a zero-fill will bring here (decided, not done yet: a fill
    /// runs outside the engine's lock, see the engine's `fill_unlocked`).
    filling: u64,
    /// Eviction candidates, oldest first.
    queue: VecDeque<Page>,
    /// The clock's front hand: the index in `queue` of the next page to
    /// probe (it runs half a queue ahead of the front).
    probe_hand: usize,
    /// Our evictions not settled yet, with their targets (None: re-dormant).
    evicting: HashMap<Page, Option<NodeId>>,
    /// Pages we placed (or are placing) on each node and have not taken
    /// back, and where each of the placed ones went.
    held_by: Vec<u64>,
    placed: HashMap<Page, NodeId>,
    parked: VecDeque<Page>,
    next_target: NodeId,
}

impl Residency {
    /// A node with `pages` guest pages, none here; at most `budget` pages
    /// here and `peer_budget` on each other node (None: unbounded).
    pub fn new(me: NodeId, nodes: u32, pages: u64, budget: Option<u64>, peer_budget: Option<u64>) -> Self {
        Residency {
            me,
            eviction: Eviction::Fifo,
            nodes,
            budget,
            peer_budget,
            flags: vec![0; pages as usize],
            resident: 0,
            pinned: 0,
            incoming: 0,
            filling: 0,
            queue: VecDeque::new(),
            probe_hand: 0,
            evicting: HashMap::new(),
            held_by: vec![0; nodes as usize],
            placed: HashMap::new(),
            parked: VecDeque::new(),
            next_target: 0,
        }
    }

    /// With `eviction` as the policy.
    pub fn with_eviction(mut self, eviction: Eviction) -> Self {
        self.eviction = eviction;
        self
    }

    fn has(&self, page: Page, flag: u16) -> bool {
        self.flags[page as usize] & flag != 0
    }

    /// The loader wrote `page` here: resident (in the memfd, not yet in the
    /// guest view) and never evicted.
    pub fn preload(&mut self, page: Page) {
        self.flags[page as usize] = RESIDENT | PINNED;
        self.resident += 1;
        self.pinned += 1;
    }

    pub fn is_resident(&self, page: Page) -> bool {
        self.has(page, RESIDENT)
    }

    /// The guest view maps it, and whether writable.
    pub fn mapping(&self, page: Page) -> Option<bool> {
        self.has(page, MAPPED).then(|| self.has(page, WRITABLE))
    }

    /// A fault waits on it (for the page, or for room).
    pub fn is_waiting(&self, page: Page) -> bool {
        self.has(page, WAITING | PARKED)
    }

    pub fn is_parked(&self, page: Page) -> bool {
        self.has(page, PARKED)
    }

    /// Faults wait for room.
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    pub fn resident(&self) -> u64 {
        self.resident
    }

    /// What counts against the bound: pages here, and pages on their way
    /// (faults waiting for theirs, zero-fills under way). A waiting fault
    /// whose page is also being zero-filled counts twice for that while:
    /// the bound errs on the safe side.
    fn held(&self) -> u64 {
        self.resident + self.incoming + self.filling
    }

    pub fn pinned(&self) -> u64 {
        self.pinned
    }

    // ---- faults ------------------------------------------------------------

    /// A fault on `page`: on its way, parked for room, or admitted (then its
    /// page's room is counted until it is woken).
    pub fn admit(&mut self, page: Page) -> Admission {
        if self.is_waiting(page) {
            return Admission::OnItsWay;
        }
        // a page held here already (a read copy to upgrade, a refused
        // eviction, the loader's) needs no room
        let needs_room = !self.is_resident(page);
        if let Some(budget) = self.budget.filter(|_| needs_room) {
            if self.held() >= budget {
                self.flags[page as usize] |= PARKED;
                self.parked.push_back(page);
                return Admission::Parked;
            }
        }
        self.flags[page as usize] |= WAITING;
        if needs_room {
            self.flags[page as usize] |= COUNTED;
            self.incoming += 1;
        }
        Admission::Go
    }

    /// A parked fault to admit now, if there is room for it.
    pub fn unpark(&mut self) -> Option<Page> {
        let budget = self.budget?;
        if self.held() >= budget {
            return None;
        }
        let page = self.parked.pop_front()?;
        self.flags[page as usize] &= !PARKED;
        Some(page)
    }

    /// Whether fault-around may zero-fill one more page, `planned` being
    /// counted already: up to the bound, or up to the eviction level while
    /// faults are parked (they keep their room).
    pub fn room_for_fault_around(&self, planned: u64) -> bool {
        let Some(budget) = self.budget else { return true };
        let limit = if self.parked.is_empty() { budget } else { evict_level(budget) };
        self.held() + planned < limit
    }

    /// Whether fault-around may take `page` (nothing here, nothing on its
    /// way, not in this batch already).
    pub fn untouched(&self, page: Page) -> bool {
        !self.has(page, RESIDENT | PENDING_ZERO | WAITING | PARKED)
    }

    /// The fault on `page` is resolved and woken: its room was used by the
    /// page it brought. Returns whether a fault waited on it.
    pub fn woken(&mut self, page: Page) -> bool {
        if !self.has(page, WAITING) {
            return false;
        }
        if self.has(page, COUNTED) {
            self.incoming = self.incoming.saturating_sub(1);
        }
        self.flags[page as usize] &= !(WAITING | COUNTED);
        true
    }

    // ---- pages coming and going ---------------------------------------------

    /// `page` will be zero-filled with this batch.
    pub fn zero_pending(&mut self, page: Page) {
        if !self.has(page, PENDING_ZERO) {
            self.flags[page as usize] |= PENDING_ZERO;
            self.filling += 1;
        }
    }

    pub fn is_zero_pending(&self, page: Page) -> bool {
        self.has(page, PENDING_ZERO)
    }

    /// `page` is here now (zero-filled or fetched), mapped in the guest
    /// view as `mapped` says (None: not mapped).
    pub fn arrived(&mut self, page: Page, mapped: Option<bool>) {
        if self.has(page, PENDING_ZERO) {
            self.filling -= 1;
        }
        let f = &mut self.flags[page as usize];
        *f = (*f & !(PENDING_ZERO | MAPPED | WRITABLE | REFERENCED | PROBED)) | RESIDENT;
        match mapped {
            Some(true) => *f |= MAPPED | WRITABLE,
            Some(false) => *f |= MAPPED,
            None => {}
        }
        self.resident += 1;
        self.taken_back(page);
        self.enqueue(page);
    }

    /// The guest view maps `page` now (`writable` or not), or not at all.
    pub fn set_mapping(&mut self, page: Page, mapping: Option<bool>) {
        let f = &mut self.flags[page as usize];
        *f &= !(MAPPED | WRITABLE);
        match mapping {
            Some(true) => *f |= MAPPED | WRITABLE,
            Some(false) => *f |= MAPPED,
            None => {}
        }
    }

    /// The guest here faulted to write `page`.
    pub fn wrote(&mut self, page: Page) {
        self.flags[page as usize] |= WRITTEN;
    }

    /// Whether the guest here has written `page` (now or before it left):
    /// a read of it is most likely the first half of a read-modify-write
    /// (an emulated locked instruction reads, then writes), so it should
    /// take the page, not a read copy. (A page granted writable and only
    /// read does not count: readers of a page first touched while dormant
    /// stay readers.)
    pub fn written_here(&self, page: Page) -> bool {
        self.has(page, WRITTEN)
    }

    /// Whether we placed `page` on another node and take it back now (the
    /// guest's own working set coming home).
    pub fn is_placed(&self, page: Page) -> bool {
        self.placed.contains_key(&page)
    }

    /// The guest freed `page`, which we were evicting: it leaves as a
    /// dormant page, not to the eviction's target.
    pub fn forget_eviction(&mut self, page: Page) {
        self.evicting.remove(&page);
    }

    /// The guest freed `page` and its free is complete: it is dormant, on
    /// no node (not where we placed it, if we did).
    pub fn freed(&mut self, page: Page) {
        if !self.placed.is_empty() {
            self.placed.remove(&page);
        }
    }

    /// `page` left this node's memory, for node `to` (None: for nobody).
    /// An eviction of ours settles only if `to` is its target; another
    /// taker (a requester's transfer, or the home reading a page parked
    /// here itself) overtook it, and the home will refuse it: the target
    /// gets its room back and the page's leaving is not counted as ours.
    pub fn dropped(&mut self, page: Page, to: Option<NodeId>) -> Dropped {
        let f = &mut self.flags[page as usize];
        if *f & RESIDENT != 0 {
            self.resident = self.resident.saturating_sub(1);
        }
        if *f & PINNED != 0 {
            self.pinned = self.pinned.saturating_sub(1);
        }
        *f &= !(RESIDENT | MAPPED | WRITABLE | PINNED | REFERENCED | PROBED);
        // (WRITTEN stays: it is this node's history of the page)
        // a fault that waits on the page will bring it back: its room is
        // the room this page leaves
        if *f & WAITING != 0 && *f & COUNTED == 0 {
            *f |= COUNTED;
            self.incoming += 1;
        }
        match (self.evicting.remove(&page), to) {
            (Some(Some(target)), Some(to)) if to == target => {
                self.placed.insert(page, target);
                Dropped::Evicted(target)
            }
            (Some(Some(target)), _) => {
                self.held_by[target as usize] = self.held_by[target as usize].saturating_sub(1);
                Dropped::Other
            }
            (Some(None), None) => Dropped::Redormanted,
            (Some(None), Some(_)) | (None, _) => Dropped::Other,
        }
    }

    fn enqueue(&mut self, page: Page) {
        if self.budget.is_some() && !self.has(page, QUEUED | PINNED) {
            self.flags[page as usize] |= QUEUED;
            self.queue.push_back(page);
        }
    }

    /// A page we placed on another node is back here: that node has room
    /// again.
    fn taken_back(&mut self, page: Page) {
        // (on the path of every page that arrives: skip the hash when
        // nothing was placed, as on a node alone)
        if self.placed.is_empty() {
            return;
        }
        if let Some(t) = self.placed.remove(&page) {
            self.held_by[t as usize] = self.held_by[t as usize].saturating_sub(1);
        }
    }

    // ---- eviction ------------------------------------------------------------

    /// How many more evictions to start now, ahead of need. A node alone
    /// has nowhere to evict to: none (a fault beyond its bound parks, and
    /// the node is [`Residency::stuck`]).
    pub fn evictions_wanted(&self) -> u64 {
        let Some(budget) = self.budget.filter(|_| self.nodes > 1) else { return 0 };
        let demand = self.held() + self.parked.len() as u64;
        demand.saturating_sub(evict_level(budget) + self.evicting.len() as u64)
    }

    /// The next page the policy would see leave, taken off the queue, or
    /// one to probe first (clock); None when a whole pass of the queue
    /// found none (bounded: each call looks at each queued page at most
    /// once, `scanned` counting them). `urgent`: faults wait for room, so
    /// the clock does not probe (that answers only later) but takes the
    /// oldest page the guest has not touched since the hand passed it.
    pub fn next_candidate(&mut self, scanned: &mut usize, urgent: bool) -> Option<Candidate> {
        while *scanned > 0 {
            *scanned -= 1;
            let page = self.queue.pop_front()?;
            self.probe_hand = self.probe_hand.saturating_sub(1);
            self.flags[page as usize] &= !QUEUED;
            if !self.is_resident(page) || self.has(page, PINNED) || self.evicting.contains_key(&page) {
                continue;
            }
            if self.eviction == Eviction::Fifo {
                return Some(Candidate::Evict(page));
            }
            if self.has(page, REFERENCED) {
                // touched since the hand last passed: a second chance
                self.flags[page as usize] &= !(REFERENCED | PROBED);
                self.enqueue(page);
                continue;
            }
            if self.has(page, MAPPED) && !urgent {
                return Some(Candidate::Probe(page));
            }
            return Some(Candidate::Evict(page));
        }
        None
    }

    /// Pages the front hand passes now, to take out of the guest view
    /// (then call [`Residency::probed`] for each): it moves on until it is
    /// half a queue ahead of the front, so that a probed page has the time
    /// the front takes to get there to be touched again.
    pub fn probes_wanted(&mut self) -> Vec<Page> {
        let mut out = Vec::new();
        // (a node alone evicts nothing: no probes either)
        if self.eviction != Eviction::Clock || self.budget.is_none() || self.nodes == 1 {
            return out;
        }
        // a few at a time: each is a system call under the engine's lock
        // (and an invalidation in KVM), and the hand catches up over the
        // next events
        while self.probe_hand < self.queue.len() / 2 && out.len() < PROBES_PER_EVENT {
            let page = self.queue[self.probe_hand];
            self.probe_hand += 1;
            let f = self.flags[page as usize];
            if f & (RESIDENT | MAPPED) == RESIDENT | MAPPED
                && f & (PINNED | REFERENCED) == 0
                && !self.evicting.contains_key(&page)
            {
                out.push(page);
            }
        }
        out
    }

    /// The engine took a probed page out of the guest view: it comes back
    /// referenced if the guest touches it before the front reaches it.
    pub fn probed(&mut self, page: Page) {
        self.set_mapping(page, None);
        self.flags[page as usize] = (self.flags[page as usize] & !REFERENCED) | PROBED;
    }

    /// A page that reached the front unprobed was taken out of the guest
    /// view: it goes to the back, to be judged next time round.
    pub fn probed_at_front(&mut self, page: Page) {
        self.probed(page);
        self.enqueue(page);
    }

    /// The guest touched `page`, held here (a minor fault): the clock
    /// passes it over once more. Returns whether the touch answered a probe.
    pub fn referenced(&mut self, page: Page) -> bool {
        let probed = self.has(page, PROBED);
        self.flags[page as usize] = (self.flags[page as usize] & !PROBED) | REFERENCED;
        probed
    }

    /// Pages in the eviction queue (the bound of one pass).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A candidate could not be evicted now (a transaction on it is under
    /// way): later.
    pub fn requeue(&mut self, page: Page) {
        self.enqueue(page);
    }

    /// The next node with room for an evicted page (round robin).
    pub fn pick_target(&mut self) -> Result<NodeId, String> {
        for _ in 0..self.nodes {
            self.next_target = (self.next_target + 1) % self.nodes;
            let t = self.next_target;
            if t != self.me && self.peer_budget.is_none_or(|b| self.held_by[t as usize] < b) {
                return Ok(t);
            }
        }
        Err(format!(
            "the pod is out of memory: the guest touched more than its {} nodes may hold under --node-memory",
            self.nodes
        ))
    }

    /// Our eviction of `page` (to `target`, or re-dormanting) started.
    pub fn eviction_started(&mut self, page: Page, target: Option<NodeId>) {
        if let Some(t) = target {
            self.held_by[t as usize] += 1;
        }
        self.evicting.insert(page, target);
    }

    /// An eviction of ours was refused (the page stays here): the target
    /// gets its room back and the page is queued again.
    pub fn eviction_refused(&mut self, page: Page) {
        if let Some(target) = self.evicting.remove(&page) {
            if let Some(t) = target {
                self.held_by[t as usize] = self.held_by[t as usize].saturating_sub(1);
            }
            self.enqueue(page);
        }
    }

    /// Faults wait for room that nothing can make: nothing is being
    /// evicted, nothing is on its way, and the node is full.
    pub fn stuck(&self) -> bool {
        let Some(budget) = self.budget else { return false };
        !self.parked.is_empty()
            && self.evicting.is_empty()
            && self.incoming == 0
            && self.filling == 0
            && self.resident >= budget
    }

    /// The fault that has waited for room the longest.
    pub fn first_parked(&self) -> Option<Page> {
        self.parked.front().copied()
    }

    /// The nodes our unsettled evictions wait on.
    pub fn eviction_targets(&self) -> Vec<NodeId> {
        let mut t: Vec<NodeId> = self.evicting.values().flatten().copied().collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_park_at_the_bound_and_go_on_as_room_is_made() {
        let mut r = Residency::new(0, 2, 64, Some(2), Some(8));
        assert_eq!(r.admit(1), Admission::Go);
        assert_eq!(r.admit(1), Admission::OnItsWay);
        assert_eq!(r.admit(2), Admission::Go);
        // two pages on their way fill the bound of 2
        assert_eq!(r.admit(3), Admission::Parked);
        assert!(r.is_waiting(3) && r.is_parked(3));
        assert_eq!(r.unpark(), None, "no room yet");
        r.arrived(1, Some(true));
        assert!(r.woken(1));
        assert_eq!((r.resident(), r.unpark()), (1, None), "1 here + 1 coming = 2");
        r.dropped(1, None);
        assert_eq!(r.unpark(), Some(3));
        assert_eq!(r.admit(3), Admission::Go);
    }

    #[test]
    fn a_page_held_here_needs_no_room() {
        let mut r = Residency::new(0, 2, 64, Some(1), None);
        r.preload(5);
        assert_eq!(r.admit(5), Admission::Go, "the loader's page is here already");
        assert_eq!(r.admit(6), Admission::Parked);
    }

    /// Pages `pages` admitted, arrived writable and woken: held here.
    fn hold(r: &mut Residency, pages: std::ops::Range<Page>) {
        for p in pages {
            assert_eq!(r.admit(p), Admission::Go);
            r.arrived(p, Some(true));
            r.woken(p);
        }
    }

    #[test]
    fn evictions_go_round_robin_to_nodes_with_room_and_settle() {
        let mut r = Residency::new(0, 3, 64, Some(8), Some(1));
        hold(&mut r, 0..8);
        // 8 held, the level is 7: one eviction wanted
        assert_eq!(r.evictions_wanted(), 1);
        let mut scanned = r.queued();
        let Some(Candidate::Evict(page)) = r.next_candidate(&mut scanned, false) else { panic!("a candidate") };
        assert_eq!(page, 0, "oldest first");
        let t = r.pick_target().unwrap();
        assert_eq!(t, 1);
        r.eviction_started(page, Some(t));
        assert_eq!(r.evictions_wanted(), 0);
        // node 1 holds its one page: the next goes to node 2, then none
        assert_eq!(r.pick_target().unwrap(), 2);
        r.eviction_started(1, Some(2));
        assert!(r.pick_target().unwrap_err().contains("out of memory"));
        // the first settles, the second is refused
        assert_eq!(r.dropped(0, Some(1)), Dropped::Evicted(1));
        assert!(r.is_placed(0));
        r.eviction_refused(1);
        assert_eq!(r.pick_target().unwrap(), 2, "node 2 has its room back");
        // page 0 comes back: node 1 has room again
        r.arrived(0, Some(true));
        assert!(!r.is_placed(0));
        assert_eq!(r.eviction_targets(), Vec::<NodeId>::new());
    }

    #[test]
    fn an_eviction_overtaken_by_another_taker_gives_its_target_its_room_back() {
        let mut r = Residency::new(0, 3, 64, Some(8), Some(1));
        hold(&mut r, 0..3);
        r.eviction_started(0, Some(1));
        r.eviction_started(1, Some(2));
        assert!(r.pick_target().is_err(), "both peers hold what they may");
        // page 0 went to node 2 (a requester) before the home took our
        // eviction to node 1; page 1 went to its target as planned
        assert_eq!(r.dropped(0, Some(2)), Dropped::Other, "not an eviction of ours");
        assert!(!r.is_placed(0));
        assert_eq!(r.dropped(1, Some(2)), Dropped::Evicted(2));
        assert_eq!(r.pick_target().unwrap(), 1, "node 1 has its room back");
        // a re-dormanting overtaken is not counted as one either
        r.eviction_started(2, None);
        assert_eq!(r.dropped(2, Some(1)), Dropped::Other);
    }

    #[test]
    fn the_loaders_pages_are_never_candidates() {
        let mut r = Residency::new(0, 2, 64, Some(4), None);
        r.preload(0);
        r.admit(1);
        r.arrived(1, Some(true));
        let mut scanned = r.queued();
        assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Evict(1)));
        assert_eq!(r.next_candidate(&mut scanned, false), None);
        assert_eq!((r.resident(), r.pinned()), (2, 1));
    }

    #[test]
    fn a_page_written_here_is_remembered_after_it_leaves() {
        let mut r = Residency::new(0, 2, 64, None, None);
        r.arrived(1, Some(true));
        assert!(!r.written_here(1), "granted writable, not written");
        r.wrote(1);
        assert!(r.written_here(1));
        r.dropped(1, None);
        assert!(r.written_here(1), "it stays this node's history");
    }

    /// The clock: the front hand probes pages half a queue ahead; a page
    /// the guest touches again (a minor fault) gets a second chance at the
    /// front; one left untouched leaves; an unprobed page at the front is
    /// probed there, unless faults wait for room.
    #[test]
    fn the_clock_probes_ahead_then_spares_what_the_guest_touched() {
        let mut r = Residency::new(0, 2, 64, Some(8), None).with_eviction(Eviction::Clock);
        for p in 0..8 {
            r.admit(p);
            r.arrived(p, Some(true));
            r.woken(p);
        }
        // the front hand runs half the queue ahead: pages 0 to 3
        let probes = r.probes_wanted();
        assert_eq!(probes, vec![0, 1, 2, 3]);
        for &p in &probes {
            r.probed(p);
            assert_eq!(r.mapping(p), None);
        }
        assert!(r.probes_wanted().is_empty(), "already half a queue ahead");
        // the guest touches 0 and 2 again
        assert!(r.referenced(0));
        assert!(r.referenced(2));
        r.set_mapping(0, Some(true));
        r.set_mapping(2, Some(true));
        // 0 is spared (to the back), 1 (untouched) leaves, then 2 spared, 3 leaves
        let mut scanned = r.queued();
        assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Evict(1)));
        assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Evict(3)));
        // now 4, 5, 6, 7, 0, 2 are queued: the hand moves on to stay half
        // a queue ahead
        assert_eq!(r.probes_wanted(), vec![4, 5, 6]);
        for p in [4, 5, 6] {
            r.probed(p);
        }
        // probed and untouched, they leave; 7 reached the front unprobed
        let mut scanned = r.queued();
        for p in [4, 5, 6] {
            assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Evict(p)));
        }
        assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Probe(7)));
        r.probed_at_front(7);
        // when faults wait for room, an unprobed page at the front leaves
        // (0 had its second chance already)
        assert_eq!(r.next_candidate(&mut scanned, true), Some(Candidate::Evict(0)));
    }

    /// README: the clock unless asked otherwise, fifo for a bzImage booted
    /// through its own decompressor.
    #[test]
    fn the_default_policy_is_the_clock_but_under_a_guests_decompressor() {
        assert_eq!(Eviction::default_for(false), Eviction::Clock);
        assert_eq!(Eviction::default_for(true), Eviction::Fifo);
    }

    #[test]
    fn fifo_evicts_in_arrival_order_whatever_the_guest_touched() {
        let mut r = Residency::new(0, 2, 64, Some(4), None).with_eviction(Eviction::Fifo);
        for p in 0..3 {
            r.admit(p);
            r.arrived(p, Some(true));
            r.woken(p);
        }
        r.referenced(0);
        let mut scanned = r.queued();
        assert_eq!(r.next_candidate(&mut scanned, false), Some(Candidate::Evict(0)));
    }

    #[test]
    fn a_node_alone_evicts_nothing_and_is_stuck_at_its_bound() {
        let mut r = Residency::new(0, 1, 64, Some(2), Some(2));
        for p in 0..2 {
            assert_eq!(r.admit(p), Admission::Go);
            r.arrived(p, Some(true));
            assert!(r.woken(p));
        }
        assert_eq!(r.evictions_wanted(), 0, "nowhere to evict to");
        assert!(!r.stuck());
        assert_eq!(r.admit(5), Admission::Parked);
        assert_eq!(r.evictions_wanted(), 0);
        assert_eq!(r.first_parked(), Some(5));
        assert!(r.stuck(), "nothing can make room");
    }

    #[test]
    fn a_node_full_of_pinned_pages_is_stuck() {
        let mut r = Residency::new(0, 2, 64, Some(1), None);
        r.preload(0);
        assert_eq!(r.admit(1), Admission::Parked);
        assert!(r.stuck());
    }

    #[test]
    fn a_waiting_fault_on_a_dropped_page_keeps_its_room() {
        let mut r = Residency::new(0, 2, 64, Some(4), None);
        r.preload(3);
        // a write to the loader's page waits (an upgrade): no room counted
        assert_eq!(r.admit(3), Admission::Go);
        // the page is handed over meanwhile: the fault will bring it back
        assert_eq!(r.dropped(3, Some(1)), Dropped::Other);
        assert_eq!(r.resident(), 0);
        assert!(r.woken(3));
        assert_eq!(r.admit(9), Admission::Go);
    }
}
