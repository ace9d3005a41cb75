//! virtio-blk over a raw image file: read, write, flush (fsync on the
//! host), get-id and discard (holes punched in the image, so blocks the
//! guest frees cost no disk, as dormant pages cost no memory). A
//! read-only disk offers VIRTIO_BLK_F_RO and answers writes and discards
//! with an I/O error.
//!
//! Data moves between the file and guest memory with one `preadv` or
//! `pwritev` over the request's buffers, no bounce copy. A request whose
//! buffers lie outside guest memory, or that reaches past the end of the
//! disk, gets an I/O error; a request the device cannot even answer (no
//! header, no status byte) fails the device (`mmio.rs`).

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use super::mmio::{Broken, Device};
use crate::config::SECTOR_SIZE;

/// The queue's size: Linux's default, and what the rings are sized for.
pub const QUEUE_SIZE: u16 = 256;
/// Most data buffers a request may have (`seg_max`): the queue less the
/// header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Discard: most sectors per range (2 GiB), ranges per request, and the
/// granularity the guest should use (4 KiB: a host page, what a punched
/// hole frees).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 32;
const DISCARD_ALIGNMENT: u32 = 8;
/// A request's header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// One discard range: sector (le64), sectors (le32), flags (le32; bit 0:
/// unmap, which a punched hole does anyway).
const DISCARD_RANGE_LEN: usize = 16;
const DISCARD_FLAG_UNMAP: u32 = 1;

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    /// The image's size in bytes (a whole number of sectors).
    len: u64,
    readonly: bool,
    /// What get-id answers (the guest's `/sys/block/vdX/serial`).
    id: String,
    /// Served requests, for tests and the log.
    pub requests: u64,
}

/// A request's outcome: the status byte and the bytes written to the guest.
type Outcome = (u8, u32);
const IOERR: Outcome = (VIRTIO_BLK_S_IOERR as u8, 0);
const UNSUPP: Outcome = (VIRTIO_BLK_S_UNSUPP as u8, 0);

impl Block {
    /// A disk over `file` of `len` bytes (checked by `config::DiskConfig`).
    pub fn new(file: File, len: u64, readonly: bool, id: String) -> Self {
        Block { file, len, readonly, id, requests: 0 }
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(self.len / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        c
    }

    /// The byte range a transfer of `len` bytes at `sector` covers, if it
    /// is whole sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        (len.is_multiple_of(SECTOR_SIZE) && start.checked_add(len)? <= self.len).then_some(start)
    }

    fn execute(&mut self, kind: u32, sector: u64, req: &Request, mem: &GuestMemoryMmap) -> Outcome {
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = total(&req.data_in);
                let Some(at) = self.range(sector, len) else { return IOERR };
                match slices(mem, &req.data_in, Permissions::Write).and_then(|s| transfer(&self.file, at, &s, false)) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, len as u32),
                    Err(e) => {
                        tracing::debug!(sector, len, error = %e, "virtio-blk: read failed");
                        IOERR
                    }
                }
            }
            VIRTIO_BLK_T_OUT if self.readonly => IOERR,
            VIRTIO_BLK_T_OUT => {
                let len = total(&req.data_out);
                let Some(at) = self.range(sector, len) else { return IOERR };
                match slices(mem, &req.data_out, Permissions::Read).and_then(|s| transfer(&self.file, at, &s, true)) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                    Err(e) => {
                        tracing::debug!(sector, len, error = %e, "virtio-blk: write failed");
                        IOERR
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_all() {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: fsync of the disk image failed");
                    IOERR
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = self.id.len().min(id.len());
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let room = (total(&req.data_in) as usize).min(id.len());
                match write_gather(mem, &req.data_in, &id[..room]) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, room as u32),
                    Err(_) => IOERR,
                }
            }
            VIRTIO_BLK_T_DISCARD if self.readonly => IOERR,
            VIRTIO_BLK_T_DISCARD => self.discard(req, mem),
            _ => UNSUPP,
        }
    }

    fn discard(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Outcome {
        let len = total(&req.data_out) as usize;
        if len == 0 || !len.is_multiple_of(DISCARD_RANGE_LEN) || len / DISCARD_RANGE_LEN > MAX_DISCARD_SEG as usize {
            return IOERR;
        }
        let mut ranges = vec![0u8; len];
        if read_gather(mem, &req.data_out, &mut ranges).is_err() {
            return IOERR;
        }
        for r in ranges.chunks_exact(DISCARD_RANGE_LEN) {
            let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            if flags & !DISCARD_FLAG_UNMAP != 0 {
                return UNSUPP;
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(at) = self.range(sector, bytes).filter(|_| sectors <= MAX_DISCARD_SECTORS) else {
                return IOERR;
            };
            if let Err(e) = punch(&self.file, at, bytes) {
                // a discard is a hint: a file system that cannot punch
                // holes keeps the blocks, the guest loses nothing
                tracing::debug!(sector, sectors, error = %e, "virtio-blk: cannot punch a hole; discard ignored");
            }
        }
        (VIRTIO_BLK_S_OK as u8, 0)
    }
}

impl Device for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD);
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queues(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o.checked_add(i)?)).copied().unwrap_or(0);
        }
    }

    fn serve(&mut self, _queue: usize, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Broken> {
        let req = Request::parse(chain)?;
        let mut header = [0u8; HEADER_LEN as usize];
        let status = if read_gather(mem, &req.header, &mut header).is_err() {
            IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            self.execute(kind, sector, &req, mem)
        };
        self.requests += 1;
        mem.write_obj(status.0, req.status)
            .map_err(|_| Broken(format!("a request's status byte at {:#x} is outside guest memory", req.status.0)))?;
        Ok(status.1 + 1)
    }
}

/// Guest buffers: (address, length) pieces.
type Pieces = Vec<(GuestAddress, u64)>;

/// A request split by bytes, whatever its descriptors' framing: the first
/// 16 device-readable bytes are the header, the rest of them the data
/// out; the last device-writable byte is the status, the rest before it
/// the data in.
#[derive(Debug)]
struct Request {
    header: Pieces,
    data_out: Pieces,
    data_in: Pieces,
    status: GuestAddress,
}

impl Request {
    fn parse(chain: &[Descriptor]) -> Result<Self, Broken> {
        let first_in = chain.iter().position(|d| d.is_write_only()).unwrap_or(chain.len());
        let (readable, writable) = chain.split_at(first_in);
        if writable.iter().any(|d| !d.is_write_only()) {
            return Err(Broken("a request has a device-readable buffer after a device-writable one".into()));
        }
        let pieces = |ds: &[Descriptor]| -> Pieces {
            ds.iter().filter(|d| d.len() > 0).map(|d| (d.addr(), u64::from(d.len()))).collect()
        };
        let (header, data_out) = split(pieces(readable), u64::from(HEADER_LEN));
        if total(&header) < u64::from(HEADER_LEN) {
            return Err(Broken("a request is shorter than its 16-byte header".into()));
        }
        let mut data_in = pieces(writable);
        let Some(last) = data_in.last_mut() else {
            return Err(Broken("a request has no device-writable byte for its status".into()));
        };
        last.1 -= 1;
        let status = last.0.checked_add(last.1).ok_or_else(|| Broken("a request's status wraps around".into()))?;
        data_in.retain(|p| p.1 > 0);
        Ok(Request { header, data_out, data_in, status })
    }
}

/// Splits pieces at byte `at`.
fn split(pieces: Pieces, at: u64) -> (Pieces, Pieces) {
    let (mut front, mut back) = (Vec::new(), Vec::new());
    let mut left = at;
    for (addr, len) in pieces {
        if left >= len {
            front.push((addr, len));
            left -= len;
        } else if left > 0 {
            front.push((addr, left));
            // (a guest's address may wrap: reaching it fails later)
            back.push((GuestAddress(addr.0.wrapping_add(left)), len - left));
            left = 0;
        } else {
            back.push((addr, len));
        }
    }
    (front, back)
}

fn total(pieces: &Pieces) -> u64 {
    pieces.iter().map(|p| p.1).sum()
}

/// The guest memory of `pieces` (an error if any byte is outside it).
fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    pieces: &Pieces,
    access: Permissions,
) -> std::io::Result<Vec<VolatileSlice<'m>>> {
    let mut out = Vec::with_capacity(pieces.len());
    for &(addr, len) in pieces {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        for s in mem.get_slices(addr, len, access).map_err(std::io::Error::other)? {
            out.push(s.map_err(std::io::Error::other)?);
        }
    }
    Ok(out)
}

fn read_gather(mem: &GuestMemoryMmap, pieces: &Pieces, out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for &(addr, len) in pieces {
        let n = (len as usize).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], addr)?;
        at += n;
    }
    Ok(())
}

fn write_gather(mem: &GuestMemoryMmap, pieces: &Pieces, bytes: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for &(addr, len) in pieces {
        let n = (len as usize).min(bytes.len() - at);
        mem.write_slice(&bytes[at..at + n], addr)?;
        at += n;
    }
    Ok(())
}

/// Moves the bytes of `bufs` to (`write`) or from the file at `offset`,
/// with `pwritev`/`preadv`, until all are moved.
fn transfer(file: &File, offset: u64, bufs: &[VolatileSlice], write: bool) -> std::io::Result<()> {
    // at most IOV_MAX buffers a call
    const IOV_MAX: usize = 1024;
    let guards: Vec<_> = bufs.iter().filter(|s| !s.is_empty()).map(|s| (s.ptr_guard_mut(), s.len())).collect();
    let mut iovs: Vec<libc::iovec> =
        guards.iter().map(|(g, len)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: *len }).collect();
    let mut pos = offset;
    let mut i = 0;
    while i < iovs.len() {
        let n = (iovs.len() - i).min(IOV_MAX) as libc::c_int;
        let at = libc::off_t::try_from(pos).map_err(std::io::Error::other)?;
        // SAFETY: every iovec points into guest memory that stays mapped
        // while the transport (which owns the memory's description) lives,
        // with the length of its slice; the guest may change those bytes
        // meanwhile, which can only garble the data it asked us to move.
        let r = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iovs[i..].as_ptr(), n, at)
            } else {
                libc::preadv(file.as_raw_fd(), iovs[i..].as_ptr(), n, at)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        let mut done = r as usize;
        pos += done as u64;
        while done > 0 {
            let iov = &mut iovs[i];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                i += 1;
            } else {
                iov.iov_base = iov.iov_base.wrapping_byte_add(done);
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// Punches `[at, at + len)` out of the file, keeping its size.
fn punch(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    let (at, len) = (
        libc::off_t::try_from(at).map_err(std::io::Error::other)?,
        libc::off_t::try_from(len).map_err(std::io::Error::other)?,
    );
    // SAFETY: fallocate on our own descriptor; no memory involved.
    let r =
        unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at, len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::tests::{bring_up, memory, offer, put_desc, rd, used, AVAIL, DESC, MEM_SIZE, USED};
    use crate::virtio::mmio::Transport;
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_STATUS};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const DISK: u64 = 64 << 10;

    /// A disk image of 64 KiB whose byte i is i mod 251, and a transport
    /// over a fake guest, brought up as Linux does.
    fn disk(readonly: bool) -> (Transport<Block>, GuestMemoryMmap, File) {
        // one file each: the tests run in parallel
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shoal-blk-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let bytes: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&bytes, 0).unwrap();
        let mem = memory();
        let mut t =
            Transport::new(Block::new(file.try_clone().unwrap(), DISK, readonly, "shoal-disk0".into()), mem.clone());
        bring_up(&mut t, DESC, AVAIL, USED);
        assert!(t.failure().is_none());
        (t, mem, file)
    }

    /// One request: header, then `data` (device-writable for reads),
    /// then the status byte; served; returns (status, used length).
    fn request(
        t: &mut Transport<Block>,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: Option<(u64, u32, bool)>,
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = (used(mem, 0).0 % 4) * 3;
        match data {
            Some((addr, len, writable)) => {
                put_desc(mem, head, HDR, 16, VRING_DESC_F_NEXT, head + 1);
                let flags = VRING_DESC_F_NEXT | if writable { VRING_DESC_F_WRITE } else { 0 };
                put_desc(mem, head + 1, addr, len, flags, head + 2);
                put_desc(mem, head + 2, STATUS, 1, VRING_DESC_F_WRITE, 0);
            }
            None => {
                put_desc(mem, head, HDR, 16, VRING_DESC_F_NEXT, head + 1);
                put_desc(mem, head + 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
            }
        }
        let before = used(mem, 0).0;
        offer(mem, head);
        t.serve_queue(0);
        let (idx, h, len) = used(mem, before);
        assert_eq!(idx, before.wrapping_add(1), "one chain used");
        assert_eq!(h, u32::from(head));
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const ERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn reads_writes_flushes_ids_and_discards() {
        let (mut t, mem, file) = disk(false);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK / 512, "capacity in sectors");
        // read sectors 2-3
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, 2, Some((DATA, 1024, true))), (OK, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == ((1024 + i) % 251) as u8));
        // write 4 KiB of 0x5a at sector 8
        mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_OUT, 8, Some((DATA, 4096, false))), (OK, 1));
        let mut back = vec![0u8; 4096 + 2];
        file.read_exact_at(&mut back, 4095).unwrap();
        assert_eq!(back[0], (4095 % 251) as u8, "the byte before is kept");
        assert!(back[1..4097].iter().all(|&b| b == 0x5a));
        assert_eq!(back[4097], ((4096 + 4096) % 251) as u8, "the byte after is kept");
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_FLUSH, 0, None), (OK, 1));
        // get-id: 20 bytes, NUL-padded
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, true))), (OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"shoal-disk0\0");
        // discard sectors 8-15 (the 4 KiB written above): zeros after
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&8u64.to_le_bytes());
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        mem.write_slice(&range, GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, false))), (OK, 1));
        let mut hole = vec![0xffu8; 4096];
        file.read_exact_at(&mut hole, 4096).unwrap();
        assert!(hole.iter().all(|&b| b == 0), "a discarded range reads as zeros (a hole)");
        assert_eq!(file.metadata().unwrap().len(), DISK, "the image keeps its size");
        assert!(t.failure().is_none());
        assert_eq!(t.device().requests, 5);
    }

    #[test]
    fn bad_requests_get_an_error_status() {
        let (mut t, mem, _file) = disk(false);
        // past the end, not whole sectors, an unknown type
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, DISK / 512 - 1, Some((DATA, 1024, true))).0, ERR);
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, u64::MAX / 4, Some((DATA, 512, true))).0, ERR);
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_OUT, 0, Some((DATA, 100, false))).0, ERR);
        assert_eq!(request(&mut t, &mem, 77, 0, None).0, VIRTIO_BLK_S_UNSUPP as u8);
        // a data buffer outside guest memory: an error, the device goes on
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, 0, Some((MEM_SIZE - 512, 1024, true))).0, ERR);
        // a write whose one readable buffer (header and data) ends past the
        // top of the address space
        put_desc(&mem, 0, u64::MAX - 15, 16 + 512, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), ERR);
        // discard flags we do not know
        let mut range = [0u8; 16];
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        range[12..16].copy_from_slice(&2u32.to_le_bytes());
        mem.write_slice(&range, GuestAddress(DATA)).unwrap();
        assert_eq!(
            request(&mut t, &mem, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, false))).0,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        assert!(t.failure().is_none());
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, 0, Some((DATA, 512, true))), (OK, 513));
    }

    #[test]
    fn a_readonly_disk_refuses_writes_and_discards() {
        let (mut t, mem, file) = disk(true);
        assert_ne!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO), 0);
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, false))).0, ERR);
        let mut range = [0u8; 16];
        range[8..12].copy_from_slice(&1u32.to_le_bytes());
        mem.write_slice(&range, GuestAddress(DATA)).unwrap();
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, false))).0, ERR);
        let mut first = [0u8; 512];
        file.read_exact_at(&mut first, 0).unwrap();
        assert!(first.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the image is unchanged");
        assert_eq!(request(&mut t, &mem, VIRTIO_BLK_T_IN, 0, Some((DATA, 512, true))), (OK, 513));
    }

    #[test]
    fn a_request_without_header_or_status_fails_the_device() {
        let (mut t, mem, _file) = disk(false);
        // an 8-byte header
        put_desc(&mem, 0, HDR, 8, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert!(t.failure().unwrap().contains("shorter than its 16-byte header"));
        assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // no status byte
        let (mut t, mem, _file) = disk(false);
        put_desc(&mem, 0, HDR, 16, 0, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert!(t.failure().unwrap().contains("no device-writable byte"));
        // a status byte outside guest memory
        let (mut t, mem, _file) = disk(false);
        put_desc(&mem, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, MEM_SIZE + 4096, 1, VRING_DESC_F_WRITE, 0);
        offer(&mem, 0);
        t.serve_queue(0);
        assert!(t.failure().unwrap().contains("status byte"));
    }
}
