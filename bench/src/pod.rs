//! Pod benchmarks (the pod issue), each against a baseline
//! measured in the same run, with the counters beside every time:
//!
//! - **remote vs dormant faults**: one 2-node pod over shm (and one over
//!   tcp on loopback) runs memtouch
//!   over more than node 0 may hold, so the same run has faults resolved
//!   by zero-filling dormant pages (a 2 MiB block at a time, after a grant)
//!   and faults resolved by a one-sided read of a page node 1 holds. The
//!   engine times both kinds from the fault's arrival to the vCPU's wake.
//!   Each remote fault is also set against its own floor in the same run
//!   (its p50 one-sided read plus its p50 map), split into faults read at
//!   once (pages node 0 is home to, parked at node 1) and faults that ask
//!   a peer first. Target: ≤ 2× the floor per page. Unpinned, with the
//!   whole pod on one CPU (`taskset -c 0`: the threads that hand a fault
//!   to each other cannot wake each other across CPUs), and with each
//!   node on a CPU of its own (as on a cluster, where nodes are hosts).
//! - **fast boot**: zeroboot on 1, 2 and 3 nodes, dormant pages on and
//!   off: wall time beside page bytes on the wire and pages zero-filled.
//! - **over verbs** (`--verbs`, inside the soft-RoCE harness:
//!   bench/scripts/pod-verbs.sh): the remote-fault run alone, with what
//!   exposing pages costs (a registration for each page a peer may read,
//!   a deregistration when it leaves) and whether every node's memory
//!   stayed its resident pages.
//!
//! The pods are started with the `shoal` binary next to this one (pods are
//! processes), so build both: `cargo build --release`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;
use shoal_vmm::metrics::NodeMetrics;

use crate::report::{self, Host};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest RAM of the fast-boot runs (the guest zeroes all of it).
    #[arg(long, default_value = "128M")]
    boot_memory: String,
    /// MiB memtouch writes in the remote-fault run (node 0 holds 16).
    #[arg(long, default_value_t = 24)]
    remote_mib: u64,
    /// Only the remote-fault run, over verbs (an RDMA device is needed:
    /// bench/scripts/pod-verbs.sh runs it on soft-RoCE), written as
    /// pod-verbs and printed between @@BENCH markers.
    #[arg(long)]
    verbs: bool,
}

/// One pod run: how it was started and what every node counted.
#[derive(Debug, Serialize)]
pub(crate) struct RunResult {
    pub args: Vec<String>,
    pub cpus: Cpus,
    pub total: NodeMetrics,
    pub nodes: Vec<NodeMetrics>,
}

#[derive(Debug, Serialize)]
struct RemoteRow {
    fabric: &'static str,
    cpus: Cpus,
    faults_zero: u64,
    fault_zero_us_p50: f64,
    pages_per_zero_fault: f64,
    faults_remote: u64,
    fault_remote_us_p50: f64,
    fault_remote_us_p99: f64,
    /// remote p50 ÷ dormant p50, per fault (target ≤ 2).
    ratio_per_fault: f64,
    /// remote p50 ÷ (dormant p50 ÷ pages per dormant fault), per page.
    ratio_per_page: f64,
    remote_fetches: u64,
    bytes_fabric_read: u64,
    /// Where a remote fault's time went (p50 of each phase, node 0).
    owner_us_p50: f64,
    fabric_read_us_p50: f64,
    map_us_p50: f64,
    rest_us_p50: f64,
    /// Remote faults with no message on their way (pages this node is home
    /// to, parked at node 1 by its evictions: read at once) and the rest
    /// (homed on node 1: one round trip to it first).
    faults_direct: u64,
    direct_us_p50: f64,
    faults_asked: u64,
    asked_us_p50: f64,
    /// The floor of a remote fault in this run: its own read and map
    /// (p50 of each), and the direct fault against it (target ≤ 2).
    floor_us: f64,
    direct_over_floor: f64,
    asked_over_floor: f64,
    /// shm: a message's round trip between two nodes in this process, in
    /// the same layout of CPUs, measured right after the pod (see
    /// `fabric::message_round_trip_us`): what an asked fault cannot do
    /// without. 0 for other fabrics.
    round_trip_us: f64,
    /// The asked fault against its floor and that round trip.
    asked_over_floor_and_round_trip: f64,
    /// Pages read ahead of runs of direct faults (in the same batch as a
    /// fault's page), those the run went through, and a direct fault per
    /// page (its p50 over the pages each brings).
    pages_read_ahead: u64,
    read_ahead_used: u64,
    direct_us_per_page: f64,
    direct_per_page_over_floor: f64,
    /// Over verbs, all nodes: pages exposed to peers' reads and exposures
    /// ended (a registration and a deregistration each), the mean time of
    /// one, and chunks registered (reads that named no exposure).
    exposures: u64,
    exposures_ended: u64,
    exposure_us_each: f64,
    chunks_registered: u64,
    /// Every node's memfd held exactly its resident pages at the end.
    memory_is_resident: bool,
}

#[derive(Debug, Serialize)]
struct BootRow {
    nodes: u32,
    dormant: bool,
    wall_seconds: f64,
    /// wall time ÷ the 1-node dormant run's.
    ratio: f64,
    pages_zero_filled: u64,
    pages_copied: u64,
    remote_fetches: u64,
    bytes_fabric_read: u64,
    messages_sent: u64,
}

/// One eviction policy on memtouch's hot and cold rounds.
#[derive(Debug, Serialize)]
struct EvictionRow {
    eviction: String,
    /// Pages the rounds read (the guest's count).
    pages_touched: u64,
    /// Pages node 0 fetched back during the rounds: the run with them less
    /// the same run without (the pattern's first pass).
    fetched_back: u64,
    fetched_back_per_page: f64,
    rounds_seconds: f64,
    pages_probed: u64,
    pages_referenced: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    host: Host,
    remote: Vec<RemoteRow>,
    boot: Vec<BootRow>,
    eviction: Vec<EvictionRow>,
    verify: Vec<VerifyRow>,
    runs: Vec<RunResult>,
}

/// The remote fault with and without `--verify-pages`, same workload.
#[derive(Debug, Serialize)]
struct VerifyRow {
    fabric: &'static str,
    verify: bool,
    remote_fetches: u64,
    remote_us_p50: f64,
    asked_us_p50: f64,
    direct_us_p50: f64,
    /// remote p50 ÷ the same fabric's unchecked remote p50.
    ratio: f64,
    wall_seconds: f64,
}

pub(crate) fn shoal_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let shoal = me.with_file_name("shoal");
    if !shoal.exists() {
        bail!("{} not found: build it beside shoal-bench (cargo build --release)", shoal.display());
    }
    Ok(shoal)
}

/// Where a pod's threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Cpus {
    /// Wherever the host's scheduler puts them.
    Unpinned,
    /// The whole pod on CPU 0 (`taskset -c 0`): the threads handing a
    /// fault or a message to each other never wake each other across CPUs.
    One,
    /// Node i's process on CPU i (`taskset -c i`), as if each node were a
    /// host of its own: started as a cluster's nodes are, from a pod file.
    PerNode,
}

impl Cpus {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Cpus::Unpinned => "unpinned",
            Cpus::One => "one (taskset -c 0)",
            Cpus::PerNode => "one per node (node i on CPU i)",
        }
    }
}

fn run_pod(args: &[&str], cpus: Cpus) -> anyhow::Result<RunResult> {
    run_pod_out(args, cpus).map(|(r, _)| r)
}

/// A pod run, with what the guest printed.
pub(crate) fn run_pod_out(args: &[&str], cpus: Cpus) -> anyhow::Result<(RunResult, String)> {
    let dir = std::env::temp_dir().join(format!("shoal-bench-pod-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let metrics = dir.join("metrics.json");
    let shoal = shoal_binary()?;
    let stdout = match cpus {
        Cpus::PerNode => run_nodes_pinned(&shoal, args, &dir, &metrics)?,
        Cpus::Unpinned | Cpus::One => {
            let mut cmd = if cpus == Cpus::One {
                let mut c = Command::new("taskset");
                c.args(["-c", "0"]).arg(&shoal);
                c
            } else {
                Command::new(&shoal)
            };
            cmd.args(args).arg("--metrics-json").arg(&metrics).arg("--timeout").arg("600");
            eprintln!("shoal-bench: {}{}", if cpus == Cpus::One { "taskset -c 0 " } else { "" }, args.join(" "));
            let out = cmd.output().with_context(|| format!("running {}", shoal.display()))?;
            if !out.status.success() {
                bail!("shoal {} failed ({}):\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    #[derive(serde::Deserialize)]
    struct File {
        total: NodeMetrics,
        nodes: Vec<NodeMetrics>,
    }
    let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let f: File = serde_json::from_str(&text)?;
    let _ = std::fs::remove_dir_all(&dir);
    let result = RunResult { args: args.iter().map(|s| s.to_string()).collect(), cpus, total: f.total, nodes: f.nodes };
    Ok((result, stdout))
}

/// Runs the pod `shoal run ARGS --nodes N` would, as a cluster's nodes:
/// a pod file (the options of ARGS) and `taskset -c i shoal node --rank
/// i` for each node i (CPU i modulo the host's CPUs). Returns node 0's
/// standard output.
fn run_nodes_pinned(shoal: &Path, args: &[&str], dir: &Path, metrics: &Path) -> anyhow::Result<String> {
    use shoal_vmm::pod::launch::{self, PodFile};
    let mut file = PodFile {
        pod_id: format!("bench-{}", std::process::id()),
        socket_dir: Some(dir.to_path_buf()),
        metrics_json: Some(metrics.to_path_buf()),
        timeout: Some(600.0),
        ..PodFile::default()
    };
    let mut it = args.iter().copied();
    if it.next() != Some("run") {
        bail!("a pod pinned per node is started from `run` arguments, not {args:?}");
    }
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let on = |v: &str| v == "on";
        match flag {
            "--guest" => file.guest = Some(value.into()),
            "--cmdline" => file.cmdline = Some(value.into()),
            "--nodes" => file.nodes = Some(value.parse()?),
            "--cpus" => file.cpus = Some(value.parse()?),
            "--memory" => file.memory = value.into(),
            "--node-memory" => file.node_memory = Some(value.into()),
            "--fabric" => file.fabric = Some(value.into()),
            "--migration" => file.migration = Some(on(value)),
            "--dormant" => file.dormant = Some(on(value)),
            other => bail!("a pod pinned per node takes no {other} (add it to run_nodes_pinned)"),
        }
    }
    let nodes = file.nodes.unwrap_or(1);
    let pod = dir.join("pod.toml");
    std::fs::write(&pod, file.to_toml())?;
    let secret = launch::to_hex(&launch::random_secret());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("shoal-bench: node i on CPU i: {}", args.join(" "));
    let mut children = Vec::new();
    for rank in 0..nodes {
        let mut c = Command::new("taskset");
        c.args(["-c", &(rank as usize % cpus).to_string()]).arg(shoal).args(["node", "--pod"]).arg(&pod);
        c.args(["--rank", &rank.to_string()]).env(launch::SECRET_ENV, &secret);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        children.push(c.spawn().with_context(|| format!("starting node {rank}"))?);
    }
    // every node ends by itself (the pod's timeout bounds it); each is
    // drained in its own thread (a full pipe would stall a node), and all
    // are collected before any is judged
    let waits: Vec<_> = children.into_iter().map(|c| std::thread::spawn(move || c.wait_with_output())).collect();
    let outs: Vec<_> = waits
        .into_iter()
        .map(|w| w.join().map_err(|_| anyhow::anyhow!("a node's waiter panicked"))?.map_err(anyhow::Error::from))
        .collect::<anyhow::Result<_>>()?;
    for (rank, out) in outs.iter().enumerate() {
        if !out.status.success() {
            bail!(
                "node {rank} of {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(String::from_utf8_lossy(&outs[0].stdout).into_owned())
}

/// A remote-fault row's fabric and CPUs.
fn row_name(r: &RemoteRow) -> String {
    format!("{}, {}", r.fabric, r.cpus.label())
}

/// The arguments of a 2-node memtouch pod (64 MiB of guest memory).
fn memtouch_args<'a>(cmdline: &'a str, fabric: &'a str, node_memory: &'a str) -> Vec<&'a str> {
    let mut a = vec!["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", cmdline, "--nodes", "2"];
    a.extend(["--fabric", fabric, "--node-memory", node_memory]);
    a
}

/// The remote-fault run over `fabric`: memtouch over more than node 0
/// may hold, on 2 nodes.
fn remote_row(args: &Args, fabric: &'static str, cpus: Cpus) -> anyhow::Result<(RemoteRow, RunResult)> {
    let cmdline = format!("mib={}", args.remote_mib);
    let r = run_pod(&memtouch_args(&cmdline, fabric, "16M"), cpus)?;
    let n0 = &r.nodes[0];
    if n0.faults_zero == 0 || n0.faults_remote == 0 {
        bail!("the run had {} dormant and {} remote faults; both are needed", n0.faults_zero, n0.faults_remote);
    }
    let per_fault = n0.pages_zero_filled as f64 / n0.faults_zero as f64;
    let floor = n0.fault_remote_fabric_read_us_p50 + n0.fault_remote_map_us_p50;
    let round_trip = if fabric == "shm" { crate::fabric::message_round_trip_us(cpus, 2000)? } else { 0.0 };
    let direct_pages = (n0.faults_remote_direct + n0.pages_prefetched) as f64;
    let per_direct_page =
        n0.fault_remote_direct_us_p50 / (direct_pages / n0.faults_remote_direct.max(1) as f64).max(1.0);
    let row = RemoteRow {
        fabric,
        cpus,
        faults_zero: n0.faults_zero,
        fault_zero_us_p50: n0.fault_zero_us_p50,
        pages_per_zero_fault: per_fault,
        faults_remote: n0.faults_remote,
        fault_remote_us_p50: n0.fault_remote_us_p50,
        fault_remote_us_p99: n0.fault_remote_us_p99,
        ratio_per_fault: n0.fault_remote_us_p50 / n0.fault_zero_us_p50,
        ratio_per_page: n0.fault_remote_us_p50 / (n0.fault_zero_us_p50 / per_fault),
        remote_fetches: r.total.remote_fetches,
        bytes_fabric_read: r.total.bytes_fabric_read,
        owner_us_p50: n0.fault_remote_owner_us_p50,
        fabric_read_us_p50: n0.fault_remote_fabric_read_us_p50,
        map_us_p50: n0.fault_remote_map_us_p50,
        rest_us_p50: n0.fault_remote_rest_us_p50,
        faults_direct: n0.faults_remote_direct,
        direct_us_p50: n0.fault_remote_direct_us_p50,
        faults_asked: n0.faults_remote_asked,
        asked_us_p50: n0.fault_remote_asked_us_p50,
        floor_us: floor,
        direct_over_floor: n0.fault_remote_direct_us_p50 / floor,
        asked_over_floor: n0.fault_remote_asked_us_p50 / floor,
        round_trip_us: round_trip,
        asked_over_floor_and_round_trip: n0.fault_remote_asked_us_p50 / (floor + round_trip),
        pages_read_ahead: n0.pages_prefetched,
        read_ahead_used: n0.prefetched_used,
        direct_us_per_page: per_direct_page,
        direct_per_page_over_floor: per_direct_page / floor,
        exposures: r.total.exposures,
        exposures_ended: r.total.exposures_ended,
        exposure_us_each: r.total.exposure_us / (r.total.exposures + r.total.exposures_ended).max(1) as f64,
        chunks_registered: r.total.chunks_registered,
        memory_is_resident: r.nodes.iter().all(|n| n.memfd_bytes == 4096 * n.pages_resident),
    };
    Ok((row, r))
}

/// The remote-fault tables (fault against dormant, where the time goes,
/// against the floor) of these rows.
fn remote_md(remote: &[RemoteRow]) -> String {
    let mut md = String::new();
    md.push_str("| fabric, CPUs | dormant faults | p50 µs | pages each | remote faults | p50 µs | p99 µs | remote ÷ dormant per fault | per page |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in remote {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {} | {:.1} | {:.1} | **{:.2}** | {:.1} |\n",
            row_name(r),
            r.faults_zero,
            r.fault_zero_us_p50,
            r.pages_per_zero_fault,
            r.faults_remote,
            r.fault_remote_us_p50,
            r.fault_remote_us_p99,
            r.ratio_per_fault,
            r.ratio_per_page
        ));
    }
    md.push_str(
        "\nWhere a remote fault's time goes, p50 of each phase on node 0: until the read starts (for an asked \
         fault the owner's answer: request to the home, home to owner, the owner protecting its copy and \
         answering, protocol hops and cross-process wakeups; for a direct one the engine's own work), the one-sided \
         read, the map into the guest view (`UFFDIO_COPY`), and the rest to the wake.\n\n\
         | fabric, CPUs | until the read µs | fabric read µs | map µs | rest µs |\n|---|---|---|---|---|\n",
    );
    for r in remote {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            row_name(r),
            r.owner_us_p50,
            r.fabric_read_us_p50,
            r.map_us_p50,
            r.rest_us_p50
        ));
    }
    md.push_str(
        "\nA remote fault per page against its floor in the same run (the p50 one-sided read plus the p50 \
         `UFFDIO_COPY`, of one page). *Direct*: pages \
         node 0 is home to, which its evictions parked at node 1: node 0 reads them at once, no message on the \
         fault's way (node 1 hears `Fetched` after the wake); from a vCPU's second fault on consecutive pages \
         on, the next 16 pages parked at peers are read in the same batch and mapped (*read ahead*; *used*: the \
         run's next fault was the page right after them). So a direct fault brings several pages: *per page* is \
         its p50 over the pages direct faults brought on average. *Asked*: pages homed on node 1: one round trip \
         to node 1 first (request, its answer), one page each. The floor's read and map are p50s over all remote \
         faults (mostly one-page reads). Target: ≤ 2× the floor per page.\n\n\
         | fabric, CPUs | floor µs | direct faults | p50 µs | read ahead | used | per page µs | ÷ floor | asked faults | p50 µs | ÷ floor |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in remote {
        md.push_str(&format!(
            "| {} | {:.1} | {} | {:.1} | {} | {} | {:.1} | **{:.2}** | {} | {:.1} | {:.1} |\n",
            row_name(r),
            r.floor_us,
            r.faults_direct,
            r.direct_us_p50,
            r.pages_read_ahead,
            r.read_ahead_used,
            r.direct_us_per_page,
            r.direct_per_page_over_floor,
            r.faults_asked,
            r.asked_us_p50,
            r.asked_over_floor
        ));
    }
    if remote.iter().any(|r| r.round_trip_us > 0.0) {
        md.push_str(
            "\nAn asked fault cannot go without a message round trip: its owner must protect its copy before \
             anyone reads it. Beside it, the floor of that round trip on this host in the same layout of CPUs, \
             measured right after the pod: two nodes of one pod in the benchmark's process over shm, node 0 \
             sending 32 bytes (a request's size), node 1's receiving thread sending them back (through the tap, \
             as the engine answers), node 0 taking them from its inbox: the same thread wakes, no page work.\n\n\
             | fabric, CPUs | asked p50 µs | floor µs | round trip µs | asked ÷ (floor + round trip) |\n\
             |---|---|---|---|---|\n",
        );
        for r in remote.iter().filter(|r| r.round_trip_us > 0.0) {
            md.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | **{:.2}** |\n",
                row_name(r),
                r.asked_us_p50,
                r.floor_us,
                r.round_trip_us,
                r.asked_over_floor_and_round_trip
            ));
        }
    }

    md
}

/// `--verbs`: the remote-fault run over verbs, with what exposures cost.
fn run_verbs(args: &Args, out: &Path) -> anyhow::Result<()> {
    let (row, r) = remote_row(args, "verbs", Cpus::Unpinned)?;
    let mut md = format!(
        "# Pods over verbs\n\nThe remote-fault run of `shoal-bench pod` (memtouch {} MiB on 2 nodes, 16 MiB a \
         node) over verbs on soft-RoCE, inside QEMU/TCG (ci/softroce.sh): compare ratios, not absolute times.\n\n",
        args.remote_mib
    );
    md.push_str(&remote_md(std::slice::from_ref(&row)));
    md.push_str(&format!(
        "\nExposures (all nodes): each page a peer may read is registered alone while the node holds it and \
         deregistered before its memory is freed, so `--node-memory` bounds what a node pins.\n\n\
         | exposures | ended | µs each (register or deregister) | per remote fetch µs | chunks registered | \
         memfd = resident pages on every node |\n|---|---|---|---|---|---|\n\
         | {} | {} | {:.1} | {:.1} | {} | {} |\n",
        row.exposures,
        row.exposures_ended,
        row.exposure_us_each,
        r.total.exposure_us / row.remote_fetches.max(1) as f64,
        row.chunks_registered,
        if row.memory_is_resident { "yes" } else { "**no**" }
    ));
    #[derive(Serialize)]
    struct VerbsReport {
        host: Host,
        remote: Vec<RemoteRow>,
        runs: Vec<RunResult>,
    }
    let report = VerbsReport { host: Host::probe(), remote: vec![row], runs: vec![r] };
    println!("@@BENCH-JSON pod-verbs {}", serde_json::to_string(&report)?);
    println!("@@BENCH-MD-BEGIN pod-verbs\n{md}@@BENCH-MD-END");
    report::write(out, "pod-verbs", &report, &md)
}

pub fn run(args: &Args, out: &Path) -> anyhow::Result<()> {
    if args.verbs {
        return run_verbs(args, out);
    }
    let mut runs = Vec::new();
    let mut remote = Vec::new();
    // shm unpinned, on one CPU and on a CPU per node, then tcp over
    // loopback unpinned
    let shm = [("shm", Cpus::Unpinned), ("shm", Cpus::One), ("shm", Cpus::PerNode)];
    for (fabric, cpus) in shm.into_iter().chain([("tcp", Cpus::Unpinned)]) {
        let (row, r) = remote_row(args, fabric, cpus)?;
        remote.push(row);
        runs.push(r);
    }
    let mut md = String::from("# Pods\n\n");
    md.push_str(&format!(
        "Remote fault against a dormant fault, same 2-node pod, same run (memtouch {} MiB, node 0 may hold \
         16 MiB), over shm and over tcp (loopback). Times from the fault's arrival to the vCPU's wake; a \
         dormant fault zero-fills a run of pages at once, a remote fault reads one page (or a batch, read \
         ahead: below).\n\n",
        args.remote_mib
    ));
    md.push_str(&remote_md(&remote));

    let mut boot = Vec::new();
    let mut baseline = None;
    for nodes in [1u32, 2, 3] {
        for dormant in [true, false] {
            let n = nodes.to_string();
            let d = if dormant { "on" } else { "off" };
            let mut a = vec!["run", "--guest", "zeroboot", "--memory", &args.boot_memory, "--cmdline", "mib=16"];
            a.extend(["--dormant", d, "--nodes", &n, "--fabric", "shm"]);
            let r = run_pod(&a, Cpus::Unpinned)?;
            let wall = r.total.wall_seconds;
            let base = *baseline.get_or_insert(wall);
            boot.push(BootRow {
                nodes,
                dormant,
                wall_seconds: wall,
                ratio: wall / base,
                pages_zero_filled: r.total.pages_zero_filled,
                pages_copied: r.total.pages_copied,
                remote_fetches: r.total.remote_fetches,
                bytes_fabric_read: r.total.bytes_fabric_read,
                messages_sent: r.total.messages_sent,
            });
            runs.push(r);
        }
    }

    md.push_str(&format!(
        "\nFast boot: zeroboot over {} of guest memory on 1, 2 and 3 nodes (shm), dormant pages on and off.\n\n",
        args.boot_memory
    ));
    md.push_str("| nodes | dormant | wall s | ÷ 1 node dormant | pages zero-filled | pages copied | remote fetches | page bytes on the wire | messages |\n|---|---|---|---|---|---|---|---|---|\n");
    for b in &boot {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |\n",
            b.nodes,
            if b.dormant { "on" } else { "off" },
            b.wall_seconds,
            b.ratio,
            b.pages_zero_filled,
            b.pages_copied,
            b.remote_fetches,
            b.bytes_fabric_read,
            b.messages_sent
        ));
    }
    md.push_str(
        "\nThe guest's own work (zeroing every page, emulated instruction by instruction by this host's KVM) \
         dominates the wall time; the counters are exact.\n",
    );

    // eviction: a hot set smaller than the bound, a cold set larger
    let mut eviction = Vec::new();
    let cmdline = |rounds: u32| format!("mib=12 seed=3 hot=5 rounds={rounds}");
    for policy in ["fifo", "clock"] {
        let mut counts = Vec::new();
        for rounds in [0, 8] {
            let c = cmdline(rounds);
            let mut a = memtouch_args(&c, "shm", "8M");
            a.extend(["--eviction", policy]);
            let (r, stdout) = run_pod_out(&a, Cpus::Unpinned)?;
            counts.push((r.nodes[0].clone(), stdout));
            runs.push(r);
        }
        let (base, with) = (&counts[0].0, &counts[1].0);
        let stdout = counts[1].1.lines().find(|l| l.contains("hot/cold:")).unwrap_or_default();
        let pages_touched = crate::report::printed(stdout, "pages=")? as u64;
        let fetched_back = with.pages_fetched_back.saturating_sub(base.pages_fetched_back);
        eviction.push(EvictionRow {
            eviction: policy.to_string(),
            pages_touched,
            fetched_back,
            fetched_back_per_page: fetched_back as f64 / pages_touched.max(1) as f64,
            rounds_seconds: crate::report::printed(stdout, "ns=")? / 1e9,
            pages_probed: with.pages_probed,
            pages_referenced: with.pages_referenced,
        });
    }
    md.push_str(
        "\nEviction: `memtouch mib=12 hot=5 rounds=8` on 2 nodes (shm) with 8 MiB a node: after the pattern's \
         pass, 8 rounds each read the first 5 MiB again and an eighth of the other 7 MiB. Pages fetched back \
         during the rounds are the run's count less the same run without rounds; at best the hot set comes back \
         once and each cold page once (3072 pages).\n\n| eviction | pages the rounds read | fetched back | per page \
         read | rounds s | probes | probes answered |\n|---|---|---|---|---|---|---|\n",
    );
    for e in &eviction {
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.2} | {} | {} |\n",
            e.eviction,
            e.pages_touched,
            e.fetched_back,
            e.fetched_back_per_page,
            e.rounds_seconds,
            e.pages_probed,
            e.pages_referenced
        ));
    }
    // --verify-pages: each fabric's remote fault with every pulled page
    // checked, against the same run unchecked
    let mut verify: Vec<VerifyRow> = Vec::new();
    let cmdline = format!("mib={}", args.remote_mib);
    for fabric in ["shm", "tcp"] {
        for on in [false, true] {
            let mut a = vec!["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", &cmdline, "--nodes", "2"];
            a.extend(["--fabric", fabric, "--node-memory", "16M", "--verify-pages", if on { "on" } else { "off" }]);
            let r = run_pod(&a, Cpus::Unpinned)?;
            let n0 = &r.nodes[0];
            let base = verify.last().filter(|_| on).map_or(n0.fault_remote_us_p50, |v| v.remote_us_p50);
            verify.push(VerifyRow {
                fabric,
                verify: on,
                remote_fetches: r.total.remote_fetches,
                remote_us_p50: n0.fault_remote_us_p50,
                asked_us_p50: n0.fault_remote_asked_us_p50,
                direct_us_p50: n0.fault_remote_direct_us_p50,
                ratio: n0.fault_remote_us_p50 / base,
                wall_seconds: r.total.wall_seconds,
            });
            runs.push(r);
        }
    }
    md.push_str(&format!(
        "\n`--verify-pages on` (every pulled page checked against its owner's digest: one HMAC-SHA256 of 4 KiB \
         on each side of a transfer) against off, same memtouch {} MiB, 2 nodes, 16 MiB a node, unpinned. \
         A direct fault reads up to 17 pages, each checked.\n\n| fabric | --verify-pages | remote fetches | remote \
         fault p50 µs | ÷ off | asked p50 µs | direct p50 µs | wall s |\n|---|---|---|---|---|---|---|---|\n",
        args.remote_mib
    ));
    for v in &verify {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | **{:.2}** | {:.1} | {:.1} | {:.2} |\n",
            v.fabric,
            if v.verify { "on" } else { "off" },
            v.remote_fetches,
            v.remote_us_p50,
            v.ratio,
            v.asked_us_p50,
            v.direct_us_p50,
            v.wall_seconds
        ));
    }
    print!("{md}");
    report::write(out, "pod", &Report { host: Host::probe(), remote, boot, eviction, verify, runs }, &md)
}
