//! Pods: one guest whose memory spans several node processes.
//!
//! Node 0 runs the vCPUs and the console; every node contributes memory.
//! A pod starts in four steps, each bounded by the join timeout:
//! 1. every node binds its fabric endpoint and joins the others (the
//!    fabric's handshake checks protocol version, pod id and pod secret);
//! 2. every other node sends node 0 its [`Facts`] (memory size, guest
//!    image digest, dormant setting, memory bound, shoal version); node 0
//!    refuses a node whose facts differ from its own, naming the
//!    difference, and the pod does not start;
//! 3. node 0 loads the image and tells every node which pages the loader
//!    wrote ([`Control::Start`]); they answer [`Control::Started`];
//! 4. the guest runs; at its end node 0 sends [`Control::Finish`] and
//!    collects every node's metrics.
//!
//! A node that leaves early (dies, disconnects) is noticed through the
//! fabric (a closed connection, or a read or message timing out after the
//! fabric's io timeout): node 0 stops the guest and names the node; the
//! others exit with an error naming it too.

pub mod engine;
pub mod launch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_fabric::{Incoming, Transport};
use shoal_protocol::NodeId;

use crate::metrics::NodeMetrics;
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
/// How often node 0 tells the others it is alive, and how long they wait
/// without hearing from it before they give up.
const BEAT_EVERY: Duration = Duration::from_secs(1);
const BEAT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// node 0 → node: the pages the loader wrote, as (offset, len)
    /// extents of guest memory; they start owned by node 0.
    Start { loaded: Vec<(u64, u64)> },
    /// node → node 0: ready.
    Started,
    /// node 0 → node: the guest ended; send your metrics.
    Finish,
    /// node → node 0.
    Metrics { metrics: Box<NodeMetrics> },
    /// node 0 → node: the pod failed.
    Abort { reason: String },
    /// node 0 → node: still here (every second while the guest runs).
    Beat,
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

/// Reads the next message; control messages are returned, page messages
/// handed to `engine` (None before the engine exists: then a page message
/// is a peer's mistake).
fn next(t: &dyn Transport, engine: Option<&Engine>, timeout: Duration) -> Result<Option<Arrival>, Error> {
    match t.recv(timeout)? {
        None => Ok(None),
        Some(Incoming::PeerGone { node, reason }) => Ok(Some(Arrival::Gone { node, reason })),
        Some(Incoming::Message { from, payload }) => match payload.split_first() {
            Some((&CHANNEL_CONTROL, body)) => serde_json::from_slice(body)
                .map(|msg| Some(Arrival::Control { from, msg }))
                .map_err(|e| Error::Malformed { node: from, reason: e.to_string() }),
            Some((&CHANNEL_PAGES, body)) => match engine {
                Some(e) => e.on_message(from, body).map(|()| None).map_err(Error::Failed),
                None => Err(Error::Malformed { node: from, reason: "a page message before the pod started".into() }),
            },
            _ => Err(Error::Malformed { node: from, reason: "an unknown channel".into() }),
        },
    }
}

/// The facts of a node configured with `config`: the image is read and
/// hashed (so nodes with different files of one name are told apart).
pub fn facts_for(config: &crate::config::VmConfig, nodes: u32) -> Result<Facts, String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let name = match &config.image {
        crate::config::ImageSource::Embedded(g) => {
            h.update(g.elf);
            g.name.to_string()
        }
        crate::config::ImageSource::File(p) => {
            h.update(std::fs::read(p).map_err(|e| format!("guest image {}: {e}", p.display()))?);
            p.display().to_string()
        }
    };
    // a Linux guest's initramfs is part of its image
    let name = match &config.initrd {
        Some(p) => {
            h.update(std::fs::read(p).map_err(|e| format!("initrd {}: {e}", p.display()))?);
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
    })
}

/// The engine settings every node derives from the same facts.
pub fn settings_for(facts: &Facts, pages: u64, fabric: shoal_fabric::Kind) -> Result<engine::Settings, String> {
    let config = shoal_protocol::Config::new(facts.nodes, BLOCK_PAGES, pages)
        .ok_or_else(|| format!("a pod of {} nodes", facts.nodes))?;
    let budget = facts.node_memory.map(|b| b / crate::memory::PAGE_SIZE);
    let keep_pages = fabric == shoal_fabric::Kind::Verbs;
    Ok(engine::Settings { config, dormant: facts.dormant, budget, peer_budget: budget, keep_pages })
}

/// Node 0's end of a joined pod.
pub struct Link {
    pub transport: Arc<dyn Transport>,
    pub facts: Facts,
    pub join_timeout: Duration,
    /// This node's guest memory (exposed to the fabric at join).
    pub mem: Arc<crate::memory::GuestMemory>,
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
            match next(t, None, left.min(Duration::from_millis(200)))? {
                None => {}
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

    /// Tells every node which pages the loader wrote and waits until all
    /// are ready.
    pub fn start(&self, loaded: &[(u64, u64)]) -> Result<(), Error> {
        let t = &*self.transport;
        for p in t.peers() {
            send_control(t, p, &Control::Start { loaded: loaded.to_vec() })?;
        }
        let deadline = Instant::now() + self.join_timeout;
        let mut missing = t.peers();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { what: format!("nodes {missing:?} to start"), after: self.join_timeout });
            }
            match next(t, None, left.min(Duration::from_millis(200)))? {
                None => {}
                Some(Arrival::Gone { node, reason }) => return Err(Error::PeerGone { node, reason }),
                Some(Arrival::Control { from, msg: Control::Started }) => missing.retain(|&n| n != from),
                Some(Arrival::Control { from, msg }) => {
                    return Err(Error::Malformed { node: from, reason: format!("{msg:?} instead of Started") })
                }
            }
        }
        Ok(())
    }

    /// Starts node 0's receiver thread: page messages to `engine`; a node
    /// leaving or a protocol failure fails the engine (so the VM ends).
    pub fn serve(&self, engine: Arc<Engine>) -> std::io::Result<Serving> {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let finishing = Arc::new(AtomicBool::new(false));
        let t = self.transport.clone();
        let thread = {
            let stop = stop.clone();
            let finishing = finishing.clone();
            std::thread::Builder::new()
                .name("shoal-pod-rx".into())
                .spawn(move || receive_loop(&*t, &engine, &tx, &stop, &finishing))?
        };
        Ok(Serving { rx, stop, finishing, thread: Mutex::new(Some(thread)) })
    }

    /// The guest is ending: from now on errors (of messages still in
    /// flight while the VM's memory is released) and departures are no
    /// longer failures of the pod.
    pub fn quiesce(&self, rx: &Serving) {
        rx.finishing.store(true, Ordering::SeqCst);
    }

    /// The guest ended: ask every node for its metrics (bounded), or, when
    /// the pod failed, tell them why. Then leave the fabric.
    pub fn finish(&self, rx: &Serving, failure: Option<&str>) -> Vec<NodeMetrics> {
        let t = &*self.transport;
        rx.finishing.store(true, Ordering::SeqCst);
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
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

fn receive_loop(t: &dyn Transport, engine: &Engine, tx: &Sender<Arrival>, stop: &AtomicBool, finishing: &AtomicBool) {
    let mut last_beat = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        // a bug must end the VM, not silently end this thread (and with it
        // the watchdog and the heartbeat)
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            receive_turn(t, engine, tx, finishing, &mut last_beat)
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
    tx: &Sender<Arrival>,
    finishing: &AtomicBool,
    last_beat: &mut Instant,
) {
    // the watchdog and the beat run once a second, not once per message:
    // the watchdog takes the engine's lock
    if !finishing.load(Ordering::SeqCst) && last_beat.elapsed() >= BEAT_EVERY {
        *last_beat = Instant::now();
        if let Some(why) = engine.stuck_fault(FAULT_TIMEOUT) {
            engine.fail(why);
        }
        for p in t.peers() {
            let _ = send_control(t, p, &Control::Beat);
        }
    }
    match next(t, Some(engine), Duration::from_millis(50)) {
        Ok(None) => {}
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

/// Runs a member node: says its facts, waits for the start, serves pages
/// until node 0 finishes (or the pod fails).
pub fn run_member(
    t: Arc<dyn Transport>,
    facts: &Facts,
    settings: engine::Settings,
    mem: Arc<crate::memory::GuestMemory>,
    join_timeout: Duration,
) -> Result<MemberEnd, Error> {
    let me = t.node();
    send_control(&*t, 0, &Control::Hello { facts: facts.clone() })?;
    // wait for the start (node 0 checks every node's facts, then loads)
    let deadline = Instant::now() + join_timeout * 2;
    let loaded = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout { what: "node 0 to start the pod".into(), after: join_timeout * 2 });
        }
        match next(&*t, None, left.min(Duration::from_millis(200)))? {
            None => {}
            Some(Arrival::Gone { node, reason }) => return Err(Error::PeerGone { node, reason }),
            Some(Arrival::Control { msg: Control::Mismatch { reason }, .. }) => return Err(Error::Refused(reason)),
            Some(Arrival::Control { msg: Control::Abort { reason }, .. }) => return Err(Error::Failed(reason)),
            Some(Arrival::Control { msg: Control::Start { loaded }, .. }) => break loaded,
            Some(Arrival::Control { from, msg }) => {
                return Err(Error::Malformed { node: from, reason: format!("{msg:?} before the start") })
            }
        }
    };
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let on_fatal: engine::OnFatal = {
        let failure = failure.clone();
        Arc::new(move |why| {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        })
    };
    let engine = Engine::new(me, settings, t.clone(), mem, None, &loaded, on_fatal).map_err(Error::Failed)?;
    send_control(&*t, 0, &Control::Started)?;
    // node 0 starts beating once every node has started, which may take
    // up to the join timeout: until the first beat, that is the bound
    let mut heard = Instant::now();
    let mut silence_limit = join_timeout + BEAT_TIMEOUT;
    loop {
        if heard.elapsed() > silence_limit {
            let why = format!("node 0 has not been heard from for {silence_limit:?} (hung?)");
            t.shutdown();
            return Ok(MemberEnd::Failed(why));
        }
        if let Some(why) = failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            let _ = send_control(&*t, 0, &Control::Abort { reason: format!("node {me}: {why}") });
            t.shutdown();
            return Ok(MemberEnd::Failed(why));
        }
        let arrival = next(&*t, Some(&engine), Duration::from_millis(100));
        if matches!(arrival, Ok(Some(Arrival::Control { from: 0, .. }))) || engine.heard_from(0) {
            heard = Instant::now();
        }
        if matches!(arrival, Ok(Some(Arrival::Control { from: 0, msg: Control::Beat }))) {
            silence_limit = BEAT_TIMEOUT;
        }
        match arrival {
            Ok(None) | Ok(Some(Arrival::Control { msg: Control::Beat, .. })) => {}
            Ok(Some(Arrival::Control { msg: Control::Finish, .. })) => {
                let _ = send_control(&*t, 0, &Control::Metrics { metrics: Box::new(engine.metrics()) });
                // node 0 leaves the fabric once it has every node's metrics
                let until = Instant::now() + FINISH_TIMEOUT;
                while Instant::now() < until {
                    if let Ok(Some(Arrival::Gone { node: 0, .. })) = next(&*t, None, Duration::from_millis(100)) {
                        break;
                    }
                }
                t.shutdown();
                return Ok(MemberEnd::Finished);
            }
            Ok(Some(Arrival::Control { msg: Control::Abort { reason }, .. })) => {
                t.shutdown();
                return Ok(MemberEnd::Failed(format!("node 0 stopped the pod: {reason}")));
            }
            Ok(Some(Arrival::Control { from, msg })) => {
                tracing::warn!(from, ?msg, "unexpected control message while running");
            }
            Ok(Some(Arrival::Gone { node, reason })) => {
                let why = format!("node {node} left the pod: {reason}");
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
            Err(e) => engine.fail(e.to_string()),
        }
    }
}
