//! The shm backend: every node on one host. After the handshake each node
//! passes read-only descriptors of its regions' memfds over the Unix
//! socket (SCM_RIGHTS); the peer maps them read-only (and cannot make the
//! mapping writable), and a read is a `memcpy` out of that mapping: the
//! lower bound for every other backend. Messages travel as frames on the
//! Unix socket.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::VolatileSlice;

use crate::mesh::Link;
use crate::peer::{Core, Handler, Peer};
use crate::wire::{Frame, RegionInfo, MAX_REGIONS};
use crate::{
    check_bounds, Error, Incoming, Kind, LocalRegion, NodeId, Options, ReadReq, Result, Sink, Stats, Transport,
};

/// A peer's region, mapped read-only, with its memfd (to tell holes from
/// data: see [`crate::for_each_extent`]).
#[derive(Debug)]
struct PeerMapping {
    id: u32,
    ptr: usize,
    len: u64,
    fd: OwnedFd,
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: we mapped exactly [ptr, ptr + len) and nobody borrows
            // it past the transport.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len as usize) };
        }
    }
}

#[derive(Debug)]
pub(crate) struct ShmTransport {
    core: Arc<Core>,
    maps: BTreeMap<NodeId, Vec<PeerMapping>>,
}

struct NoFrames;

impl Handler for NoFrames {
    fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()> {
        Err(Error::Protocol { peer: peer.id, reason: format!("unexpected {} frame on shm", frame.name()) })
    }
}

impl ShmTransport {
    pub fn start(
        node: NodeId,
        mut conns: BTreeMap<NodeId, Link>,
        local: Vec<LocalRegion>,
        opts: &Options,
    ) -> Result<Self> {
        // peers get read-only descriptors: the ones we hold could be
        // mapped (or mprotected) writable
        let read_only: Vec<OwnedFd> = local
            .iter()
            .map(|r| {
                let fd = r.fd.as_ref().ok_or_else(|| {
                    Error::Config(format!("the shm fabric needs memfd-backed regions; region {} has no memfd", r.id))
                })?;
                read_only_reopen(r.id, fd)
            })
            .collect::<Result<_>>()?;
        let fds: Vec<RawFd> = read_only.iter().map(AsRawFd::as_raw_fd).collect();
        let regions = Core::exchange_regions(&mut conns, &local)?;
        for (id, c) in &conns {
            send_fds(c.conn.raw_fd(), &fds)
                .map_err(|e| Error::PeerGone { peer: *id, reason: format!("passing memfds: {e}") })?;
        }
        let mut maps = BTreeMap::new();
        for (id, c) in &conns {
            let theirs = &regions[id];
            let got = recv_fds(c.conn.raw_fd(), theirs.len())
                .map_err(|e| Error::PeerGone { peer: *id, reason: format!("receiving memfds: {e}") })?;
            let mut m = Vec::with_capacity(got.len());
            for (info, fd) in theirs.iter().zip(got) {
                m.push(map_read_only(*id, info, fd)?);
            }
            maps.insert(*id, m);
        }
        Core::ready(&mut conns)?;
        let core = Core::start(node, conns, regions, local, opts.io_timeout, |_| Arc::new(NoFrames))?;
        Ok(ShmTransport { core, maps })
    }
}

/// What a peer receives for a region: the same memfd opened again,
/// read-only. A mapping of it cannot be made writable (`mmap` with
/// `PROT_WRITE` and `MAP_SHARED`, or `mprotect` to `PROT_WRITE`, fail with
/// EACCES), and the memfd is not sealed against writes, so this node can
/// still punch holes in it (eviction). The memfd's mode is narrowed to its
/// owner first (memfds are created 0777): otherwise a peer running as
/// another user could reopen its descriptor read-write through
/// `/proc/self/fd`. What a process of the same user can still do is in the
/// README (fabric section).
fn read_only_reopen(region: u32, memfd: &OwnedFd) -> Result<OwnedFd> {
    let io = |what: &str| Error::Io {
        what: format!("{what} the memfd of region {region} (the shm fabric needs /proc mounted)"),
        source: io::Error::last_os_error(),
    };
    // SAFETY: fchmod on a descriptor we own; no memory involved.
    if unsafe { libc::fchmod(memfd.as_raw_fd(), 0o600) } != 0 {
        return Err(io("restricting to its owner"));
    }
    let path =
        std::ffi::CString::new(format!("/proc/self/fd/{}", memfd.as_raw_fd())).expect("no NUL in a path of digits");
    // SAFETY: open with a NUL-terminated path we own; returns a new
    // descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io("reopening read-only"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn map_read_only(peer: NodeId, info: &RegionInfo, fd: OwnedFd) -> Result<PeerMapping> {
    // SAFETY: fstat fills a plain struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor we received; `st` is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 || (st.st_size as u64) < info.len {
        return Err(Error::Protocol {
            peer,
            reason: format!("region {} claims {} bytes but its memfd has {}", info.id, info.len, st.st_size),
        });
    }
    // A peer that shrank its memfd under our mapping would make our reads
    // fault (SIGBUS): accept only memfds sealed against shrinking.
    // SAFETY: F_GET_SEALS on an open descriptor; no memory involved.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(Error::Protocol {
            peer,
            reason: format!("region {}'s memfd is not sealed against shrinking (F_SEAL_SHRINK)", info.id),
        });
    }
    if info.len == 0 {
        return Ok(PeerMapping { id: info.id, ptr: 0, len: 0, fd });
    }
    // SAFETY: a new read-only shared mapping of the peer's memfd at an
    // address the kernel picks; no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            info.len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Io {
            what: format!("mapping region {} of node {peer}", info.id),
            source: io::Error::last_os_error(),
        });
    }
    Ok(PeerMapping { id: info.id, ptr: ptr as usize, len: info.len, fd })
}

/// Zeros handed to a sink for a hole, at most this many bytes at a time.
const ZERO_CHUNK: usize = 64 << 10;

/// Sends `fds` with one byte of payload.
fn send_fds(sock: RawFd, fds: &[RawFd]) -> io::Result<()> {
    let byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain data; we fill in what sendmsg reads.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` writable bytes, enough for
        // one header and the fds; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        }
    }
    // SAFETY: `msg` and everything it points to live across the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives exactly `count` fds sent by [`send_fds`].
fn recv_fds(sock: RawFd, count: usize) -> io::Result<Vec<OwnedFd>> {
    if count > MAX_REGIONS {
        return Err(io::Error::other("too many regions"));
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_REGIONS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: every buffer `msg` points to is ours and sized as declared.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let mut out = Vec::new();
    // SAFETY: we walk the control messages the kernel wrote into `cbuf`
    // with the CMSG macros, which stay within msg_controllen; each fd the
    // kernel installed is ours to own exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let n = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || out.len() != count {
        return Err(io::Error::other(format!("expected {count} memfds, received {}", out.len())));
    }
    Ok(out)
}

impl Transport for ShmTransport {
    fn kind(&self) -> Kind {
        Kind::Shm
    }

    fn node(&self) -> NodeId {
        self.core.node
    }

    fn peers(&self) -> Vec<NodeId> {
        self.core.peer_ids()
    }

    fn regions(&self, peer: NodeId) -> Result<Vec<RegionInfo>> {
        self.core.peer_regions(peer)
    }

    fn read_with(&self, peer: NodeId, reqs: &[ReadReq], sink: &mut Sink<'_>) -> Result<()> {
        let p = self.core.peer(peer)?;
        let maps = self.maps.get(&peer).ok_or(Error::UnknownPeer(peer))?;
        for r in reqs {
            check_bounds(peer, &p.regions, r)?;
        }
        let mut bytes = 0;
        let mut zeros: Option<Vec<u8>> = None;
        for (i, r) in reqs.iter().enumerate() {
            // the mapping outlives a dead peer; its data must not be
            // trusted once the peer is gone
            p.check_alive()?;
            let m = maps.iter().find(|m| m.id == r.region).ok_or(Error::UnknownRegion { peer, region: r.region })?;
            // SAFETY: check_bounds put [offset, offset + len) inside the
            // region, and the read-only mapping covers the whole region and
            // lives as long as self. The peer may write these bytes while we
            // look (a torn read, as with any shared guest memory): a
            // volatile slice, never a reference; nothing writes through it
            // (the mapping is read-only).
            let src = unsafe { VolatileSlice::new((m.ptr + r.offset as usize) as *mut u8, r.len) };
            // holes read as zeros, not through the mapping: that would
            // allocate them in the peer's memfd
            crate::for_each_extent(m.fd.as_raw_fd(), r.offset, r.len, |at, n, data| {
                if data {
                    let piece = src.subslice(at, n).map_err(|e| Error::Protocol { peer, reason: e.to_string() })?;
                    sink(i, at, piece)
                } else {
                    let zeros = zeros.get_or_insert_with(|| vec![0u8; ZERO_CHUNK]);
                    let mut done = 0;
                    while done < n {
                        let k = (n - done).min(ZERO_CHUNK);
                        sink(i, at + done, VolatileSlice::from(&mut zeros[..k]))?;
                        done += k;
                    }
                    Ok(())
                }
            })?;
            bytes += r.len as u64;
        }
        p.check_alive()?;
        self.core.count_reads(reqs.len(), bytes);
        Ok(())
    }

    fn set_tap(&self, tap: std::sync::Arc<dyn crate::Tap>) -> bool {
        self.core.set_tap(tap)
    }

    fn send(&self, peer: NodeId, msg: &[u8]) -> Result<()> {
        self.core.send_message(peer, msg)
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>> {
        Ok(self.core.recv(timeout))
    }

    fn stats(&self) -> Stats {
        self.core.counters.snapshot()
    }

    fn quiet_for(&self, peer: NodeId) -> Option<std::time::Duration> {
        self.core.quiet_for(peer)
    }

    fn first_departure(&self) -> Option<(NodeId, String)> {
        self.core.first_departure()
    }

    fn shutdown(&self) {
        self.core.shutdown();
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.core.shutdown();
    }
}
