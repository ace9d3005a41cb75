//! Port-I/O devices: the 16550 serial port at 0x3f8 (vm-superio) and the
//! hypercall port (print, exit, clock, info; see
//! `shoal_guest_images::abi`), both writing to one console on stdout; the
//! exit port; and for Linux guests the i8042's reset line, ACPI's PM1
//! registers ([`AcpiPm`]: power-off) and the virtio devices' MMIO
//! registers (`virtio`). They live on node 0.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_guest_images::abi;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::memory::GuestMemory;

/// How the devices read guest memory for a hypercall.
#[derive(Debug, Clone)]
pub enum GuestReader {
    /// Straight from memory that has no page engine (the anonymous
    /// baseline).
    Direct(Arc<GuestMemory>),
    /// Through the guest view, as the guest reads: a page not here yet is
    /// faulted in through the page engine.
    GuestView(Arc<GuestMemory>),
}

impl GuestReader {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        match self {
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
/// (a Linux guest's `reboot`: the FADT's reset register, and the kernel's
/// fallback after it).
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = crate::acpi::RESET_PORT;
const I8042_RESET: u8 = crate::acpi::RESET_VALUE;

/// What a port write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// The guest wrote its exit status to [`abi::EXIT_PORT`].
    Exit(u8),
    /// The guest pulsed the reset line (i8042).
    Reset,
    /// The guest entered ACPI's S5 (soft off): it powered off.
    PowerOff,
}

/// ACPI's PM1a registers, for the fixed-hardware ACPI of `acpi.rs` (why
/// not hardware-reduced ACPI: see there). The event block's status
/// register reads as zeros and ignores writes: shoal raises no ACPI event.
/// Its enable register keeps what the guest writes (Linux enables the
/// global lock's event and reads it back: a bit that does not stick is a
/// machine without the lock, and an error on every boot). The control
/// register keeps what the guest writes, reads with SCI_EN set (the
/// machine is in ACPI mode), and SLP_EN with SLP_TYP = S5 powers off;
/// SLP_EN with another sleep type (the DSDT declares none) is ignored and
/// reads back clear. Accesses of any width are taken byte by byte.
/// I/O-free: the vCPU loop acts on the [`PortEvent`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AcpiPm {
    enable: u16,
    control: u16,
}

/// The PM1a registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pm1 {
    Status,
    Enable,
    Control,
}

impl AcpiPm {
    /// Whether `port` is one of the PM1a registers.
    pub fn claims(port: u16) -> bool {
        use crate::acpi::{PM1_CNT_LEN, PM1_CNT_PORT, PM1_EVT_LEN, PM1_EVT_PORT};
        (PM1_EVT_PORT..PM1_EVT_PORT + u16::from(PM1_EVT_LEN)).contains(&port)
            || (PM1_CNT_PORT..PM1_CNT_PORT + u16::from(PM1_CNT_LEN)).contains(&port)
    }

    /// The register whose byte `port` is, and that byte's first bit (the
    /// event block is status then enable, 2 bytes each).
    fn register(port: u16) -> Option<(Pm1, u32)> {
        use crate::acpi::{PM1_CNT_LEN, PM1_CNT_PORT, PM1_EVT_LEN, PM1_EVT_PORT};
        let half = u16::from(PM1_EVT_LEN) / 2;
        if let Some(o) = port.checked_sub(PM1_EVT_PORT).filter(|o| *o < u16::from(PM1_EVT_LEN)) {
            let reg = if o < half { Pm1::Status } else { Pm1::Enable };
            return Some((reg, u32::from(o % half) * 8));
        }
        let o = port.checked_sub(PM1_CNT_PORT).filter(|o| *o < u16::from(PM1_CNT_LEN))?;
        Some((Pm1::Control, u32::from(o) * 8))
    }

    /// An `in` of `data.len()` bytes from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match Self::register(port.wrapping_add(i as u16)) {
                Some((Pm1::Status, _)) => 0,
                Some((Pm1::Enable, shift)) => (self.enable >> shift) as u8,
                Some((Pm1::Control, shift)) => ((self.control | crate::acpi::PM1_SCI_EN) >> shift) as u8,
                None => 0xff,
            };
        }
    }

    /// An `out` of `data` to `port`; `PowerOff` when it enters S5.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PortEvent> {
        use crate::acpi::{PM1_SLP_EN, PM1_SLP_TYP_MASK, PM1_SLP_TYP_SHIFT, SLP_TYP_S5};
        let set = |reg: &mut u16, shift: u32, b: u8| *reg = (*reg & !(0xff << shift)) | (u16::from(b) << shift);
        for (i, &b) in data.iter().enumerate() {
            match Self::register(port.wrapping_add(i as u16)) {
                Some((Pm1::Enable, shift)) => set(&mut self.enable, shift, b),
                Some((Pm1::Control, shift)) => set(&mut self.control, shift, b),
                Some((Pm1::Status, _)) | None => {}
            }
        }
        if self.control & PM1_SLP_EN == 0 {
            return None;
        }
        // SLP_EN is write-only: it reads as 0
        self.control &= !PM1_SLP_EN;
        let slp_typ = (self.control & PM1_SLP_TYP_MASK) >> PM1_SLP_TYP_SHIFT;
        if slp_typ == u16::from(SLP_TYP_S5) {
            return Some(PortEvent::PowerOff);
        }
        tracing::warn!(slp_typ, "the guest asked for an ACPI sleep state shoal does not have; ignored");
        None
    }
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
    /// ACPI's PM1 registers: a Linux guest's (on node 0), None otherwise.
    pm: Option<Mutex<AcpiPm>>,
    /// A Linux guest's virtio devices (on node 0).
    virtio: Option<Arc<crate::virtio::VirtioDevices>>,
}

impl Devices {
    pub fn new(console: Arc<Mutex<Console>>, memory: GuestReader, info: GuestInfo, irq: IrqLine) -> Self {
        let serial = Serial::new(irq, ConsoleWriter(console.clone()));
        Devices { serial: Mutex::new(serial), console, memory, start: info.clock_start, info, pm: None, virtio: None }
    }

    /// With ACPI's PM1 registers (a Linux guest, whose ACPI tables name
    /// them); without, their ports stay unclaimed.
    pub fn with_acpi_pm(mut self) -> Self {
        self.pm = Some(Mutex::new(AcpiPm::default()));
        self
    }

    /// With virtio devices in the MMIO hole.
    pub fn with_virtio(mut self, virtio: Arc<crate::virtio::VirtioDevices>) -> Self {
        self.virtio = Some(virtio);
        self
    }

    /// A vCPU's MMIO read outside RAM: a virtio device's register, or all
    /// ones where no device is (as on a PC).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.virtio.as_ref().is_some_and(|v| v.read(addr, data)) {
            data.fill(0xff);
        }
    }

    /// A vCPU's MMIO write outside RAM: a virtio device's register, or
    /// ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.virtio.as_ref().is_some_and(|v| v.write(addr, data)) {
            tracing::trace!(addr, "MMIO write where no device is");
        }
    }

    /// The console (to flush at exit).
    pub fn console(&self) -> &Arc<Mutex<Console>> {
        &self.console
    }

    /// An `in` from `port`. Unclaimed ports read as all ones, like an empty
    /// ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(pm) = self.pm.as_ref().filter(|_| AcpiPm::claims(port)) {
            pm.lock().unwrap_or_else(|p| p.into_inner()).read(port, data);
            return;
        }
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
        if let Some(pm) = self.pm.as_ref().filter(|_| AcpiPm::claims(port)) {
            return pm.lock().unwrap_or_else(|p| p.into_inner()).write(port, data);
        }
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
    fn acpi_pm_powers_off_on_s5_only() {
        use crate::acpi::{PM1_CNT_PORT, PM1_EVT_PORT, PM1_SCI_EN, PM1_SLP_EN, PM1_SLP_TYP_SHIFT, SLP_TYP_S5};
        let s5 = u16::from(SLP_TYP_S5) << PM1_SLP_TYP_SHIFT;
        let mut pm = AcpiPm::default();
        // in ACPI mode from the start; no event status ever, enable bits stick
        let mut w = [0u8; 2];
        pm.read(PM1_CNT_PORT, &mut w);
        assert_eq!(u16::from_le_bytes(w), PM1_SCI_EN);
        let mut evt = [0xaau8; 4];
        pm.read(PM1_EVT_PORT, &mut evt);
        assert_eq!(evt, [0; 4]);
        assert_eq!(pm.write(PM1_EVT_PORT, &[0xff, 0xff]), None);
        const GBL_EN: u16 = 1 << 5;
        assert_eq!(pm.write(PM1_EVT_PORT + 2, &GBL_EN.to_le_bytes()), None);
        pm.read(PM1_EVT_PORT, &mut evt);
        assert_eq!(evt, [0, 0, GBL_EN as u8, 0]);
        // an access past the block's end reads as an empty bus
        pm.read(PM1_CNT_PORT + 1, &mut w);
        assert_eq!(w, [(PM1_SCI_EN >> 8) as u8, 0xff]);
        // ACPICA's two writes: SLP_TYP, then SLP_TYP | SLP_EN
        assert_eq!(pm.write(PM1_CNT_PORT, &(s5 | PM1_SCI_EN).to_le_bytes()), None);
        pm.read(PM1_CNT_PORT, &mut w);
        assert_eq!(u16::from_le_bytes(w), s5 | PM1_SCI_EN);
        assert_eq!(pm.write(PM1_CNT_PORT, &(s5 | PM1_SLP_EN).to_le_bytes()), Some(PortEvent::PowerOff));
        // byte by byte: the high byte holds SLP_TYP and SLP_EN
        let mut pm = AcpiPm::default();
        assert_eq!(pm.write(PM1_CNT_PORT, &[0]), None);
        assert_eq!(pm.write(PM1_CNT_PORT + 1, &[((s5 | PM1_SLP_EN) >> 8) as u8]), Some(PortEvent::PowerOff));
        // another sleep type is ignored, and SLP_EN reads back clear
        let mut pm = AcpiPm::default();
        let s1 = 1 << PM1_SLP_TYP_SHIFT;
        assert_eq!(pm.write(PM1_CNT_PORT, &(s1 | PM1_SLP_EN).to_le_bytes()), None);
        pm.read(PM1_CNT_PORT, &mut w);
        assert_eq!(u16::from_le_bytes(w), s1 | PM1_SCI_EN);
    }

    #[test]
    fn acpi_pm_ports_exist_only_for_linux_guests() {
        use crate::acpi::{PM1_CNT_PORT, PM1_SLP_EN, PM1_SLP_TYP_SHIFT, SLP_TYP_S5};
        let info =
            GuestInfo { num_vcpus: 1, node_id: 0, num_nodes: 1, mem_bytes: 1 << 20, clock_start: Instant::now() };
        let mem = Arc::new(GuestMemory::new(crate::memory::Layout::new(crate::memory::MIN_MEMORY).unwrap()).unwrap());
        let console = || Arc::new(Mutex::new(Console::new(Box::new(Sink::default()))));
        let off = ((u16::from(SLP_TYP_S5) << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN).to_le_bytes();
        let plain = Devices::new(console(), GuestReader::Direct(mem.clone()), info, IrqLine(None));
        assert_eq!(plain.pio_write(PM1_CNT_PORT, &off), None);
        let mut w = [0u8; 2];
        plain.pio_read(PM1_CNT_PORT, &mut w);
        assert_eq!(w, [0xff, 0xff], "unclaimed");
        let linux = Devices::new(console(), GuestReader::Direct(mem), info, IrqLine(None)).with_acpi_pm();
        assert_eq!(linux.pio_write(PM1_CNT_PORT, &off), Some(PortEvent::PowerOff));
        assert_eq!(linux.pio_write(I8042_COMMAND, &[I8042_RESET]), Some(PortEvent::Reset));
    }

    #[test]
    fn serial_ports_map_to_offsets() {
        assert_eq!(serial_offset(0x3f8), Some(0));
        assert_eq!(serial_offset(0x3ff), Some(7));
        assert_eq!(serial_offset(0x400), None);
        assert_eq!(serial_offset(0x3f7), None);
    }
}
