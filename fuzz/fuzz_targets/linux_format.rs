//! Telling a Linux kernel from a unikernel (`shoal_vmm::linux::Format::of`:
//! a bzImage's header, or a vmlinux's ELF notes for its PVH entry): any
//! bytes are a format, no kernel, or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::linux::Format;

fuzz_target!(|data: &[u8]| {
    let _ = Format::of(data);
});
