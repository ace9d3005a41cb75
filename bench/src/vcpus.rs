//! vCPUs across nodes, each beside a baseline of the same run, with the
//! counters next to every time:
//!
//! - **write ping-pong**: `sharing` with the writer on node 0 and a reader
//!   on node 1 (polling): per round, the pages that moved and the time,
//!   beside the shm fabric's 4 KiB read floor measured in this process.
//! - **IPI round trip**: the same with `ipi=1` (write, IPI across nodes,
//!   the reader wakes, reads, acknowledges).
//! - **vCPU migration**: `migrate` touring two nodes, the guest timing
//!   each move and a remote write fault after it, warm and cold (target: a
//!   move ≤ 2× a remote fault), and the engine's own fault time beside.
//! - **smp** on 1, 2 and 3 nodes (3 vCPUs), migration on and off: wall
//!   time beside the ownership transfers of the shared counter's page.
//! - **following data**: `migrate mode=1` (data written on node 1, read
//!   from node 0) with migration off and on: read time and pages pulled.
//! - **data-parallel**: `touch` on 3 vCPUs, each first-touching and
//!   reading back its own 8 MiB, on 1, 2 and 3 nodes, migration off and
//!   on: wall time beside one node's, with the pages that crossed (none
//!   should: every vCPU's data is dormant until it touches it).
//!
//! The ping-pong, IPI and migration runs are unpinned, again with the
//! whole pod on one CPU (`taskset -c 0`: the threads handing a fault or a
//! message to each other cannot wake each other across CPUs), as the
//! fault bench does, and with each node's process on a CPU of its own (as
//! on a cluster, where every node is a host; started from a pod file).

use std::path::Path;

use anyhow::bail;
use serde::Serialize;

use crate::pod::{run_pod_out, Cpus, RunResult};
use crate::report::{self, printed, Host};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds of the ping-pong and IPI runs.
    #[arg(long, default_value_t = 200)]
    rounds: u64,
    /// Tours of the migration run (each moves the vCPU twice; odd ones
    /// are timed cold, even ones warm).
    #[arg(long, default_value_t = 80)]
    tours: u64,
    /// Increments per vCPU in the smp runs.
    #[arg(long, default_value_t = 20000)]
    iters: u64,
    /// MiB each vCPU of the data-parallel runs touches.
    #[arg(long, default_value_t = 8)]
    touch_mib: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    what: String,
    cpus: Cpus,
    /// The measured time (µs): per round, per move, or the run's wall time.
    us: f64,
    /// The baseline of the same run (µs) and the ratio.
    baseline_us: f64,
    ratio: f64,
    baseline: String,
    remote_fetches: u64,
    ownership_transfers: u64,
    pages_shared: u64,
    invalidations: u64,
    vcpu_migrations: u64,
    ipis_sent: u64,
    /// Protocol transactions that moved a page or changed who may write
    /// it: read copies made, ownership transfers, in-place upgrades.
    transfers: u64,
    bytes_fabric_read: u64,
}

/// The ping-pong per transfer: a round's time spread over the page
/// transactions it took (counted), beside the same run's remote read
/// fault and the fabric's read floor.
#[derive(Debug, Serialize)]
struct PerTransfer {
    what: String,
    cpus: Cpus,
    rounds: u64,
    round_us: f64,
    transfers_per_round: f64,
    us_per_transfer: f64,
    remote_read_fault_us_p50: f64,
    upgrade_fault_us_p50: f64,
    floor_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    host: Host,
    shm_read_floor_us: f64,
    rows: Vec<Row>,
    per_transfer: Vec<PerTransfer>,
    runs: Vec<RunResult>,
}

fn row(what: &str, r: &RunResult, us: f64, baseline_us: f64, baseline: &str) -> Row {
    let t = &r.total;
    Row {
        what: what.to_string(),
        cpus: r.cpus,
        us,
        baseline_us,
        ratio: us / baseline_us,
        baseline: baseline.to_string(),
        remote_fetches: t.remote_fetches,
        ownership_transfers: t.ownership_transfers,
        pages_shared: t.pages_shared,
        invalidations: t.invalidations,
        vcpu_migrations: t.vcpu_migrations_out,
        ipis_sent: t.ipis_sent,
        transfers: t.pages_shared + t.ownership_transfers + t.faults_upgrade,
        bytes_fabric_read: t.bytes_fabric_read,
    }
}

pub fn run(args: &Args, out: &Path) -> anyhow::Result<()> {
    let floor = crate::fabric::read_floor_us(shoal_fabric::Kind::Shm)?;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let mut moves = Vec::new();
    let mut per_transfer = Vec::new();
    let pod = ["--memory", "64M", "--fabric", "shm", "--migration", "off"];
    for cpus in [Cpus::Unpinned, Cpus::One, Cpus::PerNode] {
        // write ping-pong and IPI round trip: writer on node 0, reader on 1.
        // A polling round costs milliseconds on a 2-CPU host: two spinning
        // vCPU threads and both nodes' service threads share the CPUs, and
        // `perf sched latency` showed the fabric's reader threads waiting
        // up to ~4.7 ms to run. vCPU threads at SCHED_IDLE (tried) halved
        // it unpinned and changed nothing on one CPU: not kept.
        for ipi in [0, 1] {
            let cmdline = format!("rounds={} ipi={ipi}", args.rounds);
            let mut a = vec!["run", "--guest", "sharing", "--cmdline", &cmdline, "--cpus", "2", "--nodes", "2"];
            a.extend(pod);
            let (r, stdout) = run_pod_out(&a, cpus)?;
            let us = printed(&stdout, "round_trip_ns=")? / 1000.0;
            let what = if ipi == 1 { "IPI round trip (write, IPI, read, ack)" } else { "write ping-pong round" };
            let rw = row(what, &r, us, floor, "shm 4 KiB read");
            let per_round = rw.transfers as f64 / args.rounds as f64;
            per_transfer.push(PerTransfer {
                what: what.to_string(),
                cpus,
                rounds: args.rounds,
                round_us: us,
                transfers_per_round: per_round,
                us_per_transfer: if per_round > 0.0 { us / per_round } else { 0.0 },
                remote_read_fault_us_p50: r.nodes.iter().map(|n| n.fault_remote_read_us_p50).fold(0.0, f64::max),
                upgrade_fault_us_p50: r.nodes.iter().map(|n| n.fault_upgrade_us_p50).fold(0.0, f64::max),
                floor_us: floor,
            });
            rows.push(rw);
            runs.push(r);
        }
        // a move against a remote write fault, both timed by the guest's
        // clock, warm and cold (see the migrate guest); the tour reads its
        // 1 MiB after every move, pulling read copies from the other node
        let cmdline = format!("mode=0 mib=1 rounds={}", args.tours);
        let mut a = vec!["run", "--guest", "migrate", "--cmdline", &cmdline, "--nodes", "2"];
        a.extend(pod);
        let (r, stdout) = run_pod_out(&a, cpus)?;
        let us = |key: &str| printed(&stdout, key).map(|ns| ns / 1000.0);
        let (move_warm, move_cold) = (us("move_warm_p50_ns=")?, us("move_cold_p50_ns=")?);
        let (fault_warm, fault_cold) = (us("fault_warm_p50_ns=")?, us("fault_cold_p50_ns=")?);
        let (move_all, clock) = (us("move_p50_ns=")?, us("clock_p50_ns=")?);
        let engine = r.nodes.iter().map(|n| n.fault_remote_write_us_p50).fold(0.0, f64::max);
        if fault_warm == 0.0 || fault_cold == 0.0 || engine == 0.0 {
            bail!("the migration run had no remote write fault to compare with:\n{stdout}");
        }
        // the guest's timed writes are ownership transfers only if the
        // pod counted (at least) two per move
        let t = &r.total;
        if t.ownership_transfers < 2 * t.vcpu_migrations_out {
            bail!(
                "{} ownership transfers for {} moves: the timed writes were not remote faults",
                t.ownership_transfers,
                t.vcpu_migrations_out
            );
        }
        rows.push(row(
            "vCPU migration (per move), warm",
            &r,
            move_warm,
            fault_warm,
            "remote write fault, warm, guest-timed",
        ));
        rows.push(row(
            "vCPU migration (per move), cold",
            &r,
            move_cold,
            fault_cold,
            "remote write fault, cold, guest-timed",
        ));
        rows.push(row("vCPU migration (per move), all", &r, move_all, engine, "remote write fault p50, engine-timed"));
        moves.push(format!(
            "| {} | {move_warm:.1} | {fault_warm:.1} | **{:.2}** | {move_cold:.1} | {fault_cold:.1} | **{:.2}** | \
             {engine:.1} | {clock:.1} | {:.1} | {:.1} | {} of {} |\n",
            cpus.label(),
            move_warm / fault_warm,
            move_cold / fault_cold,
            t.vcpu_capture_us_p50,
            t.vcpu_restore_us_p50,
            t.pages_prefetched,
            t.vcpu_migrations_in
        ));
        runs.push(r);
    }
    // smp on 1, 2, 3 nodes, migration on and off
    let cmdline = format!("iters={}", args.iters);
    let mut base = None;
    for nodes in [1u32, 2, 3] {
        for migration in ["off", "on"] {
            let n = nodes.to_string();
            let mut a = vec!["run", "--guest", "smp", "--cmdline", &cmdline, "--cpus", "3", "--memory", "64M"];
            a.extend(["--nodes", &n, "--migration", migration]);
            if nodes > 1 {
                a.extend(["--fabric", "shm"]);
            }
            let (r, _) = run_pod_out(&a, Cpus::Unpinned)?;
            let us = r.total.wall_seconds * 1e6;
            let b = *base.get_or_insert(us);
            rows.push(row(&format!("smp, 3 vCPUs on {nodes} node(s), migration {migration}"), &r, us, b, "1 node"));
            runs.push(r);
        }
    }
    // data on another node: follow it or pull it
    let mut base = None;
    for migration in ["off", "on"] {
        let mut a = vec!["run", "--guest", "migrate", "--cmdline", "mode=1 mib=8 rounds=2", "--nodes", "2"];
        a.extend(["--memory", "64M", "--fabric", "shm", "--migration", migration]);
        let (r, stdout) = run_pod_out(&a, Cpus::Unpinned)?;
        let us = printed(&stdout, "read_ns=")? / 1000.0;
        let b = *base.get_or_insert(us);
        rows.push(row(&format!("read 8 MiB written on node 1, migration {migration}"), &r, us, b, "migration off"));
        runs.push(r);
    }

    // data-parallel: every vCPU first-touches its own slice, wherever it
    // runs; nothing should cross the fabric
    let cmdline = format!("mib={}", args.touch_mib);
    let mut base = None;
    for nodes in [1u32, 2, 3] {
        for migration in ["off", "on"] {
            let n = nodes.to_string();
            let mut a = vec!["run", "--guest", "touch", "--cmdline", &cmdline, "--cpus", "3", "--memory", "128M"];
            a.extend(["--nodes", &n, "--migration", migration]);
            if nodes > 1 {
                a.extend(["--fabric", "shm"]);
            }
            let (r, stdout) = run_pod_out(&a, Cpus::Unpinned)?;
            if !stdout.contains("bad=0") {
                bail!("touch did not read back what it wrote:\n{stdout}");
            }
            let us = r.total.wall_seconds * 1e6;
            let b = *base.get_or_insert(us);
            let what = format!("touch, 3 vCPUs x {} MiB on {nodes} node(s), migration {migration}", args.touch_mib);
            rows.push(row(&what, &r, us, b, "1 node"));
            runs.push(r);
        }
    }

    let mut md = String::from("# vCPUs across nodes\n\n");
    md.push_str(&format!(
        "`target/release/shoal-bench vcpus` — pods over shm; the shm fabric's 4 KiB read floor in this run: \
         {floor:.2} µs. Counters are the pod's totals for the whole run.\n\n"
    ));
    md.push_str(
        "| what | CPUs | µs | baseline | baseline µs | ratio | remote fetches | ownership transfers | read copies | \
         invalidations | vCPU moves | IPIs across nodes | page bytes read |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {:.1} | **{:.2}** | {} | {} | {} | {} | {} | {} | {} |\n",
            r.what,
            r.cpus.label(),
            r.us,
            r.baseline,
            r.baseline_us,
            r.ratio,
            r.remote_fetches,
            r.ownership_transfers,
            r.pages_shared,
            r.invalidations,
            r.vcpu_migrations,
            r.ipis_sent,
            r.bytes_fabric_read
        ));
    }
    md.push_str(
        "\nA round of the ping-pong moves several pages (the shared page to the writer, a read copy to the \
         reader, the reader's acknowledgement page back to a read copy on the writer), each a protocol round \
         trip: compare its counters. The migration rows' target is a move ≤ 2× a remote fault.\n",
    );
    md.push_str(
        "\n## A move beside a remote fault\n\nThe `migrate` tour times, by the guest's clock, each move and, after \
         it, two writes to pages the other node wrote last (each a remote write fault: an ownership transfer), \
         p50s. Waking an idle CPU is slow on a virtual host, so what the pod did just before weighs as much as \
         the work: *warm* is right after the other node worked for this vCPU (the second write, after the first; \
         a move of an even round, after the writes), *cold* after the other node sat idle for as long as the guest \
         checksums its 1 MiB (tens of ms: the first write, after the checksum; a move of an odd round, after the \
         guest spun without exits for as long as its last checksum took). \
         Both sides of each ratio include one clock read (its cost below). Three layouts of the pod's \
         threads: unpinned, all on one CPU (every hand-off between threads waits for the CPU, so the stack \
         page's transfer, otherwise beside the capture, adds to a move), and each node's process on a CPU of \
         its own (as on a cluster). The engine-timed fault is the \
         nodes' own p50 of a remote write fault, from the fault's read off userfaultfd to its wake: it leaves \
         out the wakes around a fault that the guest waits for. Capture and restore are a move's KVM ioctls \
         (metrics); the stack page is asked for ahead, while the state is captured, sent and restored.\n\n\
         | CPUs | move warm µs | fault warm µs | ratio | move cold µs | fault cold µs | ratio | engine fault µs | \
         clock read µs | capture µs | restore µs | stack page prefetched |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in &moves {
        md.push_str(m);
    }
    md.push_str(
        "\n## The ping-pong per transfer\n\nA transfer is one page transaction of the protocol: a read copy \
         made, an ownership transfer, or an upgrade in place (the writer's read copy made writable after the \
         other copies are invalidated), each counted by the nodes. Beside it, the same run's p50 remote read \
         fault and upgrade fault (from the nodes' metrics: the protocol's own time for one) and the shm read \
         floor.\n\n| what | CPUs | round µs | transfers per round | µs per transfer | remote read fault p50 µs | \
         upgrade fault p50 µs | shm read floor µs |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &per_transfer {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            p.what,
            p.cpus.label(),
            p.round_us,
            p.transfers_per_round,
            p.us_per_transfer,
            p.remote_read_fault_us_p50,
            p.upgrade_fault_us_p50,
            p.floor_us
        ));
    }
    print!("{md}");
    report::write(
        out,
        "vcpus",
        &Report { host: Host::probe(), shm_read_floor_us: floor, rows, per_transfer, runs },
        &md,
    )
}
