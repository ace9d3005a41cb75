//! Joining a pod: bind, connect every pair of nodes once (the higher id
//! dials the lower), authenticate each connection, then hand the
//! authenticated streams to the backend. Connections that have not
//! authenticated get little: at most [`MAX_PENDING_HANDSHAKES`] handshakes
//! run at once, and nothing they send or answer ends the join; only a
//! peer's own address that keeps refusing us does (see [`Streak`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{handshake, Identity, Session};
use crate::framing::{MessageOpener, MessageSealer, Opener, Sealer};
use crate::wire::{Frame, StreamError};
use crate::{Addr, Error, Kind, LocalRegion, NodeId, Options, Result, Transport};

/// An authenticated connection to one peer: the stream and how frames are
/// sealed on it in each direction (see [`crate::framing`]).
#[derive(Debug)]
pub(crate) struct Link {
    pub conn: Conn,
    pub sealer: Sealer,
    pub opener: Opener,
    /// For messages outside the stream (verbs' SENDs).
    pub msg_sealer: MessageSealer,
    pub msg_opener: MessageOpener,
}

impl Link {
    fn new(conn: Conn, session: Session) -> Link {
        let Session { sealer, opener, msg_sealer, msg_opener, .. } = session;
        Link { conn, sealer, opener, msg_sealer, msg_opener }
    }

    pub fn write_frame(&mut self, frame: &Frame) -> io::Result<()> {
        self.sealer.write_frame(&mut self.conn, frame)
    }

    pub fn read_frame(&mut self) -> std::result::Result<Frame, StreamError> {
        self.opener.read_frame(&mut self.conn)
    }
}

/// A connected, authenticated stream to one peer.
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Our IP address on this connection (None for Unix sockets).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Conn::Tcp(s) => s.local_addr().ok().map(|a| a.ip()),
            Conn::Unix(_) => None,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// A bound, not yet joined node.
#[derive(Debug)]
pub struct Binding {
    kind: Kind,
    listener: Listener,
    addr: Addr,
}

/// Binds `addr` for backend `kind`: a Unix socket path for shm, a TCP
/// address for tcp and verbs (port 0 picks a free port; see
/// [`Binding::local_addr`]).
pub fn bind(kind: Kind, addr: &Addr) -> Result<Binding> {
    let io = |what: String| move |source| Error::Io { what, source };
    let (listener, addr) = match (kind, addr) {
        (Kind::Shm, Addr::Unix(path)) => {
            // a socket file left by a node that died is ours to replace; one
            // a live node listens on is not
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::Io {
                        what: format!("binding {}", path.display()),
                        source: io::Error::new(io::ErrorKind::AddrInUse, "a running node listens there"),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
            (Listener::Unix(l, path.clone()), addr.clone())
        }
        (Kind::Tcp | Kind::Verbs, Addr::Tcp(a)) => {
            let l = TcpListener::bind(a).map_err(io(format!("binding {a}")))?;
            let local = l.local_addr().map_err(io(format!("reading the address bound for {a}")))?;
            (Listener::Tcp(l), Addr::Tcp(local))
        }
        (k, a) => {
            return Err(Error::Config(format!(
                "fabric {k} cannot listen on {a}: shm takes a Unix socket path, tcp and verbs a host:port"
            )))
        }
    };
    Ok(Binding { kind, listener, addr })
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Binding {
    /// The address peers must dial.
    pub fn local_addr(&self) -> &Addr {
        &self.addr
    }

    /// Connects to every peer in `peers` (all other nodes of the pod, in
    /// any order; they may still be starting), authenticates, exchanges
    /// regions, and returns the running transport.
    pub fn join(
        self,
        me: Identity,
        peers: &[(NodeId, Addr)],
        regions: Vec<LocalRegion>,
        opts: Options,
    ) -> Result<Box<dyn Transport>> {
        if me.pod_id.len() > crate::wire::MAX_POD_ID {
            return Err(Error::Config(format!(
                "the pod id is {} bytes; the limit is {}",
                me.pod_id.len(),
                crate::wire::MAX_POD_ID
            )));
        }
        let deadline = Instant::now() + opts.join_timeout;
        let conns = self.connect_all(&me, peers, deadline, &opts)?;
        match self.kind {
            Kind::Tcp => Ok(Box::new(crate::tcp::TcpTransport::start(me.node, conns, regions, &opts)?)),
            Kind::Shm => Ok(Box::new(crate::shm::ShmTransport::start(me.node, conns, regions, &opts)?)),
            Kind::Verbs => Ok(Box::new(crate::verbs::VerbsTransport::start(me.node, conns, regions, &opts)?)),
        }
    }

    fn connect_all(
        &self,
        me: &Identity,
        peers: &[(NodeId, Addr)],
        deadline: Instant,
        opts: &Options,
    ) -> Result<BTreeMap<NodeId, Link>> {
        let mut want_accept = Vec::new();
        let mut want_dial = Vec::new();
        for (id, addr) in peers {
            if *id == me.node {
                return Err(Error::Config(format!("node {id} is this node; list only the other nodes as peers")));
            }
            if peers.iter().filter(|(o, _)| o == id).count() > 1 {
                return Err(Error::Config(format!("node {id} is listed twice among the peers")));
            }
            if *id < me.node {
                want_dial.push((*id, addr.clone()));
            } else {
                want_accept.push(*id);
            }
        }
        match &self.listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(|source| Error::Io { what: "making the listener non-blocking".into(), source })?;

        let mut conns = BTreeMap::new();
        let mut last_refusal = Refusal::default();
        // Handshakes of accepted connections run in their own threads, at
        // most MAX_PENDING_HANDSHAKES at once, each bounded in time: a
        // client that connects and says nothing cannot hold up the real
        // peers, and one that says the wrong thing cannot abort the join
        // (it is refused and remembered for the error message).
        let mut accepted = Handshakes::new();
        // refusals heard in a row from each node's own address (see
        // Streak), and the dials under way (see Dials)
        let mut streaks: BTreeMap<NodeId, Streak> = BTreeMap::new();
        let mut dials = Dials::new();
        // a dial's outcome that came while the loop waited
        let mut waited: Option<(NodeId, Dialed)> = None;
        // a node that refused us for good, why, and until when we still
        // answer (see Streak)
        let mut ending: Option<(NodeId, Error, Instant)> = None;
        let addr_of = |k: NodeId| peers.iter().find(|(id, _)| *id == k).map(|(_, a)| a);
        loop {
            // (sampled before the outcomes below are taken: one that came
            // just before the deadline still counts)
            let past_deadline = Instant::now() >= deadline;
            let mut progressed = accepted.admit(self, me, opts.authenticate_frames, deadline)?;
            while let Ok((result, conn)) = accepted.done_rx.try_recv() {
                progressed = true;
                match result {
                    Ok(s) if want_accept.contains(&s.peer) && !conns.contains_key(&s.peer) => {
                        conns.insert(s.peer, Link::new(conn, s));
                    }
                    // a node we dial, checking on us (a probe: something
                    // claiming to be us failed to join it): it knows the
                    // secret, and it dials nothing else here
                    Ok(Session { peer, .. }) if want_dial.iter().any(|(id, _)| *id == peer) => {
                        tracing::debug!(peer, "a node we dial checked on us; dropping its connection");
                    }
                    Ok(Session { peer, .. }) => {
                        tracing::warn!(peer, "unexpected node connected; dropping it");
                        last_refusal.note(true, format!("unexpected connection from node {peer}"));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection");
                        // whoever connected may be a stranger: ask the
                        // node it claims to be, at that node's address
                        if let Some(k) =
                            refusal(&e).flatten().filter(|k| want_accept.contains(k) && !conns.contains_key(k))
                        {
                            dials.probes.insert(k);
                        }
                        last_refusal.note(is_refusal(&e), e.to_string());
                    }
                }
            }
            while let Some((k, dialed)) = waited.take().or_else(|| dials.done_rx.try_recv().ok()) {
                dials.running.remove(&k);
                let probe = k > me.node;
                // not listening: look again soon (a node we dial), or in
                // our own time (a check); anything else after a pause
                let pause = match dialed {
                    Dialed::NotListening if !probe => Duration::from_millis(20),
                    _ => REDIAL_AFTER,
                };
                dials.next_at.insert(k, Instant::now() + pause);
                if conns.contains_key(&k) {
                    // (a check of a node that joined meanwhile)
                    continue;
                }
                match dialed {
                    // (a check's address may be one we cannot reach: the
                    // node dials us, and a stranger's claim cannot end
                    // the join)
                    Dialed::Failed(_) if probe => {
                        streaks.remove(&k);
                    }
                    Dialed::Failed(e) => return Err(e),
                    // whatever refused us there is gone
                    Dialed::NotListening => {
                        streaks.remove(&k);
                    }
                    Dialed::Handshake(Ok(done)) => {
                        let (session, conn) = *done;
                        progressed = true;
                        streaks.remove(&k);
                        if probe {
                            // it knows our secret: the bad connection
                            // was not its (and it dials us: drop this one)
                            dials.probes.remove(&k);
                        } else {
                            conns.insert(k, Link::new(conn, session));
                        }
                    }
                    // Whatever answered did not prove it knows the secret
                    // (a refusal, a wrong proof, junk or a broken
                    // connection): one such answer does not end the join.
                    // Try again shortly; refusals every time end it (see
                    // Streak), and the join's error names the refusal if
                    // the node never joins.
                    Dialed::Handshake(Err(e)) => {
                        progressed = true;
                        if !probe {
                            tracing::warn!(peer = k, error = %e, "handshake with a node we dialed failed; retrying");
                        }
                        // (a check that timed out or broke says nothing
                        // about the pod)
                        if !probe || is_refusal(&e) {
                            last_refusal.note(is_refusal(&e), e.to_string());
                        }
                        if is_refusal(&e) {
                            let addr = addr_of(k).map(Addr::to_string).unwrap_or_default();
                            if let Some(v) = streaks.entry(k).or_insert_with(Streak::new).refused(k, &addr, e) {
                                ending.get_or_insert((k, v, Instant::now() + LINGER));
                            }
                        } else {
                            streaks.remove(&k);
                        }
                    }
                }
            }
            // dial the lower ids that are still missing, and check the
            // higher ones that something claiming to be failed to join us
            let left =
                deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), HANDSHAKE_TIMEOUT);
            for (id, addr) in &want_dial {
                if !conns.contains_key(id) && dials.due(*id) {
                    dials.start(*id, addr.clone(), me, self.kind, opts.authenticate_frames, left);
                }
            }
            for k in dials.probes.clone() {
                if conns.contains_key(&k) {
                    dials.probes.remove(&k);
                    streaks.remove(&k);
                } else if dials.due(k) {
                    if let Some(addr) = addr_of(k) {
                        dials.start(k, addr.clone(), me, self.kind, opts.authenticate_frames, PROBE_TIMEOUT);
                    }
                }
            }
            if conns.len() == peers.len() {
                // (whatever refused us was not the node: it joined)
                break;
            }
            if let Some((node, e, until)) = ending.take() {
                // (whatever refused us was not the node if it joined)
                if !conns.contains_key(&node) {
                    if Instant::now() >= until || past_deadline {
                        return Err(e);
                    }
                    ending = Some((node, e, until));
                }
            }
            if past_deadline {
                let missing: Vec<String> = peers
                    .iter()
                    .filter(|(id, _)| !conns.contains_key(id))
                    .map(|(id, a)| format!("node {id} ({a})"))
                    .collect();
                let mut missing = missing.join(", ");
                // (the words of Error::WrongSecret and of the refusal a
                // peer sends for it, on either side of the handshake)
                let wrong_secret = last_refusal.text.as_deref().is_some_and(|t| t.contains("wrong pod secret"));
                match last_refusal.text {
                    Some(r) => missing.push_str(&format!("; last refused connection: {r}")),
                    // (nodes that disagreed among themselves end their
                    // joins within seconds: one that came later finds none)
                    None => missing.push_str(" (none answered: not started, or ended already; see their own errors)"),
                }
                return Err(Error::JoinTimeout { after: opts.join_timeout, missing, wrong_secret });
            }
            if !progressed {
                // a connection waiting for a slot gets it as soon as the
                // handshake cut short for it has ended; a dial's outcome
                // is taken as it comes
                let nap = Duration::from_millis(if accepted.waiting.is_some() { 2 } else { 20 });
                waited = dials.done_rx.recv_timeout(nap).ok();
            }
        }
        for c in conns.values() {
            c.conn
                .set_timeouts(Some(opts.join_timeout), Some(opts.io_timeout))
                .map_err(|source| Error::Io { what: "setting socket timeouts".into(), source })?;
        }
        Ok(conns)
    }

    /// The next connection waiting on the listener, if any. Errors that
    /// concern one connection or a passing shortage (a client that reset
    /// before we accepted it, out of descriptors) are logged and skipped:
    /// they must not end the join.
    fn try_accept(&self) -> Result<Option<Conn>> {
        let r = match &self.listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                s.set_nonblocking(false).map(|_| Conn::Tcp(s))
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| s.set_nonblocking(false).map(|_| Conn::Unix(s))),
        };
        match r {
            Ok(Ok(c)) => Ok(Some(c)),
            Ok(Err(e)) | Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Ok(Err(e)) | Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || matches!(
                        e.raw_os_error(),
                        Some(
                            libc::ECONNABORTED
                                | libc::EMFILE
                                | libc::ENFILE
                                | libc::ENOBUFS
                                | libc::ENOMEM
                                | libc::EPROTO
                                | libc::EPERM
                        )
                    ) =>
            {
                tracing::warn!(error = %e, "could not accept a connection; going on");
                Ok(None)
            }
            Ok(Err(source)) | Err(source) => Err(Error::Io { what: "accepting a peer".into(), source }),
        }
    }
}

/// What the join's timeout error names: the last refusal, where a peer's
/// answer (a refusal, a wrong proof, a version or pod that differs) is
/// kept over a connection that merely broke or timed out afterwards.
#[derive(Default)]
struct Refusal {
    text: Option<String>,
    definite: bool,
}

impl Refusal {
    fn note(&mut self, definite: bool, text: String) {
        if definite || !self.definite {
            self.text = Some(text);
            self.definite = definite;
        }
    }
}

/// When a handshake error is an answer of the other side (as opposed to a
/// connection that broke, timed out or was cut short): the node the other
/// side claimed to be, if it said.
fn refusal(e: &Error) -> Option<Option<NodeId>> {
    match e {
        Error::Version { peer, .. }
        | Error::PodMismatch { peer, .. }
        | Error::BackendMismatch { peer, .. }
        | Error::WrongSecret { peer }
        | Error::FrameAuthMismatch { peer, .. }
        | Error::Refused { peer, .. } => Some(*peer),
        _ => None,
    }
}

fn is_refusal(e: &Error) -> bool {
    refusal(e).is_some()
}

/// Refusals heard in a row from one node's own address.
///
/// Anyone can connect to a node, so a refusal on a connection we accepted
/// proves nothing about the node it claims to be: we dial that node's
/// address to check (a probe). And anything can answer an address once (a
/// squatter, an old node still leaving), so one refusal on a connection we
/// dialed proves nothing either. But an address that refuses us
/// `REFUSALS` times in a row over at least `REFUSING_FOR` is the node
/// there: an impostor that could do that for good could as well keep the
/// node from listening, or drop its traffic. The join then ends within
/// seconds, naming the refusal (a wrong pod secret, version or pod id),
/// instead of at the join timeout. Before it ends, the node goes on
/// answering for `LINGER`, so that the node that refused it (refused by
/// it in turn) hears as many refusals before it is gone.
struct Streak {
    first: Instant,
    count: u32,
}

impl Streak {
    fn new() -> Streak {
        Streak { first: Instant::now(), count: 0 }
    }

    /// Notes a refusal from `peer` at `addr`; returns the join's error once
    /// the refusals are enough.
    fn refused(&mut self, peer: NodeId, addr: &str, e: Error) -> Option<Error> {
        self.count += 1;
        let took = self.first.elapsed();
        (self.count >= REFUSALS && took >= REFUSING_FOR).then(|| Error::Refusing {
            peer,
            addr: addr.to_string(),
            times: self.count,
            over: took,
            last: Box::new(e),
        })
    }
}

const REFUSALS: u32 = 3;
const REFUSING_FOR: Duration = Duration::from_millis(500);
const LINGER: Duration = Duration::from_secs(1);
/// The longest each read or write of a probe's handshake may wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a dial in a thread of its own came to.
enum Dialed {
    /// Nobody listens there (yet, or any more).
    NotListening,
    /// Connecting failed otherwise: the join ends, naming it.
    Failed(Error),
    /// The handshake's outcome, with the connection (boxed: a session
    /// holds its keys).
    Handshake(Result<Box<(Session, Conn)>>),
}

/// Dials, each in a thread of its own (a node we dial may be blocked
/// dialing a node in turn, or listen without joining yet: nothing here
/// waits for it), at most one per node at a time. Two kinds: the lower
/// ids, our links in the pod; and checks (*probes*) of higher ids, that
/// dial us, when something claiming to be one failed to join us: does
/// the node itself refuse us? A probe's connection is dropped (the node
/// dials us).
struct Dials {
    running: std::collections::BTreeSet<NodeId>,
    next_at: BTreeMap<NodeId, Instant>,
    /// The higher ids to check.
    probes: std::collections::BTreeSet<NodeId>,
    /// A clone of each connection whose handshake is under way: when the
    /// join ends before it does, it is shut down (its thread then ends at
    /// once, and the peer does not keep it as a link).
    inflight: Arc<Mutex<BTreeMap<NodeId, Conn>>>,
    done_tx: Sender<(NodeId, Dialed)>,
    done_rx: Receiver<(NodeId, Dialed)>,
}

impl Drop for Dials {
    fn drop(&mut self) {
        for c in self.inflight.lock().unwrap_or_else(|p| p.into_inner()).values() {
            c.shutdown();
        }
    }
}

impl Dials {
    fn new() -> Dials {
        let (done_tx, done_rx) = channel();
        Dials {
            running: Default::default(),
            next_at: Default::default(),
            probes: Default::default(),
            inflight: Default::default(),
            done_tx,
            done_rx,
        }
    }

    /// Whether `node` may be dialed now.
    fn due(&self, node: NodeId) -> bool {
        !self.running.contains(&node) && self.next_at.get(&node).is_none_or(|t| Instant::now() >= *t)
    }

    /// Dials `node` at `addr` and runs the handshake, each read and write
    /// waiting at most `timeout`.
    fn start(&mut self, node: NodeId, addr: Addr, me: &Identity, kind: Kind, auth: bool, timeout: Duration) {
        let (me, tx, inflight) = (me.clone(), self.done_tx.clone(), self.inflight.clone());
        let spawned = std::thread::Builder::new().name("fabric-dial".into()).spawn(move || {
            let dialed = match dial(&addr) {
                Ok(None) => Dialed::NotListening,
                Err(e) => Dialed::Failed(e),
                Ok(Some(mut conn)) => {
                    let _ = conn.set_timeouts(Some(timeout), Some(timeout));
                    if let Ok(c) = conn.try_clone() {
                        inflight.lock().unwrap_or_else(|p| p.into_inner()).insert(node, c);
                    }
                    let r = handshake(&mut conn, &me, kind, Some(node), auth);
                    inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
                    Dialed::Handshake(r.map(|s| Box::new((s, conn))))
                }
            };
            let _ = tx.send((node, dialed));
        });
        match spawned {
            Ok(_) => {
                self.running.insert(node);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not start a dialing thread");
                self.next_at.insert(node, Instant::now() + REDIAL_AFTER);
            }
        }
    }
}

/// Most handshakes of accepted connections in progress at once. Each runs
/// in a thread of its own, so this bounds what connections that have not
/// authenticated can hold of a node: 16 threads, 16 sockets (and one more
/// waiting for a slot), and a frame of at most `MAX_HANDSHAKE_FRAME` bytes
/// each. When all are taken and another connection arrives, the oldest
/// handshake is cut short to make room for it: an honest peer completes
/// its handshake in milliseconds, so clients that connect and stall
/// cannot keep it out.
pub const MAX_PENDING_HANDSHAKES: usize = 16;

/// How long a node we dialed waits before we dial it again after a failed
/// handshake.
const REDIAL_AFTER: Duration = Duration::from_millis(250);

/// One handshake in progress.
struct Running {
    /// A clone of its connection, to cut it short.
    conn: Conn,
    thread: std::thread::JoinHandle<()>,
    /// Set once, by whichever comes first: the handshake's end (its thread)
    /// or a cut (the joining thread). A connection whose handshake ended
    /// is never cut: it may be the real peer's.
    settled: Arc<Mutex<bool>>,
    cut: bool,
}

impl Running {
    /// Cuts the handshake short unless it has ended; returns whether it
    /// did.
    fn cut(&mut self) -> bool {
        let mut settled = self.settled.lock().unwrap_or_else(|p| p.into_inner());
        if *settled {
            return false;
        }
        *settled = true;
        self.conn.shutdown();
        self.cut = true;
        true
    }
}

/// The handshakes of accepted connections, in the order they arrived.
struct Handshakes {
    running: std::collections::VecDeque<Running>,
    /// An accepted connection waiting for a slot.
    waiting: Option<Conn>,
    done_tx: Sender<(Result<Session>, Conn)>,
    done_rx: Receiver<(Result<Session>, Conn)>,
}

impl Handshakes {
    fn new() -> Handshakes {
        let (done_tx, done_rx) = channel();
        Handshakes { running: Default::default(), waiting: None, done_tx, done_rx }
    }

    /// Starts handshakes for the connections waiting on the listener while
    /// slots are free; when none is, cuts the oldest handshake short for
    /// the next connection. Returns whether anything started.
    fn admit(&mut self, b: &Binding, me: &Identity, auth: bool, deadline: Instant) -> Result<bool> {
        // a slot is free once its thread has ended, not just answered
        self.running.retain(|r| !r.thread.is_finished());
        let mut started = false;
        loop {
            if self.running.len() >= MAX_PENDING_HANDSHAKES {
                if self.waiting.is_none() {
                    self.waiting = b.try_accept()?;
                }
                // one cut at a time: the next when that slot has freed (or
                // none when the oldest has ended anyway)
                if self.waiting.is_some() && !self.running.iter().any(|r| r.cut) {
                    if let Some(oldest) = self.running.front_mut() {
                        if oldest.cut() {
                            tracing::debug!("every handshake slot is taken: cut the oldest short");
                        }
                    }
                }
                return Ok(started);
            }
            let conn = match self.waiting.take() {
                Some(c) => c,
                None => match b.try_accept()? {
                    Some(c) => c,
                    None => return Ok(started),
                },
            };
            started = true;
            let left =
                deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), HANDSHAKE_TIMEOUT);
            let _ = conn.set_timeouts(Some(left), Some(left));
            let Ok(handle) = conn.try_clone() else {
                tracing::warn!("could not clone an accepted connection; dropping it");
                continue;
            };
            let (me, kind, tx) = (me.clone(), b.kind, self.done_tx.clone());
            let settled = Arc::new(Mutex::new(false));
            let ours = settled.clone();
            let spawned = std::thread::Builder::new().name("fabric-handshake".into()).spawn(move || {
                let mut conn = conn;
                let mut r = handshake(&mut conn, &me, kind, None, auth);
                let was_cut = std::mem::replace(&mut *ours.lock().unwrap_or_else(|p| p.into_inner()), true);
                if was_cut && r.is_ok() {
                    // cut just as it ended: the stream is shut down
                    r = Err(Error::Handshake { peer: None, reason: "cut short for a newer connection".into() });
                }
                let _ = tx.send((r, conn));
            });
            match spawned {
                Ok(thread) => self.running.push_back(Running { conn: handle, thread, settled, cut: false }),
                // the connection was moved into the closure and is closed
                Err(e) => tracing::warn!(error = %e, "could not start a handshake thread; dropped the connection"),
            }
        }
    }
}

impl Drop for Handshakes {
    /// Handshakes still running when the join ends are cut short (those
    /// that ended are left alone: their connections may be in the pod).
    fn drop(&mut self) {
        for r in &mut self.running {
            r.cut();
        }
    }
}

/// The longest one handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection attempt; None when the peer is not listening yet.
fn dial(addr: &Addr) -> Result<Option<Conn>> {
    let r = match addr {
        Addr::Tcp(a) => TcpStream::connect_timeout(a, Duration::from_secs(1)).map(|s| {
            let _ = s.set_nodelay(true);
            Conn::Tcp(s)
        }),
        Addr::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
    };
    match r {
        Ok(c) => Ok(Some(c)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::TimedOut
            ) || e.raw_os_error() == Some(libc::EHOSTUNREACH)
                || e.raw_os_error() == Some(libc::ENETUNREACH) =>
        {
            Ok(None)
        }
        Err(source) => Err(Error::Io { what: format!("connecting to {addr}"), source }),
    }
}
