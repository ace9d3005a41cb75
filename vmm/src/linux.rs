//! Linux guests: Debian's stock kernel booted with linux-loader, either
//! - a bzImage through the x86 64-bit boot protocol (our zero page, e820
//!   map, GDT and identity page tables; entered in long mode), or
//! - an ELF vmlinux through its PVH entry (the Xen PVH boot ABI:
//!   `hvm_start_info` with the memory map and the initramfs as a module;
//!   entered in 32-bit protected mode without paging).
//!
//! Both get ACPI tables (see [`crate::acpi`]: the vCPUs, the I/O APIC, and
//! the PM1 registers that power the VM off), the RSDP's address in the
//! zero page (`acpi_rsdp_addr`) or the start info (`rsdp_paddr`), MP tables
//! (see [`crate::mptable`]) for kernels without ACPI or booted with
//! `acpi=off`, and the initramfs at the top of low RAM.
//!
//! Guest-physical layout below 1 MiB: the PVH start info at 0x6000, the
//! zero page (or the PVH memory map) at 0x7000, the boot stack below
//! 0x8ff0, GDT and page tables from 0x9000, the command line at 0x20000,
//! the ACPI tables at 0xe0000 (the RSDP first), the MP tables at 0xf0000;
//! the kernel goes where its header (or ELF program headers) say, at or
//! above 1 MiB.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi;
use crate::loader;
use crate::memory::{GuestMemory, Layout, PAGE_SIZE};
use crate::mptable;

/// The PVH start info (`hvm_start_info`) and, after it, the module list.
pub const PVH_INFO: u64 = 0x6000;
const PVH_MODLIST: u64 = PVH_INFO + 0x40;
/// The zero page (bzImage), or the PVH memory map.
pub const ZERO_PAGE: u64 = 0x7000;
/// The boot stack's top (the kernel sets up its own at once).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the GDT and page tables start.
pub const TABLES: u64 = 0x9000;
/// The command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line (the kernel's own limit on x86).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the EBDA: RAM below 1 MiB ends here in the e820 map.
const EBDA_START: u64 = 0x9_fc00;
/// The kernel must be loaded at or above this (the start of high memory).
const HIGH_MEMORY: u64 = 0x10_0000;
/// The smallest guest that boots Debian's kernel with an initramfs.
pub const MIN_MEMORY: u64 = 128 << 20;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// ACPI tables (the OS may reuse the memory once it has read them).
const E820_ACPI: u32 = 3;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// "xEn3" with its top bit flipped: the PVH start info's magic.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The ELF note (owner "Xen") that gives a kernel's 32-bit PVH entry.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// A flat 4 GiB 32-bit code segment (present, ring 0, execute/read, D=1,
/// 4 KiB granularity): the PVH entry's CS.
const CODE32_DESCRIPTOR: u64 = 0x00cf_9b00_0000_ffff;
/// A PVH kernel starts in 32-bit mode: its initramfs must sit below 4 GiB.
const PVH_MAX_ADDR: u64 = 1 << 32;
/// loadflags: the kernel may use the heap up to heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;

/// Errors loading a Linux kernel (all the user's: exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: not a bzImage this loader can boot ({why})")]
    NotKernel { path: String, why: String },
    #[error("the kernel is a Linux vmlinux without a PVH entry (built without CONFIG_PVH): boot its bzImage instead")]
    NoPvhEntry,
    #[error("kernel {path}: not an ELF vmlinux this loader can boot through its PVH entry ({why})")]
    NotPvhKernel { path: String, why: String },
    #[error("initrd {path}: {source}")]
    Initrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is {size} bytes; with the kernel it does not fit in {mem_mib} MiB of guest memory")]
    InitrdTooBig { path: String, size: u64, mem_mib: u64 },
    #[error("a Linux guest needs at least {} MiB of memory, not {mib} MiB", MIN_MEMORY >> 20)]
    TooSmall { mib: u64 },
    #[error("the kernel command line is {len} bytes; the limit is {CMDLINE_MAX}")]
    CmdlineTooLong { len: usize },
    #[error("writing the boot data into guest memory: {0}")]
    Write(String),
    #[error("MP tables: {0}")]
    MpTable(#[from] mptable::Error),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::Error),
}

/// How a bzImage's kernel is entered (`--bzimage-entry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BzEntry {
    /// As [`BzEntry::Pvh`] where this shoal can (the payload is xz or
    /// gzip, the vmlinux inside has a PVH entry), else as
    /// [`BzEntry::Boot64`].
    #[default]
    Auto,
    /// Decompress the vmlinux inside here and enter it through its PVH
    /// entry, or fail. The guest's own decompressor then never runs: it
    /// writes the kernel image and its scratch in guest memory (for
    /// Debian's kernel 32 to 40 MiB more first touches than loading the
    /// image's non-zero pages here), which a pod under `--node-memory`
    /// moves to peers and back (measured in bench/results/linux-boot.md).
    Pvh,
    /// The 64-bit boot protocol: the bzImage's decompressor runs in the
    /// guest.
    Boot64,
}

/// Most bytes a bzImage's payload may decompress to (a vmlinux is tens of
/// MiB): a bound on what a crafted payload can make us allocate.
const MAX_VMLINUX: u64 = 1 << 30;

/// The ELF vmlinux inside a bzImage (its payload, xz or gzip),
/// decompressed, when it has a PVH entry; else why not.
pub fn vmlinux_of_bzimage(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let version = u16_at(0x206).ok_or("it is too short for a setup header")?;
    if version < 0x208 {
        return Err(format!("its boot protocol {}.{:02} names no payload", version >> 8, version & 0xff));
    }
    // (0 setup sectors means 4, as in the oldest kernels)
    let setup_sects = match bytes.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let (offset, len) = (u32_at(0x248), u32_at(0x24c));
    let payload = offset
        .zip(len)
        .and_then(|(o, l)| {
            let start = (setup_sects + 1) * 512 + o as usize;
            bytes.get(start..start.checked_add(l as usize)?)
        })
        .ok_or("its payload lies outside the file")?;
    let mut vmlinux = Vec::new();
    let read = match payload {
        // (the kernel's build appends the decompressed size, 4 bytes, to
        // every payload but gzip's, whose own trailer ends with it: an xz
        // decoder takes those bytes for a corrupt stream)
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            let stream = &payload[..payload.len().saturating_sub(4)];
            xz2::read::XzDecoder::new(stream).take(MAX_VMLINUX + 1).read_to_end(&mut vmlinux)
        }
        [0x1f, 0x8b, ..] => flate2::read::GzDecoder::new(payload).take(MAX_VMLINUX + 1).read_to_end(&mut vmlinux),
        _ => {
            let kind = match payload {
                [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
                [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
                [b'B', b'Z', b'h', ..] => "bzip2",
                [0x89, b'L', b'Z', b'O', ..] => "lzo",
                [0x5d, 0, 0, ..] => "lzma",
                _ => "unknown",
            };
            return Err(format!("its payload's compression ({kind}) is not one shoal reads (xz, gzip)"));
        }
    };
    read.map_err(|e| format!("decompressing its payload: {e}"))?;
    if vmlinux.len() as u64 > MAX_VMLINUX {
        return Err(format!("its payload decompresses to more than {} MiB", MAX_VMLINUX >> 20));
    }
    match elf_notes(&vmlinux) {
        ElfNotes { linux: true, pvh: true } => Ok(vmlinux),
        ElfNotes { linux: true, pvh: false } => Err("its vmlinux has no PVH entry (built without CONFIG_PVH)".into()),
        ElfNotes { linux: false, .. } => Err("its payload is not a Linux ELF".into()),
    }
}

/// A Linux kernel to load: an open file, its format, and its name in
/// errors.
#[derive(Debug)]
pub struct Kernel {
    name: String,
    file: File,
    format: Format,
}

impl Kernel {
    /// The kernel image at `path`, as `format` says it is.
    pub fn open(path: &Path, format: Format) -> Result<Kernel, Error> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| Error::Open { path: name.clone(), source })?;
        Ok(Kernel { name, file, format })
    }

    /// The vmlinux [`vmlinux_of_bzimage`] took out of the bzImage at
    /// `path`, held in a memfd, entered through its PVH entry.
    pub fn decompressed(path: &Path, vmlinux: &[u8]) -> Result<Kernel, Error> {
        use std::io::{Seek, Write};
        let name = format!("{} (its vmlinux, decompressed)", path.display());
        let file =
            crate::memory::memfd(c"shoal-vmlinux", nix::sys::memfd::MemFdCreateFlag::empty()).and_then(|mut f| {
                f.write_all(vmlinux)?;
                f.rewind()?;
                Ok(f)
            });
        let file = file.map_err(|source| Error::Open { path: name.clone(), source })?;
        Ok(Kernel { name, file, format: Format::Pvh })
    }
}

/// Whether `bytes` (an image's first 1 KiB or more) is a bzImage: the
/// "HdrS" magic of the Linux boot protocol at 0x202.
fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(&KERNEL_HDR_MAGIC.to_le_bytes()[..])
}

/// What an ELF file's notes say about it being a Linux kernel (only its
/// header, program headers and notes are parsed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ElfNotes {
    /// A note owned by "Linux" (every vmlinux has some).
    linux: bool,
    /// The PVH entry ("Xen", `XEN_ELFNOTE_PHYS32_ENTRY`; `CONFIG_PVH`).
    pvh: bool,
}

fn elf_notes(bytes: &[u8]) -> ElfNotes {
    use goblin::container::{Container, Ctx, Endian};
    use goblin::elf::{Elf, ProgramHeader};
    let mut found = ElfNotes::default();
    let Ok(header) = Elf::parse_header(bytes) else { return found };
    let Ok(mut elf) = Elf::lazy_parse(header) else { return found };
    let container = if elf.is_64 { Container::Big } else { Container::Little };
    let endian = if elf.little_endian { Endian::Little } else { Endian::Big };
    let (offset, count) = (header.e_phoff as usize, usize::from(header.e_phnum));
    let Ok(phdrs) = ProgramHeader::parse(bytes, offset, count, Ctx::new(container, endian)) else { return found };
    elf.program_headers = phdrs;
    let Some(notes) = elf.iter_note_headers(bytes) else { return found };
    // One note segment at a time, each to its first malformed note: on an
    // error goblin's iterator does not move on, it yields the same error
    // forever (skipping errors, a crafted note hung `shoal run`).
    for segment in notes.iters {
        for n in segment {
            let Ok(n) = n else { break };
            match n.name.trim_end_matches('\0') {
                "Linux" => found.linux = true,
                "Xen" if n.n_type == XEN_ELFNOTE_PHYS32_ENTRY => found.pvh = true,
                _ => {}
            }
        }
    }
    found
}

/// The kinds of Linux kernel image shoal boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A bzImage, entered through the 64-bit boot protocol.
    BzImage,
    /// An ELF vmlinux, entered through its PVH entry.
    Pvh,
}

impl Format {
    /// The format of a kernel image, from its bytes: `Ok(None)` for a file
    /// that is no Linux kernel (a unikernel, say), an error for a Linux
    /// vmlinux shoal cannot enter (no PVH entry).
    pub fn of(bytes: &[u8]) -> Result<Option<Format>, Error> {
        if is_bzimage(bytes) {
            return Ok(Some(Format::BzImage));
        }
        let notes = elf_notes(bytes);
        match (notes.linux, notes.pvh) {
            (true, true) => Ok(Some(Format::Pvh)),
            (true, false) => Err(Error::NoPvhEntry),
            (false, _) => Ok(None),
        }
    }
}

/// How vCPU 0 enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Entry {
    /// 64-bit mode at `rip` with rsi = the zero page, on our page tables.
    Boot64 { rip: u64, zero_page: u64 },
    /// 32-bit protected mode, paging off, at `rip` with ebx = the start info.
    Pvh { rip: u64, start_info: u64 },
}

/// What the Linux loader wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxPlan {
    pub entry: Entry,
    /// Our GDT and identity page tables (the 64-bit entry runs on them;
    /// a PVH kernel sets up its own at once).
    pub gdt: u64,
    pub pml4: u64,
}

/// The e820 map of `layout`: low RAM up to the EBDA, the BIOS area
/// reserved (the MP tables live there) but for the pages of the ACPI
/// tables (`acpi_len` bytes at [`acpi::ACPI_START`]), which are ACPI data,
/// and every region above 1 MiB.
fn e820(layout: &Layout, acpi_len: u64) -> Vec<(u64, u64, u32)> {
    let acpi_end = acpi::ACPI_START + acpi_len.next_multiple_of(PAGE_SIZE);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, acpi::ACPI_START - EBDA_START, E820_RESERVED),
        (acpi::ACPI_START, acpi_end - acpi::ACPI_START, E820_ACPI),
        (acpi_end, HIGH_MEMORY - acpi_end, E820_RESERVED),
    ];
    for (i, r) in layout.regions().iter().enumerate() {
        // the first region starts at 0: its part above 1 MiB
        let (start, end) = if i == 0 { (HIGH_MEMORY, r.end()) } else { (r.gpa, r.end()) };
        map.push((start, end - start, E820_RAM));
    }
    map
}

/// Loads `kernel` (a bzImage or a PVH vmlinux) and `initrd` into `mem`,
/// with the boot data, MP tables and ACPI tables for `cpus` vCPUs and
/// `virtio` virtio-mmio devices.
pub fn load(
    kernel: &mut Kernel,
    initrd: Option<&Path>,
    cmdline: &str,
    cpus: u32,
    virtio: usize,
    mem: &GuestMemory,
) -> Result<LinuxPlan, Error> {
    let Kernel { name: kpath, file, format } = kernel;
    let (kpath, format) = (kpath.clone(), *format);
    let layout = mem.layout();
    if layout.size() < MIN_MEMORY {
        return Err(Error::TooSmall { mib: layout.size() >> 20 });
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::CmdlineTooLong { len: cmdline.len() });
    }
    let tables = mptable::build(cpus)?;
    let acpi_tables = acpi::build(cpus, virtio)?;
    // the initramfs first: a missing one is the user's mistake to report
    // before anything is loaded
    let initrd = match initrd {
        Some(path) => {
            let p = path.display().to_string();
            let bytes = crate::config::read_input_file(path, crate::config::MAX_INPUT_FILE)
                .map_err(|source| Error::Initrd { path: p.clone(), source })?;
            Some((p, bytes))
        }
        None => None,
    };
    let write = |bytes: &[u8], gpa: u64| {
        mem.alias().write_slice(bytes, GuestAddress(gpa)).map_err(|e| Error::Write(e.to_string()))
    };
    // the initramfs at the top of low RAM (and below `max`), above the kernel
    let place_initrd = |(p, bytes): (String, Vec<u8>), kernel_end: u64, max: u64| {
        let size = bytes.len() as u64;
        let ceiling = layout.regions()[0].end().min(max);
        let at = ceiling.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
        let at = at.filter(|&a| a >= kernel_end.next_multiple_of(PAGE_SIZE));
        let at = at.ok_or(Error::InitrdTooBig { path: p, size, mem_mib: layout.size() >> 20 })?;
        write(&bytes, at)?;
        Ok::<_, Error>((at, size))
    };

    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    let e820 = e820(layout, acpi_tables.len() as u64);

    let entry = match format {
        Format::BzImage => {
            let loaded = BzImage::load(mem.alias(), None, file, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(|e| Error::NotKernel { path: kpath.clone(), why: e.to_string() })?;
            let mut hdr =
                loaded.setup_header.ok_or_else(|| Error::NotKernel { path: kpath, why: "no setup header".into() })?;
            if let Some(initrd) = initrd {
                let (at, size) = place_initrd(initrd, loaded.kernel_end, u64::from(hdr.initrd_addr_max) + 1)?;
                hdr.ramdisk_image = at as u32;
                hdr.ramdisk_size = size as u32;
            }
            hdr.type_of_loader = KERNEL_LOADER_OTHER;
            hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            hdr.header = KERNEL_HDR_MAGIC;
            hdr.cmd_line_ptr = CMDLINE as u32;
            hdr.cmdline_size = cmdline.len() as u32;
            hdr.loadflags |= CAN_USE_HEAP;
            hdr.heap_end_ptr = (ZERO_PAGE - 0x200) as u16;

            let mut params = boot_params { hdr, ..Default::default() };
            for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry { addr, size, r#type: kind };
            }
            params.e820_entries = e820.len() as u8;
            params.acpi_rsdp_addr = acpi::RSDP_ADDR;
            // SAFETY: boot_params is a plain-old-data C struct (bindgen,
            // packed, no padding with meaning); viewing it as bytes to copy
            // it is sound.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&params as *const boot_params).cast::<u8>(),
                    std::mem::size_of::<boot_params>(),
                )
            };
            write(bytes, ZERO_PAGE)?;
            // the 64-bit entry is 0x200 past the start of the protected-mode kernel
            Entry::Boot64 { rip: loaded.kernel_load.0 + 0x200, zero_page: ZERO_PAGE }
        }
        Format::Pvh => {
            let loaded = Elf::load(mem.alias(), None, file, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(|e| Error::NotPvhKernel { path: kpath.clone(), why: e.to_string() })?;
            let PvhBootCapability::PvhEntryPresent(rip) = loaded.pvh_boot_cap else {
                return Err(Error::NotPvhKernel { path: kpath, why: "no usable PVH entry note".into() });
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
                .collect();
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE,
                memmap_paddr: ZERO_PAGE,
                memmap_entries: memmap.len() as u32,
                rsdp_paddr: acpi::RSDP_ADDR,
                ..Default::default()
            };
            let mut modules = Vec::new();
            if let Some(initrd) = initrd {
                let (paddr, size) = place_initrd(initrd, loaded.kernel_end, PVH_MAX_ADDR)?;
                modules.push(hvm_modlist_entry { paddr, size, ..Default::default() });
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST;
            }
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO));
            params.set_sections(&memmap, GuestAddress(ZERO_PAGE));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(PVH_MODLIST));
            }
            PvhBootConfigurator::write_bootparams(&params, mem.alias()).map_err(|e| Error::Write(e.to_string()))?;
            Entry::Pvh { rip: rip.0, start_info: PVH_INFO }
        }
    };
    write(&line, CMDLINE)?;
    write(&tables, mptable::MPTABLE_START)?;
    write(&acpi_tables, acpi::ACPI_START)?;
    let (gdt, pml4) = loader::write_boot_paging(mem, TABLES).map_err(|e| Error::Write(e.to_string()))?;
    if matches!(entry, Entry::Pvh { .. }) {
        // the PVH ABI's CS is a flat 32-bit code segment: make the GDT's
        // code descriptor say so too (the kernel loads its own GDT at
        // once, but a reload of CS before that must not turn 16-bit)
        write(&CODE32_DESCRIPTOR.to_le_bytes(), gdt + u64::from(loader::CODE_SELECTOR))?;
    }
    Ok(LinuxPlan { entry, gdt, pml4 })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use vm_memory::Bytes;

    #[test]
    fn bzimages_are_told_from_elf_files() {
        let mut b = vec![0u8; 0x400];
        assert!(!is_bzimage(&b));
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&b));
        assert!(!is_bzimage(shoal_guest_images::find("hello").unwrap().elf));
        assert!(!is_bzimage(b"short"));
    }

    /// A scratch directory of this test process holding `name` with
    /// `bytes`: (directory, file).
    pub(crate) fn scratch_file(test: &str, name: &str, bytes: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("shoal-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, bytes).unwrap();
        (dir, file)
    }

    fn guest_memory(mib: u64) -> GuestMemory {
        GuestMemory::new(crate::memory::Layout::new(mib << 20).unwrap()).unwrap()
    }

    /// A minimal x86-64 ELF executable: one 4 KiB segment loaded at
    /// 1 MiB and, with `pvh`, a "Xen" note giving the PVH entry, with
    /// `linux` a "Linux" note as every vmlinux has.
    pub(crate) fn tiny_elf(pvh: Option<u32>, linux: bool) -> Vec<u8> {
        let mut note = Vec::new();
        if linux {
            for v in [6u32, 4, 0x100] {
                note.extend_from_slice(&v.to_le_bytes());
            }
            note.extend_from_slice(b"Linux\0\0\0"); // padded to 4 bytes
            note.extend_from_slice(&[0; 4]);
        }
        if let Some(entry) = pvh {
            for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
                note.extend_from_slice(&v.to_le_bytes());
            }
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let has_notes = !note.is_empty();
        let phnum: u16 = if has_notes { 2 } else { 1 };
        let mut f = vec![0u8; 0x2000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        let put = |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &0x10_0000u64.to_le_bytes()); // e_entry
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut f, 56, &phnum.to_le_bytes());
        // PT_LOAD: file 0x1000..0x2000 at 1 MiB, 8 KiB in memory
        let load: [u64; 6] = [0x1000, 0x10_0000, 0x10_0000, 0x1000, 0x2000, 0x1000];
        put(&mut f, 64, &[1u32.to_le_bytes(), 5u32.to_le_bytes()].concat());
        for (i, v) in load.iter().enumerate() {
            put(&mut f, 72 + 8 * i, &v.to_le_bytes());
        }
        if has_notes {
            let note_at = 64 + 2 * 56;
            let ph: [u64; 6] = [note_at as u64, 0, 0, note.len() as u64, note.len() as u64, 4];
            put(&mut f, 120, &[4u32.to_le_bytes(), 4u32.to_le_bytes()].concat());
            for (i, v) in ph.iter().enumerate() {
                put(&mut f, 128 + 8 * i, &v.to_le_bytes());
            }
            put(&mut f, note_at, &note);
        }
        f
    }

    /// A bzImage around `payload`: one setup sector, boot protocol
    /// `version`, the payload right after the setup code (as the kernel's
    /// build lays it out, its decompressed size appended but to gzip).
    pub(crate) fn bzimage_around(payload: &[u8], version: u16) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1;
        b[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    pub(crate) fn xz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(bytes).unwrap();
        let mut out = e.finish().unwrap();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_bzimages_vmlinux_is_decompressed_from_xz_or_gzip() {
        let elf = tiny_elf(Some(0x10_0040), true);
        let b = bzimage_around(&xz(&elf), 0x20f);
        assert_eq!(Format::of(&b).unwrap(), Some(Format::BzImage));
        assert_eq!(vmlinux_of_bzimage(&b).unwrap(), elf);
        assert_eq!(vmlinux_of_bzimage(&bzimage_around(&gzip(&elf), 0x20f)).unwrap(), elf);
        // and what comes out loads through its PVH entry
        let mut k = Kernel::decompressed(Path::new("k"), &vmlinux_of_bzimage(&b).unwrap()).unwrap();
        let plan = load(&mut k, None, "", 1, 0, &guest_memory(128)).unwrap();
        assert_eq!(plan.entry, Entry::Pvh { rip: 0x10_0040, start_info: PVH_INFO });
    }

    #[test]
    fn a_bzimage_that_cannot_be_entered_through_pvh_says_why() {
        let why = |b: &[u8]| vmlinux_of_bzimage(b).unwrap_err();
        let elf = tiny_elf(Some(0x10_0040), true);
        assert!(why(&bzimage_around(&xz(&tiny_elf(None, true)), 0x20f)).contains("no PVH entry"));
        assert!(why(&bzimage_around(&xz(&tiny_elf(Some(0x10_0040), false)), 0x20f)).contains("not a Linux ELF"));
        let zstd = [&[0x28, 0xb5, 0x2f, 0xfd][..], &elf].concat();
        assert!(why(&bzimage_around(&zstd, 0x20f)).contains("(zstd) is not one shoal reads"));
        assert!(why(&bzimage_around(&xz(&elf), 0x207)).contains("names no payload"));
        let mut corrupt = xz(&elf);
        corrupt[40] ^= 0xff;
        assert!(why(&bzimage_around(&corrupt, 0x20f)).contains("decompressing its payload"));
        // a payload length beyond the file
        let mut long = bzimage_around(&xz(&elf), 0x20f);
        long[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(why(&long).contains("outside the file"));
        assert!(why(&[0u8; 100]).contains("too short"));
    }

    #[test]
    fn pvh_kernels_are_found_by_their_note() {
        let of = |b: &[u8]| Format::of(b).ok().flatten();
        assert_eq!(of(&tiny_elf(Some(0x10_0040), true)), Some(Format::Pvh));
        // a PVH entry alone (a unikernel could have one) is not Linux
        assert_eq!(of(&tiny_elf(Some(0x10_0040), false)), None);
        assert_eq!(of(&tiny_elf(None, false)), None);
        assert_eq!(of(shoal_guest_images::find("hello").unwrap().elf), None);
        let mut b = vec![0u8; 0x400];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(of(&b), Some(Format::BzImage));
        // a vmlinux without the PVH entry is told from a unikernel
        assert!(matches!(Format::of(&tiny_elf(None, true)), Err(Error::NoPvhEntry)));
    }

    #[test]
    fn a_malformed_note_ends_the_search_instead_of_hanging() {
        // found by fuzz/ (linux_format): a note segment with an alignment
        // goblin does not implement (0x2b), after which its note iterator
        // yielded the same error forever
        let mut k = tiny_elf(Some(0x10_0040), true);
        let p_align = 120 + 48;
        k[p_align..p_align + 8].copy_from_slice(&0x2bu64.to_le_bytes());
        assert_eq!(Format::of(&k).ok().flatten(), None);
        // a bad note segment does not hide a good one after it
        let mut two = tiny_elf(Some(0x10_0040), true);
        two[56..58].copy_from_slice(&3u16.to_le_bytes()); // e_phnum
                                                          // the notes move to 0x800, the good PT_NOTE to third place
        two.copy_within(176..176 + 48, 0x800);
        two.copy_within(120..176, 176);
        two[176 + 8..176 + 16].copy_from_slice(&0x800u64.to_le_bytes()); // its p_offset
        two[p_align..p_align + 8].copy_from_slice(&0x2bu64.to_le_bytes());
        assert_eq!(Format::of(&two).ok().flatten(), Some(Format::Pvh));
    }

    #[test]
    fn a_pvh_kernel_gets_its_start_info() {
        let (dir, k) = scratch_file("pvh", "vmlinux", &tiny_elf(Some(0x10_0040), true));
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let mem = guest_memory(128);
        let plan =
            load(&mut Kernel::open(&k, Format::Pvh).unwrap(), Some(&initrd), "console=ttyS0", 2, 0, &mem).unwrap();
        assert_eq!(plan.entry, Entry::Pvh { rip: 0x10_0040, start_info: PVH_INFO });
        let read = |gpa: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.alias().read_slice(&mut b, GuestAddress(gpa)).unwrap();
            b
        };
        let u32_at = |gpa| u32::from_le_bytes(read(gpa, 4).try_into().unwrap());
        let u64_at = |gpa| u64::from_le_bytes(read(gpa, 8).try_into().unwrap());
        // hvm_start_info: magic, version, flags, nr_modules, modlist,
        // cmdline, rsdp, memmap, memmap entries
        assert_eq!(u32_at(PVH_INFO), XEN_HVM_START_MAGIC);
        assert_eq!(u32_at(PVH_INFO + 4), 1);
        assert_eq!(u32_at(PVH_INFO + 8), 0);
        assert_eq!(u32_at(PVH_INFO + 12), 1);
        assert_eq!(u64_at(PVH_INFO + 16), PVH_MODLIST);
        assert_eq!(u64_at(PVH_INFO + 24), CMDLINE);
        assert_eq!(u64_at(PVH_INFO + 32), acpi::RSDP_ADDR, "rsdp_paddr");
        assert_eq!(u64_at(PVH_INFO + 40), ZERO_PAGE);
        let entries = u32_at(PVH_INFO + 48) as u64;
        assert_eq!(entries, e820(mem.layout(), acpi::build(2, 0).unwrap().len() as u64).len() as u64);
        // the memory map covers the guest's RAM; the module is the initrd,
        // page-aligned at the top of low RAM
        let ram: u64 = (0..entries)
            .filter(|i| u32_at(ZERO_PAGE + 24 * i + 16) == E820_RAM)
            .map(|i| u64_at(ZERO_PAGE + 24 * i + 8))
            .sum();
        assert_eq!(ram, (128 << 20) - (HIGH_MEMORY - EBDA_START));
        // the ACPI tables' pages are ACPI data, the RSDP at their start
        let acpi: Vec<(u64, u64)> = (0..entries)
            .filter(|i| u32_at(ZERO_PAGE + 24 * i + 16) == E820_ACPI)
            .map(|i| (u64_at(ZERO_PAGE + 24 * i), u64_at(ZERO_PAGE + 24 * i + 8)))
            .collect();
        assert_eq!(acpi, vec![(acpi::ACPI_START, PAGE_SIZE)]);
        assert_eq!(read(acpi::RSDP_ADDR, 8), b"RSD PTR ");
        let (paddr, size) = (u64_at(PVH_MODLIST), u64_at(PVH_MODLIST + 8));
        assert_eq!(size, 10_000);
        assert_eq!(paddr % PAGE_SIZE, 0);
        assert_eq!(read(paddr, 10_000), vec![7u8; 10_000]);
        assert_eq!(read(CMDLINE, 14), b"console=ttyS0\0");
        // the MP tables for 2 vCPUs, and a 32-bit code segment in the GDT
        assert_eq!(read(mptable::MPTABLE_START, 4), b"_MP_");
        assert_eq!(u64_at(plan.gdt + u64::from(loader::CODE_SELECTOR)), CODE32_DESCRIPTOR);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_e820_map_tiles_low_memory_and_marks_the_acpi_tables() {
        let mem = guest_memory(128);
        let map = e820(mem.layout(), 5000);
        // below 1 MiB: back to back from 0, nothing overlapping
        let mut end = 0;
        for &(addr, size, _) in map.iter().take_while(|e| e.0 < HIGH_MEMORY) {
            assert_eq!(addr, end);
            end = addr + size;
        }
        assert_eq!(end, HIGH_MEMORY);
        let acpi: Vec<_> = map.iter().filter(|e| e.2 == E820_ACPI).collect();
        assert_eq!(acpi, vec![&(acpi::ACPI_START, 2 * PAGE_SIZE, E820_ACPI)]);
        const { assert!(acpi::ACPI_START + 2 * PAGE_SIZE <= mptable::MPTABLE_START) };
    }

    #[test]
    fn an_elf_without_a_pvh_note_is_refused_as_pvh() {
        let (dir, k) = scratch_file("nopvh", "vmlinux", &tiny_elf(None, true));
        let e = load(&mut Kernel::open(&k, Format::Pvh).unwrap(), None, "", 1, 0, &guest_memory(128)).unwrap_err();
        assert!(matches!(e, Error::NotPvhKernel { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fake_kernel_is_refused_clearly() {
        let (dir, k) = scratch_file("linux", "not-a-kernel", &[0u8; 4096]);
        let e = load(&mut Kernel::open(&k, Format::BzImage).unwrap(), None, "console=ttyS0", 1, 0, &guest_memory(128))
            .unwrap_err();
        assert!(matches!(e, Error::NotKernel { .. }), "{e}");
        assert!(matches!(
            load(&mut Kernel::open(&k, Format::BzImage).unwrap(), None, "", 1, 0, &guest_memory(64)),
            Err(Error::TooSmall { mib: 64 })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
