//! The page engine of one pod node: the I/O-free protocol
//! ([`shoal_protocol::Node`]) wired to this node's memory, to userfaultfd
//! (on the node that runs the vCPUs) and to the fabric.
//!
//! Two kinds of event drive it, each under the engine's one lock:
//! - a guest fault ([`Engine::handle_fault`], from the fault-handler
//!   threads of the vCPU node), and
//! - a protocol message from a peer ([`Engine::on_message`], from the
//!   node's receiver thread).
//!
//! Each turns into protocol actions, carried out here in order: zero-fill
//! (batched over the dormant run of a granted block, one
//! `UFFDIO_ZEROPAGE`), one-sided fabric reads (`UFFDIO_COPY` of the bytes
//! on the vCPU node, a write into the memfd elsewhere), taking a page from
//! the guest while the memfd keeps its bytes for a peer's read
//! (`MADV_DONTNEED` on the guest view; the guest's next touch is a minor
//! fault), mapping it back (`UFFDIO_CONTINUE`), freeing it (punching the
//! memfd), and waking the faulting vCPUs.
//!
//! The vCPU node stays within `--node-memory`: a fault only starts when
//! the pages already held plus those on their way leave room, otherwise
//! it is parked; cold pages (first in, first out; the loader's pages stay)
//! are evicted ahead of need to the node with the most room, or made
//! dormant again when they are all zeros.
//!
//! Every node may run vCPUs, so every node's guest view is registered with
//! userfaultfd (missing, minor and write-protect faults). A read fault asks
//! for a read copy, mapped write-protected (pages read by vCPUs of several
//! nodes, code above all, are shared, not bounced); a write fault asks for
//! the page itself, and a write to a read copy traps and upgrades it through
//! the home. With `--node-memory` a node asks for the page itself on every
//! fault: read copies cannot be evicted yet.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use shoal_fabric::{ReadReq, Transport};
use shoal_protocol::{codec, Access, Action, Config, Held, Msg, Node, NodeId, Page};

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::metrics::{FaultLatency, NodeMetrics};
use crate::uffd::{Fault, Outcome, Uffd};

/// The first byte of every pod message: which layer it belongs to.
pub const CHANNEL_PAGES: u8 = 0;
/// Pod control messages (join checks, start, metrics, abort).
pub const CHANNEL_CONTROL: u8 = 1;

/// The fabric region id of a node's guest memory.
pub const REGION_MEMORY: u32 = 0;

// per-page flags
const RESIDENT: u16 = 1; // the memfd holds the page here
const MAPPED: u16 = 2; // the guest view maps it (vCPU node)
const PINNED: u16 = 4; // the loader's: never evicted
const QUEUED: u16 = 8; // in the eviction queue
const PENDING_ZERO: u16 = 16; // a zero-fill of this batch, not done yet
const WAITING: u16 = 32; // a vCPU waits on it
const PARKED: u16 = 64; // a fault waits for room
const COUNTED: u16 = 256; // a waiting fault's page is counted in `incoming`
const WRITABLE: u16 = 512; // the guest view maps it writable (with MAPPED)

/// What ends the VM (or the node) when the engine cannot go on.
pub type OnFatal = Arc<dyn Fn(String) + Send + Sync>;

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    pub config: Config,
    /// Dormant pages are zero-filled where they are first touched; off:
    /// every page counts as having contents at its home, and its first
    /// touch elsewhere reads them over the fabric.
    pub dormant: bool,
    /// Pages this node may hold (None: no bound).
    pub budget: Option<u64>,
    /// Pages each other node may hold (all nodes share `--node-memory`).
    pub peer_budget: Option<u64>,
    /// Never free a page's memory, only zero it in place, and fill pages
    /// through the alias view (then `UFFDIO_CONTINUE`). For verbs without
    /// on-demand paging: a registered chunk pins its pages, so a punched
    /// and refilled page would be a new page the peers' RDMA reads never
    /// see (they would read the stale pinned one).
    pub keep_pages: bool,
    /// Make read copies for read faults (this kernel can map a page
    /// write-protected in one step, see `uffd::continue_wp_supported`);
    /// otherwise every fault takes the page itself.
    pub read_copies: bool,
}

/// How a waiting fault was resolved (for the latency split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    /// Zero-filled here (a dormant page).
    Zero,
    /// Its bytes came by a one-sided read, for a read.
    RemoteRead,
    /// Its bytes came by a one-sided read, for a write.
    RemoteWrite,
    /// A read copy made writable here (the readers invalidated).
    Upgrade,
}

/// A fault waiting for its page.
#[derive(Clone, Copy, Debug)]
struct Waiter {
    since: Instant,
    access: Access,
    /// The vCPU that faulted, when the fault came from one of ours.
    vcpu: Option<u32>,
    kind: FaultKind,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    faults_already_resident: AtomicU64,
    pages_zero_filled: AtomicU64,
    pages_copied: AtomicU64,
    remote_fetches: AtomicU64,
    bytes_fabric_read: AtomicU64,
    pages_evicted: AtomicU64,
    pages_redormanted: AtomicU64,
    faults_parked: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    pages_shared: AtomicU64,
    invalidations: AtomicU64,
    ownership_transfers: AtomicU64,
}

struct State {
    node: Node,
    flags: Vec<u16>,
    resident: u64,
    pinned: u64,
    /// Eviction candidates, oldest first.
    queue: VecDeque<Page>,
    /// Our evictions not settled yet, with their targets (None: re-dormant).
    evicting: HashMap<Page, Option<NodeId>>,
    /// Pages we placed (or are placing) on each node and have not taken
    /// back, and where each of the placed ones went.
    held_by: Vec<u64>,
    placed: HashMap<Page, NodeId>,
    /// Faults waiting for a page (each will bring one page here).
    incoming: u64,
    waiting: HashMap<Page, Waiter>,
    parked: VecDeque<Page>,
    latency: FaultLatency,
    /// Faults resolved by zero-filling dormant pages, and by a one-sided
    /// read of a page with contents: the two costs the pod is judged by.
    latency_zero: FaultLatency,
    latency_remote: FaultLatency,
    latency_remote_read: FaultLatency,
    latency_remote_write: FaultLatency,
    latency_upgrade: FaultLatency,
    pending_zero: Vec<Page>,
    wakes: Vec<Page>,
    bounce: Vec<u8>,
    next_target: NodeId,
}

/// One node's page engine.
pub struct Engine {
    me: NodeId,
    settings: Settings,
    transport: Arc<dyn Transport>,
    mem: Arc<GuestMemory>,
    /// The guest view's userfaultfd: only on the node that runs vCPUs.
    uffd: Option<Arc<Uffd>>,
    state: Mutex<State>,
    counters: Counters,
    failed: AtomicBool,
    on_fatal: OnFatal,
    /// The node's vCPUs (which vCPU faulted; the migration policy).
    vcpus: std::sync::OnceLock<Arc<crate::vcpus::Vcpus>>,
    /// A guest fault happened here: this node runs vCPUs, and keeps its
    /// memory bound by evicting ahead of need.
    faulted: AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("me", &self.me).field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Where evictions ahead of need aim: some room stays free so that
/// faults rarely wait for an eviction.
fn evict_level(budget: u64) -> u64 {
    budget.saturating_sub((budget / 8).clamp(1, 1024))
}

/// A fabric error in words; a peer's departure is said the same way
/// wherever it is noticed (a send, a read, the receiver), naming the node.
fn fabric_error(what: String, e: shoal_fabric::Error) -> String {
    match e {
        shoal_fabric::Error::PeerGone { peer, reason } => format!("node {peer} left the pod: {reason} ({what})"),
        e => format!("{what}: {e}"),
    }
}

/// Encodes a page-protocol message for the fabric.
pub fn encode_page_msg(msg: &Msg) -> Vec<u8> {
    let mut out = vec![CHANNEL_PAGES];
    codec::encode(msg, &mut out);
    out
}

impl Engine {
    /// An engine for node `me` over `mem`; `uffd` is the guest view's on
    /// the vCPU node. `loaded` lists the pages the loader wrote (every node
    /// gets the same list): they start owned by node 0 with contents.
    pub fn new(
        me: NodeId,
        settings: Settings,
        transport: Arc<dyn Transport>,
        mem: Arc<GuestMemory>,
        uffd: Option<Arc<Uffd>>,
        loaded: &[(u64, u64)],
        on_fatal: OnFatal,
    ) -> Result<Self, String> {
        let pages = settings.config.pages;
        let mut node = Node::new(me, settings.config);
        let mut flags = vec![0u16; pages as usize];
        let mut pinned = 0;
        for &(offset, len) in loaded {
            for page in offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE) {
                node.preload(page, 0).map_err(|e| format!("the loaded image: {e}"))?;
                if me == 0 {
                    // in the memfd, not yet in the guest view: the first
                    // touch is a minor fault, mapped by `flush_wakes`
                    flags[page as usize] = RESIDENT | PINNED;
                    pinned += 1;
                }
            }
        }
        let nodes = settings.config.nodes as usize;
        let state = State {
            node,
            flags,
            resident: pinned,
            pinned,
            queue: VecDeque::new(),
            evicting: HashMap::new(),
            held_by: vec![0; nodes],
            placed: HashMap::new(),
            incoming: 0,
            waiting: HashMap::new(),
            parked: VecDeque::new(),
            latency: FaultLatency::default(),
            latency_zero: FaultLatency::default(),
            latency_remote: FaultLatency::default(),
            latency_remote_read: FaultLatency::default(),
            latency_remote_write: FaultLatency::default(),
            latency_upgrade: FaultLatency::default(),
            pending_zero: Vec::new(),
            wakes: Vec::new(),
            bounce: vec![0u8; (settings.config.block_pages * PAGE_SIZE) as usize],
            next_target: 0,
        };
        Ok(Engine {
            me,
            settings,
            transport,
            mem,
            uffd,
            state: Mutex::new(state),
            counters: Counters::default(),
            failed: AtomicBool::new(false),
            on_fatal,
            vcpus: std::sync::OnceLock::new(),
            faulted: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest view's userfaultfd (vCPU node).
    pub fn uffd(&self) -> Option<&Uffd> {
        self.uffd.as_deref()
    }

    /// Tells the engine which vCPUs run here (to attribute faults to them
    /// and let the migration policy see remote faults).
    pub fn set_vcpus(&self, vcpus: Arc<crate::vcpus::Vcpus>) {
        let _ = self.vcpus.set(vcpus);
    }

    /// Ends the VM (or this node) with `why`, once.
    pub fn fail(&self, why: String) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(node = self.me, "{why}");
            (self.on_fatal)(why);
        }
    }

    /// Whether the engine gave up.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    // ---- entry points ------------------------------------------------

    /// A guest fault (vCPU node). Resolves it at once when it can (a page
    /// of a granted block: zero-filled with its dormant neighbours), or
    /// starts the protocol's round trip; the vCPU wakes when the page is
    /// here. An error ends the VM.
    pub fn handle_fault(&self, fault: Fault) -> Result<(), String> {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let offset = fault
            .addr
            .checked_sub(self.mem.guest_view_base())
            .filter(|o| *o < self.mem.layout().size())
            .ok_or_else(|| format!("fault at host address {:#x} is outside guest memory", fault.addr))?;
        let page = offset / PAGE_SIZE;
        // a write, or a write to a read copy (write-protected)
        let access = if fault.write || fault.wp { Access::Write } else { Access::Read };
        let vcpu = self.vcpus.get().and_then(|v| v.vcpu_of_thread(fault.tid));
        self.faulted.store(true, Ordering::Relaxed);
        let mut st = self.lock();
        if self.failed() {
            return Err("the pod failed".into());
        }
        self.fault_page(&mut st, page, access, vcpu)?;
        self.settle(&mut st)
    }

    /// A message from a peer (any node).
    pub fn on_message(&self, from: NodeId, payload: &[u8]) -> Result<(), String> {
        self.counters.messages_received.fetch_add(1, Ordering::Relaxed);
        let msg = codec::decode(payload).map_err(|e| format!("node {from} sent a malformed page message: {e}"))?;
        let mut st = self.lock();
        if self.failed() {
            return Ok(());
        }
        self.check_peer_msg(from, &msg)?;
        match msg {
            Msg::Inval { .. } => {
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
            }
            // the page becomes ours (pulled, zero-filled, or a read copy
            // we hold already made the owner's)
            Msg::Ready { transfer: true, .. } => {
                self.counters.ownership_transfers.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let acts = st.node.receive(msg.clone()).map_err(|e| format!("page protocol: {e}"))?;
        let acts = self.with_fault_around(&mut st, acts)?;
        self.apply(&mut st, acts)?;
        self.settle(&mut st)
    }

    /// Refuses a message naming a page outside the guest or a node outside
    /// the pod, before anything indexes by them.
    fn check_peer_msg(&self, from: NodeId, msg: &Msg) -> Result<(), String> {
        let cfg = &self.settings.config;
        let (pages, nodes): (Vec<Page>, Vec<NodeId>) = match msg {
            Msg::Request { page, from, .. } => (vec![*page], vec![*from]),
            Msg::Grant { pages } => (pages.iter().map(|(p, _)| *p).collect(), vec![]),
            Msg::GrantDone { pages, from } => (pages.clone(), vec![*from]),
            Msg::Share { page, to } | Msg::Transfer { page, to, .. } => (vec![*page], vec![*to]),
            Msg::Ready { page, from, .. }
            | Msg::Fetched { page, from }
            | Msg::Done { page, from }
            | Msg::InvalAck { page, from }
            | Msg::Redormant { page, from, .. } => (vec![*page], vec![*from]),
            Msg::Evict { page, from, to, .. } => (vec![*page], vec![*from, *to]),
            Msg::Upgrade { page } | Msg::Inval { page } | Msg::Refused { page } | Msg::Dormanted { page } => {
                (vec![*page], vec![])
            }
        };
        if let Some(p) = pages.iter().find(|&&p| p >= cfg.pages) {
            return Err(format!("node {from} sent a message about page {p}, outside the guest ({} pages)", cfg.pages));
        }
        if let Some(n) = nodes.iter().find(|&&n| n >= cfg.nodes) {
            return Err(format!("node {from} sent a message naming node {n}, outside the pod ({} nodes)", cfg.nodes));
        }
        // a message's claimed sender is the connection it came on; what
        // only a page's home sends comes from that home
        let claimed = match msg {
            Msg::Request { from, .. }
            | Msg::GrantDone { from, .. }
            | Msg::Ready { from, .. }
            | Msg::Fetched { from, .. }
            | Msg::Done { from, .. }
            | Msg::InvalAck { from, .. }
            | Msg::Evict { from, .. }
            | Msg::Redormant { from, .. } => Some(*from),
            _ => None,
        };
        if let Some(c) = claimed.filter(|&c| c != from) {
            return Err(format!("node {from} sent a page message in the name of node {c}"));
        }
        if claimed.is_none() {
            if let Some(&p) = pages.first() {
                let home = cfg.home(p);
                if home != from {
                    return Err(format!("node {from} sent {msg:?}, which only page {p}'s home (node {home}) may send"));
                }
            }
        }
        Ok(())
    }

    // ---- faults --------------------------------------------------------

    fn fault_page(&self, st: &mut State, page: Page, access: Access, vcpu: Option<u32>) -> Result<(), String> {
        // with a memory bound every fault takes the page itself: read
        // copies cannot be evicted yet, so none are made (nor where the
        // kernel cannot map them write-protected); a page of ours that is
        // write-protected (an eviction refused) is then upgraded, not
        // mapped read-only
        let access = if self.makes_read_copies() { access } else { Access::Write };
        let f = st.flags[page as usize];
        let l = st.node.local(page);
        if l.copy == Held::Data && l.allows(access) && f & RESIDENT != 0 {
            // we hold it with the access asked for: resolved meanwhile
            // (another vCPU's fault, fault-around), or the guest view lost
            // the mapping (a swapped-out page raises a minor fault): map
            // it as it should be, then wake
            self.counters.faults_already_resident.fetch_add(1, Ordering::Relaxed);
            self.remap(st, page, l.writable)?;
            return self.wake_now(page);
        }
        if f & (WAITING | PARKED) != 0 {
            // already on its way; the wake covers every waiter (a write
            // behind a read asks again when the read copy arrives)
            return Ok(());
        }
        // a page held here already (mapped back after a refused eviction,
        // a read copy to upgrade, or the loader's on first touch) needs no
        // room
        let needs_room = f & RESIDENT == 0;
        if let Some(budget) = self.settings.budget.filter(|_| needs_room) {
            if st.resident + st.incoming >= budget {
                st.flags[page as usize] |= PARKED;
                st.parked.push_back(page);
                st.waiting.insert(page, Waiter { since: Instant::now(), access, vcpu, kind: FaultKind::Zero });
                self.counters.faults_parked.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        st.flags[page as usize] |= WAITING;
        if needs_room {
            st.flags[page as usize] |= COUNTED;
            st.incoming += 1;
        }
        let kind = if l.copy == Held::Data { FaultKind::Upgrade } else { FaultKind::Zero };
        let w = st.waiting.entry(page).or_insert(Waiter { since: Instant::now(), access, vcpu, kind });
        w.access = w.access.max(access);
        let acts = st.node.fault(page, access).map_err(|e| format!("page protocol: {e}"))?;
        let acts = self.with_fault_around(st, acts)?;
        self.apply(st, acts)
    }

    /// Adds the dormant neighbours of every page the actions zero-fill
    /// here (pages of a block granted to us, never touched) as far as the
    /// budget leaves room: one ioctl serves a whole run of first touches.
    fn with_fault_around(&self, st: &mut State, mut acts: Vec<Action>) -> Result<Vec<Action>, String> {
        if self.uffd.is_none() {
            return Ok(acts);
        }
        let seeds: Vec<Page> =
            acts.iter().filter_map(|a| if let Action::ZeroFill { page } = a { Some(*page) } else { None }).collect();
        // pages these actions will zero-fill, counted as they are added (a
        // rescan of the actions per neighbour would be quadratic in the
        // block, on the fault path)
        let mut planned = seeds.len() as u64;
        for seed in seeds {
            let block = self.settings.config.block_of(seed);
            for q in block {
                if q == seed {
                    continue;
                }
                if let Some(budget) = self.settings.budget {
                    // leave parked faults their room: fault-around then
                    // stops at the eviction level, not at the bound
                    let limit = if st.parked.is_empty() { budget } else { evict_level(budget) };
                    if st.resident + st.incoming + planned >= limit {
                        break;
                    }
                }
                let f = st.flags[q as usize];
                if f & (RESIDENT | PENDING_ZERO | WAITING | PARKED) != 0 || st.node.local(q).copy != Held::Dormant {
                    continue;
                }
                let more = st.node.fault(q, Access::Write).map_err(|e| format!("page protocol: {e}"))?;
                planned += more.iter().filter(|a| matches!(a, Action::ZeroFill { .. })).count() as u64;
                // a Wake for a page nobody waits on is harmless, but costs
                // an ioctl: leave it out
                acts.extend(more.into_iter().filter(|a| !matches!(a, Action::Wake { .. })));
            }
        }
        Ok(acts)
    }

    // ---- carrying out actions ------------------------------------------

    fn apply(&self, st: &mut State, acts: Vec<Action>) -> Result<(), String> {
        let mut queue: VecDeque<Action> = acts.into();
        while let Some(act) = queue.pop_front() {
            match act {
                Action::ZeroFill { page } => {
                    st.flags[page as usize] |= PENDING_ZERO;
                    st.pending_zero.push(page);
                }
                Action::Map { page, writable } => {
                    if st.flags[page as usize] & PENDING_ZERO == 0 {
                        self.map(st, page, writable)?;
                    }
                }
                Action::Wake { page } => st.wakes.push(page),
                // the protocol says when a home refused our eviction (a
                // message, or our own home side): the page stays, if it is
                // still ours and not on its way to a requester
                Action::Refused { page } => {
                    let l = st.node.local(page);
                    if l.copy == Held::Data && !l.handing {
                        self.eviction_refused(st, page);
                    }
                }
                other => {
                    self.flush_zero(st)?;
                    match other {
                        Action::Send { to, msg } => self.send(to, &msg)?,
                        Action::Fetch { page, from, transfer, evict, epoch } => {
                            self.fetch(st, page, from, transfer)?;
                            let more = st
                                .node
                                .fetched(page, from, transfer, evict, epoch)
                                .map_err(|e| format!("page protocol: {e}"))?;
                            queue.extend(more);
                        }
                        Action::WriteProtect { page } => self.write_protect(st, page)?,
                        Action::Unmap { page } => self.unmap(st, page)?,
                        Action::Drop { page } => self.drop_page(st, page)?,
                        Action::Offer { page, to, transfer, evict, epoch } => {
                            let zero = self.settings.dormant && self.is_zero(st, page)?;
                            let more = st
                                .node
                                .offer(page, to, transfer, evict, epoch, zero)
                                .map_err(|e| format!("page protocol: {e}"))?;
                            queue.extend(more);
                        }
                        Action::ZeroFill { .. } | Action::Map { .. } | Action::Wake { .. } | Action::Refused { .. } => {
                            unreachable!()
                        }
                    }
                }
            }
        }
        self.flush_zero(st)?;
        self.flush_wakes(st)
    }

    fn send(&self, to: NodeId, msg: &Msg) -> Result<(), String> {
        self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.transport.send(to, &encode_page_msg(msg)).map_err(|e| fabric_error(format!("sending to node {to}"), e))
    }

    /// The flags of a page that just arrived: resident, and mapped in the
    /// guest view (writable or not) where there is one.
    fn held_flags(&self, writable: bool) -> u16 {
        match (self.uffd.is_some(), writable) {
            (true, true) => RESIDENT | MAPPED | WRITABLE,
            (true, false) => RESIDENT | MAPPED,
            (false, _) => RESIDENT,
        }
    }

    fn page_addr(&self, page: Page) -> u64 {
        self.mem.guest_view_base() + page * PAGE_SIZE
    }

    /// Zero-fills the pending pages, one ioctl per contiguous run (with
    /// `--dormant off`, reads each run from its home instead).
    fn flush_zero(&self, st: &mut State) -> Result<(), String> {
        if st.pending_zero.is_empty() {
            return Ok(());
        }
        let mut pages = std::mem::take(&mut st.pending_zero);
        pages.sort_unstable();
        pages.dedup();
        let cfg = self.settings.config;
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n] == first + n as u64
                && cfg.block_of(first).contains(&(first + n as u64))
            {
                n += 1;
            }
            // a run is mapped writable when its pages are ours to write,
            // read-only when they are read copies of dormant pages
            let writable = st.node.local(first).writable;
            let n = (0..n).take_while(|&k| st.node.local(first + k as u64).writable == writable).count().max(1);
            self.zero_run(st, first, n as u64, writable)?;
            if !writable {
                self.counters.pages_shared.fetch_add(n as u64, Ordering::Relaxed);
            }
            for p in first..first + n as u64 {
                let f = &mut st.flags[p as usize];
                *f = (*f & !PENDING_ZERO) | self.held_flags(writable);
                self.taken_back(st, p);
                self.enqueue(st, p);
            }
            st.resident += n as u64;
            i += n;
        }
        Ok(())
    }

    fn zero_run(&self, st: &mut State, first: Page, count: u64, writable: bool) -> Result<(), String> {
        let Some(uffd) = &self.uffd else {
            // a node without a guest: a hole in its memfd is the zero page
            self.counters.pages_zero_filled.fetch_add(count, Ordering::Relaxed);
            return Ok(());
        };
        let addr = self.page_addr(first);
        let len = count * PAGE_SIZE;
        if self.settings.dormant {
            if self.settings.keep_pages || !writable {
                // zeros through the alias view, then one mapping of them:
                // a read copy must never be mapped writable, not even for
                // the instant between a zero-fill and a write-protect
                self.mem.zero_alias(first * PAGE_SIZE, len);
                let ro = !writable;
                self.resolve(|d| uffd.continue_mode(addr + d, len - d, false, ro), first, count, "map")?;
            } else {
                self.resolve(|d| uffd.zeropage(addr + d, len - d, false), first, count, "zero-fill")?;
            }
            self.counters.pages_zero_filled.fetch_add(count, Ordering::Relaxed);
            return Ok(());
        }
        // --dormant off: the page's contents live at its home
        let home = self.settings.config.home(first);
        let buf = &mut st.bounce[..len as usize];
        if home == self.me {
            buf.fill(0);
            self.counters.pages_copied.fetch_add(count, Ordering::Relaxed);
        } else {
            self.read_remote(home, first, buf)?;
            self.counters.remote_fetches.fetch_add(count, Ordering::Relaxed);
            self.counters.bytes_fabric_read.fetch_add(len, Ordering::Relaxed);
        }
        let buf = &st.bounce[..len as usize];
        self.place(uffd, first, buf, writable)
    }

    /// Puts `bytes` into the guest at `first` and maps them: one
    /// `UFFDIO_COPY`, or (keeping pages) a write through the alias view and
    /// one `UFFDIO_CONTINUE`.
    fn place(&self, uffd: &Uffd, first: Page, bytes: &[u8], writable: bool) -> Result<(), String> {
        let addr = self.page_addr(first);
        let count = bytes.len() as u64 / PAGE_SIZE;
        let ro = !writable;
        if self.settings.keep_pages {
            self.mem.write_alias(first * PAGE_SIZE, bytes);
            let len = bytes.len() as u64;
            return self.resolve(|d| uffd.continue_mode(addr + d, len - d, false, ro), first, count, "map");
        }
        self.resolve(|d| uffd.copy_mode(addr + d, &bytes[d as usize..], false, ro), first, count, "copy")
    }

    /// Runs a resolving ioctl over `count` pages from `first`; `op(done)`
    /// resolves what is left after `done` bytes. A page found present
    /// means our records are wrong (an error); a partial resolution goes
    /// on from where it stopped, EAGAIN is retried, both boundedly.
    fn resolve(
        &self,
        mut op: impl FnMut(u64) -> crate::uffd::Result<Outcome>,
        first: Page,
        count: u64,
        what: &str,
    ) -> Result<(), String> {
        let mut done = 0;
        for _ in 0..1000 {
            match op(done).map_err(|e| format!("{what} of page {first}: {e}"))? {
                Outcome::Done => return Ok(()),
                Outcome::Retry => std::thread::yield_now(),
                Outcome::Partial { done: more } => done += more,
                Outcome::Exists => {
                    return Err(format!(
                        "{what}: page {} is present although this node did not hold it",
                        first + done / PAGE_SIZE
                    ))
                }
            }
            if done >= count * PAGE_SIZE {
                return Ok(());
            }
        }
        Err(format!("{what} of pages {first}+{count}: the kernel kept asking to retry"))
    }

    fn read_remote(&self, from: NodeId, page: Page, buf: &mut [u8]) -> Result<(), String> {
        let req = ReadReq { region: REGION_MEMORY, offset: page * PAGE_SIZE, len: buf.len() };
        self.transport
            .read_with(from, &[req], &mut |_, at, bytes| {
                buf[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
            .map_err(|e| fabric_error(format!("reading page {page} from node {from}"), e))
    }

    /// Pulls `page` from `from` with a one-sided read; `transfer`: it
    /// becomes ours (else a read copy, mapped read-only).
    fn fetch(&self, st: &mut State, page: Page, from: NodeId, transfer: bool) -> Result<(), String> {
        let mut buf = std::mem::take(&mut st.bounce);
        let got = self.read_remote(from, page, &mut buf[..PAGE_SIZE as usize]);
        let placed = got.and_then(|()| match &self.uffd {
            Some(uffd) => self.place(uffd, page, &buf[..PAGE_SIZE as usize], transfer),
            None => {
                self.mem.write_alias(page * PAGE_SIZE, &buf[..PAGE_SIZE as usize]);
                Ok(())
            }
        });
        st.bounce = buf;
        placed?;
        self.counters.remote_fetches.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_fabric_read.fetch_add(PAGE_SIZE, Ordering::Relaxed);
        if !transfer {
            self.counters.pages_shared.fetch_add(1, Ordering::Relaxed);
        }
        st.flags[page as usize] |= self.held_flags(transfer);
        // a page this node evicted and takes back is its own working set
        // coming home, not data of the node that kept it: the policy does
        // not follow it (it would only move the memory pressure)
        let ours = st.placed.contains_key(&page);
        if let Some(w) = st.waiting.get_mut(&page) {
            w.kind = if w.access == Access::Write { FaultKind::RemoteWrite } else { FaultKind::RemoteRead };
            if let (Some(vcpu), Some(host), false) = (w.vcpu, self.vcpus.get(), ours) {
                host.remote_fault(vcpu, from);
            }
        }
        st.resident += 1;
        self.taken_back(st, page);
        self.enqueue(st, page);
        Ok(())
    }

    /// Maps our copy in the guest view as the protocol allows: writable,
    /// or write-protected (a read copy, or ours while readers share it).
    fn map(&self, st: &mut State, page: Page, writable: bool) -> Result<(), String> {
        if self.uffd.is_none() {
            return Ok(());
        }
        let f = st.flags[page as usize];
        if f & MAPPED != 0 && (f & WRITABLE != 0) == writable {
            return Ok(());
        }
        self.remap(st, page, writable)
    }

    /// Whether this node makes read copies for read faults.
    fn makes_read_copies(&self) -> bool {
        self.settings.budget.is_none() && self.settings.read_copies
    }

    /// Maps our copy as `writable` says, whatever the guest view holds now
    /// (nothing, the page write-protected, or the page already as wanted).
    fn remap(&self, st: &mut State, page: Page, writable: bool) -> Result<(), String> {
        let Some(uffd) = &self.uffd else { return Ok(()) };
        if !writable && !self.settings.read_copies {
            // this kernel cannot map it write-protected in one step: leave
            // it unmapped; the next touch faults and asks for write
            return Ok(());
        }
        let addr = self.page_addr(page);
        match uffd.continue_mode(addr, PAGE_SIZE, false, !writable) {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Exists) => {
                // mapped already: set its protection as asked
                uffd.write_protect(addr, PAGE_SIZE, !writable, false)
                    .map_err(|e| format!("protecting page {page}: {e}"))?;
            }
            Ok(other) => return Err(format!("mapping page {page}: {other:?}")),
            Err(e) => return Err(format!("mapping page {page}: {e}")),
        }
        let f = &mut st.flags[page as usize];
        *f |= MAPPED;
        if writable {
            *f |= WRITABLE;
        } else {
            *f &= !WRITABLE;
        }
        Ok(())
    }

    /// Our copy stays readable by the guest here, but no longer writable.
    fn write_protect(&self, st: &mut State, page: Page) -> Result<(), String> {
        let Some(uffd) = &self.uffd else { return Ok(()) };
        if st.flags[page as usize] & WRITABLE == 0 {
            return Ok(());
        }
        uffd.write_protect(self.page_addr(page), PAGE_SIZE, true, false)
            .map_err(|e| format!("write-protecting page {page}: {e}"))?;
        st.flags[page as usize] &= !WRITABLE;
        Ok(())
    }

    fn unmap(&self, st: &mut State, page: Page) -> Result<(), String> {
        if self.uffd.is_none() || st.flags[page as usize] & MAPPED == 0 {
            return Ok(());
        }
        self.mem.unmap_guest_view(page * PAGE_SIZE, PAGE_SIZE).map_err(|e| format!("unmapping page {page}: {e}"))?;
        st.flags[page as usize] &= !(MAPPED | WRITABLE);
        Ok(())
    }

    fn drop_page(&self, st: &mut State, page: Page) -> Result<(), String> {
        if self.settings.keep_pages {
            // zeroing in place must not race the guest: take it away first
            self.unmap(st, page)?;
            // the guest view no longer maps it (it was handed over or
            // made dormant): zeroing cannot race with the guest
            self.mem.zero_alias(page * PAGE_SIZE, PAGE_SIZE);
        } else {
            self.mem.punch(page * PAGE_SIZE, PAGE_SIZE).map_err(|e| format!("freeing page {page}: {e}"))?;
        }
        let f = &mut st.flags[page as usize];
        if *f & RESIDENT != 0 {
            st.resident = st.resident.saturating_sub(1);
        }
        if *f & PINNED != 0 {
            st.pinned = st.pinned.saturating_sub(1);
        }
        *f &= !(RESIDENT | MAPPED | WRITABLE | PINNED);
        match st.evicting.remove(&page) {
            Some(Some(target)) => {
                st.placed.insert(page, target);
                self.counters.pages_evicted.fetch_add(1, Ordering::Relaxed);
            }
            Some(None) => {
                self.counters.pages_redormanted.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        // a fault that waits on the page will bring it back: its room is
        // the room this page leaves
        let f = &mut st.flags[page as usize];
        if *f & WAITING != 0 && *f & COUNTED == 0 {
            *f |= COUNTED;
            st.incoming += 1;
        }
        Ok(())
    }

    /// Whether our (protected) copy of `page` is all zeros.
    fn is_zero(&self, st: &State, page: Page) -> Result<bool, String> {
        let offset = page * PAGE_SIZE;
        if st.flags[page as usize] & RESIDENT == 0 || self.mem.is_hole(offset).unwrap_or(false) {
            return Ok(true);
        }
        // SAFETY: the page is inside guest memory; it is protected (the
        // guest cannot write it), and it is resident, so reading the alias
        // view materialises nothing.
        let bytes = unsafe { self.mem.alias_slice(offset, PAGE_SIZE as usize) };
        Ok(bytes.iter().all(|&b| b == 0))
    }

    fn wake_now(&self, page: Page) -> Result<(), String> {
        match &self.uffd {
            Some(uffd) => uffd.wake(self.page_addr(page), PAGE_SIZE).map_err(|e| format!("waking page {page}: {e}")),
            None => Ok(()),
        }
    }

    fn flush_wakes(&self, st: &mut State) -> Result<(), String> {
        let mut wakes = std::mem::take(&mut st.wakes);
        if self.uffd.is_none() {
            return Ok(());
        }
        wakes.sort_unstable();
        wakes.dedup();
        for &page in &wakes {
            let f = st.flags[page as usize];
            let l = st.node.local(page);
            if f & RESIDENT != 0 && l.allows(Access::Read) {
                // ours, but maybe not (or not as writable) in the guest
                // view: map it, or the vCPU would fault again forever
                self.map(st, page, l.writable)?;
            }
            if st.flags[page as usize] & WAITING != 0 {
                if st.flags[page as usize] & COUNTED != 0 {
                    st.incoming = st.incoming.saturating_sub(1);
                }
                st.flags[page as usize] &= !(WAITING | COUNTED);
                if let Some(w) = st.waiting.remove(&page) {
                    let took = w.since.elapsed();
                    st.latency.record(took);
                    match w.kind {
                        FaultKind::Zero => st.latency_zero.record(took),
                        FaultKind::RemoteRead => {
                            st.latency_remote.record(took);
                            st.latency_remote_read.record(took);
                        }
                        FaultKind::RemoteWrite => {
                            st.latency_remote.record(took);
                            st.latency_remote_write.record(took);
                        }
                        FaultKind::Upgrade => st.latency_upgrade.record(took),
                    }
                }
            }
            self.wake_now(page)?;
        }
        Ok(())
    }

    // ---- memory budget -------------------------------------------------

    fn enqueue(&self, st: &mut State, page: Page) {
        if self.settings.budget.is_some() && st.flags[page as usize] & (QUEUED | PINNED) == 0 {
            st.flags[page as usize] |= QUEUED;
            st.queue.push_back(page);
        }
    }

    /// A page we placed on another node is back here: that node has
    /// room again.
    fn taken_back(&self, st: &mut State, page: Page) {
        if let Some(t) = st.placed.remove(&page) {
            st.held_by[t as usize] = st.held_by[t as usize].saturating_sub(1);
        }
    }

    /// An eviction of ours was refused (the page stays here): give the
    /// target its room back and queue the page again.
    fn eviction_refused(&self, st: &mut State, page: Page) {
        if let Some(target) = st.evicting.remove(&page) {
            if let Some(t) = target {
                st.held_by[t as usize] = st.held_by[t as usize].saturating_sub(1);
            }
            self.enqueue(st, page);
        }
    }

    /// After every event: start evictions ahead of need, let parked faults
    /// in where there is room, and fail rather than wait forever.
    fn settle(&self, st: &mut State) -> Result<(), String> {
        // a node whose guest never faulted (no vCPUs run here) only takes
        // the pages others place on it, which they count exactly
        let Some(budget) = self.settings.budget.filter(|_| self.faulted.load(Ordering::Relaxed)) else {
            return Ok(());
        };
        // evictions that settle at once (we are the page's home) make room
        // at once: go round until nothing changes (each turn resumes a
        // parked fault, so there are at most as many turns as those)
        loop {
            self.evict_ahead(st, budget)?;
            let mut resumed = false;
            while !st.parked.is_empty() && st.resident + st.incoming < budget {
                let page = st.parked.pop_front().expect("not empty");
                st.flags[page as usize] &= !PARKED;
                let (access, vcpu) = st.waiting.get(&page).map_or((Access::Write, None), |w| (w.access, w.vcpu));
                self.fault_page(st, page, access, vcpu)?;
                resumed = true;
            }
            if !resumed {
                break;
            }
        }
        if !st.parked.is_empty() && st.evicting.is_empty() && st.incoming == 0 && st.resident >= budget {
            return Err(format!(
                "node {} cannot make room under --node-memory ({} pages): {} of its pages are pinned by the loader \
                 and nothing else can be evicted",
                self.me, budget, st.pinned
            ));
        }
        Ok(())
    }

    fn evict_ahead(&self, st: &mut State, budget: u64) -> Result<(), String> {
        let level = evict_level(budget);
        let demand = st.resident + st.incoming + st.parked.len() as u64;
        let mut need = demand.saturating_sub(level + st.evicting.len() as u64);
        let mut scanned = st.queue.len();
        while need > 0 && scanned > 0 {
            scanned -= 1;
            let Some(page) = st.queue.pop_front() else { break };
            st.flags[page as usize] &= !QUEUED;
            let f = st.flags[page as usize];
            if f & RESIDENT == 0 || f & PINNED != 0 || st.evicting.contains_key(&page) {
                continue;
            }
            // take it from the guest first: a zero check of a page the
            // guest can still write could re-dormant a page just written
            // (if the eviction does not go ahead, the next touch is a
            // minor fault that maps it back)
            self.unmap(st, page)?;
            let zero = self.settings.dormant && self.is_zero(st, page)?;
            let target = if zero { None } else { Some(self.pick_target(st)?) };
            let acts = st.node.evict(page, target).map_err(|e| format!("page protocol: {e}"))?;
            if acts.is_empty() {
                // not settled here (a transaction is under way): later
                self.enqueue(st, page);
                continue;
            }
            if let Some(t) = target {
                st.held_by[t as usize] += 1;
            }
            st.evicting.insert(page, target);
            need -= 1;
            self.apply(st, acts)?;
        }
        Ok(())
    }

    /// The next node with room for an evicted page (round robin).
    fn pick_target(&self, st: &mut State) -> Result<NodeId, String> {
        let nodes = self.settings.config.nodes;
        for _ in 0..nodes {
            st.next_target = (st.next_target + 1) % nodes;
            let t = st.next_target;
            if t != self.me && self.settings.peer_budget.is_none_or(|b| st.held_by[t as usize] < b) {
                return Ok(t);
            }
        }
        Err(format!(
            "the pod is out of memory: the guest touched more than its {} nodes may hold under --node-memory",
            nodes
        ))
    }

    // ---- watchdogs -------------------------------------------------------

    /// A fault that has waited longer than `limit`, in words: the pod is
    /// stuck (a node hangs without leaving), so the VM must end rather
    /// than leave a vCPU blocked forever.
    pub fn stuck_fault(&self, limit: std::time::Duration) -> Option<String> {
        let st = self.lock();
        let (&page, w) = st.waiting.iter().max_by_key(|(_, w)| w.since.elapsed())?;
        let waited = w.since.elapsed();
        if waited < limit {
            return None;
        }
        let gpa = self.mem.layout().offset_to_gpa(page * PAGE_SIZE).unwrap_or(0);
        let home = self.settings.config.home(page);
        let what = if st.flags[page as usize] & PARKED != 0 {
            let mut targets: Vec<NodeId> = st.evicting.values().flatten().copied().collect();
            targets.sort_unstable();
            targets.dedup();
            let to: Vec<String> = targets.iter().map(|t| format!("node {t}")).collect();
            format!("room under --node-memory (evictions to {} are not answered)", to.join(", "))
        } else if home == self.me {
            match st.node.dir(page).owner {
                Some(owner) if owner != self.me => format!("its owner, node {owner}"),
                _ => "this node (its home)".to_string(),
            }
        } else {
            format!("its home, node {home}, or the node holding it")
        };
        Some(format!(
            "the guest's fault on page {page} (guest-physical {gpa:#x}) waited {:.1} s for {what}: a node of the pod \
             does not answer",
            waited.as_secs_f64()
        ))
    }

    // ---- reports ---------------------------------------------------------

    /// Pages held in memory here.
    pub fn resident_pages(&self) -> u64 {
        self.lock().resident
    }

    /// This node's metrics so far.
    pub fn metrics(&self) -> NodeMetrics {
        let st = self.lock();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        let mut m = NodeMetrics::collect_latency(u64::from(self.me), &st.latency);
        m.faults = get(&c.faults);
        m.faults_already_resident = get(&c.faults_already_resident);
        m.pages_zero_filled = get(&c.pages_zero_filled);
        m.pages_copied = get(&c.pages_copied);
        m.pages_loaded = st.pinned;
        m.pages_resident = st.resident;
        m.remote_fetches = get(&c.remote_fetches);
        m.bytes_fabric_read = get(&c.bytes_fabric_read);
        m.pages_evicted = get(&c.pages_evicted);
        m.pages_redormanted = get(&c.pages_redormanted);
        m.faults_parked = get(&c.faults_parked);
        m.messages_sent = get(&c.messages_sent);
        m.messages_received = get(&c.messages_received);
        m.faults_zero = st.latency_zero.count();
        m.fault_zero_us_p50 = st.latency_zero.quantile_us(0.5);
        m.fault_zero_us_p99 = st.latency_zero.quantile_us(0.99);
        m.faults_remote = st.latency_remote.count();
        m.fault_remote_us_p50 = st.latency_remote.quantile_us(0.5);
        m.fault_remote_us_p99 = st.latency_remote.quantile_us(0.99);
        m.faults_remote_read = st.latency_remote_read.count();
        m.fault_remote_read_us_p50 = st.latency_remote_read.quantile_us(0.5);
        m.faults_remote_write = st.latency_remote_write.count();
        m.fault_remote_write_us_p50 = st.latency_remote_write.quantile_us(0.5);
        m.faults_upgrade = st.latency_upgrade.count();
        m.fault_upgrade_us_p50 = st.latency_upgrade.quantile_us(0.5);
        m.pages_shared = get(&c.pages_shared);
        m.invalidations = get(&c.invalidations);
        m.ownership_transfers = get(&c.ownership_transfers);
        m.memfd_bytes = self.mem.allocated_bytes();
        m
    }
}
