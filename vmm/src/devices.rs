//! Port-I/O devices of a unikernel guest: the 16550 serial port at 0x3f8
//! (vm-superio) and the hypercall port (print, exit, clock, info; see
//! `shoal_guest_images::abi`). Both write to one console on stdout.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_guest_images::abi;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::memory::GuestMemory;
use crate::pager::Pager;

/// How the devices read guest memory for a hypercall.
#[derive(Debug, Clone)]
pub enum GuestReader {
    /// Through the pager, which knows which pages are dormant and must not
    /// be materialised by a read.
    Paged(Arc<Pager>),
    /// Straight from memory that has no pager (the anonymous baseline).
    Direct(Arc<GuestMemory>),
    /// Through the guest view, as the guest reads (a pod's node 0: a page
    /// held elsewhere is faulted in through the page engine).
    GuestView(Arc<GuestMemory>),
}

impl GuestReader {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        match self {
            GuestReader::Paged(p) => p.read_guest(gpa, buf).map_err(|e| e.to_string()),
            GuestReader::GuestView(m) => {
                let layout = m.layout();
                let len = buf.len() as u64;
                let offset = layout
                    .region_of_gpa(gpa)
                    .filter(|r| gpa.checked_add(len).is_some_and(|end| end <= r.end()))
                    .and_then(|_| layout.gpa_to_offset(gpa))
                    .ok_or_else(|| format!("guest memory at {gpa:#x} (+{len:#x}) is outside RAM"))?;
                m.read_guest_view(offset, buf);
                Ok(())
            }
            GuestReader::Direct(m) => {
                use vm_memory::Bytes;
                m.alias().read_slice(buf, vm_memory::GuestAddress(gpa)).map_err(|e| e.to_string())
            }
        }
    }
}

/// First port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Longest buffer HC_PRINT accepts in one call.
pub const PRINT_MAX: u64 = 64 << 10;

/// The guest console: bytes are kept until a newline, then written to
/// stdout in one piece (the serial device flushes after every byte, which
/// would cost a syscall per character and interleave lines of vCPUs).
pub struct Console {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console { out, line: Vec::with_capacity(256) }
    }

    /// Adds guest output.
    pub fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.flush_line();
            }
        }
    }

    /// Writes out what is buffered (at exit: a last line with no newline).
    pub fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        // the console is best effort: a closed stdout must not kill the VM
        let _ = self.out.write_all(&self.line);
        let _ = self.out.flush();
        self.line.clear();
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("buffered", &self.line.len()).finish()
    }
}

/// What the serial device writes to: the shared console.
#[derive(Debug, Clone)]
pub struct ConsoleWriter(pub Arc<Mutex<Console>>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).put(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // lines go out when complete
    }
}

/// The serial port's interrupt line. A unikernel guest has no interrupt
/// controller (`None`: the guest polls the line status register); a Linux
/// guest's goes to IRQ 4 of the in-kernel PIC/IOAPIC through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub Option<vmm_sys_util::eventfd::EventFd>);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// The i8042 keyboard controller's ports: only its reset line is wired
/// (`reboot` in a Linux guest with `reboot=k`).
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// What a port write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// The guest wrote its exit status to [`abi::EXIT_PORT`].
    Exit(u8),
    /// The guest pulsed the reset line (i8042).
    Reset,
}

/// Facts HC_INFO answers, and the clock HC_CLOCK_NS reads.
#[derive(Clone, Copy, Debug)]
pub struct GuestInfo {
    pub num_vcpus: u64,
    /// This node: the node a vCPU asking runs on.
    pub node_id: u64,
    pub num_nodes: u64,
    pub mem_bytes: u64,
    /// When the VM started, on this host's monotonic clock (on a pod's
    /// other nodes: node 0's start, as node 0 told it at the pod's start).
    pub clock_start: Instant,
}

/// What a hypercall asks the vCPU loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcResult {
    /// Put this value in rax and continue.
    Return(u64),
    /// The guest ended with this status.
    Exit(u64),
}

/// The devices all vCPUs share.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<Serial<IrqLine, NoEvents, ConsoleWriter>>,
    console: Arc<Mutex<Console>>,
    memory: GuestReader,
    start: Instant,
    info: GuestInfo,
}

impl Devices {
    pub fn new(console: Arc<Mutex<Console>>, memory: GuestReader, info: GuestInfo, irq: IrqLine) -> Self {
        let serial = Serial::new(irq, ConsoleWriter(console.clone()));
        Devices { serial: Mutex::new(serial), console, memory, start: info.clock_start, info }
    }

    /// The console (to flush at exit).
    pub fn console(&self) -> &Arc<Mutex<Console>> {
        &self.console
    }

    /// An `in` from `port`. Unclaimed ports read as all ones, like an empty
    /// ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(offset) = serial_offset(port) {
            if let Some(b) = data.first_mut() {
                *b = self.serial.lock().unwrap_or_else(|p| p.into_inner()).read(offset);
            }
            return;
        }
        if port == I8042_COMMAND || port == I8042_DATA {
            // status: no data, ready for a command
            data.fill(0);
            return;
        }
        data.fill(0xff);
    }

    /// Bytes typed at shoal's stdin, for the guest's serial console (and
    /// its interrupt, when it has one).
    pub fn serial_input(&self, bytes: &[u8]) {
        if let Err(e) = self.serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_raw_bytes(bytes) {
            tracing::debug!(error = ?e, "serial input dropped");
        }
    }

    /// An `out` to `port` other than the hypercall port; what it asks of
    /// the VM, if anything. Unclaimed ports are ignored.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<PortEvent> {
        let b = *data.first()?;
        if let Some(offset) = serial_offset(port) {
            if let Err(e) = self.serial.lock().unwrap_or_else(|p| p.into_inner()).write(offset, b) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        } else if port == abi::EXIT_PORT {
            return Some(PortEvent::Exit(b));
        } else if port == I8042_COMMAND && b == I8042_RESET {
            return Some(PortEvent::Reset);
        } else {
            tracing::trace!(port, "write to an unclaimed port");
        }
        None
    }

    /// Runs hypercall `nr` for vCPU `vcpu` with arguments (rdi, rsi, rcx).
    pub fn hypercall(&self, vcpu: u64, nr: u32, args: [u64; 3]) -> HcResult {
        match nr {
            abi::HC_PRINT => HcResult::Return(self.print(args[0], args[1])),
            abi::HC_EXIT => HcResult::Exit(args[0]),
            abi::HC_CLOCK_NS => HcResult::Return(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            abi::HC_INFO => HcResult::Return(match args[0] {
                abi::INFO_VCPU_ID => vcpu,
                abi::INFO_NUM_VCPUS => self.info.num_vcpus,
                abi::INFO_NODE_ID => self.info.node_id,
                abi::INFO_NUM_NODES => self.info.num_nodes,
                abi::INFO_MEM_BYTES => self.info.mem_bytes,
                _ => u64::MAX,
            }),
            _ => {
                tracing::debug!(vcpu, nr, "unknown hypercall");
                HcResult::Return(u64::MAX)
            }
        }
    }

    fn print(&self, gpa: u64, len: u64) -> u64 {
        if len > PRINT_MAX {
            return u64::MAX;
        }
        let mut buf = vec![0u8; len as usize];
        match self.memory.read(gpa, &mut buf) {
            Ok(()) => {
                self.console.lock().unwrap_or_else(|p| p.into_inner()).put(&buf);
                0
            }
            Err(e) => {
                tracing::debug!(error = %e, "HC_PRINT outside guest RAM");
                u64::MAX
            }
        }
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    port.checked_sub(SERIAL_PORT).filter(|o| *o < 8).map(|o| o as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_writes_whole_lines() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        c.put(b"hel");
        assert!(sink.0.lock().unwrap().is_empty());
        c.put(b"lo\nwor");
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        c.flush_line();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\nwor");
    }

    #[test]
    fn serial_ports_map_to_offsets() {
        assert_eq!(serial_offset(0x3f8), Some(0));
        assert_eq!(serial_offset(0x3ff), Some(7));
        assert_eq!(serial_offset(0x400), None);
        assert_eq!(serial_offset(0x3f7), None);
    }
}
