//! Linux guests: the x86 64-bit boot protocol for a bzImage (Debian's
//! stock kernel), with linux-loader for the image and our own zero page,
//! e820 map, initramfs placement, GDT and identity page tables.
//!
//! Guest-physical layout below 1 MiB: the zero page (`boot_params`) at
//! 0x7000, the boot stack below 0x8ff0, GDT and page tables from 0x9000,
//! the command line at 0x20000; the kernel goes where its header says
//! (1 MiB); the initramfs at the top of low RAM.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::loader;
use crate::memory::{GuestMemory, PAGE_SIZE};

/// The zero page.
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
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
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
}

/// Whether `bytes` (an image's first 1 KiB or more) is a bzImage: the
/// "HdrS" magic of the Linux boot protocol at 0x202.
pub fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(&KERNEL_HDR_MAGIC.to_le_bytes()[..])
}

/// Where the Linux loader put things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxPlan {
    /// The 64-bit entry point.
    pub entry: u64,
    pub zero_page: u64,
    pub gdt: u64,
    pub pml4: u64,
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the zero page.
pub fn load(kernel: &Path, initrd: Option<&Path>, cmdline: &str, mem: &GuestMemory) -> Result<LinuxPlan, Error> {
    let layout = mem.layout();
    if layout.size() < MIN_MEMORY {
        return Err(Error::TooSmall { mib: layout.size() >> 20 });
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::CmdlineTooLong { len: cmdline.len() });
    }
    // the initramfs first: a missing one is the user's mistake to report
    // before anything is loaded
    let initrd = match initrd {
        Some(path) => {
            let p = path.display().to_string();
            Some((p.clone(), std::fs::read(path).map_err(|source| Error::Initrd { path: p, source })?))
        }
        None => None,
    };
    let kpath = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| Error::Open { path: kpath.clone(), source })?;
    let loaded = BzImage::load(mem.alias(), None, &mut file, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|e| Error::NotKernel { path: kpath.clone(), why: e.to_string() })?;
    let mut hdr = loaded.setup_header.ok_or_else(|| Error::NotKernel { path: kpath, why: "no setup header".into() })?;
    let write = |bytes: &[u8], gpa: u64| {
        mem.alias().write_slice(bytes, GuestAddress(gpa)).map_err(|e| Error::Write(e.to_string()))
    };

    // the initramfs at the top of low RAM, below what the kernel may reach
    let low_end = layout.regions()[0].end();
    if let Some((p, bytes)) = initrd {
        let size = bytes.len() as u64;
        let ceiling = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
        let at = ceiling.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
        let at = at.filter(|&a| a >= loaded.kernel_end.next_multiple_of(PAGE_SIZE));
        let at = at.ok_or(Error::InitrdTooBig { path: p, size, mem_mib: layout.size() >> 20 })?;
        write(&bytes, at)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    write(&line, CMDLINE)?;

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = (ZERO_PAGE - 0x200) as u16;

    let mut params = boot_params { hdr, ..Default::default() };
    let mut e820 = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED)];
    for (i, r) in layout.regions().iter().enumerate() {
        // the first region starts at 0: its part above 1 MiB
        let (start, end) = if i == 0 { (HIGH_MEMORY, r.end()) } else { (r.gpa, r.end()) };
        e820.push((start, end - start, E820_RAM));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry { addr, size, r#type: kind };
    }
    params.e820_entries = e820.len() as u8;
    // SAFETY: boot_params is a plain-old-data C struct (bindgen, packed, no
    // padding with meaning); viewing it as bytes to copy it is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts((&params as *const boot_params).cast::<u8>(), std::mem::size_of::<boot_params>())
    };
    write(bytes, ZERO_PAGE)?;

    let (gdt, pml4) = loader::write_boot_paging(mem, TABLES).map_err(|e| Error::Write(e.to_string()))?;
    // the 64-bit entry is 0x200 past the start of the protected-mode kernel
    Ok(LinuxPlan { entry: loaded.kernel_load.0 + 0x200, zero_page: ZERO_PAGE, gdt, pml4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimages_are_told_from_elf_files() {
        let mut b = vec![0u8; 0x400];
        assert!(!is_bzimage(&b));
        b[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&b));
        assert!(!is_bzimage(shoal_guest_images::find("hello").unwrap().elf));
        assert!(!is_bzimage(b"short"));
    }

    #[test]
    fn a_fake_kernel_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("shoal-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("not-a-kernel");
        std::fs::write(&k, vec![0u8; 4096]).unwrap();
        let mem = GuestMemory::new(crate::memory::Layout::new(128 << 20).unwrap()).unwrap();
        let e = load(&k, None, "console=ttyS0", &mem).unwrap_err();
        assert!(matches!(e, Error::NotKernel { .. }), "{e}");
        let small = GuestMemory::new(crate::memory::Layout::new(64 << 20).unwrap()).unwrap();
        assert!(matches!(load(&k, None, "", &small), Err(Error::TooSmall { mib: 64 })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
