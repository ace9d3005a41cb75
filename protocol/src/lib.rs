//! The page-ownership protocol of a shoal pod: plain logic, no I/O.
//!
//! A [`Node`] is fed events (a guest fault, a message from a peer, a
//! finished one-sided read, a wish to evict) and returns [`Action`]s for the
//! VMM around it to carry out (send a message, zero-fill a page, read a
//! page from a peer, map or drop a page, wake the vCPU). Nothing here
//! touches memory, sockets or KVM, so the protocol can be checked
//! exhaustively (see the `model` module and its tests) with every message
//! order.
//!
//! # The protocol
//!
//! Every page has a **home** node (`block(page) % nodes`, blocks of
//! [`Config::block_pages`]) that keeps its directory entry: *dormant*, or
//! *owned* by one node with a set of *readers*. The home serialises
//! changes to a page: one transaction at a time, later requests queue.
//!
//! - **Dormant first touch.** A node faulting on a dormant page asks its
//!   home, which grants the requester every dormant page of the page's
//!   block at once ([`Msg::Grant`]). The node zero-fills locally: no page
//!   data ever crosses the network, and later first touches in the block
//!   need no round trip at all.
//! - **Reading a page owned elsewhere.** The home asks the owner to share
//!   ([`Msg::Share`]); the owner write-protects its copy and answers the
//!   requester directly ([`Msg::Ready`], saying whether the page is still
//!   dormant). The requester pulls the bytes with a one-sided read (or
//!   zero-fills a dormant page), maps it read-only, and tells the home
//!   ([`Msg::Done`]), which adds it to the readers.
//! - **Writing.** The home first invalidates every reader ([`Msg::Inval`],
//!   acknowledged). If the writer owns the page it is upgraded in place;
//!   otherwise the owner write-protects and answers [`Msg::Ready`], the
//!   writer pulls the bytes and maps them writable, tells the old owner
//!   ([`Msg::Fetched`]), which only then drops its copy and tells the home
//!   ([`Msg::Done`]). One writer or many readers, never both.
//! - **Eviction.** An owner over its memory budget asks the home to move a
//!   page to a node with room ([`Msg::Evict`]): the same transfer, with
//!   the target pulling the page, except that the owner's word goes
//!   through the home ([`Msg::Evicted`]): the target did not ask, so it
//!   takes the page only from the node that serialises it. The target
//!   *parks* a page with data: kept out of its guest's view (its guest
//!   asks the home first, like any node's), so its bytes cannot change,
//!   and the home, faulting on it itself, reads it at once without asking
//!   anyone (the target hears [`Msg::Fetched`] from the home afterwards). A page whose contents are all zeros is
//!   made dormant again instead ([`Msg::Redormant`]): nothing moves.
//! - **Freeing.** The guest freed a page (a balloon's free page report):
//!   its contents no longer matter. Any node asks the home
//!   ([`Msg::Free`]); in its turn the home invalidates the readers, tells
//!   the owner to drop its copy ([`Msg::Forget`], answered with `Done`),
//!   makes the page dormant and tells the asker ([`Msg::Freed`]). Nothing
//!   moves; the next touch anywhere zero-fills.
//! - **Dropping a read copy.** A reader short of memory drops its copy at
//!   once and tells the home ([`Msg::Unshare`]), which takes it off the
//!   readers in its turn and answers ([`Msg::Unshared`]); until then no
//!   request of that reader for the page goes out (one message per page
//!   from a node to its home at a time). Nothing moves: the owner keeps
//!   the page.
//!
//! Messages may arrive in any order; the transaction structure (the home
//! sends a page's next request only after the current one's `Done`) makes
//! that safe, and the model checker explores every interleaving.

pub mod codec;
#[cfg(test)]
mod hostile_peer;
pub mod model;
mod pagemap;
pub mod roster;
pub mod roster_model;
#[cfg(test)]
mod strategies;

use std::collections::{BTreeSet, VecDeque};

use pagemap::PageMap;

/// A node of the pod.
pub type NodeId = u32;
/// A guest page (its index: memfd offset / 4096).
pub type Page = u64;

/// What a faulting access needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
}

/// The shape of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Number of nodes.
    pub nodes: u32,
    /// Pages per block: the unit of homes and of dormant grants.
    pub block_pages: u64,
    /// Pages in the guest.
    pub pages: u64,
}

impl Config {
    /// A pod shape; None unless there is at least one node and one page per
    /// block.
    pub fn new(nodes: u32, block_pages: u64, pages: u64) -> Option<Self> {
        (nodes > 0 && block_pages > 0).then_some(Config { nodes, block_pages, pages })
    }

    /// The home node of `page`.
    pub fn home(&self, page: Page) -> NodeId {
        ((page / self.block_pages) % u64::from(self.nodes)) as NodeId
    }

    /// The pages of `page`'s block.
    pub fn block_of(&self, page: Page) -> std::ops::Range<Page> {
        let first = page - page % self.block_pages;
        first..(first + self.block_pages).min(self.pages)
    }
}

/// When the vCPU whose fault a request serves began to wait for pages, in
/// microseconds of the wall clock (`CLOCK_REALTIME`, which a cluster keeps
/// in step across hosts); 0 when no vCPU waits (an eviction, a freeing).
/// The protocol only carries it, from a request to the messages the home
/// sends for it; nodes use it to settle which of two vCPUs that want each
/// other's pages goes first (the one that has waited longest). A clock
/// that is off between hosts makes that choice less fair, never wrong.
pub type Since = u64;

/// Messages between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// node → home: `from` needs `page` for `access`. `since`: when the
    /// vCPU that asks began to wait for pages (see [`Since`]).
    Request { page: Page, access: Access, from: NodeId, since: Since },
    /// home → requester: these dormant pages (of one block) are yours,
    /// each with the epoch of your ownership; `answers`, one of them, is
    /// the page the request was for (a request of ours for another still
    /// travels, and is answered in its turn).
    Grant { answers: Page, pages: Vec<(Page, u64)> },
    /// requester → home: the grant is applied.
    GrantDone { pages: Vec<Page>, from: NodeId },
    /// home → owner: let `to` read the page (`since`: of its request).
    Share { page: Page, to: NodeId, since: Since },
    /// home → owner: hand the page over to `to` (a writer, or, when
    /// `evict`, the target of the owner's own eviction: this answers it).
    /// `since`: of the request (0 for an eviction).
    Transfer { page: Page, to: NodeId, evict: bool, epoch: u64, since: Since },
    /// home → owner: you may write, every reader is gone.
    Upgrade { page: Page },
    /// owner → requester: my copy is protected; read it (or, when
    /// `dormant`, zero-fill: it is all zeros). `transfer`: you become the
    /// owner; `evict`: because the owner evicts it (this does not answer a
    /// request of yours, which the home still holds).
    /// `epoch`: of the new ownership (transfers).
    /// `digest`: of the protected copy's bytes, when pods check pulled
    /// pages end to end (0 otherwise, and for a dormant page).
    /// `key`: what the reader's one-sided read names to reach the copy
    /// (a transport's key of the owner's exposure of it: verbs' rkey; 0
    /// where the transport needs none, and for a dormant page).
    Ready { page: Page, from: NodeId, dormant: bool, transfer: bool, evict: bool, epoch: u64, digest: u64, key: u64 },
    /// owner → home: my copy is protected for the eviction to `to`; the
    /// home passes it on as `to`'s [`Msg::Ready`], so an eviction target
    /// takes a page only on its home's word.
    Evicted { page: Page, from: NodeId, to: NodeId, dormant: bool, epoch: u64, digest: u64, key: u64 },
    /// new owner → old owner: I have the bytes; drop yours. `key`: for an
    /// eviction's target, the key of its parked copy (the home reads it
    /// directly later), else 0.
    Fetched { page: Page, from: NodeId, key: u64 },
    /// → home: the transaction on `page` is over (from the node that
    /// closes it: the reader, the old owner, the upgraded or refused one).
    /// `key`: an old owner passes on its `Fetched`'s (else 0).
    Done { page: Page, from: NodeId, key: u64 },
    /// home → reader: drop your copy (`since`: of the request that makes
    /// a writer, 0 for an eviction or a freeing).
    Inval { page: Page, since: Since },
    /// reader → home.
    InvalAck { page: Page, from: NodeId },
    /// owner → home: move the page to `to`. `epoch` names the ownership
    /// it was asked under: a request that outlived it is refused.
    Evict { page: Page, from: NodeId, to: NodeId, epoch: u64 },
    /// owner → home: the page is all zeros again.
    Redormant { page: Page, from: NodeId, epoch: u64 },
    /// home → owner: the eviction or re-dormanting was refused (the page
    /// has readers, or is not yours any more); carry on.
    Refused { page: Page },
    /// home → owner: the page is dormant again; drop your copy.
    Dormanted { page: Page },
    /// node → home: the guest freed `page`; make it dormant wherever it is
    /// held, dropping its contents.
    Free { page: Page, from: NodeId },
    /// home → owner: the guest freed the page; drop your copy (answered
    /// with `Done`).
    Forget { page: Page },
    /// home → the node that asked to free the page: it is dormant now,
    /// no node holds it.
    Freed { page: Page },
    /// reader → home: I dropped my read copy (memory pressure); take me
    /// off the readers.
    Unshare { page: Page, from: NodeId },
    /// home → reader: you are off the readers (or were already, by an
    /// invalidation); ask again when you need the page.
    Unshared { page: Page },
}

impl Msg {
    /// The sender the message names, if it names one (an eviction's
    /// `Ready` names the owner to read from, not its sender: the home).
    pub fn claimed_sender(&self) -> Option<NodeId> {
        match *self {
            Msg::Request { from, .. }
            | Msg::GrantDone { from, .. }
            | Msg::Ready { from, evict: false, .. }
            | Msg::Evicted { from, .. }
            | Msg::Fetched { from, .. }
            | Msg::Done { from, .. }
            | Msg::InvalAck { from, .. }
            | Msg::Evict { from, .. }
            | Msg::Redormant { from, .. }
            | Msg::Free { from, .. }
            | Msg::Unshare { from, .. } => Some(from),
            _ => None,
        }
    }

    /// The pages the message names.
    pub fn pages(&self) -> Vec<Page> {
        match self {
            Msg::Grant { pages, .. } => pages.iter().map(|(p, _)| *p).collect(),
            Msg::GrantDone { pages, .. } => pages.clone(),
            Msg::Request { page, .. }
            | Msg::Share { page, .. }
            | Msg::Transfer { page, .. }
            | Msg::Upgrade { page }
            | Msg::Ready { page, .. }
            | Msg::Evicted { page, .. }
            | Msg::Fetched { page, .. }
            | Msg::Done { page, .. }
            | Msg::Inval { page, .. }
            | Msg::InvalAck { page, .. }
            | Msg::Evict { page, .. }
            | Msg::Redormant { page, .. }
            | Msg::Refused { page }
            | Msg::Dormanted { page }
            | Msg::Free { page, .. }
            | Msg::Forget { page }
            | Msg::Freed { page }
            | Msg::Unshare { page, .. }
            | Msg::Unshared { page } => vec![*page],
        }
    }
}

/// A one-sided read [`Action::Fetch`] asks for: `page` from `from`'s
/// memory, then [`Node::fetched`] with `page`, `from`, `transfer`, `evict`
/// and `epoch`. With `evict` the page is an eviction's: it is parked
/// (kept out of the guest view) where it lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fetch {
    pub page: Page,
    pub from: NodeId,
    pub transfer: bool,
    pub evict: bool,
    pub epoch: u64,
    /// What its owner said the bytes hash to (see [`Msg::Ready`]), for
    /// the VMM's end-to-end check.
    pub digest: u64,
    /// The key to read it with (see [`Msg::Ready`]).
    pub key: u64,
}

/// What the VMM must do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Send {
        to: NodeId,
        msg: Msg,
    },
    /// Make `page` a zeroed page here (locally: no data on the wire).
    ZeroFill {
        page: Page,
    },
    /// Read a page from a peer's memory with a one-sided read, then call
    /// [`Node::fetched`] (see [`Fetch`]).
    Fetch(Fetch),
    /// Let the guest read (and, when `writable`, write) our copy.
    Map {
        page: Page,
        writable: bool,
    },
    /// Stop the guest writing our copy (reads stay allowed).
    WriteProtect {
        page: Page,
    },
    /// Take our copy away from the guest, keeping its bytes for a peer's
    /// one-sided read.
    Unmap {
        page: Page,
    },
    /// Drop our copy and free its memory. `to`: the node that took the
    /// page over (it read our copy); None when it went to nobody (a read
    /// copy invalidated or given up, a page re-dormanted or freed). The
    /// VMM tells by it whether an eviction of its own settled, or another
    /// taker overtook it.
    Drop {
        page: Page,
        to: Option<NodeId>,
    },
    /// Our copy is now protected (the action before this one): look
    /// whether it is all zeros and call [`Node::offer`]. Zero pages never
    /// travel: the requester zero-fills instead.
    Offer {
        page: Page,
        to: NodeId,
        transfer: bool,
        evict: bool,
        epoch: u64,
    },
    /// The fault on `page` is resolved: wake whoever waits on it.
    Wake {
        page: Page,
    },
    /// Our eviction or re-dormanting of `page` was refused by its home:
    /// the page stays ours (write-protected) if we still hold it.
    Refused {
        page: Page,
    },
    /// Drop our copy and free its memory: the guest freed the page (as
    /// [`Action::Drop`], counted apart).
    Forget {
        page: Page,
    },
    /// Our [`Node::free`] of `page` is complete: the page is dormant and no
    /// node holds it.
    Freed {
        page: Page,
    },
}

/// Our copy of a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Held {
    /// None here.
    #[default]
    None,
    /// Owned through a grant and never touched: zeros that exist nowhere.
    Dormant,
    /// A page in memory here (zero-filled or fetched).
    Data,
}

/// A node's view of one page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Local {
    pub copy: Held,
    pub owner: bool,
    /// The guest may write our copy.
    pub writable: bool,
    /// A fault waits for this access.
    pub waiting: Option<Access>,
    /// Our request for the page is with the home.
    pub requested: bool,
    /// We asked the home to evict or re-dormant the page: write-protected
    /// until it answers, and no request of ours goes out meanwhile.
    pub protected: bool,
    /// We are handing the page to a new owner (this node): the guest may not touch our
    /// copy any more; its bytes stay until the new owner has them.
    pub handing: Option<NodeId>,
    /// Which ownership of the page ours is (the home counts them).
    pub epoch: u64,
    /// We asked the home to free the page (the guest freed it) and wait
    /// for [`Msg::Freed`].
    pub freeing: bool,
    /// Ours by an eviction, kept for the pod out of our guest's view: our
    /// guest asks the home for it like any node's, so its bytes cannot
    /// change here, and the home may pull it without asking us first
    /// (`Fetched` from the home then tells us it is gone).
    pub parked: bool,
    /// We dropped our read copy and told the home ([`Msg::Unshare`]): no
    /// request of ours goes out until it answers.
    pub unsharing: bool,
}

impl Local {
    /// Whether we may evict (or re-dormant) the page: we own it with data
    /// and nothing about it is under way here. It may be shared (the
    /// home invalidates the readers first) or parked (it moves on).
    pub fn evictable(&self) -> bool {
        self.owner
            && self.copy == Held::Data
            && self.handing.is_none()
            && !self.protected
            && !self.requested
            && self.waiting.is_none()
    }

    /// Whether the guest may access our copy as `a`.
    pub fn allows(&self, a: Access) -> bool {
        let present = self.copy != Held::None && self.handing.is_none() && !self.parked;
        match a {
            Access::Read => present,
            Access::Write => present && self.writable,
        }
    }
}

/// The home's record of one page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirEntry {
    /// None: dormant (no node holds it).
    pub owner: Option<NodeId>,
    /// Ownerships so far: each grant, transfer and re-dormanting adds one.
    pub epoch: u64,
    pub readers: BTreeSet<NodeId>,
    /// The owner keeps the page parked (an eviction's target, with data):
    /// out of its guest's view, so the home may read it directly.
    pub parked: bool,
    /// A parked page's digest (see [`Msg::Ready`]): its bytes cannot
    /// change where it is parked, so a direct read checks against it.
    /// (Set from `Evicted`, kept only if the eviction parks the page.)
    pub digest: u64,
    /// A parked page's key at its owner (see [`Msg::Fetched`]).
    pub key: u64,
    /// The transaction under way.
    pub busy: Option<Txn>,
    /// Requests waiting for it.
    pub queue: VecDeque<Msg>,
}

/// What a transaction does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxnKind {
    /// A dormant page granted to `to`.
    Grant,
    /// `to` becomes a reader.
    Share,
    /// `to` becomes the owner (a writer or an eviction target).
    Transfer,
    /// The owner may write.
    Upgrade,
    /// An eviction or re-dormanting refused.
    Refuse,
    /// The page becomes dormant again.
    Redormant,
    /// The guest freed the page: its owner drops it, it becomes dormant.
    Free,
}

/// A transaction at the home. Every message the home sends about a page
/// belongs to one, and the next starts only when its `Done` has come back:
/// so no two messages about one page are ever in flight to one node, and
/// the protocol needs no ordering from the network.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Txn {
    pub kind: TxnKind,
    /// A transfer that answers the owner's eviction.
    pub evict: bool,
    /// Who gets the page (or is answered).
    pub to: NodeId,
    /// Whose `Done` closes the transaction.
    pub closer: NodeId,
    /// Invalidations still unacknowledged.
    pub acks_left: BTreeSet<NodeId>,
    /// The main message went out.
    pub sent: bool,
    /// An eviction whose target parks the page (it has data: the owner
    /// said so in `Evicted`).
    pub parks: bool,
    /// The request's [`Since`] (0 when it is not a request).
    pub since: Since,
}

/// Errors: a peer broke the protocol (a message that cannot happen).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("node {node}: unexpected {msg:?} for page {page} in state {state}")]
    Unexpected { node: NodeId, page: Page, msg: String, state: String },
    #[error("node {node}: page {page} is outside the guest")]
    NoSuchPage { node: NodeId, page: Page },
}

/// One node's protocol state: its pages, and the directory of the pages
/// it is home to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    pub id: NodeId,
    pub config: Config,
    local: PageMap<Local>,
    dir: PageMap<DirEntry>,
    /// What our requests say in [`Msg::Request::since`] (set by the VMM
    /// before it reports a fault; 0 until then).
    pub since: Since,
    /// A deliberate bug, for the test that shows the model checker finds
    /// bugs.
    #[cfg(test)]
    pub(crate) sabotage: Sabotage,
    /// The key `Sabotage::KeepParkedKey` keeps.
    #[cfg(test)]
    pub(crate) kept_key: Option<u64>,
}

/// Bugs the model checker must catch (tests only).
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) enum Sabotage {
    #[default]
    None,
    /// Let a writer in without invalidating the readers.
    SkipInvalidation,
    /// Let the home read any owner's copy directly, parked or not.
    DirectUnparked,
    /// Share a page without write-protecting the owner's copy.
    NoWriteProtect,
    /// Send zero pages over the wire.
    ShipZeroPages,
    /// Read a parked page directly without the digest its eviction gave.
    ForgetParkedDigest,
    /// Keep a parked page's key from its first parking on (a key that
    /// outlives its exposure).
    KeepParkedKey,
}

impl Node {
    pub fn new(id: NodeId, config: Config) -> Self {
        Node {
            id,
            config,
            local: PageMap::new(config.pages, config.block_pages),
            dir: PageMap::new(config.pages, config.block_pages),
            since: 0,
            #[cfg(test)]
            sabotage: Sabotage::None,
            #[cfg(test)]
            kept_key: None,
        }
    }

    /// Starts `page` owned by `owner` with contents (what the loader wrote
    /// before the guest runs), instead of dormant. Every node of the pod
    /// calls this for the same pages before any fault: the owner records
    /// its copy, the page's home its directory entry, the others nothing.
    pub fn preload(&mut self, page: Page, owner: NodeId) -> Result<(), Error> {
        self.check_page(page)?;
        if owner == self.id {
            self.set_local(page, Local { copy: Held::Data, owner: true, writable: true, epoch: 1, ..Local::default() });
        }
        if self.config.home(page) == self.id {
            self.set_dir(page, DirEntry { owner: Some(owner), epoch: 1, ..DirEntry::default() });
        }
        Ok(())
    }

    /// Our view of `page`.
    pub fn local(&self, page: Page) -> Local {
        self.local.get(page)
    }

    /// The directory entry of a page we are home to.
    pub fn dir(&self, page: Page) -> DirEntry {
        self.dir.get(page)
    }

    fn set_local(&mut self, page: Page, l: Local) {
        self.local.set(page, l);
    }

    fn set_dir(&mut self, page: Page, d: DirEntry) {
        self.dir.set(page, d);
    }

    fn check_page(&self, page: Page) -> Result<(), Error> {
        if page >= self.config.pages {
            return Err(Error::NoSuchPage { node: self.id, page });
        }
        Ok(())
    }

    fn unexpected(&self, page: Page, msg: &Msg) -> Error {
        Error::Unexpected {
            node: self.id,
            page,
            msg: format!("{msg:?}"),
            state: format!("{:?} / {:?}", self.local(page), self.dir(page)),
        }
    }

    /// The guest touched `page` for `access` and our copy does not allow
    /// it. Returns what to do; the fault stays pending until a
    /// [`Action::Wake`] for the page.
    pub fn fault(&mut self, page: Page, access: Access) -> Result<Vec<Action>, Error> {
        let mut out = Vec::new();
        self.fault_into(page, access, &mut out)?;
        Ok(out)
    }

    /// As [`Node::fault`], appending the actions to `out`: a caller that
    /// faults many pages in a row (fault-around) saves an allocation per
    /// page. When our copy allows the access, the last action is the
    /// page's [`Action::Wake`].
    pub fn fault_into(&mut self, page: Page, access: Access, out: &mut Vec<Action>) -> Result<(), Error> {
        self.check_page(page)?;
        let mut l = self.local(page);
        if l.allows(access) {
            // resolved already (another fault got there first), or granted
            // and never touched: zero-fill here, no round trip
            if l.copy == Held::Dormant {
                self.materialise(page, &mut l, out);
            }
            out.push(Action::Wake { page });
            self.set_local(page, l);
            return Ok(());
        }
        if !l.requested {
            // a write after a read that is not asked for yet asks for both
            l.waiting = Some(l.waiting.map_or(access, |w| w.max(access)));
        } else if l.waiting.is_none() {
            l.waiting = Some(access);
        }
        self.set_local(page, l);
        self.request_if_needed(page, out)
    }

    /// Sends our request for `page` when a fault waits, none is out, and
    /// no eviction or hand-over of ours is under way (then it goes out when
    /// that settles).
    fn request_if_needed(&mut self, page: Page, out: &mut Vec<Action>) -> Result<(), Error> {
        let mut l = self.local(page);
        let Some(access) = l.waiting else { return Ok(()) };
        if l.requested || l.protected || l.unsharing || l.handing.is_some() {
            return Ok(());
        }
        l.requested = true;
        self.set_local(page, l);
        let since = self.since;
        self.send_home(page, Msg::Request { page, access, from: self.id, since }, out)
    }

    /// Turns a dormant copy into a zeroed page here, mapped as allowed.
    fn materialise(&self, page: Page, l: &mut Local, out: &mut Vec<Action>) {
        out.push(Action::ZeroFill { page });
        l.copy = Held::Data;
        out.push(Action::Map { page, writable: l.writable });
    }

    /// A message from a peer.
    pub fn receive(&mut self, msg: Msg) -> Result<Vec<Action>, Error> {
        for page in msg.pages() {
            self.check_page(page)?;
        }
        let mut out = Vec::new();
        self.dispatch(msg, &mut out)?;
        Ok(out)
    }

    /// A one-sided read of `page` finished: its bytes are in our memory.
    pub fn fetched(
        &mut self,
        page: Page,
        from: NodeId,
        transfer: bool,
        evict: bool,
        epoch: u64,
        key: u64,
    ) -> Result<Vec<Action>, Error> {
        self.check_page(page)?;
        let mut out = Vec::new();
        let mut l = self.local(page);
        l.copy = Held::Data;
        self.set_local(page, l);
        // an eviction's data is parked here (`key`: how the home reads it
        // there); zeros are not (they are filled here, no bytes to keep
        // still)
        let park = evict.then_some(key);
        self.arrived(page, from, transfer, evict, park, epoch, &mut out)?;
        Ok(out)
    }

    /// The page arrived (fetched or zero-filled): map it, wake the fault,
    /// and move the transaction on.
    #[allow(clippy::too_many_arguments)]
    fn arrived(
        &mut self,
        page: Page,
        from: NodeId,
        transfer: bool,
        evict: bool,
        park: Option<u64>,
        epoch: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        let mut l = self.local(page);
        if transfer {
            l.epoch = epoch;
        }
        if !evict {
            // this answers our request; an eviction to us does not, and the
            // request the home still holds will be answered in its turn
            l.requested = false;
        }
        l.owner |= transfer;
        if park.is_some() {
            // kept for the pod, out of our guest's view: a fault of ours
            // waits for the answer to its request (an upgrade)
            l.parked = true;
            l.writable = false;
        } else {
            l.writable = transfer;
            out.push(Action::Map { page, writable: transfer });
            if l.waiting.take().is_some() {
                out.push(Action::Wake { page });
            }
        }
        self.set_local(page, l);
        if transfer {
            // the old owner drops its copy now, then closes the transaction
            let key = park.unwrap_or(0);
            self.send_to(from, Msg::Fetched { page, from: self.id, key }, out)
        } else {
            self.send_home(page, Msg::Done { page, from: self.id, key: 0 }, out)
        }
    }

    /// Sends `msg` to `page`'s home (which may be us).
    fn send_home(&mut self, page: Page, msg: Msg, out: &mut Vec<Action>) -> Result<(), Error> {
        let home = self.config.home(page);
        if home == self.id {
            self.home_receive(msg, out)
        } else {
            out.push(Action::Send { to: home, msg });
            Ok(())
        }
    }

    /// Sends `msg` to `to` (which may be us).
    fn send_to(&mut self, to: NodeId, msg: Msg, out: &mut Vec<Action>) -> Result<(), Error> {
        if to == self.id {
            self.dispatch(msg, out)
        } else {
            out.push(Action::Send { to, msg });
            Ok(())
        }
    }

    /// Hands a message to our home side or our node side.
    fn dispatch(&mut self, msg: Msg, out: &mut Vec<Action>) -> Result<(), Error> {
        match msg {
            Msg::Request { .. }
            | Msg::Done { .. }
            | Msg::GrantDone { .. }
            | Msg::InvalAck { .. }
            | Msg::Evict { .. }
            | Msg::Redormant { .. }
            | Msg::Evicted { .. }
            | Msg::Free { .. }
            | Msg::Unshare { .. } => self.home_receive(msg, out),
            _ => self.node_receive(msg, out),
        }
    }

    /// Our protected copy goes to `to`: a dormant one as a zero-fill
    /// answer straight away, one with data through [`Action::Offer`] (the
    /// VMM checks it for zeros first).
    #[allow(clippy::too_many_arguments)]
    fn hand_out(
        &mut self,
        page: Page,
        to: NodeId,
        dormant: bool,
        transfer: bool,
        evict: bool,
        epoch: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        if dormant {
            self.ready(page, to, true, transfer, evict, epoch, 0, 0, out)
        } else {
            out.push(Action::Offer { page, to, transfer, evict, epoch });
            Ok(())
        }
    }

    /// Drops our copy, keeping what we wait for: a fault, our request,
    /// and an eviction or re-dormanting of ours still unanswered (while it
    /// is, no request of ours goes out: one message per page from a node to
    /// its home at a time, so a stale eviction can never apply to a later
    /// ownership).
    fn drop_copy(&mut self, page: Page, to: Option<NodeId>, out: &mut Vec<Action>) {
        let l = self.local(page);
        if l.copy == Held::Data {
            out.push(Action::Drop { page, to });
        }
        self.set_local(
            page,
            Local {
                waiting: l.waiting,
                requested: l.requested,
                protected: l.protected,
                freeing: l.freeing,
                unsharing: l.unsharing,
                ..Local::default()
            },
        );
    }

    fn node_receive(&mut self, msg: Msg, out: &mut Vec<Action>) -> Result<(), Error> {
        match msg.clone() {
            Msg::Grant { answers, pages } => {
                let Some(&(first, _)) = pages.first() else { return Err(self.unexpected(0, &msg)) };
                if !pages.iter().any(|&(p, _)| p == answers) || !self.local(answers).requested {
                    return Err(self.unexpected(answers, &msg));
                }
                for &(page, epoch) in &pages {
                    self.check_page(page)?;
                    let mut l = self.local(page);
                    if l.copy != Held::None || l.owner || self.config.home(page) != self.config.home(first) {
                        return Err(self.unexpected(page, &msg));
                    }
                    l.owner = true;
                    l.writable = true;
                    l.copy = Held::Dormant;
                    // a request of ours for another page of the block is
                    // still on its way: its answer comes later (and only
                    // an answer to a request of ours is taken)
                    if page == answers {
                        l.requested = false;
                    }
                    l.epoch = epoch;
                    if l.waiting.take().is_some() {
                        self.materialise(page, &mut l, out);
                        out.push(Action::Wake { page });
                    }
                    self.set_local(page, l);
                }
                let pages = pages.into_iter().map(|(p, _)| p).collect();
                self.send_home(first, Msg::GrantDone { pages, from: self.id }, out)?;
            }
            Msg::Share { page, to, .. } => {
                let mut l = self.local(page);
                if !l.owner || l.copy == Held::None || l.handing.is_some() {
                    return Err(self.unexpected(page, &msg));
                }
                if l.writable && l.copy == Held::Data {
                    out.push(Action::WriteProtect { page });
                }
                l.writable = false;
                #[cfg(test)]
                if self.sabotage == Sabotage::NoWriteProtect {
                    l.writable = true;
                }
                let dormant = l.copy == Held::Dormant;
                self.set_local(page, l);
                self.hand_out(page, to, dormant, false, false, 0, out)?;
            }
            Msg::Transfer { page, to, evict, epoch, .. } => {
                let mut l = self.local(page);
                if !l.owner || l.copy == Held::None || l.handing.is_some() || (evict && !l.protected) {
                    return Err(self.unexpected(page, &msg));
                }
                if evict {
                    // our eviction is answered; hand-over blocks requests
                    // until it is complete
                    l.protected = false;
                }
                // the new owner will write as soon as it has the bytes: our
                // guest must not see this copy any more (not even to read)
                if l.copy == Held::Data {
                    out.push(Action::Unmap { page });
                }
                l.writable = false;
                l.handing = Some(to);
                let dormant = l.copy == Held::Dormant;
                self.set_local(page, l);
                self.hand_out(page, to, dormant, true, evict, epoch, out)?;
            }
            Msg::Upgrade { page } => {
                let mut l = self.local(page);
                if !l.owner || l.copy == Held::None || l.handing.is_some() {
                    return Err(self.unexpected(page, &msg));
                }
                l.writable = true;
                l.requested = false;
                l.parked = false;
                if l.copy == Held::Data {
                    out.push(Action::Map { page, writable: true });
                } else if l.waiting.is_some() {
                    // granted while our request travelled: zero-fill only
                    // for a fault that waits
                    self.materialise(page, &mut l, out);
                }
                if l.waiting.take().is_some() {
                    out.push(Action::Wake { page });
                }
                self.set_local(page, l);
                self.send_home(page, Msg::Done { page, from: self.id, key: 0 }, out)?;
            }
            Msg::Ready { page, from, dormant, transfer, evict, epoch, digest, key } => {
                self.check_page(page)?;
                let mut l = self.local(page);
                // only an answer to our request, or an eviction to us (that
                // one comes from the page's home, see `Msg::Evicted`)
                if l.owner || l.handing.is_some() || !(l.requested || (evict && transfer)) {
                    return Err(self.unexpected(page, &msg));
                }
                if transfer && l.copy != Held::None {
                    // we were a reader: our copy is current (every write
                    // invalidates readers first), no need to read it again
                    self.arrived(page, from, true, evict, None, epoch, out)?;
                } else if dormant {
                    out.push(Action::ZeroFill { page });
                    l.copy = Held::Data;
                    self.set_local(page, l);
                    self.arrived(page, from, transfer, evict, None, epoch, out)?;
                } else {
                    // the bytes arrive in `fetched`
                    out.push(Action::Fetch(Fetch { page, from, transfer, evict, epoch, digest, key }));
                }
            }
            Msg::Fetched { page, from, key } => {
                // only the node we hand the page to has it, or, for a page
                // parked here, the home, which pulled it itself
                let l = self.local(page);
                let pulled = l.parked && l.owner && l.handing.is_none() && from == self.config.home(page);
                if l.handing != Some(from) && !pulled {
                    return Err(self.unexpected(page, &msg));
                }
                self.drop_copy(page, Some(from), out);
                self.send_home(page, Msg::Done { page, from: self.id, key }, out)?;
                self.request_if_needed(page, out)?;
            }
            Msg::Inval { page, .. } => {
                let l = self.local(page);
                if l.owner || l.handing.is_some() {
                    return Err(self.unexpected(page, &msg));
                }
                self.drop_copy(page, None, out);
                self.send_home(page, Msg::InvalAck { page, from: self.id }, out)?;
            }
            Msg::Refused { page } => {
                // the page stays ours (if it still is), write-protected:
                // readers may have joined meanwhile, so a write asks the home
                let mut l = self.local(page);
                l.protected = false;
                self.set_local(page, l);
                out.push(Action::Refused { page });
                self.send_home(page, Msg::Done { page, from: self.id, key: 0 }, out)?;
                self.request_if_needed(page, out)?;
            }
            Msg::Dormanted { page } => {
                let l = self.local(page);
                if !l.owner || !l.protected {
                    return Err(self.unexpected(page, &msg));
                }
                self.drop_copy(page, None, out);
                let mut l = self.local(page);
                l.protected = false;
                self.set_local(page, l);
                self.send_home(page, Msg::Done { page, from: self.id, key: 0 }, out)?;
                self.request_if_needed(page, out)?;
            }
            Msg::Forget { page } => {
                let l = self.local(page);
                if !l.owner || l.handing.is_some() {
                    return Err(self.unexpected(page, &msg));
                }
                if l.copy == Held::Data {
                    out.push(Action::Forget { page });
                }
                self.set_local(page, Local { copy: Held::None, ..l });
                self.drop_copy(page, None, out);
                self.send_home(page, Msg::Done { page, from: self.id, key: 0 }, out)?;
            }
            Msg::Freed { page } => {
                let mut l = self.local(page);
                if !l.freeing {
                    return Err(self.unexpected(page, &msg));
                }
                l.freeing = false;
                self.set_local(page, l);
                out.push(Action::Freed { page });
            }
            Msg::Unshared { page } => {
                let mut l = self.local(page);
                if !l.unsharing {
                    return Err(self.unexpected(page, &msg));
                }
                l.unsharing = false;
                self.set_local(page, l);
                self.request_if_needed(page, out)?;
            }
            other => return Err(self.unexpected(0, &other)),
        }
        Ok(())
    }

    /// The guest freed `page` (its contents no longer matter): asks the
    /// home to make it dormant wherever it is held. [`Action::Freed`] says
    /// when that is done; until then the guest must not touch the page
    /// (a balloon device holds the report until then). Nothing happens if
    /// a free of ours is under way already.
    pub fn free(&mut self, page: Page) -> Result<Vec<Action>, Error> {
        self.check_page(page)?;
        let mut out = Vec::new();
        let mut l = self.local(page);
        if l.freeing {
            return Ok(out);
        }
        l.freeing = true;
        self.set_local(page, l);
        self.send_home(page, Msg::Free { page, from: self.id }, &mut out)?;
        Ok(out)
    }

    /// Answers an [`Action::Offer`]: `zero` says whether our (protected)
    /// copy is all zeros; `digest` is what its bytes hash to, for pods
    /// that check pulled pages end to end (else 0); `key` how a peer's
    /// one-sided read reaches it (see [`Msg::Ready`]).
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &mut self,
        page: Page,
        to: NodeId,
        transfer: bool,
        evict: bool,
        epoch: u64,
        zero: bool,
        digest: u64,
        key: u64,
    ) -> Result<Vec<Action>, Error> {
        self.check_page(page)?;
        let mut out = Vec::new();
        #[cfg(test)]
        let zero = zero && self.sabotage != Sabotage::ShipZeroPages;
        let (digest, key) = if zero { (0, 0) } else { (digest, key) };
        self.ready(page, to, zero, transfer, evict, epoch, digest, key, &mut out)?;
        Ok(out)
    }

    /// Our copy of `page` is protected: `to` may take it. A requester
    /// hears it from us; an eviction's target from the page's home, which
    /// alone knows that the eviction is real ([`Msg::Evicted`]).
    #[allow(clippy::too_many_arguments)]
    fn ready(
        &mut self,
        page: Page,
        to: NodeId,
        dormant: bool,
        transfer: bool,
        evict: bool,
        epoch: u64,
        digest: u64,
        key: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        if evict {
            self.send_home(page, Msg::Evicted { page, from: self.id, to, dormant, epoch, digest, key }, out)
        } else {
            self.send_to(to, Msg::Ready { page, from: self.id, dormant, transfer, evict, epoch, digest, key }, out)
        }
    }

    /// We own `page` and want it elsewhere: to `to`, or, when its contents
    /// are all zeros (`to` is None), nowhere: dormant again. Write-protects
    /// our copy until the home answers. Does nothing unless the page is
    /// settled here ([`Local::evictable`]). A page others read goes too:
    /// the home invalidates its readers first, as for a writer.
    pub fn evict(&mut self, page: Page, to: Option<NodeId>) -> Result<Vec<Action>, Error> {
        self.check_page(page)?;
        let mut out = Vec::new();
        let mut l = self.local(page);
        if !l.evictable() || to == Some(self.id) {
            return Ok(out);
        }
        if l.writable {
            // (a shared or parked copy is write-protected already)
            out.push(Action::WriteProtect { page });
        }
        l.writable = false;
        l.protected = true;
        let epoch = l.epoch;
        self.set_local(page, l);
        let msg = match to {
            Some(to) => Msg::Evict { page, from: self.id, to, epoch },
            None => Msg::Redormant { page, from: self.id, epoch },
        };
        self.send_home(page, msg, &mut out)?;
        Ok(out)
    }

    /// We read `page` through a read copy and want its memory back: the
    /// copy goes at once ([`Action::Drop`]: the owner keeps the page, so
    /// nothing moves) and the home hears it ([`Msg::Unshare`]). Does
    /// nothing unless we hold a settled read copy nobody waits on.
    pub fn unshare(&mut self, page: Page) -> Result<Vec<Action>, Error> {
        self.check_page(page)?;
        let mut out = Vec::new();
        let l = self.local(page);
        if l.owner
            || l.copy != Held::Data
            || l.handing.is_some()
            || l.requested
            || l.waiting.is_some()
            || l.freeing
            || l.unsharing
        {
            return Ok(out);
        }
        self.drop_copy(page, None, &mut out);
        let mut l = self.local(page);
        l.unsharing = true;
        self.set_local(page, l);
        self.send_home(page, Msg::Unshare { page, from: self.id }, &mut out)?;
        Ok(out)
    }

    // ---- the home side ----------------------------------------------

    fn home_receive(&mut self, msg: Msg, out: &mut Vec<Action>) -> Result<(), Error> {
        match msg.clone() {
            Msg::Request { page, .. }
            | Msg::Evict { page, .. }
            | Msg::Redormant { page, .. }
            | Msg::Free { page, .. }
            | Msg::Unshare { page, .. } => {
                self.check_page(page)?;
                if self.config.home(page) != self.id {
                    return Err(self.unexpected(page, &msg));
                }
                let mut d = self.dir(page);
                d.queue.push_back(msg);
                self.set_dir(page, d);
                self.home_next(page, out)?;
            }
            Msg::InvalAck { page, from } => {
                let mut d = self.dir(page);
                let acked = d.busy.as_mut().is_some_and(|t| t.acks_left.remove(&from));
                if !acked {
                    return Err(self.unexpected(page, &msg));
                }
                d.readers.remove(&from);
                self.set_dir(page, d);
                self.home_proceed(page, out)?;
            }
            Msg::Done { page, from, key } => {
                let mut d = self.dir(page);
                let t = match d.busy.take() {
                    Some(t) if t.closer == from && t.sent && t.kind != TxnKind::Grant => t,
                    _ => return Err(self.unexpected(page, &msg)),
                };
                match t.kind {
                    TxnKind::Share => {
                        d.readers.insert(t.to);
                    }
                    TxnKind::Transfer => {
                        d.owner = Some(t.to);
                        d.readers.clear();
                        d.epoch += 1;
                        d.parked = t.evict && t.parks;
                        // the target's key of its parked copy, which its
                        // `Fetched` gave the old owner (the closer)
                        d.key = if d.parked { key } else { 0 };
                        #[cfg(test)]
                        if self.sabotage == Sabotage::KeepParkedKey && d.key != 0 {
                            d.key = self.kept_key.get_or_insert(key).to_owned();
                        }
                        if !d.parked {
                            d.digest = 0;
                        }
                    }
                    TxnKind::Upgrade => {
                        d.readers.clear();
                        d.parked = false;
                        d.digest = 0;
                        d.key = 0;
                    }
                    TxnKind::Redormant | TxnKind::Free => {
                        d.owner = None;
                        d.readers.clear();
                        d.epoch += 1;
                        d.parked = false;
                        d.digest = 0;
                        d.key = 0;
                    }
                    TxnKind::Refuse | TxnKind::Grant => {}
                }
                self.set_dir(page, d);
                if t.kind == TxnKind::Free {
                    self.send_to(t.to, Msg::Freed { page }, out)?;
                }
                self.home_next(page, out)?;
            }
            Msg::Evicted { page, from, to, dormant, epoch, digest, key } => {
                // the owner protected its copy for the eviction we began:
                // pass the word on to the target
                let d = self.dir(page);
                let ours = d.busy.as_ref().is_some_and(|t| {
                    t.kind == TxnKind::Transfer && t.evict && t.sent && t.closer == from && t.to == to
                });
                if !ours || self.config.home(page) != self.id {
                    return Err(self.unexpected(page, &msg));
                }
                let mut d = d;
                if let Some(t) = d.busy.as_mut() {
                    t.parks = !dormant;
                }
                // (no direct read can happen before the transaction ends)
                d.digest = digest;
                self.set_dir(page, d);
                let ready = Msg::Ready { page, from, dormant, transfer: true, evict: true, epoch, digest, key };
                self.send_to(to, ready, out)?;
            }
            Msg::GrantDone { pages, from } => {
                for &page in &pages {
                    let granted =
                        |d: &DirEntry| d.busy.as_ref().is_some_and(|t| t.kind == TxnKind::Grant && t.to == from);
                    if !self.dir.peek(page).is_some_and(granted) {
                        return Err(self.unexpected(page, &msg));
                    }
                    self.dir.get_mut(page).busy = None;
                }
                for page in pages {
                    self.home_next(page, out)?;
                }
            }
            other => return Err(self.unexpected(0, &other)),
        }
        Ok(())
    }

    /// Starts the next queued request of `page` if none is under way.
    fn home_next(&mut self, page: Page, out: &mut Vec<Action>) -> Result<(), Error> {
        // most calls find nothing to start: look before copying the entry
        if !self.dir.peek(page).is_some_and(|d| d.busy.is_none() && !d.queue.is_empty()) {
            return Ok(());
        }
        let mut d = self.dir(page);
        let Some(req) = d.queue.pop_front() else { return Ok(()) };
        self.set_dir(page, d.clone());
        let txn = |kind, to, closer, acks_left| Txn {
            kind,
            evict: false,
            to,
            closer,
            acks_left,
            sent: false,
            parks: false,
            since: 0,
        };
        match req {
            Msg::Request { access, from, since, .. } => match d.owner {
                None => {
                    // dormant: grant every dormant, idle page of the block
                    let mut pages = Vec::new();
                    for p in self.config.block_of(page) {
                        let idle =
                            |e: &DirEntry| e.owner.is_none() && e.busy.is_none() && (p == page || e.queue.is_empty());
                        if self.dir.peek(p).is_none_or(idle) {
                            let e = self.dir.get_mut(p);
                            e.owner = Some(from);
                            e.readers.clear();
                            e.epoch += 1;
                            let epoch = e.epoch;
                            e.busy = Some(Txn {
                                kind: TxnKind::Grant,
                                evict: false,
                                to: from,
                                closer: from,
                                acks_left: BTreeSet::new(),
                                sent: true,
                                parks: false,
                                since,
                            });
                            pages.push((p, epoch));
                        }
                    }
                    self.send_to(from, Msg::Grant { answers: page, pages }, out)?;
                }
                Some(owner) if owner == from => {
                    // the owner itself needs write access (it shared the
                    // page, or an eviction was refused): invalidate the
                    // readers and let it write
                    let others = d.readers.iter().copied().filter(|r| *r != from).collect();
                    self.begin(page, Txn { since, ..txn(TxnKind::Upgrade, from, from, others) }, out)?;
                }
                Some(_) if access == Access::Read => {
                    self.begin(page, Txn { since, ..txn(TxnKind::Share, from, from, BTreeSet::new()) }, out)?;
                }
                Some(owner) => {
                    let others = d.readers.iter().copied().filter(|r| *r != from).collect();
                    self.begin(page, Txn { since, ..txn(TxnKind::Transfer, from, owner, others) }, out)?;
                }
            },
            // the readers (the target among them, if it is one) are
            // invalidated first, as for a writer: a page others read can
            // leave a node short of memory too
            Msg::Evict { from, to, epoch, .. } => {
                if d.owner != Some(from) || d.epoch != epoch || to == from {
                    self.begin(page, txn(TxnKind::Refuse, from, from, BTreeSet::new()), out)?;
                } else {
                    let t = Txn { evict: true, ..txn(TxnKind::Transfer, to, from, d.readers.clone()) };
                    self.begin(page, t, out)?;
                }
            }
            Msg::Redormant { from, epoch, .. } => {
                if d.owner != Some(from) || d.epoch != epoch {
                    self.begin(page, txn(TxnKind::Refuse, from, from, BTreeSet::new()), out)?;
                } else {
                    self.begin(page, txn(TxnKind::Redormant, from, from, d.readers.clone()), out)?;
                }
            }
            Msg::Free { from, .. } => match d.owner {
                // dormant already: nothing holds it (a dormant page has no
                // readers); answer and go on with the queue
                None => {
                    self.send_to(from, Msg::Freed { page }, out)?;
                    self.home_next(page, out)?;
                }
                Some(owner) => {
                    let readers = d.readers.clone();
                    self.begin(page, txn(TxnKind::Free, from, owner, readers), out)?;
                }
            },
            Msg::Unshare { from, .. } => {
                // off the readers (an invalidation may have taken it off
                // already, and an eviction to it may since have made it
                // the owner); nothing else changes, so no transaction
                let mut d = d;
                d.readers.remove(&from);
                self.set_dir(page, d);
                self.send_to(from, Msg::Unshared { page }, out)?;
                self.home_next(page, out)?;
            }
            other => return Err(self.unexpected(page, &other)),
        }
        Ok(())
    }

    /// Opens a transaction: invalidations first, then its message.
    fn begin(&mut self, page: Page, txn: Txn, out: &mut Vec<Action>) -> Result<(), Error> {
        #[cfg(test)]
        let txn =
            if self.sabotage == Sabotage::SkipInvalidation { Txn { acks_left: BTreeSet::new(), ..txn } } else { txn };
        let mut d = self.dir(page);
        let invalidate: Vec<NodeId> = txn.acks_left.iter().copied().collect();
        let since = txn.since;
        d.busy = Some(txn);
        self.set_dir(page, d);
        for r in invalidate {
            self.send_to(r, Msg::Inval { page, since }, out)?;
        }
        self.home_proceed(page, out)
    }

    /// Once every invalidation is acknowledged, sends the transaction's
    /// message.
    fn home_proceed(&mut self, page: Page, out: &mut Vec<Action>) -> Result<(), Error> {
        let mut d = self.dir(page);
        let Some(t) = d.busy.as_mut() else { return Ok(()) };
        if !t.acks_left.is_empty() || t.sent {
            return Ok(());
        }
        t.sent = true;
        let t = t.clone();
        let owner = d.owner;
        let next_epoch = d.epoch + 1;
        let (parked, digest, key) = (d.parked, d.digest, d.key);
        #[cfg(test)]
        let parked = parked || self.sabotage == Sabotage::DirectUnparked;
        self.set_dir(page, d);
        // the home itself wants a page parked elsewhere: its bytes cannot
        // change there, so it reads them at once, asking nobody (the owner
        // hears `Fetched` afterwards, for a transfer): no message on the
        // fault's way
        let direct = parked && t.to == self.id && !t.evict && matches!(t.kind, TxnKind::Transfer | TxnKind::Share);
        if let (true, Some(from)) = (direct, owner.filter(|&o| o != self.id)) {
            let transfer = t.kind == TxnKind::Transfer;
            let epoch = if transfer { next_epoch } else { 0 };
            #[cfg(test)]
            let digest = if self.sabotage == Sabotage::ForgetParkedDigest { 0 } else { digest };
            let ready = Msg::Ready { page, from, dormant: false, transfer, evict: false, epoch, digest, key };
            return self.node_receive(ready, out);
        }
        let (to, msg) = match t.kind {
            TxnKind::Share => (owner, Msg::Share { page, to: t.to, since: t.since }),
            TxnKind::Transfer => {
                (owner, Msg::Transfer { page, to: t.to, evict: t.evict, epoch: next_epoch, since: t.since })
            }
            TxnKind::Upgrade => (owner, Msg::Upgrade { page }),
            TxnKind::Redormant => (owner, Msg::Dormanted { page }),
            TxnKind::Free => (owner, Msg::Forget { page }),
            TxnKind::Refuse => (Some(t.to), Msg::Refused { page }),
            TxnKind::Grant => return Ok(()),
        };
        let to = to.ok_or_else(|| self.unexpected(page, &msg))?;
        self.send_to(to, msg, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: u32) -> Config {
        Config { nodes, block_pages: 4, pages: 16 }
    }

    fn sends(acts: &[Action]) -> Vec<(NodeId, Msg)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn shapes_without_nodes_or_block_pages_are_refused() {
        assert!(Config::new(0, 4, 16).is_none());
        assert!(Config::new(2, 0, 16).is_none());
        assert_eq!(Config::new(2, 4, 16), Some(cfg(2)));
    }

    #[test]
    fn a_preloaded_page_is_owned_with_data_and_its_home_knows() {
        let c = cfg(3);
        let page = c.block_pages; // home: node 1
        let mut owner = Node::new(0, c);
        let mut home = Node::new(1, c);
        owner.preload(page, 0).unwrap();
        home.preload(page, 0).unwrap();
        let l = owner.local(page);
        assert!(l.owner && l.copy == Held::Data && l.allows(Access::Write));
        assert_eq!(home.dir(page).owner, Some(0));
        assert_eq!(home.local(page), Local::default());
        // another node's write goes to the owner, not to a zero-fill grant
        let acts = home.receive(Msg::Request { page, access: Access::Write, from: 2, since: 7 }).unwrap();
        assert_eq!(sends(&acts), vec![(0, Msg::Transfer { page, to: 2, evict: false, epoch: 2, since: 7 })]);
        assert!(owner.preload(c.pages, 0).is_err(), "a page outside the guest");
    }

    #[test]
    fn a_request_says_since_when_its_vcpu_waits_and_the_home_passes_it_on() {
        let c = cfg(3);
        let page = c.block_pages; // home: node 1
        let mut asker = Node::new(2, c);
        asker.since = 11;
        let acts = asker.fault(page, Access::Read).unwrap();
        assert_eq!(sends(&acts), vec![(1, Msg::Request { page, access: Access::Read, from: 2, since: 11 })]);
        let mut home = Node::new(1, c);
        home.preload(page, 0).unwrap();
        let acts = home.receive(Msg::Request { page, access: Access::Read, from: 2, since: 11 }).unwrap();
        assert_eq!(sends(&acts), vec![(0, Msg::Share { page, to: 2, since: 11 })]);
        home.receive(Msg::Done { page, from: 2, key: 0 }).unwrap();
        // the owner writes: its reader is invalidated with the owner's since
        let acts = home.receive(Msg::Request { page, access: Access::Write, from: 0, since: 9 }).unwrap();
        assert_eq!(sends(&acts), vec![(2, Msg::Inval { page, since: 9 })]);
    }

    #[test]
    fn a_freed_page_held_by_another_node_is_dropped_there_and_nothing_moves() {
        let c = cfg(2);
        let mut home = Node::new(0, c);
        let mut holder = Node::new(1, c);
        home.preload(0, 1).unwrap();
        holder.preload(0, 1).unwrap();
        // node 0 (the page's home) frees it: the holder is told to forget it
        let acts = home.free(0).unwrap();
        assert_eq!(sends(&acts), vec![(1, Msg::Forget { page: 0 })]);
        assert!(home.local(0).freeing);
        // a second free while the first is under way asks nothing
        assert!(home.free(0).unwrap().is_empty());
        let acts = holder.receive(Msg::Forget { page: 0 }).unwrap();
        assert!(acts.contains(&Action::Forget { page: 0 }), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Fetch(_) | Action::Offer { .. })));
        assert_eq!(sends(&acts), vec![(0, Msg::Done { page: 0, from: 1, key: 0 })]);
        assert_eq!(holder.local(0), Local::default());
        let acts = home.receive(Msg::Done { page: 0, from: 1, key: 0 }).unwrap();
        assert_eq!(acts, vec![Action::Freed { page: 0 }]);
        assert!(!home.local(0).freeing);
        assert_eq!(home.dir(0).owner, None, "dormant again");
        // an answer nobody asked for is a peer's error
        assert!(home.receive(Msg::Freed { page: 0 }).is_err());
        // the next touch anywhere is a dormant first touch: zero-filled
        let acts = home.fault(0, Access::Read).unwrap();
        assert!(acts.contains(&Action::ZeroFill { page: 0 }), "{acts:?}");
    }

    #[test]
    fn freeing_a_dormant_page_is_answered_at_once() {
        let mut n = Node::new(0, cfg(2));
        assert_eq!(n.free(2).unwrap(), vec![Action::Freed { page: 2 }]);
        assert_eq!(n.dir(2).owner, None);
    }

    #[test]
    fn homes_spread_blocks_over_nodes() {
        let c = cfg(3);
        assert_eq!((0..16).map(|p| c.home(p)).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0]);
        assert_eq!(c.block_of(6), 4..8);
        let short = Config { nodes: 2, block_pages: 4, pages: 6 };
        assert_eq!(short.block_of(5), 4..6);
    }

    #[test]
    fn a_first_touch_at_home_zero_fills_the_page_with_no_message() {
        let mut n = Node::new(0, cfg(2));
        let acts = n.fault(1, Access::Write).unwrap();
        assert!(sends(&acts).is_empty(), "{acts:?}");
        assert!(acts.contains(&Action::ZeroFill { page: 1 }));
        assert!(acts.contains(&Action::Wake { page: 1 }));
        assert!(!acts.iter().any(|a| matches!(a, Action::Fetch(_))));
        // the whole block was granted: its other pages need nothing at all
        let acts = n.fault(3, Access::Read).unwrap();
        assert_eq!(
            acts,
            vec![Action::ZeroFill { page: 3 }, Action::Map { page: 3, writable: true }, Action::Wake { page: 3 }]
        );
        // the next block's home is node 1
        let acts = n.fault(4, Access::Write).unwrap();
        assert_eq!(sends(&acts), vec![(1, Msg::Request { page: 4, access: Access::Write, from: 0, since: 0 })]);
    }

    #[test]
    fn a_remote_first_touch_costs_one_grant_for_the_whole_block() {
        let mut home = Node::new(0, cfg(2));
        let mut n1 = Node::new(1, cfg(2));
        let req = sends(&n1.fault(2, Access::Write).unwrap());
        let grant = sends(&home.receive(req[0].1.clone()).unwrap());
        assert_eq!(grant, vec![(1, Msg::Grant { answers: 2, pages: vec![(0, 1), (1, 1), (2, 1), (3, 1)] })]);
        let acts = n1.receive(grant[0].1.clone()).unwrap();
        assert!(acts.contains(&Action::ZeroFill { page: 2 }) && acts.contains(&Action::Wake { page: 2 }));
        let done = sends(&acts);
        assert_eq!(done, vec![(0, Msg::GrantDone { pages: vec![0, 1, 2, 3], from: 1 })]);
        assert!(sends(&home.receive(done[0].1.clone()).unwrap()).is_empty());
        assert_eq!(home.dir(3).owner, Some(1));
        // a later first touch in the block: local, no message
        assert!(sends(&n1.fault(0, Access::Write).unwrap()).is_empty());
    }

    #[test]
    fn a_page_with_contents_is_pulled_from_its_owner_and_the_owner_drops_it_after() {
        let c = cfg(2);
        let (mut n0, mut n1) = (Node::new(0, c), Node::new(1, c));
        n0.fault(0, Access::Write).unwrap(); // node 0 owns block 0
        let req = sends(&n1.fault(0, Access::Write).unwrap());
        let acts = n0.receive(req[0].1.clone()).unwrap();
        // the owner is also the home: it unmaps, then offers its copy
        assert!(acts.contains(&Action::Unmap { page: 0 }), "{acts:?}");
        let Some(Action::Offer { transfer: true, epoch, .. }) = acts.iter().find(|a| matches!(a, Action::Offer { .. }))
        else {
            panic!("{acts:?}")
        };
        let ready = sends(&n0.offer(0, 1, true, false, *epoch, false, 0, 7).unwrap());
        let acts = n1.receive(ready[0].1.clone()).unwrap();
        assert!(matches!(acts[..], [Action::Fetch(Fetch { page: 0, from: 0, transfer: true, .. })]), "{acts:?}");
        let acts = n1.fetched(0, 0, true, false, *epoch, 0).unwrap();
        assert!(acts.contains(&Action::Map { page: 0, writable: true }) && acts.contains(&Action::Wake { page: 0 }));
        let fetched = sends(&acts);
        assert_eq!(fetched, vec![(0, Msg::Fetched { page: 0, from: 1, key: 0 })]);
        let acts = n0.receive(fetched[0].1.clone()).unwrap();
        assert!(acts.contains(&Action::Drop { page: 0, to: Some(1) }), "{acts:?}");
        assert_eq!(n0.dir(0).owner, Some(1));
        assert!(n1.local(0).allows(Access::Write) && !n0.local(0).allows(Access::Read));
    }

    #[test]
    fn a_reader_drops_its_read_copy_and_the_next_write_invalidates_nobody() {
        let c = cfg(2);
        let (mut n0, mut n1) = (Node::new(0, c), Node::new(1, c));
        n0.fault(0, Access::Write).unwrap(); // node 0 owns page 0 (and is its home)
                                             // node 1 reads it: a read copy
        let req = sends(&n1.fault(0, Access::Read).unwrap());
        let acts = n0.receive(req[0].1.clone()).unwrap();
        assert!(acts.contains(&Action::WriteProtect { page: 0 }), "{acts:?}");
        let ready = sends(&n0.offer(0, 1, false, false, 0, false, 0, 0).unwrap());
        n1.receive(ready[0].1.clone()).unwrap();
        let done = sends(&n1.fetched(0, 0, false, false, 0, 0).unwrap());
        n0.receive(done[0].1.clone()).unwrap();
        assert!(n0.dir(0).readers.contains(&1));
        // an owner cannot unshare; the reader can, once
        assert!(n0.unshare(0).unwrap().is_empty());
        let acts = n1.unshare(0).unwrap();
        assert_eq!(acts[0], Action::Drop { page: 0, to: None });
        assert_eq!(sends(&acts), vec![(0, Msg::Unshare { page: 0, from: 1 })]);
        assert!(n1.unshare(0).unwrap().is_empty() && !n1.local(0).allows(Access::Read));
        // a fault meanwhile waits for the home's answer: no request yet
        assert!(sends(&n1.fault(0, Access::Read).unwrap()).is_empty());
        let answer = sends(&n0.receive(Msg::Unshare { page: 0, from: 1 }).unwrap());
        assert_eq!(answer, vec![(1, Msg::Unshared { page: 0 })]);
        assert!(n0.dir(0).readers.is_empty());
        // the answer lets the waiting fault ask
        let req = sends(&n1.receive(Msg::Unshared { page: 0 }).unwrap());
        assert_eq!(req, vec![(0, Msg::Request { page: 0, access: Access::Read, from: 1, since: 0 })]);
        // an answer nobody asked for is a protocol error
        assert!(n1.receive(Msg::Unshared { page: 0 }).is_err());
    }

    #[test]
    fn a_zero_page_is_zero_filled_at_the_requester_not_sent() {
        let c = cfg(2);
        let (mut n0, mut n1) = (Node::new(0, c), Node::new(1, c));
        n0.fault(0, Access::Write).unwrap();
        let req = sends(&n1.fault(0, Access::Read).unwrap());
        let acts = n0.receive(req[0].1.clone()).unwrap();
        assert!(acts.contains(&Action::WriteProtect { page: 0 }));
        let ready = sends(&n0.offer(0, 1, false, false, 0, true, 0, 0).unwrap());
        let acts = n1.receive(ready[0].1.clone()).unwrap();
        assert!(acts.contains(&Action::ZeroFill { page: 0 }), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, Action::Fetch(_))));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut n = Node::new(1, cfg(2));
        assert!(n.receive(Msg::Fetched { page: 0, from: 0, key: 0 }).is_err());
        assert!(n.receive(Msg::Grant { answers: 0, pages: vec![] }).is_err());
        assert!(n.receive(Msg::Grant { answers: 99, pages: vec![(99, 1)] }).is_err());
        assert!(n.receive(Msg::Done { page: 4, from: 0, key: 0 }).is_err());
        assert!(n.receive(Msg::Request { page: 0, access: Access::Read, from: 0, since: 0 }).is_err(), "not its home");
        assert!(n.fault(16, Access::Read).is_err());
    }
}
