//! The verbs backend: InfiniBand, RoCE and soft-RoCE (rxe).
//!
//! - One RC queue pair per peer. Reads are `IBV_WR_RDMA_READ`s into a
//!   registered bounce buffer (then copied to the caller's buffer, which is
//!   not registered); messages are SEND/RECV with receive buffers posted
//!   ahead and a thread that waits on a completion channel.
//! - Memory a peer reads is registered lazily, in chunks of [`CHUNK`]
//!   bytes, when the peer first asks for the chunk's key (`KeyRequest` on
//!   the setup stream, answered with `KeyGrant`); keys are cached on both
//!   sides. The whole guest is never registered (pinned) at once. Devices
//!   with on-demand paging would not need this; rxe on Linux 6.1 reports
//!   none (its `rc_odp_caps` are empty), so we do not depend on it.
//! - The TCP stream used to set up the queue pair stays open: it carries
//!   key requests and tells us at once when a peer's process dies.
//! - A user that knows which memory its peers may read exposes just that
//!   ([`Transport::expose`]: the page engine, a page it offers or parks):
//!   one registration per exposure, named by an address of its own
//!   ([`EXPOSED_IOVA`] + offset) and the key that travels in the user's
//!   messages; it ends (deregistered, unpinned) before the memory is
//!   freed. Then a registration pins nothing but what is exposed, and
//!   memory freed and filled again is registered anew: the peers read the
//!   pages that are there now. Such a user turns chunk keys off
//!   ([`crate::Options::chunk_keys`]): a peer's `KeyRequest` is refused,
//!   so no peer can pin memory it was not given. (With on-demand paging,
//!   which mlx5 offers and rxe does not, one registration of everything
//!   would do; we do not depend on it.)
//! - Memory is registered REMOTE_READ only: no peer can write ours.
//! - With frames authenticated, every message (SEND) carries a tag under
//!   the connection's message key ([`crate::framing::MessageSealer`]); a
//!   message whose tag fails disconnects its sender. Page bytes, read by
//!   one-sided RDMA READs, carry none.

mod ffi;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

use crate::framing::{MessageOpener, MessageSealer, TAG_LEN};
use crate::mesh::Link;
use crate::peer::{stream_error, wait_answers, Core, Counters, Handler, Peer};
use crate::wire::{Frame, ReadFailure, VerbsEndpoint, MAX_MESSAGE};
use crate::{
    check_bounds, Error, Incoming, Kind, LocalRegion, NodeId, Options, ReadReq, Result, Sink, Stats, Transport,
};
use ffi::{Buffer, CompChannel, Context, Cq, Mr, Path, Pd, PollBuf, PostBuf, Qp, ReadWr};

pub use ffi::device_names;

/// Bytes per lazily registered chunk: part of the protocol (a `KeyRequest`
/// names chunk `c`, the bytes `[c * CHUNK, (c + 1) * CHUNK)` of a region).
/// One fault-around block: the page engine makes memory resident in such
/// blocks,
/// so registering a chunk rarely pins pages that are not resident already.
pub const CHUNK: u64 = 2 << 20;
/// Where an exposure starts in the address space peers' reads name
/// (registered with this I/O virtual address + its offset in the region):
/// a peer needs no address of ours, only the key.
const EXPOSED_IOVA: u64 = 1 << 40;
/// Set in every exposure's key (the rkey is the low 32 bits): 0 is no key.
const EXPOSED_KEY: u64 = 1 << 32;
/// Bounce buffer per peer: two full-size reads.
const STAGING: usize = 2 * crate::MAX_READ;
/// Receive buffers posted per peer.
const RECV_DEPTH: usize = 32;
/// Bytes of one message buffer: the longest message and its tag.
const SLOT: usize = MAX_MESSAGE + TAG_LEN;
/// Work requests per post: bounded by the send queue.
const MAX_WRS: usize = 128;
const SEND_QUEUE: u32 = 256;
const IBV_PORT_ACTIVE: u32 = 4;

/// Whether this machine has an RDMA device.
pub fn device_present() -> bool {
    !ffi::device_names().is_empty()
}

/// Local regions, registered chunk by chunk when peers ask.
///
/// Chunks (for keyless reads) stay registered, so pinned, until the
/// transport shuts down, and registering one materialises the holes in it:
/// why the page engine exposes pages instead and turns chunk keys off.
/// `ibv_reg_mr` runs under the chunk-map or exposure-map lock (other
/// registrations wait for it).
#[derive(Debug)]
struct Exposer {
    pd: Arc<Pd>,
    local: Arc<Vec<LocalRegion>>,
    chunks: Mutex<HashMap<(u32, u64), Mr>>,
    /// Exposures by (region, offset): their length and registration.
    exposed: Mutex<BTreeMap<(u32, u64), (u64, Mr)>>,
    counters: Arc<Counters>,
}

impl Exposer {
    fn expose(&self, region: u32, offset: u64, len: u64) -> Result<u64> {
        let r = self
            .local
            .iter()
            .find(|r| r.id == region)
            .ok_or_else(|| Error::Verbs(format!("exposing memory of region {region}, which is not ours")))?;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > r.len) {
            return Err(Error::Verbs(format!(
                "exposing {len} bytes at {offset} of region {region}, which has {} bytes",
                r.len
            )));
        }
        let mut exposed = self.exposed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((l, mr)) = exposed.get(&(region, offset)) {
            if *l != len {
                return Err(Error::Verbs(format!("{offset} of region {region} is exposed already, {l} bytes long")));
            }
            return Ok(EXPOSED_KEY | u64::from(mr.rkey()));
        }
        let t0 = Instant::now();
        // SAFETY: the range lies inside the region, which its creator
        // keeps mapped for the transport's lifetime; REMOTE_READ lets peers
        // read it and nothing write it.
        let mr = unsafe {
            Mr::register_at(&self.pd, (r.addr + offset as usize) as *mut u8, len as usize, EXPOSED_IOVA + offset, {
                ffi::ACCESS_REMOTE_READ
            })
        }?;
        let key = EXPOSED_KEY | u64::from(mr.rkey());
        exposed.insert((region, offset), (len, mr));
        self.counters.exposures.fetch_add(1, Ordering::Relaxed);
        self.counters.exposure_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(key)
    }

    fn unexpose(&self, region: u32, offset: u64, len: u64) {
        let mut exposed = self.exposed.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset.saturating_add(len);
        let gone: Vec<(u32, u64)> = exposed.range((region, offset)..(region, end)).map(|(k, _)| *k).collect();
        if gone.is_empty() {
            return;
        }
        let t0 = Instant::now();
        for k in &gone {
            exposed.remove(k);
        }
        self.counters.exposures_ended.fetch_add(gone.len() as u64, Ordering::Relaxed);
        self.counters.exposure_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn grant(&self, region: u32, chunk: u64) -> std::result::Result<(u64, u32), ReadFailure> {
        let r = self.local.iter().find(|r| r.id == region).ok_or(ReadFailure::UnknownRegion)?;
        let start = chunk.checked_mul(CHUNK).filter(|s| *s < r.len).ok_or(ReadFailure::OutOfBounds)?;
        let len = CHUNK.min(r.len - start);
        let addr = r.addr as u64 + start;
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mr) = chunks.get(&(region, chunk)) {
            return Ok((addr, mr.rkey()));
        }
        // SAFETY: the chunk lies inside the region, which its creator keeps
        // mapped for the transport's lifetime; REMOTE_READ lets peers read
        // it and nothing write it.
        let mr =
            unsafe { Mr::register(&self.pd, addr as *mut u8, len as usize, ffi::ACCESS_REMOTE_READ) }.map_err(|e| {
                tracing::warn!(region, chunk, error = %e, "cannot register a chunk for a peer's read");
                ReadFailure::Unavailable
            })?;
        let rkey = mr.rkey();
        chunks.insert((region, chunk), mr);
        self.counters.chunks_registered.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_registered.fetch_add(len, Ordering::Relaxed);
        Ok((addr, rkey))
    }
}

/// Answers key requests (refused when [`crate::Options::chunk_keys`] is off).
struct KeyServer {
    exposer: Arc<Exposer>,
    grant: bool,
}

impl Handler for KeyServer {
    fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()> {
        match frame {
            Frame::KeyRequest { tag, region, chunk } => {
                let granted =
                    if self.grant { self.exposer.grant(region, chunk) } else { Err(ReadFailure::Unavailable) };
                let reply = match granted {
                    Ok((addr, rkey)) => Frame::KeyGrant { tag, region, chunk, addr, rkey },
                    Err(failure) => Frame::ReadError { tag, failure },
                };
                if let Err(e) = peer.write(&[reply]) {
                    tracing::debug!(peer = peer.id, error = %e, "could not answer a key request");
                }
                Ok(())
            }
            other => {
                Err(Error::Protocol { peer: peer.id, reason: format!("unexpected {} frame on verbs", other.name()) })
            }
        }
    }
}

/// Where a peer's chunk is and the key to read it.
#[derive(Clone, Copy, Debug)]
struct RemoteKey {
    addr: u64,
    rkey: u32,
}

/// The keys a peer granted for one of its regions, by chunk.
#[derive(Debug)]
struct RegionKeys {
    region: u32,
    chunks: Vec<Option<RemoteKey>>,
}

/// A part of a read request inside one chunk: one RDMA READ.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Index of the request.
    req: usize,
    /// Offset of this piece within the request.
    at: usize,
    region: u32,
    /// Offset in the peer's region.
    offset: u64,
    len: u32,
    /// The exposure's key its request named (0: the chunk's).
    key: u64,
}

impl Piece {
    fn chunk(&self) -> u64 {
        self.offset / CHUNK
    }
}

/// What only one thread at a time may do with a peer's send queue.
#[derive(Debug)]
struct SendSide {
    // each MR is declared (so dropped) before the buffer it registers
    staging_mr: Mr,
    staging: Buffer,
    msg_mr: Mr,
    msg: Buffer,
    /// Granted keys: a short list of regions, each indexed by chunk. Not
    /// a hash: this is on every read's path, and under soft-RoCE on TCG
    /// hashing showed up in the latency.
    keys: Vec<RegionKeys>,
    next_wr: u64,
    // scratch space reused by every read (the hot path allocates nothing)
    polled: PollBuf,
    posting: PostBuf,
    pieces: Vec<Piece>,
    posts: Vec<ReadWr>,
    /// Set once the queue pair failed: it stays in ERROR.
    broken: Option<String>,
    /// Tags our messages to this peer.
    sealer: MessageSealer,
}

#[derive(Debug)]
struct VerbsPeer {
    id: NodeId,
    qp: Qp,
    send_cq: Arc<Cq>,
    send: Mutex<SendSide>,
    _recv_mr: Mr,
    recv_buf: Buffer,
    recv_lkey: u32,
    /// Checks the tags of this peer's messages (the receive thread's).
    opener: Mutex<MessageOpener>,
}

#[derive(Debug)]
pub(crate) struct VerbsTransport {
    core: Arc<Core>,
    peers: BTreeMap<NodeId, Arc<VerbsPeer>>,
    exposer: Arc<Exposer>,
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    rx_thread: Mutex<Option<JoinHandle<()>>>,
    device: String,
    _recv_cq: Arc<Cq>,
    /// Alter the next SEND after tagging it ([`Transport::tamper_next_send`]).
    tamper: AtomicBool,
    /// [`crate::Options::chunk_keys`]: off, a read names an exposure's key
    /// (a peer would refuse the chunk key a keyless read asks for: this
    /// node refuses such a read itself, without asking).
    chunk_keys: bool,
}

fn ipv4_mapped_gid(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The GID index to use from address `ip`: the RoCE v2 GID of that address
/// (a RoCE v1 one if that is all there is).
fn find_gid(ctx: &Context, port: u8, tbl_len: i32, ip: IpAddr) -> Result<u8> {
    let want = ipv4_mapped_gid(ip);
    let mut v1 = None;
    for i in 0..tbl_len.min(256) {
        let Ok(gid) = ctx.query_gid(port, i) else { continue };
        if gid != want {
            continue;
        }
        match ctx.gid_type(port, i).as_deref() {
            Some("RoCE v2") | None => return Ok(i as u8),
            _ => v1 = v1.or(Some(i as u8)),
        }
    }
    v1.ok_or_else(|| {
        Error::Verbs(format!(
            "device {} port {port} has no GID for {ip}: is the RDMA device on the interface of that address? \
             (or pass a GID index)",
            ctx.name
        ))
    })
}

impl SendSide {
    /// The queue pair failed (a failed completion, a timeout, a dead
    /// peer): flush it so that no late completion writes our buffers, and
    /// remember why; every later operation fails with it.
    fn break_qp(&mut self, vp: &VerbsPeer, why: String) {
        vp.qp.set_error();
        self.broken = Some(why);
    }

    fn key(&self, region: u32, chunk: u64) -> Option<RemoteKey> {
        let keys = self.keys.iter().find(|k| k.region == region)?;
        keys.chunks.get(chunk as usize).copied().flatten()
    }

    fn set_key(&mut self, region: u32, chunk: u64, key: RemoteKey) {
        let at = match self.keys.iter().position(|k| k.region == region) {
            Some(at) => at,
            None => {
                self.keys.push(RegionKeys { region, chunks: Vec::new() });
                self.keys.len() - 1
            }
        };
        let chunks = &mut self.keys[at].chunks;
        if chunks.len() <= chunk as usize {
            chunks.resize(chunk as usize + 1, None);
        }
        chunks[chunk as usize] = Some(key);
    }
}

impl VerbsTransport {
    pub fn start(
        node: NodeId,
        mut conns: BTreeMap<NodeId, Link>,
        local: Vec<LocalRegion>,
        opts: &Options,
    ) -> Result<Self> {
        let ctx = Context::open(opts.rdma_device.as_deref())?;
        let port = opts.rdma_port;
        let pinfo = ctx.query_port(port)?;
        if pinfo.state != IBV_PORT_ACTIVE {
            return Err(Error::Verbs(format!("port {port} of {} is not active (state {})", ctx.name, pinfo.state)));
        }
        let global = pinfo.link_layer == ffi::LINK_LAYER_ETHERNET;
        if pinfo.link_layer == ffi::LINK_LAYER_INFINIBAND && pinfo.lid == 0 {
            return Err(Error::Verbs(format!(
                "port {port} of {} has no LID: is a subnet manager (opensm) running on the fabric?",
                ctx.name
            )));
        }
        let pd = Pd::new(&ctx)?;
        let channel = CompChannel::new(&ctx)?;
        let recv_cq = Cq::new(&ctx, (RECV_DEPTH * conns.len().max(1) + 16) as i32, Some(&channel))?;
        let counters_for_exposer = Arc::new(Counters::default());
        let local = Arc::new(local);

        // one queue pair per peer, and our end of it
        let mut setup = BTreeMap::new();
        for (id, conn) in &conns {
            let send_cq = Cq::new(&ctx, SEND_QUEUE as i32 + 16, None)?;
            let qp = Qp::new_rc(&pd, &send_cq, &recv_cq, SEND_QUEUE, RECV_DEPTH as u32)?;
            let sgid_index = match (opts.gid_index, global) {
                (Some(i), _) => i,
                (None, true) => {
                    let ip = conn
                        .conn
                        .local_ip()
                        .ok_or_else(|| Error::Config("verbs needs TCP addresses to find its GID".into()))?;
                    find_gid(&ctx, port, pinfo.gid_tbl_len, ip)?
                }
                (None, false) => 0,
            };
            let gid = ctx.query_gid(port, i32::from(sgid_index))?;
            let mut psn = [0u8; 4];
            let _ = getrandom::getrandom(&mut psn);
            let psn = u32::from_le_bytes(psn) & 0x00ff_ffff;
            let me = VerbsEndpoint { qpn: qp.qpn(), psn, lid: pinfo.lid, gid, mtu: pinfo.active_mtu as u8 };
            setup.insert(*id, (qp, send_cq, sgid_index, me));
        }

        let regions = Core::exchange_regions(&mut conns, &local)?;
        for (id, c) in conns.iter_mut() {
            let me = setup[id].3;
            c.write_frame(&Frame::Verbs(me))
                .map_err(|e| Error::PeerGone { peer: *id, reason: format!("sending queue-pair details: {e}") })?;
        }
        let mut peers = BTreeMap::new();
        for (id, c) in conns.iter_mut() {
            let remote = match c.read_frame() {
                Ok(Frame::Verbs(v)) => v,
                Ok(other) => {
                    return Err(Error::Protocol { peer: *id, reason: format!("expected Verbs, got {}", other.name()) })
                }
                Err(e) => return Err(stream_error(*id, "waiting for queue-pair details", e)),
            };
            let (qp, send_cq, sgid_index, me) = setup.remove(id).expect("set up above");
            let path = Path { port, sgid_index, global, mtu: pinfo.active_mtu };
            qp.connect(&path, me.psn, &remote)?;
            let staging = Buffer::new(STAGING)?;
            // SAFETY: our own buffers, alive as long as their MRs (both are
            // fields of the same peer, and each MR is dropped first).
            let staging_mr = unsafe { Mr::register(&pd, staging.as_ptr(), staging.len(), ffi::ACCESS_LOCAL_WRITE)? };
            let msg = Buffer::new(SLOT)?;
            // SAFETY: as above.
            let msg_mr = unsafe { Mr::register(&pd, msg.as_ptr(), msg.len(), ffi::ACCESS_LOCAL_WRITE)? };
            let recv_buf = Buffer::new(RECV_DEPTH * SLOT)?;
            // SAFETY: as above.
            let recv_mr = unsafe { Mr::register(&pd, recv_buf.as_ptr(), recv_buf.len(), ffi::ACCESS_LOCAL_WRITE)? };
            let recv_lkey = recv_mr.lkey();
            for i in 0..RECV_DEPTH {
                // SAFETY: slot i of the registered receive buffer, not
                // touched until its completion.
                unsafe { qp.post_recv(i as u64, recv_buf.addr() + (i * SLOT) as u64, SLOT as u32, recv_lkey)? };
            }
            let send = SendSide {
                staging_mr,
                staging,
                msg_mr,
                msg,
                keys: Vec::new(),
                next_wr: 1,
                polled: PollBuf::new(16),
                posting: PostBuf::default(),
                pieces: Vec::new(),
                posts: Vec::new(),
                broken: None,
                sealer: std::mem::replace(&mut c.msg_sealer, MessageSealer::new(None)),
            };
            let opener = Mutex::new(std::mem::replace(&mut c.msg_opener, MessageOpener::new(None)));
            peers.insert(
                *id,
                Arc::new(VerbsPeer {
                    id: *id,
                    qp,
                    send_cq,
                    send: Mutex::new(send),
                    _recv_mr: recv_mr,
                    recv_buf,
                    recv_lkey,
                    opener,
                }),
            );
        }
        Core::ready(&mut conns)?;

        let exposer = Arc::new(Exposer {
            pd: pd.clone(),
            local: local.clone(),
            chunks: Mutex::new(HashMap::new()),
            exposed: Mutex::new(BTreeMap::new()),
            counters: counters_for_exposer,
        });
        let server = Arc::new(KeyServer { exposer: exposer.clone(), grant: opts.chunk_keys });
        // the core keeps its own list of regions for bookkeeping; the
        // exposer serves them (both see the same memory)
        let core = Core::start(node, conns, regions, Vec::new(), opts.io_timeout, |_| server)?;

        // from here on a failure must stop the core's threads
        let fail = |core: &Core, e: Error| {
            core.shutdown();
            e
        };
        // SAFETY: eventfd takes flags only and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            let e = Error::Io { what: "creating an eventfd".into(), source: std::io::Error::last_os_error() };
            return Err(fail(&core, e));
        }
        // SAFETY: a fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop = Arc::new(AtomicBool::new(false));
        recv_cq.req_notify().map_err(|e| fail(&core, e))?;
        let core_for_errors = core.clone();
        let rx = {
            let core = core.clone();
            let peers = peers.clone();
            let cq = recv_cq.clone();
            let stop = stop.clone();
            let wake_fd = wake.as_raw_fd();
            std::thread::Builder::new()
                .name("fabric-verbs-rx".into())
                .spawn(move || receive_loop(&core, &peers, &cq, &channel, &stop, wake_fd))
                .map_err(|source| {
                    fail(&core_for_errors, Error::Io { what: "starting the verbs receive thread".into(), source })
                })?
        };
        Ok(VerbsTransport {
            core,
            peers,
            exposer,
            stop,
            wake,
            rx_thread: Mutex::new(Some(rx)),
            device: ctx.name.clone(),
            _recv_cq: recv_cq,
            tamper: AtomicBool::new(false),
            chunk_keys: opts.chunk_keys,
        })
    }

    fn peer(&self, id: NodeId) -> Result<(&Arc<Peer>, &Arc<VerbsPeer>)> {
        Ok((self.core.peer(id)?, self.peers.get(&id).ok_or(Error::UnknownPeer(id))?))
    }

    /// Asks `peer` for the keys of the chunks it has not granted us yet.
    fn fetch_keys(&self, p: &Peer, side: &mut SendSide, want: &[(u32, u64)]) -> Result<()> {
        let mut missing: Vec<(u32, u64)> = want.iter().copied().filter(|&(r, c)| side.key(r, c).is_none()).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let tags = self.core.tags(missing.len());
        let rx = p.expect(&tags);
        let frames: Vec<Frame> = missing
            .iter()
            .zip(&tags)
            .map(|(&(region, chunk), &tag)| Frame::KeyRequest { tag, region, chunk })
            .collect();
        if let Err(e) = p.write(&frames) {
            p.forget(&tags);
            return Err(e);
        }
        let peer = p.id;
        wait_answers(p, &rx, &tags, self.core.io_timeout, "a key request", |i, frame| match frame {
            Frame::KeyGrant { region, chunk, addr, rkey, .. } if (region, chunk) == missing[i] => {
                side.set_key(region, chunk, RemoteKey { addr, rkey });
                Ok(())
            }
            Frame::ReadError { failure, .. } => Err(Error::Unavailable {
                peer,
                reason: format!("refused the key of region {} chunk {}: {failure:?}", missing[i].0, missing[i].1),
            }),
            other => Err(Error::Protocol { peer, reason: format!("answered a key request with {}", other.name()) }),
        })
    }

    fn read_pieces(
        &self,
        p: &Peer,
        vp: &VerbsPeer,
        side: &mut SendSide,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        if pieces.iter().any(|pc| pc.key == 0 && side.key(pc.region, pc.chunk()).is_none()) {
            let chunks: Vec<(u32, u64)> =
                pieces.iter().filter(|pc| pc.key == 0).map(|pc| (pc.region, pc.chunk())).collect();
            self.fetch_keys(p, side, &chunks)?;
        }
        let mut bytes = 0u64;
        let mut start = 0;
        let mut posts = std::mem::take(&mut side.posts);
        while start < pieces.len() {
            // a round: as many pieces as fit the bounce buffer and the queue
            let mut used = 0usize;
            let mut end = start;
            while end < pieces.len() && end - start < MAX_WRS && used + pieces[end].len as usize <= STAGING {
                used += pieces[end].len as usize;
                end += 1;
            }
            let base = side.staging.addr();
            let lkey = side.staging_mr.lkey();
            posts.clear();
            let mut at = 0u64;
            for pc in &pieces[start..end] {
                let (remote, rkey) = if pc.key != 0 {
                    (EXPOSED_IOVA + pc.offset, pc.key as u32)
                } else {
                    let key = side.key(pc.region, pc.chunk()).expect("keys fetched above");
                    (key.addr + pc.offset % CHUNK, key.rkey)
                };
                posts.push(ReadWr { wr_id: side.next_wr, local: base + at, len: pc.len, lkey, remote, rkey });
                side.next_wr += 1;
                at += u64::from(pc.len);
            }
            // SAFETY: every local range is inside the registered bounce
            // buffer, which nothing touches until the completions are in
            // (or the queue pair is flushed to ERROR on failure).
            if let Err(e) = unsafe { vp.qp.post_reads(&posts, &mut side.posting) } {
                side.break_qp(vp, e.to_string());
                self.lose(p, &e.to_string());
                side.posts = posts;
                return Err(e);
            }
            if let Err(e) = self.wait_completions(p, vp, side, posts.len()) {
                side.posts = posts;
                return Err(e);
            }
            let mut at = 0usize;
            for pc in &pieces[start..end] {
                let n = pc.len as usize;
                // SAFETY: the reads into [at, at + n) of the bounce buffer
                // completed (the device writes no more of it until the next
                // post); the buffer is ours and outlives the call.
                let src = unsafe { VolatileSlice::new(side.staging.as_ptr().add(at), n) };
                if let Err(e) = sink(pc.req, pc.at, src) {
                    side.posts = posts;
                    return Err(e);
                }
                at += n;
                bytes += n as u64;
            }
            start = end;
        }
        side.posts = posts;
        self.core.count_reads(0, bytes);
        Ok(())
    }

    /// A peer whose queue pair broke is lost: there is no reconnecting an
    /// RC queue pair in place. Report it gone (once, through the inbox) and
    /// close its stream, so that it learns the same about us.
    fn lose(&self, p: &Peer, why: &str) {
        self.core.peer_gone(p, &format!("its queue pair failed: {why}"));
        p.shutdown();
    }

    /// Waits for `n` completions of work requests `first..first + n`,
    /// busy-polling (latency matters more than a core here).
    fn wait_completions(&self, p: &Peer, vp: &VerbsPeer, side: &mut SendSide, n: usize) -> Result<()> {
        let timeout = self.core.io_timeout;
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        let mut spins = 0u32;
        while done < n {
            let got = vp.send_cq.poll(&mut side.polled)?;
            for i in 0..got {
                let wc = side.polled.get(i);
                if !wc.ok() {
                    let why = format!("work request failed: {}", wc.status_text());
                    side.break_qp(vp, why.clone());
                    self.lose(p, &why);
                    return Err(Error::PeerGone { peer: vp.id, reason: why });
                }
                done += 1;
            }
            if got == 0 {
                spins += 1;
                if spins.is_multiple_of(1024) {
                    // a dead peer or a timeout: flush what is outstanding so
                    // no late completion writes the bounce buffer we reuse
                    let failure = p.check_alive().err().or_else(|| {
                        (Instant::now() >= deadline).then_some(Error::Timeout {
                            peer: vp.id,
                            what: "an RDMA operation",
                            after: timeout,
                        })
                    });
                    if let Some(e) = failure {
                        side.break_qp(vp, e.to_string());
                        self.lose(p, &e.to_string());
                        return Err(e);
                    }
                    std::thread::yield_now();
                }
            }
        }
        Ok(())
    }
}

fn receive_loop(
    core: &Core,
    peers: &BTreeMap<NodeId, Arc<VerbsPeer>>,
    cq: &Cq,
    channel: &CompChannel,
    stop: &AtomicBool,
    wake_fd: i32,
) {
    let by_qpn: HashMap<u32, &Arc<VerbsPeer>> = peers.values().map(|p| (p.qp.qpn(), p)).collect();
    let mut polled = PollBuf::new(16);
    loop {
        let mut fds = [
            libc::pollfd { fd: channel.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two live pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        if stop.load(Ordering::Acquire) {
            return;
        }
        if channel.take_event() {
            // re-arm before draining, so that nothing arriving in between
            // is missed
            if let Err(e) = cq.req_notify() {
                tracing::error!(error = %e, "cannot re-arm the receive queue");
            }
        }
        loop {
            let got = cq.poll(&mut polled).unwrap_or(0);
            if got == 0 {
                break;
            }
            for wc in (0..got).map(|i| polled.get(i)) {
                let Some(vp) = by_qpn.get(&wc.qp_num) else { continue };
                if !wc.ok() {
                    // flushed at shutdown, or the queue pair failed: the
                    // setup stream reports the peer's departure
                    tracing::debug!(peer = vp.id, status = %wc.status_text(), "receive completion with error");
                    continue;
                }
                let slot = wc.wr_id as usize;
                if slot >= RECV_DEPTH {
                    continue;
                }
                let addr = vp.recv_buf.addr() + (slot * SLOT) as u64;
                let len = (wc.byte_len as usize).min(SLOT);
                // SAFETY: the device wrote `byte_len` bytes into this slot
                // of our registered buffer and completed; it is ours until
                // we post it again below.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                match vp.opener.lock().unwrap_or_else(|p| p.into_inner()).open(bytes) {
                    Ok(msg) => core.deliver(vp.id, msg.to_vec()),
                    // altered, replayed or injected: the peer is cut off
                    // (every later message of it fails too: the count
                    // stays where the forgery broke it)
                    Err(e) => {
                        if let Ok(p) = core.peer(vp.id) {
                            tracing::warn!(peer = vp.id, error = %e, "disconnecting a peer whose message failed authentication");
                            core.peer_gone(p, &format!("its {e}; disconnected it"));
                        }
                    }
                }
                // SAFETY: the slot is free again (its bytes are copied).
                if let Err(e) = unsafe { vp.qp.post_recv(wc.wr_id, addr, SLOT as u32, vp.recv_lkey) } {
                    tracing::warn!(peer = vp.id, error = %e, "cannot repost a receive buffer");
                }
            }
        }
    }
}

impl Transport for VerbsTransport {
    fn kind(&self) -> Kind {
        Kind::Verbs
    }

    fn describe(&self) -> String {
        format!("verbs on {}", self.device)
    }

    fn node(&self) -> NodeId {
        self.core.node
    }

    fn peers(&self) -> Vec<NodeId> {
        self.core.peer_ids()
    }

    fn regions(&self, peer: NodeId) -> Result<Vec<crate::RegionInfo>> {
        self.core.peer_regions(peer)
    }

    fn read_with(&self, peer: NodeId, reqs: &[ReadReq], sink: &mut Sink<'_>) -> Result<()> {
        let (p, vp) = self.peer(peer)?;
        for r in reqs {
            check_bounds(peer, &p.regions, r)?;
            if r.key != 0 && r.key & !u64::from(u32::MAX) != EXPOSED_KEY {
                return Err(Error::Protocol { peer, reason: format!("{:#x} is not a key of an exposure", r.key) });
            }
            if r.key == 0 && !self.chunk_keys {
                return Err(Error::NoKey { peer, offset: r.offset });
            }
        }
        p.check_alive()?;
        let mut guard = vp.send.lock().unwrap_or_else(|e| e.into_inner());
        let side = &mut *guard;
        if let Some(why) = &side.broken {
            return Err(Error::PeerGone { peer, reason: why.clone() });
        }
        // split every request at chunk boundaries
        let mut pieces = std::mem::take(&mut side.pieces);
        pieces.clear();
        for (i, r) in reqs.iter().enumerate() {
            let mut off = 0u64;
            let len = r.len as u64;
            while off < len {
                let at = r.offset + off;
                let n = (CHUNK - at % CHUNK).min(len - off);
                pieces.push(Piece {
                    req: i,
                    at: off as usize,
                    region: r.region,
                    offset: at,
                    len: n as u32,
                    key: r.key,
                });
                off += n;
            }
        }
        let result = self.read_pieces(p, vp, side, &pieces, sink);
        side.pieces = pieces;
        if result.is_ok() {
            self.core.count_reads(reqs.len(), 0);
        }
        result
    }

    fn expose(&self, region: u32, offset: u64, len: u64) -> Result<u64> {
        self.exposer.expose(region, offset, len)
    }

    fn unexpose(&self, region: u32, offset: u64, len: u64) {
        self.exposer.unexpose(region, offset, len)
    }

    fn send(&self, peer: NodeId, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_MESSAGE {
            return Err(Error::MessageLength { len: msg.len() });
        }
        let (p, vp) = self.peer(peer)?;
        p.check_alive()?;
        let mut side = vp.send.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &side.broken {
            return Err(Error::PeerGone { peer, reason: why.clone() });
        }
        // tagged under the send lock: tags go out in the order they count
        let tag = side.sealer.tag(msg);
        let tag = tag.as_ref().map_or(&[][..], |t| &t[..]);
        // SAFETY: the message buffer is ours and idle (we hold the lock and
        // the previous send completed); it holds SLOT bytes, a message of
        // at most MAX_MESSAGE and its tag.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), side.msg.as_ptr(), msg.len());
            std::ptr::copy_nonoverlapping(tag.as_ptr(), side.msg.as_ptr().add(msg.len()), tag.len());
            // (a load first: no write to a shared line on every SEND)
            if !msg.is_empty() && self.tamper.load(Ordering::Relaxed) && self.tamper.swap(false, Ordering::Relaxed) {
                *side.msg.as_ptr() ^= 1;
            }
        }
        let wr = side.next_wr;
        side.next_wr += 1;
        let (addr, lkey) = (side.msg.addr(), side.msg_mr.lkey());
        // SAFETY: the registered message buffer stays untouched until the
        // completion is polled below.
        unsafe { vp.qp.post_send(wr, addr, (msg.len() + tag.len()) as u32, lkey)? };
        self.wait_completions(p, vp, &mut side, 1)?;
        self.core.count_sent(msg.len());
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>> {
        Ok(self.core.recv(timeout))
    }

    fn quiet_for(&self, peer: NodeId) -> Option<std::time::Duration> {
        self.core.quiet_for(peer)
    }

    fn first_departure(&self) -> Option<(NodeId, String)> {
        self.core.first_departure()
    }

    fn tamper_next_send(&self) -> bool {
        self.tamper.store(true, Ordering::Relaxed);
        true
    }

    fn stats(&self) -> Stats {
        let mut s = self.core.counters.snapshot();
        s.chunks_registered = self.exposer.counters.chunks_registered.load(Ordering::Relaxed);
        s.bytes_registered = self.exposer.counters.bytes_registered.load(Ordering::Relaxed);
        s.exposures = self.exposer.counters.exposures.load(Ordering::Relaxed);
        s.exposures_ended = self.exposer.counters.exposures_ended.load(Ordering::Relaxed);
        s.exposure_ns = self.exposer.counters.exposure_ns.load(Ordering::Relaxed);
        s
    }

    fn shutdown(&self) {
        self.core.shutdown();
        self.stop.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd wakes the receive thread.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.rx_thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        for vp in self.peers.values() {
            vp.qp.set_error();
        }
    }
}

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
