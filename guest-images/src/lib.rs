//! The unikernel-style guests shoal runs, built from `csrc/` by the build
//! script and embedded here, so `shoal run --guest NAME` needs no files.
//!
//! [`abi`] is the contract between the VMM and every guest: how a vCPU is
//! entered, the boot-info block, and the hypercall port.

pub mod abi;

/// A command-line key a guest understands (every value is an unsigned
/// number, decimal or `0x` hexadecimal).
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// The key, as in `key=value`.
    pub key: &'static str,
    /// What the value means, for `shoal guests`.
    pub help: &'static str,
    /// The value the guest uses when the key is absent.
    pub default: u64,
}

/// One embedded guest image.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    /// Name for `shoal run --guest NAME`.
    pub name: &'static str,
    /// One line for `shoal guests`.
    pub summary: &'static str,
    /// Command-line keys it accepts.
    pub params: &'static [Param],
    /// The x86-64 ELF image.
    pub elf: &'static [u8],
}

macro_rules! elf {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf"))
    };
}

const MIB: Param = Param { key: "mib", help: "MiB of free guest RAM to use", default: 16 };
const SEED: Param = Param { key: "seed", help: "seed of the memory pattern", default: 1 };

/// Every guest shoal carries.
pub const GUESTS: &[Guest] = &[
    Guest {
        name: "hello",
        summary: "prints a line on the serial console and one through the print hypercall; exits 0",
        params: &[],
        elf: elf!("hello"),
    },
    Guest {
        name: "memtouch",
        summary: "writes a seed-derived pattern over mib MiB, reads it back, prints checksum=0x...; exits 0 when all verified, 1 otherwise; with rounds, then reads the first hot MiB again every round and the rest once over the rounds",
        params: &[
            MIB,
            SEED,
            Param { key: "hot", help: "MiB read again every round (with rounds)", default: 0 },
            Param { key: "rounds", help: "rounds of hot and cold reads after the pattern (0: none)", default: 0 },
        ],
        elf: elf!("memtouch"),
    },
    Guest {
        name: "zeroboot",
        summary: "zeroes all free RAM like an OS boot, checks a sample reads zero, then runs memtouch's pattern over mib MiB",
        params: &[MIB, SEED],
        elf: elf!("zeroboot"),
    },
    Guest {
        name: "smp",
        summary: "every vCPU adds 1 to a shared counter iters times with atomic adds; vCPU 0 checks the total",
        params: &[
            Param { key: "iters", help: "increments per vCPU", default: 1000 },
            Param {
                key: "exits",
                help: "1: an exit to shoal after each add (vCPUs on different nodes take the counter's page in turns)",
                default: 0,
            },
        ],
        elf: elf!("smp"),
    },
    Guest {
        name: "touch",
        summary: "writes one word in every page of mib MiB and reports the first-touch time (the fault benchmark); every vCPU touches its own mib MiB",
        params: &[MIB],
        elf: elf!("touch"),
    },
    Guest {
        name: "migrate",
        summary: "vCPU 0 moves itself between the nodes of a pod: mode=0 checks registers, stack and memory survive every move; mode=1 reads data written on node 1 (the vCPU should follow it)",
        params: &[
            Param { key: "mode", help: "0 tour every node, 1 follow data on node 1, 2 move outside the pod, 3 count IPIs while moving", default: 0 },
            MIB,
            Param { key: "rounds", help: "tours (modes 0 and 3) or read passes (mode 1)", default: 1 },
            Param { key: "ipis", help: "IPIs vCPU 1 sends vCPU 0 while it moves (mode 3)", default: 100 },
        ],
        elf: elf!("migrate"),
    },
    Guest {
        name: "sharing",
        summary: "vCPU 0 writes 1..rounds into a shared page, the other vCPUs read every value and acknowledge it; ipi=1 wakes them with IPIs",
        params: &[
            Param { key: "rounds", help: "values written", default: 100 },
            Param { key: "ipi", help: "1: readers sleep until an IPI", default: 0 },
        ],
        elf: elf!("sharing"),
    },
];

/// The guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_a_64_bit_x86_elf() {
        for g in GUESTS {
            assert_eq!(&g.elf[..4], b"\x7fELF", "{}", g.name);
            assert_eq!(g.elf[4], 2, "{} is not ELFCLASS64", g.name);
            assert_eq!(u16::from_le_bytes([g.elf[18], g.elf[19]]), 62, "{} is not x86-64", g.name);
        }
    }

    #[test]
    fn names_are_unique_and_found() {
        for g in GUESTS {
            assert_eq!(find(g.name).map(|f| f.name), Some(g.name));
            assert_eq!(GUESTS.iter().filter(|o| o.name == g.name).count(), 1);
        }
        assert!(find("no-such-guest").is_none());
    }
}

#[cfg(test)]
mod abi_tests {
    use super::abi::*;

    #[test]
    fn boot_info_bytes_follow_the_repr_c_layout() {
        let mut bi = BootInfo { magic: BOOT_INFO_MAGIC, free_base: 0x1234, ..Default::default() };
        bi.regions[1] = Region { base: 7, len: 9 };
        let bytes = bi.to_bytes();
        assert_eq!(bytes.len(), std::mem::size_of::<BootInfo>());
        let word = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        assert_eq!(word(std::mem::offset_of!(BootInfo, magic)), BOOT_INFO_MAGIC);
        assert_eq!(word(std::mem::offset_of!(BootInfo, free_base)), 0x1234);
        assert_eq!(word(std::mem::offset_of!(BootInfo, regions) + 16), 7);
        assert_eq!(word(std::mem::offset_of!(BootInfo, regions) + 24), 9);
    }
}
