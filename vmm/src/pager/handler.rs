//! The fault-handler threads: read userfaultfd, hand each fault to the
//! node's resolver (the single-node [`Pager`], or a pod's page engine).
//! Several threads read the one userfaultfd (each event goes to one
//! reader), so faults of different vCPUs resolve in parallel.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::Pager;
use crate::metrics::FaultLatency;
use crate::uffd::{Fault, Uffd};

/// What resolves the faults one userfaultfd reports.
pub trait Resolver: Send + Sync {
    /// The userfaultfd to read.
    fn uffd(&self) -> &Uffd;
    /// Resolves (or starts resolving) one fault; records its latency in
    /// `latency` when it is resolved here and now. An error ends the VM.
    fn resolve(&self, fault: Fault, latency: &mut FaultLatency) -> Result<(), String>;
}

impl Resolver for Pager {
    fn uffd(&self) -> &Uffd {
        Pager::uffd(self)
    }

    fn resolve(&self, fault: Fault, latency: &mut FaultLatency) -> Result<(), String> {
        let start = Instant::now();
        self.handle_fault(fault).map_err(|e| e.to_string())?;
        latency.record(start.elapsed());
        Ok(())
    }
}

impl Resolver for crate::pod::engine::Engine {
    fn uffd(&self) -> &Uffd {
        self.uffd().expect("a pod node with vCPUs has a userfaultfd")
    }

    /// The engine times each fault itself, from its arrival to the wake
    /// (which may come from the receiver thread, after a round trip).
    fn resolve(&self, fault: Fault, _latency: &mut FaultLatency) -> Result<(), String> {
        self.handle_fault(fault)
    }
}

/// Running fault-handler threads.
#[derive(Debug)]
pub struct FaultHandlers {
    threads: Vec<JoinHandle<FaultLatency>>,
    stop: EventFd,
}

/// What a handler thread does when a fault cannot be resolved: end the VM.
pub type OnFatal = Arc<dyn Fn(String) + Send + Sync>;

impl FaultHandlers {
    /// Starts `count` handler threads; thread `i` is pinned to `cpus[i]`
    /// when given.
    pub fn spawn(
        pager: Arc<dyn Resolver>,
        count: usize,
        cpus: Option<&[usize]>,
        on_fatal: OnFatal,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let pager = pager.clone();
            let on_fatal = on_fatal.clone();
            let cpu = cpus.map(|c| c[i % c.len()]);
            let spawned = stop.try_clone().and_then(|stop| {
                std::thread::Builder::new().name(format!("shoal-fault{i}")).spawn(move || {
                    if let Some(cpu) = cpu {
                        crate::vcpu::pin_current_thread(cpu);
                    }
                    serve(&*pager, &stop, &*on_fatal)
                })
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // stop the ones that started rather than leave them
                    // blocked in poll forever
                    FaultHandlers { threads, stop }.stop();
                    return Err(e);
                }
            }
        }
        Ok(FaultHandlers { threads, stop })
    }

    /// Stops the threads and returns their merged latencies.
    pub fn stop(self) -> FaultLatency {
        // a failed write leaves the threads blocked in poll: they would
        // never be joined, so this must not fail silently
        self.stop.write(1).expect("signal the fault handlers to stop");
        let mut all = FaultLatency::default();
        for t in self.threads {
            match t.join() {
                Ok(l) => all.merge(&l),
                Err(_) => tracing::error!("a fault handler thread panicked"),
            }
        }
        all
    }
}

fn serve(pager: &dyn Resolver, stop: &EventFd, on_fatal: &(dyn Fn(String) + Send + Sync)) -> FaultLatency {
    let mut latency = FaultLatency::default();
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut fds = [
        libc::pollfd { fd: pager.uffd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            on_fatal(format!("waiting for page faults failed: {err}"));
            return latency;
        }
        if fds[1].revents != 0 {
            return latency;
        }
        if let Err(e) = pager.uffd().read_faults(&mut faults) {
            on_fatal(e.to_string());
            return latency;
        }
        for f in &faults {
            // a bug must end the VM, not leave this fault's vCPU blocked
            let resolved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pager.resolve(*f, &mut latency)))
                .unwrap_or_else(|_| Err("internal error resolving a page fault (see the panic above)".into()));
            match resolved {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(addr = f.addr, tid = f.tid, "fault not resolved");
                    on_fatal(e);
                    return latency;
                }
            }
        }
    }
}
