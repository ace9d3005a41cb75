//! Pods: one guest whose memory and vCPUs span several node processes.
//!
//! Node 0 keeps the devices (the console, the exit port); every node
//! contributes memory, builds its own KVM VM over it, and runs the vCPUs
//! placed on it (and those that move to it). A pod starts in four steps,
//! each bounded by the join timeout:
//! 1. every node binds its fabric endpoint and joins the others (the
//!    fabric's handshake checks protocol version, pod id and pod secret);
//! 2. every other node sends node 0 its [`Facts`] (memory size, guest
//!    image digest, dormant setting, memory bound, shoal version); node 0
//!    refuses a node whose facts differ from its own, naming the
//!    difference, and the pod does not start;
//! 3. node 0 loads the image and tells every node which pages the loader
//!    wrote and how the vCPUs start ([`Control::Start`]); they build their
//!    VM and answer [`Control::Started`], then start their vCPUs;
//! 4. the guest runs; at its end node 0 sends [`Control::Finish`] and
//!    collects every node's metrics.
//!
//! A node that leaves early (dies, disconnects) is noticed through the
//! fabric (a closed connection, or a read or message timing out after the
//! fabric's io timeout); one that hangs is noticed by its silence: every
//! node sends every other a beat each [`BEAT_EVERY`] (from a thread of its
//! own), and a peer not heard from (by the fabric's reading threads) for
//! the silence limit (`--liveness-timeout`, default
//! [`SILENCE_LIMIT`]) has failed. Node 0 stops the guest and names
//! the node; the others exit with an error naming it too.

pub mod digest;
pub mod engine;
pub mod launch;
pub mod policy;
pub mod residency;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_fabric::{Incoming, Take, Transport};
use shoal_protocol::{Access, NodeId};

use crate::metrics::NodeMetrics;
use crate::vcpus::{Vcpus, CHANNEL_VCPU};
use engine::{Engine, CHANNEL_CONTROL, CHANNEL_PAGES};

/// Pages per block: the unit of homes and of dormant grants (2 MiB).
pub const BLOCK_PAGES: u64 = 512;

/// How long node 0 waits for the others' metrics at the end.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a guest fault may wait before the pod is declared stuck (a
/// node that hangs without leaving: its connection stays up, it just never
/// answers). Remote faults take milliseconds; evictions ahead of a parked
/// fault a few round trips each.
pub const FAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often every node tells every other it is alive, and how long a
/// peer may stay silent (no beat, no message) by default before it counts
/// as hung: within 2 s of a node hanging, the pod names it and ends.
pub const BEAT_EVERY: Duration = Duration::from_millis(250);
pub const SILENCE_LIMIT: Duration = Duration::from_millis(1500);

/// What every node of a pod must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub shoal_version: String,
    pub nodes: u32,
    pub memory: u64,
    /// The guest image: its name and the SHA-256 of its bytes.
    pub image_name: String,
    pub image_sha256: String,
    pub dormant: bool,
    pub node_memory: Option<u64>,
    pub cpus: u32,
    /// Each vCPU's first node.
    pub placement: Vec<u32>,
    pub migration: bool,
    /// Which page leaves a node first under the memory bound (each node
    /// may choose its own: not compared).
    #[serde(default)]
    pub eviction: residency::Eviction,
    /// Pulled pages are checked against their owners' digests.
    #[serde(default)]
    pub verify_pages: bool,
}

impl Facts {
    /// Where `theirs` differs from ours, in words; None when they agree.
    pub fn mismatch(&self, theirs: &Facts) -> Option<String> {
        let mut diffs = Vec::new();
        if self.shoal_version != theirs.shoal_version {
            diffs.push(format!("shoal {} against {}", theirs.shoal_version, self.shoal_version));
        }
        if self.nodes != theirs.nodes {
            diffs.push(format!("{} nodes against {}", theirs.nodes, self.nodes));
        }
        if self.memory != theirs.memory {
            diffs.push(format!("guest memory {} MiB against {} MiB", theirs.memory >> 20, self.memory >> 20));
        }
        if self.image_sha256 != theirs.image_sha256 {
            diffs.push(format!(
                "guest image {} (sha256 {:.12}) against {} (sha256 {:.12})",
                theirs.image_name, theirs.image_sha256, self.image_name, self.image_sha256
            ));
        }
        if self.dormant != theirs.dormant {
            diffs.push(format!("--dormant {} against {}", on_off(theirs.dormant), on_off(self.dormant)));
        }
        if self.node_memory != theirs.node_memory {
            diffs.push(format!(
                "--node-memory {} against {}",
                size_text(theirs.node_memory),
                size_text(self.node_memory)
            ));
        }
        if self.cpus != theirs.cpus || self.placement != theirs.placement {
            diffs.push(format!(
                "{} vCPUs placed {:?} against {} placed {:?}",
                theirs.cpus, theirs.placement, self.cpus, self.placement
            ));
        }
        if self.migration != theirs.migration {
            diffs.push(format!("--migration {} against {}", on_off(theirs.migration), on_off(self.migration)));
        }
        if self.verify_pages != theirs.verify_pages {
            diffs.push(format!("--verify-pages {} against {}", on_off(theirs.verify_pages), on_off(self.verify_pages)));
        }
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn size_text(s: Option<u64>) -> String {
    s.map_or("unbounded".into(), |b| format!("{} MiB", b >> 20))
}

/// Pod control messages (JSON after the channel byte: rare and small).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// node → node 0: my facts.
    Hello { facts: Facts },
    /// node 0 → node: your facts differ; the pod does not start.
    Mismatch { reason: String },
    /// node 0 → node: the pages the loader wrote and how the vCPUs start.
    Start { plan: StartPlan },
    /// node → node 0: ready (the VM built, the engine serving).
    Started,
    /// node 0 → node: every node is ready: start your vCPUs.
    Run,
    /// node 0 → node: the guest ended; send your metrics.
    Finish,
    /// node → node 0.
    Metrics { metrics: Box<NodeMetrics> },
    /// node 0 → node: the pod failed.
    Abort { reason: String },
    /// any node → any node: still here (every [`BEAT_EVERY`]).
    Beat,
}

/// What every node needs to start the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartPlan {
    /// The pages the loader wrote, as (offset, len) extents of guest
    /// memory; they start owned by node 0.
    pub loaded: Vec<(u64, u64)>,
    /// Where the vCPUs enter the guest.
    pub boot: crate::loader::BootPlan,
    /// Node 0's guest clock (ns since the VM started) when it sent this,
    /// and its wall clock (ns since the Unix epoch) at that moment: the
    /// other nodes start their guest clock from them, adding the time the
    /// message took by their wall clock (exact on one host, and as good as
    /// the hosts' clock synchronisation across hosts; a gap outside 0 to
    /// 10 s is not believed: then the message's time is left out, and
    /// the clocks differ by it).
    pub clock_ns: u64,
    pub wall_ns: u64,
}

/// The wall clock, in ns since the Unix epoch (0 if it is before it).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl StartPlan {
    /// When node 0's guest clock read zero, by this node's monotonic clock.
    pub fn clock_start(&self) -> Instant {
        let in_flight = wall_ns().checked_sub(self.wall_ns).filter(|&d| d <= 10_000_000_000).unwrap_or(0);
        let since = Duration::from_nanos(self.clock_ns.saturating_add(in_flight));
        Instant::now().checked_sub(since).unwrap_or_else(Instant::now)
    }
}

/// Errors of a pod's setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Fabric(#[from] shoal_fabric::Error),
    /// The nodes' configurations differ (the user's mistake).
    #[error("node {node} does not match this pod: {reason}")]
    Mismatch { node: NodeId, reason: String },
    #[error("node 0 refused this node: {0}")]
    Refused(String),
    #[error("node {node} sent a malformed control message: {reason}")]
    Malformed { node: NodeId, reason: String },
    #[error("node {node} left the pod: {reason}")]
    PeerGone { node: NodeId, reason: String },
    #[error("waiting for {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Failed(String),
}

/// Sends a control message.
pub fn send_control(t: &dyn Transport, to: NodeId, msg: &Control) -> Result<(), Error> {
    let mut bytes = vec![CHANNEL_CONTROL];
    bytes.extend(serde_json::to_vec(msg).expect("control messages serialise"));
    t.send(to, &bytes)?;
    Ok(())
}

/// What arrives for a node, by channel.
#[derive(Debug)]
enum Arrival {
    Control { from: NodeId, msg: Control },
    Gone { node: NodeId, reason: String },
}

/// When each peer was last heard from (any message counts).
#[derive(Debug)]
pub struct Liveness {
    me: NodeId,
    limit: Duration,
    last: Vec<Instant>,
    /// Beats are due from every peer from now on (after the start).
    watching: bool,
}

impl Liveness {
    pub fn new(me: NodeId, nodes: u32, limit: Duration) -> Self {
        Liveness { me, limit, last: vec![Instant::now(); nodes as usize], watching: false }
    }

    fn heard(&mut self, from: NodeId) {
        if let Some(t) = self.last.get_mut(from as usize) {
            *t = Instant::now();
        }
    }

    /// Every peer counts as just heard; from now on silence is failure.
    pub fn watch(&mut self) {
        let now = Instant::now();
        self.last.iter_mut().for_each(|t| *t = now);
        self.watching = true;
    }

    /// The peer silent the longest, if longer than the limit: silent
    /// both to this thread (what it took) and to the fabric's reading
    /// threads (what arrived, `Transport::quiet_for`), so messages that
    /// wait while this thread is busy count as heard.
    pub fn silent(&self, t: &dyn Transport) -> Option<(NodeId, Duration)> {
        if !self.watching {
            return None;
        }
        self.last
            .iter()
            .enumerate()
            .filter(|(n, _)| *n as NodeId != self.me)
            .map(|(n, at)| {
                let quiet = at.elapsed();
                (n as NodeId, t.quiet_for(n as NodeId).map_or(quiet, |q| q.min(quiet)))
            })
            .max_by_key(|&(_, quiet)| quiet)
            .filter(|&(_, quiet)| quiet > self.limit)
    }
}

/// The words for a peer that went silent.
pub fn silent_peer(node: NodeId, quiet: Duration) -> String {
    format!(
        "node {node} does not answer: nothing heard from it for {:.1} s (it hangs, or the network to it is cut)",
        quiet.as_secs_f64()
    )
}

/// The words for a peer that left a request of ours (`what`) unanswered
/// for `after`, the silence limit: the same failure as [`silent_peer`],
/// noticed by the thread that waited.
pub fn unanswered(node: NodeId, after: Duration, what: &str) -> String {
    format!(
        "node {node} does not answer: {what} got no answer for {:.1} s (it hangs, or the network to it is cut)",
        after.as_secs_f64()
    )
}

/// Sends a beat to every peer every [`BEAT_EVERY`] from a thread of its
/// own while it lives: a node whose receiving thread is busy (a page read
/// waiting on a hung peer, a long event) still beats, so its peers never
/// take it for the hung one.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    fn start(t: Arc<dyn Transport>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let quit = stop.clone();
        let thread = std::thread::Builder::new().name("shoal-beat".into()).spawn(move || {
            while !quit.load(Ordering::SeqCst) {
                for p in t.peers() {
                    let _ = send_control(&*t, p, &Control::Beat);
                }
                std::thread::park_timeout(BEAT_EVERY);
            }
        })?;
        Ok(Heartbeat { stop, thread: Some(thread) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(th) = self.thread.take() {
            th.thread().unpark();
            let _ = th.join();
        }
    }
}

/// Whether `msg` may come from `from` to `me`: node 0 runs the pod, so a
/// member takes control messages from node 0 only (beats from anyone),
/// and node 0 takes only what members send it (`Hello`, `Started`,
/// `Metrics`, `Abort`, beats). Anything else is a peer breaking the pod's
/// control protocol, named.
fn check_control_sender(me: NodeId, from: NodeId, msg: &Control) -> Result<(), Error> {
    let fine = match msg {
        Control::Beat => true,
        _ if me != 0 => from == 0,
        Control::Hello { .. } | Control::Started | Control::Metrics { .. } | Control::Abort { .. } => true,
        Control::Mismatch { .. } | Control::Start { .. } | Control::Run | Control::Finish => false,
    };
    if fine {
        return Ok(());
    }
    let why = if me == 0 { "which only node 0 sends" } else { "which only node 0 may send to a member" };
    Err(Error::Malformed { node: from, reason: format!("{}, {why}", control_name(msg)) })
}

/// A control message's name, for errors.
fn control_name(msg: &Control) -> &'static str {
    match msg {
        Control::Hello { .. } => "Hello",
        Control::Mismatch { .. } => "Mismatch",
        Control::Start { .. } => "Start",
        Control::Started => "Started",
        Control::Run => "Run",
        Control::Finish => "Finish",
        Control::Metrics { .. } => "Metrics",
        Control::Abort { .. } => "Abort",
        Control::Beat => "Beat",
    }
}

// Over tcp and verbs every message reaches the engine after two thread
// hand-offs: the fabric's receiving thread, then this receiver through
// the fabric's inbox. Over shm page and vCPU messages are taken on the
// receiving thread ([`PodTap`]): one wake fewer per message, which on a
// small host often costs more than the work (see `Transport::set_tap` for
// why only shm). A first version (2026-12-06) deadlocked a Linux boot
// under --node-memory 80M: both nodes' receiving threads blocked in sends,
// both socket buffers full of eviction traffic. It needed sends that never
// wait for the peer, which the fabric now has (its send backlog).
/// Reads the next message; control messages are returned, page and vCPU
/// messages handed to `engine` and `vcpus` (None before they exist: then
/// such a message is a peer's mistake). Every arrival counts as hearing
/// from its sender.
fn next(
    t: &dyn Transport,
    engine: Option<&Engine>,
    vcpus: Option<&Arc<Vcpus>>,
    live: Option<&mut Liveness>,
    timeout: Duration,
) -> Result<Option<Arrival>, Error> {
    // messages waiting for a hold (a page kept for a vCPU that has not
    // run since its wake) go when it ends: look again soon
    let timeout = match engine {
        Some(e) => {
            e.run_deferred().map_err(Error::Failed)?;
            e.deferred_poll().map_or(timeout, |poll| timeout.min(poll))
        }
        None => timeout,
    };
    match t.recv(timeout)? {
        None => Ok(None),
        Some(Incoming::PeerGone { node, reason }) => Ok(Some(Arrival::Gone { node, reason })),
        Some(Incoming::Message { from, payload }) => {
            if let Some(l) = live {
                l.heard(from);
            }
            match payload.split_first() {
                Some((&CHANNEL_CONTROL, body)) => {
                    let msg: Control = serde_json::from_slice(body)
                        .map_err(|e| Error::Malformed { node: from, reason: e.to_string() })?;
                    check_control_sender(t.node(), from, &msg)?;
                    Ok(Some(Arrival::Control { from, msg }))
                }
                Some((&channel, body)) if channel == CHANNEL_PAGES || channel == CHANNEL_VCPU => {
                    match (engine, vcpus) {
                        (Some(e), Some(v)) => dispatch(e, v, from, channel, body).map(|()| None),
                        _ => Err(Error::Malformed {
                            node: from,
                            reason: format!(
                                "a {} message before the pod started",
                                if channel == CHANNEL_PAGES { "page" } else { "vCPU" }
                            ),
                        }),
                    }
                }
                _ => Err(Error::Malformed { node: from, reason: "an unknown channel".into() }),
            }
        }
    }
}

/// A page message to `engine`, a vCPU message to `vcpus`.
fn dispatch(engine: &Engine, vcpus: &Arc<Vcpus>, from: NodeId, channel: u8, body: &[u8]) -> Result<(), Error> {
    if channel == CHANNEL_PAGES {
        return engine.on_message(from, body).map_err(Error::Failed);
    }
    match vcpus.on_message(from, body).map_err(Error::Failed)? {
        // a vCPU is coming: ask for its stack page while its state is
        // captured, sent and restored
        Some(page) => engine.prefetch(page, Access::Write).map_err(Error::Failed),
        None => Ok(()),
    }
}

/// Takes page and vCPU messages on the fabric's receiving thread (over
/// shm: `Transport::set_tap`), as the receiver thread would: a failure
/// fails the engine, so the VM ends. Control messages keep the inbox.
/// Set before this node says it is ready (no page or vCPU message can
/// wait in the inbox then); closed before the node stops its VM, which
/// waits for a message being handled: later ones go to the inbox, where
/// the receiver takes them as it did before (errors no longer count).
pub struct PodTap {
    engine: Arc<Engine>,
    vcpus: Arc<Vcpus>,
    open: std::sync::RwLock<bool>,
}

impl std::fmt::Debug for PodTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTap").finish_non_exhaustive()
    }
}

impl PodTap {
    /// Sets a tap on `t` where the backend runs one (shm).
    pub fn set(t: &dyn Transport, engine: &Arc<Engine>, vcpus: &Arc<Vcpus>) -> Option<Arc<PodTap>> {
        let tap = Arc::new(PodTap { engine: engine.clone(), vcpus: vcpus.clone(), open: std::sync::RwLock::new(true) });
        t.set_tap(tap.clone()).then_some(tap)
    }

    /// Takes no more messages; returns once none is being handled.
    pub fn close(&self) {
        *self.open.write().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

impl shoal_fabric::Tap for PodTap {
    fn take(&self, from: NodeId, payload: &[u8]) -> Take {
        let Some((&channel, body)) = payload.split_first() else { return Take::Pass };
        if channel != CHANNEL_PAGES && channel != CHANNEL_VCPU {
            return Take::Pass;
        }
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        if !*open {
            return Take::Pass;
        }
        // a bug must end the VM, not the fabric's receiving thread
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dispatch(&self.engine, &self.vcpus, from, channel, body)
        }));
        match handled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.engine.fail(e.to_string()),
            Err(_) => self.engine.fail("internal error on the fabric's receiving thread (see the panic above)".into()),
        }
        // a message that waits for a hold goes when the receiver looks
        // again (`run_deferred`, every `HOLD_POLL` while any waits): wake
        // it, or it would sleep its whole turn first
        if self.engine.deferred_poll().is_some() {
            Take::TakenWake
        } else {
            Take::Taken
        }
    }
}

/// A pod's userfaultfd over a node's guest view: missing, minor and
/// write-protect faults.
pub fn pod_uffd(mem: &crate::memory::GuestMemory) -> Result<Arc<crate::uffd::Uffd>, crate::uffd::Error> {
    use crate::uffd;
    let uffd = uffd::Uffd::new(
        uffd::FEATURE_MISSING_SHMEM | uffd::FEATURE_MINOR_SHMEM | uffd::FEATURE_WP_SHMEM | uffd::FEATURE_THREAD_ID,
    )?;
    uffd.register_pod(mem.guest_view_base(), mem.layout().size())?;
    Ok(Arc::new(uffd))
}

/// The facts of a node configured with `config`: the image is read and
/// hashed (so nodes with different files of one name are told apart).
pub fn facts_for(config: &crate::config::VmConfig, nodes: u32) -> Result<Facts, String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let (name, linux, decompressor) = match &config.image {
        crate::config::ImageSource::Embedded(g) => {
            h.update(g.elf);
            (g.name.to_string(), false, false)
        }
        crate::config::ImageSource::File(p) => {
            let bytes = crate::config::read_input_file(p, crate::config::MAX_INPUT_FILE)
                .map_err(|e| format!("guest image {}: {e}", p.display()))?;
            h.update(&bytes);
            let format = crate::linux::Format::of(&bytes).map_err(|e| e.to_string())?;
            // (as asked: auto is taken for the PVH entry, see Eviction::default_for)
            let decompressor =
                format == Some(crate::linux::Format::BzImage) && config.bzimage_entry == crate::linux::BzEntry::Boot64;
            (p.display().to_string(), format.is_some(), decompressor)
        }
    };
    let placement = crate::vm::vcpu_placement(config, nodes, linux).map_err(|e| e.to_string())?;
    // a Linux guest's initramfs is part of its image
    let name = match &config.initrd {
        Some(p) => {
            h.update(
                crate::config::read_input_file(p, crate::config::MAX_INPUT_FILE)
                    .map_err(|e| format!("initrd {}: {e}", p.display()))?,
            );
            format!("{name} with initrd {}", p.display())
        }
        None => name,
    };
    let sha = h.finalize();
    Ok(Facts {
        shoal_version: env!("CARGO_PKG_VERSION").to_string(),
        nodes,
        memory: config.memory,
        image_name: name,
        image_sha256: sha.iter().map(|b| format!("{b:02x}")).collect(),
        dormant: config.dormant,
        node_memory: config.node_memory,
        cpus: config.cpus,
        placement,
        migration: config.migration && !linux,
        eviction: config.eviction.unwrap_or(residency::Eviction::default_for(decompressor)),
        verify_pages: config.verify_pages,
    })
}

/// Whether a pod of these facts can run over `kind`: `--dormant off`
/// cannot over verbs (a first touch there reads its home's untouched
/// memory, which no page protocol message exposes: the home would have
/// to register, so pin, whole chunks of holes, which then also hold
/// pages the home's own first touches would find present).
pub fn check_fabric(facts: &Facts, kind: shoal_fabric::Kind) -> Result<(), String> {
    if kind == shoal_fabric::Kind::Verbs && !facts.dormant {
        return Err("--dormant off does not run over verbs (a first touch would read its home's untouched memory, \
                    which verbs could reach only by pinning it): use --dormant on, or --fabric shm or tcp"
            .into());
    }
    Ok(())
}

/// The engine settings every node derives from the same facts (and,
/// with `--verify-pages`, the pod's page digests, [`Link::digests`]).
pub fn settings_for(
    facts: &Facts,
    pages: u64,
    digests: Option<digest::PageDigests>,
) -> Result<engine::Settings, String> {
    let s = engine_settings(facts.nodes, pages, facts.dormant, facts.node_memory, facts.eviction)?;
    Ok(engine::Settings { digests, ..s })
}

/// The engine settings of a node alone (a pod of one, with no fabric).
pub fn settings_alone(config: &crate::config::VmConfig, pages: u64) -> Result<engine::Settings, String> {
    // (a node alone evicts nothing, so it has no use for the clock's probes)
    engine_settings(1, pages, config.dormant, config.node_memory, residency::Eviction::Fifo)
}

fn engine_settings(
    nodes: u32,
    pages: u64,
    dormant: bool,
    node_memory: Option<u64>,
    eviction: residency::Eviction,
) -> Result<engine::Settings, String> {
    let config =
        shoal_protocol::Config::new(nodes, BLOCK_PAGES, pages).ok_or_else(|| format!("a pod of {nodes} nodes"))?;
    let budget = node_memory.map(|b| b / crate::memory::PAGE_SIZE);
    let read_copies = crate::uffd::continue_wp_supported();
    Ok(engine::Settings { config, dormant, budget, peer_budget: budget, read_copies, eviction, digests: None })
}

/// Node 0's end of a joined pod.
pub struct Link {
    pub transport: Arc<dyn Transport>,
    pub facts: Facts,
    pub join_timeout: Duration,
    /// How long a peer may stay silent before it counts as hung.
    pub liveness: Duration,
    /// This node's guest memory (exposed to the fabric at join).
    pub mem: Arc<crate::memory::GuestMemory>,
    /// With `--verify-pages`: the pod's page digests (from its secret).
    pub digests: Option<digest::PageDigests>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("transport", &self.transport).field("facts", &self.facts).finish()
    }
}

impl Link {
    /// Collects every other node's facts and refuses the pod when one
    /// differs (telling that node why).
    pub fn check_members(&self) -> Result<(), Error> {
        let t = &*self.transport;
        let deadline = Instant::now() + self.join_timeout;
        let mut missing: Vec<NodeId> = t.peers();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!("the facts of nodes {missing:?}"),
                    after: self.join_timeout,
                });
            }
            match next(t, None, None, None, left.min(Duration::from_millis(200)))? {
                None | Some(Arrival::Control { msg: Control::Beat, .. }) => {}
                Some(Arrival::Gone { node, reason }) => return Err(Error::PeerGone { node, reason }),
                Some(Arrival::Control { from, msg: Control::Hello { facts } }) => {
                    if let Some(reason) = self.facts.mismatch(&facts) {
                        let _ = send_control(t, from, &Control::Mismatch { reason: reason.clone() });
                        for other in t.peers().into_iter().filter(|&p| p != from) {
                            let reason = format!("node {from} does not match this pod: {reason}");
                            let _ = send_control(t, other, &Control::Abort { reason });
                        }
                        return Err(Error::Mismatch { node: from, reason });
                    }
                    missing.retain(|&n| n != from);
                }
                Some(Arrival::Control { from, msg }) => {
                    return Err(Error::Malformed { node: from, reason: format!("{msg:?} before its facts") })
                }
            }
        }
        Ok(())
    }

    /// Tells every node which pages the loader wrote and how the vCPUs
    /// start, and waits until all are ready. Nodes that are ready start
    /// their vCPUs at once: their page and vCPU messages go to `engine`
    /// and `vcpus` meanwhile.
    pub fn start(&self, plan: &StartPlan, engine: &Engine, vcpus: &Arc<Vcpus>) -> Result<(), Error> {
        let t = &*self.transport;
        for p in t.peers() {
            send_control(t, p, &Control::Start { plan: plan.clone() })?;
        }
        let deadline = Instant::now() + self.join_timeout;
        let mut missing = t.peers();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { what: format!("nodes {missing:?} to start"), after: self.join_timeout });
            }
            match next(t, Some(engine), Some(vcpus), None, left.min(Duration::from_millis(200)))? {
                None | Some(Arrival::Control { msg: Control::Beat, .. }) => {}
                Some(Arrival::Gone { node, reason }) => return Err(Error::PeerGone { node, reason }),
                Some(Arrival::Control { from, msg: Control::Started }) => missing.retain(|&n| n != from),
                Some(Arrival::Control { from, msg }) => {
                    return Err(Error::Malformed { node: from, reason: format!("{msg:?} instead of Started") })
                }
            }
        }
        for p in t.peers() {
            send_control(t, p, &Control::Run)?;
        }
        Ok(())
    }

    /// Starts node 0's receiver thread: page messages to `engine`, vCPU
    /// messages to `vcpus`; a node leaving or going silent, or a protocol
    /// failure, fails the engine (so the VM ends).
    pub fn serve(&self, engine: Arc<Engine>, vcpus: Arc<Vcpus>, tap: Option<Arc<PodTap>>) -> std::io::Result<Serving> {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let finishing = Arc::new(AtomicBool::new(false));
        let t = self.transport.clone();
        let limit = self.liveness;
        let thread = {
            let stop = stop.clone();
            let finishing = finishing.clone();
            std::thread::Builder::new().name("shoal-pod-rx".into()).spawn(move || {
                let _beats = Heartbeat::start(t.clone())
                    .map_err(|e| engine.fail(format!("starting the pod's heartbeat thread: {e}")))
                    .ok();
                receive_loop(&*t, &engine, &vcpus, &tx, &stop, &finishing, limit)
            })?
        };
        Ok(Serving { rx, stop, finishing, tap, thread: Mutex::new(Some(thread)) })
    }

    /// The guest is ending: from now on errors (of messages still in
    /// flight while the VM's memory is released) and departures are no
    /// longer failures of the pod (messages go through the receiver).
    pub fn quiesce(&self, rx: &Serving) {
        if let Some(tap) = &rx.tap {
            tap.close();
        }
        rx.finishing.store(true, Ordering::SeqCst);
    }

    /// The guest ended: ask every node for its metrics (bounded), or, when
    /// the pod failed, tell them why. Then leave the fabric.
    pub fn finish(&self, rx: &Serving, failure: Option<&str>) -> Vec<NodeMetrics> {
        let t = &*self.transport;
        self.quiesce(rx);
        let mut out = Vec::new();
        let peers = t.peers();
        for &p in &peers {
            let msg = match failure {
                Some(reason) => Control::Abort { reason: reason.to_string() },
                None => Control::Finish,
            };
            let _ = send_control(t, p, &msg);
        }
        if failure.is_none() {
            let deadline = Instant::now() + FINISH_TIMEOUT;
            while out.len() < peers.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.rx.recv_timeout(left) {
                    Ok(Arrival::Control { from, msg: Control::Metrics { mut metrics } }) => {
                        metrics.node = Some(u64::from(from));
                        out.push(*metrics);
                    }
                    Ok(other) => tracing::debug!(?other, "while finishing"),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                        tracing::warn!("not every node sent its metrics within {FINISH_TIMEOUT:?}");
                        break;
                    }
                }
            }
        }
        rx.stop.store(true, Ordering::SeqCst);
        if let Some(th) = rx.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = th.join();
        }
        t.shutdown();
        out.sort_by_key(|m| m.node);
        out
    }
}

/// Node 0's receiver thread and what it hands on.
pub struct Serving {
    rx: Receiver<Arrival>,
    stop: Arc<AtomicBool>,
    finishing: Arc<AtomicBool>,
    tap: Option<Arc<PodTap>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

fn receive_loop(
    t: &dyn Transport,
    engine: &Engine,
    vcpus: &Arc<Vcpus>,
    tx: &Sender<Arrival>,
    stop: &AtomicBool,
    finishing: &AtomicBool,
    limit: Duration,
) {
    let mut last_beat = Instant::now();
    let mut live = Liveness::new(t.node(), t.peers().len() as u32 + 1, limit);
    live.watch();
    while !stop.load(Ordering::SeqCst) {
        // a bug must end the VM, not silently end this thread (and with it
        // the watchdog and the heartbeat)
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            receive_turn(t, engine, vcpus, tx, finishing, &mut last_beat, &mut live)
        }));
        if turn.is_err() {
            engine.fail("internal error in the pod's receiver thread (see the panic above)".into());
            return;
        }
    }
}

fn receive_turn(
    t: &dyn Transport,
    engine: &Engine,
    vcpus: &Arc<Vcpus>,
    tx: &Sender<Arrival>,
    finishing: &AtomicBool,
    last_beat: &mut Instant,
    live: &mut Liveness,
) {
    let running = !finishing.load(Ordering::SeqCst);
    // silence is looked for every turn (at least every 50 ms): a hung
    // node is named soon after the limit, not up to a beat later
    if running {
        if let Some((node, quiet)) = live.silent(t) {
            engine.fail(silent_peer(node, quiet));
        }
    }
    if running && last_beat.elapsed() >= BEAT_EVERY {
        *last_beat = Instant::now();
        // the backstop: a fault that waits too long ends the VM too
        if let Some(why) = engine.stuck_fault(FAULT_TIMEOUT) {
            engine.fail(why);
        }
    }
    match next(t, Some(engine), Some(vcpus), Some(live), Duration::from_millis(50)) {
        Ok(None) | Ok(Some(Arrival::Control { msg: Control::Beat, .. })) => {}
        Ok(Some(Arrival::Gone { node, reason })) => {
            if !finishing.load(Ordering::SeqCst) {
                engine.fail(format!("node {node} left the pod: {reason}"));
            }
            let _ = tx.send(Arrival::Gone { node, reason });
        }
        Ok(Some(Arrival::Control { msg: Control::Abort { reason }, .. })) => {
            // a node gave up (its reason is better than its departure)
            if !finishing.load(Ordering::SeqCst) {
                engine.fail(reason);
            }
        }
        // while the guest runs a member only beats or gives up; its
        // metrics come after Finish
        Ok(Some(Arrival::Control { from, msg })) if !finishing.load(Ordering::SeqCst) => {
            let why = format!("{} while the guest runs", control_name(&msg));
            engine.fail(Error::Malformed { node: from, reason: why }.to_string());
        }
        Ok(Some(a)) => {
            let _ = tx.send(a);
        }
        Err(e) => {
            if !finishing.load(Ordering::SeqCst) {
                engine.fail(e.to_string());
            }
        }
    }
}

/// Waits (at most 2 s) for node 0 to stop the pod or leave.
fn linger_for_node0(t: &dyn Transport) {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match t.recv(Duration::from_millis(100)) {
            Ok(Some(Incoming::PeerGone { node: 0, .. })) | Err(_) => return,
            Ok(Some(Incoming::Message { from: 0, payload })) if payload.first() == Some(&CHANNEL_CONTROL) => {
                if let Ok(Control::Abort { .. }) = serde_json::from_slice(&payload[1..]) {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// How a member node (not node 0) ended.
#[derive(Debug)]
pub enum MemberEnd {
    /// The guest ended and node 0 has our metrics.
    Finished,
    /// The pod failed.
    Failed(String),
}

/// What a member node runs with.
#[derive(Debug)]
pub struct Member {
    pub transport: Arc<dyn Transport>,
    pub facts: Facts,
    pub settings: engine::Settings,
    pub mem: Arc<crate::memory::GuestMemory>,
    pub join_timeout: Duration,
    /// How long a peer may stay silent before it counts as hung.
    pub liveness: Duration,
    /// Fault-handler threads.
    pub fault_threads: usize,
}

/// A member's running VM: what its main loop drives and stops.
struct MemberVm {
    engine: Arc<Engine>,
    vcpus: Arc<Vcpus>,
    tap: Option<Arc<PodTap>>,
    handlers: Option<engine::handlers::FaultHandlers>,
    events: Receiver<crate::control::VmEvent>,
    mem: Arc<crate::memory::GuestMemory>,
    started: Instant,
}

impl MemberVm {
    /// Builds this node's VM, its page engine and its vCPUs (not started).
    fn build(m: &Member, plan: &StartPlan) -> Result<MemberVm, String> {
        // the guest's clock runs from node 0's start (read first: what
        // follows takes time)
        let clock_start = plan.clock_start();
        use crate::devices::{Console, Devices, GuestInfo, GuestReader, IrqLine};
        let me = m.transport.node();
        crate::vm::install_kick_handler().map_err(|e| e.to_string())?;
        let built = crate::builder::build(&m.mem, false).map_err(|e| e.to_string())?;
        let (control, events) = crate::control::Control::new();
        let control = Arc::new(control);
        let uffd = pod_uffd(&m.mem).map_err(|e| e.to_string())?;
        let on_fatal: engine::OnFatal = {
            let control = control.clone();
            Arc::new(move |why| control.fail(why))
        };
        let engine = Engine::new(
            me,
            m.settings.clone(),
            Some(m.transport.clone()),
            m.mem.clone(),
            Some(uffd),
            &plan.loaded,
            on_fatal.clone(),
        )?;
        let engine = Arc::new(engine);
        // the guest's clock runs from node 0's start
        let info = GuestInfo {
            num_vcpus: m.facts.cpus.into(),
            node_id: me.into(),
            num_nodes: m.facts.nodes.into(),
            mem_bytes: m.facts.memory,
            clock_start,
        };
        let console = Arc::new(Mutex::new(Console::new(Box::new(crate::vcpus::ForwardConsole(m.transport.clone())))));
        let devices = Arc::new(Devices::new(console, GuestReader::GuestView(m.mem.clone()), info, IrqLine(None)));
        let setup = crate::vcpus::Setup {
            me,
            nodes: m.facts.nodes,
            count: m.facts.cpus,
            placement: m.facts.placement.clone(),
            migration: m.facts.migration,
            irqchip: false,
            linux: false,
            pin: None,
        };
        let vcpus = Vcpus::new(setup, built.kvm, Arc::new(built.vm), devices, control, Some(m.transport.clone()));
        engine.set_vcpus(vcpus.clone());
        let handlers = engine::handlers::FaultHandlers::spawn(engine.clone(), m.fault_threads, None, on_fatal)
            .map_err(|e| format!("starting the fault handlers: {e}"))?;
        // (before Started: no page or vCPU message can come before it)
        let tap = PodTap::set(&*m.transport, &engine, &vcpus);
        Ok(MemberVm {
            engine,
            vcpus,
            tap,
            handlers: Some(handlers),
            events,
            mem: m.mem.clone(),
            started: Instant::now(),
        })
    }

    /// Stops the vCPUs and fault handlers; returns the node's metrics.
    fn stop(&mut self, failed: bool) -> NodeMetrics {
        if let Some(tap) = &self.tap {
            tap.close();
        }
        let uffd = self.engine.uffd();
        let release = || {
            if let Some(u) = uffd {
                let _ = u.unregister(self.mem.guest_view_base(), self.mem.layout().size());
            }
        };
        let after = if failed { Duration::ZERO } else { Duration::from_millis(100) };
        self.vcpus.stop(after, &release);
        if let Some(h) = self.handlers.take() {
            h.stop();
        }
        let mut m = self.engine.metrics();
        self.vcpus.add_metrics(&mut m);
        m.wall_seconds = self.started.elapsed().as_secs_f64();
        m.peak_rss_bytes = crate::metrics::peak_rss_bytes();
        m
    }
}

/// Runs a member node: says its facts, waits for the start, builds its
/// VM, runs the vCPUs placed on it (and those that move to it) and serves
/// pages until node 0 finishes (or the pod fails).
pub fn run_member(m: Member) -> Result<MemberEnd, Error> {
    let t = m.transport.clone();
    let me = t.node();
    send_control(&*t, 0, &Control::Hello { facts: m.facts.clone() })?;
    // wait for the start (node 0 checks every node's facts, then loads)
    let deadline = Instant::now() + m.join_timeout * 2;
    let plan = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout { what: "node 0 to start the pod".into(), after: m.join_timeout * 2 });
        }
        match next(&*t, None, None, None, left.min(Duration::from_millis(200)))? {
            None | Some(Arrival::Control { msg: Control::Beat, .. }) => {}
            Some(Arrival::Gone { node, reason }) => return Err(Error::PeerGone { node, reason }),
            Some(Arrival::Control { msg: Control::Mismatch { reason }, .. }) => return Err(Error::Refused(reason)),
            Some(Arrival::Control { msg: Control::Abort { reason }, .. }) => return Err(Error::Failed(reason)),
            Some(Arrival::Control { msg: Control::Start { plan }, .. }) => break plan,
            Some(Arrival::Control { from, msg }) => {
                return Err(Error::Malformed { node: from, reason: format!("{msg:?} before the start") })
            }
        }
    };
    let mut vm = match MemberVm::build(&m, &plan) {
        Ok(vm) => vm,
        Err(why) => {
            let _ = send_control(&*t, 0, &Control::Abort { reason: format!("node {me}: {why}") });
            t.shutdown();
            return Err(Error::Failed(why));
        }
    };
    send_control(&*t, 0, &Control::Started)?;
    let mut live = Liveness::new(me, m.facts.nodes, m.liveness);
    // until Run, node 0 waits for the other nodes: the join timeout bounds it
    let run_deadline = Instant::now() + m.join_timeout;
    let mut running = false;
    // beats go out from Run on, until this node ends
    let mut _beats = None;
    let end = loop {
        // every turn (at least every 50 ms), as on node 0
        if running {
            if let Some((node, quiet)) = live.silent(&*t) {
                break Err(silent_peer(node, quiet));
            }
        }
        if !running && Instant::now() > run_deadline {
            break Err(format!("node 0 did not start the guest within {:?}", m.join_timeout));
        }
        // what the vCPUs here did: node 0 decides what it means
        let mut failure = None;
        while let Ok(event) = vm.events.try_recv() {
            match event {
                crate::control::VmEvent::Failed(why) => failure = failure.or(Some(why)),
                event => vm.vcpus.send_to_node0(crate::vcpus::VcpuMsg::Event { event }),
            }
        }
        if let Some(why) = failure {
            break Err(why);
        }
        match next(&*t, Some(&vm.engine), Some(&vm.vcpus), Some(&mut live), Duration::from_millis(50)) {
            Ok(None) | Ok(Some(Arrival::Control { msg: Control::Beat, .. })) => {}
            Ok(Some(Arrival::Control { msg: Control::Run, .. })) => {
                running = true;
                live.watch();
                match Heartbeat::start(t.clone()) {
                    Ok(h) => _beats = Some(h),
                    Err(e) => break Err(format!("starting the pod's heartbeat thread: {e}")),
                }
                if let Err(why) = vm.vcpus.start(&plan.boot) {
                    break Err(why);
                }
            }
            Ok(Some(Arrival::Control { msg: Control::Finish, .. })) => break Ok(()),
            Ok(Some(Arrival::Control { msg: Control::Abort { reason }, .. })) => {
                vm.stop(true);
                t.shutdown();
                return Ok(MemberEnd::Failed(format!("node 0 stopped the pod: {reason}")));
            }
            Ok(Some(Arrival::Control { from, msg })) => {
                let why = format!("{} while the guest runs", control_name(&msg));
                break Err(Error::Malformed { node: from, reason: why }.to_string());
            }
            Ok(Some(Arrival::Gone { node, reason })) => {
                let why = format!("node {node} left the pod: {reason}");
                vm.stop(true);
                if node != 0 {
                    // tell node 0 why we go too, and stay until it stops the
                    // pod: leaving at once could make our goodbye, not the
                    // node that died, the reason node 0 reports
                    let _ = send_control(&*t, 0, &Control::Abort { reason: why.clone() });
                    linger_for_node0(&*t);
                }
                t.shutdown();
                return Ok(MemberEnd::Failed(why));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    match end {
        Ok(()) => {
            let metrics = vm.stop(false);
            let _ = send_control(&*t, 0, &Control::Metrics { metrics: Box::new(metrics) });
            // node 0 leaves the fabric once it has every node's metrics
            let until = Instant::now() + FINISH_TIMEOUT;
            while Instant::now() < until {
                if let Ok(Some(Arrival::Gone { node: 0, .. })) = next(&*t, None, None, None, Duration::from_millis(100))
                {
                    break;
                }
            }
            t.shutdown();
            Ok(MemberEnd::Finished)
        }
        Err(why) => {
            vm.stop(true);
            let _ = send_control(&*t, 0, &Control::Abort { reason: format!("node {me}: {why}") });
            t.shutdown();
            Ok(MemberEnd::Failed(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_fabric::{Kind, ReadReq, RegionInfo, Sink, Stats};
    use std::sync::atomic::AtomicU64;

    /// Node 0 of three, whose fabric says what it heard when and counts
    /// the beats it sends.
    #[derive(Debug, Default)]
    struct Heard {
        quiet: Vec<Option<Duration>>,
        beats: AtomicU64,
    }

    impl Transport for Heard {
        fn kind(&self) -> Kind {
            Kind::Tcp
        }
        fn node(&self) -> NodeId {
            0
        }
        fn peers(&self) -> Vec<NodeId> {
            vec![1, 2]
        }
        fn regions(&self, _: NodeId) -> shoal_fabric::Result<Vec<RegionInfo>> {
            Ok(Vec::new())
        }
        fn read_with(&self, peer: NodeId, _: &[ReadReq], _: &mut Sink<'_>) -> shoal_fabric::Result<()> {
            Err(shoal_fabric::Error::PeerGone { peer, reason: "no reads here".into() })
        }
        fn send(&self, _: NodeId, _: &[u8]) -> shoal_fabric::Result<()> {
            self.beats.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn recv(&self, _: Duration) -> shoal_fabric::Result<Option<Incoming>> {
            Ok(None)
        }
        fn stats(&self) -> Stats {
            Stats::default()
        }
        fn quiet_for(&self, peer: NodeId) -> Option<Duration> {
            self.quiet.get(peer as usize).copied().flatten()
        }
        fn shutdown(&self) {}
    }

    /// What arrived while the receiving thread was busy counts as heard:
    /// the silent peer is the one the fabric heard nothing from either.
    #[test]
    fn liveness_counts_what_the_fabric_heard_while_this_thread_was_busy() {
        let mut live = Liveness::new(0, 3, Duration::from_millis(50));
        live.watch();
        std::thread::sleep(Duration::from_millis(80));
        // the thread took nothing for 80 ms; the fabric heard node 1 just
        // now and node 2 not for a second
        let t = Heard { quiet: vec![None, Some(Duration::ZERO), Some(Duration::from_secs(1))], ..Heard::default() };
        let (node, quiet) = live.silent(&t).expect("node 2 is silent");
        assert_eq!(node, 2);
        assert!(quiet >= Duration::from_millis(80) && quiet < Duration::from_secs(1), "{quiet:?}");
        // both heard recently by the fabric: nobody is silent
        let t = Heard { quiet: vec![None, Some(Duration::ZERO), Some(Duration::ZERO)], ..Heard::default() };
        assert_eq!(live.silent(&t), None);
        // a fabric that does not know: what the thread took decides
        let t = Heard::default();
        assert!(live.silent(&t).is_some());
    }

    /// Beats go out on their own thread, whatever the caller's thread does
    /// (here: sleeps), to every peer, and stop when the heartbeat is dropped.
    #[test]
    fn the_heartbeat_beats_on_its_own_thread_until_dropped() {
        let t = Arc::new(Heard::default());
        let beats = Heartbeat::start(t.clone()).unwrap();
        // this thread only waits: three rounds to both peers arrive anyway
        let deadline = Instant::now() + Duration::from_secs(30);
        while t.beats.load(Ordering::SeqCst) < 6 {
            assert!(Instant::now() < deadline, "no beats while the caller waits");
            std::thread::sleep(Duration::from_millis(10));
        }
        // the drop joins the thread: what was sent is all there will be
        drop(beats);
        let sent = t.beats.load(Ordering::SeqCst);
        assert_eq!(sent % 2, 0, "every round goes to both peers: {sent}");
        std::thread::sleep(BEAT_EVERY * 2);
        assert_eq!(t.beats.load(Ordering::SeqCst), sent, "no beat after the drop");
    }

    #[test]
    fn control_messages_come_only_from_whom_they_may() {
        // a member: everything but beats from node 0 only
        assert!(check_control_sender(1, 0, &Control::Finish).is_ok());
        assert!(check_control_sender(1, 2, &Control::Beat).is_ok());
        for msg in [Control::Run, Control::Finish, Control::Abort { reason: "x".into() }, Control::Started] {
            let e = check_control_sender(1, 2, &msg).unwrap_err().to_string();
            assert!(e.starts_with("node 2 sent a malformed control message") && e.contains("only node 0"), "{e}");
        }
        // node 0: what members send, never what node 0 itself sends
        for msg in [Control::Started, Control::Abort { reason: "x".into() }, Control::Beat] {
            assert!(check_control_sender(0, 1, &msg).is_ok());
        }
        for msg in [Control::Run, Control::Finish, Control::Mismatch { reason: "x".into() }] {
            let e = check_control_sender(0, 1, &msg).unwrap_err().to_string();
            assert!(e.contains("node 1") && e.contains("which only node 0 sends"), "{e}");
        }
    }

    /// README: the clock unless asked otherwise, fifo for a bzImage booted
    /// through its own decompressor; the pod's facts carry it.
    #[test]
    fn a_bzimage_gets_fifo_only_under_its_own_decompressor() {
        use crate::linux::tests::{bzimage_around, scratch_file, tiny_elf, xz};
        use crate::linux::BzEntry;
        use residency::Eviction;
        let bz = bzimage_around(&xz(&tiny_elf(Some(0x10_0040), true)), 0x20f);
        let (dir, k) = scratch_file("facts-eviction", "vmlinuz", &bz);
        let eviction = |entry, asked| {
            let mut config = crate::config::VmConfig::new(crate::config::ImageSource::File(k.clone()), 256 << 20);
            config.bzimage_entry = entry;
            config.eviction = asked;
            facts_for(&config, 2).unwrap().eviction
        };
        assert_eq!(eviction(BzEntry::Auto, None), Eviction::Clock);
        assert_eq!(eviction(BzEntry::Pvh, None), Eviction::Clock);
        assert_eq!(eviction(BzEntry::Boot64, None), Eviction::Fifo);
        assert_eq!(eviction(BzEntry::Boot64, Some(Eviction::Clock)), Eviction::Clock);
        let unikernel = crate::config::VmConfig::new(
            crate::config::ImageSource::Embedded(crate::config::find_guest("hello").unwrap()),
            64 << 20,
        );
        assert_eq!(facts_for(&unikernel, 2).unwrap().eviction, Eviction::Clock);
        let _ = std::fs::remove_dir_all(dir);
    }
}
