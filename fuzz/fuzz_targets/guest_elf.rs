//! Guest images (`shoal_vmm::loader::Image::parse`, the ELF checks run on
//! `--kernel FILE` before anything is created): any bytes are an image or
//! an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::loader::Image;

fuzz_target!(|data: &[u8]| {
    let _ = Image::parse("fuzz.elf", data);
});
