//! The fault-handler threads of a node: read the guest view's
//! userfaultfd and hand each fault to the page engine. Several threads
//! read the one userfaultfd (each event goes to one reader), so faults of
//! different vCPUs reach the engine in parallel.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::Engine;
use crate::uffd::{Fault, Uffd};

/// Running fault-handler threads.
#[derive(Debug)]
pub struct FaultHandlers {
    threads: Vec<JoinHandle<()>>,
    stop: EventFd,
}

/// What a handler thread does when a fault cannot be resolved: end the VM.
pub type OnFatal = Arc<dyn Fn(String) + Send + Sync>;

impl FaultHandlers {
    /// Starts `count` handler threads for `engine`, whose userfaultfd they
    /// read; thread `i` is pinned to `cpus[i]` when given.
    pub fn spawn(engine: Arc<Engine>, count: usize, cpus: Option<&[usize]>, on_fatal: OnFatal) -> io::Result<Self> {
        let uffd = engine.uffd_arc().ok_or_else(|| io::Error::other("the page engine has no userfaultfd to serve"))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let engine = engine.clone();
            let uffd = uffd.clone();
            let on_fatal = on_fatal.clone();
            let cpu = cpus.map(|c| c[i % c.len()]);
            let spawned = stop.try_clone().and_then(|stop| {
                std::thread::Builder::new().name(format!("shoal-fault{i}")).spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = crate::vcpu::pin_current_thread(cpu) {
                            tracing::warn!(error = %e, "running unpinned");
                        }
                    }
                    serve(&engine, &uffd, &stop, &*on_fatal)
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

    /// Stops the threads (the engine keeps the faults' latencies).
    pub fn stop(self) {
        // a failed write leaves the threads blocked in poll: they would
        // never be joined, so this must not fail silently
        self.stop.write(1).expect("signal the fault handlers to stop");
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a fault handler thread panicked");
            }
        }
    }
}

fn serve(engine: &Engine, uffd: &Uffd, stop: &EventFd, on_fatal: &(dyn Fn(String) + Send + Sync)) {
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut fds = [
        libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
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
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if let Err(e) = uffd.read_faults(&mut faults) {
            on_fatal(e.to_string());
            return;
        }
        engine.faults_read(faults.len());
        for f in &faults {
            // a bug must end the VM, not leave this fault's vCPU blocked
            let resolved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.handle_fault(*f)))
                .unwrap_or_else(|_| Err("internal error resolving a page fault (see the panic above)".into()));
            if let Err(e) = resolved {
                tracing::debug!(addr = f.addr, tid = f.tid, "fault not resolved");
                on_fatal(e);
                return;
            }
        }
    }
}
