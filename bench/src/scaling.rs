//! Dormant first touch as vCPUs grow, on one node: `touch` on every vCPU,
//! each its own slice of memory, 1, 2, 4, 8 and 16 vCPUs on this machine's
//! 2 cores, pinned (vCPU i and fault handler i on CPU i mod 2) and not.
//! Aggregate throughput (pages the vCPUs first-touched ÷ the slowest
//! vCPU's time) beside the 2-vCPU run's (target: 16 vCPUs ≥ 0.9× of 2:
//! no collapse), with the fault counters beside each.

use std::path::Path;

use serde::Serialize;

use crate::pod::{run_pod_out, RunResult};
use crate::report::{self, printed, Host};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// MiB each vCPU touches.
    #[arg(long, default_value_t = 16)]
    mib: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    vcpus: u32,
    pinned: bool,
    pages: u64,
    /// The slowest vCPU's first-touch time.
    ms: f64,
    pages_per_s: f64,
    /// ÷ the 2-vCPU run's throughput (same pinning).
    ratio_to_2: f64,
    faults: u64,
    pages_zero_filled: u64,
    fault_us_p50: f64,
    fault_us_p99: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    host: Host,
    rows: Vec<Row>,
    runs: Vec<RunResult>,
}

pub fn run(args: &Args, out: &Path) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let cmdline = format!("mib={}", args.mib);
    for pinned in [false, true] {
        let mut two = None;
        for vcpus in [1u32, 2, 4, 8, 16] {
            let n = vcpus.to_string();
            let memory = format!("{}M", args.mib * u64::from(vcpus) + 64);
            let mut a = vec!["run", "--guest", "touch", "--cmdline", &cmdline, "--cpus", &n, "--memory", &memory];
            if pinned {
                a.push("--pin");
            }
            let (r, stdout) = run_pod_out(&a, crate::pod::Cpus::Unpinned)?;
            let pages = printed(&stdout, "pages=")? as u64;
            let ns = printed(&stdout, "first_touch_ns=")?;
            let pages_per_s = pages as f64 / (ns / 1e9);
            if vcpus == 2 {
                two = Some(pages_per_s);
            }
            let t = &r.total;
            rows.push(Row {
                vcpus,
                pinned,
                pages,
                ms: ns / 1e6,
                pages_per_s,
                ratio_to_2: two.map_or(f64::NAN, |b| pages_per_s / b),
                faults: t.faults,
                pages_zero_filled: t.pages_zero_filled,
                fault_us_p50: t.fault_us_p50,
                fault_us_p99: t.fault_us_p99,
            });
            runs.push(r);
        }
    }
    let mut md = String::from("# Dormant first touch as vCPUs grow (one node)\n\n");
    md.push_str(&format!(
        "`target/release/shoal-bench scaling` — `touch mib={}` on every vCPU (each its own slice), this \
         machine's CPUs: {}. Throughput = pages first-touched ÷ the slowest vCPU's time.\n\n",
        args.mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    md.push_str("| vCPUs | pinned | pages | ms | pages/s | ÷ 2 vCPUs | faults | pages zero-filled | fault p50 µs | fault p99 µs |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.0} | **{:.2}** | {} | {} | {:.1} | {:.1} |\n",
            r.vcpus,
            if r.pinned { "yes" } else { "no" },
            r.pages,
            r.ms,
            r.pages_per_s,
            r.ratio_to_2,
            r.faults,
            r.pages_zero_filled,
            r.fault_us_p50,
            r.fault_us_p99
        ));
    }
    md.push_str("\nTarget: 16 vCPUs ≥ 0.9 × the throughput of 2 (no collapse as vCPUs outnumber cores).\n");
    print!("{md}");
    report::write(out, "scaling", &Report { host: Host::probe(), rows, runs }, &md)
}
