//! Writing results: JSON for machines, Markdown for people.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Median of a non-empty list.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The number after `key` (as in `key=123`) in what a guest printed.
pub fn printed(stdout: &str, key: &str) -> anyhow::Result<f64> {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in the guest's output:\n{stdout}"))
}

/// Facts about the machine a result came from.
#[derive(Debug, Serialize)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kvm_module: String,
}

impl Host {
    pub fn probe() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let kvm_module = modules
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .find(|m| m.starts_with("kvm_"))
            .unwrap_or("kvm (built in or unknown)")
            .to_string();
        Host { kernel, cpus: std::thread::available_parallelism().map_or(1, |n| n.get()), cpu_model, kvm_module }
    }
}

/// Writes `name.json` and `name.md` under `out`.
pub fn write(out: &Path, name: &str, json: &impl Serialize, markdown: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let j = out.join(format!("{name}.json"));
    std::fs::write(&j, serde_json::to_string_pretty(json)? + "\n")
        .with_context(|| format!("writing {}", j.display()))?;
    let m = out.join(format!("{name}.md"));
    std::fs::write(&m, markdown).with_context(|| format!("writing {}", m.display()))?;
    eprintln!("shoal-bench: wrote {} and {}", j.display(), m.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
