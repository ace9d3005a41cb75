//! What a VM is made of, and the parsing and checks of user input that
//! come before anything is created.

use std::path::PathBuf;
use std::time::Duration;

use shoal_guest_images::{abi, Guest};

pub use crate::memory::Backing;

/// Errors in user input; `shoal` exits with status 2 on any of them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("size {0:?}: expected a number with an optional unit K, M, G or T (powers of 1024), like 64M or 1GiB")]
    Size(String),
    #[error("size {0:?} does not fit in 64 bits")]
    SizeOverflow(String),
    #[error("unknown guest {name:?}; the guests are: {known}")]
    UnknownGuest { name: String, known: String },
    #[error("command line: byte {pos} is {byte:#04x}; only printable ASCII words separated by spaces are allowed")]
    CmdlineChar { pos: usize, byte: u8 },
    #[error("command line is {len} bytes; the limit is {max}", max = abi::CMDLINE_MAX)]
    CmdlineTooLong { len: usize },
    #[error("guest {guest}: unknown command-line key {key:?}; it accepts: {known}")]
    CmdlineKey { guest: &'static str, key: String, known: String },
    #[error("guest {guest}: {word:?} is not a key=value word (keys: {known})")]
    CmdlineWord { guest: &'static str, word: String, known: String },
    #[error("guest {guest}: {key}={value:?} must be a decimal or 0x-hexadecimal number")]
    CmdlineValue { guest: &'static str, key: String, value: String },
    #[error("--cpus must be between 1 and {max}, not {n}")]
    Cpus { n: u32, max: u32 },
    #[error("--node-memory {budget} bytes is less than the {needed} bytes the loader alone writes")]
    Budget { budget: u64, needed: u64 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Most vCPUs a VM may have (boot data and stacks must fit below 3 GiB,
/// and every vCPU is a host thread).
pub const MAX_CPUS: u32 = 255;

/// Parses a size: a decimal number with an optional binary unit. `K`, `M`,
/// `G`, `T` (optionally followed by `iB` or `B`) are powers of 1024;
/// a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(Error::Size(s.to_string()));
    }
    let shift = match unit.trim_start().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(Error::Size(s.to_string())),
    };
    let n: u64 = digits.parse().map_err(|_| Error::SizeOverflow(s.to_string()))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| Error::SizeOverflow(s.to_string()))
}

/// Parses `--placement 0,0,1,2`: each vCPU's first node.
pub fn parse_placement(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|w| {
            w.trim().parse::<u32>().map_err(|_| {
                Error::Invalid(format!("--placement {s:?}: {w:?} is not a node number (a list like 0,0,1,2)"))
            })
        })
        .collect()
}

/// Where the vCPUs start: `explicit` checked against the pod, or by
/// default contiguous blocks (vCPU i on node i × nodes / cpus: vCPUs
/// 0..cpus/nodes on node 0, the next block on node 1, ...).
pub fn placement(cpus: u32, nodes: u32, explicit: &[u32]) -> Result<Vec<u32>> {
    if explicit.is_empty() {
        return Ok((0..cpus).map(|i| (u64::from(i) * u64::from(nodes) / u64::from(cpus.max(1))) as u32).collect());
    }
    if explicit.len() != cpus as usize {
        return Err(Error::Invalid(format!(
            "--placement names {} vCPU(s) but --cpus is {cpus}: give one node per vCPU",
            explicit.len()
        )));
    }
    if let Some((vcpu, node)) = explicit.iter().enumerate().find(|(_, &n)| n >= nodes) {
        return Err(Error::Invalid(format!(
            "--placement puts vCPU {vcpu} on node {node}, outside the pod of {nodes} node(s) (0 to {})",
            nodes - 1
        )));
    }
    Ok(explicit.to_vec())
}

/// The largest file shoal reads as a guest image or initramfs.
pub const MAX_INPUT_FILE: u64 = 1 << 30;

/// Reads an input file (a guest image, an initramfs, a secret) of at most
/// `max` bytes: a directory, a device (`/dev/zero` would never end) or a
/// bigger file is an error, not an unbounded read.
pub fn read_input_file(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!("{} bytes, more than shoal reads ({max})", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("it grew past {max} bytes while read")));
    }
    Ok(bytes)
}

/// Finds an embedded guest by name.
pub fn find_guest(name: &str) -> Result<&'static Guest> {
    shoal_guest_images::find(name).ok_or_else(|| Error::UnknownGuest {
        name: name.to_string(),
        known: shoal_guest_images::GUESTS.iter().map(|g| g.name).collect::<Vec<_>>().join(", "),
    })
}

/// Checks a command line: printable ASCII, within the limit, and, for an
/// embedded guest, only the keys it knows with numeric values.
pub fn check_cmdline(cmdline: &str, guest: Option<&Guest>) -> Result<()> {
    if let Some((pos, &byte)) = cmdline.as_bytes().iter().enumerate().find(|(_, b)| !(b' '..=b'~').contains(*b)) {
        return Err(Error::CmdlineChar { pos, byte });
    }
    if cmdline.len() > abi::CMDLINE_MAX as usize {
        return Err(Error::CmdlineTooLong { len: cmdline.len() });
    }
    let Some(g) = guest else { return Ok(()) };
    let known = || {
        if g.params.is_empty() {
            "none".to_string()
        } else {
            g.params.iter().map(|p| p.key).collect::<Vec<_>>().join(", ")
        }
    };
    for word in cmdline.split(' ').filter(|w| !w.is_empty()) {
        let Some((key, value)) = word.split_once('=') else {
            return Err(Error::CmdlineWord { guest: g.name, word: word.to_string(), known: known() });
        };
        if !g.params.iter().any(|p| p.key == key) {
            return Err(Error::CmdlineKey { guest: g.name, key: key.to_string(), known: known() });
        }
        let numeric = match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
            Some(hex) => !hex.is_empty() && u64::from_str_radix(hex, 16).is_ok(),
            None => value.parse::<u64>().is_ok(),
        };
        if !numeric {
            return Err(Error::CmdlineValue { guest: g.name, key: key.to_string(), value: value.to_string() });
        }
    }
    Ok(())
}

/// Where the guest image comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// One of the guests built into shoal.
    Embedded(&'static Guest),
    /// An ELF file.
    File(PathBuf),
}

/// Everything `shoal run` needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub image: ImageSource,
    /// Bytes of guest RAM.
    pub memory: u64,
    pub cpus: u32,
    pub cmdline: String,
    /// Dormant pages on (the default) or off.
    pub dormant: bool,
    /// Most bytes of guest pages this node may hold.
    pub node_memory: Option<u64>,
    /// Pin vCPU i and fault handler i to host CPU i (mod the CPUs we may
    /// use): for benchmarks, where cross-CPU wakeups would dominate.
    pub pin: bool,
    /// End the VM (exit status 124) after this long.
    pub timeout: Option<Duration>,
    /// Fault-handler threads; default one per vCPU.
    pub fault_threads: Option<usize>,
    /// How guest RAM is backed: the page engine's memfd, or the anonymous
    /// baseline for benchmarks.
    pub backing: Backing,
    /// A Linux guest's initramfs.
    pub initrd: Option<PathBuf>,
    /// Hide XSAVE (and AVX) from a Linux guest's CPUID.
    pub no_xsave: bool,
    /// The node each vCPU starts on (empty: contiguous blocks, see
    /// [`placement`]).
    pub placement: Vec<u32>,
    /// Whether the policy may move vCPUs to the nodes that hold their data.
    pub migration: bool,
    /// Pods: every page pulled from a peer is checked against a digest its
    /// owner sent with its (authenticated, with `--frame-auth on`) answer.
    pub verify_pages: bool,
    /// Which page leaves a node first under `--node-memory` (None: the
    /// default for the guest, see [`crate::pod::residency::Eviction::default_for`]).
    pub eviction: Option<crate::pod::residency::Eviction>,
    /// How a bzImage's kernel is entered (`--bzimage-entry`).
    pub bzimage_entry: crate::linux::BzEntry,
    /// virtio-balloon with free page reporting (None: on for a Linux
    /// guest on memfd-backed memory).
    pub balloon: Option<bool>,
    /// A Linux guest's virtio block devices, in order (the first is
    /// `/dev/vda`).
    pub disks: Vec<DiskConfig>,
}

impl VmConfig {
    /// The defaults for an image: 1 vCPU, dormant pages on, no limits.
    pub fn new(image: ImageSource, memory: u64) -> Self {
        VmConfig {
            image,
            memory,
            cpus: 1,
            cmdline: String::new(),
            dormant: true,
            node_memory: None,
            pin: false,
            timeout: None,
            fault_threads: None,
            backing: Backing::Memfd,
            initrd: None,
            no_xsave: false,
            placement: Vec::new(),
            migration: true,
            verify_pages: false,
            eviction: None,
            bzimage_entry: crate::linux::BzEntry::Auto,
            balloon: None,
            disks: Vec::new(),
        }
    }

    /// Checks what can be checked before touching the host.
    pub fn check(&self) -> Result<()> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Cpus { n: self.cpus, max: MAX_CPUS });
        }
        let guest = match &self.image {
            ImageSource::Embedded(g) => Some(*g),
            ImageSource::File(_) => None,
        };
        check_cmdline(&self.cmdline, guest)?;
        if self.disks.len() > MAX_DISKS {
            return Err(Error::Invalid(format!("--disk: at most {MAX_DISKS} disks, not {}", self.disks.len())));
        }
        Ok(())
    }

    /// Checks the disk images: each a regular file this process may open
    /// as asked (read-write unless read-only), a whole number of 512-byte
    /// sectors and not empty. Only the node that holds the devices (node
    /// 0) checks them: on a cluster the files need not exist elsewhere.
    pub fn check_disks(&self) -> Result<()> {
        self.disks.iter().try_for_each(DiskConfig::check)
    }
}

/// Most `--disk`s a VM may have (each takes one virtio-mmio slot and one
/// interrupt line; the rest of the slots stay for other virtio devices).
pub const MAX_DISKS: usize = 6;

/// A disk sector: images are a whole number of them.
pub const SECTOR_SIZE: u64 = 512;

/// One `--disk PATH[,readonly]`: a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest sees a read-only disk (VIRTIO_BLK_F_RO) and its writes
    /// fail; the file is opened read-only.
    pub readonly: bool,
}

impl DiskConfig {
    /// Parses `PATH` or `PATH,readonly`.
    pub fn parse(s: &str) -> Result<Self> {
        let (path, readonly) = match s.rsplit_once(',') {
            Some((path, "readonly")) => (path, true),
            Some((_, opt)) => {
                return Err(Error::Invalid(format!(
                    "--disk {s:?}: unknown option {opt:?} (the form is PATH or PATH,readonly)"
                )))
            }
            None => (s, false),
        };
        if path.is_empty() {
            return Err(Error::Invalid(format!("--disk {s:?}: no path (the form is PATH or PATH,readonly)")));
        }
        Ok(DiskConfig { path: PathBuf::from(path), readonly })
    }

    /// The form [`DiskConfig::parse`] reads (for pod files).
    pub fn to_arg(&self) -> String {
        let path = self.path.display();
        if self.readonly {
            format!("{path},readonly")
        } else {
            path.to_string()
        }
    }

    /// Opens the image as the device will (read-write unless read-only)
    /// and checks it; returns the file and its size in bytes.
    pub fn open(&self) -> Result<(std::fs::File, u64)> {
        let path = self.path.display();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!self.readonly)
            .open(&self.path)
            .map_err(|e| Error::Invalid(format!("--disk {path}: {e}")))?;
        let meta = file.metadata().map_err(|e| Error::Invalid(format!("--disk {path}: {e}")))?;
        if !meta.is_file() {
            return Err(Error::Invalid(format!("--disk {path}: not a regular file (a raw disk image is one)")));
        }
        let len = meta.len();
        if len == 0 {
            return Err(Error::Invalid(format!("--disk {path}: the image is empty")));
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Invalid(format!(
                "--disk {path}: the image is {len} bytes, not a multiple of the {SECTOR_SIZE}-byte sector"
            )));
        }
        Ok((file, len))
    }

    fn check(&self) -> Result<()> {
        self.open().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("16K").unwrap(), 16 << 10);
        for bad in ["", "M", "12Q", "-5M", "1.5G", "0x100", "64 M B"] {
            assert!(matches!(parse_size(bad), Err(Error::Size(_))), "{bad}");
        }
        assert!(matches!(parse_size("99999999999999999999"), Err(Error::SizeOverflow(_))));
        assert!(matches!(parse_size("17000000T"), Err(Error::SizeOverflow(_))));
    }

    #[test]
    fn cmdlines() {
        let memtouch = find_guest("memtouch").unwrap();
        check_cmdline("mib=64 seed=0x1f", Some(memtouch)).unwrap();
        check_cmdline("  mib=64  ", Some(memtouch)).unwrap();
        check_cmdline("", Some(memtouch)).unwrap();
        assert!(matches!(check_cmdline("mb=64", Some(memtouch)), Err(Error::CmdlineKey { .. })));
        assert!(matches!(check_cmdline("mib", Some(memtouch)), Err(Error::CmdlineWord { .. })));
        assert!(matches!(check_cmdline("mib=lots", Some(memtouch)), Err(Error::CmdlineValue { .. })));
        assert!(matches!(check_cmdline("mib=0x", Some(memtouch)), Err(Error::CmdlineValue { .. })));
        assert!(matches!(check_cmdline("mib=1\tseed=2", Some(memtouch)), Err(Error::CmdlineChar { .. })));
        assert!(matches!(check_cmdline(&"a".repeat(5000), None), Err(Error::CmdlineTooLong { .. })));
        // a file image: anything printable goes
        check_cmdline("console=ttyS0 quiet", None).unwrap();
        let hello = find_guest("hello").unwrap();
        let e = check_cmdline("x=1", Some(hello)).unwrap_err();
        assert!(e.to_string().contains("it accepts: none"), "{e}");
    }

    #[test]
    fn placements() {
        assert_eq!(placement(4, 2, &[]).unwrap(), [0, 0, 1, 1]);
        assert_eq!(placement(5, 2, &[]).unwrap(), [0, 0, 0, 1, 1]);
        assert_eq!(placement(1, 3, &[]).unwrap(), [0]);
        assert_eq!(placement(3, 3, &[]).unwrap(), [0, 1, 2]);
        assert_eq!(placement(2, 1, &[]).unwrap(), [0, 0]);
        assert_eq!(placement(3, 3, &[2, 2, 0]).unwrap(), [2, 2, 0]);
        let e = placement(3, 3, &[0, 3, 1]).unwrap_err().to_string();
        assert!(e.contains("vCPU 1 on node 3, outside the pod of 3"), "{e}");
        let e = placement(4, 3, &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("2 vCPU(s) but --cpus is 4"), "{e}");
        assert_eq!(parse_placement("0, 1,2").unwrap(), [0, 1, 2]);
        assert!(parse_placement("0,x").is_err());
        assert!(parse_placement("").is_err());
    }

    #[test]
    fn disks_parse_and_check() {
        assert_eq!(DiskConfig::parse("a.img").unwrap(), DiskConfig { path: "a.img".into(), readonly: false });
        assert_eq!(
            DiskConfig::parse("/x/a,b.img,readonly").unwrap(),
            DiskConfig { path: "/x/a,b.img".into(), readonly: true }
        );
        assert_eq!(DiskConfig::parse("a.img,readonly").unwrap().to_arg(), "a.img,readonly");
        assert!(DiskConfig::parse("a.img,ro").unwrap_err().to_string().contains("unknown option \"ro\""));
        assert!(DiskConfig::parse(",readonly").is_err());
        let dir = std::env::temp_dir().join(format!("shoal-disk-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = |name: &str, len: Option<u64>| {
            let path = dir.join(name);
            if let Some(len) = len {
                std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            }
            DiskConfig { path, readonly: false }
        };
        disk("good.img", Some(4096)).check().unwrap();
        let e = disk("odd.img", Some(1000)).check().unwrap_err().to_string();
        assert!(e.contains("1000 bytes, not a multiple of the 512-byte sector"), "{e}");
        let e = disk("empty.img", Some(0)).check().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = disk("missing.img", None).check().unwrap_err().to_string();
        assert!(e.contains("missing.img") && e.contains("No such file"), "{e}");
        let e = DiskConfig { path: dir.clone(), readonly: true }.check().unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let mut c = VmConfig::new(ImageSource::File("k".into()), 64 << 20);
        c.disks = vec![DiskConfig { path: "x".into(), readonly: false }; MAX_DISKS + 1];
        assert!(c.check().unwrap_err().to_string().contains("at most 6 disks"));
    }

    #[test]
    fn unknown_guest_lists_the_known_ones() {
        let e = find_guest("nope").unwrap_err().to_string();
        assert!(e.contains("memtouch") && e.contains("hello"), "{e}");
    }
}
