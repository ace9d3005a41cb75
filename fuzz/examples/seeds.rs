//! Writes the seed corpus (`fuzz/corpus/<target>/`) from real encodings:
//! frames and messages as shoal sends them, a pod file like README.md's,
//! the embedded guests' ELF headers cut to a few KiB, a bzImage header.
//!
//! `cargo run --example seeds -- corpus` (from `fuzz/`); ci/fuzz.sh
//! runs the targets over what is checked in.

use std::fs;
use std::path::Path;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use shoal_fabric::framing::FrameKeys;
use shoal_fabric::wire::{Frame, Hello, ReadFailure, VerbsEndpoint, HELLO_AUTHENTICATED_FRAMES};
use shoal_fabric::{RegionInfo, PROTOCOL_VERSION};
use shoal_protocol::{Access, Msg};
use shoal_vmm::control::VmEvent;
use shoal_vmm::linux::Format;
use shoal_vmm::loader::{BootPlan, LinuxEntry};
use shoal_vmm::metrics::NodeMetrics;
use shoal_vmm::pod::launch::PodFile;
use shoal_vmm::pod::{Control, Facts, StartPlan};
use shoal_vmm::vcpu::state::VcpuState;
use shoal_vmm::vcpus::VcpuMsg;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("corpus directory");
    fs::write(d.join(name), bytes).expect("corpus file");
}

fn hello(flags: u8) -> Hello {
    Hello { version: PROTOCOL_VERSION, backend: 2, node: 1, pod_id: "demo".into(), nonce: [7; 32], flags }
}

fn frames() -> Vec<(&'static str, Frame)> {
    vec![
        ("hello", Frame::Hello(hello(HELLO_AUTHENTICATED_FRAMES))),
        ("auth", Frame::Auth { mac: [3; 32] }),
        ("refuse", Frame::handshake_refusal("authentication failed: wrong pod secret")),
        ("regions", Frame::Regions(vec![RegionInfo { id: 0, len: 64 << 20 }, RegionInfo { id: 1, len: 4096 }])),
        ("verbs", Frame::Verbs(VerbsEndpoint { qpn: 0x11, psn: 0xabcdef, lid: 0, gid: [1; 16], mtu: 5 })),
        ("ready", Frame::Ready),
        (
            "message",
            Frame::Message(page_message(&Msg::Request {
                page: 17,
                access: Access::Write,
                from: 1,
                since: 1_796_000_000_000_000,
            })),
        ),
        ("read-request", Frame::ReadRequest { tag: 1, region: 0, offset: 8192, len: 4096 }),
        ("read-data", Frame::ReadData { tag: 1, data: vec![0xaa; 64] }),
        ("read-error", Frame::ReadError { tag: 2, failure: ReadFailure::OutOfBounds }),
        ("key-request", Frame::KeyRequest { tag: 3, region: 0, chunk: 12 }),
        ("key-grant", Frame::KeyGrant { tag: 3, region: 0, chunk: 12, addr: 0x7f00_0000_0000, rkey: 0x1234 }),
        ("goodbye", Frame::Goodbye),
    ]
}

/// A page-protocol message as the engine sends it (channel 0).
fn page_message(m: &Msg) -> Vec<u8> {
    let mut out = vec![0];
    shoal_protocol::codec::encode(m, &mut out);
    out
}

fn messages() -> Vec<(&'static str, Msg)> {
    vec![
        ("request", Msg::Request { page: 17, access: Access::Write, from: 1, since: 1_796_000_000_000_000 }),
        ("grant", Msg::Grant { answers: 513, pages: vec![(512, 1), (513, 1), (514, 2)] }),
        (
            "evicted",
            Msg::Evicted {
                page: 70,
                from: 1,
                to: 2,
                dormant: false,
                epoch: 3,
                digest: 0x5eed,
                key: (1 << 32) | 0x1234,
            },
        ),
        ("grant-done", Msg::GrantDone { pages: vec![512, 513], from: 2 }),
        ("share", Msg::Share { page: 9, to: 2, since: 1_796_000_000_000_000 }),
        ("transfer", Msg::Transfer { page: 9, to: 1, evict: true, epoch: 4, since: 0 }),
        ("upgrade", Msg::Upgrade { page: 9 }),
        (
            "ready",
            Msg::Ready {
                page: 9,
                from: 0,
                dormant: false,
                transfer: true,
                evict: false,
                epoch: 3,
                digest: 0x5eed,
                key: (1 << 32) | 0x1234,
            },
        ),
        ("fetched", Msg::Fetched { page: 9, from: 1, key: (1 << 32) | 0x5678 }),
        ("done", Msg::Done { page: 9, from: 1, key: (1 << 32) | 0x5678 }),
        ("inval", Msg::Inval { page: 9, since: 1_796_000_000_000_000 }),
        ("inval-ack", Msg::InvalAck { page: 9, from: 2 }),
        ("evict", Msg::Evict { page: 9, from: 1, to: 2, epoch: 5 }),
        ("redormant", Msg::Redormant { page: 9, from: 1, epoch: 5 }),
        ("refused", Msg::Refused { page: 9 }),
        ("dormanted", Msg::Dormanted { page: 9 }),
        ("free", Msg::Free { page: 9, from: 2 }),
        ("forget", Msg::Forget { page: 9 }),
        ("freed", Msg::Freed { page: 9 }),
        ("unshare", Msg::Unshare { page: 9, from: 2 }),
        ("unshared", Msg::Unshared { page: 9 }),
    ]
}

fn vcpu_state() -> VcpuState {
    VcpuState {
        id: 1,
        cpuid: vec![
            kvm_cpuid_entry2 { function: 0, eax: 0xd, ebx: 0x756e_6547, ..Default::default() },
            kvm_cpuid_entry2 { function: 1, eax: 0x806f8, ecx: 0x8000_0000, ..Default::default() },
        ],
        mp_state: kvm_mp_state::default(),
        regs: kvm_regs { rip: 0x10_0123, rsp: 0x20_0000, rax: 42, rflags: 2, ..Default::default() },
        sregs: kvm_sregs { cr0: 0x8000_0011, cr4: 0x20, efer: 0x500, ..Default::default() },
        xsave: kvm_xsave::default(),
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs::default(),
        lapic: None,
        msrs: vec![kvm_msr_entry { index: 0xc000_0080, data: 0x500, ..Default::default() }],
        events: kvm_vcpu_events::default(),
        pending_ipis: 2,
        clock_floor_ns: 123_456_789,
    }
}

fn controls() -> Vec<(&'static str, Control)> {
    let facts = Facts {
        shoal_version: "0.1.0".into(),
        nodes: 3,
        memory: 64 << 20,
        image_name: "memtouch".into(),
        image_sha256: "ab".repeat(32),
        dormant: true,
        node_memory: Some(8 << 20),
        cpus: 2,
        placement: vec![0, 1],
        migration: true,
        eviction: shoal_vmm::pod::residency::Eviction::Clock,
        verify_pages: true,
    };
    let plan = StartPlan {
        loaded: vec![(0x10_0000, 0x3000), (0x1000, 0x1000)],
        boot: BootPlan {
            entry: 0x10_0000,
            pml4: 0x9000,
            gdt: 0x500,
            vcpus: vec![(0x8000, 0x20_0000), (0x8100, 0x21_0000)],
            free_base: 0x40_0000,
            linux: None,
        },
        clock_ns: 1_000_000,
        wall_ns: 1_733_400_000_000_000_000,
    };
    let mut linux = plan.clone();
    linux.boot.linux = Some(LinuxEntry {
        entry: shoal_vmm::linux::Entry::Pvh { rip: 0x100_0000, start_info: 0x6000 },
        stack: 0x8ff0,
        no_xsave: false,
    });
    let metrics = NodeMetrics { faults: 33, pages_zero_filled: 16632, wall_seconds: 9.6, ..Default::default() };
    vec![
        ("hello", Control::Hello { facts }),
        ("mismatch", Control::Mismatch { reason: "node 2 does not match this pod: 2 nodes against 3".into() }),
        ("start", Control::Start { plan }),
        ("start-linux", Control::Start { plan: linux }),
        ("started", Control::Started),
        ("run", Control::Run),
        ("finish", Control::Finish),
        ("metrics", Control::Metrics { metrics: Box::new(metrics) }),
        ("abort", Control::Abort { reason: "node 1 left the pod".into() }),
        ("beat", Control::Beat),
    ]
}

/// A tiny x86-64 ELF executable: one PT_LOAD of `code` at `base`, and
/// optionally a PT_NOTE with a "Linux" note and a "Xen" PVH entry note.
fn tiny_elf(code: &[u8], base: u64, notes: bool) -> Vec<u8> {
    let mut note = Vec::new();
    if notes {
        for (owner, kind, desc) in
            [(&b"Linux\0"[..], 6u32, &[0u8; 4][..]), (&b"Xen\0"[..], 18, &0x100_0000u32.to_le_bytes()[..])]
        {
            note.extend_from_slice(&(owner.len() as u32).to_le_bytes());
            note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            note.extend_from_slice(&kind.to_le_bytes());
            note.extend_from_slice(owner);
            note.resize(note.len().next_multiple_of(4), 0);
            note.extend_from_slice(desc);
            note.resize(note.len().next_multiple_of(4), 0);
        }
    }
    let phnum: u16 = if notes { 2 } else { 1 };
    let code_off = 64 + 56 * u64::from(phnum);
    let note_off = code_off + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&base.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, phnum, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |e: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        e.extend_from_slice(&kind.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            e.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut e, 1, 5, code_off, base, code.len() as u64, 0x1000); // PT_LOAD, R+X
    if notes {
        phdr(&mut e, 4, 4, note_off, 0, note.len() as u64, 4); // PT_NOTE
    }
    e.extend_from_slice(code);
    e.extend_from_slice(&note);
    e
}

/// The first bytes of a bzImage: the Linux boot protocol's header (as in
/// vmm/tests/errors.rs).
fn bzimage_header(version: u16, loadflags: u8) -> Vec<u8> {
    let mut k = vec![0u8; 1024];
    k[0x1f1] = 1; // setup_sects
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    k[0x211] = loadflags;
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    k
}

const POD_FILE: &str = r#"pod_id = "demo"
fabric = "tcp"
port = 7470
addresses = ["n1:7470", "n2:7470"]
secret_file = "/shared/pod.secret"
memory = "64G"
node_memory = "16G"
guest = "zeroboot"
cmdline = "mib=1024"
cpus = 2
placement = [0, 1]
migration = true
dormant = true
metrics_json = "/shared/metrics.json"
nodes = 2
socket_dir = "/tmp"
timeout = 600.0
join_timeout = 30.0
liveness_timeout = 1.5
frame_auth = false
"#;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);

    for (name, f) in frames() {
        let bytes = f.encode();
        write(dir, "fabric_frame", &format!("{name}.frame"), &bytes);
        write(dir, "fabric_frame", &format!("{name}.body"), &bytes[4..]);
    }

    // mode byte (see the target), then what the peer sends
    let mut dialer = vec![0x21];
    dialer.extend(Frame::Hello(hello(0)).encode());
    dialer.extend(Frame::Auth { mac: [3; 32] }.encode());
    write(dir, "fabric_handshake", "dialer-hello-auth", &dialer);
    let mut acceptor = vec![0x44];
    acceptor.extend(Frame::Hello(hello(HELLO_AUTHENTICATED_FRAMES)).encode());
    acceptor.extend(Frame::Auth { mac: [3; 32] }.encode());
    write(dir, "fabric_handshake", "acceptor-hello-auth", &acceptor);
    let mut refused = vec![0x21];
    refused.extend(Frame::handshake_refusal("wrong pod id").encode());
    write(dir, "fabric_handshake", "refuse", &refused);
    let mut old = vec![0x21];
    old.extend(Frame::Hello(Hello { version: 1, ..hello(0) }).encode());
    write(dir, "fabric_handshake", "old-version", &old);

    // a connection's stream: several frames, untagged and tagged
    let mut stream = Vec::new();
    for name in ["regions", "ready", "message", "read-request", "read-data", "goodbye"] {
        stream.extend(frames().into_iter().find(|(n, _)| *n == name).expect("a sample frame").1.encode());
    }
    write(dir, "fabric_framing", "stream", &stream);
    let (mut sealer, _) = FrameKeys::derive(b"pod secret", "fuzz", 1, 0, &[1; 32], &[2; 32]).split(true);
    write(dir, "fabric_framing", "sealed-message", &sealer.seal(&frames()[6].1));
    write(dir, "fabric_framing", "read-data", &frames()[8].1.encode());

    for (name, m) in messages() {
        let mut bytes = Vec::new();
        shoal_protocol::codec::encode(&m, &mut bytes);
        write(dir, "protocol_codec", name, &bytes);
    }

    for (name, c) in controls() {
        write(dir, "pod_control", name, &serde_json::to_vec(&c).expect("a control message encodes"));
    }

    let state = vcpu_state().encode();
    write(dir, "vcpu_state", "state", &state);
    let vcpu_msgs = [
        ("coming", VcpuMsg::Coming { vcpu: 1, stack_page: 0x1ff }),
        ("migrate", VcpuMsg::Migrate { vcpu: 1, moves: 3, state }),
        ("location", VcpuMsg::Location { vcpu: 1, node: 2, moves: 3 }),
        ("ipi", VcpuMsg::Ipi { vcpu: 0 }),
        ("print", VcpuMsg::Print { bytes: b"memtouch: verified 16384 pages\n".to_vec() }),
        ("event-exit", VcpuMsg::Event { event: VmEvent::Exit { vcpu: 0, status: 0 } }),
        ("event-failed", VcpuMsg::Event { event: VmEvent::Failed("a triple fault".into()) }),
    ];
    for (name, m) in vcpu_msgs {
        write(dir, "vcpu_msg", name, &m.encode()[1..]);
    }

    // arbitrary's view of the input: a few runs of structured bytes
    write(dir, "roster", "three-nodes", &[1, 2, 2, 0, 1, 2, 0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
    write(dir, "roster", "ops", &(0u8..=255).collect::<Vec<u8>>());

    write(dir, "pod_file", "readme", POD_FILE.as_bytes());
    write(dir, "pod_file", "minimal", b"pod_id = \"p\"\nmemory = \"64M\"\n");
    let written = PodFile {
        pod_id: "a1b2c3".into(),
        nodes: Some(3),
        fabric: Some("shm".into()),
        socket_dir: Some("/tmp/shoal-pod".into()),
        memory: "67108864".into(),
        guest: Some("smp".into()),
        cmdline: Some("iters=2000".into()),
        cpus: Some(3),
        placement: Some(vec![0, 1, 2]),
        timeout: Some(1e9),
        ..Default::default()
    };
    write(dir, "pod_file", "written", toml::to_string(&written).expect("a pod file serialises").as_bytes());

    // every embedded guest, cut to its first 4 KiB (the headers), and a
    // whole tiny one that parses
    for g in shoal_guest_images::GUESTS {
        write(dir, "guest_elf", g.name, &g.elf[..g.elf.len().min(4096)]);
    }
    // mov edi, 42; mov eax, HC_EXIT; mov edx, HC_PORT; out dx, eax; hlt
    let code = [0xbf, 42, 0, 0, 0, 0xb8, 2, 0, 0, 0, 0xba, 0x10, 0x05, 0, 0, 0xef, 0xf4];
    write(dir, "guest_elf", "tiny", &tiny_elf(&code, 0x10_0000, false));

    let tiny = tiny_elf(&code, 0x10_0000, false);
    assert!(shoal_vmm::loader::Image::parse("tiny", &tiny).is_ok(), "the tiny guest is an image shoal runs");
    let pvh = tiny_elf(&code, 0x100_0000, true);
    assert!(matches!(Format::of(&pvh), Ok(Some(Format::Pvh))), "the tiny vmlinux has a PVH entry");
    assert!(matches!(Format::of(&bzimage_header(0x020f, 1)), Ok(Some(Format::BzImage))));

    write(dir, "linux_format", "bzimage", &bzimage_header(0x020f, 1));
    write(dir, "linux_format", "bzimage-old", &bzimage_header(0x0100, 1));
    write(dir, "linux_format", "vmlinux-pvh", &pvh);
    write(
        dir,
        "linux_format",
        "hello",
        &shoal_guest_images::GUESTS[0].elf[..4096.min(shoal_guest_images::GUESTS[0].elf.len())],
    );
}
