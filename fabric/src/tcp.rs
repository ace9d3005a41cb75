//! The tcp backend: works anywhere (also across network namespaces and
//! hosts). One-sided reads are emulated: the reader sends `ReadRequest`s,
//! the peer's reader thread, a passive responder, checks bounds and copies
//! the bytes out of its exposed region into `ReadData` (or answers
//! `ReadError`). The responder never writes our memory and never runs
//! anything else on a peer's behalf.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mesh::Conn;
use crate::peer::{wait_answers, Core, Handler, Peer};
use crate::wire::{Frame, ReadFailure};
use crate::{
    check_bounds, Error, Incoming, Kind, LocalRegion, NodeId, Options, ReadReq, Result, Sink, Stats, Transport,
};

#[derive(Debug)]
pub(crate) struct TcpTransport {
    core: Arc<Core>,
}

struct Responder(std::sync::Weak<Core>);

impl Handler for Responder {
    fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()> {
        match frame {
            Frame::ReadRequest { tag, region, offset, len } => match self.0.upgrade() {
                Some(core) => core.serve_read(peer, tag, region, offset, len),
                None => Ok(()),
            },
            other => Err(Error::Protocol { peer: peer.id, reason: format!("unexpected {} frame", other.name()) }),
        }
    }
}

impl TcpTransport {
    pub fn start(
        node: NodeId,
        mut conns: BTreeMap<NodeId, Conn>,
        local: Vec<LocalRegion>,
        _deadline: Instant,
        opts: &Options,
    ) -> Result<Self> {
        let regions = Core::exchange_regions(&mut conns, &local)?;
        Core::ready(&mut conns)?;
        let core = Core::start(node, conns, regions, local, opts.io_timeout, |core| Arc::new(Responder(core)))?;
        Ok(TcpTransport { core })
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> Kind {
        Kind::Tcp
    }

    fn node(&self) -> NodeId {
        self.core.node
    }

    fn peers(&self) -> Vec<NodeId> {
        self.core.peers.keys().copied().collect()
    }

    fn regions(&self, peer: NodeId) -> Result<Vec<crate::RegionInfo>> {
        Ok(self.core.peer(peer)?.regions.clone())
    }

    fn read_with(&self, peer: NodeId, reqs: &[ReadReq], sink: &mut Sink<'_>) -> Result<()> {
        let p = self.core.peer(peer)?;
        for r in reqs {
            check_bounds(peer, &p.regions, r)?;
        }
        let tags = self.core.tags(reqs.len());
        let rx = p.expect(&tags);
        let requests: Vec<Frame> = reqs
            .iter()
            .zip(&tags)
            .map(|(r, &tag)| Frame::ReadRequest { tag, region: r.region, offset: r.offset, len: r.len as u32 })
            .collect();
        if let Err(e) = p.write(&requests) {
            p.forget(&tags);
            return Err(e);
        }
        let timeout = self.core.io_timeout;
        let deadline = Instant::now() + timeout;
        let mut bytes = 0u64;
        wait_answers(p, &rx, &tags, deadline, timeout, "a read", |i, frame| match frame {
            Frame::ReadData { data, .. } if data.len() == reqs[i].len => {
                bytes += data.len() as u64;
                sink(i, 0, &data)
            }
            Frame::ReadData { data, .. } => Err(Error::Protocol {
                peer,
                reason: format!("answered a {}-byte read with {} bytes", reqs[i].len, data.len()),
            }),
            Frame::ReadError { failure, .. } => Err(match failure {
                ReadFailure::UnknownRegion => Error::UnknownRegion { peer, region: reqs[i].region },
                ReadFailure::OutOfBounds => Error::OutOfBounds {
                    peer,
                    region: reqs[i].region,
                    offset: reqs[i].offset,
                    len: reqs[i].len as u64,
                    region_len: p.regions.iter().find(|r| r.id == reqs[i].region).map_or(0, |r| r.len),
                },
                ReadFailure::BadLength => Error::ReadLength { len: reqs[i].len },
                ReadFailure::Unavailable => Error::Unavailable { peer, reason: "the responder refused".into() },
            }),
            other => Err(Error::Protocol { peer, reason: format!("answered a read with {}", other.name()) }),
        })?;
        self.core.counters.reads.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        self.core.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn send(&self, peer: NodeId, msg: &[u8]) -> Result<()> {
        if msg.len() > crate::MAX_MESSAGE {
            return Err(Error::MessageLength { len: msg.len() });
        }
        self.core.peer(peer)?.write(&[Frame::Message(msg.to_vec())])?;
        self.core.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.core.counters.bytes_sent.fetch_add(msg.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>> {
        Ok(self.core.recv(timeout))
    }

    fn stats(&self) -> Stats {
        self.core.counters.snapshot()
    }

    fn shutdown(&self) {
        self.core.shutdown();
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.core.shutdown();
    }
}
