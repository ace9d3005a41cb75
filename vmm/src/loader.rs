//! Loads a 64-bit ELF guest and lays out what it needs to start in long
//! mode: a GDT, identity-mapped page tables over all guest memory, the
//! command line, one boot-info block and one stack per vCPU.
//!
//! Everything is written through the alias view before the page engine
//! starts; the engine then finds exactly these pages in the memfd (they
//! start owned by node 0) and treats every other page (stacks and `.bss`
//! included) as dormant.

use goblin::elf::{header, program_header, Elf};
use shoal_guest_images::abi::{self, BootInfo, Region};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, Layout, PAGE_SIZE};

/// Bytes of stack per vCPU.
pub const STACK_SIZE: u64 = 64 << 10;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

// page-table entry bits
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
// Accessed and dirty set up front: the CPU (or KVM walking the tables for
// an emulated access) then never writes the tables, so on a pod the pages
// holding them stay read-shared by every node that runs vCPUs instead of
// bouncing between them as written pages.
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;

/// GDT: null, 64-bit code, data, and a TSS descriptor for TR.
pub const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_ffff];
/// Selectors into [`GDT`].
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Errors of image loading: all of them are bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest image {0}: not an ELF file (no \\x7fELF magic)")]
    NotElf(String),
    #[error("guest image {0}: 32-bit ELF; shoal runs 64-bit x86-64 ELF images")]
    Elf32(String),
    #[error("guest image {0}: big-endian ELF; shoal runs little-endian x86-64 images")]
    BigEndian(String),
    #[error("guest image {name}: not an x86-64 ELF (e_machine = {machine})")]
    Machine { name: String, machine: u16 },
    #[error("guest image {name}: ELF type {kind} is not loadable; link it as a static executable (ET_EXEC)")]
    Type { name: String, kind: u16 },
    #[error("guest image {name}: malformed ELF: {reason}")]
    Malformed { name: String, reason: String },
    #[error("guest image {0}: no loadable (PT_LOAD) segment")]
    NoSegments(String),
    #[error(
        "guest image {name}: segment {index} at guest-physical {start:#x}..{end:#x} is outside guest RAM \
         ({ram})"
    )]
    SegmentOutside { name: String, index: usize, start: u64, end: u64, ram: String },
    #[error("guest image {name}: segment {index} has more file bytes ({filesz}) than memory bytes ({memsz})")]
    SegmentSizes { name: String, index: usize, filesz: u64, memsz: u64 },
    #[error("guest image {name}: entry point {entry:#x} is not inside an executable segment")]
    Entry { name: String, entry: u64 },
    #[error(
        "guest memory of {mem_mib} MiB is too small for image {name} and its boot data for {vcpus} vCPUs \
         (they need {need_mib} MiB of RAM below 3 GiB)"
    )]
    NoRoom { name: String, mem_mib: u64, vcpus: u32, need_mib: u64 },
    #[error("command line is {len} bytes; the limit is {max}", max = abi::CMDLINE_MAX)]
    CmdlineTooLong { len: usize },
    #[error("writing the guest image into memory failed: {0}")]
    Write(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A loadable segment, checked against the image and the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    file_offset: usize,
    filesz: u64,
    memsz: u64,
    exec: bool,
}

/// A checked ELF image: its entry and segments.
#[derive(Debug)]
pub struct Image<'a> {
    name: String,
    bytes: &'a [u8],
    entry: u64,
    segments: Vec<Segment>,
}

impl<'a> Image<'a> {
    /// Refuses a segment outside the guest RAM of `layout` (which needs no
    /// memory yet: a pod checks this before it starts its nodes).
    pub fn check_fits(&self, layout: &Layout) -> Result<()> {
        for (index, s) in self.segments.iter().enumerate() {
            let inside = layout.region_of_gpa(s.paddr).is_some_and(|r| s.paddr + s.memsz <= r.end());
            if !inside {
                return Err(Error::SegmentOutside {
                    name: self.name.clone(),
                    index,
                    start: s.paddr,
                    end: s.paddr + s.memsz,
                    ram: describe(layout),
                });
            }
        }
        Ok(())
    }

    /// Bytes of guest memory the segments' file bytes fill, in whole pages:
    /// a floor of what loading the image writes.
    pub fn file_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.filesz.div_ceil(4096) * 4096).sum()
    }

    /// Checks that `bytes` is a static x86-64 ELF executable with sane
    /// segments. `name` is how errors call it.
    pub fn parse(name: &str, bytes: &'a [u8]) -> Result<Self> {
        let name = name.to_string();
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(Error::NotElf(name));
        }
        let malformed = |reason: String| Error::Malformed { name: name.clone(), reason };
        if bytes.len() < header::SIZEOF_IDENT {
            return Err(malformed("truncated ELF identification".into()));
        }
        match bytes[header::EI_CLASS] {
            header::ELFCLASS64 => {}
            header::ELFCLASS32 => return Err(Error::Elf32(name)),
            c => return Err(malformed(format!("unknown ELF class {c}"))),
        }
        if bytes[header::EI_DATA] != header::ELFDATA2LSB {
            return Err(Error::BigEndian(name));
        }
        let elf = Elf::parse(bytes).map_err(|e| malformed(e.to_string()))?;
        if elf.header.e_machine != header::EM_X86_64 {
            return Err(Error::Machine { name, machine: elf.header.e_machine });
        }
        if elf.header.e_type != header::ET_EXEC {
            return Err(Error::Type { name, kind: elf.header.e_type });
        }
        let mut segments = Vec::new();
        for (index, ph) in elf.program_headers.iter().enumerate() {
            if ph.p_type != program_header::PT_LOAD || ph.p_memsz == 0 {
                continue;
            }
            if ph.p_filesz > ph.p_memsz {
                return Err(Error::SegmentSizes { name, index, filesz: ph.p_filesz, memsz: ph.p_memsz });
            }
            let file_end = ph.p_offset.checked_add(ph.p_filesz);
            if file_end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(malformed(format!("segment {index}'s file bytes run past the end of the file")));
            }
            if ph.p_paddr.checked_add(ph.p_memsz).is_none() {
                return Err(malformed(format!("segment {index} wraps around the address space")));
            }
            segments.push(Segment {
                paddr: ph.p_paddr,
                file_offset: ph.p_offset as usize,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
                exec: ph.p_flags & program_header::PF_X != 0,
            });
        }
        if segments.is_empty() {
            return Err(Error::NoSegments(name));
        }
        let entry = elf.header.e_entry;
        if !segments.iter().any(|s| s.exec && entry >= s.paddr && entry < s.paddr + s.memsz) {
            return Err(Error::Entry { name, entry });
        }
        Ok(Image { name, bytes, entry, segments })
    }

    /// One past the highest guest-physical byte of any segment.
    fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0)
    }
}

/// What the guest needs to know, beyond memory, to start.
#[derive(Clone, Debug)]
pub struct BootParams {
    pub cmdline: String,
    pub vcpus: u32,
    /// The node each vCPU starts on (empty: all on node 0).
    pub placement: Vec<u32>,
    pub num_nodes: u64,
}

/// Where the loader put things: what each vCPU is entered with (sent to
/// every node of a pod, which starts the vCPUs placed on it from it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootPlan {
    pub entry: u64,
    pub pml4: u64,
    pub gdt: u64,
    /// Per vCPU: (boot-info block, initial rsp).
    pub vcpus: Vec<(u64, u64)>,
    /// First free guest-physical byte (2 MiB aligned).
    pub free_base: u64,
    /// A Linux kernel: entered through the 64-bit boot protocol instead.
    pub linux: Option<LinuxEntry>,
}

/// How vCPU 0 enters a Linux kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinuxEntry {
    pub entry: crate::linux::Entry,
    pub stack: u64,
    /// Hide XSAVE from the guest (see `vcpu::cpuid_with`).
    pub no_xsave: bool,
}

/// Writes the GDT and identity page tables over all of `mem` (and at
/// least 4 GiB) from `base` up; returns (GDT, PML4) addresses. For
/// kernels with their own loader (Linux).
pub fn write_boot_paging(mem: &GuestMemory, base: u64) -> Result<(u64, u64)> {
    let p = place(base, mem.layout().top(), 0);
    let write = |bytes: &[u8], gpa: u64| {
        mem.alias().write_slice(bytes, GuestAddress(gpa)).map_err(|e| Error::Write(e.to_string()))
    };
    write(&words(&GDT), p.gdt)?;
    write_page_tables(&p, &write)?;
    Ok((p.gdt, p.pml4))
}

/// Guest-physical placement of the boot data after the image.
#[derive(Debug)]
struct Placement {
    gdt: u64,
    pml4: u64,
    pdpts: u64,
    pds: u64,
    cmdline: u64,
    boot_infos: u64,
    stacks: u64,
    free_base: u64,
    n_pdpt: u64,
    n_pd: u64,
}

fn place(image_end: u64, top: u64, vcpus: u32) -> Placement {
    let align = |v: u64, a: u64| v.div_ceil(a) * a;
    // all RAM, and at least the 32-bit space: a stray access to the MMIO
    // hole then exits to the VMM with its address instead of faulting
    let n_pd = top.max(4 * GIB).div_ceil(GIB);
    let n_pdpt = n_pd.div_ceil(512);
    let gdt = align(image_end, PAGE_SIZE);
    let pml4 = gdt + PAGE_SIZE;
    let pdpts = pml4 + PAGE_SIZE;
    let pds = pdpts + n_pdpt * PAGE_SIZE;
    let cmdline = pds + n_pd * PAGE_SIZE;
    let boot_infos = cmdline + PAGE_SIZE;
    let info_bytes = u64::from(vcpus) * std::mem::size_of::<BootInfo>() as u64;
    let stacks = align(boot_infos + info_bytes, PAGE_SIZE);
    let free_base = align(stacks + u64::from(vcpus) * STACK_SIZE, TWO_MIB);
    Placement { gdt, pml4, pdpts, pds, cmdline, boot_infos, stacks, free_base, n_pdpt, n_pd }
}

/// Writes the image and the boot data into guest memory.
pub fn load(image: &Image, mem: &GuestMemory, params: &BootParams) -> Result<BootPlan> {
    let layout = mem.layout();
    if params.cmdline.len() > abi::CMDLINE_MAX as usize {
        return Err(Error::CmdlineTooLong { len: params.cmdline.len() });
    }
    image.check_fits(layout)?;
    let p = place(image.end(), layout.top(), params.vcpus);
    let low_end = layout.regions()[0].end();
    if p.free_base > low_end {
        return Err(Error::NoRoom {
            name: image.name.clone(),
            mem_mib: layout.size() >> 20,
            vcpus: params.vcpus,
            need_mib: p.free_base.div_ceil(1 << 20),
        });
    }

    let write = |bytes: &[u8], gpa: u64| {
        mem.alias().write_slice(bytes, GuestAddress(gpa)).map_err(|e| Error::Write(e.to_string()))
    };
    for s in &image.segments {
        // only the file bytes: the rest of memsz (.bss) is dormant, which
        // reads as zeros
        write(&image.bytes[s.file_offset..s.file_offset + s.filesz as usize], s.paddr)?;
    }
    write(&words(&GDT), p.gdt)?;
    write_page_tables(&p, &write)?;
    let mut cmdline = params.cmdline.clone().into_bytes();
    cmdline.push(0);
    write(&cmdline, p.cmdline)?;

    let mut regions = [Region::default(); abi::BOOT_INFO_MAX_REGIONS as usize];
    for (slot, r) in regions.iter_mut().zip(layout.regions()) {
        *slot = Region { base: r.gpa, len: r.len };
    }
    let mut vcpus = Vec::with_capacity(params.vcpus as usize);
    for id in 0..u64::from(params.vcpus) {
        let info_gpa = p.boot_infos + id * std::mem::size_of::<BootInfo>() as u64;
        let stack_top = p.stacks + (id + 1) * STACK_SIZE;
        let info = BootInfo {
            magic: abi::BOOT_INFO_MAGIC,
            version: abi::BOOT_INFO_VERSION,
            vcpu_id: id,
            num_vcpus: params.vcpus.into(),
            node_id: params.placement.get(id as usize).copied().map_or(0, u64::from),
            num_nodes: params.num_nodes,
            mem_bytes: layout.size(),
            cmdline_gpa: p.cmdline,
            cmdline_len: params.cmdline.len() as u64,
            free_base: p.free_base,
            stack_top,
            num_regions: layout.regions().len() as u64,
            regions,
        };
        write(&info.to_bytes(), info_gpa)?;
        vcpus.push((info_gpa, stack_top));
    }
    Ok(BootPlan { entry: image.entry, pml4: p.pml4, gdt: p.gdt, vcpus, free_base: p.free_base, linux: None })
}

/// PML4 → PDPTs → PDs of 2 MiB pages, identity mapping [0, n_pd GiB).
fn write_page_tables(p: &Placement, write: &dyn Fn(&[u8], u64) -> Result<()>) -> Result<()> {
    let table = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED;
    let pml4: Vec<u64> = (0..p.n_pdpt).map(|i| (p.pdpts + i * PAGE_SIZE) | table).collect();
    write(&words(&pml4), p.pml4)?;
    let pdpt: Vec<u64> = (0..p.n_pd).map(|i| (p.pds + i * PAGE_SIZE) | table).collect();
    write(&words(&pdpt), p.pdpts)?;
    let pd: Vec<u64> = (0..p.n_pd * 512).map(|i| (i * TWO_MIB) | table | PTE_DIRTY | PTE_HUGE).collect();
    write(&words(&pd), p.pds)
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn describe(layout: &Layout) -> String {
    layout.regions().iter().map(|r| format!("{:#x}..{:#x}", r.gpa, r.end())).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> &'static [u8] {
        shoal_guest_images::find("hello").unwrap().elf
    }

    fn params(vcpus: u32) -> BootParams {
        BootParams { cmdline: "mib=4 seed=7".into(), vcpus, placement: Vec::new(), num_nodes: 1 }
    }

    #[test]
    fn embedded_guests_parse() {
        for g in shoal_guest_images::GUESTS {
            let img = Image::parse(g.name, g.elf).unwrap();
            assert_eq!(img.entry, abi::GUEST_LOAD_ADDR);
        }
    }

    #[test]
    fn bad_images_get_clear_errors() {
        assert!(matches!(Image::parse("x", b"#!/bin/sh\n"), Err(Error::NotElf(_))));
        assert!(matches!(Image::parse("x", b""), Err(Error::NotElf(_))));
        let mut e32 = hello().to_vec();
        e32[header::EI_CLASS] = header::ELFCLASS32;
        assert!(matches!(Image::parse("x", &e32), Err(Error::Elf32(_))));
        let mut arm = hello().to_vec();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        let err = Image::parse("x", &arm).unwrap_err();
        assert_eq!(err.to_string(), "guest image x: not an x86-64 ELF (e_machine = 183)");
        let truncated = &hello()[..100];
        assert!(matches!(Image::parse("x", truncated), Err(Error::Malformed { .. })));
        let mut dyn_type = hello().to_vec();
        dyn_type[16..18].copy_from_slice(&header::ET_DYN.to_le_bytes());
        assert!(matches!(Image::parse("x", &dyn_type), Err(Error::Type { .. })));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let h = hello();
        for len in 0..h.len().min(4096) {
            let _ = Image::parse("x", &h[..len]);
        }
    }

    #[test]
    fn load_writes_image_tables_and_boot_info() {
        let mem = GuestMemory::new(Layout::new(64 << 20).unwrap()).unwrap();
        let img = Image::parse("hello", hello()).unwrap();
        let plan = load(&img, &mem, &params(2)).unwrap();
        assert_eq!(plan.entry, 0x10_0000);
        assert_eq!(plan.free_base % TWO_MIB, 0);
        assert_eq!(plan.vcpus.len(), 2);
        let word = |gpa: u64| mem.alias().read_obj::<u64>(GuestAddress(gpa)).unwrap();
        assert_eq!(word(plan.pml4) & !0xfff, plan.pml4 + PAGE_SIZE);
        // the PD maps GPA 2 MiB * i at entry i
        let pd = plan.pml4 + 2 * PAGE_SIZE;
        assert_eq!(word(pd + 8 * 3), (3 * TWO_MIB) | PTE_PRESENT | PTE_WRITE | PTE_ACCESSED | PTE_DIRTY | PTE_HUGE);
        let (info, stack) = plan.vcpus[1];
        assert_eq!(word(info), abi::BOOT_INFO_MAGIC);
        assert_eq!(word(info + 16), 1, "vcpu_id");
        assert_eq!(word(info + 24), 2, "num_vcpus");
        assert_eq!(word(info + 80), stack);
        // written: the image's file bytes, GDT, PML4, PDPT, PD, cmdline,
        // boot infos; nothing else (stacks and .bss stay dormant)
        let image_pages: u64 =
            img.segments.iter().map(|s| (s.paddr + s.filesz).div_ceil(PAGE_SIZE) - s.paddr / PAGE_SIZE).sum();
        let pages: u64 = mem.populated_extents().unwrap().iter().map(|(_, l)| l / PAGE_SIZE).sum();
        // 4 PD pages: the first 4 GiB are always mapped
        assert_eq!(pages, image_pages + 9);
    }

    #[test]
    fn segments_outside_ram_and_small_memory_are_refused() {
        let mut far = hello().to_vec();
        // move the first program header's paddr to 1 TiB
        let phoff = u64::from_le_bytes(far[32..40].try_into().unwrap()) as usize;
        far[phoff + 24..phoff + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        far[phoff + 16..phoff + 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        far[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes()); // entry
        let img = Image::parse("far", &far).unwrap();
        let mem = GuestMemory::new(Layout::new(16 << 20).unwrap()).unwrap();
        assert!(matches!(load(&img, &mem, &params(1)), Err(Error::SegmentOutside { .. })));

        let mem = GuestMemory::new(Layout::new(4 << 20).unwrap()).unwrap();
        let img = Image::parse("hello", hello()).unwrap();
        assert!(matches!(load(&img, &mem, &params(64)), Err(Error::NoRoom { .. })));
    }
}
