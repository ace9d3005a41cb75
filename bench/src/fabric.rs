//! The fabric benchmark: 4 KiB read latency (p50, p99) and batched read
//! throughput per backend, between two nodes of one pod in this process.
//! Baselines measured in the same run: a plain `memcpy` of 4 KiB for shm
//! (its floor), and perftest's `ib_read_lat` / `ib_read_bw -s 4096` on the
//! same RDMA device for verbs (target: verbs p50 within 1.1× of
//! `ib_read_lat`'s typical latency). For tcp, the cost of
//! frame authentication: rounds with it on and off, interleaved, in the
//! same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use shoal_fabric::{bind, Addr, Identity, Kind, LocalRegion, Options, ReadOp, ReadReq, Transport};

use crate::chart::{self, Bar};
use crate::report::{self, Host};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Backends to measure (comma-separated: shm, tcp, verbs).
    #[arg(long, default_value = "shm,tcp", value_delimiter = ',')]
    kinds: Vec<String>,
    /// 4 KiB reads timed one by one, per backend.
    #[arg(long, default_value_t = 5000)]
    reads: usize,
    /// Reads per batch in the throughput run.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Batches in the throughput run.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Also run perftest's ib_read_lat and ib_read_bw on the RDMA device
    /// (verbs only); RXE_GID_INDEX or --gid-index picks the GID.
    #[arg(long)]
    perftest: bool,
    /// Rounds of (verbs, ib_read_lat, ib_read_bw), interleaved, when
    /// comparing with perftest: the ratio is the median of the rounds'.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rounds of tcp with and without frame authentication, interleaved:
    /// the ratios are the medians of the rounds'.
    #[arg(long, default_value_t = 3)]
    auth_rounds: usize,
    /// GID index for perftest (default: $RXE_GID_INDEX, else 0).
    #[arg(long)]
    gid_index: Option<u8>,
    /// Print the JSON result on stdout between @@BENCH-JSON markers (for
    /// runs inside the soft-RoCE VM, whose only way out is the console).
    #[arg(long)]
    print_json: bool,
}

const REGION: u64 = 64 << 20;
const PAGE: usize = 4096;

#[derive(Debug, Serialize)]
struct Row {
    backend: String,
    lat_us_p50: f64,
    lat_us_p99: f64,
    lat_us_mean: f64,
    /// p50 of reads copied into the caller's buffer (`read` rather than
    /// `read_with`).
    copied_us_p50: f64,
    reads: usize,
    batch: usize,
    batched_mb_s: f64,
    batched_bytes: u64,
    bytes_read_counter: u64,
    chunks_registered: u64,
}

#[derive(Debug, Serialize)]
struct Perftest {
    tool: &'static str,
    command: String,
    lat_us_typical: Option<f64>,
    lat_us_p99: Option<f64>,
    bw_mb_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    command: String,
    host: Host,
    rows: Vec<Row>,
    perftest: Vec<Perftest>,
    ratios: Vec<Ratio>,
}

struct Mem {
    ptr: *mut u8,
    fd: std::os::fd::OwnedFd,
}

impl Mem {
    fn new() -> anyhow::Result<Mem> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing and sealing our memfd; mapping it shared.
        let ptr = unsafe {
            libc::ftruncate(fd.as_raw_fd(), REGION as i64);
            libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
            libc::mmap(
                std::ptr::null_mut(),
                REGION as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        // SAFETY: our mapping of REGION bytes.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0x5a, REGION as usize) };
        Ok(Mem { ptr: ptr.cast(), fd })
    }

    fn region(&self) -> LocalRegion {
        // SAFETY: the memory lives until the end of the benchmark, after
        // the transports are dropped.
        unsafe { LocalRegion::with_memfd(0, self.ptr, REGION, self.fd.try_clone().expect("dup memfd")) }
    }
}

// SAFETY: plain shared memory, only read during the benchmark.
unsafe impl Send for Mem {}

/// Two joined nodes and their memories (which must outlive them).
struct Pair {
    t0: Box<dyn Transport>,
    t1: Box<dyn Transport>,
    _m0: Mem,
    _m1: Mem,
}

fn pair(kind: Kind, authenticate_frames: bool) -> anyhow::Result<Pair> {
    pair_with(kind, authenticate_frames, None)
}

/// Two joined nodes; with `node0_cpu`, node 0 joins on a thread pinned
/// there (so its fabric threads run there; node 1's run where the caller
/// does).
fn pair_with(kind: Kind, authenticate_frames: bool, node0_cpu: Option<usize>) -> anyhow::Result<Pair> {
    let dir = std::env::temp_dir().join(format!("shoal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr = |i: u32| match kind {
        Kind::Shm => Addr::Unix(dir.join(format!("n{i}.sock"))),
        _ => Addr::Tcp("127.0.0.1:0".parse().expect("an address")),
    };
    let b0 = bind(kind, &addr(0))?;
    let b1 = bind(kind, &addr(1))?;
    let (a0, a1) = (b0.local_addr().clone(), b1.local_addr().clone());
    let opts = Options { io_timeout: Duration::from_secs(10), authenticate_frames, ..Options::default() };
    let o2 = opts.clone();
    let t = std::thread::spawn(move || -> anyhow::Result<(Box<dyn Transport>, Mem)> {
        if let Some(cpu) = node0_cpu {
            shoal_vmm::vcpu::pin_current_thread(cpu)?;
        }
        let m = Mem::new()?;
        let id = Identity { node: 0, pod_id: "bench".into(), secret: b"bench".to_vec() };
        Ok((b0.join(id, &[(1, a1)], vec![m.region()], o2)?, m))
    });
    let m1 = Mem::new()?;
    let id = Identity { node: 1, pod_id: "bench".into(), secret: b"bench".to_vec() };
    let t1 = b1.join(id, &[(0, a0)], vec![m1.region()], opts)?;
    let (t0, m0) = t.join().map_err(|_| anyhow::anyhow!("node 0 panicked"))??;
    Ok(Pair { t0, t1, _m0: m0, _m1: m1 })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Times `read(offset)` for `n` 4 KiB reads spread over the region, one
/// by one; returns the latencies in µs, sorted.
fn time_reads(n: usize, mut read: impl FnMut(u64) -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    let pages = REGION / PAGE as u64;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let off = (i * 7919 % pages) * PAGE as u64;
        let start = Instant::now();
        read(off)?;
        lat.push(start.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// A row from sorted latencies and a throughput run of `bytes` in `secs`.
fn row(backend: String, lat: &[f64], copied: &[f64], args: &Args, bytes: u64, secs: f64) -> Row {
    Row {
        backend,
        lat_us_p50: percentile(lat, 0.5),
        lat_us_p99: percentile(lat, 0.99),
        lat_us_mean: lat.iter().sum::<f64>() / lat.len() as f64,
        copied_us_p50: percentile(copied, 0.5),
        reads: args.reads,
        batch: args.batch,
        batched_mb_s: bytes as f64 / secs / 1e6,
        batched_bytes: bytes,
        bytes_read_counter: 0,
        chunks_registered: 0,
    }
}

fn measure(kind: Kind, args: &Args) -> anyhow::Result<Row> {
    measure_with(kind, Options::default().authenticate_frames, kind.to_string(), args)
}

fn measure_with(kind: Kind, authenticate_frames: bool, label: String, args: &Args) -> anyhow::Result<Row> {
    let Pair { t0, t1, _m0, _m1 } =
        pair(kind, authenticate_frames).with_context(|| format!("setting up a {kind} pair"))?;
    let mut buf = vec![0u8; PAGE];
    let pages = REGION / PAGE as u64;
    // warm up: registration of every chunk (verbs), connection buffers
    for i in 0..(REGION / (2 << 20)) {
        t1.read(0, &mut [ReadOp { region: 0, offset: i * (2 << 20), buf: &mut buf }])?;
    }
    // in place: the read is done when the bytes are in local memory (as
    // perftest counts it); the page engine consumes them there
    let mut seen = 0usize;
    let lat = time_reads(args.reads, |offset| {
        Ok(t1.read_with(0, &[ReadReq { region: 0, offset, len: PAGE, key: 0 }], &mut |_, _, b| {
            seen += b.len();
            Ok(())
        })?)
    })?;
    anyhow::ensure!(seen == args.reads * PAGE, "the sink saw {seen} bytes");
    // copied into the caller's buffer
    let copied = time_reads(args.reads, |offset| Ok(t1.read(0, &mut [ReadOp { region: 0, offset, buf: &mut buf }])?))?;
    let mut bufs: Vec<Vec<u8>> = (0..args.batch).map(|_| vec![0u8; PAGE]).collect();
    let start = Instant::now();
    for b in 0..args.batches as u64 {
        let mut ops: Vec<ReadOp> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| ReadOp { region: 0, offset: ((b * 131 + i as u64 * 17) % pages) * PAGE as u64, buf })
            .collect();
        t1.read(0, &mut ops)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let batched_bytes = (args.batch * args.batches * PAGE) as u64;
    let stats = t1.stats();
    let served = t0.stats();
    drop((t0, t1));
    Ok(Row {
        bytes_read_counter: stats.bytes_read,
        chunks_registered: served.chunks_registered,
        ..row(label, &lat, &copied, args, batched_bytes, secs)
    })
}

/// A named ratio of the report.
type Ratio = (String, f64);

/// tcp with frame authentication on and off, in interleaved rounds; the
/// ratios (on ÷ off) are the medians of the rounds'.
fn frame_auth_cost(args: &Args) -> anyhow::Result<(Vec<Row>, Vec<Ratio>)> {
    let mut rows = Vec::new();
    let (mut lat, mut copied, mut bw) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.auth_rounds {
        eprintln!("shoal-bench fabric: round {round}: tcp with and without frame authentication");
        let on = measure_with(Kind::Tcp, true, format!("tcp, frames authenticated (round {round})"), args)?;
        let off = measure_with(Kind::Tcp, false, format!("tcp, frames not authenticated (round {round})"), args)?;
        lat.push(on.lat_us_p50 / off.lat_us_p50);
        copied.push(on.copied_us_p50 / off.copied_us_p50);
        bw.push(on.batched_mb_s / off.batched_mb_s);
        rows.push(on);
        rows.push(off);
    }
    let n = args.auth_rounds;
    let ratios = vec![
        (format!("tcp p50, authenticated ÷ not, median of {n} rounds"), report::median(&lat)),
        (format!("tcp p50 copied, authenticated ÷ not, median of {n} rounds"), report::median(&copied)),
        (format!("tcp batched MB/s, authenticated ÷ not, median of {n} rounds"), report::median(&bw)),
    ];
    Ok((rows, ratios))
}

/// The floor of shm: 4 KiB memcpy from a shared mapping, timed the same way.
fn memcpy_floor(args: &Args) -> anyhow::Result<Row> {
    let m = Mem::new()?;
    let mut buf = vec![0u8; PAGE];
    let pages = REGION / PAGE as u64;
    let mut copy = |offset: u64| {
        // SAFETY: every offset is a page inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(m.ptr.add(offset as usize), buf.as_mut_ptr(), PAGE) };
        std::hint::black_box(&buf);
        Ok(())
    };
    let lat = time_reads(args.reads, &mut copy)?;
    let start = Instant::now();
    for b in 0..(args.batches * args.batch) as u64 {
        copy((b * 131) % pages * PAGE as u64)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (args.batch * args.batches * PAGE) as u64;
    Ok(row("memcpy (floor)".into(), &lat, &lat, args, bytes, secs))
}

/// Runs a perftest server and client pair on the device; returns the
/// client's output.
fn perftest(tool: &str, extra: &[&str], gid: u8) -> anyhow::Result<(String, String)> {
    let dev = std::env::var("RXE_DEV").unwrap_or_else(|_| shoal_fabric::verbs::device_names().remove(0));
    let gid = gid.to_string();
    let mut common = vec!["-d", dev.as_str(), "-x", gid.as_str(), "-s", "4096", "-F"];
    common.extend_from_slice(extra);
    let mut server = Command::new(tool).args(&common).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(800));
    let mut args = common.clone();
    args.push("127.0.0.1");
    let out = Command::new(tool).args(&args).output()?;
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{tool} failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    Ok((format!("{tool} {}", args.join(" ")), text))
}

/// The data line of perftest's table: the line after the header that
/// starts with `#bytes`.
fn perftest_numbers(text: &str) -> Vec<f64> {
    let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines.next();
    lines
        .find(|l| l.trim_start().starts_with("4096"))
        .map(|l| l.split_whitespace().filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default()
}

pub fn run(args: &Args, out: &Path) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut kinds = Vec::new();
    for k in &args.kinds {
        kinds.push(k.parse::<Kind>().map_err(anyhow::Error::msg)?);
    }
    if kinds.contains(&Kind::Shm) {
        rows.push(memcpy_floor(args)?);
    }
    let with_perftest = args.perftest && kinds.contains(&Kind::Verbs);
    let mut ratios = Vec::new();
    for k in kinds.iter().filter(|k| !(with_perftest && **k == Kind::Verbs)) {
        if *k == Kind::Tcp && args.auth_rounds > 0 {
            let (r, mut found) = frame_auth_cost(args)?;
            rows.extend(r);
            ratios.append(&mut found);
            continue;
        }
        eprintln!("shoal-bench fabric: measuring {k}");
        rows.push(measure(*k, args)?);
    }
    let mut perf = Vec::new();
    if with_perftest {
        let gid =
            args.gid_index.or_else(|| std::env::var("RXE_GID_INDEX").ok().and_then(|g| g.parse().ok())).unwrap_or(0);
        let n = args.reads.to_string();
        // interleaved rounds: soft-RoCE under TCG drifts a lot between runs
        let mut verbs_rows = Vec::new();
        let (mut lat_ratio, mut bw_ratio) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            eprintln!("shoal-bench fabric: round {round}: verbs, ib_read_lat, ib_read_bw");
            let v = measure(Kind::Verbs, args)?;
            // columns: bytes iters t_min t_max t_typical t_avg t_stdev p99 p99.9
            let (cmd, text) = perftest("ib_read_lat", &["-n", &n], gid)?;
            let l = perftest_numbers(&text);
            // columns: bytes iters bw_peak bw_avg msg_rate (MB/s = MiB/s here)
            let (cmd_bw, text) = perftest("ib_read_bw", &["-n", "5000"], gid)?;
            let b = perftest_numbers(&text);
            let lat = Perftest {
                tool: "ib_read_lat",
                command: cmd,
                lat_us_typical: l.get(4).copied(),
                lat_us_p99: l.get(7).copied(),
                bw_mb_s: None,
            };
            let bw = Perftest {
                tool: "ib_read_bw",
                command: cmd_bw,
                lat_us_typical: None,
                lat_us_p99: None,
                bw_mb_s: b.get(3).map(|mib| mib * 1.048_576),
            };
            if let Some(t) = lat.lat_us_typical {
                lat_ratio.push(v.lat_us_p50 / t);
            }
            if let Some(x) = bw.bw_mb_s {
                bw_ratio.push(v.batched_mb_s / x);
            }
            verbs_rows.push(v);
            perf.push(lat);
            perf.push(bw);
        }
        if !lat_ratio.is_empty() {
            ratios.push((
                format!("verbs p50 ÷ ib_read_lat typical, median of {} rounds (target ≤ 1.1)", lat_ratio.len()),
                crate::report::median(&lat_ratio),
            ));
        }
        if !bw_ratio.is_empty() {
            ratios.push((
                format!("verbs batched ÷ ib_read_bw, median of {} rounds", bw_ratio.len()),
                crate::report::median(&bw_ratio),
            ));
        }
        rows.extend(verbs_rows);
    }
    if let Some(floor) = rows.iter().find(|r| r.backend.starts_with("memcpy")).map(|r| r.lat_us_p50) {
        if let Some(shm) = rows.iter().find(|r| r.backend == "shm") {
            // like for like: both copy 4 KiB into a buffer (in place, shm
            // copies nothing at all)
            ratios.push(("shm p50, copied ÷ memcpy p50".into(), shm.copied_us_p50 / floor));
        }
    }

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = format!(
        "# Fabric: 4 KiB reads\n\n`{command}`\n\nTwo nodes in one process; latency of {} single 4 KiB reads, done when the bytes are in local \
         memory (`read_with`), and p50 when also copied to the caller's buffer (`read`); \
         throughput of {} batches of {} × 4 KiB reads.\n\n\
         | backend | p50 µs | p99 µs | mean µs | p50 µs, copied | batched MB/s | bytes read (counter) | chunks registered |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        args.reads, args.batches, args.batch
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} |\n",
            r.backend,
            r.lat_us_p50,
            r.lat_us_p99,
            r.lat_us_mean,
            r.copied_us_p50,
            r.batched_mb_s,
            r.bytes_read_counter,
            r.chunks_registered
        ));
    }
    for p in &perf {
        md.push_str(&format!(
            "| {} (same device, same run) | {} | {} | | | {} | | |\n",
            p.tool,
            p.lat_us_typical.map_or("".into(), |v| format!("{v:.2} (typical)")),
            p.lat_us_p99.map_or("".into(), |v| format!("{v:.2}")),
            p.bw_mb_s.map_or("".into(), |v| format!("{v:.1}")),
        ));
    }
    if !ratios.is_empty() {
        md.push_str("\n| ratio | value |\n|---|---:|\n");
        for (name, v) in &ratios {
            md.push_str(&format!("| {name} | {v:.2} |\n"));
        }
    }
    print!("{md}");
    let name = if kinds.contains(&Kind::Verbs) { "fabric-verbs" } else { "fabric" };
    let results = Results { bench: "fabric", command, host: Host::probe(), rows, perftest: perf, ratios };
    if args.print_json {
        println!("@@BENCH-JSON {name} {}", serde_json::to_string(&results)?);
        println!("@@BENCH-MD-BEGIN {name}");
        print!("{md}");
        println!("@@BENCH-MD-END");
        return Ok(());
    }
    let bars: Vec<Bar> = results.rows.iter().map(|r| Bar { label: r.backend.clone(), value: r.lat_us_p50 }).collect();
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(format!("{name}.svg")), chart::bars("4 KiB read latency, p50", "µs", &bars))?;
    md.push_str(&format!("\n![chart]({name}.svg)\n"));
    report::write(out, name, &results, &md)
}

/// The 4 KiB one-sided read latency p50 of `kind` (µs), in place, for
/// other benchmarks' floors in their own run.
pub fn read_floor_us(kind: Kind) -> anyhow::Result<f64> {
    let args = Args {
        kinds: vec![kind.to_string()],
        reads: 2000,
        batch: 1,
        batches: 1,
        perftest: false,
        rounds: 1,
        gid_index: None,
        print_json: false,
        auth_rounds: 1,
    };
    Ok(measure(kind, &args)?.lat_us_p50)
}

/// Node 1's end of a round trip: its receiving thread sends every message
/// back, as a pod's engine answers a page request over shm (on the
/// receiving thread, through the same tap).
#[derive(Debug, Default)]
struct Echo(std::sync::Mutex<Option<std::sync::Arc<dyn Transport>>>);

impl shoal_fabric::Tap for Echo {
    fn take(&self, from: shoal_fabric::NodeId, payload: &[u8]) -> shoal_fabric::Take {
        if let Some(t) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = t.send(from, payload);
        }
        shoal_fabric::Take::Taken
    }
}

/// The p50 (µs) of `n` message round trips between two nodes of one pod
/// over shm, in this process: node 0 sends 32 bytes (a page request's
/// size), node 1's receiving thread sends them back (a tap, as a pod's
/// engine answers), node 0 takes them from its inbox. The same wakes as
/// a fault that must ask a peer (the peer's receiving thread, ours, and
/// the waiter), with no page work: the floor of an asked fault's message
/// round trip. `cpus` as the pod benchmark's: one CPU puts every thread
/// on CPU 0; one per node puts node 0's threads on CPU 0 and node 1's on
/// CPU 1.
pub(crate) fn message_round_trip_us(cpus: crate::pod::Cpus, n: usize) -> anyhow::Result<f64> {
    use crate::pod::Cpus;
    // in a thread of its own: its affinity, and its threads', end with it
    let timed = std::thread::spawn(move || -> anyhow::Result<f64> {
        let Pair { t0, t1, _m0, _m1 } = match cpus {
            Cpus::Unpinned => pair(Kind::Shm, false)?,
            Cpus::One => {
                shoal_vmm::vcpu::pin_current_thread(0)?;
                pair(Kind::Shm, false)?
            }
            Cpus::PerNode => {
                // node 1 joins on this thread, node 0 on one it starts:
                // each node's threads are started by its join
                shoal_vmm::vcpu::pin_current_thread(1)?;
                let p = pair_with(Kind::Shm, false, Some(0))?;
                shoal_vmm::vcpu::pin_current_thread(0)?;
                p
            }
        };
        let t1: std::sync::Arc<dyn Transport> = std::sync::Arc::from(t1);
        let echo = std::sync::Arc::new(Echo::default());
        *echo.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(t1.clone());
        if !t1.set_tap(echo.clone()) {
            bail!("the shm transport took no tap");
        }
        let msg = [7u8; 32];
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            t0.send(1, &msg)?;
            match t0.recv(Duration::from_secs(5))? {
                Some(shoal_fabric::Incoming::Message { .. }) => {}
                Some(other) => bail!("the round trip's echo: {other:?}"),
                None => bail!("no echo within 5 s"),
            }
            lat.push(start.elapsed().as_secs_f64() * 1e6);
        }
        // (the tap holds node 1's transport: let it go)
        echo.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        lat.sort_by(f64::total_cmp);
        Ok(percentile(&lat, 0.5))
    });
    timed.join().map_err(|_| anyhow::anyhow!("the round trip's thread panicked"))?
}
