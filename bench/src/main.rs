//! `shoal-bench`: shoal's benchmarks. Each prints a Markdown table and
//! writes `bench/results/<name>.json` and `.md` (and an SVG chart): ratios
//! against a baseline measured in the same run, with the exact counters
//! beside every timing.

mod chart;
mod fabric;
mod fault;
mod pod;
mod report;
mod scaling;
mod vcpus;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "shoal-bench", about = "shoal's benchmarks")]
struct Cli {
    /// Where to write the results.
    #[arg(long, global = true, default_value = "bench/results")]
    out: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// First touch per page: dormant zero-fill through the page engine against
    /// plain KVM first touch of anonymous memory (no userfaultfd), same
    /// guest, same run, threads pinned and unpinned.
    Fault(fault::Args),
    /// 4 KiB read latency and batched throughput per fabric backend, beside
    /// memcpy (shm's floor) and perftest (verbs) in the same run.
    Fabric(fabric::Args),
    /// Pods: a remote fault over shm against a dormant fault in the same
    /// run; fast boot on 1, 2 and 3 nodes with dormant pages on and off.
    Pod(pod::Args),
    /// vCPUs across nodes: write ping-pong, IPI round trip, migration
    /// beside a remote fault, smp on 1-3 nodes, following data.
    Vcpus(vcpus::Args),
    /// Dormant first touch on one node with 1 to 16 vCPUs: does fault
    /// throughput hold as vCPUs outnumber cores?
    Scaling(scaling::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Fault(args) => fault::run(&args, &cli.out),
        Bench::Fabric(args) => fabric::run(&args, &cli.out),
        Bench::Pod(args) => pod::run(&args, &cli.out),
        Bench::Vcpus(args) => vcpus::run(&args, &cli.out),
        Bench::Scaling(args) => scaling::run(&args, &cli.out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
