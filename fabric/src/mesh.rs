//! Joining a pod: bind, connect every pair of nodes once (the higher id
//! dials the lower), authenticate each connection, then hand the
//! authenticated streams to the backend.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::auth::{handshake, Identity, Session};
use crate::framing::{Opener, Sealer};
use crate::wire::{Frame, StreamError};
use crate::{Addr, Error, Kind, LocalRegion, NodeId, Options, Result, Transport};

/// An authenticated connection to one peer: the stream and how frames are
/// sealed on it in each direction (see [`crate::framing`]).
#[derive(Debug)]
pub(crate) struct Link {
    pub conn: Conn,
    pub sealer: Sealer,
    pub opener: Opener,
}

impl Link {
    fn new(conn: Conn, session: Session) -> Link {
        Link { conn, sealer: session.sealer, opener: session.opener }
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
        let mut last_refusal: Option<String> = None;
        // Handshakes of accepted connections run in their own threads, each
        // bounded: a client that connects and says nothing cannot hold up
        // the real peers, and one that says the wrong thing cannot abort
        // the join (it is refused and remembered for the error message).
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(Result<Session>, Conn)>();
        loop {
            let mut progressed = false;
            while let Some(conn) = self.try_accept()? {
                progressed = true;
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), HANDSHAKE_TIMEOUT);
                let _ = conn.set_timeouts(Some(left), Some(left));
                let (me, kind, tx, auth) = (me.clone(), self.kind, done_tx.clone(), opts.authenticate_frames);
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let r = handshake(&mut conn, &me, kind, None, auth);
                    let _ = tx.send((r, conn));
                });
            }
            while let Ok((result, conn)) = done_rx.try_recv() {
                progressed = true;
                match result {
                    Ok(s) if want_accept.contains(&s.peer) && !conns.contains_key(&s.peer) => {
                        conns.insert(s.peer, Link::new(conn, s));
                    }
                    Ok(Session { peer, .. }) => {
                        tracing::warn!(peer, "unexpected node connected; dropping it");
                        last_refusal = Some(format!("unexpected connection from node {peer}"));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection");
                        last_refusal = Some(e.to_string());
                    }
                }
            }
            // dial the lower ids that are still missing
            for (id, addr) in &want_dial {
                if conns.contains_key(id) {
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
                    // the node we dialed disagrees with us: a clear error now
                    Err(e) if is_config_mismatch(&e) => return Err(e),
                    // a connection that broke: try again
                    Err(e) => {
                        tracing::debug!(peer = id, error = %e, "handshake failed; retrying");
                        last_refusal = Some(e.to_string());
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
                if let Some(r) = last_refusal {
                    missing.push_str(&format!("; last refused connection: {r}"));
                }
                return Err(Error::JoinTimeout { after: opts.join_timeout, missing });
            }
            if !progressed {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for c in conns.values() {
            c.conn
                .set_timeouts(Some(opts.join_timeout), Some(opts.io_timeout))
                .map_err(|source| Error::Io { what: "setting socket timeouts".into(), source })?;
        }
        Ok(conns)
    }

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
            Ok(Err(source)) | Err(source) if source.kind() != io::ErrorKind::WouldBlock => {
                Err(Error::Io { what: "accepting a peer".into(), source })
            }
            _ => Ok(None),
        }
    }
}

/// The longest one handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a handshake error with a node we dialed means the two of us
/// are configured differently (as opposed to a connection that broke).
fn is_config_mismatch(e: &Error) -> bool {
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
