//! A thin, safe wrapper over Linux userfaultfd, for the page engine.
//!
//! We do not use the `userfaultfd` crate (0.9): its `zeropage` and `copy`
//! drop the count of bytes already resolved when the ioctl fails part way
//! (we need it to keep the page states exact), it lacks the MINOR_SHMEM and
//! CONTINUE constants, and its sys crate runs bindgen (libclang) at build
//! time for a dozen constants. The kernel ABI below is stable
//! (include/uapi/linux/userfaultfd.h).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

/// Ask the kernel to report the id of the faulting thread.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// Missing-page faults on shared memory (memfd, tmpfs).
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;

/// Minor faults on shared memory: a page in the memfd but not mapped in
/// the registered view (the pod's way to take a page from the guest while
/// keeping its bytes for a peer's read).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// Write-protect faults on shared memory: a page mapped read-only (a read
/// copy of a page another node owns) traps the guest's first write.
pub const FEATURE_WP_SHMEM: u64 = 1 << 12;

const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const REGISTER_MODE_MINOR: u64 = 4;
const CONTINUE_MODE_DONTWAKE: u64 = 1;
const CONTINUE_MODE_WP: u64 = 2;
const ZEROPAGE_MODE_DONTWAKE: u64 = 1;
const COPY_MODE_DONTWAKE: u64 = 1;
const COPY_MODE_WP: u64 = 2;
const WRITEPROTECT_MODE_WP: u64 = 1;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 2;

const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;
const PAGEFAULT_FLAG_WP: u64 = 2;
const PAGEFAULT_FLAG_MINOR: u64 = 4;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg`: 32 bytes, the page-fault arm of its union.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioContinue);

// USERFAULTFD_IOC_NEW on /dev/userfaultfd: _IO(0xAA, 0x00)
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot create a userfaultfd that sees KVM's faults: {0}; run shoal as root, \
         or set sysctl vm.unprivileged_userfaultfd=1, or grant access to /dev/userfaultfd"
    )]
    Create(#[source] io::Error),
    #[error("userfaultfd API handshake failed: {0}")]
    Api(#[source] io::Error),
    #[error("this kernel's userfaultfd lacks features {missing:#x} (has {have:#x}); shoal needs Linux 5.x or newer")]
    Features { missing: u64, have: u64 },
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(#[source] io::Error),
    #[error("userfaultfd {op} at {addr:#x} (+{len:#x}) failed after {done:#x} bytes: {source}")]
    Resolve {
        op: &'static str,
        addr: u64,
        len: u64,
        done: u64,
        #[source]
        source: io::Error,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One page-fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host-virtual address (page-aligned by the kernel unless
    /// UFFD_FEATURE_EXACT_ADDRESS is set).
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// A write to a page mapped write-protected (a read copy).
    pub wp: bool,
    /// The page is in the memfd but not mapped in the view (minor fault).
    pub minor: bool,
    /// Thread id of the faulting thread (0 when the kernel does not say).
    pub tid: u32,
}

/// How far a resolving ioctl got. The kernel maps a range page by page and
/// stops at the first page it cannot map; what it reports tells the caller
/// how to re-plan from its page states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole range is now mapped.
    Done,
    /// The first `done` bytes were mapped, then the kernel stopped (it does
    /// not say why: the next attempt from there will).
    Partial { done: u64 },
    /// The range's first page is present already (EEXIST); nothing mapped.
    Exists,
    /// The address space is changing under us (EAGAIN); nothing mapped,
    /// try again.
    Retry,
}

/// A userfaultfd, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd that also sees faults taken by the kernel on our
    /// behalf (KVM), and enables `features` (all must be supported).
    pub fn new(features: u64) -> Result<Self> {
        let fd = Self::open().map_err(Error::Create)?;
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: `fd` is a userfaultfd we own and `api` is a properly
        // sized, writable uffdio_api the kernel fills in.
        let ret = unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) };
        if ret < 0 {
            return Err(Error::Api(io::Error::last_os_error()));
        }
        if api.features & features != features {
            return Err(Error::Features { missing: features & !api.features, have: api.features });
        }
        Ok(Uffd { fd })
    }

    fn open() -> io::Result<OwnedFd> {
        // Not UFFD_USER_MODE_ONLY: KVM touches guest memory from the kernel
        // (get_user_pages on a vCPU's behalf), and with that flag those
        // faults are never delivered: the vCPU would block forever.
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes only flags and returns a new
        // descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us; nobody
            // else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let syscall_err = io::Error::last_os_error();
        // Kernels with vm.unprivileged_userfaultfd=0 still hand out
        // userfaultfds through /dev/userfaultfd to whoever may open it.
        let dev = match File::options().read(true).write(true).open("/dev/userfaultfd") {
            Ok(dev) => dev,
            Err(_) => return Err(syscall_err),
        };
        // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and
        // returns a new descriptor or -1.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above, a fresh descriptor from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Registers `[start, start + len)` for missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<()> {
        self.register(start, len, REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start + len)` for missing-page and minor faults
    /// (needs [`FEATURE_MINOR_SHMEM`]). Minor mode alone would not do: a
    /// page never populated would be zero-filled by the kernel without
    /// asking us.
    pub fn register_missing_and_minor(&self, start: u64, len: u64) -> Result<()> {
        self.register(start, len, REGISTER_MODE_MISSING | REGISTER_MODE_MINOR)
    }

    /// Registers `[start, start + len)` for missing, minor and
    /// write-protect faults (needs [`FEATURE_MINOR_SHMEM`] and
    /// [`FEATURE_WP_SHMEM`]): a pod node maps read copies of pages
    /// write-protected, so the guest's first write to one traps.
    pub fn register_pod(&self, start: u64, len: u64) -> Result<()> {
        self.register(start, len, REGISTER_MODE_MISSING | REGISTER_MODE_MINOR | REGISTER_MODE_WP)
    }

    fn register(&self, start: u64, len: u64, mode: u64) -> Result<()> {
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
        // SAFETY: `reg` is a valid uffdio_register; the kernel checks the
        // range against our own mappings and fails cleanly otherwise.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) };
        if ret < 0 {
            return Err(Error::Register(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Unregisters a range. Every thread blocked on a fault in it wakes up,
    /// and later faults there are served by the kernel: the last resort that
    /// guarantees no vCPU stays blocked when the page engine gives up.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid uffdio_range.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_UNREGISTER(), &mut range) };
        if ret < 0 {
            return Err(Error::Register(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Maps freshly zeroed pages over `[start, start + len)`. On shared
    /// memory these are real pages (not the shared zero page), mapped
    /// writable.
    pub fn zeropage(&self, start: u64, len: u64, wake: bool) -> Result<Outcome> {
        let mut zp = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if wake { 0 } else { ZEROPAGE_MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: `zp` is a valid uffdio_zeropage. The kernel only maps
        // pages into a range registered with this userfaultfd, which is
        // guest memory we own and never hand out as Rust references.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut zp) };
        Self::outcome("zeropage", start, len, ret, zp.zeropage)
    }

    /// Copies `len` bytes from `src` into the registered range at `dst`,
    /// allocating the pages.
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<Outcome> {
        self.copy_mode(dst, src, wake, false)
    }

    /// As [`Uffd::copy`]; `read_only` maps the pages write-protected (the
    /// range must be registered for write-protect faults).
    pub fn copy_mode(&self, dst: u64, src: &[u8], wake: bool, read_only: bool) -> Result<Outcome> {
        let len = src.len() as u64;
        let mode = if wake { 0 } else { COPY_MODE_DONTWAKE } | if read_only { COPY_MODE_WP } else { 0 };
        let mut cp = UffdioCopy { dst, src: src.as_ptr() as u64, len, mode, copy: 0 };
        // SAFETY: `src` is a live slice of `len` bytes the kernel only
        // reads; `dst` must lie in a range registered with this
        // userfaultfd, which the kernel checks.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut cp) };
        Self::outcome("copy", dst, len, ret, cp.copy)
    }

    /// Maps the pages the memfd already holds over `[start, start + len)`
    /// (resolves minor faults).
    pub fn continue_(&self, start: u64, len: u64, wake: bool) -> Result<Outcome> {
        self.continue_mode(start, len, wake, false)
    }

    /// As [`Uffd::continue_`]; `read_only` maps the pages write-protected
    /// (Linux 6.6 and later; the range must be registered for
    /// write-protect faults).
    pub fn continue_mode(&self, start: u64, len: u64, wake: bool, read_only: bool) -> Result<Outcome> {
        let mode = if wake { 0 } else { CONTINUE_MODE_DONTWAKE } | if read_only { CONTINUE_MODE_WP } else { 0 };
        let mut c = UffdioContinue { range: UffdioRange { start, len }, mode, mapped: 0 };
        // SAFETY: `c` is a valid uffdio_continue; the kernel only maps
        // pages of the backing file into a range registered with this
        // userfaultfd.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_CONTINUE(), &mut c) };
        Self::outcome("continue", start, len, ret, c.mapped)
    }

    fn outcome(op: &'static str, addr: u64, len: u64, ret: i32, done: i64) -> Result<Outcome> {
        if ret == 0 {
            return Ok(Outcome::Done);
        }
        // The count field holds the bytes mapped, or -errno when none were.
        let err = io::Error::last_os_error();
        match (err.raw_os_error(), u64::try_from(done)) {
            (Some(libc::EAGAIN), Ok(done)) if done > 0 => Ok(Outcome::Partial { done }),
            (Some(libc::EAGAIN), _) => Ok(Outcome::Retry),
            (Some(libc::EEXIST), _) => Ok(Outcome::Exists),
            _ => Err(Error::Resolve { op, addr, len, done: u64::try_from(done).unwrap_or(0), source: err }),
        }
    }

    /// Write-protects `[start, start + len)` (`protect`), or lifts the
    /// protection; then `wake` wakes the threads blocked on write-protect
    /// faults there. Pages not mapped are left alone.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool, wake: bool) -> Result<()> {
        // the kernel refuses DONTWAKE with WP (protecting wakes nobody)
        let mode = if protect {
            WRITEPROTECT_MODE_WP
        } else if wake {
            0
        } else {
            WRITEPROTECT_MODE_DONTWAKE
        };
        let mut w = UffdioWriteprotect { range: UffdioRange { start, len }, mode };
        // SAFETY: `w` is a valid uffdio_writeprotect; the kernel only
        // changes the protection of our own mappings in a registered range.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WRITEPROTECT(), &mut w) };
        if ret < 0 {
            let op = if protect { "write-protect" } else { "unprotect" };
            return Err(Error::Resolve { op, addr: start, len, done: 0, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Wakes the threads blocked on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid uffdio_range.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WAKE(), &mut range) };
        if ret < 0 {
            return Err(Error::Resolve { op: "wake", addr: start, len, done: 0, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Whether events wait to be read (a non-blocking poll).
    pub fn has_events(&self) -> bool {
        let mut fd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd struct; a zero timeout does not block.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents & libc::POLLIN != 0
    }

    /// Reads the pending page-fault events into `out` (cleared first);
    /// returns without blocking when there are none. Other events are
    /// ignored: we register for none.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<()> {
        const BATCH: usize = 64;
        let mut msgs = [UffdMsg::default(); BATCH];
        out.clear();
        // SAFETY: we read into a buffer of BATCH plain-old-data uffd_msg
        // structs we own, of exactly the size we pass.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(Error::Read(err)),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for m in &msgs[..count] {
            if m.event == EVENT_PAGEFAULT {
                out.push(Fault {
                    addr: m.address,
                    write: m.flags & PAGEFAULT_FLAG_WRITE != 0,
                    wp: m.flags & PAGEFAULT_FLAG_WP != 0,
                    minor: m.flags & PAGEFAULT_FLAG_MINOR != 0,
                    tid: m.ptid,
                });
            }
        }
        Ok(())
    }
}

/// Whether this kernel maps pages write-protected with `UFFDIO_CONTINUE`
/// (`UFFDIO_CONTINUE_MODE_WP`, Linux 6.6 and later; Debian 12's 6.1 has
/// not). Without it a pod node makes no read copies and takes every page
/// it touches for writing (pages read on several nodes then move instead
/// of being shared). Probed once, on a scratch memfd of one page.
pub fn continue_wp_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| probe_continue_wp().unwrap_or(false))
}

fn probe_continue_wp() -> io::Result<bool> {
    let page = 4096usize;
    let file = crate::memory::memfd(c"shoal-probe", nix::sys::memfd::MemFdCreateFlag::empty())?;
    file.set_len(page as u64)?;
    // the page exists in the memfd (written through the file), so a touch
    // of the registered mapping would be a minor fault
    std::os::unix::fs::FileExt::write_all_at(&file, &[1u8], 0)?;
    // SAFETY: a new shared mapping of our memfd at an address the kernel
    // picks; unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        let uffd = Uffd::new(FEATURE_MINOR_SHMEM | FEATURE_WP_SHMEM).map_err(|e| io::Error::other(e.to_string()))?;
        uffd.register(addr as u64, page as u64, REGISTER_MODE_MINOR | REGISTER_MODE_WP)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(uffd.continue_mode(addr as u64, page as u64, false, true).is_ok())
    })();
    // SAFETY: we mapped exactly this range above; nothing refers to it.
    unsafe { libc::munmap(addr, page) };
    result
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_continue_wp_probe_answers_without_failing() {
        // whichever the answer, asking twice gives the same one
        assert_eq!(continue_wp_supported(), continue_wp_supported());
    }

    #[test]
    fn abi_struct_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // values from include/uapi/linux/userfaultfd.h on x86-64
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(UFFDIO_CONTINUE(), 0xc020_aa07);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
    }
}
