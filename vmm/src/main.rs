//! `shoal`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use shoal_fabric::{Addr, Kind};
use shoal_vmm::config::{self, ImageSource, VmConfig};
use shoal_vmm::linux::BzEntry;
use shoal_vmm::memory;
use shoal_vmm::pod::residency::Eviction;
use shoal_vmm::pod::{self, launch, launch::PodFile};
use shoal_vmm::vm::{self, End};

/// Writes one line to stderr in one `write(2)`. `eprintln!` writes each
/// piece of its format separately (stderr is unbuffered), and the nodes of
/// a local pod share their launcher's stderr: a node's line and node 0's
/// interleaved mid-line in CI ("shoal node shoal: error: the VM failed: 1:
/// ..."), and a test reading node 0's failure line found none. A pipe
/// write of at most PIPE_BUF (4096) bytes is never split.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = write_line(&mut std::io::stderr().lock(), format_args!($($arg)*));
    }};
}

/// `args` and a newline, formatted first and handed to `out` in one write.
fn write_line(out: &mut impl std::io::Write, args: std::fmt::Arguments) -> std::io::Result<()> {
    let mut line = args.to_string();
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// Exit status for bad input (usage, sizes, images, command lines).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when this host cannot run the VM (no /dev/kvm, ...).
const EXIT_HOST: u8 = 1;
/// Exit status when the VM failed while running.
const EXIT_VM_FAILED: u8 = 70;
/// Exit status when --timeout expired.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status after SIGINT/SIGTERM.
const EXIT_INTERRUPTED: u8 = 130;
/// Most node processes `shoal run --nodes` starts on this host.
const MAX_LOCAL_NODES: u32 = 64;
/// Most fault-handler threads.
const MAX_FAULT_THREADS: usize = 256;

#[derive(Parser, Debug)]
#[command(name = "shoal", version, about = "A distributed, unikernel-style hypervisor", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it to its end; shoal exits with the guest's status.
    #[command(after_help = "Exit status: the guest's (0-255) when it exits; 2 bad input; 1 the host \
                            cannot run the VM; 70 the VM failed; 124 --timeout; 130 interrupted.")]
    Run(Box<RunArgs>),
    /// Run one node of a pod described by a pod file (on every host of a
    /// cluster, or under Slurm's srun / an MPI launcher). Node 0 runs the
    /// guest and exits with its status; the others serve memory.
    #[command(after_help = "Rank and size come from --rank and the pod file, or from the launcher \
                            (SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_NODELIST, OMPI_COMM_WORLD_RANK/SIZE). \
                            The pod secret comes from the file's secret_file or $SHOAL_POD_SECRET (hex). \
                            Exit status: node 0 as for `run`; other nodes 0 when the pod finished, 1 when \
                            it failed, 2 on bad input.")]
    Node(NodeArgs),
    /// List the guests built into shoal, or write them out as ELF files.
    Guests {
        /// Write every guest to DIR/NAME.elf.
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// The pod file (TOML; see README.md).
    #[arg(long, value_name = "FILE")]
    pod: PathBuf,
    /// This node's rank (default: from the launcher's environment).
    #[arg(long, value_name = "N")]
    rank: Option<u32>,
    /// Bind here instead of the pod file's address (unix:PATH or
    /// tcp:IP:PORT); used by `shoal run --nodes`.
    #[arg(long, value_name = "ADDR", hide = true)]
    listen: Option<String>,
    /// Learn the peers' addresses over stdin/stdout (`shoal run --nodes`).
    #[arg(long, value_name = "HOW", hide = true)]
    rendezvous: Option<String>,
}

#[derive(Args, Debug)]
#[group(id = "image", required = true, multiple = false)]
struct ImageArgs {
    /// A guest built into shoal (see `shoal guests`).
    #[arg(long, value_name = "NAME", group = "image")]
    guest: Option<String>,
    /// A 64-bit x86-64 ELF guest image file (the shoal guest ABI).
    #[arg(long, value_name = "PATH", group = "image")]
    kernel: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackingArg {
    /// A sparse memfd under shoal's page engine (dormant pages).
    Memfd,
    /// Plain anonymous memory, no userfaultfd: the kernel serves first touches.
    /// The benchmarks' baseline; the page counters stay 0.
    Anonymous,
}

#[derive(Args, Debug)]
// `--join-timeout -1` is a bad value (said so), not an unknown flag
#[command(allow_negative_numbers = true)]
struct RunArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Guest RAM, e.g. 64M, 4G (binary units; a bare number is bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// The guest's command line, e.g. "mib=64 seed=7"; for Linux, the
    /// kernel's ("console=ttyS0 panic=-1 -- /bin/memfill 64").
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,
    /// A Linux guest's initramfs (with --kernel naming a bzImage).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// How a bzImage is entered: pvh decompresses the vmlinux inside here
    /// (xz or gzip) and enters it through its PVH entry, so the guest's
    /// own decompressor never writes the image and its scratch; boot64 runs
    /// that decompressor in the guest (the 64-bit boot protocol); auto is
    /// pvh where the bzImage allows it, else boot64.
    #[arg(long, value_name = "auto|pvh|boot64", default_value = "auto", hide_possible_values = true)]
    bzimage_entry: BzEntry,
    /// A raw disk image for a Linux guest, as a virtio block device:
    /// PATH or PATH,readonly; repeatable (the first is /dev/vda).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<String>,
    /// virtio-balloon with free page reporting: memory a Linux guest
    /// frees becomes dormant again, its host memory freed (default: on
    /// for a Linux guest).
    #[arg(long, value_name = "on|off")]
    balloon: Option<OnOff>,
    /// Show XSAVE and AVX in a Linux guest's CPUID (off where the host's
    /// KVM cannot keep their state consistent, e.g. nested under TCG).
    #[arg(long, value_name = "on|off", default_value = "on")]
    xsave: OnOff,
    /// Dormant pages: off treats every page as having contents, to measure
    /// what dormant pages save.
    #[arg(long, value_name = "on|off", default_value = "on")]
    dormant: OnOff,
    /// Most guest memory each node may hold. On one node a fault beyond
    /// it ends the VM; in a pod, cold pages move to nodes with room.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    node_memory: Option<u64>,
    /// Which page leaves a node first under --node-memory: clock (pages
    /// the guest keeps touching stay) or fifo (the oldest arrival).
    #[arg(long, value_name = "clock|fifo")]
    eviction: Option<Eviction>,
    /// Run the guest on a pod of N node processes on this host: every
    /// node holds memory and runs the vCPUs placed on it; node 0 keeps the
    /// console.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nodes: u32,
    /// Each vCPU's first node, e.g. 0,0,1,2 (default: contiguous blocks,
    /// vCPUs 0..cpus/nodes on node 0, the next block on node 1, ...).
    #[arg(long, value_name = "LIST")]
    placement: Option<String>,
    /// Whether vCPUs may move to the node that holds their data (the
    /// guest's own migration hypercall works either way).
    #[arg(long, value_name = "on|off", default_value = "on")]
    migration: OnOff,
    /// Check every page pulled from a peer against a digest (HMAC-SHA256
    /// under a key from the pod secret) that its owner sends with its
    /// answer: catches pages altered or corrupted on the way, the
    /// one-sided reads of verbs included, which carry no tag themselves.
    #[arg(long, value_name = "on|off", default_value = "off")]
    verify_pages: OnOff,
    /// How the pod's nodes reach each other's memory: shm, tcp, verbs or
    /// auto (verbs when an RDMA device is present, else shm).
    #[arg(long, value_name = "KIND", default_value = "auto")]
    fabric: String,
    /// Seconds the pod's nodes may take to join.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    join_timeout: f64,
    /// Authenticate every fabric frame after the handshake (HMAC-SHA256
    /// with per-connection keys): off by default, it halves tcp's batched
    /// read throughput (bench/results/fabric.md).
    #[arg(long, value_name = "on|off", default_value = "off")]
    frame_auth: OnOff,
    /// Seconds a pod's node may stay silent (every node beats every
    /// 250 ms) before the pod counts it as hung and ends.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.5)]
    liveness_timeout: f64,
    /// Write the metrics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    metrics_json: Option<PathBuf>,
    /// Pin vCPU i and fault handler i together on host CPU i (benchmarks).
    #[arg(long)]
    pin: bool,
    /// End the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Fault-handler threads (default: one per vCPU).
    #[arg(long, value_name = "N")]
    fault_threads: Option<usize>,
    /// How guest RAM is backed.
    #[arg(long, value_name = "KIND", default_value = "memfd")]
    memory_backing: BackingArg,
}

fn parse_size(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    // a panic is a bug of ours, in whichever thread: the VM must not go on
    // without that thread (a vCPU or fault handler gone would leave the
    // guest, or a peer, waiting for good), so after Rust's message the
    // process ends with the status of a VM that failed while running
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(70);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // colour codes only for a person at a terminal, not in logs
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // help and version go to stdout as clap prints them
        Err(e) if !e.use_stderr() => e.exit(),
        // a usage error is one line, like every other bad input (clap's
        // own adds the usage and a hint on lines of their own)
        Err(e) => {
            // its first paragraph (the error, and what it lists), joined
            let text = e.render().to_string();
            let said: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            return bad_input(format!("{} (shoal --help)", said.join(" ").trim_start_matches("error: ")));
        }
    };
    match cli.command {
        Command::Guests { export } => guests(export),
        Command::Run(args) => run(*args),
        Command::Node(args) => node(args),
    }
}

fn bad_input(msg: impl std::fmt::Display) -> ExitCode {
    say!("shoal: error: {msg}");
    ExitCode::from(EXIT_BAD_INPUT)
}

fn guests(export: Option<PathBuf>) -> ExitCode {
    let Some(dir) = export else {
        for g in shoal_guest_images::GUESTS {
            let params: Vec<String> =
                g.params.iter().map(|p| format!("{}=N ({}, default {})", p.key, p.help, p.default)).collect();
            println!("{:<10} {}", g.name, g.summary);
            if !params.is_empty() {
                println!("{:<10} cmdline: {}", "", params.join("; "));
            }
        }
        return ExitCode::SUCCESS;
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return bad_input(format_args!("--export {}: {e}", dir.display()));
    }
    for g in shoal_guest_images::GUESTS {
        let path = dir.join(format!("{}.elf", g.name));
        if let Err(e) = std::fs::write(&path, g.elf) {
            return bad_input(format_args!("writing {}: {e}", path.display()));
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let image = match (&args.image.guest, &args.image.kernel) {
        (Some(name), _) => match config::find_guest(name) {
            Ok(g) => ImageSource::Embedded(g),
            Err(e) => return bad_input(e),
        },
        (None, Some(path)) => ImageSource::File(path.clone()),
        (None, None) => unreachable!("clap requires --guest or --kernel"),
    };
    let timeout = match args.timeout {
        None => None,
        // (try_: a number of seconds beyond what a Duration holds is an
        // error, not a panic)
        Some(t) if t.is_finite() && t > 0.0 && Duration::try_from_secs_f64(t).is_ok() => {
            Some(Duration::from_secs_f64(t))
        }
        Some(t) => return bad_input(format_args!("--timeout must be a positive number of seconds, not {t}")),
    };
    let mut config = VmConfig::new(image, args.memory);
    config.cpus = args.cpus;
    config.cmdline = args.cmdline;
    config.dormant = args.dormant == OnOff::On;
    config.node_memory = args.node_memory;
    config.pin = args.pin;
    config.timeout = timeout;
    config.fault_threads = args.fault_threads;
    config.initrd = args.initrd.clone();
    config.no_xsave = args.xsave == OnOff::Off;
    config.migration = args.migration == OnOff::On;
    config.verify_pages = args.verify_pages == OnOff::On;
    config.eviction = args.eviction;
    config.bzimage_entry = args.bzimage_entry;
    config.balloon = args.balloon.map(|b| b == OnOff::On);
    for d in &args.disks {
        match config::DiskConfig::parse(d) {
            Ok(d) => config.disks.push(d),
            Err(e) => return bad_input(e),
        }
    }
    if let Some(p) = &args.placement {
        match config::parse_placement(p) {
            Ok(p) => config.placement = p,
            Err(e) => return bad_input(e),
        }
    }
    config.backing = match args.memory_backing {
        BackingArg::Memfd => config::Backing::Memfd,
        BackingArg::Anonymous => config::Backing::Anonymous,
    };
    if config.fault_threads.is_some_and(|n| n == 0 || n > MAX_FAULT_THREADS) {
        return bad_input(format_args!("--fault-threads must be between 1 and {MAX_FAULT_THREADS}"));
    }

    if args.nodes == 0 || args.nodes > MAX_LOCAL_NODES {
        return bad_input(format_args!(
            "--nodes must be between 1 and {MAX_LOCAL_NODES} (a pod on this host; a bigger one runs `shoal node` \
             on each host)"
        ));
    }
    // everything that can be checked before a node starts
    if let Err(e) = config.check().and_then(|()| config.check_disks()) {
        return bad_input(e);
    }
    // the pod's options are checked on one node too: a bad value is a
    // mistake whether or not it is used
    let kind = match parse_fabric(&args.fabric, true) {
        Ok(k) => k,
        Err(e) => return bad_input(e),
    };
    let join_timeout = match positive_seconds("--join-timeout", args.join_timeout) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    let liveness = match liveness_seconds("--liveness-timeout", args.liveness_timeout) {
        Ok(t) => t,
        Err(e) => return bad_input(e),
    };
    if args.nodes > 1 {
        let file = PodFile {
            pod_id: format!("run-{}-{:08x}", std::process::id(), rand_u32()),
            nodes: Some(args.nodes),
            fabric: Some(kind.name().to_string()),
            memory: args.memory.to_string(),
            node_memory: args.node_memory.map(|m| m.to_string()),
            guest: args.image.guest.clone(),
            kernel: args.image.kernel.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            initrd: args.initrd.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            xsave: Some(args.xsave == OnOff::On),
            disks: (!config.disks.is_empty()).then(|| {
                config
                    .disks
                    .iter()
                    .map(|d| {
                        let path = std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone());
                        config::DiskConfig { path, readonly: d.readonly }.to_arg()
                    })
                    .collect()
            }),
            cmdline: Some(config.cmdline.clone()),
            cpus: Some(config.cpus),
            placement: (!config.placement.is_empty()).then(|| config.placement.clone()),
            migration: Some(config.migration),
            verify_pages: Some(config.verify_pages),
            eviction: config.eviction,
            bzimage_entry: Some(config.bzimage_entry),
            balloon: config.balloon,
            dormant: Some(config.dormant),
            join_timeout: Some(args.join_timeout),
            liveness_timeout: Some(args.liveness_timeout),
            frame_auth: Some(args.frame_auth == OnOff::On),
            ..Default::default()
        };
        // all input checked before any node starts: bad input ends the
        // pod alone, with one line and exit status 2
        match vm::preflight(&config, args.nodes) {
            Ok(()) => {}
            Err(e) if e.is_bad_input() => return bad_input(e),
            Err(e) => {
                say!("shoal: error: {e}");
                return ExitCode::from(EXIT_HOST);
            }
        }
        return run_local_pod(&config, &file, kind, join_timeout, liveness, args.metrics_json.as_deref());
    }
    if let Err(e) = config::placement(config.cpus, 1, &config.placement) {
        return bad_input(e);
    }
    execute(&config, None, args.metrics_json.as_deref())
}

fn rand_u32() -> u32 {
    let s = launch::random_secret();
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

/// A silence limit: more than one beat (0.25 s), at most an hour.
fn liveness_seconds(flag: &str, t: f64) -> Result<Duration, String> {
    if t.is_finite() && (0.5..=3600.0).contains(&t) {
        Ok(Duration::from_secs_f64(t))
    } else {
        Err(format!("{flag} must be between 0.5 and 3600 seconds (nodes beat every 0.25 s), not {t}"))
    }
}

fn positive_seconds(flag: &str, t: f64) -> Result<Duration, String> {
    // at most a day: a join or a watchdog longer than that is a mistake,
    // and a bounded value cannot overflow where it is doubled or added
    if t.is_finite() && t > 0.0 && t <= 86_400.0 {
        Ok(Duration::from_secs_f64(t))
    } else {
        Err(format!("{flag} must be a positive number of seconds, at most 86400, not {t}"))
    }
}

fn parse_fabric(s: &str, all_on_this_host: bool) -> Result<Kind, String> {
    if s == "auto" {
        return Ok(Kind::auto(all_on_this_host));
    }
    s.parse::<Kind>().map_err(|e| format!("--fabric: {e}"))
}

/// `shoal run --nodes N`: node 0 here, nodes 1..N as child processes.
fn run_local_pod(
    config: &VmConfig,
    file: &PodFile,
    kind: Kind,
    join_timeout: Duration,
    liveness: Duration,
    metrics: Option<&std::path::Path>,
) -> ExitCode {
    let host = |e: String| {
        say!("shoal: error: {e}");
        ExitCode::from(EXIT_HOST)
    };
    let facts = match pod::facts_for(config, file.nodes.unwrap_or(1)).and_then(|f| {
        pod::check_fabric(&f, kind)?;
        Ok(f)
    }) {
        Ok(f) => f,
        Err(e) => return bad_input(e),
    };
    let secret = launch::random_secret();
    let dir = std::env::temp_dir().join(format!("shoal-pod-{}", file.pod_id));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return host(format!("{}: {e}", dir.display()));
    }
    // gone however this function returns, an early error included
    let _dir = RemoveDir(dir.clone());
    let listen = |i: u32| match kind {
        Kind::Shm => Addr::Unix(dir.join(format!("node-{i}.sock"))),
        _ => Addr::Tcp("127.0.0.1:0".parse().expect("an address")),
    };
    let mem = match memory::Layout::new(config.memory).and_then(memory::GuestMemory::new) {
        Ok(m) => Arc::new(m),
        Err(e) => return bad_input(e),
    };
    let region = match launch::memory_region(&mem) {
        Ok(r) => r,
        Err(e) => return host(e.to_string()),
    };
    let binding = match shoal_fabric::bind(kind, &listen(0)) {
        Ok(b) => b,
        Err(e) => return host(e.to_string()),
    };
    let (mut children, addrs) =
        match launch::LocalNodes::spawn(file, &secret, binding.local_addr(), listen, join_timeout) {
            Ok(c) => c,
            Err(e) => return host(e),
        };
    tracing::debug!(pids = ?children.pids(), "pod nodes started");
    if let Err(e) = children.send_peers(&addrs) {
        return host(e);
    }
    let peers: Vec<(u32, Addr)> = addrs.iter().cloned().enumerate().skip(1).map(|(i, a)| (i as u32, a)).collect();
    let digests = facts.verify_pages.then(|| pod::digest::PageDigests::for_pod(&secret, &file.pod_id));
    let id = shoal_fabric::Identity { node: 0, pod_id: file.pod_id.clone(), secret };
    let opts = launch::fabric_options(join_timeout, liveness, file.frame_auth.unwrap_or(false));
    let transport = match binding.join(id, &peers, vec![region], opts) {
        Ok(t) => t,
        Err(e) => return host(format!("joining the pod: {e}")),
    };
    let link = pod::Link { transport: Arc::from(transport), facts, join_timeout, liveness, mem, digests };
    let code = execute(config, Some(&link), metrics);
    // after a failure a node may hang (that may be why): do not wait long
    // (healthy nodes exit within milliseconds of node 0's Abort; one that
    // hangs never will: kill it soon, so the pod ends within its bound)
    let grace = if code == ExitCode::SUCCESS { Duration::from_secs(10) } else { Duration::from_millis(500) };
    for (node, how) in children.wait(grace) {
        say!("shoal: node {node} ended badly: {how}");
    }
    code
}

/// A directory removed (with what it holds) when this is dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `shoal node --pod FILE`.
fn node(args: NodeArgs) -> ExitCode {
    let file = match PodFile::read(&args.pod) {
        Ok(f) => f,
        Err(e) => return bad_input(e),
    };
    let env = |k: &str| std::env::var(k).ok();
    let prepared = (|| -> Result<_, String> {
        let config = config_from_file(&file)?;
        let kind = parse_fabric(file.fabric.as_deref().unwrap_or("auto"), false)?;
        let placement = match (args.rendezvous.as_deref(), &args.listen, args.rank, file.nodes) {
            (None, None, ..) => launch::place(&file, kind, args.rank, &env)?,
            (Some("stdio"), Some(l), Some(rank), Some(nodes)) => {
                launch::Placement { rank, nodes, addresses: None, listen: parse_listen(l)? }
            }
            _ => return Err("--rendezvous stdio needs --listen, --rank and nodes in the pod file".into()),
        };
        let secret = launch::read_secret(&file, &env)?;
        let join_timeout = positive_seconds("join_timeout", file.join_timeout.unwrap_or(30.0))?;
        let liveness = liveness_seconds("liveness_timeout", file.liveness_timeout.unwrap_or(1.5))?;
        let facts = pod::facts_for(&config, placement.nodes)?;
        pod::check_fabric(&facts, kind)?;
        // the same checks node 0 makes before it starts anything: bad input
        // ends this node at once, not after the join
        vm::preflight(&config, placement.nodes).map_err(|e| e.to_string())?;
        Ok((config, kind, placement, secret, (join_timeout, liveness), facts))
    })();
    let (config, kind, placement, secret, (join_timeout, liveness), facts) = match prepared {
        Ok(p) => p,
        Err(e) => return bad_input(e),
    };
    let me = placement.rank;
    let fail = |code: u8, e: String| {
        say!("shoal node {me}: error: {e}");
        ExitCode::from(code)
    };
    let mem = match memory::Layout::new(config.memory).and_then(memory::GuestMemory::new) {
        Ok(m) => Arc::new(m),
        Err(e) => return bad_input(e),
    };
    let region = match launch::memory_region(&mem) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_HOST, e.to_string()),
    };
    let opts = launch::fabric_options(join_timeout, liveness, file.frame_auth.unwrap_or(false));
    let digests = facts.verify_pages.then(|| pod::digest::PageDigests::for_pod(&secret, &file.pod_id));
    let transport: Arc<dyn shoal_fabric::Transport> =
        match launch::join(kind, &placement, &file.pod_id, secret, region, opts) {
            Ok(t) => Arc::from(t),
            // a wrong pod secret (ours or a peer's), another version or pod:
            // the configuration is at fault
            Err(e) if e.misconfigured => return fail(EXIT_BAD_INPUT, format!("joining the pod: {}", e.text)),
            Err(e) => return fail(EXIT_HOST, format!("joining the pod: {}", e.text)),
        };
    if me == 0 {
        let link = pod::Link { transport, facts, join_timeout, liveness, mem, digests };
        return execute(&config, Some(&link), file.metrics_json.as_deref());
    }
    let settings = match pod::settings_for(&facts, mem.layout().pages(), digests) {
        Ok(s) => s,
        Err(e) => return bad_input(e),
    };
    let member = pod::Member {
        transport,
        facts,
        settings,
        mem,
        join_timeout,
        liveness,
        fault_threads: config.fault_threads.unwrap_or(config.cpus as usize).clamp(1, 8),
    };
    match pod::run_member(member) {
        Ok(pod::MemberEnd::Finished) => ExitCode::SUCCESS,
        Ok(pod::MemberEnd::Failed(why)) => fail(EXIT_HOST, why),
        Err(e @ (pod::Error::Mismatch { .. } | pod::Error::Refused(_))) => fail(EXIT_BAD_INPUT, e.to_string()),
        Err(e) => fail(EXIT_HOST, e.to_string()),
    }
}

fn parse_listen(s: &str) -> Result<Addr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Addr::Unix(PathBuf::from(p)));
    }
    let t = s.strip_prefix("tcp:").unwrap_or(s);
    t.parse().map(Addr::Tcp).map_err(|e| format!("--listen {s:?}: {e}"))
}

/// The VM configuration a pod file describes.
fn config_from_file(f: &PodFile) -> Result<VmConfig, String> {
    let image = match (&f.guest, &f.kernel) {
        (Some(name), None) => ImageSource::Embedded(config::find_guest(name).map_err(|e| e.to_string())?),
        (None, Some(path)) => ImageSource::File(path.clone()),
        _ => return Err("the pod file must name exactly one of guest or kernel".into()),
    };
    let size = |s: &str| config::parse_size(s).map_err(|e| e.to_string());
    let mut c = VmConfig::new(image, size(&f.memory)?);
    c.cpus = f.cpus.unwrap_or(1);
    c.cmdline = f.cmdline.clone().unwrap_or_default();
    c.dormant = f.dormant.unwrap_or(true);
    c.node_memory = f.node_memory.as_deref().map(size).transpose()?;
    c.timeout = f.timeout.map(|t| positive_seconds("timeout", t)).transpose()?;
    c.initrd = f.initrd.clone();
    c.no_xsave = f.xsave == Some(false);
    c.placement = f.placement.clone().unwrap_or_default();
    c.migration = f.migration.unwrap_or(true);
    c.verify_pages = f.verify_pages.unwrap_or(false);
    c.eviction = f.eviction;
    c.bzimage_entry = f.bzimage_entry.unwrap_or_default();
    c.balloon = f.balloon;
    for d in f.disks.iter().flatten() {
        c.disks.push(config::DiskConfig::parse(d).map_err(|e| format!("disks: {e}"))?);
    }
    c.check().map_err(|e| e.to_string())?;
    Ok(c)
}

/// Runs the VM (alone, or as node 0 of `pod`), prints the summary, writes
/// the metrics, and turns the end into shoal's exit status.
fn execute(config: &VmConfig, pod: Option<&pod::Link>, metrics_json: Option<&std::path::Path>) -> ExitCode {
    if let Err(e) = vm::install_interrupt_handlers() {
        say!("shoal: error: installing signal handlers: {e}");
        return ExitCode::from(EXIT_HOST);
    }
    let outcome = match vm::run_node(config, Box::new(std::io::stdout()), pod) {
        Ok(o) => o,
        Err(e) if e.is_bad_input() => return bad_input(e),
        Err(e) => {
            say!("shoal: error: {}", error_chain(&e));
            return ExitCode::from(EXIT_HOST);
        }
    };
    say!("{}", outcome.report.summary());
    if let Some(path) = metrics_json {
        let json = serde_json::to_string_pretty(&outcome.report).expect("metrics serialise");
        if let Err(e) = std::fs::write(path, json + "\n") {
            say!("shoal: error: writing metrics to {}: {e}", path.display());
            return ExitCode::from(EXIT_HOST);
        }
    }
    match outcome.end {
        End::Exited(status) => match u8::try_from(status) {
            Ok(s) => ExitCode::from(s),
            Err(_) => {
                say!("shoal: the guest exited with status {status}, which does not fit in 0-255");
                ExitCode::from(EXIT_VM_FAILED)
            }
        },
        End::Failed(why) => {
            say!("shoal: error: the VM failed: {why}");
            ExitCode::from(EXIT_VM_FAILED)
        }
        End::TimedOut(t) => {
            say!("shoal: error: the guest ran past --timeout {:.1} s; stopped it", t.as_secs_f64());
            ExitCode::from(EXIT_TIMEOUT)
        }
        End::Interrupted => {
            say!("shoal: interrupted; stopped the VM");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the writes it is handed.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_with_arguments_is_one_write() {
        let mut w = Writes::default();
        let (node, why) = (2, "connection reset by peer");
        write_line(&mut w, format_args!("shoal: error: the VM failed: node {node} left the pod: {why}")).unwrap();
        assert_eq!(w.0, vec![b"shoal: error: the VM failed: node 2 left the pod: connection reset by peer\n".to_vec()]);
    }
}
