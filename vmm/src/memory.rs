//! Guest memory on one node: one sparse memfd the size of the whole guest,
//! mapped twice.
//!
//! - The *guest view* backs the KVM memslots and is registered with
//!   userfaultfd: the guest's first touch of a page it does not map yet
//!   stops in the page engine.
//! - The *alias view* is the VMM's own access (loader, hypercalls, and later
//!   the fabric, which reads from and lands into it). It is not registered,
//!   so the VMM must only touch pages the page engine knows are here (the
//!   devices read guest memory through the guest view instead).
//!
//! Nothing is allocated up front: the memfd is sparse and both mappings are
//! `MAP_NORESERVE`, so a 64 GiB guest costs what it touches.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use nix::sys::memfd::MemFdCreateFlag;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, VolatileSlice};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole: RAM above this moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// The largest guest shoal maps: page tables use 2 MiB pages (1 TiB needs
/// 2 MiB of them), and under nested KVM a 1 TiB memslot already costs
/// ~2.6 GiB of host kernel memory (measured on our
/// development machines).
pub const MAX_MEMORY: u64 = 1 << 40;
/// The smallest guest: room for the image at 1 MiB, its boot data and a
/// little free RAM.
pub const MIN_MEMORY: u64 = 4 << 20;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memory size must be more than 0")]
    Zero,
    #[error("memory size {0} bytes is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    #[error("memory size {size} bytes is below shoal's minimum of {min} MiB", min = MIN_MEMORY >> 20)]
    TooSmall { size: u64 },
    #[error("memory size {size} bytes is more than shoal's limit of {max} GiB per guest", max = MAX_MEMORY >> 30)]
    TooLarge { size: u64 },
    #[error("cannot create the memfd for guest memory: {0}")]
    Memfd(#[source] io::Error),
    #[error("cannot size the guest memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: io::Error },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map { size: u64, source: io::Error },
    #[error("cannot describe guest memory to vm-memory: {0}")]
    VmMemory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One contiguous range of guest RAM and where it sits in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of its first byte in the memfd (and in both views).
    pub offset: u64,
}

impl RamRegion {
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// Where guest RAM sits in guest-physical space: below the MMIO hole, and
/// the rest from 4 GiB on. The memfd holds the regions back to back, so a
/// memfd offset (and a page index, `offset / PAGE_SIZE`) names a page on
/// every node the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    regions: Vec<RamRegion>,
}

impl Layout {
    /// The layout of `size` bytes of RAM, after checking the size.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 {
            return Err(Error::Zero);
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned(size));
        }
        if size < MIN_MEMORY {
            return Err(Error::TooSmall { size });
        }
        if size > MAX_MEMORY {
            return Err(Error::TooLarge { size });
        }
        let low = size.min(MMIO_HOLE_START);
        let mut regions = vec![RamRegion { gpa: 0, len: low, offset: 0 }];
        if size > low {
            regions.push(RamRegion { gpa: MMIO_HOLE_END, len: size - low, offset: low });
        }
        Ok(Layout { size, regions })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The RAM regions, ascending.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// One past the highest guest-physical RAM address.
    pub fn top(&self) -> u64 {
        self.regions.last().map_or(0, RamRegion::end)
    }

    /// The memfd offset of a guest-physical address, if it is RAM.
    pub fn gpa_to_offset(&self, gpa: u64) -> Option<u64> {
        self.region_of_gpa(gpa).map(|r| r.offset + (gpa - r.gpa))
    }

    /// The guest-physical address of a memfd offset.
    pub fn offset_to_gpa(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.offset && offset < r.offset + r.len)
            .map(|r| r.gpa + (offset - r.offset))
    }

    /// The region holding `gpa`.
    pub fn region_of_gpa(&self, gpa: u64) -> Option<&RamRegion> {
        self.regions.iter().find(|r| gpa >= r.gpa && gpa < r.end())
    }

    /// The region holding memfd offset `offset`.
    pub fn region_of_offset(&self, offset: u64) -> Option<&RamRegion> {
        self.regions.iter().find(|r| offset >= r.offset && offset < r.offset + r.len)
    }
}

/// A mapping we own; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; all
// accesses through it go through raw pointers or vm-memory's volatile
// accessors.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A shared mapping of `file`, or private anonymous memory when None.
    fn new(file: Option<&File>, len: u64) -> Result<Self> {
        let size = len;
        let len = usize::try_from(len).map_err(|_| Error::TooLarge { size })?;
        let (flags, fd) = match file {
            Some(f) => (libc::MAP_SHARED | libc::MAP_NORESERVE, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1),
        };
        // SAFETY: a new mapping at an address the kernel picks; no existing
        // memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map { size, source: io::Error::last_os_error() });
        }
        let ptr =
            NonNull::new(ptr.cast()).ok_or(Error::Map { size, source: io::Error::other("mmap returned NULL") })?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping with exactly this address and
        // length, and nothing borrows it beyond our lifetime.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A memfd mapped twice, the guest view under the page engine: shoal's
    /// way.
    Memfd,
    /// Plain private anonymous memory, one view, no userfaultfd: the kernel
    /// serves every first touch. The benchmarks' baseline.
    Anonymous,
}

/// A new memfd named `name` (close-on-exec, and `flags`): guest RAM, a
/// probe's scratch page, a decompressed kernel.
pub fn memfd(name: &std::ffi::CStr, flags: MemFdCreateFlag) -> io::Result<File> {
    nix::sys::memfd::memfd_create(name, flags | MemFdCreateFlag::MFD_CLOEXEC).map(File::from).map_err(io::Error::from)
}

/// Guest RAM on this node: the memfd and its two views (or, for the
/// baseline, one anonymous mapping that is both).
#[derive(Debug)]
pub struct GuestMemory {
    layout: Layout,
    memfd: Option<File>,
    guest_view: Mapping,
    alias_view: Option<Mapping>,
    alias: GuestMemoryMmap,
    /// The guest view as vm-memory regions: what devices read and write
    /// (virtio queues and buffers), as the guest would: a page not mapped
    /// there is faulted in through userfaultfd, so the page engine resolves
    /// it and keeps its counts; never from a fault
    /// handler's thread.
    device_view: GuestMemoryMmap,
}

/// The vm-memory regions of a view of guest memory that starts at `base`.
///
/// # Safety
/// `base` must point at a mapping of the whole guest (`layout.size()`
/// bytes) that outlives the returned regions.
unsafe fn describe(layout: &Layout, base: NonNull<u8>, flags: libc::c_int) -> Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(layout.regions().len());
    for r in layout.regions() {
        let start = base.as_ptr().wrapping_add(r.offset as usize);
        // SAFETY: [offset, offset + len) lies inside the mapping at `base`,
        // which outlives the regions (the caller's promise; the vm-memory
        // region does not unmap a raw pointer it was given).
        let mmap = unsafe { MmapRegion::build_raw(start, r.len as usize, libc::PROT_READ | libc::PROT_WRITE, flags) }
            .map_err(|e| Error::VmMemory(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mmap, GuestAddress(r.gpa))
                .ok_or_else(|| Error::VmMemory("region wraps around".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::VmMemory(e.to_string()))
}

impl GuestMemory {
    /// Creates the sparse memfd and maps it twice.
    pub fn new(layout: Layout) -> Result<Self> {
        Self::with_backing(layout, Backing::Memfd)
    }

    /// Creates guest memory with the given backing.
    pub fn with_backing(layout: Layout, backing: Backing) -> Result<Self> {
        let size = layout.size();
        let memfd = match backing {
            Backing::Memfd => {
                let memfd = memfd(c"shoal-guest-ram", MemFdCreateFlag::MFD_ALLOW_SEALING).map_err(Error::Memfd)?;
                memfd.set_len(size).map_err(|source| Error::Truncate { size, source })?;
                // Sealed at its size: a peer that maps it (the shm fabric)
                // can trust it never shrinks under its mapping.
                // SAFETY: F_ADD_SEALS on our own descriptor.
                if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }
                    != 0
                {
                    return Err(Error::Memfd(io::Error::last_os_error()));
                }
                Some(memfd)
            }
            Backing::Anonymous => None,
        };
        let guest_view = Mapping::new(memfd.as_ref(), size)?;
        let alias_view = match &memfd {
            Some(f) => Some(Mapping::new(Some(f), size)?),
            None => None,
        };
        let alias_ptr = alias_view.as_ref().unwrap_or(&guest_view).ptr;
        let flags = match backing {
            Backing::Memfd => libc::MAP_SHARED | libc::MAP_NORESERVE,
            Backing::Anonymous => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        };
        // SAFETY: both views are mappings of the whole guest, owned by the
        // Self made below, which also owns the vm-memory descriptions.
        let alias = unsafe { describe(&layout, alias_ptr, flags) }?;
        // SAFETY: as above.
        let device_view = unsafe { describe(&layout, guest_view.ptr, flags) }?;
        Ok(GuestMemory { layout, memfd, guest_view, alias_view, alias, device_view })
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The memfd (the fabric's shm backend shares it with peers); None for
    /// anonymous memory.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// The guest view for devices (see the field).
    pub fn device_view(&self) -> &GuestMemoryMmap {
        &self.device_view
    }

    /// Host address of the guest view's first byte (memfd offset 0).
    pub fn guest_view_base(&self) -> u64 {
        self.guest_view.ptr.as_ptr() as u64
    }

    fn alias_ptr(&self) -> NonNull<u8> {
        self.alias_view.as_ref().unwrap_or(&self.guest_view).ptr
    }

    /// The alias view as vm-memory guest memory, addressed by GPA. Writing
    /// through it materialises pages behind the page engine's back: only the
    /// loader does, before the engine starts.
    pub fn alias(&self) -> &GuestMemoryMmap {
        &self.alias
    }

    /// `[offset, offset + len)` of the alias view, for volatile access:
    /// the guest (and, over shm, a peer reading) may touch these bytes
    /// while we do, so no Rust reference to them is ever made (it would be
    /// undefined behaviour); reading a hole materialises a page.
    fn alias_volatile(&self, offset: u64, len: usize) -> VolatileSlice<'_> {
        assert!(offset.checked_add(len as u64).is_some_and(|end| end <= self.layout.size()));
        // SAFETY: the range is inside the alias mapping (asserted), which
        // lives as long as self (the slice borrows self).
        unsafe { VolatileSlice::new(self.alias_ptr().as_ptr().add(offset as usize), len) }
    }

    /// Copies the alias view at memfd offset `offset` into `buf`. The
    /// guest may write those bytes meanwhile (a torn read): use it for
    /// pages the guest cannot race on, or where a torn read is harmless.
    pub fn read_alias(&self, offset: u64, buf: &mut [u8]) {
        self.alias_volatile(offset, buf.len()).copy_to(buf);
    }

    /// Host address of the alias view's first byte (memfd offset 0): what
    /// the fabric exposes to peers.
    pub fn alias_base(&self) -> *const u8 {
        self.alias_ptr().as_ptr()
    }

    /// Copies `bytes` into the alias view at memfd offset `offset` (a page
    /// a peer's read brought in, on a node without a guest).
    pub fn write_alias(&self, offset: u64, bytes: &[u8]) {
        self.alias_volatile(offset, bytes.len()).copy_from(bytes);
    }

    /// Writes zeros over `[offset, offset + len)` of the alias view (a hole
    /// gets a zeroed page; a page that exists keeps its place in memory).
    pub fn zero_alias(&self, offset: u64, len: u64) {
        const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let len = usize::try_from(len).expect("a range of guest memory fits the address space");
        let target = self.alias_volatile(offset, len);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZEROS.len());
            // in bounds: `at + n <= len`, the slice's length
            target.subslice(at, n).expect("in bounds").copy_from(&ZEROS[..n]);
            at += n;
        }
    }

    /// Frees the memfd's pages in `[offset, offset + len)`: they read as
    /// zeros again (holes), and both views lose their mappings.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let memfd = self.memfd.as_ref().ok_or_else(|| io::Error::other("anonymous memory has no memfd"))?;
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        let ret = unsafe {
            libc::fallocate(
                memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes `[offset, offset + len)` away from the guest view (and so from
    /// KVM) while the memfd keeps the bytes: the guest's next touch is a
    /// minor fault.
    pub fn unmap_guest_view(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.layout.size()));
        // SAFETY: the range is inside the guest view, which we own; zapping
        // a shared file mapping's page tables loses no data.
        let ret = unsafe {
            libc::madvise(
                (self.guest_view.ptr.as_ptr() as usize + offset as usize) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the memfd holds no page at `offset` (a hole: zeros that
    /// take no memory). Asks the kernel; reads nothing.
    pub fn is_hole(&self, offset: u64) -> io::Result<bool> {
        let memfd = self.memfd.as_ref().ok_or_else(|| io::Error::other("anonymous memory has no memfd"))?;
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(memfd.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            // ENXIO: no data at or after offset
            return if err.raw_os_error() == Some(libc::ENXIO) { Ok(true) } else { Err(err) };
        }
        Ok(data as u64 >= offset + PAGE_SIZE)
    }

    /// Copies guest memory at memfd offset `offset` through the guest view,
    /// as the guest would read it: a page not mapped is faulted in through
    /// userfaultfd (so never call this from a fault-handler thread).
    pub fn read_guest_view(&self, offset: u64, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len() as u64).is_some_and(|end| end <= self.layout.size()));
        // SAFETY: the range is inside the guest view (asserted), which
        // lives as long as self. Reading it may fault, which the page
        // engine resolves; the guest may write it meanwhile (a torn read of bytes
        // the guest asked us to read): volatile copies, never a reference.
        let src = unsafe { VolatileSlice::new(self.guest_view.ptr.as_ptr().add(offset as usize), buf.len()) };
        src.copy_to(buf);
    }

    /// Punches every all-zero page out of the memfd's populated extents
    /// and returns how many: zeros the loader wrote (Debian's kernel image
    /// carries 27 MiB of them: `.bss`, `.brk` and `.init.scratch` inside a
    /// segment's file bytes) read the same as a hole, and a hole
    /// stays dormant: not resident, never counted as the loader's (pinned
    /// on node 0, see the page engine), zero-filled where it is first
    /// touched. Reads the memfd with `pread`; call it before the guest
    /// runs and before any peer maps the memory.
    pub fn punch_zero_pages(&self) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let memfd = self.memfd.as_ref().ok_or_else(|| io::Error::other("anonymous memory has no memfd"))?;
        const CHUNK: u64 = 64 * PAGE_SIZE;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut punched = 0;
        for (start, len) in self.populated_extents()? {
            // extents are page-aligned on tmpfs; a run of zero pages is
            // punched at once
            let end = start + len;
            let mut run: Option<u64> = None;
            let mut at = start;
            while at < end {
                let n = CHUNK.min(end - at);
                memfd.read_exact_at(&mut buf[..n as usize], at)?;
                for (i, page) in buf[..n as usize].chunks(PAGE_SIZE as usize).enumerate() {
                    let offset = at + i as u64 * PAGE_SIZE;
                    let zero = page.len() == PAGE_SIZE as usize && page.iter().all(|&b| b == 0);
                    match (zero, run) {
                        (true, None) => run = Some(offset),
                        (false, Some(from)) => {
                            self.punch(from, offset - from)?;
                            punched += (offset - from) / PAGE_SIZE;
                            run = None;
                        }
                        _ => {}
                    }
                }
                at += n;
            }
            if let Some(from) = run {
                self.punch(from, end - from)?;
                punched += (end - from) / PAGE_SIZE;
            }
        }
        Ok(punched)
    }

    /// The memfd's populated extents (pages that hold data), as
    /// `(offset, len)` pairs, from the kernel's own record (SEEK_DATA /
    /// SEEK_HOLE on tmpfs). The page engine starts from this.
    pub fn populated_extents(&self) -> io::Result<Vec<(u64, u64)>> {
        let Some(memfd) = &self.memfd else {
            return Err(io::Error::other("anonymous guest memory has no extents"));
        };
        let fd = memfd.as_raw_fd();
        let size = self.layout.size() as libc::off_t;
        let mut out = Vec::new();
        let mut pos: libc::off_t = 0;
        while pos < size {
            // SAFETY: lseek on our own descriptor; no memory involved.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                return Err(err);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            out.push((data as u64, (hole - data) as u64));
            pos = hole;
        }
        Ok(out)
    }

    /// Pages of the guest view the kernel has mapped in (mincore): how the
    /// baseline, which has no page engine, counts what it touched.
    pub fn mapped_pages(&self) -> io::Result<u64> {
        let mut vec = vec![0u8; self.layout.pages() as usize];
        // SAFETY: the range is exactly our guest-view mapping and `vec` has
        // one byte per page of it.
        let ret = unsafe { libc::mincore(self.guest_view.ptr.as_ptr().cast(), self.guest_view.len, vec.as_mut_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|b| *b & 1 != 0).count() as u64)
    }

    /// Bytes of RAM the memfd holds right now (its allocated blocks); 0
    /// for anonymous memory.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.memfd.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let l = Layout::new(64 << 20).unwrap();
        assert_eq!(l.regions(), &[RamRegion { gpa: 0, len: 64 << 20, offset: 0 }]);
        assert_eq!(l.top(), 64 << 20);
        assert_eq!(l.pages(), 16384);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let l = Layout::new(8 << 30).unwrap();
        assert_eq!(
            l.regions(),
            &[RamRegion { gpa: 0, len: 3 << 30, offset: 0 }, RamRegion { gpa: 4 << 30, len: 5 << 30, offset: 3 << 30 }]
        );
        assert_eq!(l.gpa_to_offset((4 << 30) + 4096), Some((3 << 30) + 4096));
        assert_eq!(l.gpa_to_offset(3 << 30), None, "the hole is not RAM");
        assert_eq!(l.offset_to_gpa(3 << 30), Some(4 << 30));
        assert_eq!(l.top(), 9 << 30);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(Layout::new(0), Err(Error::Zero)));
        assert!(matches!(Layout::new((16 << 20) + 1), Err(Error::Unaligned(_))));
        assert!(matches!(Layout::new(1 << 20), Err(Error::TooSmall { .. })));
        assert!(matches!(Layout::new(MAX_MEMORY + PAGE_SIZE), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn a_64_gib_guest_allocates_nothing_up_front() {
        let mem = GuestMemory::new(Layout::new(64 << 30).unwrap()).unwrap();
        assert_eq!(mem.allocated_bytes(), 0);
        assert!(mem.populated_extents().unwrap().is_empty());
    }

    #[test]
    fn guest_memfd_is_sealed_at_its_size() {
        let mem = GuestMemory::new(Layout::new(16 << 20).unwrap()).unwrap();
        let fd = mem.memfd().unwrap().as_raw_fd();
        // SAFETY: F_GET_SEALS on our own descriptor.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_eq!(seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        assert!(mem.memfd().unwrap().set_len(8 << 20).is_err());
    }

    #[test]
    fn populated_extents_follow_writes() {
        use vm_memory::Bytes;
        let mem = GuestMemory::new(Layout::new(16 << 20).unwrap()).unwrap();
        mem.alias().write_slice(&[1u8; 10], GuestAddress(0x5000 + 7)).unwrap();
        mem.alias().write_slice(&[1u8; 5000], GuestAddress(0x10_0000)).unwrap();
        assert_eq!(mem.populated_extents().unwrap(), vec![(0x5000, 0x1000), (0x10_0000, 0x2000)]);
        assert_eq!(mem.allocated_bytes(), 3 * 4096);
    }

    /// Zeros written are punched out, runs at once, at an extent's start,
    /// middle and end; a page with one byte set stays.
    #[test]
    fn zero_pages_written_are_punched_and_others_stay() {
        use vm_memory::Bytes;
        let mem = GuestMemory::new(Layout::new(16 << 20).unwrap()).unwrap();
        // 0x10_0000.. : zero, zero, data, zero, zero, zero, data (last byte), zero
        mem.alias().write_slice(&[0u8; 8 * 4096], GuestAddress(0x10_0000)).unwrap();
        mem.alias().write_slice(&[7u8; 1], GuestAddress(0x10_2000 + 100)).unwrap();
        mem.alias().write_slice(&[9u8; 1], GuestAddress(0x10_7000 - 1)).unwrap();
        // a whole extent of zeros, and one of data
        mem.alias().write_slice(&[0u8; 4096], GuestAddress(0x5000)).unwrap();
        mem.alias().write_slice(&[1u8; 4096], GuestAddress(0x9000)).unwrap();
        assert_eq!(mem.allocated_bytes(), 10 * 4096);
        assert_eq!(mem.punch_zero_pages().unwrap(), 7);
        assert_eq!(mem.populated_extents().unwrap(), vec![(0x9000, 0x1000), (0x10_2000, 0x1000), (0x10_6000, 0x1000)]);
        assert_eq!(mem.allocated_bytes(), 3 * 4096);
        let mut b = [0u8; 4096];
        mem.alias().read_slice(&mut b, GuestAddress(0x10_6000)).unwrap();
        assert_eq!(b[4095], 9);
        mem.alias().read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        assert!(b.iter().all(|&x| x == 0), "a punched page reads as zeros");
    }
}
