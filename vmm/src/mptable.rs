//! The Intel MultiProcessor Specification (1.4) tables a Linux guest
//! reads to find its CPUs and its I/O APIC when there is no ACPI: a
//! floating pointer ("_MP_") in the BIOS area and the configuration table
//! ("PCMP") after it, listing one processor per vCPU (local APIC id = vCPU
//! id, vCPU 0 the bootstrap one), an ISA bus, KVM's in-kernel I/O APIC and
//! how the ISA interrupts reach it.
//!
//! The routing follows KVM's default one (`KVM_CREATE_IRQCHIP`): GSI n is
//! PIC pin n and I/O APIC pin n, so ISA IRQ n is I/O APIC pin n, the PIT's
//! IRQ 0 included. (Declaring pin 0 ExtINT instead, as some VMMs do, makes
//! Debian's 6.1 kernel oops in `check_timer`: it finds no interrupt for
//! IRQ 0.) The PIC reaches the bootstrap CPU through LINT0 (ExtINT).

/// Where the tables go: the BIOS area, which the e820 map reserves. Linux
/// scans 0xf0000..0x100000 for the floating pointer.
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of the area the tables may fill.
const MPTABLE_END: u64 = 0x10_0000;

/// The most vCPUs the tables describe: xAPIC ids are 8 bits, 255 is the
/// broadcast id, and the I/O APIC takes the id after the last CPU's.
pub const MAX_CPUS: u32 = 254;

/// Where KVM puts the local APICs and the I/O APIC (the ACPI tables say
/// the same).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// KVM's I/O APIC has 24 pins.
const IOAPIC_PINS: u8 = 24;
const SPEC_REV: u8 = 4; // 1.4

// entry types
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// interrupt types
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
// processor flags
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 in the processor entries' signature, with the FPU and APIC
/// feature bits: Linux only reads the APIC ids and flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("--cpus {cpus}: a Linux guest can have 1 to {MAX_CPUS} vCPUs (xAPIC ids, with the I/O APIC's after them)")]
    Cpus { cpus: u32 },
}

/// The size in bytes of the tables for `cpus` vCPUs.
fn size_for(cpus: u32) -> usize {
    FLOATING_SIZE
        + HEADER_SIZE
        + cpus as usize * PROCESSOR_SIZE
        + SMALL_ENTRY_SIZE // bus
        + SMALL_ENTRY_SIZE // I/O APIC
        + usize::from(IOAPIC_PINS) * SMALL_ENTRY_SIZE
        + 2 * SMALL_ENTRY_SIZE // LINT0, LINT1
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)).wrapping_neg()
}

/// The floating pointer and the configuration table for `cpus` vCPUs, to
/// be written at [`MPTABLE_START`].
pub fn build(cpus: u32) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Cpus { cpus });
    }
    let need = size_for(cpus);
    debug_assert!(need as u64 <= MPTABLE_END - MPTABLE_START);
    // the I/O APIC's id follows the CPUs' (ids share one space)
    let ioapic_id = cpus as u8;

    let mut table = Vec::with_capacity(need - FLOATING_SIZE);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&[0, 0]); // length, below
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"SHOAL   "); // OEM id
    table.extend_from_slice(b"SHOAL VM    "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&0u16.to_le_bytes()); // entry count, below
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    debug_assert_eq!(table.len(), HEADER_SIZE);

    let mut entries: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        table.extend_from_slice(&[MP_PROCESSOR, id as u8, LAPIC_VERSION, flags]);
        table.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        table.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        table.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    const ISA_BUS: u8 = 0;
    table.extend_from_slice(&[MP_BUS, ISA_BUS]);
    table.extend_from_slice(b"ISA   ");
    table.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    table.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries += 2;
    for pin in 0..IOAPIC_PINS {
        // flags 0: polarity and trigger as the bus has them (ISA: high, edge)
        table.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, ISA_BUS, pin, ioapic_id, pin]);
        entries += 1;
    }
    // LINT0 is the PIC's ExtINT on the bootstrap CPU, LINT1 NMI on all
    table.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, ISA_BUS, 0, 0, 0]);
    table.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    entries += 2;

    let len = table.len() as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[34..36].copy_from_slice(&entries.to_le_bytes());
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(need);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((MPTABLE_START as u32) + FLOATING_SIZE as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a table is present
    out[10] = checksum(&out);
    debug_assert_eq!(out.len(), FLOATING_SIZE);
    out.extend_from_slice(&table);
    debug_assert_eq!(out.len(), need);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_check_out() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(t.len(), size_for(cpus));
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            let table = &t[(ptr - MPTABLE_START) as usize..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(&table[..len]), 0, "configuration table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, cpus + 2 + u32::from(IOAPIC_PINS) + 2);
            // walk the entries: one processor per vCPU, only vCPU 0 the BSP
            let mut at = HEADER_SIZE;
            let mut procs = Vec::new();
            for _ in 0..count {
                let kind = table[at];
                if kind == MP_PROCESSOR {
                    procs.push((table[at + 1], table[at + 3]));
                    at += PROCESSOR_SIZE;
                } else {
                    assert!(kind <= MP_LINTSRC);
                    at += SMALL_ENTRY_SIZE;
                }
            }
            assert_eq!(at, len);
            let want: Vec<(u8, u8)> =
                (0..cpus).map(|i| (i as u8, CPU_ENABLED | if i == 0 { CPU_BSP } else { 0 })).collect();
            assert_eq!(procs, want);
        }
    }

    #[test]
    fn too_many_cpus_are_refused() {
        assert_eq!(build(255), Err(Error::Cpus { cpus: 255 }));
        assert_eq!(build(0), Err(Error::Cpus { cpus: 0 }));
        assert_eq!(build(MAX_CPUS).unwrap().len(), size_for(MAX_CPUS));
    }
}
