// The shoal guest ABI, version 1: how a unikernel-style guest is entered and
// how it talks to the VMM. This file is plain constants so that the build
// script can `include!` it and generate the C header (`shoal_abi.h`) the
// guests are compiled against: the two sides cannot drift apart.
//
// Entry: 64-bit long mode, paging on, every guest-physical byte identity
// mapped (2 MiB pages, read/write, executable). `rip` is the ELF entry point,
// `rsp` the top of this vCPU's stack, `rdi` the guest-physical address of
// this vCPU's boot-info block (`BootInfo` in the VMM, `struct
// shoal_boot_info` in C). All vCPUs enter at once; each has its own block.
//
// Hypercalls: `out dx, eax` with dx = HC_PORT and eax = the call number;
// arguments in rdi, rsi, rcx; the result comes back in rax.

/// Port that takes a 32-bit hypercall number.
pub const HC_PORT: u16 = 0x0510;
/// An `outb` of one byte here ends the VM with that byte as shoal's exit
/// status: for guests that cannot make hypercalls (a Linux guest's init
/// writes it through /dev/port).
pub const EXIT_PORT: u16 = 0x0511;
/// Print bytes to the console: rdi = guest-physical address, rsi = length.
/// Returns 0, or u64::MAX when the buffer is outside guest RAM.
pub const HC_PRINT: u32 = 1;
/// End the VM: rdi = exit status (0..=255). Does not return.
pub const HC_EXIT: u32 = 2;
/// Nanoseconds since the VM started (monotonic clock of the host).
pub const HC_CLOCK_NS: u32 = 3;
/// Query one fact: rdi = one of the INFO_* keys. Unknown keys return u64::MAX.
pub const HC_INFO: u32 = 4;

/// Send an inter-processor interrupt to vCPU rdi, wherever it runs.
/// Returns 0, or u64::MAX when there is no such vCPU.
pub const HC_IPI: u32 = 5;
/// Sleep until an IPI arrives for the calling vCPU, or rdi nanoseconds
/// pass (0: no limit). Returns how many IPIs arrived since the last call
/// (they are taken), 0 after a timeout.
pub const HC_WAIT_IPI: u32 = 6;
/// Move the calling vCPU to node rdi; returns 0 there. A node outside the
/// pod ends the VM with an error.
pub const HC_MIGRATE: u32 = 7;

/// HC_INFO key: id of the calling vCPU.
pub const INFO_VCPU_ID: u64 = 0;
/// HC_INFO key: number of vCPUs.
pub const INFO_NUM_VCPUS: u64 = 1;
/// HC_INFO key: id of the node the calling vCPU runs on.
pub const INFO_NODE_ID: u64 = 2;
/// HC_INFO key: number of nodes in the pod.
pub const INFO_NUM_NODES: u64 = 3;
/// HC_INFO key: guest RAM in bytes.
pub const INFO_MEM_BYTES: u64 = 4;

/// `magic` of a boot-info block: "SHOALBI1" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = 0x3149_424c_4141_4f48;
/// Version of the boot-info layout.
pub const BOOT_INFO_VERSION: u64 = 1;
/// Most RAM regions a boot-info block lists.
pub const BOOT_INFO_MAX_REGIONS: u64 = 4;
/// Longest command line, in bytes, without the terminating NUL.
pub const CMDLINE_MAX: u64 = 2048;
/// Guest-physical address the guests are linked at.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

/// One range of guest RAM, as listed in a boot-info block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The boot-info block each vCPU finds at `rdi` on entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// BOOT_INFO_MAGIC.
    pub magic: u64,
    /// BOOT_INFO_VERSION.
    pub version: u64,
    /// Id of the vCPU this block belongs to (0-based).
    pub vcpu_id: u64,
    /// Number of vCPUs in the VM.
    pub num_vcpus: u64,
    /// Node this vCPU runs on.
    pub node_id: u64,
    /// Number of nodes in the pod.
    pub num_nodes: u64,
    /// Guest RAM in bytes (the sum of the regions).
    pub mem_bytes: u64,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_gpa: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: u64,
    /// RAM below this address holds the image and the boot data; RAM from
    /// here on is free for the guest (and dormant until touched).
    pub free_base: u64,
    /// Top of this vCPU's stack (the initial rsp).
    pub stack_top: u64,
    /// Number of valid entries in `regions`.
    pub num_regions: u64,
    /// RAM regions in ascending order.
    pub regions: [Region; BOOT_INFO_MAX_REGIONS as usize],
}

impl BootInfo {
    /// The block as the guest reads it: every field a little-endian u64,
    /// in declaration order (the layout `repr(C)` gives on x86-64).
    pub fn to_bytes(self) -> Vec<u8> {
        let mut words = vec![
            self.magic,
            self.version,
            self.vcpu_id,
            self.num_vcpus,
            self.node_id,
            self.num_nodes,
            self.mem_bytes,
            self.cmdline_gpa,
            self.cmdline_len,
            self.free_base,
            self.stack_top,
            self.num_regions,
        ];
        for r in &self.regions {
            words.push(r.base);
            words.push(r.len);
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}
