//! ACPI tables for Linux guests, built with rust-vmm's `acpi_tables`: the
//! RSDP and XSDT, a FADT with a PM1 power-management block and the
//! i8042's reset line as its reset register, a FACS, a DSDT that declares
//! S5 (soft off), and a MADT listing the vCPUs' local APICs and KVM's I/O
//! APIC as the MP tables do ([`crate::mptable`]: APIC id = vCPU index,
//! the I/O APIC's id = the number of vCPUs).
//!
//! **Fixed-hardware ACPI with a PM1 control port, not hardware-reduced
//! ACPI.** Both power off with one register write. Hardware-reduced ACPI
//! would also make Linux drop the PC platform it boots on today (x86's
//! `acpi_generic_reduced_hw_init`: no legacy PIC, no PIT as its timer;
//! KVM's PIC, never initialised then, would pass the serial port's IRQ 4
//! to the bootstrap CPU's ExtINT line with vector 4). With a PM1 block the
//! kernel keeps the PIC, the PIT and the ISA interrupt routing it boots
//! with from the MP tables; the price is three registers instead of one
//! (the event block reads as zeros, the control register keeps SCI_EN
//! set) and an SCI on IRQ 9 that never fires (see [`SCI_IRQ`]). The
//! registers live in `devices.rs` (`AcpiPm`).
//!
//! Everything here is built in memory, without I/O; `linux.rs` writes it
//! at [`ACPI_START`] in the BIOS area, where the kernel also finds the RSDP
//! by scanning, and reserves it as ACPI data in the e820 map.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use crate::mptable::{self, IOAPIC_ADDR, LAPIC_ADDR};

/// Where the tables go: the start of the BIOS area Linux scans for the
/// RSDP (0xe0000–0xfffff); the MP tables follow at 0xf0000.
pub const ACPI_START: u64 = 0xe_0000;
/// The room the tables have, up to the MP tables.
const ACPI_ROOM: u64 = mptable::MPTABLE_START - ACPI_START;
/// The RSDP is the first thing at [`ACPI_START`].
pub const RSDP_ADDR: u64 = ACPI_START;

/// The PM1a event block (status, then enable; 2 bytes each).
pub const PM1_EVT_PORT: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
/// The PM1a control register (16 bits).
pub const PM1_CNT_PORT: u16 = 0x604;
pub const PM1_CNT_LEN: u8 = 2;
/// PM1 control bits: SCI_EN (the machine is in ACPI mode), SLP_TYP (bits
/// 10–12) and SLP_EN (bit 13: enter the state SLP_TYP names).
pub const PM1_SCI_EN: u16 = 1 << 0;
pub const PM1_SLP_TYP_SHIFT: u16 = 10;
pub const PM1_SLP_TYP_MASK: u16 = 0b111 << PM1_SLP_TYP_SHIFT;
pub const PM1_SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value the DSDT's `\_S5` gives for soft off.
pub const SLP_TYP_S5: u8 = 5;
/// The SCI's ISA IRQ. Never raised (no event of ours needs the OS), but
/// fixed-hardware ACPI must name one, and 0 would make Linux reroute the
/// PIT's IRQ 0 as a level-triggered SCI. IRQ 9 is free, and declared level
/// and active high in the MADT, as PCs (and QEMU) do.
pub const SCI_IRQ: u8 = 9;
/// The reset register: the i8042 command port, value 0xfe (pulse the reset
/// line), which `devices.rs` already ends the VM on.
pub const RESET_PORT: u16 = 0x64;
pub const RESET_VALUE: u8 = 0xfe;

const OEM_ID: [u8; 6] = *b"SHOAL ";
const OEM_REVISION: u32 = 1;
/// "SHOALVMM", the FADT's hypervisor vendor identity.
const HYPERVISOR_ID: u64 = u64::from_le_bytes(*b"SHOALVMM");
/// MADT flags: PCAT_COMPAT (KVM's dual 8259 PICs are there too).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types shoal writes by hand (the crate has no type for them).
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_HIGH_LEVEL: u16 = 0b1101;
/// FADT IAPC_BOOT_ARCH: legacy ISA devices and an 8042 (the reset line),
/// what Linux assumes without ACPI too.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;

/// Offsets in every system description table's 36-byte header.
const LENGTH_OFFSET: usize = 4;
const CHECKSUM_OFFSET: usize = 9;
/// The MADT's flags, after its header and local APIC address.
const MADT_FLAGS_OFFSET: usize = 40;

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "--cpus {cpus}: a Linux guest can have 1 to {} vCPUs (xAPIC ids, with the I/O APIC's after them)",
        mptable::MAX_CPUS
    )]
    Cpus { cpus: u32 },
    #[error("the ACPI tables for {cpus} vCPUs take {len} bytes; the BIOS area has room for {ACPI_ROOM}")]
    TooBig { cpus: u32, len: usize },
}

/// The tables for `cpus` vCPUs and the first `virtio` virtio-mmio slots
/// (`virtio::slot`), to be written at [`ACPI_START`] (the RSDP first).
pub fn build(cpus: u32, virtio: usize) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > mptable::MAX_CPUS {
        return Err(Error::Cpus { cpus });
    }
    let mut out = Blob::default();
    // the RSDP points at the XSDT, which is placed last: reserve its room
    out.put(&[0; 36], 16);
    let facs = out.put(&bytes(&FACS::new()), 64);
    let dsdt = out.put(&dsdt(virtio), 16);
    let fadt = out.put(&fadt(facs, dsdt), 16);
    let madt = out.put(&madt(cpus), 16);
    let mut xsdt = XSDT::new(OEM_ID, *b"SHOALXSD", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = out.put(&bytes(&xsdt), 16);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt));
    out.0[..rsdp.len()].copy_from_slice(&rsdp);
    if out.0.len() as u64 > ACPI_ROOM {
        return Err(Error::TooBig { cpus, len: out.0.len() });
    }
    Ok(out.0)
}

/// The tables as they are laid out from [`ACPI_START`].
#[derive(Default)]
struct Blob(Vec<u8>);

impl Blob {
    /// Appends `table` at the next multiple of `align`; its address.
    fn put(&mut self, table: &[u8], align: usize) -> u64 {
        let at = self.0.len().next_multiple_of(align);
        self.0.resize(at, 0);
        self.0.extend_from_slice(table);
        ACPI_START + at as u64
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Makes a table's bytes sum to zero again after an edit.
fn fix_checksum(table: &mut [u8]) {
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = sum.wrapping_neg();
}

/// Appends a structure to a table, updating its length and checksum.
fn append(table: &mut Vec<u8>, structure: &[u8]) {
    table.extend_from_slice(structure);
    let len = table.len() as u32;
    table[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&len.to_le_bytes());
    fix_checksum(table);
}

/// The DSDT: `\_S5` (soft off is SLP_TYP [`SLP_TYP_S5`]), which is
/// what makes Linux power off through ACPI, and the virtio-mmio devices:
/// one `LNRO0005` device per slot in use (Linux's `virtio_mmio` binds to
/// that id), with its registers (Memory32Fixed) and its interrupt line
/// (edge-triggered, active high: an irqfd pulses it).
fn dsdt(virtio: usize) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"SHOALDSD", OEM_REVISION);
    let s5 = aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]);
    dsdt.append_slice(&bytes(&aml::Name::new("_S5_".into(), &s5)));
    if virtio > 0 {
        let devices: Vec<Raw> = (0..virtio).map(|i| Raw(virtio_device(i))).collect();
        let devices: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
        dsdt.append_slice(&bytes(&aml::Scope::new("\\_SB_".into(), devices)));
    }
    dsdt.as_slice().to_vec()
}

/// AML already encoded.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The AML of virtio-mmio slot `i`.
fn virtio_device(i: usize) -> Vec<u8> {
    let (base, len, gsi) = crate::virtio::slot(i);
    // slots lie below 4 GiB, 4 KiB each
    let registers = aml::Memory32Fixed::new(true, base as u32, len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&registers, &irq]);
    let uid = i as u32;
    bytes(&aml::Device::new(
        format!("VR{i:02X}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            // DMA is cache-coherent
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The FADT: the PM1a blocks, the SCI, the reset register, no SMI command
/// port (the machine is in ACPI mode from the start).
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"SHOALFAC", OEM_REVISION)
        .firmware_ctrl_64(facs)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        // no fixed power or sleep button
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(PM1_EVT_PORT).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1a_cnt_blk = u32::from(PM1_CNT_PORT).into();
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, RESET_PORT.into());
    f.reset_value = RESET_VALUE;
    f.hypervisor_vendor_identity = HYPERVISOR_ID.into();
    bytes(&f.finalize())
}

/// The MADT: one enabled local APIC per vCPU (ACPI processor id = APIC id =
/// vCPU index), KVM's I/O APIC (GSI n = pin n, as KVM routes ISA IRQ n;
/// identity is ACPI's default, so only the SCI is overridden, to level
/// and active high), and NMI on every CPU's LINT1.
fn madt(cpus: u32) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, *b"SHOALAPI", OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..cpus {
        // cpus ≤ MAX_CPUS (254): every id fits a byte
        m.add_structure(ProcessorLocalApic::new(id as u8, id as u8, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cpus as u8, IOAPIC_ADDR, 0));
    let mut t = bytes(&m);
    t[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    let mut iso = vec![MADT_INT_SRC_OVERRIDE, 10, 0, SCI_IRQ];
    iso.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    iso.extend_from_slice(&INTI_HIGH_LEVEL.to_le_bytes());
    append(&mut t, &iso);
    // every processor (uid 0xff), flags as the bus has them, LINT1
    append(&mut t, &[MADT_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest-physical `gpa`, checked: signature, length
    /// inside the blob, checksum.
    fn table<'a>(blob: &'a [u8], gpa: u64, sig: &[u8; 4]) -> &'a [u8] {
        let at = (gpa - ACPI_START) as usize;
        assert_eq!(&blob[at..at + 4], sig);
        let len = u32_at(blob, at + 4) as usize;
        assert!(len >= 36 && at + len <= blob.len(), "{sig:?}: length {len}");
        let t = &blob[at..at + len];
        assert_eq!(sum(t), 0, "{sig:?}: checksum");
        t
    }

    /// Walks RSDP → XSDT → FADT, MADT, DSDT, FACS: (FADT, MADT, DSDT).
    fn walk(blob: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0, "RSDP checksum");
        assert_eq!(u32_at(blob, 20), 36, "RSDP length");
        assert_eq!(sum(&blob[..36]), 0, "RSDP extended checksum");
        assert_eq!(blob[15], 2, "RSDP revision: an XSDT");
        let xsdt = table(blob, u64_at(blob, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = table(blob, u64_at(xsdt, 36), b"FACP").to_vec();
        let madt = table(blob, u64_at(xsdt, 44), b"APIC").to_vec();
        let dsdt = table(blob, u64_at(&fadt, 140), b"DSDT").to_vec();
        let facs_at = u64_at(&fadt, 132);
        assert_eq!(facs_at % 64, 0, "the FACS is 64-byte aligned");
        let facs = &blob[(facs_at - ACPI_START) as usize..];
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(facs, 4), 64);
        (fadt, madt, dsdt)
    }

    #[test]
    fn tables_check_out_and_fit() {
        for cpus in [1, 2, 8, mptable::MAX_CPUS] {
            let blob = build(cpus, crate::virtio::SLOTS).unwrap();
            assert!(blob.len() as u64 <= ACPI_ROOM);
            walk(&blob);
        }
    }

    #[test]
    fn the_madt_lists_the_cpus_and_the_io_apic_as_the_mp_tables_do() {
        let cpus = 4;
        let (_, madt, _) = walk(&build(cpus, 0).unwrap());
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
        let mut at = 44;
        let mut entries = Vec::new();
        while at < madt.len() {
            let len = madt[at + 1] as usize;
            assert!(len >= 2 && at + len <= madt.len(), "entry at {at}: length {len}");
            entries.push(madt[at..at + len].to_vec());
            at += len;
        }
        assert_eq!(at, madt.len());
        let lapics: Vec<(u8, u8, u32)> =
            entries.iter().filter(|e| e[0] == 0).map(|e| (e[2], e[3], u32_at(e, 4))).collect();
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)], "uid, APIC id, enabled");
        let ioapics: Vec<&Vec<u8>> = entries.iter().filter(|e| e[0] == 1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], cpus as u8, "the I/O APIC's id follows the CPUs'");
        assert_eq!(u32_at(ioapics[0], 4), IOAPIC_ADDR);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        // one override, the SCI: ISA IRQ 9 → GSI 9, level, active high
        let isos: Vec<&Vec<u8>> = entries.iter().filter(|e| e[0] == 2).collect();
        assert_eq!(isos.len(), 1);
        assert_eq!((isos[0][2], isos[0][3], u32_at(isos[0], 4)), (0, SCI_IRQ, u32::from(SCI_IRQ)));
        assert_eq!(u16::from_le_bytes([isos[0][8], isos[0][9]]), INTI_HIGH_LEVEL);
        assert_eq!(entries.iter().filter(|e| e[0] == 4).count(), 1, "NMI on LINT1");
        assert_eq!(entries.len(), cpus as usize + 3);
    }

    #[test]
    fn the_fadt_has_the_pm1_block_and_the_reset_register() {
        let (fadt, _, dsdt) = walk(&build(1, 0).unwrap());
        assert_eq!(fadt.len(), 276, "an ACPI 6 FADT");
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), u16::from(SCI_IRQ));
        assert_eq!(u32_at(&fadt, 48), 0, "no SMI command port: in ACPI mode from the start");
        assert_eq!(u32_at(&fadt, 56), u32::from(PM1_EVT_PORT));
        assert_eq!(u32_at(&fadt, 64), u32::from(PM1_CNT_PORT));
        assert_eq!((fadt[88], fadt[89]), (PM1_EVT_LEN, PM1_CNT_LEN));
        let flags = u32_at(&fadt, 112);
        assert_eq!(flags & Flags::HwReducedAcpi as u32, 0, "fixed-hardware ACPI");
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // reset register: system I/O, 8 bits, at the i8042 command port
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // the DSDT's AML: Name(_S5_, Package(4) {5, 5, 0, 0})
        let aml = &dsdt[36..];
        assert_eq!(aml, &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]);
    }

    #[test]
    fn the_dsdt_describes_each_virtio_slot_as_lnro0005() {
        let (_, _, dsdt) = walk(&build(2, 3).unwrap());
        let aml = &dsdt[36..];
        let find = |needle: &[u8]| aml.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"LNRO0005\0"), 3, "one _HID string per device");
        for i in 0..3 {
            let (base, len, gsi) = crate::virtio::slot(i);
            assert_eq!(find(format!("VR{i:02X}").as_bytes()), 1);
            // Memory32Fixed, read-write: tag 0x86, length 9, then base and length
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(base as u32).to_le_bytes());
            mem.extend_from_slice(&(len as u32).to_le_bytes());
            assert_eq!(find(&mem), 1, "slot {i}'s registers");
            // Extended Interrupt: consumer, edge, active high, exclusive; one GSI
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&gsi.to_le_bytes());
            assert_eq!(find(&irq), 1, "slot {i}'s interrupt");
        }
        // no virtio device: only \_S5
        let (_, _, dsdt) = walk(&build(1, 0).unwrap());
        assert!(!dsdt.windows(8).any(|w| w == b"LNRO0005"));
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert_eq!(build(0, 0), Err(Error::Cpus { cpus: 0 }));
        assert_eq!(build(255, 0), Err(Error::Cpus { cpus: 255 }));
    }
}
