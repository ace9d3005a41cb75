//! The tcp backend: works anywhere (also across network namespaces and
//! hosts). One-sided reads are emulated: the reader sends `ReadRequest`s,
//! the peer's reader thread, a passive responder, checks bounds and copies
//! the bytes out of its exposed region into `ReadData` (or answers
//! `ReadError`). The responder never writes our memory and never runs
//! anything else on a peer's behalf.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::VolatileSlice;

use crate::mesh::Link;
use crate::peer::{wait_answers, Core, Handler, Peer};
use crate::wire::{Frame, ReadFailure};
use crate::{
    check_bounds, Error, Incoming, Kind, LocalRegion, NodeId, Options, ReadReq, RegionInfo, Result, Sink, Stats,
    Transport,
};

#[derive(Debug)]
pub(crate) struct TcpTransport {
    core: Arc<Core>,
    responders: Mutex<Vec<JoinHandle<()>>>,
}

/// A read a peer asked us for.
struct Request {
    tag: u64,
    region: u32,
    offset: u64,
    len: u32,
}

/// Hands read requests from the peers' reader threads to one responder
/// thread per peer. The reader never writes a 2 MiB answer itself: two
/// nodes reading each other at once would both block in writing while
/// neither reads.
struct Responders(HashMap<NodeId, Mutex<Sender<Request>>>);

impl Handler for Responders {
    fn on_frame(&self, peer: &Peer, frame: Frame) -> Result<()> {
        match frame {
            Frame::ReadRequest { tag, region, offset, len } => {
                if let Some(q) = self.0.get(&peer.id) {
                    let _ = q.lock().unwrap_or_else(|p| p.into_inner()).send(Request { tag, region, offset, len });
                }
                Ok(())
            }
            other => Err(Error::Protocol { peer: peer.id, reason: format!("unexpected {} frame", other.name()) }),
        }
    }
}

impl TcpTransport {
    pub fn start(
        node: NodeId,
        mut conns: BTreeMap<NodeId, Link>,
        local: Vec<LocalRegion>,
        opts: &Options,
    ) -> Result<Self> {
        let regions = Core::exchange_regions(&mut conns, &local)?;
        Core::ready(&mut conns)?;
        let mut queues = HashMap::new();
        let mut inboxes = Vec::new();
        for id in conns.keys() {
            let (tx, rx) = channel();
            queues.insert(*id, Mutex::new(tx));
            inboxes.push((*id, rx));
        }
        let handler = Arc::new(Responders(queues));
        let core = Core::start(node, conns, regions, local, opts.io_timeout, |_| handler)?;
        let mut responders = Vec::new();
        for (id, rx) in inboxes {
            let weak = Arc::downgrade(&core);
            let spawned = std::thread::Builder::new().name(format!("fabric-serve{id}")).spawn(move || {
                // ends when the reader threads (which hold the senders) end
                while let Ok(r) = rx.recv() {
                    let Some(core) = weak.upgrade() else { return };
                    if let Ok(peer) = core.peer(id) {
                        let _ = core.serve_read(peer, r.tag, r.region, r.offset, r.len);
                    }
                }
            });
            match spawned {
                Ok(t) => responders.push(t),
                Err(source) => {
                    core.shutdown();
                    return Err(Error::Io { what: "starting a responder thread".into(), source });
                }
            }
        }
        Ok(TcpTransport { core, responders: Mutex::new(responders) })
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
        self.core.peer_ids()
    }

    fn regions(&self, peer: NodeId) -> Result<Vec<RegionInfo>> {
        self.core.peer_regions(peer)
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
        let mut bytes = 0u64;
        wait_answers(p, &rx, &tags, self.core.io_timeout, "a read", |i, frame| match frame {
            Frame::ReadData { mut data, .. } if data.len() == reqs[i].len => {
                bytes += data.len() as u64;
                sink(i, 0, VolatileSlice::from(&mut data[..]))
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
        self.core.count_reads(reqs.len(), bytes);
        Ok(())
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
        // the readers are gone, and with them the senders: the responders
        // finish what they hold and end
        let responders: Vec<_> = self.responders.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for t in responders {
            let _ = t.join();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
