//! The first-touch benchmark (issue: dormant first touch no slower than
//! plain KVM first touch of anonymous memory).
//!
//! The `touch` guest writes one word per page over `--mib` MiB and times
//! that loop with the VMM's clock hypercall; the cost per page is that time
//! divided by the pages. The same guest runs on three backings, interleaved
//! rep by rep so that drift on the machine hits all alike:
//! - `anonymous`: private anonymous memory, no userfaultfd (the baseline);
//! - `dormant`: shoal's memfd under the page engine (a pod of one), dormant
//!   pages zero-filled in
//!   2 MiB fault-around batches;
//! - `contents`: the same with `--dormant off` (pages copied in).
//!
//! and each both unpinned and pinned (vCPU and fault handler on one CPU).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use serde::Serialize;
use shoal_vmm::config::{Backing, ImageSource, VmConfig};
use shoal_vmm::metrics::NodeMetrics;
use shoal_vmm::vm::{self, End};

use crate::chart::{self, Bar};
use crate::report::{self, median, Host};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// MiB the guest touches.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Guest RAM.
    #[arg(long, default_value = "512M", value_parser = |s: &str| shoal_vmm::config::parse_size(s).map_err(|e| e.to_string()))]
    memory: u64,
    /// Repetitions of each configuration.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Anonymous,
    Dormant,
    Contents,
}

#[derive(Debug, Serialize)]
struct Sample {
    ns_per_page: f64,
    pages: u64,
    metrics: NodeMetrics,
}

#[derive(Debug, Serialize)]
struct Row {
    mode: Mode,
    pinned: bool,
    ns_per_page_median: f64,
    ns_per_page_min: f64,
    ns_per_page_max: f64,
    samples: Vec<Sample>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    pinned: bool,
    dormant_over_anonymous: f64,
    contents_over_anonymous: f64,
    target: &'static str,
}

#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    command: String,
    host: Host,
    mib: u64,
    memory: u64,
    reps: usize,
    rows: Vec<Row>,
    ratios: Vec<Ratio>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn once(args: &Args, mode: Mode, pinned: bool) -> anyhow::Result<Sample> {
    let touch = shoal_guest_images::find("touch").context("the touch guest")?;
    let mut config = VmConfig::new(ImageSource::Embedded(touch), args.memory);
    config.cmdline = format!("mib={}", args.mib);
    config.pin = pinned;
    match mode {
        Mode::Anonymous => config.backing = Backing::Anonymous,
        Mode::Dormant => {}
        Mode::Contents => config.dormant = false,
    }
    let out = Capture::default();
    let outcome = vm::run(&config, Box::new(out.clone()))?;
    let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    if outcome.end != End::Exited(0) {
        bail!("{mode:?} run ended with {:?}; console:\n{text}", outcome.end);
    }
    let field = |key: &str| -> anyhow::Result<u64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in the guest's output:\n{text}"))
    };
    let pages = field("pages=")?;
    let ns = field("first_touch_ns=")?;
    Ok(Sample { ns_per_page: ns as f64 / pages as f64, pages, metrics: outcome.report.nodes[0].clone() })
}

pub fn run(args: &Args, out: &Path) -> anyhow::Result<()> {
    let modes = [Mode::Anonymous, Mode::Dormant, Mode::Contents];
    let mut samples: Vec<((Mode, bool), Vec<Sample>)> = Vec::new();
    for pinned in [false, true] {
        for mode in modes {
            samples.push(((mode, pinned), Vec::new()));
        }
    }
    for rep in 0..args.reps {
        for ((mode, pinned), list) in samples.iter_mut() {
            let s = once(args, *mode, *pinned)?;
            eprintln!("rep {rep}: {mode:?} pinned={pinned}: {:.0} ns/page", s.ns_per_page);
            list.push(s);
        }
    }
    let rows: Vec<Row> = samples
        .into_iter()
        .map(|((mode, pinned), list)| {
            let v: Vec<f64> = list.iter().map(|s| s.ns_per_page).collect();
            Row {
                mode,
                pinned,
                ns_per_page_median: median(&v),
                ns_per_page_min: v.iter().copied().fold(f64::INFINITY, f64::min),
                ns_per_page_max: v.iter().copied().fold(0.0, f64::max),
                samples: list,
            }
        })
        .collect();
    let get = |mode, pinned| rows.iter().find(|r| r.mode == mode && r.pinned == pinned).unwrap().ns_per_page_median;
    let ratios: Vec<Ratio> = [false, true]
        .into_iter()
        .map(|pinned| Ratio {
            pinned,
            dormant_over_anonymous: get(Mode::Dormant, pinned) / get(Mode::Anonymous, pinned),
            contents_over_anonymous: get(Mode::Contents, pinned) / get(Mode::Anonymous, pinned),
            target: "dormant_over_anonymous <= 1.0",
        })
        .collect();

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = format!(
        "# First touch per page: dormant vs. plain KVM\n\n`{command}`\n\n\
         Guest `touch mib={}` in {} MiB of RAM; one word written per page, timed by the guest; \
         median of {} runs per row.\n\n\
         | backing | pinned | ns/page (median) | min | max | faults | pages zero-filled | pages copied | fault p50 µs | fault p99 µs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.mib,
        args.memory >> 20,
        args.reps
    );
    for r in &rows {
        let m = &r.samples[r.samples.len() / 2].metrics;
        md.push_str(&format!(
            "| {:?} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {:.0} | {:.0} |\n",
            r.mode,
            if r.pinned { "yes" } else { "no" },
            r.ns_per_page_median,
            r.ns_per_page_min,
            r.ns_per_page_max,
            m.faults,
            m.pages_zero_filled,
            m.pages_copied,
            m.fault_us_p50,
            m.fault_us_p99
        ));
    }
    md.push_str("\n| pinned | dormant ÷ anonymous (target ≤ 1.0) | contents ÷ anonymous |\n|---|---:|---:|\n");
    for r in &ratios {
        md.push_str(&format!(
            "| {} | {:.2} | {:.2} |\n",
            if r.pinned { "yes" } else { "no" },
            r.dormant_over_anonymous,
            r.contents_over_anonymous
        ));
    }
    print!("{md}");
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: format!("{:?}{}", r.mode, if r.pinned { ", pinned" } else { "" }),
            value: r.ns_per_page_median / 1000.0,
        })
        .collect();
    let svg = chart::bars("First touch per 4 KiB page (median)", "µs", &bars);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("fault.svg"), svg)?;
    md.push_str("\n![chart](fault.svg)\n");
    let results = Results {
        bench: "fault",
        command,
        host: Host::probe(),
        mib: args.mib,
        memory: args.memory,
        reps: args.reps,
        rows,
        ratios,
    };
    report::write(out, "fault", &results, &md)
}
