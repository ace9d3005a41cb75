//! How far a vCPU has run since a moment, as the host can tell: counters
//! of a KVM vCPU's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14 and
//! later: `exits`, and `halt_exits` with `io_exits`), its thread's CPU
//! time and whether the thread is runnable. The page engine marks a vCPU
//! when it wakes it after a remote fault, and keeps the page until the
//! vCPU ran (its holds).
//! kvm-ioctls 0.25 has no call for the stats descriptor, so the ioctl and
//! the layout (`struct kvm_stats_header`, `struct kvm_stats_desc` in the
//! kernel's `uapi/linux/kvm.h`) are here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

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

/// A vCPU statistic, or the sum of several, readable from any thread at
/// any time (a `pread` of 8 bytes each; the vCPU may be running).
#[derive(Debug)]
pub struct VcpuStat {
    file: File,
    offsets: Vec<u64>,
}

impl VcpuStat {
    /// The statistic called `name` of `vcpu`; None when this kernel has
    /// no binary statistics, or no statistic of that name.
    pub fn open(vcpu: &VcpuFd, name: &str) -> Option<VcpuStat> {
        Self::sum(vcpu, &[name])
    }

    /// The sum of the statistics called `names` of `vcpu`; None when this
    /// kernel has no binary statistics, or lacks one of them.
    pub fn sum(vcpu: &VcpuFd, names: &[&str]) -> Option<VcpuStat> {
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
        let offset = |name: &str| {
            descs.chunks_exact(desc_size).find_map(|d| {
                let raw = &d[DESC_FIXED..];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                (&raw[..end] == name.as_bytes()).then(|| u32::from_ne_bytes([d[8], d[9], d[10], d[11]]))
            })
        };
        let offsets =
            names.iter().map(|n| offset(n).map(|o| data_offset as u64 + u64::from(o))).collect::<Option<_>>()?;
        let stat = VcpuStat { file, offsets };
        stat.read().map(|_| stat)
    }

    /// The statistic (the sum) now.
    pub fn read(&self) -> Option<u64> {
        self.offsets.iter().try_fold(0u64, |sum, &at| {
            let mut v = [0u8; 8];
            self.file.read_exact_at(&mut v, at).ok()?;
            Some(sum.wrapping_add(u64::from_ne_bytes(v)))
        })
    }
}

/// The statistics whose growth says a vCPU got through an instruction:
/// a halt, or port I/O (a vCPU's exits also count the faults on its
/// pages and interrupts of the host, which say nothing of the kind).
pub const DONE_STATS: [&str; 2] = ["halt_exits", "io_exits"];

/// Where a vCPU stood at a moment (its wake): its thread's CPU time and
/// KVM's counts of its exits and of [`DONE_STATS`] (where the kernel keeps
/// them).
#[derive(Clone, Debug)]
pub struct RunMark {
    tid: u32,
    clock: nix::time::ClockId,
    cpu: Duration,
    exits: Option<(Arc<VcpuStat>, u64)>,
    done: Option<(Arc<VcpuStat>, u64)>,
}

/// What a vCPU did since its [`RunMark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// It left the guest (KVM counted an exit): it entered it since.
    Exited,
    /// Its thread had the CPU time asked for.
    Long,
    /// It ran a little and sleeps again (halted, or waits for something),
    /// or its thread is gone.
    Slept,
}

impl RunMark {
    /// The vCPU run by thread `tid` of this process, now, with its `exits`
    /// and `done` statistics; None when its clock cannot be read (the
    /// thread is gone).
    pub fn now(tid: u32, exits: Option<Arc<VcpuStat>>, done: Option<Arc<VcpuStat>>) -> Option<RunMark> {
        // Linux's CPU-time clock of one thread (`MAKE_THREAD_CPUCLOCK` in
        // the kernel's posix-cpu-timers, what glibc's
        // pthread_getcpuclockid returns): the bitwise complement of the
        // tid shifted by 3, with the per-thread flag (4) and the
        // scheduler-time clock (2). Readable for threads of this process.
        let clock = nix::time::ClockId::from_raw((!(tid as libc::clockid_t) << 3) | 6);
        let cpu = nix::time::clock_gettime(clock).ok()?.into();
        let exits = exits.and_then(|e| e.read().map(|n| (e, n)));
        let done = done.and_then(|e| e.read().map(|n| (e, n)));
        Some(RunMark { tid, clock, cpu, exits, done })
    }

    /// Whether the vCPU got on since the mark, surely: its thread had
    /// `long` of CPU time (or is gone), or it halted or did port I/O
    /// ([`DONE_STATS`]). For a caller that must not take any exit, or a
    /// sleep, for progress (a vCPU faulting now sleeps in the fault).
    pub fn ran_on(&self, long: Duration) -> bool {
        self.cpu_since().is_none_or(|ran| ran >= long) || Self::grew(&self.done)
    }

    /// What the vCPU did since the mark; None while it has not run (or
    /// runs, with less than `long` of CPU time and no exit).
    pub fn since(&self, long: Duration) -> Option<Ran> {
        if Self::grew(&self.exits) {
            return Some(Ran::Exited);
        }
        let Some(ran) = self.cpu_since() else {
            return Some(Ran::Slept);
        };
        if ran >= long {
            return Some(Ran::Long);
        }
        // a thread preempted before it got far is runnable: not yet
        (!ran.is_zero() && !runnable(self.tid)).then_some(Ran::Slept)
    }

    /// The thread's CPU time since the mark; None when it is gone.
    fn cpu_since(&self) -> Option<Duration> {
        nix::time::clock_gettime(self.clock).ok().map(|t| Duration::from(t).saturating_sub(self.cpu))
    }

    /// Whether a statistic grew since the mark (false where the kernel
    /// keeps none).
    fn grew(stat: &Option<(Arc<VcpuStat>, u64)>) -> bool {
        stat.as_ref().is_some_and(|(s, before)| s.read().is_some_and(|now| now != *before))
    }
}

/// Whether thread `tid` of this process is running or runnable (its state
/// in procfs is `R`); false when it is gone.
fn runnable(tid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // "tid (comm) S ...": the name may hold spaces and parentheses
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('R'))
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
        let done = VcpuStat::sum(&vcpu, &DONE_STATS).expect("halts and port I/O");
        assert_eq!(done.read(), Some(0));
        assert!(VcpuStat::sum(&vcpu, &["exits", "no such statistic"]).is_none());
        assert!(VcpuStat::open(&vcpu, "no such statistic").is_none());
    }

    /// A mark of a thread that then spins sees it run long; a mark of a
    /// thread that sleeps after a little work sees it sleep.
    #[test]
    fn a_mark_tells_a_spinning_thread_from_a_sleeping_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            // spins for CPU time of its own, not wall time: a thread that
            // spun 20 ms of a busy host's wall clock may have had less
            // than the 5 ms the mark waits for, and then waits for ever
            let cpu = || Duration::from(nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap());
            while let Ok(spin) = go_rx.recv() {
                let start = cpu();
                let until = if spin { Duration::from_millis(20) } else { Duration::from_micros(200) };
                while cpu() - start < until {
                    std::hint::spin_loop();
                }
            }
        });
        let tid = rx.recv().unwrap();
        // marked once it sleeps in recv: a mark while it still runs toward
        // it would see it run a little and sleep
        let start = std::time::Instant::now();
        while runnable(tid) {
            assert!(start.elapsed() < Duration::from_secs(10), "the thread never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mark = RunMark::now(tid, None, None).expect("a live thread's clock");
        assert_eq!(mark.since(Duration::from_millis(5)), None, "it has not run since");
        assert!(!mark.ran_on(Duration::from_millis(5)));
        go_tx.send(true).unwrap();
        let start = std::time::Instant::now();
        while mark.since(Duration::from_millis(5)) != Some(Ran::Long) {
            assert!(start.elapsed() < Duration::from_secs(10), "{:?}", mark.since(Duration::from_millis(5)));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(mark.ran_on(Duration::from_millis(5)));
        let mark = RunMark::now(tid, None, None).unwrap();
        go_tx.send(false).unwrap();
        let start = std::time::Instant::now();
        while mark.since(Duration::from_secs(60)) != Some(Ran::Slept) {
            assert!(start.elapsed() < Duration::from_secs(10), "{:?}", mark.since(Duration::from_secs(60)));
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(go_tx);
        t.join().unwrap();
    }
}
