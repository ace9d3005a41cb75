//! Counters and the metrics report: a one-line summary at exit and, with
//! `--metrics-json FILE`, `{"total": {...}, "nodes": [{...}, ...]}`.
//!
//! Counters are exact (pages, bytes, faults); latencies come from a
//! histogram of fault-resolution times the page engine measures, from a
//! fault's arrival to the wake of its vCPU.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;

/// Fault-resolution latencies.
#[derive(Debug)]
pub struct FaultLatency(Histogram<u64>);

impl Default for FaultLatency {
    fn default() -> Self {
        // 1 ns to 60 s, 3 significant digits
        FaultLatency(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"))
    }
}

impl FaultLatency {
    /// Records one resolution.
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }

    /// Adds another thread's record.
    pub fn merge(&mut self, other: &FaultLatency) {
        // both histograms have the same bounds, so this cannot fail
        let _ = self.0.add(&other.0);
    }

    /// Resolutions recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile in microseconds (0 when nothing was recorded).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }
}

/// What one node reports (pod nodes send theirs to node 0 as JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeMetrics {
    /// The node's id; absent in the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub faults: u64,
    pub faults_already_resident: u64,
    pub pages_zero_filled: u64,
    pub pages_copied: u64,
    pub pages_loaded: u64,
    /// Pages the loader wrote all zeros: punched out, left dormant (not
    /// in `pages_loaded`).
    pub pages_loaded_zero: u64,
    pub pages_resident: u64,
    /// Kept for the report's shape; always 0: the page engine treats a
    /// page the kernel holds against its record as an error.
    pub pages_found_present: u64,
    /// Pages read from peers with one-sided fabric reads.
    pub remote_fetches: u64,
    /// Page bytes those reads moved (4096 per remote fetch).
    pub bytes_fabric_read: u64,
    /// Pages handed to another node over --node-memory.
    pub pages_evicted: u64,
    /// Pages made dormant again, their memory freed on this node: all-zero
    /// pages evicted without moving, and pages the guest freed (reported
    /// to the balloon) that this node held.
    pub pages_redormanted: u64,
    /// Pages the guest reported free (virtio-balloon free page reporting,
    /// on the node whose device got the report); each became dormant.
    pub pages_reported: u64,
    /// Pages a vCPU's fault brought from another node, kept until that
    /// vCPU had used them (holds), and messages that waited for a hold.
    pub pages_held: u64,
    pub messages_held: u64,
    /// How holds ended, when a message found them: an exit of the vCPU,
    /// 2 ms of its thread's CPU time, it halted, it faulted on the page
    /// again, it waited for another page and a lower node asked, or 50 ms
    /// passed.
    pub holds_exited: u64,
    pub holds_ran: u64,
    pub holds_slept: u64,
    pub holds_refault: u64,
    pub holds_yielded: u64,
    pub holds_expired: u64,
    /// Faults that waited for an eviction to make room.
    pub faults_parked: u64,
    /// Page-protocol messages sent and received.
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Bytes the memfd holds at the end (the kernel's count).
    pub memfd_bytes: u64,
    /// Peak resident set of the node's process (VmHWM).
    pub peak_rss_bytes: u64,
    /// Memory the node's process has pinned at the end (VmPin: over verbs
    /// its registrations, the transport's own buffers among them).
    pub pinned_bytes: u64,
    /// Over verbs: pages exposed to peers' reads (each a registration of
    /// that page alone), exposures ended (deregistered before the page was
    /// freed), and the time both took, in microseconds all told.
    pub exposures: u64,
    pub exposures_ended: u64,
    pub exposure_us: f64,
    /// Over verbs: 2 MiB chunks registered for reads that named no
    /// exposure (a pod refuses them: 0).
    pub chunks_registered: u64,
    /// Sends a peer's socket had no room for at once: they waited in a
    /// backlog the fabric wrote from another thread.
    pub sends_deferred: u64,
    /// Messages handled on the fabric's receiving thread (shm), without
    /// the hand-off to the node's receiver thread.
    pub messages_tapped: u64,
    /// Node 0: the bytes of the vmlinux this host decompressed from a
    /// bzImage to enter it through its PVH entry (0: the guest's own
    /// decompressor ran, or no Linux guest).
    pub kernel_decompressed_bytes: u64,
    pub vcpu_exits: u64,
    pub wall_seconds: f64,
    pub fault_us_p50: f64,
    pub fault_us_p99: f64,
    pub fault_us_max: f64,
    /// Pods, node 0: faults resolved by zero-filling dormant pages (with
    /// or without a grant's round trip) and by a one-sided read of a page
    /// with contents, each with its resolution time.
    pub faults_zero: u64,
    pub fault_zero_us_p50: f64,
    pub fault_zero_us_p99: f64,
    pub faults_remote: u64,
    pub fault_remote_us_p50: f64,
    pub fault_remote_us_p99: f64,
    /// Remote faults split by what the guest did (a read takes a read
    /// copy, a write the page), and upgrades of a read copy held here.
    pub faults_remote_read: u64,
    pub fault_remote_read_us_p50: f64,
    pub faults_remote_write: u64,
    pub fault_remote_write_us_p50: f64,
    pub faults_upgrade: u64,
    pub fault_upgrade_us_p50: f64,
    /// Where a remote fault's time goes (p50 of each phase): waiting for
    /// the owner's answer (the request to the home, the home to the owner,
    /// the owner protecting its copy and answering), the one-sided read,
    /// the map into the guest view, and the rest to the wake.
    pub fault_remote_owner_us_p50: f64,
    pub fault_remote_fabric_read_us_p50: f64,
    pub fault_remote_map_us_p50: f64,
    pub fault_remote_rest_us_p50: f64,
    /// Remote faults served with no message on their way: the page was
    /// parked at a peer (an eviction's target) and this node, its home,
    /// read it at once. The rest asked the home or the owner first.
    pub faults_remote_direct: u64,
    pub fault_remote_direct_us_p50: f64,
    pub faults_remote_asked: u64,
    pub fault_remote_asked_us_p50: f64,
    /// Read copies of pages made here (fetched or zero-filled).
    pub pages_shared: u64,
    /// Read copies dropped here because a writer elsewhere, or an owner
    /// evicting the page, needed them gone (counted when the page's home
    /// is another node).
    pub invalidations: u64,
    /// Read copies dropped here to stay within `--node-memory` (nothing
    /// moves: the owner keeps the page; the home takes this node off the
    /// readers).
    pub read_copies_dropped: u64,
    /// Pages that became this node's by a transfer from another node.
    pub ownership_transfers: u64,
    /// Pages asked for ahead of a fault: the stack page of a vCPU that
    /// arrived (asked for while its state is restored), and the pages
    /// after a vCPU's run of sequential direct remote faults (read in the
    /// same batch as the fault's own page, and mapped).
    pub pages_prefetched: u64,
    /// Of the pages read ahead of a run, those the run went through: its
    /// next fault was the page right after them (mapped pages leave no
    /// trace of a touch; a run that stops leaves its last ones unused).
    pub prefetched_used: u64,
    /// The clock's probes (pages taken out of the guest view to see if the
    /// guest wants them), those the guest touched again (spared once
    /// more), and pages fetched back after this node evicted them.
    pub pages_probed: u64,
    pub pages_referenced: u64,
    pub pages_fetched_back: u64,
    /// vCPUs on this node at the end.
    pub vcpus: u64,
    /// vCPUs that moved here from another node, and away from here.
    pub vcpu_migrations_in: u64,
    pub vcpu_migrations_out: u64,
    /// p50 of capturing a leaving vCPU's state and of restoring an
    /// arriving one's (KVM ioctls: the part of a move no fabric is in).
    pub vcpu_capture_us_p50: f64,
    pub vcpu_restore_us_p50: f64,
    /// IPIs vCPUs here sent to vCPUs on other nodes, and IPIs that came
    /// from other nodes for vCPUs here.
    pub ipis_sent: u64,
    pub ipis_received: u64,
}

impl NodeMetrics {
    /// A node's metrics with only its latencies filled in.
    pub fn collect_latency(node: u64, latency: &FaultLatency) -> Self {
        NodeMetrics {
            node: Some(node),
            fault_us_p50: latency.quantile_us(0.50),
            fault_us_p99: latency.quantile_us(0.99),
            fault_us_max: latency.quantile_us(1.0),
            ..Default::default()
        }
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub total: NodeMetrics,
    pub nodes: Vec<NodeMetrics>,
}

impl Report {
    /// Sums the counters; latencies of the total are the worst node's.
    pub fn new(nodes: Vec<NodeMetrics>) -> Self {
        let mut t = NodeMetrics::default();
        for n in &nodes {
            t.faults += n.faults;
            t.faults_already_resident += n.faults_already_resident;
            t.pages_zero_filled += n.pages_zero_filled;
            t.pages_copied += n.pages_copied;
            t.pages_loaded += n.pages_loaded;
            t.pages_loaded_zero += n.pages_loaded_zero;
            t.pages_resident += n.pages_resident;
            t.pages_found_present += n.pages_found_present;
            t.remote_fetches += n.remote_fetches;
            t.bytes_fabric_read += n.bytes_fabric_read;
            t.pages_evicted += n.pages_evicted;
            t.pages_redormanted += n.pages_redormanted;
            t.pages_reported += n.pages_reported;
            t.pages_held += n.pages_held;
            t.messages_held += n.messages_held;
            t.holds_exited += n.holds_exited;
            t.holds_ran += n.holds_ran;
            t.holds_slept += n.holds_slept;
            t.holds_refault += n.holds_refault;
            t.holds_yielded += n.holds_yielded;
            t.holds_expired += n.holds_expired;
            t.faults_parked += n.faults_parked;
            t.messages_sent += n.messages_sent;
            t.messages_received += n.messages_received;
            t.memfd_bytes += n.memfd_bytes;
            t.peak_rss_bytes += n.peak_rss_bytes;
            t.pinned_bytes += n.pinned_bytes;
            t.exposures += n.exposures;
            t.exposures_ended += n.exposures_ended;
            t.exposure_us += n.exposure_us;
            t.chunks_registered += n.chunks_registered;
            t.sends_deferred += n.sends_deferred;
            t.messages_tapped += n.messages_tapped;
            t.kernel_decompressed_bytes += n.kernel_decompressed_bytes;
            t.vcpu_exits += n.vcpu_exits;
            t.wall_seconds = t.wall_seconds.max(n.wall_seconds);
            t.fault_us_p50 = t.fault_us_p50.max(n.fault_us_p50);
            t.fault_us_p99 = t.fault_us_p99.max(n.fault_us_p99);
            t.fault_us_max = t.fault_us_max.max(n.fault_us_max);
            t.faults_zero += n.faults_zero;
            t.faults_remote += n.faults_remote;
            t.fault_zero_us_p50 = t.fault_zero_us_p50.max(n.fault_zero_us_p50);
            t.fault_zero_us_p99 = t.fault_zero_us_p99.max(n.fault_zero_us_p99);
            t.fault_remote_us_p50 = t.fault_remote_us_p50.max(n.fault_remote_us_p50);
            t.fault_remote_us_p99 = t.fault_remote_us_p99.max(n.fault_remote_us_p99);
            t.faults_remote_read += n.faults_remote_read;
            t.fault_remote_read_us_p50 = t.fault_remote_read_us_p50.max(n.fault_remote_read_us_p50);
            t.faults_remote_write += n.faults_remote_write;
            t.fault_remote_write_us_p50 = t.fault_remote_write_us_p50.max(n.fault_remote_write_us_p50);
            t.faults_upgrade += n.faults_upgrade;
            t.fault_remote_owner_us_p50 = t.fault_remote_owner_us_p50.max(n.fault_remote_owner_us_p50);
            t.fault_remote_fabric_read_us_p50 =
                t.fault_remote_fabric_read_us_p50.max(n.fault_remote_fabric_read_us_p50);
            t.fault_remote_map_us_p50 = t.fault_remote_map_us_p50.max(n.fault_remote_map_us_p50);
            t.fault_remote_rest_us_p50 = t.fault_remote_rest_us_p50.max(n.fault_remote_rest_us_p50);
            t.faults_remote_direct += n.faults_remote_direct;
            t.fault_remote_direct_us_p50 = t.fault_remote_direct_us_p50.max(n.fault_remote_direct_us_p50);
            t.faults_remote_asked += n.faults_remote_asked;
            t.fault_remote_asked_us_p50 = t.fault_remote_asked_us_p50.max(n.fault_remote_asked_us_p50);
            t.fault_upgrade_us_p50 = t.fault_upgrade_us_p50.max(n.fault_upgrade_us_p50);
            t.pages_shared += n.pages_shared;
            t.invalidations += n.invalidations;
            t.read_copies_dropped += n.read_copies_dropped;
            t.ownership_transfers += n.ownership_transfers;
            t.pages_prefetched += n.pages_prefetched;
            t.prefetched_used += n.prefetched_used;
            t.pages_probed += n.pages_probed;
            t.pages_referenced += n.pages_referenced;
            t.pages_fetched_back += n.pages_fetched_back;
            t.vcpus += n.vcpus;
            t.vcpu_migrations_in += n.vcpu_migrations_in;
            t.vcpu_migrations_out += n.vcpu_migrations_out;
            t.vcpu_capture_us_p50 = t.vcpu_capture_us_p50.max(n.vcpu_capture_us_p50);
            t.vcpu_restore_us_p50 = t.vcpu_restore_us_p50.max(n.vcpu_restore_us_p50);
            t.ipis_sent += n.ipis_sent;
            t.ipis_received += n.ipis_received;
        }
        Report { total: t, nodes }
    }

    /// The one-line summary printed at exit.
    pub fn summary(&self) -> String {
        let t = &self.total;
        format!(
            "shoal: {:.3} s, {} faults (p50 {:.1} us, p99 {:.1} us), {} pages zero-filled, {} copied, \
             {} resident ({} MiB), {} remote fetches ({} bytes read over the fabric)",
            t.wall_seconds,
            t.faults,
            t.fault_us_p50,
            t.fault_us_p99,
            t.pages_zero_filled,
            t.pages_copied,
            t.pages_resident,
            (t.pages_resident * PAGE_SIZE) >> 20,
            t.remote_fetches,
            t.bytes_fabric_read
        )
    }
}

/// Peak resident set size of this process, from /proc/self/status.
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// Memory this process has pinned (RDMA registrations), from
/// /proc/self/status.
pub fn pinned_bytes() -> u64 {
    status_bytes("VmPin:")
}

fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_counters_and_take_worst_latency() {
        let a =
            NodeMetrics { node: Some(0), faults: 3, pages_zero_filled: 100, fault_us_p99: 5.0, ..Default::default() };
        let b =
            NodeMetrics { node: Some(1), faults: 4, pages_zero_filled: 50, fault_us_p99: 9.0, ..Default::default() };
        let r = Report::new(vec![a, b]);
        assert_eq!(r.total.faults, 7);
        assert_eq!(r.total.pages_zero_filled, 150);
        assert_eq!(r.total.fault_us_p99, 9.0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(json["total"]["faults"], 7);
        assert!(json["total"].get("node").is_none());
        assert_eq!(json["nodes"][1]["node"], 1);
    }

    #[test]
    fn latency_quantiles() {
        let mut l = FaultLatency::default();
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert!((l.quantile_us(0.5) - 50.0).abs() < 0.1);
        assert!((l.quantile_us(0.99) - 99.0).abs() < 0.1);
        assert_eq!(FaultLatency::default().quantile_us(0.5), 0.0);
    }
}
