//! One counter of a KVM vCPU's binary statistics (`KVM_GET_STATS_FD`,
//! Linux 5.14 and later): the page engine reads `exits` to tell that a
//! vCPU it woke has run in the guest since (see the engine's holds).
//! kvm-ioctls 0.25 has no call for the stats descriptor, so the ioctl and
//! the layout (`struct kvm_stats_header`, `struct kvm_stats_desc` in the
//! kernel's `uapi/linux/kvm.h`) are here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
/// `struct kvm_stats_header`: flags, name_size, num_desc, id_offset,
/// desc_offset, data_offset (six u32).
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` before its name: flags (u32), exponent (i16),
/// size (u16, in u64 words), offset (u32, into the data block),
/// bucket_size (u32).
const DESC_FIXED: usize = 16;
/// Descriptor blocks longer than this are not a kernel's: refused.
const MAX_DESC_BYTES: usize = 1 << 20;

/// A vCPU statistic, readable from any thread at any time (a `pread` of 8
/// bytes; the vCPU may be running).
#[derive(Debug)]
pub struct VcpuStat {
    file: File,
    offset: u64,
}

impl VcpuStat {
    /// The statistic called `name` of `vcpu`; None when this kernel has
    /// no binary statistics, or no statistic of that name.
    pub fn open(vcpu: &VcpuFd, name: &str) -> Option<VcpuStat> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new
        // file descriptor (or -1); `vcpu` is a live vCPU descriptor.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0).ok()?;
        let word = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap_or_default()) as usize;
        let (name_size, count, desc_offset, data_offset) = (word(1), word(2), word(4), word(5));
        let desc_size = DESC_FIXED + name_size;
        let total = desc_size.checked_mul(count).filter(|&t| t <= MAX_DESC_BYTES)?;
        let mut descs = vec![0u8; total];
        file.read_exact_at(&mut descs, desc_offset as u64).ok()?;
        let offset = descs.chunks_exact(desc_size).find_map(|d| {
            let raw = &d[DESC_FIXED..];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            (&raw[..end] == name.as_bytes()).then(|| u32::from_ne_bytes([d[8], d[9], d[10], d[11]]))
        })?;
        let stat = VcpuStat { file, offset: data_offset as u64 + u64::from(offset) };
        stat.read().map(|_| stat)
    }

    /// The statistic now.
    pub fn read(&self) -> Option<u64> {
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, self.offset).ok()?;
        Some(u64::from_ne_bytes(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU's exit count is found and read (where this kernel keeps
    /// binary statistics: it does from Linux 5.14); an unknown name is
    /// None.
    #[test]
    fn a_vcpu_exit_count_is_read() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("\n*** SKIPPED: no /dev/kvm ***");
            return;
        };
        if kvm.check_extension_raw(kvm_bindings::KVM_CAP_BINARY_STATS_FD.into()) <= 0 {
            eprintln!("\n*** SKIPPED: this kernel keeps no binary statistics ***");
            return;
        }
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let exits = VcpuStat::open(&vcpu, "exits").expect("exits");
        assert_eq!(exits.read(), Some(0), "a vCPU that never ran has no exits");
        assert!(VcpuStat::open(&vcpu, "no such statistic").is_none());
    }
}
