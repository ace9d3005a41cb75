//! How a VM ends: every thread (vCPUs, fault handlers) reports to one
//! place, and the first event that ends the VM wins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

/// Something that happened to the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmEvent {
    /// A vCPU called HC_EXIT.
    Exit { vcpu: u64, status: u64 },
    /// A vCPU executed `hlt`; it stays stopped (no interrupts wake it).
    Halted { vcpu: u64 },
    /// The guest reset the machine (a Linux guest's `reboot`, or a panic
    /// with `panic=-1`).
    Reset { vcpu: u64 },
    /// The guest powered off (a Linux guest's `poweroff`, through ACPI).
    PowerOff { vcpu: u64 },
    /// The VM cannot go on.
    Failed(String),
}

/// The reporting end, shared by all threads.
#[derive(Debug)]
pub struct Control {
    stopping: AtomicBool,
    tx: Mutex<Sender<VmEvent>>,
}

impl Control {
    /// A control and the receiver the VM's main thread waits on.
    pub fn new() -> (Self, Receiver<VmEvent>) {
        let (tx, rx) = channel();
        (Control { stopping: AtomicBool::new(false), tx: Mutex::new(tx) }, rx)
    }

    /// Reports an event.
    pub fn report(&self, event: VmEvent) {
        // the receiver only goes away once the VM is over
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(event);
    }

    /// Reports a failure.
    pub fn fail(&self, why: impl std::fmt::Display) {
        self.report(VmEvent::Failed(why.to_string()));
    }

    /// Whether the VM is being stopped: vCPUs check this before every entry.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Marks the VM as stopping.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}
