//! What the backends share: the per-peer stream (frames after the
//! handshake), its reader thread, the inbox of messages and departures,
//! requests waiting for their answers, and the counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::framing::{Opener, Sealer};
use crate::mesh::{Conn, Link};
use crate::wire::{Frame, ReadFailure, RegionInfo, StreamError};
use crate::{Error, Incoming, LocalRegion, NodeId, Result, Stats};

/// The answer to a request, delivered by the reader thread.
pub(crate) type Answer = Result<Frame>;

/// Where the answer to a pending request goes: its batch's channel and its
/// index in the batch.
type Waiter = (Sender<(usize, Answer)>, usize);

/// One peer: its regions, the write half of its stream, its liveness.
#[derive(Debug)]
pub(crate) struct Peer {
    pub id: NodeId,
    pub regions: Vec<RegionInfo>,
    /// The write half of the stream and the sealer of what we send (one
    /// lock: frames are numbered in the order they go out).
    writer: Mutex<(Conn, Sealer)>,
    alive: AtomicBool,
    gone: Mutex<Option<String>>,
    /// Requests (tcp reads, verbs key requests) waiting for their answer,
    /// by tag: the sender half and the op's index in its batch.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// When the last frame from the peer arrived (ns since [`epoch`]).
    heard: AtomicU64,
    /// When its loss was noticed (ns since [`epoch`]; 0 while it is here).
    gone_at: AtomicU64,
}

/// The zero of the peers' arrival times.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Peer {
    pub fn new(id: NodeId, regions: Vec<RegionInfo>, conn: &Conn, sealer: Sealer) -> std::io::Result<Self> {
        Ok(Peer {
            id,
            regions,
            writer: Mutex::new((conn.try_clone()?, sealer)),
            alive: AtomicBool::new(true),
            gone: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            heard: AtomicU64::new(epoch().elapsed().as_nanos() as u64),
            gone_at: AtomicU64::new(0),
        })
    }

    /// When its loss was noticed, if it is gone.
    fn gone_at(&self) -> Option<u64> {
        Some(self.gone_at.load(Ordering::Acquire)).filter(|&t| t > 0)
    }

    /// A frame came from the peer now.
    pub fn heard(&self) {
        self.heard.store(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// How long since the last frame from the peer (since its connection
    /// was made, before any).
    pub fn quiet(&self) -> Duration {
        let now = epoch().elapsed();
        now.saturating_sub(Duration::from_nanos(self.heard.load(Ordering::Relaxed)))
    }

    /// Fails unless the peer is still connected.
    pub fn check_alive(&self) -> Result<()> {
        if self.alive.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
        Err(Error::PeerGone { peer: self.id, reason })
    }

    /// Writes frames as one write.
    pub fn write(&self, frames: &[Frame]) -> Result<()> {
        self.check_alive()?;
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (w, sealer) = &mut *guard;
        let mut bytes = Vec::new();
        for f in frames {
            sealer.seal_into(f, &mut bytes);
        }
        std::io::Write::write_all(w, &bytes).map_err(|e| {
            // Part of a frame may be out: the stream is out of step for
            // good. Close it, so that neither side reads a frame boundary
            // where there is none; our reader thread then reports the peer
            // gone.
            w.shutdown();
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
                Error::Timeout { peer: self.id, what: "writing", after: Duration::ZERO }
            } else {
                Error::PeerGone { peer: self.id, reason: format!("writing failed: {e}") }
            }
        })
    }

    /// Registers the requests of a batch; answers arrive on the receiver.
    pub fn expect(&self, tags: &[u64]) -> Receiver<(usize, Answer)> {
        let (tx, rx) = channel();
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (i, tag) in tags.iter().enumerate() {
            p.insert(*tag, (tx.clone(), i));
        }
        rx
    }

    /// Forgets requests that will not be waited for any more.
    pub fn forget(&self, tags: &[u64]) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for t in tags {
            p.remove(t);
        }
    }

    fn answer(&self, tag: u64, answer: Answer) -> bool {
        let entry = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&tag);
        match entry {
            Some((tx, i)) => {
                let _ = tx.send((i, answer));
                true
            }
            None => false,
        }
    }

    /// Marks the peer gone and fails everything waiting on it.
    fn mark_gone(&self, reason: &str) -> bool {
        let was_alive = self.alive.swap(false, Ordering::AcqRel);
        if was_alive {
            *self.gone.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
            self.gone_at.store((epoch().elapsed().as_nanos() as u64).max(1), Ordering::Release);
        }
        let waiting: Vec<_> = self.pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, (tx, i)) in waiting {
            let _ = tx.send((i, Err(Error::PeerGone { peer: self.id, reason: reason.to_string() })));
        }
        was_alive
    }

    /// Closes the stream both ways (the reader thread then ends).
    pub fn shutdown(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).0.shutdown();
    }
}

/// Waits for the answers of a batch of requests. The bound is on
/// progress: each answer must come within `after` of the previous one (or
/// of the start), so a large batch is not cut short while a silent peer
/// still fails within `after`.
pub(crate) fn wait_answers(
    peer: &Peer,
    rx: &Receiver<(usize, Answer)>,
    tags: &[u64],
    after: Duration,
    what: &'static str,
    mut each: impl FnMut(usize, Frame) -> Result<()>,
) -> Result<()> {
    let mut left = tags.len();
    let mut deadline = Instant::now() + after;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok((i, Ok(frame))) => {
                if let Err(e) = each(i, frame) {
                    peer.forget(tags);
                    return Err(e);
                }
                left -= 1;
                deadline = Instant::now() + after;
            }
            Ok((_, Err(e))) => {
                peer.forget(tags);
                return Err(e);
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                peer.forget(tags);
                return Err(Error::Timeout { peer: peer.id, what, after });
            }
        }
    }
    Ok(())
}

/// What a backend does with frames only it understands.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Handles a frame that is not a message, an answer or a goodbye;
    /// returns Err for a frame this backend does not accept.
    fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()>;
}

/// Counters, shared by all threads of a transport.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_served: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub chunks_registered: AtomicU64,
    pub bytes_registered: AtomicU64,
    pub exposures: AtomicU64,
    pub exposures_ended: AtomicU64,
    pub exposure_ns: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            reads: g(&self.reads),
            bytes_read: g(&self.bytes_read),
            bytes_served: g(&self.bytes_served),
            messages_sent: g(&self.messages_sent),
            bytes_sent: g(&self.bytes_sent),
            messages_received: g(&self.messages_received),
            chunks_registered: g(&self.chunks_registered),
            bytes_registered: g(&self.bytes_registered),
            exposures: g(&self.exposures),
            exposures_ended: g(&self.exposures_ended),
            exposure_ns: g(&self.exposure_ns),
        }
    }
}

/// The state every backend has: peers, local regions, inbox, counters,
/// reader threads.
#[derive(Debug)]
pub(crate) struct Core {
    pub node: NodeId,
    pub peers: BTreeMap<NodeId, Arc<Peer>>,
    pub local: Arc<Vec<LocalRegion>>,
    pub counters: Arc<Counters>,
    pub io_timeout: Duration,
    inbox: Mutex<Receiver<Incoming>>,
    inbox_tx: Mutex<Sender<Incoming>>,
    next_tag: AtomicU64,
    stopping: Arc<AtomicBool>,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Core {
    /// Sends our regions to every peer and reads theirs (then the
    /// backend's own setup runs, then [`Core::start`]).
    pub fn exchange_regions(
        conns: &mut BTreeMap<NodeId, Link>,
        local: &[LocalRegion],
    ) -> Result<BTreeMap<NodeId, Vec<RegionInfo>>> {
        let mine = Frame::Regions(local.iter().map(LocalRegion::info).collect());
        for (id, c) in conns.iter_mut() {
            c.write_frame(&mine).map_err(|e| Error::PeerGone { peer: *id, reason: format!("sending regions: {e}") })?;
        }
        let mut out = BTreeMap::new();
        for (id, c) in conns.iter_mut() {
            match c.read_frame() {
                Ok(Frame::Regions(r)) => {
                    out.insert(*id, r);
                }
                Ok(other) => {
                    return Err(Error::Protocol {
                        peer: *id,
                        reason: format!("expected Regions, got {}", other.name()),
                    })
                }
                Err(e) => return Err(stream_error(*id, "waiting for regions", e)),
            }
        }
        Ok(out)
    }

    /// Sends Ready and waits for the peers' Ready: after this every
    /// backend-specific setup frame has been read.
    pub fn ready(conns: &mut BTreeMap<NodeId, Link>) -> Result<()> {
        for (id, c) in conns.iter_mut() {
            c.write_frame(&Frame::Ready)
                .map_err(|e| Error::PeerGone { peer: *id, reason: format!("sending Ready: {e}") })?;
        }
        for (id, c) in conns.iter_mut() {
            match c.read_frame() {
                Ok(Frame::Ready) => {}
                Ok(other) => {
                    return Err(Error::Protocol { peer: *id, reason: format!("expected Ready, got {}", other.name()) })
                }
                Err(e) => return Err(stream_error(*id, "waiting for Ready", e)),
            }
        }
        Ok(())
    }

    /// Builds the core and starts one reader thread per peer.
    pub fn start(
        node: NodeId,
        conns: BTreeMap<NodeId, Link>,
        regions: BTreeMap<NodeId, Vec<RegionInfo>>,
        local: Vec<LocalRegion>,
        io_timeout: Duration,
        make_handler: impl FnOnce(std::sync::Weak<Core>) -> Arc<dyn Handler>,
    ) -> Result<Arc<Core>> {
        let (tx, rx) = channel();
        let mut peers = BTreeMap::new();
        let mut readers = Vec::new();
        for (id, Link { conn, sealer, opener, .. }) in conns {
            let p = Peer::new(id, regions.get(&id).cloned().unwrap_or_default(), &conn, sealer)
                .map_err(|source| Error::Io { what: format!("cloning the stream of node {id}"), source })?;
            peers.insert(id, Arc::new(p));
            readers.push((id, conn, opener));
        }
        let core = Arc::new(Core {
            node,
            peers,
            local: Arc::new(local),
            counters: Arc::new(Counters::default()),
            io_timeout,
            inbox: Mutex::new(rx),
            inbox_tx: Mutex::new(tx),
            next_tag: AtomicU64::new(1),
            stopping: Arc::new(AtomicBool::new(false)),
            readers: Mutex::new(Vec::new()),
        });
        let handler = make_handler(Arc::downgrade(&core));
        for (id, conn, opener) in readers {
            // the reader blocks until a frame or the end of the stream
            conn.set_timeouts(None, Some(io_timeout))
                .map_err(|source| Error::Io { what: "setting socket timeouts".into(), source })?;
            let peer = core.peers[&id].clone();
            let c = core.clone();
            let h = handler.clone();
            let t = std::thread::Builder::new()
                .name(format!("fabric-rx{id}"))
                .spawn(move || c.read_loop(&peer, conn, opener, &*h));
            match t {
                Ok(t) => core.readers.lock().unwrap_or_else(|p| p.into_inner()).push(t),
                Err(source) => {
                    // stop the readers that did start, and close every stream
                    core.shutdown();
                    return Err(Error::Io { what: "starting a reader thread".into(), source });
                }
            }
        }
        Ok(core)
    }

    pub fn peer(&self, id: NodeId) -> Result<&Arc<Peer>> {
        self.peers.get(&id).ok_or(Error::UnknownPeer(id))
    }

    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }

    pub fn peer_regions(&self, id: NodeId) -> Result<Vec<RegionInfo>> {
        Ok(self.peer(id)?.regions.clone())
    }

    /// Sends a message as a frame on the peer's stream (shm, tcp).
    pub fn send_message(&self, peer: NodeId, msg: &[u8]) -> Result<()> {
        if msg.len() > crate::MAX_MESSAGE {
            return Err(Error::MessageLength { len: msg.len() });
        }
        self.peer(peer)?.write(&[Frame::Message(msg.to_vec())])?;
        self.count_sent(msg.len());
        Ok(())
    }

    pub fn count_sent(&self, bytes: usize) {
        self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_reads(&self, reads: usize, bytes: u64) {
        self.counters.reads.fetch_add(reads as u64, Ordering::Relaxed);
        self.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn tags(&self, n: usize) -> Vec<u64> {
        let first = self.next_tag.fetch_add(n as u64, Ordering::Relaxed);
        (first..first + n as u64).collect()
    }

    /// How long `peer` has been quiet, if it is ours.
    pub fn quiet_for(&self, peer: NodeId) -> Option<Duration> {
        self.peer(peer).ok().map(|p| p.quiet())
    }

    /// The peer whose loss was noticed first, and why it is gone.
    pub fn first_departure(&self) -> Option<(NodeId, String)> {
        let gone = self.peers.values().filter_map(|p| Some((p.gone_at()?, p)));
        let (_, p) = gone.min_by_key(|(at, _)| *at)?;
        let reason = p.gone.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        Some((p.id, reason))
    }

    /// Puts a message into the inbox (backends whose messages do not come
    /// through the stream deliver here).
    pub fn deliver(&self, from: NodeId, payload: Vec<u8>) {
        if let Ok(p) = self.peer(from) {
            p.heard();
        }
        self.counters.messages_received.fetch_add(1, Ordering::Relaxed);
        let _ = self.inbox_tx.lock().unwrap_or_else(|p| p.into_inner()).send(Incoming::Message { from, payload });
    }

    pub fn recv(&self, timeout: Duration) -> Option<Incoming> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(timeout).ok()
    }

    /// A peer left: fail its waiters, tell the inbox once.
    pub fn peer_gone(&self, peer: &Peer, reason: &str) {
        if peer.mark_gone(reason) && !self.stopping.load(Ordering::Acquire) {
            let gone = Incoming::PeerGone { node: peer.id, reason: reason.to_string() };
            let _ = self.inbox_tx.lock().unwrap_or_else(|p| p.into_inner()).send(gone);
        }
    }

    fn read_loop(&self, peer: &Peer, mut conn: Conn, mut opener: Opener, handler: &dyn Handler) {
        loop {
            let frame = match opener.read_frame(&mut conn) {
                Ok(f) => {
                    peer.heard();
                    f
                }
                Err(e) => {
                    let reason = match e {
                        StreamError::Closed => "connection closed".to_string(),
                        StreamError::Io(e) => format!("connection failed: {e}"),
                        StreamError::Wire(w) => format!("sent a malformed frame ({w}); disconnected it"),
                        f @ StreamError::Forged { .. } => {
                            tracing::warn!(peer = peer.id, error = %f, "disconnecting a peer whose frame failed authentication");
                            format!("its {f}; disconnected it")
                        }
                    };
                    self.peer_gone(peer, &reason);
                    conn.shutdown();
                    return;
                }
            };
            let result = match frame {
                Frame::Message(payload) => {
                    self.deliver(peer.id, payload);
                    Ok(())
                }
                Frame::Goodbye => {
                    self.peer_gone(peer, crate::GOODBYE);
                    conn.shutdown();
                    return;
                }
                f @ (Frame::ReadData { .. } | Frame::ReadError { .. } | Frame::KeyGrant { .. }) => {
                    let tag = match &f {
                        Frame::ReadData { tag, .. } | Frame::ReadError { tag, .. } | Frame::KeyGrant { tag, .. } => {
                            *tag
                        }
                        _ => unreachable!(),
                    };
                    // an answer nobody waits for any more (timed out): drop it
                    peer.answer(tag, Ok(f));
                    Ok(())
                }
                other => handler.on_frame(peer, other),
            };
            if let Err(e) = result {
                tracing::warn!(peer = peer.id, error = %e, "disconnecting a peer that broke the protocol");
                self.peer_gone(peer, &format!("broke the protocol: {e}"));
                conn.shutdown();
                return;
            }
        }
    }

    /// Serves a tcp read request from our regions: the passive responder.
    pub fn serve_read(&self, peer: &Peer, tag: u64, region: u32, offset: u64, len: u32) -> Result<()> {
        let reply = match self.local.iter().find(|r| r.id == region) {
            None => Frame::ReadError { tag, failure: ReadFailure::UnknownRegion },
            Some(_) if len == 0 || len as usize > crate::MAX_READ => {
                Frame::ReadError { tag, failure: ReadFailure::BadLength }
            }
            Some(r) => {
                let mut data = vec![0u8; len as usize];
                match r.copy_out(offset, &mut data) {
                    Some(()) => {
                        self.counters.bytes_served.fetch_add(u64::from(len), Ordering::Relaxed);
                        Frame::ReadData { tag, data }
                    }
                    None => Frame::ReadError { tag, failure: ReadFailure::OutOfBounds },
                }
            }
        };
        // a peer that stopped reading is its own problem: do not die of it
        if let Err(e) = peer.write(&[reply]) {
            tracing::debug!(peer = peer.id, error = %e, "could not answer a read");
        }
        Ok(())
    }

    /// Says goodbye, closes every stream, joins the readers.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for p in self.peers.values() {
            let _ = p.write(&[Frame::Goodbye]);
            p.shutdown();
        }
        let readers: Vec<_> = self.readers.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for t in readers {
            let _ = t.join();
        }
    }
}

pub(crate) fn stream_error(peer: NodeId, what: &str, e: StreamError) -> Error {
    match e {
        StreamError::Closed => Error::PeerGone { peer, reason: format!("connection closed while {what}") },
        StreamError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Error::Timeout { peer, what: "setup", after: Duration::ZERO }
        }
        StreamError::Io(e) => Error::PeerGone { peer, reason: format!("{what}: {e}") },
        StreamError::Wire(w) => Error::Protocol { peer, reason: format!("{what}: {w}") },
        f @ StreamError::Forged { .. } => Error::Protocol { peer, reason: format!("{what}: its {f}") },
    }
}
