//! The page engine of one pod node: the I/O-free protocol
//! ([`shoal_protocol::Node`]) and the I/O-free record of what this node
//! holds and may hold ([`Residency`], `residency.rs`) wired to this node's
//! memory, to userfaultfd and to the fabric. This file decides what to do
//! with an event; `memops.rs` does the memory half of it.
//!
//! Two kinds of event drive it, each decided under the engine's one lock
//! (rule 7 below says what runs outside it):
//! - a guest fault ([`Engine::handle_fault`], from the node's
//!   fault-handler threads), and
//! - a protocol message from a peer ([`Engine::on_message`], from the
//!   node's receiver thread).
//!
//! Every node may run vCPUs, so every node's guest view is registered with
//! userfaultfd (missing, minor and write-protect faults). A read fault asks
//! for a read copy, mapped write-protected (pages read by vCPUs of several
//! nodes, code above all, are shared, not bounced); a write fault asks for
//! the page itself, and a write to a read copy traps and upgrades it through
//! the home. With `--node-memory` (read copies cannot be evicted yet), and
//! where the kernel cannot map a page write-protected in one step, a node
//! asks for the page itself on every fault.
//!
//! # The executor's ordering contract (`apply`)
//!
//! The protocol's actions are carried out in the order it returns them,
//! with these rules, which the protocol's correctness relies on:
//! 1. Zero-fills are batched: consecutive `ZeroFill`s (and the `Map`s of
//!    those pages, which the zero-fill does) wait in `pending_zero` and are
//!    done as one ioctl per run, but always **before** the next action of
//!    any other kind: a `Send` never overtakes a zero-fill it follows (a
//!    peer told "done" finds the page in place).
//! 2. A `Fetch` is done at once (the read, then the mapping), and the
//!    protocol is told (`fetched`) before the next action: its follow-up
//!    actions (map, `Fetched` to the old owner, wake) run after. Fetches
//!    that come one after the other are read as one batch per node, then
//!    told to the protocol one by one, in their order (nothing else ran
//!    between them before either).
//! 3. `WriteProtect` and `Unmap` take effect before the next action: a
//!    page is never offered to a peer (`Offer`, then `Ready`) while the
//!    guest here can still write it.
//! 4. `Offer` checks the (protected) page for zeros, then tells the
//!    protocol, whose answer (`Ready`) is sent in order.
//! 5. Wakes come last, after every mapping of the event: a vCPU never
//!    retries on a page not yet mapped. A woken page the protocol allows
//!    us to read is mapped as it allows first (writable or not).
//! 6. After every event, `settle` starts evictions ahead of need and lets
//!    parked faults in as room allows (`Residency` decides both).
//! 7. A guest fault's last batch of zero-fills (nothing follows it but
//!    the wakes and `settle`) runs with the lock released when it needs
//!    nothing but the ioctl (`fill_unlocked`): its pages stay pending in
//!    `Residency` meanwhile, and an event that names one waits for it
//!    (`wait_for_fills`). The ioctl wakes the faults in its runs once they
//!    are mapped; the engine then records the pages and the event's other
//!    wakes and `settle` follow under the lock. When the lock is taken by
//!    then and nothing else is left (every wake was the fill's, no memory
//!    bound to settle), the record is left to the lock's next holder
//!    (`FillDone`, `record_fills` in `lock`): a fault thread never sleeps
//!    on the lock a second time for one fault.
//! 8. A copy the guest freed (`Forget`) is recorded at once and its
//!    memory punched out before the next action of any other kind (runs
//!    of pages, one hole each: `flush_forgotten`), so a page forgotten and
//!    then filled again is filled after its hole.
//! 9. A `Send` is queued in a frame for its peer and goes when the event
//!    ends (`flush_sends`; a peer's frame of messages is one event, taken
//!    message by message): later than the protocol asked, never earlier,
//!    and in order per peer. So what one event tells a peer (the frees
//!    of a 2 MiB chunk, say) costs one frame, not a frame a message. A
//!    guest fault's event sends after its wakes (`handle_fault`): what
//!    it tells peers (`Fetched` to a page's old owner) is off the vCPU's
//!    way.
//!
//! 10. A page a fault of one of our vCPUs brought from another node is
//!     kept until that vCPU has run (`Hold`): the messages that would take
//!     it away (`Request` at its home, `Share`, `Transfer`, `Inval`) wait
//!     in `deferred` meanwhile, and go in their order when the hold ends
//!     (`run_deferred`, from the receiver). A message that waits is one
//!     the network delayed, which the protocol allows (the model checker
//!     delivers in any order).
//!
//! A node alone is a pod of one: the same engine, with no transport.
//! Every page's home is the node itself, so its protocol settles every
//! fault in place and never sends; with a memory bound it evicts nothing,
//! and a fault beyond the bound ends the VM (`budget_exhausted`).

pub mod handlers;
mod memops;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use shoal_fabric::Transport;
use shoal_protocol::{codec, Access, Action, Config, Fetch, Held, Msg, Node, NodeId, Page, Since};

use super::residency::{Admission, Candidate, Eviction, Residency};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::metrics::{FaultLatency, NodeMetrics};
use crate::uffd::{Fault, Uffd};
use crate::vcpu::stats::{Ran, RunMark};

/// The first byte of every pod message: which layer it belongs to.
pub const CHANNEL_PAGES: u8 = 0;
/// Pod control messages (join checks, start, metrics, abort).
pub const CHANNEL_CONTROL: u8 = 1;

/// The fabric region id of a node's guest memory.
pub const REGION_MEMORY: u32 = 0;

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
    /// Make read copies for read faults (this kernel can map a page
    /// write-protected in one step, see `uffd::continue_wp_supported`);
    /// otherwise every fault takes the page itself.
    pub read_copies: bool,
    /// Which page leaves first under the memory bound.
    pub eviction: Eviction,
    /// `--verify-pages`: every page offered carries a digest of its bytes,
    /// and every page pulled is checked against it.
    pub digests: Option<crate::pod::digest::PageDigests>,
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
    /// Where a remote fault's time went: the owner's answer (`Ready`)
    /// arrived, and the one-sided read and the map (uffd copy or continue)
    /// took these long.
    answered: Option<Instant>,
    read: std::time::Duration,
    map: std::time::Duration,
    /// Read with no answer awaited (parked at a peer, read by its home).
    direct: bool,
    /// Asked for ahead of a fault ([`Engine::prefetch`]): its time is not
    /// a fault's.
    prefetch: bool,
}

impl Waiter {
    fn new(access: Access, vcpu: Option<u32>, kind: FaultKind) -> Self {
        let zero = std::time::Duration::ZERO;
        Waiter {
            since: Instant::now(),
            access,
            vcpu,
            kind,
            answered: None,
            read: zero,
            map: zero,
            direct: false,
            prefetch: false,
        }
    }
}

/// A vCPU's run of sequential direct remote faults.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// The page the run's next fault would be on: after its last fault,
    /// or after the pages read ahead of it.
    next: Page,
    /// Faults in the run so far.
    run: u32,
    /// Pages read ahead at the run's last fault.
    ahead: u64,
}

/// Consecutive reads from one node taken in one batch, at most.
const FETCH_BATCH: usize = 64;
/// A vCPU's run of this many sequential direct remote faults reads ahead.
const STREAM_RUN: u32 = 2;
/// Pages read ahead of such a run.
const READ_AHEAD: u64 = 16;

/// Where remote faults' time went, phase by phase.
#[derive(Debug, Default)]
struct Breakdown {
    /// From the fault to the owner's answer: the request to the home, the
    /// home's message to the owner, the owner protecting its copy and
    /// answering (protocol hops).
    owner: FaultLatency,
    /// The one-sided read of the page.
    read: FaultLatency,
    /// Putting it into the guest view (`UFFDIO_COPY` / `CONTINUE`).
    map: FaultLatency,
    /// The rest, to the wake: messages the event sends on, the wake ioctl.
    rest: FaultLatency,
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
    read_copies_dropped: AtomicU64,
    ownership_transfers: AtomicU64,
    pages_prefetched: AtomicU64,
    prefetched_used: AtomicU64,
    pages_probed: AtomicU64,
    pages_referenced: AtomicU64,
    pages_fetched_back: AtomicU64,
    pages_reported: AtomicU64,
    pages_held: AtomicU64,
    messages_held: AtomicU64,
    holds_exited: AtomicU64,
    holds_ran: AtomicU64,
    holds_slept: AtomicU64,
    holds_refault: AtomicU64,
    holds_yielded: AtomicU64,
    holds_expired: AtomicU64,
}

struct State {
    node: Node,
    /// What this node holds and may hold (no I/O): see `residency.rs`.
    res: Residency,
    waiting: HashMap<Page, Waiter>,
    latency: FaultLatency,
    /// Faults resolved by zero-filling dormant pages, and by a one-sided
    /// read of a page with contents: the two costs the pod is judged by.
    latency_zero: FaultLatency,
    latency_remote: FaultLatency,
    latency_remote_read: FaultLatency,
    latency_remote_write: FaultLatency,
    latency_remote_direct: FaultLatency,
    latency_remote_asked: FaultLatency,
    latency_upgrade: FaultLatency,
    breakdown: Breakdown,
    pending_zero: Vec<Page>,
    /// A guest fault's event leaves its last zero-fills to the fault's
    /// thread, which does them outside the lock (`fill_unlocked`).
    defer_fills: bool,
    /// Runs such a fill did and woke (when it ended): `flush_wakes` does
    /// not wake them again.
    woken_by_fill: Vec<ZeroRun>,
    filled_at: Option<Instant>,
    wakes: Vec<Page>,
    bounce: Vec<u8>,
    /// Each vCPU's run of sequential direct remote faults.
    streams: HashMap<u32, Stream>,
    /// Pages of [`Engine::free_pages`] whose free is not complete yet.
    freeing: u64,
    /// Pages the guest freed whose copies here are recorded as gone but
    /// not yet punched out (`flush_forgotten`: one hole per run).
    pending_forget: Vec<Page>,
    /// Messages to send, a frame per peer (`queue_send`), sent at the end
    /// of the event (`flush_sends`): what one event tells a peer costs one
    /// frame (up to the fabric's message size).
    outbox: Vec<(NodeId, Vec<u8>)>,
    /// An event of several messages (a peer's batch) is under way: its
    /// sends wait for its end.
    hold_sends: bool,
    /// Pages the guest reported free (`report_free`), taken out of the
    /// guest view, whose free (`free_reported`) is not complete yet.
    reported: std::collections::HashSet<Page>,
    /// Faults on reported pages, waiting for their free: then they are
    /// faults on dormant pages (`refault`).
    after_free: HashMap<Page, (Access, Option<u32>)>,
    /// Faults whose free completed during an event, to take at its end.
    refault: Vec<(Page, Access, Option<u32>)>,
    /// Pages a fault of one of our vCPUs got from another node, kept
    /// until that vCPU has run (rule 10); in the order they were held
    /// (`hold_order`, to let the expired ones go), and where each vCPU
    /// stood at its last wake after such a fault (`marks`).
    holds: HashMap<Page, Hold>,
    hold_order: VecDeque<(Instant, Page)>,
    marks: HashMap<u32, RunMark>,
    /// When each of our vCPUs began to wait for pages ([`Since`]): its
    /// first fault since it last ran on (see [`Engine::stall`]). Our
    /// requests carry it; it ranks our holds against other nodes' askers.
    stalls: HashMap<u32, Since>,
    /// Messages waiting for a hold to end, in the order they came.
    deferred: Vec<(NodeId, Msg)>,
}

/// A page kept for the vCPU whose fault brought it (rule 10). Without it
/// two vCPUs on two nodes writing one page (a lock, a shared counter) can
/// pass it to and fro without either using it: the next node's request
/// can arrive, and take the page, before the vCPU woken here has run
/// again.
///
/// A hold ends when the vCPU has run in the guest since its wake, as far
/// as the host can tell: KVM counted an exit of it (`Exited`: it entered
/// the guest and left again), or its thread had [`HOLD_CPU`] of CPU time
/// (`Ran`: a guest that runs on without exits), or it ran and sleeps
/// again, halted (`Slept`); when the vCPU faults on the page again
/// (`Refault`); and after [`HOLD_MAX`] at most (`Expired`: a vCPU that
/// gets no CPU keeps nobody waiting longer). What the vCPU did is looked
/// at since its last wake (`State::marks`, one per vCPU): a wake renews
/// its other holds, as one instruction may need several pages.
///
/// While the vCPU waits for another page here, its holds stay, except
/// against a vCPU that has waited for pages longer (`Yielded`): two vCPUs
/// that each hold a page the other needs for one instruction (page tables
/// that a nested guest's walks write, code beside data) would otherwise
/// both let go, or both wait, for ever. How long a vCPU has waited is its
/// [`Since`] ([`Engine::stall`]), which every request carries and the home
/// passes on; a tie goes to the lower node id. A vCPU keeps its `since`
/// until it surely got on, so one that loses a page sooner or later is
/// the oldest and gets every page it needs (the wound-wait order of
/// database transactions). A rule without the waiting time (the lower
/// node id wins) starved the higher node under network delay.
///
/// Measured in the soft-RoCE harness (nested KVM under TCG, where waking
/// a vCPU and entering the guest is slow), `smp` on two nodes: without
/// holds `iters=5` moved pages 68 223 times in 400 s and added nothing
/// (the vCPUs took turns at the page-table pages their walks write); with
/// holds `iters=200` ends in 1.3 s, 128 moves. Tried and failed there: a
/// fixed 2 ms hold, holds until the thread had 50 us of CPU time or until
/// one or two exits (the exit was the fault on the other page), and,
/// under 1 ms of network delay, the lower-id rule (4 069 moves in 150 s,
/// nothing added); with `since`, `iters=200` ends there in about 1 s under
/// delay, jitter, loss, duplication and reordering.
#[derive(Clone, Copy, Debug)]
struct Hold {
    vcpu: u32,
    since: Instant,
}

/// Why a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldEnd {
    /// The vCPU left the guest since its wake.
    Exited,
    /// Its thread had [`HOLD_CPU`] of CPU time.
    Ran,
    /// It ran, and sleeps again (or is gone).
    Slept,
    /// A fault here waits for the page.
    Refault,
    /// The vCPU waits for another page, and a vCPU that waited longer asks.
    Yielded,
    /// [`HOLD_MAX`] passed.
    Expired,
}

impl HoldEnd {
    /// The rule (see [`Hold`]), for a hold whose page a fault here waits
    /// for (`refault`), `age` old, whose vCPU may wait for another page
    /// here (`waits_here`), asked for by a vCPU that has waited longer than
    /// it (`older`, see [`Asker::older`]); `ran` says what the vCPU did
    /// since its last wake (looked at last: it costs system calls).
    fn of(
        refault: bool,
        age: std::time::Duration,
        waits_here: bool,
        older: bool,
        ran: impl FnOnce() -> Option<Ran>,
    ) -> Option<HoldEnd> {
        if refault {
            return Some(HoldEnd::Refault);
        }
        if age >= HOLD_MAX {
            return Some(HoldEnd::Expired);
        }
        if waits_here {
            return older.then_some(HoldEnd::Yielded);
        }
        ran().map(|r| match r {
            Ran::Exited => HoldEnd::Exited,
            Ran::Long => HoldEnd::Ran,
            Ran::Slept => HoldEnd::Slept,
        })
    }
}

/// Who a message would take a page for: the node (None: an invalidation,
/// which does not name its writer) and since when its vCPU waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Asker {
    node: Option<NodeId>,
    since: Since,
}

impl Asker {
    /// Whether the asker waited longer than our vCPU waiting since `mine`
    /// (None: ours waits for nothing) on node `me`: the earlier wait
    /// first, the lower node id on a tie (an unnamed asker last); an
    /// asker for whom no vCPU waits (`since` 0) never.
    fn older(self, mine: Option<Since>, me: NodeId) -> bool {
        match mine {
            _ if self.since == 0 => false,
            None => true,
            Some(mine) => (self.since, self.node.unwrap_or(NodeId::MAX)) < (mine, me),
        }
    }
}

/// Now as a [`Since`] (never 0).
fn wall_clock() -> Since {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)).max(1)
}

/// CPU time a woken vCPU's thread has had when its hold ends without an
/// exit, and when its wait for pages is over (`Engine::stall`).
pub const HOLD_CPU: std::time::Duration = std::time::Duration::from_millis(2);
/// The longest a hold lasts.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the receiver looks at the holds while messages wait for them.
pub const HOLD_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A fill done outside the lock that the engine has not recorded yet (its
/// thread found the lock taken and left the record to the next holder).
#[derive(Debug)]
struct FillDone {
    runs: Vec<ZeroRun>,
    /// The event's wakes: pages of `runs`, woken by the fill.
    wakes: Vec<Page>,
    at: Instant,
}

/// Contiguous pages of one block zero-filled by one ioctl, mapped
/// writable or read-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ZeroRun {
    first: Page,
    count: u64,
    writable: bool,
}

/// One node's page engine.
pub struct Engine {
    me: NodeId,
    settings: Settings,
    /// The fabric to the other nodes; None for a pod of one, which has no
    /// peers: every page's home is this node, so the protocol never sends.
    transport: Option<Arc<dyn Transport>>,
    mem: Arc<GuestMemory>,
    /// The guest view's userfaultfd: only on the node that runs vCPUs.
    uffd: Option<Arc<Uffd>>,
    state: Mutex<State>,
    /// Signalled when zero-fills done outside the lock have arrived.
    filled: Condvar,
    /// Signalled when a free of [`Engine::free_pages`] completes (and when
    /// the engine fails).
    freed: Condvar,
    /// Fills done outside the lock, recorded by the next holder of it
    /// (`lock`), and how many events wait for a fill (`wait_for_fills`).
    fills_done: Mutex<Vec<FillDone>>,
    fill_waiters: AtomicUsize,
    /// Messages waiting for a hold (`State::deferred`), readable without
    /// the lock.
    deferred: AtomicUsize,
    /// Faults read from the userfaultfd that `handle_fault` has not taken
    /// under the lock yet (see `may_wait_here`).
    faults_in_flight: AtomicUsize,
    /// What `--dormant off` copies in for a page whose contents live here
    /// (a block of zeros; empty with dormant pages).
    zeros: Box<[u8]>,
    counters: Counters,
    failed: AtomicBool,
    /// The failure was told to `on_fatal` (or will be, after a grace).
    reported: Arc<AtomicBool>,
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

/// A fabric error in words; a peer's departure is said the same way
/// wherever it is noticed (a send, a read, the receiver), naming the node.
fn fabric_error(t: &dyn Transport, what: String, e: shoal_fabric::Error) -> String {
    match e {
        // when one node's loss makes others leave, the first one is the
        // news: a node killed, then a peer that left because of it
        shoal_fabric::Error::PeerGone { peer, reason } => match t.first_departure() {
            Some((first, why)) if first != peer => {
                format!("node {first} left the pod: {why} (then node {peer}: {reason}, {what})")
            }
            _ => format!("node {peer} left the pod: {reason} ({what})"),
        },
        // the fabric's reads wait as long as the pod's silence limit
        shoal_fabric::Error::Timeout { peer, after, .. } => super::unanswered(peer, after, &what),
        e => format!("{what}: {e}"),
    }
}

impl Engine {
    /// An engine for node `me` over `mem`; `uffd` is the guest view's on
    /// the vCPU node. `loaded` lists the pages the loader wrote (every node
    /// gets the same list): they start owned by node 0 with contents.
    pub fn new(
        me: NodeId,
        settings: Settings,
        transport: Option<Arc<dyn Transport>>,
        mem: Arc<GuestMemory>,
        uffd: Option<Arc<Uffd>>,
        loaded: &[(u64, u64)],
        on_fatal: OnFatal,
    ) -> Result<Self, String> {
        let pages = settings.config.pages;
        let mut node = Node::new(me, settings.config);
        let nodes = settings.config.nodes;
        let mut res =
            Residency::new(me, nodes, pages, settings.budget, settings.peer_budget).with_eviction(settings.eviction);
        for &(offset, len) in loaded {
            for page in offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE) {
                node.preload(page, 0).map_err(|e| format!("the loaded image: {e}"))?;
                if me == 0 {
                    // in the memfd, not yet in the guest view: the first
                    // touch is a minor fault, mapped by `flush_wakes`
                    res.preload(page);
                }
            }
        }
        let state = State {
            node,
            res,
            waiting: HashMap::new(),
            latency: FaultLatency::default(),
            latency_zero: FaultLatency::default(),
            latency_remote: FaultLatency::default(),
            latency_remote_read: FaultLatency::default(),
            latency_remote_write: FaultLatency::default(),
            latency_remote_direct: FaultLatency::default(),
            latency_remote_asked: FaultLatency::default(),
            latency_upgrade: FaultLatency::default(),
            breakdown: Breakdown::default(),
            pending_zero: Vec::new(),
            defer_fills: false,
            woken_by_fill: Vec::new(),
            filled_at: None,
            wakes: Vec::new(),
            bounce: vec![0u8; (settings.config.block_pages * PAGE_SIZE) as usize],
            streams: HashMap::new(),
            freeing: 0,
            pending_forget: Vec::new(),
            outbox: Vec::new(),
            hold_sends: false,
            reported: std::collections::HashSet::new(),
            after_free: HashMap::new(),
            refault: Vec::new(),
            holds: HashMap::new(),
            hold_order: VecDeque::new(),
            marks: HashMap::new(),
            stalls: HashMap::new(),
            deferred: Vec::new(),
        };
        let zeros = if settings.dormant {
            Box::default()
        } else {
            vec![0u8; (settings.config.block_pages * PAGE_SIZE) as usize].into_boxed_slice()
        };
        Ok(Engine {
            me,
            settings,
            transport,
            mem,
            uffd,
            state: Mutex::new(state),
            filled: Condvar::new(),
            freed: Condvar::new(),
            fills_done: Mutex::new(Vec::new()),
            fill_waiters: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
            faults_in_flight: AtomicUsize::new(0),
            zeros,
            counters: Counters::default(),
            failed: AtomicBool::new(false),
            reported: Arc::new(AtomicBool::new(false)),
            on_fatal,
            vcpus: std::sync::OnceLock::new(),
            faulted: AtomicBool::new(false),
        })
    }

    /// The engine's lock, with the fills done outside it recorded.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.record_fills(&mut st);
        st
    }

    /// Records the fills other threads did outside the lock and left to
    /// the next holder: their pages arrived, their faults were woken.
    fn record_fills(&self, st: &mut State) {
        let done = std::mem::take(&mut *self.fills_done.lock().unwrap_or_else(|p| p.into_inner()));
        for f in done {
            for &run in &f.runs {
                self.zero_arrived(st, run);
            }
            st.wakes = f.wakes;
            st.woken_by_fill = f.runs;
            st.filled_at = Some(f.at);
            // (the pages are mapped and woken: nothing here does I/O)
            if let Err(e) = self.flush_wakes(st) {
                self.fail(e);
            }
        }
    }

    /// The guest view's userfaultfd (vCPU node).
    pub fn uffd(&self) -> Option<&Uffd> {
        self.uffd.as_deref()
    }

    /// The same, shared (for the fault-handler threads that read it).
    pub fn uffd_arc(&self) -> Option<Arc<Uffd>> {
        self.uffd.clone()
    }

    /// Tells the engine which vCPUs run here (to attribute faults to them
    /// and let the migration policy see remote faults).
    pub fn set_vcpus(&self, vcpus: Arc<crate::vcpus::Vcpus>) {
        let _ = self.vcpus.set(vcpus);
    }

    /// Ends the VM (or this node) with `why`, once.
    pub fn fail(&self, why: String) {
        let first = !self.failed.swap(true, Ordering::SeqCst);
        self.freed.notify_all();
        if why.contains(shoal_fabric::GOODBYE) {
            if !first {
                // reported by the first failure's grace, or by a reason
                // that came meanwhile
                return;
            }
            // a peer that left in order told node 0 why before it went
            // (`Abort`, maybe still in the receiver's queue): let that
            // reason be the one reported; this one follows a moment later
            // if none came
            let (reported, on_fatal, report) = (self.reported.clone(), self.on_fatal.clone(), why.clone());
            let later = std::thread::Builder::new().name("shoal-fail".into()).spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                if !reported.swap(true, Ordering::SeqCst) {
                    on_fatal(report);
                }
            });
            // (no thread to wait with: report it now)
            if later.is_err() && !self.reported.swap(true, Ordering::SeqCst) {
                (self.on_fatal)(why);
            }
            return;
        }
        if !self.reported.swap(true, Ordering::SeqCst) {
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
        let offset =
            fault.addr.checked_sub(self.mem.guest_view_base()).filter(|o| *o < self.mem.layout().size()).ok_or_else(
                || {
                    self.fault_taken();
                    format!("fault at host address {:#x} is outside guest memory", fault.addr)
                },
            )?;
        let page = offset / PAGE_SIZE;
        // a write, or a write to a read copy (write-protected)
        let access = if fault.write || fault.wp { Access::Write } else { Access::Read };
        let vcpu = self.vcpus.get().and_then(|v| v.vcpu_of_thread(fault.tid));
        self.faulted.store(true, Ordering::Relaxed);
        // a fault on a page another fault's zero-fill is bringing waits
        // for it, then finds it here
        let mut st = self.wait_for_fills(self.lock(), &[page]);
        // from here the lock is held until the fault waits (`may_wait_here`)
        self.fault_taken();
        if self.failed() {
            // the VM is ending, and whoever failed the engine reported why:
            // a second report ("the pod failed") could overtake that
            // reason and be all the user sees; the vCPU is released when
            // the VM stops
            tracing::debug!(page, "a fault after the pod failed");
            return Ok(());
        }
        if !st.reported.is_empty() && st.reported.contains(&page) {
            // the guest uses a page it reported free before its free is
            // complete: finish that first (the fault waits), then the
            // page is dormant and the fault takes a zeroed one
            let r = self.free_now(&mut st, page, access, vcpu).and_then(|()| self.settle(&mut st));
            if r.is_err() {
                self.give_up();
            }
            return r;
        }
        st.defer_fills = true;
        // what the fault tells peers (the old owner's `Fetched`, say) goes
        // after the wake: later than the protocol asked (rule 9), and off
        // the vCPU's way
        st.hold_sends = true;
        let faulted = self.fault_page(&mut st, page, access, vcpu);
        st.defer_fills = false;
        st.hold_sends = false;
        if let Err(e) = faulted {
            // fills it left may never be done
            self.give_up();
            return Err(e);
        }
        if st.pending_zero.is_empty() {
            // nothing to fill with the lock released: wake, then send
            self.flush_wakes(&mut st)?;
            self.flush_sends(&mut st)?;
            return self.settle(&mut st);
        }
        self.flush_sends(&mut st)?;
        let Some(mut st) = self.fill_unlocked(st)? else {
            // recorded by the next holder of the lock
            return Ok(());
        };
        self.flush_wakes(&mut st)?;
        self.settle(&mut st)
    }

    /// `count` faults were read from the userfaultfd: each is in flight
    /// until `handle_fault` takes it under the lock.
    /// (Only holds look at them: a node alone, which has none, counts
    /// nothing.)
    pub fn faults_read(&self, count: usize) {
        if self.transport.is_some() {
            self.faults_in_flight.fetch_add(count, Ordering::AcqRel);
        }
    }

    fn fault_taken(&self) {
        if self.transport.is_some() {
            // (saturating: a fault handed in without `faults_read`, by a
            // unit test, counts nothing)
            let _ = self.faults_in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// Does the zero-fills a fault's event left (`defer_fills`): those
    /// that need no engine state (`fills_alone`: zeros, no fabric) with
    /// the lock released, so that faults on other blocks, and messages,
    /// go on meanwhile; the rest under it. Until they arrive their pages
    /// are marked pending in `Residency`: an event that names one waits
    /// (`wait_for_fills`), and the bound counts them; the fill wakes the
    /// faults waiting in its runs (the pages are mapped: rule 5 holds).
    /// Returns the lock taken again, the pages here, the event's other
    /// wakes still to do; or None when the lock was taken by another
    /// thread and nothing of the event was left but recording the fill
    /// and its wakes: then the next holder records them (`lock`), and this
    /// thread goes back to its faults without waiting for the lock.
    fn fill_unlocked<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<Option<MutexGuard<'a, State>>, String> {
        let (alone, locked): (Vec<ZeroRun>, Vec<ZeroRun>) =
            self.take_zero_runs(&mut st).into_iter().partition(|r| self.fills_alone(r));
        for run in locked {
            if let Err(e) = self.zero_run(&mut st, run) {
                self.give_up();
                return Err(e);
            }
            self.zero_arrived(&mut st, run);
        }
        if alone.is_empty() {
            return Ok(Some(st));
        }
        // the event's wakes are its own: another event must not wake them
        // before their pages are mapped
        let wakes = std::mem::take(&mut st.wakes);
        let covered = |p: &Page| alone.iter().any(|r| (r.first..r.first + r.count).contains(p));
        let may_leave = self.settings.budget.is_none() && wakes.iter().all(covered);
        drop(st);
        // each ioctl wakes the faults waiting in its run as soon as the
        // run is mapped: the vCPU runs on while the engine records it
        let filled = alone.iter().try_for_each(|r| self.fill_zeros(r, true));
        let at = Instant::now();
        if let Err(e) = filled {
            let _st = self.lock();
            self.give_up();
            return Err(e);
        }
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if may_leave => {
                self.fills_done.lock().unwrap_or_else(|p| p.into_inner()).push(FillDone { runs: alone, wakes, at });
                if self.fill_waiters.load(Ordering::SeqCst) > 0 {
                    // an event waits for these pages: taking the lock
                    // records them (it waits in the condition variable
                    // by then, or has not looked yet)
                    drop(self.lock());
                    self.filled.notify_all();
                }
                return Ok(None);
            }
            Err(TryLockError::WouldBlock) => self.state.lock().unwrap_or_else(|p| p.into_inner()),
        };
        self.record_fills(&mut st);
        for &run in &alone {
            self.zero_arrived(&mut st, run);
        }
        st.wakes = wakes;
        st.woken_by_fill = alone;
        st.filled_at = Some(at);
        self.filled.notify_all();
        Ok(Some(st))
    }

    /// The caller ends the VM with an error that left pages pending: the
    /// engine gives up, and whoever waits for those pages (which will
    /// never arrive) stops waiting. Called with the lock held (so that no
    /// waiter is between its look and its wait).
    fn give_up(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.filled.notify_all();
    }

    /// Waits, the lock released, while a zero-fill done outside the lock
    /// (`fill_unlocked`) is bringing any of `pages`.
    fn wait_for_fills<'a>(&self, mut st: MutexGuard<'a, State>, pages: &[Page]) -> MutexGuard<'a, State> {
        let pending = |st: &State| pages.iter().any(|&p| p < self.settings.config.pages && st.res.is_zero_pending(p));
        if !pending(&st) {
            return st;
        }
        // counted before looking again: a fill that finishes from now on
        // and leaves its record to the next holder takes the lock to
        // record it and signals (see `fill_unlocked`)
        self.fill_waiters.fetch_add(1, Ordering::SeqCst);
        self.record_fills(&mut st);
        while !self.failed() && pending(&st) {
            st = self.filled.wait(st).unwrap_or_else(|p| p.into_inner());
            self.record_fills(&mut st);
        }
        self.fill_waiters.fetch_sub(1, Ordering::SeqCst);
        st
    }

    /// Whether this node holds `page`, in memory, with `access` allowed.
    fn held_as(st: &State, page: Page, access: Access) -> bool {
        let l = st.node.local(page);
        l.copy == Held::Data && l.allows(access) && st.res.is_resident(page)
    }

    /// Asks for `page` ahead of the fault a vCPU is about to take (the
    /// page under the stack of a vCPU that just arrived: it is asked for
    /// while the vCPU's state is restored), as a write. Nothing happens
    /// when the page is here already as asked, or on its way; a fault that
    /// comes while it travels waits for it like any other.
    pub fn prefetch(&self, page: Page, access: Access) -> Result<(), String> {
        if page >= self.settings.config.pages || self.uffd.is_none() {
            return Ok(());
        }
        let mut st = self.wait_for_fills(self.lock(), &[page]);
        if self.failed() {
            return Ok(());
        }
        let l = st.node.local(page);
        if Self::held_as(&st, page, access) || st.waiting.contains_key(&page) {
            return Ok(());
        }
        let kind = if l.copy == Held::Data { FaultKind::Upgrade } else { FaultKind::Zero };
        st.waiting.insert(page, Waiter { prefetch: true, ..Waiter::new(access, None, kind) });
        self.counters.pages_prefetched.fetch_add(1, Ordering::Relaxed);
        self.fault_page(&mut st, page, access, None)?;
        self.settle(&mut st)
    }

    /// A frame of page messages from a peer (any node): one event, its
    /// messages taken in order, the sends they cause batched into a frame
    /// per peer.
    pub fn on_message(&self, from: NodeId, payload: &[u8]) -> Result<(), String> {
        let msgs =
            codec::decode_batch(payload).map_err(|e| format!("node {from} sent a malformed page message: {e}"))?;
        self.counters.messages_received.fetch_add(msgs.len() as u64, Ordering::Relaxed);
        for msg in &msgs {
            self.check_peer_msg(from, msg)?;
        }
        let pages: Vec<Page> = msgs.iter().flat_map(Msg::pages).collect();
        let mut st = self.wait_for_fills(self.lock(), &pages);
        if self.failed() {
            return Ok(());
        }
        st.hold_sends = true;
        let taken = msgs.into_iter().try_for_each(|msg| self.take_message(&mut st, from, msg));
        st.hold_sends = false;
        taken?;
        self.flush_sends(&mut st)?;
        self.settle(&mut st)
    }

    fn take_message(&self, st: &mut State, from: NodeId, msg: Msg) -> Result<(), String> {
        if self.must_wait(st, &msg) {
            self.counters.messages_held.fetch_add(1, Ordering::Relaxed);
            st.deferred.push((from, msg));
            self.deferred.store(st.deferred.len(), Ordering::Release);
            return Ok(());
        }
        self.take_now(st, from, msg)
    }

    /// Whether `msg` would take away a page held for a vCPU here (rule 10)
    /// whose hold is not over, or must follow a message about its page
    /// that waits already (so they go in their order). A hold found over
    /// is dropped.
    fn must_wait(&self, st: &mut State, msg: &Msg) -> bool {
        let Some((page, asker)) = Self::taker(msg) else {
            return false;
        };
        if st.holds.is_empty() && st.deferred.is_empty() {
            return false;
        }
        if st.deferred.iter().any(|(_, m)| Self::taker(m).is_some_and(|(p, _)| p == page)) {
            return true;
        }
        !self.hold_ended(st, page, asker)
    }

    /// The page a message would take from this node, and who asks.
    fn taker(msg: &Msg) -> Option<(Page, Asker)> {
        match *msg {
            Msg::Request { page, from, since, .. } => Some((page, Asker { node: Some(from), since })),
            Msg::Share { page, to, since } | Msg::Transfer { page, to, since, .. } => {
                Some((page, Asker { node: Some(to), since }))
            }
            Msg::Inval { page, since } => Some((page, Asker { node: None, since })),
            _ => None,
        }
    }

    /// Whether `page` is held no longer for a message from `asker` (rule
    /// 10): it never was, or its hold is over (then dropped, and counted).
    /// The vCPU that waited longer goes first (see [`Hold`]).
    fn hold_ended(&self, st: &mut State, page: Page, asker: Asker) -> bool {
        let Some(&h) = st.holds.get(&page) else {
            return true;
        };
        let end = HoldEnd::of(
            st.waiting.contains_key(&page),
            h.since.elapsed(),
            self.may_wait_here(st, h.vcpu),
            asker.older(st.stalls.get(&h.vcpu).copied(), self.me),
            || st.marks.get(&h.vcpu).map_or(Some(Ran::Slept), |m| m.since(HOLD_CPU)),
        );
        let Some(end) = end else {
            return false;
        };
        st.holds.remove(&page);
        let c = &self.counters;
        match end {
            HoldEnd::Exited => &c.holds_exited,
            HoldEnd::Ran => &c.holds_ran,
            HoldEnd::Slept => &c.holds_slept,
            HoldEnd::Refault => &c.holds_refault,
            HoldEnd::Yielded => &c.holds_yielded,
            HoldEnd::Expired => &c.holds_expired,
        }
        .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether vCPU `vcpu` may be blocked on a fault here: a fault of it
    /// waits, or faults are on their way to the engine (queued in the
    /// userfaultfd, or read and not yet taken) whose vCPU is unknown.
    fn may_wait_here(&self, st: &State, vcpu: u32) -> bool {
        st.waiting.values().any(|w| w.vcpu == Some(vcpu) && !w.prefetch)
            || self.faults_in_flight.load(Ordering::Acquire) > 0
            || self.uffd.as_ref().is_some_and(|u| u.has_events())
    }

    /// How long the receiver may wait for the fabric before it must look
    /// at the holds again (`run_deferred`): None when no message waits.
    pub fn deferred_poll(&self) -> Option<std::time::Duration> {
        (self.deferred.load(Ordering::Acquire) > 0).then_some(HOLD_POLL)
    }

    /// Takes the messages that waited for holds now over (rule 10), in
    /// the order they came; the rest wait on.
    pub fn run_deferred(&self) -> Result<(), String> {
        if self.deferred.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        // in their order: a message goes when its page's hold ended for
        // its asker (then later messages about that page go too)
        let mut due = Vec::new();
        let mut wait = Vec::new();
        for (from, msg) in std::mem::take(&mut st.deferred) {
            let go = match Self::taker(&msg) {
                Some((page, asker)) => self.hold_ended(&mut st, page, asker),
                None => true,
            };
            if go {
                due.push((from, msg));
            } else {
                wait.push((from, msg));
            }
        }
        st.deferred = wait;
        self.deferred.store(st.deferred.len(), Ordering::Release);
        if due.is_empty() {
            return Ok(());
        }
        let pages: Vec<Page> = due.iter().flat_map(|(_, m)| m.pages()).collect();
        let mut st = self.wait_for_fills(st, &pages);
        if self.failed() {
            return Ok(());
        }
        st.hold_sends = true;
        let taken = due.into_iter().try_for_each(|(from, msg)| self.take_now(&mut st, from, msg));
        st.hold_sends = false;
        taken?;
        self.flush_sends(&mut st)?;
        self.settle(&mut st)
    }

    fn take_now(&self, st: &mut State, from: NodeId, msg: Msg) -> Result<(), String> {
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
        if let Msg::Ready { page, .. } = msg {
            if let Some(w) = st.waiting.get_mut(&page) {
                w.answered.get_or_insert_with(Instant::now);
            }
        }
        // a message the protocol cannot take in our state: the sender
        // broke it (or lies), and is named
        let acts = st
            .node
            .receive(msg)
            .map_err(|e| format!("node {from} sent a message the page protocol does not allow: {e}"))?;
        let acts = self.with_fault_around(st, acts)?;
        self.apply(st, acts)
    }

    /// Refuses a message naming a page outside the guest or a node outside
    /// the pod, before anything indexes by them.
    fn check_peer_msg(&self, from: NodeId, msg: &Msg) -> Result<(), String> {
        let cfg = &self.settings.config;
        let pages = msg.pages();
        let nodes: Vec<NodeId> = match msg {
            Msg::Request { from, .. } | Msg::GrantDone { from, .. } => vec![*from],
            Msg::Grant { .. } => vec![],
            Msg::Share { to, .. } | Msg::Transfer { to, .. } => vec![*to],
            Msg::Ready { from, .. }
            | Msg::Fetched { from, .. }
            | Msg::Done { from, .. }
            | Msg::InvalAck { from, .. }
            | Msg::Redormant { from, .. }
            | Msg::Free { from, .. }
            | Msg::Unshare { from, .. } => vec![*from],
            Msg::Evict { from, to, .. } | Msg::Evicted { from, to, .. } => vec![*from, *to],
            Msg::Upgrade { .. }
            | Msg::Inval { .. }
            | Msg::Refused { .. }
            | Msg::Dormanted { .. }
            | Msg::Forget { .. }
            | Msg::Freed { .. }
            | Msg::Unshared { .. } => vec![],
        };
        if let Some(p) = pages.iter().find(|&&p| p >= cfg.pages) {
            return Err(format!("node {from} sent a message about page {p}, outside the guest ({} pages)", cfg.pages));
        }
        if let Some(n) = nodes.iter().find(|&&n| n >= cfg.nodes) {
            return Err(format!("node {from} sent a message naming node {n}, outside the pod ({} nodes)", cfg.nodes));
        }
        // a message's claimed sender is the connection it came on; what
        // only a page's home sends comes from that home (an eviction's
        // Ready too: it names the owner to read from, and the home vouches
        // for it)
        let claimed = msg.claimed_sender();
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
        // where the kernel cannot map a page write-protected in one step,
        // every fault takes the page itself (no read copies); a page of
        // ours that is write-protected (an eviction refused) is then
        // upgraded, not mapped read-only
        // what the guest itself did (before any promotion below)
        if access == Access::Write {
            st.res.wrote(page);
        }
        let access = if self.settings.read_copies { access } else { Access::Write };
        // a read that takes the page itself: migratory sharing (a page the
        // guest here wrote before is read most likely as the first half of
        // a read-modify-write: this KVM emulates a locked add as a read,
        // then a write; or two nodes that both increment one counter hand
        // it to and fro twice per increment, a read copy then an upgrade,
        // and under network delay stop making progress); and a page this
        // node evicted (its memory bound counts it where it was placed
        // until it is taken back: a read copy would leave it there,
        // uncounted)
        let take = |st: &State| st.res.written_here(page) || st.res.is_placed(page);
        let access = if access == Access::Read && take(st) { Access::Write } else { access };
        let l = st.node.local(page);
        if Self::held_as(st, page, access) {
            // we hold it with the access asked for: resolved meanwhile
            // (another vCPU's fault, fault-around), or the guest view lost
            // the mapping (a swapped-out page raises a minor fault): map
            // it as it should be, then wake
            self.counters.faults_already_resident.fetch_add(1, Ordering::Relaxed);
            // the guest wants it: the clock passes it over once more
            if st.res.referenced(page) {
                self.counters.pages_referenced.fetch_add(1, Ordering::Relaxed);
            }
            self.remap(st, page, l.writable)?;
            return self.wake_now(page);
        }
        let kind = if l.copy == Held::Data { FaultKind::Upgrade } else { FaultKind::Zero };
        match st.res.admit(page) {
            // already on its way; the wake covers every waiter (a write
            // behind a read asks again when the read copy arrives)
            Admission::OnItsWay => return Ok(()),
            Admission::Parked => {
                st.waiting.insert(page, Waiter::new(access, vcpu, kind));
                self.counters.faults_parked.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Admission::Go => {}
        }
        let w = st.waiting.entry(page).or_insert_with(|| Waiter::new(access, vcpu, kind));
        w.access = w.access.max(access);
        // what a request says (rule 10); none goes out for a page ours
        // already (a dormant one granted here: the first touch's path)
        if self.transport.is_some() && !l.allows(access) {
            st.node.since = vcpu.map_or_else(wall_clock, |v| Self::stall(st, v));
        }
        let acts = st.node.fault(page, access).map_err(|e| format!("page protocol: {e}"))?;
        let acts = self.with_fault_around(st, acts)?;
        let acts = self.with_read_ahead(st, page, vcpu, acts)?;
        self.apply(st, acts)
    }

    /// Since when vCPU `vcpu`, faulting now, waits for pages: since this
    /// fault, unless it did not run on since its last wake after a remote
    /// fault ([`RunMark::ran_on`]: [`HOLD_CPU`] of CPU time, a halt or port
    /// I/O; an exit is not enough, it may be the fault on the next page an
    /// instruction needs, nor is a sleep, which cannot be told from the
    /// wait in this fault): then since the fault that began its wait. See
    /// [`Hold`].
    ///
    /// The vCPU's mark goes once it ran on (its holds are over then: no
    /// asker waits for them), so a vCPU looks at its thread only while it
    /// waits.
    fn stall(st: &mut State, vcpu: u32) -> Since {
        if let (Some(&since), Some(mark)) = (st.stalls.get(&vcpu), st.marks.get(&vcpu)) {
            if !mark.ran_on(HOLD_CPU) {
                return since;
            }
            st.marks.remove(&vcpu);
        }
        let since = wall_clock();
        st.stalls.insert(vcpu, since);
        since
    }

    /// A vCPU's direct remote faults (pages this node is home to, parked
    /// at a peer: the actions read it at once) on consecutive pages make a
    /// run; from [`STREAM_RUN`] on, the next [`READ_AHEAD`] pages parked at
    /// peers are read in the same batch (one per peer) and mapped, as far as the
    /// memory bound leaves room (fault-around's rule). Each goes through
    /// the protocol as a fault of its own. The guest's touches of mapped
    /// pages leave no trace here, so a page read ahead counts as used when
    /// the run's next fault is the page right after them: the vCPU went
    /// through them in order (a run that stops leaves its last pages
    /// counted unused).
    fn with_read_ahead(
        &self,
        st: &mut State,
        page: Page,
        vcpu: Option<u32>,
        mut acts: Vec<Action>,
    ) -> Result<Vec<Action>, String> {
        let direct = acts.iter().any(|a| matches!(*a, Action::Fetch(Fetch { page: p, evict: false, .. }) if p == page));
        if !direct {
            return Ok(acts);
        }
        let key = vcpu.unwrap_or(u32::MAX);
        let was = st.streams.get(&key).copied().unwrap_or_default();
        let run = if page == was.next && was.run > 0 {
            self.counters.prefetched_used.fetch_add(was.ahead, Ordering::Relaxed);
            was.run + 1
        } else {
            1
        };
        let mut next = Stream { next: page + 1, run, ahead: 0 };
        if run >= STREAM_RUN && self.uffd.is_some() {
            let cfg = self.settings.config;
            for q in page + 1..(page + 1 + READ_AHEAD).min(cfg.pages) {
                let d = st.node.dir(q);
                let parked_there = cfg.home(q) == self.me && d.parked && d.owner.is_some_and(|o| o != self.me);
                if !parked_there || d.busy.is_some() || !d.queue.is_empty() {
                    break;
                }
                if st.node.local(q).copy != Held::None
                    || st.waiting.contains_key(&q)
                    || !st.res.untouched(q)
                    || !st.res.room_for_fault_around(next.ahead + 1)
                    || (!st.reported.is_empty() && st.reported.contains(&q))
                {
                    break;
                }
                // room checked: admitted at once, never parked
                if st.res.admit(q) != Admission::Go {
                    return Err(format!("page {q}: read ahead with no room for it"));
                }
                st.waiting.insert(q, Waiter { prefetch: true, ..Waiter::new(Access::Write, vcpu, FaultKind::Zero) });
                self.counters.pages_prefetched.fetch_add(1, Ordering::Relaxed);
                st.node.fault_into(q, Access::Write, &mut acts).map_err(|e| format!("page protocol: {e}"))?;
                next.ahead += 1;
                next.next = q + 1;
            }
        }
        st.streams.insert(key, next);
        Ok(acts)
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
                // leave parked faults their room: fault-around then stops
                // at the eviction level, not at the bound
                if !st.res.room_for_fault_around(planned) {
                    break;
                }
                // (a page the guest reported free stays out of the guest
                // view until its free is complete)
                if !st.res.untouched(q)
                    || st.node.local(q).copy != Held::Dormant
                    || (!st.reported.is_empty() && st.reported.contains(&q))
                {
                    continue;
                }
                let start = acts.len();
                st.node.fault_into(q, Access::Write, &mut acts).map_err(|e| format!("page protocol: {e}"))?;
                // a Wake for a page nobody waits on is harmless, but costs
                // an ioctl: leave it out (it comes last)
                if matches!(acts.last(), Some(Action::Wake { page }) if *page == q) {
                    acts.pop();
                }
                planned += acts[start..].iter().filter(|a| matches!(a, Action::ZeroFill { .. })).count() as u64;
            }
        }
        Ok(acts)
    }

    // ---- carrying out actions ------------------------------------------

    fn apply(&self, st: &mut State, acts: Vec<Action>) -> Result<(), String> {
        let mut queue: VecDeque<Action> = acts.into();
        while let Some(act) = queue.pop_front() {
            // (rule 8) copies the guest freed are punched out before any
            // other action: a page forgotten and granted again is filled
            // after its hole
            if !matches!(act, Action::Forget { .. } | Action::Freed { .. }) {
                self.flush_forgotten(st)?;
            }
            match act {
                Action::Forget { page } => {
                    self.flush_zero(st)?;
                    self.forget_page(st, page)?;
                }
                Action::Freed { page } => {
                    st.res.freed(page);
                    st.reported.remove(&page);
                    if let Some((access, vcpu)) = st.after_free.remove(&page) {
                        st.refault.push((page, access, vcpu));
                    }
                    st.freeing = st.freeing.saturating_sub(1);
                    if st.freeing == 0 {
                        self.freed.notify_all();
                    }
                }
                Action::ZeroFill { page } => {
                    st.res.zero_pending(page);
                    st.pending_zero.push(page);
                }
                Action::Map { page, writable } => {
                    if !st.res.is_zero_pending(page) {
                        self.map(st, page, writable)?;
                    }
                }
                Action::Wake { page } => st.wakes.push(page),
                // the protocol says when a home refused our eviction (a
                // message, or our own home side): the page stays, if it is
                // still ours and not on its way to a requester
                Action::Refused { page } => {
                    let l = st.node.local(page);
                    if l.copy == Held::Data && l.handing.is_none() {
                        st.res.eviction_refused(page);
                    }
                }
                other => {
                    self.flush_zero(st)?;
                    match other {
                        Action::Send { to, msg } => self.queue_send(st, to, &msg)?,
                        Action::Fetch(first) => {
                            // (rule 2) reads that come one after the other
                            // go in one batch per node
                            let mut batch = vec![first];
                            while batch.len() < FETCH_BATCH {
                                match queue.front() {
                                    Some(&Action::Fetch(f)) => {
                                        queue.pop_front();
                                        batch.push(f);
                                    }
                                    _ => break,
                                }
                            }
                            let mut nodes: Vec<NodeId> = batch.iter().map(|f| f.from).collect();
                            nodes.sort_unstable();
                            nodes.dedup();
                            for n in nodes {
                                let items: Vec<Fetch> = batch.iter().filter(|f| f.from == n).copied().collect();
                                self.fetch_many(st, n, &items)?;
                            }
                            for f in batch {
                                // an eviction's page is parked here, and
                                // read by its home directly later: exposed now
                                let key = if f.evict { self.expose(f.page)? } else { 0 };
                                let more = st
                                    .node
                                    .fetched(f.page, f.from, f.transfer, f.evict, f.epoch, key)
                                    .map_err(|e| format!("page protocol: {e}"))?;
                                queue.extend(more);
                            }
                        }
                        Action::WriteProtect { page } => self.write_protect(st, page)?,
                        Action::Unmap { page } => self.unmap(st, page)?,
                        Action::Drop { page, to } => {
                            self.drop_page(st, page, to)?;
                        }
                        Action::Offer { page, to, transfer, evict, epoch } => {
                            let (zero, digest) = self.offered(st, page);
                            let key = if zero { 0 } else { self.expose(page)? };
                            let more = st
                                .node
                                .offer(page, to, transfer, evict, epoch, zero, digest, key)
                                .map_err(|e| format!("page protocol: {e}"))?;
                            queue.extend(more);
                        }
                        Action::ZeroFill { .. }
                        | Action::Map { .. }
                        | Action::Wake { .. }
                        | Action::Refused { .. }
                        | Action::Forget { .. }
                        | Action::Freed { .. } => {
                            unreachable!()
                        }
                    }
                }
            }
        }
        self.flush_forgotten(st)?;
        // faults that waited for their page's free: now dormant-page faults
        while let Some((page, access, vcpu)) = st.refault.pop() {
            let deferred = std::mem::replace(&mut st.defer_fills, false);
            let r = self.fault_page(st, page, access, vcpu);
            st.defer_fills = deferred;
            r?;
        }
        if !st.hold_sends {
            self.flush_sends(st)?;
        }
        if st.defer_fills {
            // a guest fault's thread fills (maybe outside the lock), then
            // wakes
            return Ok(());
        }
        self.flush_zero(st)?;
        self.flush_wakes(st)
    }

    /// Adds `msg` to the frame for `to` (sending the frame first when the
    /// message would not fit in it).
    fn queue_send(&self, st: &mut State, to: NodeId, msg: &Msg) -> Result<(), String> {
        self.transport(to)?;
        self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        let i = match st.outbox.iter().position(|(n, _)| *n == to) {
            Some(i) => i,
            None => {
                st.outbox.push((to, vec![CHANNEL_PAGES]));
                st.outbox.len() - 1
            }
        };
        let frame = &mut st.outbox[i].1;
        let at = frame.len();
        codec::encode_batch(msg, frame);
        if frame.len() > shoal_fabric::MAX_MESSAGE {
            let record = frame.split_off(at);
            let full = std::mem::replace(frame, [&[CHANNEL_PAGES][..], &record].concat());
            self.send_frame(to, &full)?;
        }
        Ok(())
    }

    /// Sends every queued frame, in the order their peers were first named.
    fn flush_sends(&self, st: &mut State) -> Result<(), String> {
        for (to, frame) in std::mem::take(&mut st.outbox) {
            if frame.len() > 1 {
                self.send_frame(to, &frame)?;
            }
        }
        Ok(())
    }

    fn send_frame(&self, to: NodeId, frame: &[u8]) -> Result<(), String> {
        let t = self.transport(to)?;
        t.send(to, frame).map_err(|e| fabric_error(t, format!("sending to node {to}"), e))
    }

    /// The fabric, to reach `peer`; a pod of one has none, and the
    /// protocol never names a peer there (every page's home is here).
    fn transport(&self, peer: NodeId) -> Result<&dyn Transport, String> {
        self.transport.as_deref().ok_or_else(|| format!("node {peer} is named, but this node runs alone"))
    }

    // ---- memory budget -------------------------------------------------

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
            self.evict_ahead(st)?;
            let mut resumed = false;
            while let Some(page) = st.res.unpark() {
                let (access, vcpu) = st.waiting.get(&page).map_or((Access::Write, None), |w| (w.access, w.vcpu));
                self.fault_page(st, page, access, vcpu)?;
                resumed = true;
            }
            if !resumed {
                break;
            }
        }
        if st.res.stuck() {
            if self.settings.config.nodes == 1 {
                return Err(self.budget_exhausted(st, budget));
            }
            return Err(format!(
                "node {} cannot make room under --node-memory ({} pages): {} of its pages are pinned by the loader, \
                 and none of the rest can leave now",
                self.me,
                budget,
                st.res.pinned()
            ));
        }
        Ok(())
    }

    /// Why a node alone cannot go on: its guest touched more than
    /// `--node-memory`, and it has no other node to evict to.
    fn budget_exhausted(&self, st: &State, budget: u64) -> String {
        let gpa = st.res.first_parked().and_then(|p| self.mem.layout().offset_to_gpa(p * PAGE_SIZE)).unwrap_or(0);
        format!(
            "node memory budget exhausted: {budget} pages ({} MiB) are resident and the guest touched \
             guest-physical {gpa:#x}; raise --node-memory (a single node has nowhere to evict to)",
            (budget * PAGE_SIZE) >> 20
        )
    }

    /// Starts as many evictions as `Residency` wants ahead of need, oldest
    /// pages first: each taken from the guest, checked for zeros (made
    /// dormant again) or handed to a node with room.
    fn evict_ahead(&self, st: &mut State) -> Result<(), String> {
        let mut need = st.res.evictions_wanted();
        // faults wait for room: no probing, and a second pass of the clock
        // if the first only found pages the guest touched (it cleared
        // their marks): room must be made now
        let urgent = st.res.has_parked();
        let mut passes = if urgent { 2 } else { 1 };
        // the clock's front hand: pages to take out of the guest view, so
        // that a touch shows they are wanted
        for page in st.res.probes_wanted() {
            self.unmap(st, page)?;
            st.res.probed(page);
            self.counters.pages_probed.fetch_add(1, Ordering::Relaxed);
        }
        let mut scanned = st.res.queued();
        while need > 0 {
            let page = match st.res.next_candidate(&mut scanned, urgent) {
                Some(Candidate::Evict(page)) => page,
                Some(Candidate::Probe(page)) => {
                    // out of the guest view; the next touch is a minor
                    // fault that maps it back and marks it referenced
                    self.unmap(st, page)?;
                    st.res.probed_at_front(page);
                    self.counters.pages_probed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                None => {
                    passes -= 1;
                    if passes == 0 {
                        break;
                    }
                    scanned = st.res.queued();
                    continue;
                }
            };
            let l = st.node.local(page);
            // a page another node's eviction parked here leaves only when
            // faults here wait for room, never ahead of need: two nodes
            // near their bounds otherwise pass such pages back and forth
            // without end (measured: 2 nodes at 2250 KiB each, `migrate
            // mode=4 mib=2`: 130 000 evictions for 2 700 faults; at 2200
            // KiB one run did not finish in minutes)
            if l.parked && !urgent {
                st.res.requeue(page);
                continue;
            }
            // a read copy: dropping it moves nothing (its owner keeps the
            // page) and frees its memory at once; the home hears it
            if !l.owner && l.copy == Held::Data {
                let acts = st.node.unshare(page).map_err(|e| format!("page protocol: {e}"))?;
                if acts.is_empty() {
                    // a request or an invalidation of it is under way: later
                    st.res.requeue(page);
                    continue;
                }
                self.counters.read_copies_dropped.fetch_add(1, Ordering::Relaxed);
                need -= 1;
                self.apply(st, acts)?;
                continue;
            }
            // take it from the guest first: a zero check of a page the
            // guest can still write could re-dormant a page just written
            // (if the eviction does not go ahead, the next touch is a
            // minor fault that maps it back)
            self.unmap(st, page)?;
            let zero = self.settings.dormant && self.is_zero(st, page);
            let target = if zero { None } else { Some(st.res.pick_target()?) };
            let acts = st.node.evict(page, target).map_err(|e| format!("page protocol: {e}"))?;
            if acts.is_empty() {
                // not settled here (a transaction is under way): later
                st.res.requeue(page);
                continue;
            }
            st.res.eviction_started(page, target);
            need -= 1;
            self.apply(st, acts)?;
        }
        Ok(())
    }

    // ---- watchdogs -------------------------------------------------------

    /// A fault that has waited longer than `limit`, in words: the pod is
    /// stuck (a node hangs without leaving), so the VM must end rather
    /// than leave a vCPU blocked forever.
    /// The guest reported `pages` free (a balloon's report): they are
    /// taken out of the guest view at once (its next touch faults, and
    /// waits for the free) and recorded; [`Engine::free_reported`] then
    /// makes them dormant. This returns before any message goes, so the
    /// balloon gives the guest its report back at once: a report holds up
    /// to 128 MiB off the guest's free lists until then.
    pub fn report_free(&self, pages: std::ops::Range<Page>) -> Result<(), String> {
        if pages.end > self.settings.config.pages {
            return Err(format!(
                "pages {}..{} freed, but the guest has {} pages",
                pages.start, pages.end, self.settings.config.pages
            ));
        }
        self.counters.pages_reported.fetch_add(pages.end - pages.start, Ordering::Relaxed);
        let mut st = self.lock();
        st.reported.extend(pages.clone());
        if self.uffd.is_some() {
            self.mem
                .unmap_guest_view(pages.start * PAGE_SIZE, (pages.end - pages.start) * PAGE_SIZE)
                .map_err(|e| format!("taking freed pages {}..{} out of the guest view: {e}", pages.start, pages.end))?;
        }
        Ok(())
    }

    /// Makes the reported pages of `pages` dormant wherever they are held
    /// (their memory freed there): returns when every one is. A page a
    /// fault freed already is skipped. An error when the engine failed
    /// meanwhile (the VM is ending).
    pub fn free_reported(&self, pages: std::ops::Range<Page>) -> Result<(), String> {
        let started = Instant::now();
        // a 2 MiB chunk an event, its holes punched as one: faults and
        // messages go on between chunks
        const BATCH: u64 = 512;
        let mut first = pages.start;
        while first < pages.end {
            let batch: Vec<Page> = (first..(first + BATCH).min(pages.end)).collect();
            first += batch.len() as u64;
            let mut st = self.wait_for_fills(self.lock(), &batch);
            if self.failed() {
                return Err("the VM is ending".into());
            }
            let mut acts = Vec::new();
            let asked = batch.into_iter().try_for_each(|page| {
                // a free under way already (a fault's, or the guest
                // reported the page twice) asks nothing
                if st.reported.contains(&page) && !st.node.local(page).freeing {
                    acts.extend(st.node.free(page).map_err(|e| format!("page protocol: {e}"))?);
                    st.freeing += 1;
                }
                Ok::<(), String>(())
            });
            // the protocol's or the memory's failure ends the VM, as on
            // any event (not only the device)
            if let Err(e) = asked.and_then(|()| self.apply(&mut st, acts)).and_then(|()| self.settle(&mut st)) {
                self.give_up();
                self.fail(e.clone());
                return Err(e);
            }
        }
        let mut st = self.lock();
        while st.freeing > 0 {
            // a pod that ends (or a peer gone) answers no more frees
            if self.failed() || self.vcpus.get().is_some_and(|v| v.control().stopping()) {
                return Err("the VM is ending".into());
            }
            st =
                self.freed.wait_timeout(st, std::time::Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
            // (fills recorded by the next holder of the lock: see `lock`)
            self.record_fills(&mut st);
        }
        tracing::debug!(
            first = pages.start,
            count = pages.end - pages.start,
            took_us = started.elapsed().as_micros() as u64,
            "freed"
        );
        Ok(())
    }

    /// [`Engine::report_free`], then [`Engine::free_reported`] (tests).
    #[cfg(test)]
    pub fn free_pages(&self, pages: std::ops::Range<Page>) -> Result<(), String> {
        self.report_free(pages.clone())?;
        self.free_reported(pages)
    }

    /// A fault on `page`, reported free and not freed yet: starts its free
    /// (unless under way) and parks the fault until it is complete.
    fn free_now(&self, st: &mut State, page: Page, access: Access, vcpu: Option<u32>) -> Result<(), String> {
        let w = st.after_free.entry(page).or_insert((access, vcpu));
        w.0 = w.0.max(access);
        if st.node.local(page).freeing {
            return Ok(());
        }
        let acts = st.node.free(page).map_err(|e| format!("page protocol: {e}"))?;
        st.freeing += 1;
        self.apply(st, acts)
    }

    pub fn stuck_fault(&self, limit: std::time::Duration) -> Option<String> {
        let st = self.lock();
        let (&page, w) = st.waiting.iter().max_by_key(|(_, w)| w.since.elapsed())?;
        let waited = w.since.elapsed();
        if waited < limit {
            return None;
        }
        let gpa = self.mem.layout().offset_to_gpa(page * PAGE_SIZE).unwrap_or(0);
        let home = self.settings.config.home(page);
        let what = if st.res.is_parked(page) {
            let to: Vec<String> = st.res.eviction_targets().iter().map(|t| format!("node {t}")).collect();
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
        self.lock().res.resident()
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
        m.pages_loaded = st.res.pinned();
        m.pages_resident = st.res.resident();
        m.remote_fetches = get(&c.remote_fetches);
        m.bytes_fabric_read = get(&c.bytes_fabric_read);
        m.pages_evicted = get(&c.pages_evicted);
        m.pages_redormanted = get(&c.pages_redormanted);
        m.pages_reported = get(&c.pages_reported);
        m.pages_held = get(&c.pages_held);
        m.messages_held = get(&c.messages_held);
        m.holds_exited = get(&c.holds_exited);
        m.holds_ran = get(&c.holds_ran);
        m.holds_slept = get(&c.holds_slept);
        m.holds_refault = get(&c.holds_refault);
        m.holds_yielded = get(&c.holds_yielded);
        m.holds_expired = get(&c.holds_expired);
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
        m.faults_remote_direct = st.latency_remote_direct.count();
        m.fault_remote_direct_us_p50 = st.latency_remote_direct.quantile_us(0.5);
        m.faults_remote_asked = st.latency_remote_asked.count();
        m.fault_remote_asked_us_p50 = st.latency_remote_asked.quantile_us(0.5);
        m.fault_remote_owner_us_p50 = st.breakdown.owner.quantile_us(0.5);
        m.fault_remote_fabric_read_us_p50 = st.breakdown.read.quantile_us(0.5);
        m.fault_remote_map_us_p50 = st.breakdown.map.quantile_us(0.5);
        m.fault_remote_rest_us_p50 = st.breakdown.rest.quantile_us(0.5);
        m.faults_upgrade = st.latency_upgrade.count();
        m.fault_upgrade_us_p50 = st.latency_upgrade.quantile_us(0.5);
        m.pages_shared = get(&c.pages_shared);
        m.invalidations = get(&c.invalidations);
        m.read_copies_dropped = get(&c.read_copies_dropped);
        m.pages_prefetched = get(&c.pages_prefetched);
        m.prefetched_used = get(&c.prefetched_used);
        m.pages_probed = get(&c.pages_probed);
        m.pages_referenced = get(&c.pages_referenced);
        m.pages_fetched_back = get(&c.pages_fetched_back);
        m.ownership_transfers = get(&c.ownership_transfers);
        m.memfd_bytes = self.mem.allocated_bytes();
        if let Some(t) = &self.transport {
            let s = t.stats();
            m.exposures = s.exposures;
            m.exposures_ended = s.exposures_ended;
            m.exposure_us = s.exposure_ns as f64 / 1000.0;
            m.chunks_registered = s.chunks_registered;
            m.sends_deferred = s.sends_deferred;
            m.messages_tapped = s.messages_tapped;
        }
        m.pinned_bytes = crate::metrics::pinned_bytes();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Layout;

    /// The settings of these tests: `nodes` nodes, blocks of `block_pages`,
    /// dormant pages, no memory bound.
    pub(super) fn settings(nodes: u32, block_pages: u64, pages: u64) -> Settings {
        Settings {
            config: Config::new(nodes, block_pages, pages).unwrap(),
            dormant: true,
            budget: None,
            peer_budget: None,
            read_copies: false,
            eviction: Eviction::Fifo,
            digests: None,
        }
    }

    /// A node alone over `mib` MiB, with the first `loaded` pages written
    /// (as the loader's are: owned here, with contents).
    fn alone(mib: u64, loaded: u64) -> (Engine, Arc<GuestMemory>) {
        let mem = Arc::new(GuestMemory::new(Layout::new(mib << 20).unwrap()).unwrap());
        mem.write_alias(0, &vec![0xa5u8; (loaded * PAGE_SIZE) as usize]);
        let settings = settings(1, 256, mem.layout().pages());
        let on_fatal: OnFatal = Arc::new(|why| panic!("the engine failed: {why}"));
        let engine = Engine::new(0, settings, None, mem.clone(), None, &[(0, loaded * PAGE_SIZE)], on_fatal).unwrap();
        (engine, mem)
    }

    #[test]
    fn freed_pages_with_contents_become_dormant_and_their_memory_goes() {
        let (engine, mem) = alone(8, 300);
        assert_eq!(mem.allocated_bytes(), 300 * PAGE_SIZE);
        assert_eq!(engine.resident_pages(), 300);
        // 100 of the written pages and 50 never touched
        engine.free_pages(200..350).unwrap();
        let m = engine.metrics();
        assert_eq!(m.pages_reported, 150);
        assert_eq!(m.pages_redormanted, 100, "only pages with contents had memory to free");
        assert_eq!(mem.allocated_bytes(), 200 * PAGE_SIZE);
        assert_eq!(engine.resident_pages(), 200);
        // every freed page is dormant at its home again
        let st = engine.lock();
        assert!((200..350).all(|p| st.node.dir(p).owner.is_none() && st.node.local(p).copy == Held::None));
        assert!((0..200).all(|p| st.node.local(p).copy == Held::Data));
    }

    #[test]
    fn a_fault_on_a_reported_page_waits_for_its_free_then_gets_a_zeroed_page() {
        let (engine, mem) = alone(8, 10);
        engine.report_free(0..10).unwrap();
        // reported, not freed yet: the memory is still there
        assert_eq!(mem.allocated_bytes(), 10 * PAGE_SIZE);
        assert_eq!(engine.metrics().pages_redormanted, 0);
        // the guest writes page 3 again before the balloon's thread freed
        // it: the fault frees it first, then takes a dormant page
        let addr = mem.guest_view_base() + 3 * PAGE_SIZE;
        engine.handle_fault(Fault { addr, write: true, wp: false, minor: true, tid: 0 }).unwrap();
        {
            let st = engine.lock();
            assert!(!st.reported.contains(&3) && st.after_free.is_empty());
            let l = st.node.local(3);
            assert!(l.owner && l.copy == Held::Data && l.writable, "{l:?}");
        }
        assert_eq!(engine.metrics().pages_redormanted, 1);
        // the balloon's thread frees the rest, and leaves page 3 alone
        engine.free_reported(0..10).unwrap();
        let m = engine.metrics();
        assert_eq!((m.pages_reported, m.pages_redormanted), (10, 10));
        assert_eq!(engine.lock().node.local(3).copy, Held::Data, "the page the guest took back stays");
        assert!((0..10).filter(|&p| p != 3).all(|p| engine.lock().node.local(p).copy == Held::None));
    }

    /// The hold rule (rule 10), case by case: a fault on the page and age
    /// come first; a vCPU that may wait for another page here keeps its
    /// page from vCPUs that waited less only (`Asker::older` makes exactly
    /// one of two nodes in each other's way give way); otherwise what the
    /// vCPU did since its wake decides, and is not even looked at before.
    #[test]
    fn a_hold_ends_by_its_rule() {
        use std::time::Duration;
        let young = Duration::from_millis(1);
        let never = || -> Option<Ran> { panic!("looked at the vCPU") };
        assert_eq!(HoldEnd::of(true, young, true, false, never), Some(HoldEnd::Refault));
        assert_eq!(HoldEnd::of(false, HOLD_MAX, true, false, never), Some(HoldEnd::Expired));
        // the vCPU waits for another page here: it yields to an asker that
        // has waited longer, and only to one
        assert_eq!(HoldEnd::of(false, young, true, true, never), Some(HoldEnd::Yielded));
        assert_eq!(HoldEnd::of(false, young, true, false, never), None);
        // it waits for nothing here: what it did decides, whoever asks
        for older in [true, false] {
            assert_eq!(HoldEnd::of(false, young, false, older, || None), None);
            assert_eq!(HoldEnd::of(false, young, false, older, || Some(Ran::Exited)), Some(HoldEnd::Exited));
            assert_eq!(HoldEnd::of(false, young, false, older, || Some(Ran::Long)), Some(HoldEnd::Ran));
            assert_eq!(HoldEnd::of(false, young, false, older, || Some(Ran::Slept)), Some(HoldEnd::Slept));
        }
    }

    /// Who goes first: the earlier wait, the lower node on a tie, never an
    /// asker for whom no vCPU waits; anyone when our vCPU waits for
    /// nothing. Two nodes in each other's way never both yield.
    #[test]
    fn the_vcpu_that_waited_longer_goes_first() {
        let asker = |node, since| Asker { node: Some(node), since };
        assert!(asker(2, 5).older(Some(6), 1));
        assert!(!asker(2, 7).older(Some(6), 1));
        assert!(asker(0, 6).older(Some(6), 1) && !asker(2, 6).older(Some(6), 1));
        assert!(!Asker { node: None, since: 6 }.older(Some(6), 1));
        assert!(Asker { node: None, since: 5 }.older(Some(6), 1));
        assert!(!asker(2, 0).older(Some(6), 1) && !asker(2, 0).older(None, 1));
        assert!(asker(2, 9).older(None, 1));
        for (a, b) in [(5, 6), (6, 5), (6, 6)] {
            let (on0, on1) = (asker(1, b).older(Some(a), 0), asker(0, a).older(Some(b), 1));
            assert!(on0 != on1, "nodes 0 ({a}) and 1 ({b}) both yield, or both keep");
        }
    }

    #[test]
    fn freeing_a_page_twice_or_outside_the_guest() {
        let (engine, mem) = alone(8, 10);
        engine.free_pages(0..10).unwrap();
        engine.free_pages(0..10).unwrap();
        let m = engine.metrics();
        assert_eq!((m.pages_reported, m.pages_redormanted), (20, 10));
        assert_eq!(mem.allocated_bytes(), 0);
        let e = engine.free_pages(2040..2049).unwrap_err();
        assert!(e.contains("the guest has 2048 pages"), "{e}");
    }
}

/// Two engines in one process over a fabric of queues: the page protocol's
/// messages between them for real (no one-sided reads).
#[cfg(test)]
mod pair {
    use super::*;
    use crate::memory::Layout;
    use shoal_fabric::{Incoming, Kind, ReadReq, RegionInfo, Sink, Stats};
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// A frame and the node that sent it.
    type Frame = (NodeId, Vec<u8>);

    #[derive(Debug)]
    struct Queues {
        me: NodeId,
        to: Vec<Mutex<Sender<Frame>>>,
    }

    impl Transport for Queues {
        fn kind(&self) -> Kind {
            Kind::Shm
        }
        fn node(&self) -> NodeId {
            self.me
        }
        fn peers(&self) -> Vec<NodeId> {
            (0..self.to.len() as NodeId).filter(|&n| n != self.me).collect()
        }
        fn regions(&self, _: NodeId) -> shoal_fabric::Result<Vec<RegionInfo>> {
            Ok(Vec::new())
        }
        fn read_with(&self, peer: NodeId, _: &[ReadReq], _: &mut Sink<'_>) -> shoal_fabric::Result<()> {
            Err(shoal_fabric::Error::PeerGone { peer, reason: "these tests move no page bytes".into() })
        }
        fn send(&self, peer: NodeId, msg: &[u8]) -> shoal_fabric::Result<()> {
            self.to[peer as usize].lock().unwrap().send((self.me, msg.to_vec())).unwrap();
            Ok(())
        }
        fn recv(&self, _: std::time::Duration) -> shoal_fabric::Result<Option<Incoming>> {
            Ok(None)
        }
        fn stats(&self) -> Stats {
            Stats::default()
        }
        fn shutdown(&self) {}
    }

    /// Two nodes over 4 MiB (blocks of 64 pages, homed on nodes 0 and 1
    /// in turn), the first `loaded` pages written on node 0 (as the
    /// loader's are); a thread per node takes its messages.
    fn pod(loaded: u64) -> (Vec<Arc<Engine>>, Vec<Arc<GuestMemory>>) {
        let (tx0, rx0) = channel();
        let (tx1, rx1) = channel();
        let mut engines = Vec::new();
        let mut mems = Vec::new();
        for me in 0..2 {
            let mem = Arc::new(GuestMemory::new(Layout::new(4 << 20).unwrap()).unwrap());
            if me == 0 {
                mem.write_alias(0, &vec![0x5au8; (loaded * PAGE_SIZE) as usize]);
            }
            let settings = super::tests::settings(2, 64, mem.layout().pages());
            let t: Arc<dyn Transport> =
                Arc::new(Queues { me, to: vec![Mutex::new(tx0.clone()), Mutex::new(tx1.clone())] });
            let on_fatal: OnFatal = Arc::new(|why| panic!("the engine failed: {why}"));
            let e = Engine::new(me, settings, Some(t), mem.clone(), None, &[(0, loaded * PAGE_SIZE)], on_fatal);
            engines.push(Arc::new(e.unwrap()));
            mems.push(mem);
        }
        let serve = |e: Arc<Engine>, rx: Receiver<Frame>| {
            std::thread::spawn(move || {
                while let Ok((from, frame)) = rx.recv() {
                    assert_eq!(frame[0], CHANNEL_PAGES);
                    e.on_message(from, &frame[1..]).unwrap();
                }
            })
        };
        serve(engines[0].clone(), rx0);
        serve(engines[1].clone(), rx1);
        (engines, mems)
    }

    /// A frame of `msgs` as a peer sends it.
    fn frame(msgs: &[Msg]) -> Vec<u8> {
        let mut bytes = Vec::new();
        msgs.iter().for_each(|m| codec::encode_batch(m, &mut bytes));
        bytes
    }

    /// A member that lies (answers nobody asked for, a home's words from a
    /// node that is not the home, another node's name) is refused and
    /// named, before anything of the page changes.
    #[test]
    fn a_peer_that_breaks_the_protocol_is_named_and_changes_nothing() {
        // page 10 is node 0's (loaded there, homed there); page 70 is homed
        // on node 1 and dormant
        let cases = [
            (
                Msg::Ready {
                    page: 70,
                    from: 1,
                    dormant: true,
                    transfer: true,
                    evict: false,
                    epoch: 9,
                    digest: 0,
                    key: 0,
                },
                "node 1 sent a message the page protocol does not allow",
            ),
            (
                Msg::Ready {
                    page: 10,
                    from: 1,
                    dormant: false,
                    transfer: true,
                    evict: true,
                    epoch: 9,
                    digest: 0,
                    key: 0,
                },
                "which only page 10's home (node 0) may send",
            ),
            (Msg::Fetched { page: 10, from: 0, key: 0 }, "node 1 sent a page message in the name of node 0"),
            (Msg::Fetched { page: 10, from: 1, key: 0 }, "node 1 sent a message the page protocol does not allow"),
            (
                Msg::Evicted { page: 10, from: 1, to: 0, dormant: true, epoch: 1, digest: 0, key: 0 },
                "node 1 sent a message the page protocol does not allow",
            ),
            (
                Msg::Grant { answers: 70, pages: vec![(70, 1)] },
                "node 1 sent a message the page protocol does not allow",
            ),
        ];
        for (msg, says) in cases {
            let (e, mem) = pod(16);
            let held = |e: &Engine| {
                let st = e.lock();
                (st.node.local(10), st.node.local(70))
            };
            let before = held(&e[0]);
            let err = e[0].on_message(1, &frame(std::slice::from_ref(&msg))).unwrap_err();
            assert!(err.contains(says), "{msg:?}: {err}");
            assert_eq!(held(&e[0]), before, "{msg:?}");
            assert_eq!(mem[0].allocated_bytes(), 16 * PAGE_SIZE, "{msg:?}: nothing zero-filled");
        }
    }

    #[test]
    fn freed_pages_homed_on_another_node_become_dormant_there_too() {
        // pages 0..256: four blocks, two homed on each node, all written
        // on node 0; 256..512 never touched
        let (e, mem) = pod(256);
        assert_eq!(mem[0].allocated_bytes(), 256 * PAGE_SIZE);
        e[0].free_pages(0..512).unwrap();
        let (m0, m1) = (e[0].metrics(), e[1].metrics());
        assert_eq!(m0.pages_reported, 512);
        assert_eq!(m0.pages_redormanted, 256, "node 0 held 256 of them");
        assert_eq!(mem[0].allocated_bytes(), 0);
        assert_eq!(m0.remote_fetches + m1.remote_fetches, 0, "nothing moved");
        // one frame each way per node and chunk, not one a page
        assert!(m0.messages_sent >= 256 && m1.messages_sent >= 128, "{m0:?} {m1:?}");
        for p in 0..512 {
            let home = &e[(p / 64 % 2) as usize];
            assert_eq!(home.lock().node.dir(p).owner, None, "page {p} is dormant at its home");
            assert_eq!(e[0].lock().node.local(p).copy, Held::None);
        }
    }
}
