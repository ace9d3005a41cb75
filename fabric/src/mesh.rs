//! Joining a pod: bind, connect every pair of nodes once (the higher id
//! dials the lower), authenticate each connection, then hand the
//! authenticated streams to the backend. Connections that have not
//! authenticated get little: at most [`MAX_PENDING_HANDSHAKES`] handshakes
//! run at once, and nothing they send or answer ends the join.

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
        // when each node we dial may be dialed again
        let mut redial_at: BTreeMap<NodeId, Instant> = BTreeMap::new();
        loop {
            let mut progressed = accepted.admit(self, me, opts.authenticate_frames, deadline)?;
            while let Ok((result, conn)) = accepted.done_rx.try_recv() {
                progressed = true;
                match result {
                    Ok(s) if want_accept.contains(&s.peer) && !conns.contains_key(&s.peer) => {
                        conns.insert(s.peer, Link::new(conn, s));
                    }
                    Ok(Session { peer, .. }) => {
                        tracing::warn!(peer, "unexpected node connected; dropping it");
                        last_refusal.note(true, format!("unexpected connection from node {peer}"));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection");
                        last_refusal.note(is_refusal(&e), e.to_string());
                    }
                }
            }
            // dial the lower ids that are still missing
            for (id, addr) in &want_dial {
                if conns.contains_key(id) || redial_at.get(id).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                let Some(mut conn) = dial(addr)? else { continue };
                progressed = true;
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), HANDSHAKE_TIMEOUT);
                let _ = conn.set_timeouts(Some(left), Some(left));
                match handshake(&mut conn, me, self.kind, Some(*id), opts.authenticate_frames) {
                    Ok(s) => {
                        conns.insert(*id, Link::new(conn, s));
                    }
                    // Whatever answered did not prove it knows the secret
                    // (a refusal, a wrong proof, junk or a broken
                    // connection): nothing before authentication may end
                    // the join. Try again shortly; the join's error names
                    // the refusal if the node never joins.
                    Err(e) => {
                        tracing::warn!(peer = id, error = %e, "handshake with a node we dialed failed; retrying");
                        last_refusal.note(is_refusal(&e), e.to_string());
                        redial_at.insert(*id, Instant::now() + REDIAL_AFTER);
                    }
                }
            }
            if conns.len() == peers.len() {
                break;
            }
            if Instant::now() >= deadline {
                let missing: Vec<String> = peers
                    .iter()
                    .filter(|(id, _)| !conns.contains_key(id))
                    .map(|(id, a)| format!("node {id} ({a})"))
                    .collect();
                let mut missing = missing.join(", ");
                // (the words of Error::WrongSecret and of the refusal a
                // peer sends for it, on either side of the handshake)
                let wrong_secret = last_refusal.text.as_deref().is_some_and(|t| t.contains("wrong pod secret"));
                if let Some(r) = last_refusal.text {
                    missing.push_str(&format!("; last refused connection: {r}"));
                }
                return Err(Error::JoinTimeout { after: opts.join_timeout, missing, wrong_secret });
            }
            if !progressed {
                // a connection waiting for a slot gets it as soon as the
                // handshake cut short for it has ended
                let nap = if accepted.waiting.is_some() { 2 } else { 20 };
                std::thread::sleep(Duration::from_millis(nap));
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

/// Whether a handshake error is an answer of the other side (as opposed to
/// a connection that broke, timed out or was cut short).
fn is_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::Version { .. }
            | Error::PodMismatch { .. }
            | Error::BackendMismatch { .. }
            | Error::WrongSecret { .. }
            | Error::FrameAuthMismatch { .. }
            | Error::Refused { .. }
    )
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
