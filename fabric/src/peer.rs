//! What the backends share: the per-peer stream (frames after the
//! handshake), its reader thread, the inbox of messages and departures,
//! requests waiting for their answers, and the counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
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

/// How many sealed bytes may wait for a peer's socket before the peer is
/// given up as not reading: far beyond what a live peer leaves unread
/// (its receiving thread moves what arrives into its inbox), and a bound
/// on our memory when one stops.
const MAX_BACKLOG: usize = 256 << 20;

/// One peer: its regions, the write half of its stream, its liveness.
#[derive(Debug)]
pub(crate) struct Peer {
    pub id: NodeId,
    pub regions: Vec<RegionInfo>,
    /// What goes out to the peer (one lock: frames are numbered in the
    /// order they go out).
    out: Mutex<Outgoing>,
    /// The backlog, `in_flight` or `closed` changed: the flusher and a
    /// closer waiting for the backlog to drain look again.
    out_changed: Condvar,
    alive: AtomicBool,
    gone: Mutex<Option<String>>,
    /// Why we closed its stream ourselves (a send that gave up on it):
    /// the reason its loss is reported with, when the reader sees the end.
    cause: Mutex<Option<String>>,
    /// Requests (tcp reads, verbs key requests) waiting for their answer,
    /// by tag: the sender half and the op's index in its batch.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// When the last frame from the peer arrived (ns since [`epoch`]).
    heard: AtomicU64,
    /// When its loss was noticed (ns since [`epoch`]; 0 while it is here).
    gone_at: AtomicU64,
    counters: Arc<Counters>,
}

/// The sending half of a peer's stream. A send never waits for the peer:
/// what the socket has no room for joins the backlog, which the peer's
/// flusher thread writes (and only it, until the backlog is empty, so the
/// order holds). A thread that sends while it handles the peer's messages
/// (a receiving thread answering a read, a tap) therefore cannot wait on a
/// peer that waits on it.
#[derive(Debug)]
struct Outgoing {
    conn: Conn,
    sealer: Sealer,
    /// Sealed frames the socket had no room for yet, in order.
    backlog: Vec<u8>,
    /// Bytes the flusher took from the backlog and is writing (0: none).
    in_flight: usize,
    /// Nothing more goes out: the peer is closing or a write failed.
    closed: bool,
}

/// Writes as much of `bytes` as the socket takes without waiting; returns
/// how much that was.
fn send_now(conn: &Conn, bytes: &[u8]) -> std::io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        // SAFETY: `rest` is a live slice of `rest.len()` bytes; send(2)
        // only reads it. MSG_NOSIGNAL: a closed peer is an error, not
        // SIGPIPE.
        let n = unsafe {
            libc::send(conn.raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => break,
            _ => return Err(e),
        }
    }
    Ok(sent)
}

/// The zero of the peers' arrival times.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Peer {
    pub fn new(
        id: NodeId,
        regions: Vec<RegionInfo>,
        conn: &Conn,
        sealer: Sealer,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        let out = Outgoing { conn: conn.try_clone()?, sealer, backlog: Vec::new(), in_flight: 0, closed: false };
        Ok(Peer {
            id,
            regions,
            out: Mutex::new(out),
            out_changed: Condvar::new(),
            alive: AtomicBool::new(true),
            gone: Mutex::new(None),
            cause: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            heard: AtomicU64::new(epoch().elapsed().as_nanos() as u64),
            gone_at: AtomicU64::new(0),
            counters,
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
        Err(Error::PeerGone { peer: self.id, reason: self.gone_reason("") })
    }

    /// Closes the sending half for good: nothing more goes out, the stream
    /// is shut both ways (so neither side reads a frame boundary where
    /// there is none; the reader and flusher threads then end), and a
    /// closer waiting for the backlog stops waiting.
    fn close_out(&self, mut out: std::sync::MutexGuard<'_, Outgoing>) {
        out.closed = true;
        out.conn.shutdown();
        drop(out);
        self.out_changed.notify_all();
    }

    /// The reason it is gone, or `fallback`.
    fn gone_reason(&self, fallback: &str) -> String {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| fallback.to_string())
    }

    /// Sends frames, in order after those sent before, without waiting for
    /// the peer: what its socket has no room for waits in the backlog for
    /// the flusher (see [`Outgoing`]). Fails when the peer is gone or
    /// closing, or has left [`MAX_BACKLOG`] bytes unread (then it is gone).
    pub fn write(&self, frames: &[Frame]) -> Result<()> {
        self.check_alive()?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if out.closed {
            return Err(Error::PeerGone { peer: self.id, reason: self.gone_reason("its connection is closed") });
        }
        let mut bytes = Vec::new();
        for f in frames {
            out.sealer.seal_into(f, &mut bytes);
        }
        if out.in_flight > 0 || !out.backlog.is_empty() {
            let unsent = out.in_flight + out.backlog.len();
            if unsent + bytes.len() > MAX_BACKLOG {
                let reason = format!("left {} MiB we sent it unread", unsent >> 20);
                *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                // (our reader then sees the stream end and reports the
                // peer gone, for this reason)
                self.close_out(out);
                return Err(Error::PeerGone { peer: self.id, reason });
            }
            out.backlog.extend_from_slice(&bytes);
            self.counters.sends_deferred.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match send_now(&out.conn, &bytes) {
            Ok(sent) if sent == bytes.len() => Ok(()),
            Ok(sent) => {
                out.backlog.extend_from_slice(&bytes[sent..]);
                self.counters.sends_deferred.fetch_add(1, Ordering::Relaxed);
                drop(out);
                self.out_changed.notify_all();
                Ok(())
            }
            Err(e) => {
                // part of a frame may be out: the stream is out of step for
                // good (our reader then reports the peer gone)
                self.close_out(out);
                Err(Error::PeerGone { peer: self.id, reason: format!("writing failed: {e}") })
            }
        }
    }

    /// The flusher: writes the backlog as it fills, waiting for the peer
    /// (up to the stream's write timeout without progress, then the peer is
    /// lost), until the peer is closed. Runs on its own thread, with its
    /// own handle on the stream.
    fn flush_loop(&self, core: &Core, mut conn: Conn) {
        loop {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            out.in_flight = 0;
            self.out_changed.notify_all();
            while out.backlog.is_empty() && !out.closed {
                out = self.out_changed.wait(out).unwrap_or_else(|p| p.into_inner());
            }
            if out.backlog.is_empty() {
                return; // closed, and all was written
            }
            let bytes = std::mem::take(&mut out.backlog);
            out.in_flight = bytes.len();
            drop(out);
            if let Err(e) = std::io::Write::write_all(&mut conn, &bytes) {
                let reason = if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    format!("read nothing we sent for {:?}", core.io_timeout)
                } else {
                    format!("writing failed: {e}")
                };
                // (named first: the reader, woken by the close, would call
                // it "connection closed")
                core.peer_gone(self, &reason);
                self.close_out(self.out.lock().unwrap_or_else(|p| p.into_inner()));
                return;
            }
        }
    }

    /// Sends `last` (a goodbye) behind what is queued, waits until
    /// `deadline` for the backlog to drain, then closes the stream both
    /// ways (the reader and flusher threads then end).
    fn close(&self, last: Option<Frame>, deadline: Instant) {
        if let Some(f) = last {
            let _ = self.write(&[f]);
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        while (out.in_flight > 0 || !out.backlog.is_empty()) && !out.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            out = self.out_changed.wait_timeout(out, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        self.close_out(out);
    }

    /// Closes the stream both ways now, dropping what waits to go out (the
    /// reader and flusher threads then end).
    pub fn shutdown(&self) {
        self.close(None, Instant::now());
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

    /// Marks the peer gone (for `reason`, unless we closed its stream
    /// for a cause of our own) and fails everything waiting on it; returns
    /// the reason when it was alive until now.
    fn mark_gone(&self, reason: &str) -> Option<String> {
        let reason = self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| reason.to_string());
        let was_alive = self.alive.swap(false, Ordering::AcqRel);
        if was_alive {
            *self.gone.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            self.gone_at.store((epoch().elapsed().as_nanos() as u64).max(1), Ordering::Release);
        }
        let waiting: Vec<_> = self.pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, (tx, i)) in waiting {
            let _ = tx.send((i, Err(Error::PeerGone { peer: self.id, reason: reason.clone() })));
        }
        was_alive.then_some(reason)
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
    pub sends_deferred: AtomicU64,
    pub messages_tapped: AtomicU64,
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
            sends_deferred: g(&self.sends_deferred),
            messages_tapped: g(&self.messages_tapped),
        }
    }
}

/// The state every backend has: peers, local regions, inbox, counters,
/// reader and flusher threads.
#[derive(Debug)]
pub(crate) struct Core {
    pub node: NodeId,
    pub peers: BTreeMap<NodeId, Arc<Peer>>,
    pub local: Arc<Vec<LocalRegion>>,
    pub counters: Arc<Counters>,
    pub io_timeout: Duration,
    /// What `recv` returns; None wakes it with nothing (`Take::TakenWake`).
    inbox: Mutex<Receiver<Option<Incoming>>>,
    inbox_tx: Mutex<Sender<Option<Incoming>>>,
    /// Offered every message before the inbox (shm: `Transport::set_tap`).
    tap: std::sync::OnceLock<Arc<dyn crate::Tap>>,
    next_tag: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// Each peer's reader and flusher.
    threads: Mutex<Vec<JoinHandle<()>>>,
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
        let counters = Arc::new(Counters::default());
        let mut peers = BTreeMap::new();
        let mut streams = Vec::new();
        for (id, Link { conn, sealer, opener, .. }) in conns {
            let cloning = |source| Error::Io { what: format!("cloning the stream of node {id}"), source };
            let p = Peer::new(id, regions.get(&id).cloned().unwrap_or_default(), &conn, sealer, counters.clone())
                .map_err(cloning)?;
            let flusher_conn = conn.try_clone().map_err(cloning)?;
            peers.insert(id, Arc::new(p));
            streams.push((id, conn, opener, flusher_conn));
        }
        let core = Arc::new(Core {
            node,
            peers,
            local: Arc::new(local),
            counters,
            io_timeout,
            inbox: Mutex::new(rx),
            inbox_tx: Mutex::new(tx),
            tap: std::sync::OnceLock::new(),
            next_tag: AtomicU64::new(1),
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        });
        let handler = make_handler(Arc::downgrade(&core));
        for (id, conn, opener, flusher_conn) in streams {
            // the reader blocks until a frame or the end of the stream; the
            // flusher's writes wait for the peer up to `io_timeout`
            conn.set_timeouts(None, Some(io_timeout))
                .map_err(|source| Error::Io { what: "setting socket timeouts".into(), source })?;
            let peer = core.peers[&id].clone();
            let (c, p) = (core.clone(), peer.clone());
            let h = handler.clone();
            let reader = std::thread::Builder::new()
                .name(format!("fabric-rx{id}"))
                .spawn(move || c.read_loop(&p, conn, opener, &*h));
            let c = core.clone();
            let flusher = reader.and_then(|r| {
                core.threads.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                std::thread::Builder::new()
                    .name(format!("fabric-tx{id}"))
                    .spawn(move || peer.flush_loop(&c, flusher_conn))
            });
            match flusher {
                Ok(t) => core.threads.lock().unwrap_or_else(|p| p.into_inner()).push(t),
                Err(source) => {
                    // stop the threads that did start, and close every stream
                    core.shutdown();
                    return Err(Error::Io { what: "starting a reader or flusher thread".into(), source });
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
        if let Some(tap) = self.tap.get() {
            match tap.take(from, &payload) {
                crate::Take::Pass => {}
                crate::Take::Taken => {
                    self.counters.messages_tapped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                crate::Take::TakenWake => {
                    self.counters.messages_tapped.fetch_add(1, Ordering::Relaxed);
                    // (None: a wake, not a message; `recv` returns None)
                    let _ = self.inbox_tx.lock().unwrap_or_else(|p| p.into_inner()).send(None);
                    return;
                }
            }
        }
        let _ = self.inbox_tx.lock().unwrap_or_else(|p| p.into_inner()).send(Some(Incoming::Message { from, payload }));
    }

    /// Sets the tap [`Core::deliver`] offers every message first (once).
    pub fn set_tap(&self, tap: Arc<dyn crate::Tap>) -> bool {
        self.tap.set(tap).is_ok()
    }

    pub fn recv(&self, timeout: Duration) -> Option<Incoming> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(timeout).ok().flatten()
    }

    /// A peer left: fail its waiters, tell the inbox once.
    pub fn peer_gone(&self, peer: &Peer, reason: &str) {
        let Some(reason) = peer.mark_gone(reason) else { return };
        if !self.stopping.load(Ordering::Acquire) {
            let gone = Incoming::PeerGone { node: peer.id, reason };
            let _ = self.inbox_tx.lock().unwrap_or_else(|p| p.into_inner()).send(Some(gone));
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

    /// Says goodbye behind what is queued for each peer, waits up to the
    /// I/O timeout for it to go out, closes every stream, joins the
    /// readers and flushers.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + self.io_timeout;
        for p in self.peers.values() {
            p.close(Some(Frame::Goodbye), deadline);
        }
        let threads: Vec<_> = self.threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for t in threads {
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::framing::{MessageOpener, MessageSealer};

    /// Takes no frames of its own.
    struct NoFrames;

    impl Handler for NoFrames {
        fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()> {
            Err(Error::Protocol { peer: peer.id, reason: format!("unexpected {}", frame.name()) })
        }
    }

    /// Node 0's core over one end of a socket pair, whose other end plays
    /// node 1 (read by the test, or not).
    fn core_and_peer(io_timeout: Duration) -> (Arc<Core>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let link = Link {
            conn: Conn::Unix(ours),
            sealer: Sealer::new(None),
            opener: Opener::new(None),
            msg_sealer: MessageSealer::new(None),
            msg_opener: MessageOpener::new(None),
        };
        let core = Core::start(0, BTreeMap::from([(1, link)]), BTreeMap::new(), Vec::new(), io_timeout, |_| {
            Arc::new(NoFrames)
        })
        .unwrap();
        (core, theirs)
    }

    /// Messages of the largest size, as many as make 8 MiB.
    const MESSAGES: u32 = (8 << 20) / crate::MAX_MESSAGE as u32;

    fn message(i: u32) -> Vec<u8> {
        let mut m = vec![(i % 251) as u8; crate::MAX_MESSAGE];
        m[..4].copy_from_slice(&i.to_le_bytes());
        m
    }

    /// 8 MiB to a peer that reads none of it (a socket buffer holds a few
    /// hundred KiB): every send returns, the rest waits in the backlog, and
    /// all of it arrives, in order, once the peer reads; the goodbye last.
    #[test]
    fn a_send_does_not_wait_for_a_peer_that_does_not_read() {
        let (core, mut theirs) = core_and_peer(Duration::from_secs(20));
        // (a send that waited for the peer would fail, after the write
        // timeout: nobody reads until all are sent)
        for i in 0..MESSAGES {
            core.send_message(1, &message(i)).unwrap();
        }
        assert!(core.counters.snapshot().sends_deferred > 0);
        let closer = {
            let core = core.clone();
            std::thread::spawn(move || core.shutdown())
        };
        let mut opener = Opener::new(None);
        for i in 0..MESSAGES {
            match opener.read_frame(&mut theirs).unwrap() {
                Frame::Message(m) => assert!(m == message(i), "message {i} differs"),
                other => panic!("message {i}: {}", other.name()),
            }
        }
        assert_eq!(opener.read_frame(&mut theirs).unwrap(), Frame::Goodbye);
        closer.join().unwrap();
    }

    /// A peer that reads nothing for the I/O timeout while sends wait for
    /// it is lost, named, and later sends fail.
    #[test]
    fn a_peer_that_reads_nothing_is_lost_after_the_io_timeout() {
        let (core, _theirs) = core_and_peer(Duration::from_millis(300));
        // sends return at once (what the socket cannot take waits in the
        // backlog); if this thread is descheduled for the 300 ms, the peer
        // is lost before the last send, and the sends left fail naming it
        for i in 0..MESSAGES {
            if let Err(e) = core.send_message(1, &message(i)) {
                assert!(matches!(e, Error::PeerGone { peer: 1, .. }), "{e}");
                break;
            }
        }
        match core.recv(Duration::from_secs(10)) {
            Some(Incoming::PeerGone { node: 1, reason }) => assert!(reason.contains("read nothing"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(core.send_message(1, &[1]), Err(Error::PeerGone { peer: 1, .. })));
        core.shutdown();
    }

    /// What a peer leaves unread is bounded: beyond [`MAX_BACKLOG`] the
    /// peer is gone and the send fails, naming how much it left.
    #[test]
    fn the_backlog_is_bounded() {
        let (core, _theirs) = core_and_peer(Duration::from_secs(60));
        let big = Frame::ReadData { tag: 1, data: vec![7u8; crate::MAX_READ] };
        let mut failed = None;
        for _ in 0..(MAX_BACKLOG / crate::MAX_READ + 2) {
            if let Err(e) = core.peer(1).unwrap().write(std::slice::from_ref(&big)) {
                failed = Some(e);
                break;
            }
        }
        match failed {
            Some(Error::PeerGone { peer: 1, reason }) => assert!(reason.contains("MiB we sent it unread"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // the inbox says so too, once, for the same reason
        match core.recv(Duration::from_secs(10)) {
            Some(Incoming::PeerGone { node: 1, reason }) => {
                assert!(reason.contains("MiB we sent it unread"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(core.recv(Duration::from_millis(100)).is_none());
        core.shutdown();
    }
}
