//! shoal's fabric: how the nodes of a pod read each other's memory and
//! exchange small messages.
//!
//! One trait, [`Transport`], three backends picked at run time:
//! - [`Kind::Shm`]: peers on one host; a read is a `memcpy` from the peer's
//!   memfd, mapped read-only (the memfd crosses a Unix socket once);
//! - [`Kind::Tcp`]: anywhere; a read is served by the peer's passive
//!   responder, which only copies bytes out of an exposed region after a
//!   bounds check;
//! - [`Kind::Verbs`]: InfiniBand / RoCE / soft-RoCE; a read is an
//!   `IBV_WR_RDMA_READ` on an RC queue pair, messages are send/recv, and
//!   memory is registered lazily, chunk by chunk, when a peer first reads
//!   it: never the whole guest at once.
//!
//! Joining is two steps: [`bind`] an address (so that tests and launchers
//! can use port 0 and pass the real address on), then [`Binding::join`]
//! with the other nodes' addresses. Every connection starts with the
//! handshake of [`auth`] (version, pod id, HMAC proof of the pod secret):
//! nothing else crosses before it succeeds. Memory is exposed for remote
//! **read only**: nothing a peer receives through the fabric lets it write
//! another node's memory (shm peers get read-only descriptors). A process
//! of the same user can still reach a node's memory through the operating
//! system (`/proc/PID/mem`, `ptrace`): see the README.

pub mod auth;
pub mod framing;
mod mesh;
mod peer;
mod shm;
mod tcp;
pub mod verbs;
pub mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use vm_memory::VolatileSlice;

pub use auth::Identity;
pub use mesh::{bind, Binding, MAX_PENDING_HANDSHAKES};
pub use wire::{RegionInfo, MAX_MESSAGE, MAX_READ, PROTOCOL_VERSION};

/// A node of a pod.
pub type NodeId = u32;

/// Which backend carries the fabric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Shm = 1,
    Tcp = 2,
    Verbs = 3,
}

impl Kind {
    /// The backend for `--fabric auto`: verbs when an RDMA device is
    /// present, else shm when every node is on this host, else tcp.
    pub fn auto(all_on_this_host: bool) -> Kind {
        if verbs::device_present() {
            Kind::Verbs
        } else if all_on_this_host {
            Kind::Shm
        } else {
            Kind::Tcp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Shm => "shm",
            Kind::Tcp => "tcp",
            Kind::Verbs => "verbs",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "shm" => Ok(Kind::Shm),
            "tcp" => Ok(Kind::Tcp),
            "verbs" => Ok(Kind::Verbs),
            _ => Err(format!("unknown fabric {s:?}; use shm, tcp, verbs or auto")),
        }
    }
}

/// Where a node listens for its peers: a Unix socket path for shm, a TCP
/// address for tcp and verbs (verbs exchanges queue-pair details over it
/// and keeps it open to notice a peer that dies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Errors of the fabric. Every one names the peer when there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with {}: {reason}", peer_name(*peer))]
    Handshake { peer: Option<NodeId>, reason: String },
    #[error("{} refused us: {reason}", peer_name(*peer))]
    Refused { peer: Option<NodeId>, reason: String },
    #[error("{} speaks fabric protocol version {theirs}, this node speaks {ours}: run the same shoal on every node", peer_name(*peer))]
    Version { peer: Option<NodeId>, theirs: u16, ours: u16 },
    #[error("{} belongs to pod {theirs:?}, this node to pod {ours:?}", peer_name(*peer))]
    PodMismatch { peer: Option<NodeId>, theirs: String, ours: String },
    #[error("{} runs fabric backend {theirs}, this node runs {ours}", peer_name(*peer))]
    BackendMismatch { peer: Option<NodeId>, theirs: u8, ours: Kind },
    #[error(
        "{} {} its frames after the handshake and this node {}: set Options::authenticate_frames the same on every node",
        peer_name(*peer),
        if *theirs { "authenticates" } else { "does not authenticate" },
        if *theirs { "does not" } else { "does" }
    )]
    FrameAuthMismatch { peer: Option<NodeId>, theirs: bool },
    #[error("authentication with {} failed: wrong pod secret", peer_name(*peer))]
    WrongSecret { peer: Option<NodeId> },
    #[error("node {peer} ({addr}) and this node disagree, {times} handshakes in a row over {:.1} s: {}", over.as_secs_f64(), refusal_text(last))]
    Refusing { peer: NodeId, addr: String, times: u32, over: Duration, last: Box<Error> },
    #[error("joining the pod timed out after {after:?}: no connection with {missing}")]
    JoinTimeout {
        after: Duration,
        missing: String,
        /// The last refusal was a wrong pod secret (ours or a peer's): a
        /// misconfiguration, most likely, rather than a peer that is late.
        wrong_secret: bool,
    },
    #[error("node {0} is not a peer of this node")]
    UnknownPeer(NodeId),
    #[error("node {peer} exposes no region {region}")]
    UnknownRegion { peer: NodeId, region: u32 },
    #[error(
        "read of {len} bytes at offset {offset:#x} is outside region {region} of node {peer} ({region_len} bytes)"
    )]
    OutOfBounds { peer: NodeId, region: u32, offset: u64, len: u64, region_len: u64 },
    #[error("a read must be 1 to {max} bytes, not {len}", max = MAX_READ)]
    ReadLength { len: usize },
    #[error("a message must be at most {max} bytes, not {len}", max = MAX_MESSAGE)]
    MessageLength { len: usize },
    #[error("node {peer} cannot serve the read: {reason}")]
    Unavailable { peer: NodeId, reason: String },
    #[error(
        "a read at offset {offset:#x} of node {peer} names no key: without chunk keys a node reads only what its peer exposed"
    )]
    NoKey { peer: NodeId, offset: u64 },
    #[error("node {peer} is gone: {reason}")]
    PeerGone { peer: NodeId, reason: String },
    #[error("{what} with node {peer} timed out after {after:?}")]
    Timeout { peer: NodeId, what: &'static str, after: Duration },
    #[error("node {peer} sent a malformed frame: {reason}")]
    Protocol { peer: NodeId, reason: String },
    #[error("no RDMA device{0}")]
    NoDevice(String),
    #[error("verbs: {0}")]
    Verbs(String),
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// Whether the user's configuration is at fault (a different version,
    /// pod, backend, frame authentication or pod secret), as opposed to
    /// the network or a peer.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(
            self,
            Error::Version { .. }
                | Error::PodMismatch { .. }
                | Error::BackendMismatch { .. }
                | Error::WrongSecret { .. }
                | Error::FrameAuthMismatch { .. }
                | Error::JoinTimeout { wrong_secret: true, .. }
                // the same disagreement, handshake after handshake, at
                // the node's own address (see mesh::Streak)
                | Error::Refusing { .. }
        )
    }
}

/// What a refusal said: the peer's own words, or our verdict.
fn refusal_text(e: &Error) -> String {
    match e {
        Error::Refused { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

fn peer_name(peer: Option<NodeId>) -> String {
    match peer {
        Some(n) => format!("node {n}"),
        None => "a connecting peer".to_string(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Local memory exposed to peers for remote reads.
#[derive(Debug)]
pub struct LocalRegion {
    pub(crate) id: u32,
    pub(crate) addr: usize,
    pub(crate) len: u64,
    /// The memfd behind it (the shm backend passes it to peers).
    pub(crate) fd: Option<std::os::fd::OwnedFd>,
}

impl LocalRegion {
    /// Exposes `[addr, addr + len)` as region `id`.
    ///
    /// # Safety
    /// The memory must stay mapped and readable for as long as any
    /// transport built with this region exists. Peers read it at any time
    /// (concurrent writes by others may tear what they read, as with any
    /// guest memory).
    pub unsafe fn new(id: u32, addr: *const u8, len: u64) -> Self {
        LocalRegion { id, addr: addr as usize, len, fd: None }
    }

    /// As [`LocalRegion::new`], backed by `memfd` at offset 0 (required by
    /// the shm backend, which maps it read-only in its peers).
    ///
    /// # Safety
    /// As for [`LocalRegion::new`]; `addr` maps `memfd` from offset 0.
    pub unsafe fn with_memfd(id: u32, addr: *const u8, len: u64, memfd: std::os::fd::OwnedFd) -> Self {
        LocalRegion { id, addr: addr as usize, len, fd: Some(memfd) }
    }

    pub fn info(&self) -> RegionInfo {
        RegionInfo { id: self.id, len: self.len }
    }

    /// Copies `dst.len()` bytes at `offset` out, after the bounds check of
    /// a responder; None when out of bounds.
    pub(crate) fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(dst.len() as u64)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [offset, end) is inside the region (checked above), which
        // the creator guaranteed stays mapped. The guest may write it while
        // we copy: volatile accesses, never a reference.
        let src = unsafe { VolatileSlice::new((self.addr + offset as usize) as *mut u8, dst.len()) };
        match &self.fd {
            // a hole reads as zeros without being allocated here
            Some(fd) => {
                let copied = for_each_extent(std::os::fd::AsRawFd::as_raw_fd(fd), offset, dst.len(), |at, n, data| {
                    if data {
                        src.subslice(at, n)
                            .map_err(|e| Error::Protocol { peer: 0, reason: e.to_string() })?
                            .copy_to(&mut dst[at..at + n]);
                    } else {
                        dst[at..at + n].fill(0);
                    }
                    Ok(())
                });
                copied.ok()
            }
            None => {
                src.copy_to(dst);
                Some(())
            }
        }
    }
}

/// Splits `[offset, offset + len)` of the file `fd` into its holes and its
/// data, in order: `piece(at, n, data)` for each piece, `at` relative to
/// `offset`. A one-sided read must not change the memory it reads, and
/// reading a hole of a memfd through a mapping (shared or private) makes
/// the kernel allocate the page there (measured on this host's 6.18 and
/// Debian's 6.1): pages a node never wrote would be allocated behind its
/// counters, and a later `UFFDIO_COPY` of the page there would find it
/// present. Holes are found with `SEEK_DATA`, one call per page with data
/// (and one per hole): `SEEK_HOLE` would be one call, but the kernel walks
/// every page of the data run after `offset` to answer it (measured: 160
/// µs for a 4 KiB read of a 64 MiB memfd full of data). On an error the
/// rest counts as data (read through the mapping, as before).
pub(crate) fn for_each_extent(
    fd: std::os::fd::RawFd,
    offset: u64,
    len: usize,
    mut piece: impl FnMut(usize, usize, bool) -> Result<()>,
) -> Result<()> {
    const PAGE: u64 = 4096;
    let end = offset + len as u64;
    // where the next data at or after `from` is (`end` when none before it)
    let next_data = |from: u64| -> u64 {
        let Ok(at) = libc::off_t::try_from(from) else { return from };
        // SAFETY: lseek on a descriptor we own changes only its offset,
        // which nothing else of ours uses (reads go through mappings).
        let r = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        match u64::try_from(r) {
            Ok(d) => d.min(end),
            // ENXIO: no data at or after `from`; any other error: read it
            Err(_) if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => end,
            Err(_) => from,
        }
    };
    let mut pos = offset;
    while pos < end {
        let data = next_data(pos);
        if data > pos {
            piece((pos - offset) as usize, (data - pos) as usize, false)?;
            pos = data;
            continue;
        }
        // data at `pos`: as far as the following pages have data too
        let mut stop = ((pos / PAGE + 1) * PAGE).min(end);
        while stop < end && next_data(stop) == stop {
            stop = ((stop / PAGE + 1) * PAGE).min(end);
        }
        piece((pos - offset) as usize, (stop - pos) as usize, true)?;
        pos = stop;
    }
    Ok(())
}

/// One read of a batch, for [`Transport::read_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadReq {
    /// Region of the peer.
    pub region: u32,
    /// Offset in it.
    pub offset: u64,
    /// Bytes (1 to 2 MiB).
    pub len: usize,
    /// The key the peer gave for these bytes ([`Transport::expose`]), or
    /// 0: none (verbs then asks the peer for the key of the whole chunk
    /// around them, which registers, so pins, all of it for as long as the
    /// transport runs).
    pub key: u64,
}

/// Where read bytes go, in place: `sink(request index, offset within the
/// request, bytes)`, called one or more times per request so that the
/// calls for a request cover it exactly, in order. The bytes are a
/// [`VolatileSlice`]: over shm they are the peer's memory, which the peer
/// (its guest) may write while we look, and a `&[u8]` over memory someone
/// else writes is undefined behaviour in Rust; read them with volatile
/// copies (`copy_to`) or hand their address to the kernel.
pub type Sink<'a> = dyn FnMut(usize, usize, VolatileSlice<'_>) -> Result<()> + 'a;

/// One read of a batch, into a buffer.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// Region of the peer.
    pub region: u32,
    /// Offset in it.
    pub offset: u64,
    /// Where the bytes land (1 byte to 2 MiB).
    pub buf: &'a mut [u8],
}

/// What [`Transport::recv`] returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A message from a peer.
    Message { from: NodeId, payload: Vec<u8> },
    /// A peer left: it said goodbye, closed its connection or died.
    PeerGone { node: NodeId, reason: String },
}

/// Counters of one transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads completed (each op of a batch counts).
    pub reads: u64,
    pub bytes_read: u64,
    /// Bytes this node served to peers' reads (tcp's responder; one-sided
    /// backends cannot count them).
    pub bytes_served: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    /// verbs: chunks registered for peers' reads, and their bytes.
    pub chunks_registered: u64,
    pub bytes_registered: u64,
    /// verbs: ranges exposed ([`Transport::expose`]: each a registration)
    /// and exposures ended (each a deregistration), and the time both
    /// took, in nanoseconds.
    pub exposures: u64,
    pub exposures_ended: u64,
    pub exposure_ns: u64,
    /// Sends the peer's socket had no room for at once: they waited in a
    /// backlog that the peer's flusher thread wrote (shm, tcp, and verbs'
    /// stream frames).
    pub sends_deferred: u64,
    /// Messages a [`Tap`] took on the receiving thread (they skipped the
    /// inbox).
    pub messages_tapped: u64,
}

/// Takes messages on the thread that receives them, before the inbox
/// ([`Transport::set_tap`]): the hand-off from that thread to the one that
/// calls [`Transport::recv`] is a thread wake per message, which on a
/// small host costs more than handling most messages.
pub trait Tap: Send + Sync + fmt::Debug {
    /// A message from `from`. Messages it passes reach the inbox in their
    /// order. It runs on the backend's receiving thread for `from`: what
    /// it does delays the messages behind this one, and it must not wait
    /// for that thread.
    fn take(&self, from: NodeId, payload: &[u8]) -> Take;
}

/// What a [`Tap`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Not taken: it goes to the inbox.
    Pass,
    /// Taken here: it skips the inbox.
    Taken,
    /// Taken here, and the thread that calls [`Transport::recv`] has work
    /// now: a `recv` under way returns `None` at once (as on a timeout).
    TakenWake,
}

/// Why a peer is gone when it left in order (it said goodbye): a node
/// that ends early tells node 0 why before it goes, so its departure is
/// rarely the news.
pub const GOODBYE: &str = "said goodbye";

/// One node's connections to every other node of its pod.
pub trait Transport: Send + Sync + fmt::Debug {
    /// The backend.
    fn kind(&self) -> Kind;
    /// The backend and what it runs on, for logs ("verbs on rxe0").
    fn describe(&self) -> String {
        self.kind().to_string()
    }
    /// This node.
    fn node(&self) -> NodeId;
    /// The other nodes.
    fn peers(&self) -> Vec<NodeId>;
    /// The regions `peer` exposes.
    fn regions(&self, peer: NodeId) -> Result<Vec<RegionInfo>>;
    /// Reads from `peer`'s memory: every request is posted, then all are
    /// waited for, and the bytes are handed to `sink` where they landed
    /// (the peer's mapping for shm, the bounce buffer for verbs, the frame
    /// for tcp): a caller that moves them on (the page engine's `UFFDIO_COPY`)
    /// copies them once. Fails as a whole when any request fails.
    fn read_with(&self, peer: NodeId, reqs: &[ReadReq], sink: &mut Sink<'_>) -> Result<()>;

    /// Reads into buffers: [`Transport::read_with`] copying into each op's
    /// buffer. On failure what landed in the buffers is unspecified.
    fn read(&self, peer: NodeId, ops: &mut [ReadOp<'_>]) -> Result<()> {
        let reqs: Vec<ReadReq> =
            ops.iter().map(|o| ReadReq { region: o.region, offset: o.offset, len: o.buf.len(), key: 0 }).collect();
        self.read_with(peer, &reqs, &mut |i, at, bytes| {
            bytes.copy_to(&mut ops[i].buf[at..at + bytes.len()]);
            Ok(())
        })
    }
    /// Lets peers' one-sided reads reach `[offset, offset + len)` of our
    /// region `region` until [`Transport::unexpose`] ends it: returns the
    /// key a peer names in its [`ReadReq`]. Exposing a range that is
    /// exposed already returns its key (another length at the same offset
    /// is an error). Backends whose peers need no key
    /// (shm maps our memory, tcp's reader thread answers) return 0.
    ///
    /// Over verbs an exposure is a registration: it pins exactly those
    /// pages, which stay the ones peers read until it ends, so memory that
    /// is freed and filled again must be exposed anew (a new key).
    fn expose(&self, region: u32, offset: u64, len: u64) -> Result<u64> {
        let _ = (region, offset, len);
        Ok(0)
    }
    /// Ends every exposure that starts inside `[offset, offset + len)` of
    /// `region`, before that memory is freed. No peer may read it under
    /// the old key afterwards (over verbs such a read breaks the queue
    /// pair: the connection is lost).
    fn unexpose(&self, region: u32, offset: u64, len: u64) {
        let _ = (region, offset, len);
    }
    /// Lets `tap` take messages on this backend's receiving threads, from
    /// now on; returns whether it will (a tap is set once). A tap may read
    /// peers' memory and send. Only shm runs one: tcp's receiving thread
    /// also carries the answers to our reads (a tap that read would wait
    /// for itself), and verbs' single receiving thread reposts a peer's
    /// receive buffers only after a message is handled (with 32 of them a
    /// peer, two nodes whose taps both send could wait on each other).
    /// A tap's sends over shm never wait for the peer (what its socket has
    /// no room for waits in a backlog another thread writes), so two nodes
    /// whose taps answer each other cannot stop each other.
    fn set_tap(&self, tap: std::sync::Arc<dyn Tap>) -> bool {
        let _ = tap;
        false
    }
    /// Sends one message (at most [`MAX_MESSAGE`] bytes) to `peer`.
    fn send(&self, peer: NodeId, msg: &[u8]) -> Result<()>;
    /// The next message or departure, waiting up to `timeout`. Meant for
    /// one consuming thread: concurrent callers queue behind each other.
    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>>;
    /// Counters so far.
    fn stats(&self) -> Stats;
    /// How long since anything (a frame of any kind) came from `peer`, as
    /// its connection's reading thread saw it: whatever this node's own
    /// threads are busy with. None for an unknown peer, or a transport
    /// that does not know.
    fn quiet_for(&self, peer: NodeId) -> Option<Duration> {
        let _ = peer;
        None
    }
    /// The peer whose loss this node noticed first, and why it is gone
    /// (when one node's death makes others leave, the first is the news).
    fn first_departure(&self) -> Option<(NodeId, String)> {
        None
    }
    /// Says goodbye to every peer and stops the transport's threads.
    fn shutdown(&self);
    /// Flips one bit of the next message this transport sends, after it
    /// is tagged, as an attacker on the path would: for the conformance
    /// tests, which show that the receiver refuses it. Returns whether
    /// this transport can (verbs; tcp's tests alter bytes between the
    /// processes instead, and shm's messages travel on a Unix socket only
    /// the two processes hold).
    #[doc(hidden)]
    fn tamper_next_send(&self) -> bool {
        false
    }
}

/// Tuning and bounds of a transport.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long joining may take in all (peers start in any order).
    pub join_timeout: Duration,
    /// The longest a read or a message may wait for its peer before it is
    /// an error: a peer that hangs cannot hang us.
    pub io_timeout: Duration,
    /// verbs: device name (default: the first device).
    pub rdma_device: Option<String>,
    /// verbs: port (default 1).
    pub rdma_port: u8,
    /// verbs: GID index (default: the RoCE v2 GID of this node's address,
    /// or 0 on InfiniBand).
    pub gid_index: Option<u8>,
    /// Authenticate every frame after the handshake (HMAC-SHA256 under
    /// per-connection keys; see [`framing`]), so that an on-path attacker
    /// cannot alter messages or tcp's page data undetected. Every node of
    /// a pod must agree. **Off by default**: on tcp it cost more than the
    /// 10% the project allows a default (over three runs of `shoal-bench
    /// fabric` on a 2-CPU host, batched 4 KiB reads at 0.48–0.73× the
    /// throughput, single 4 KiB reads at 0.99–1.32× the p50;
    /// bench/results/fabric.md): HMAC-SHA256 costs about 3 µs per 4 KiB
    /// frame on each side.
    pub authenticate_frames: bool,
    /// verbs: grant a peer the key of a whole 2 MiB chunk when it reads
    /// with no key ([`ReadReq::key`] 0). The registration pins the chunk
    /// for the transport's life: a user that exposes what peers may read
    /// (a pod's page engine) turns this off, so that no peer can pin
    /// memory it was not given: its keyless reads are refused, and this
    /// node's own keyless reads are errors ([`Error::NoKey`]) without
    /// asking.
    pub chunk_keys: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            join_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(2),
            rdma_device: None,
            rdma_port: 1,
            gid_index: None,
            authenticate_frames: false,
            chunk_keys: true,
        }
    }
}

pub(crate) fn check_bounds(peer: NodeId, regions: &[RegionInfo], op: &ReadReq) -> Result<()> {
    if op.len == 0 || op.len > MAX_READ {
        return Err(Error::ReadLength { len: op.len });
    }
    let r = regions.iter().find(|r| r.id == op.region).ok_or(Error::UnknownRegion { peer, region: op.region })?;
    let len = op.len as u64;
    if op.offset.checked_add(len).is_none_or(|end| end > r.len) {
        return Err(Error::OutOfBounds { peer, region: op.region, offset: op.offset, len, region_len: r.len });
    }
    Ok(())
}
