//! vCPUs on every node of a pod, under real KVM: coherent memory between
//! nodes (read copies, invalidations, ownership moving), IPIs across nodes,
//! vCPU migration by the guest's hypercall and by the policy, nodes that
//! hold vCPUs dying or hanging, and bad placements. Every test asserts
//! exact counters where the workload fixes them.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn nodes(r: &Run) -> Vec<serde_json::Value> {
    r.metrics.as_ref().expect("metrics")["nodes"].as_array().expect("nodes").clone()
}

fn get(n: &serde_json::Value, key: &str) -> u64 {
    n[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {n}"))
}

fn run(guest: &str, cmdline: &str, extra: &[&str]) -> Run {
    let mut args = vec!["run", "--guest", guest, "--memory", "64M", "--cmdline", cmdline];
    args.extend_from_slice(extra);
    shoal(&args, LIMIT)
}

/// The shared counter of `smp` stays exact with one vCPU on each of three
/// nodes: every increment is a locked add on a page that moves between
/// the nodes as each vCPU writes it.
fn smp_on_three_nodes(fabric: &str) {
    let r = run("smp", "iters=2000", &["--cpus", "3", "--nodes", "3", "--fabric", fabric, "--migration", "off"]);
    r.expect_status(0);
    assert!(r.stdout.contains("counter=6000 expected=6000") && r.stdout.contains("smp: OK"), "{}", r.stdout);
    let ns = nodes(&r);
    assert_eq!(ns.len(), 3);
    for n in &ns {
        // each node ran its vCPU (it exits to halt at least) and kept it
        assert_eq!(get(n, "vcpus"), 1, "{n}");
        assert!(get(n, "vcpu_exits") >= 1, "{n}");
        assert!(get(n, "faults") > 0, "every node's guest view faulted: {n}");
        assert_eq!(get(n, "bytes_fabric_read"), 4096 * get(n, "remote_fetches"), "{n}");
    }
    // the counter's page starts on node 0; it came to each other node (its
    // vCPU wrote it there): ownership moved to every one of them
    for n in &ns[1..] {
        assert!(get(n, "ownership_transfers") >= 1, "{n}");
    }
    assert_eq!(r.metric("vcpu_migrations_in"), 0);
}

/// The same with the default policy (`--migration on`): vCPUs may move to
/// the node that serves their faults, and the counter stays exact; every
/// vCPU is somewhere at the end, once, and every move out is a move in.
#[test]
fn smp_counter_is_exact_with_the_default_migration_policy() {
    if !kvm_or_skip("vcpus smp policy") {
        return;
    }
    let r = run("smp", "iters=2000", &["--cpus", "3", "--nodes", "3", "--fabric", "shm"]);
    r.expect_status(0);
    assert!(r.stdout.contains("counter=6000 expected=6000") && r.stdout.contains("smp: OK"), "{}", r.stdout);
    let ns = nodes(&r);
    assert_eq!(ns.iter().map(|n| get(n, "vcpus")).sum::<u64>(), 3, "{ns:?}");
    // every vCPU's remote faults are on the counter's page and a few
    // more: contention, not data, so the policy moves nobody
    assert_eq!(r.metric("vcpu_migrations_in"), 0, "{ns:?}");
    assert_eq!(r.metric("vcpu_migrations_out"), 0);
}

#[test]
fn smp_counter_is_exact_with_vcpus_on_three_nodes_over_shm() {
    if kvm_or_skip("vcpus smp shm") {
        smp_on_three_nodes("shm");
    }
}

#[test]
fn smp_counter_is_exact_with_vcpus_on_three_nodes_over_tcp() {
    if kvm_or_skip("vcpus smp tcp") {
        smp_on_three_nodes("tcp");
    }
}

/// A vCPU that is slow to run again after its fault was resolved (a busy
/// or nested host) still gets to use the page it waited for: the page
/// stays until the vCPU has run (the engine's holds), however soon the
/// other node asks for it back. Debug builds delay node 1's wakes by 2 ms
/// (`SHOAL_TEST_SLOW_WAKE`), ten times a round trip between two local
/// nodes. Without holds, node 0's vCPU (adding, then polling the count of
/// finished vCPUs on the same page) takes the page back before node 1's
/// vCPU runs, every time: such a run moved the page 23 590 times in 60 s
/// without adding 1 (the soft-RoCE harness showed the same with no
/// delay injected: 68 223 moves in 400 s, nothing added).
#[test]
fn a_vcpu_slow_to_run_again_still_uses_the_page_it_waited_for() {
    if !kvm_and_test_hooks_or_skip("vcpus slow wake") {
        return;
    }
    for fabric in ["shm", "tcp"] {
        let args = ["run", "--guest", "smp", "--memory", "32M", "--cmdline", "iters=20000", "--cpus", "2"];
        let args = [&args[..], &["--nodes", "2", "--fabric", fabric, "--migration", "off"]].concat();
        let r = shoal_with_env(&args, &[("SHOAL_TEST_SLOW_WAKE", "1:2000")], Duration::from_secs(60));
        r.expect_status(0);
        assert!(r.stdout.contains("counter=40000 expected=40000") && r.stdout.contains("smp: OK"), "{}", r.stdout);
        let ns = nodes(&r);
        // the page came to node 1 (its vCPU wrote it there), and no more
        // often than once an increment
        let moves = get(&ns[1], "ownership_transfers");
        assert!((1..=20_000).contains(&moves), "{fabric}: {ns:?}");
        // every remote fault of a vCPU held its page; messages waited for
        // holds, and each hold a message found over ended one way
        for n in &ns {
            assert_eq!(get(n, "pages_held"), get(n, "faults_remote") + get(n, "faults_upgrade"), "{fabric}: {n}");
            let ended: u64 = ["exited", "ran", "slept", "refault", "yielded", "expired"]
                .iter()
                .map(|k| get(n, &format!("holds_{k}")))
                .sum();
            assert!(ended <= get(n, "pages_held"), "{fabric}: {n}");
        }
        assert!(r.metric("messages_held") > 0, "{fabric}: no message waited for a hold: {ns:?}");
    }
}

/// One writer on node 0, a reader on each of nodes 1 and 2: every reader
/// sees every value (the guest checks), through read copies that each new
/// write invalidates.
#[test]
fn readers_on_other_nodes_see_every_write() {
    if !kvm_or_skip("vcpus sharing") {
        return;
    }
    let r = run("sharing", "rounds=40", &["--cpus", "3", "--nodes", "3", "--fabric", "shm", "--migration", "off"]);
    r.expect_status(0);
    assert!(r.stdout.contains("sharing: readers=2 rounds=40 ipi=0") && r.stdout.contains(" ok"), "{}", r.stdout);
    let ns = nodes(&r);
    for reader in &ns[1..] {
        // a reader holds read copies of the shared page, and every write
        // after the first took them away again
        assert!(get(reader, "pages_shared") > 0, "{reader}");
        assert!(get(reader, "invalidations") > 0, "{reader}");
        assert!(get(reader, "faults_remote_read") > 0, "{reader}");
    }
    // the writer keeps the page and writes it again once the readers'
    // copies are gone: an upgrade in place, no page moving back
    assert!(get(&ns[0], "faults_upgrade") > 0, "{:?}", ns[0]);
}

/// The same under the default policy: readers see every value wherever
/// their vCPUs end up.
#[test]
fn readers_see_every_write_with_the_default_migration_policy() {
    if !kvm_or_skip("vcpus sharing policy") {
        return;
    }
    let r = run("sharing", "rounds=40", &["--cpus", "3", "--nodes", "3", "--fabric", "shm"]);
    r.expect_status(0);
    assert!(r.stdout.contains("sharing: readers=2 rounds=40 ipi=0") && r.stdout.contains(" ok"), "{}", r.stdout);
    assert_eq!(r.metric("vcpu_migrations_in"), r.metric("vcpu_migrations_out"));
}

/// The same with IPIs: the writer wakes each reader (on another node)
/// with one IPI per value; every IPI crosses the fabric once.
#[test]
fn ipis_reach_vcpus_on_other_nodes_exactly_once() {
    if !kvm_or_skip("vcpus ipi") {
        return;
    }
    let rounds = 30;
    let cmdline = format!("rounds={rounds} ipi=1");
    let r = run("sharing", &cmdline, &["--cpus", "3", "--nodes", "3", "--fabric", "tcp", "--migration", "off"]);
    r.expect_status(0);
    assert!(r.stdout.contains("ipi=1") && r.stdout.contains(" ok"), "{}", r.stdout);
    let ns = nodes(&r);
    assert_eq!(get(&ns[0], "ipis_sent"), 2 * rounds, "{:?}", ns[0]);
    assert_eq!(get(&ns[0], "ipis_received"), 0);
    for reader in &ns[1..] {
        assert_eq!(get(reader, "ipis_received"), rounds, "{reader}");
        assert_eq!(get(reader, "ipis_sent"), 0, "{reader}");
    }
}

/// IPIs work on a VM alone too (the ABI does not depend on a pod).
#[test]
fn ipis_work_on_one_node() {
    if !kvm_or_skip("vcpus ipi one node") {
        return;
    }
    let r = run("sharing", "rounds=20 ipi=1", &["--cpus", "2"]);
    r.expect_status(0);
    assert!(r.stdout.contains("readers=1 rounds=20 ipi=1") && r.stdout.contains(" ok"), "{}", r.stdout);
    assert_eq!(r.metric("ipis_sent"), 0, "local IPIs do not cross a fabric");
}

/// A vCPU moves itself around every node, twice; after every move it
/// checks its registers, its stack and a checksum of its memory. Each
/// move is one migration out of one node and into the next.
#[test]
fn a_vcpu_tours_every_node_and_keeps_its_state() {
    if !kvm_or_skip("vcpus migrate tour") {
        return;
    }
    let r = run("migrate", "mode=0 mib=2 rounds=2", &["--nodes", "3", "--fabric", "shm", "--migration", "off"]);
    r.expect_status(0);
    assert!(r.stdout.contains("migrate: tour ok: 6 moves over 3 nodes"), "{}", r.stdout);
    let ns = nodes(&r);
    for n in &ns {
        assert_eq!(get(n, "vcpu_migrations_in"), 2, "{n}");
        assert_eq!(get(n, "vcpu_migrations_out"), 2, "{n}");
    }
    // it ended where it started
    assert_eq!(get(&ns[0], "vcpus"), 1);
    // every move told its target the page under the stack before the
    // state was even captured, and the target asked for it then: the
    // vCPU's first write there never asked itself
    let prefetched: u64 = ns.iter().map(|n| get(n, "pages_prefetched")).sum();
    assert_eq!(prefetched, 6, "every move's stack page asked for ahead: {ns:?}");
}

/// Data written on node 1 and read from node 0: with the policy on, the
/// vCPU follows its data to node 1 and pulls far fewer pages than with it
/// off, where every page comes to node 0.
#[test]
fn a_vcpu_follows_its_data_when_migration_is_on() {
    if !kvm_or_skip("vcpus migrate follow") {
        return;
    }
    let follow = |migration: &str| {
        let r = run("migrate", "mode=1 mib=4 rounds=2", &["--nodes", "2", "--fabric", "shm", "--migration", migration]);
        r.expect_status(0);
        assert!(r.stdout.contains("migrate: follow: checksum="), "{}", r.stdout);
        r
    };
    let off = follow("off");
    let on = follow("on");
    let pages = 4 << 20 >> 12;
    // off: the vCPU moves only where the guest asks (there and back)
    assert_eq!(off.metric("vcpu_migrations_out"), 2);
    assert!(off.stdout.contains("ended on node 0"), "{}", off.stdout);
    assert!(nodes(&off)[0]["remote_fetches"].as_u64().unwrap() >= pages, "{:?}", nodes(&off)[0]);
    // on: the policy moved it once more, to node 1, where the data is
    assert!(on.metric("vcpu_migrations_out") >= 3, "{:?}", nodes(&on));
    assert!(on.stdout.contains("ended on node 1"), "{}", on.stdout);
    assert!(
        on.metric("remote_fetches") * 4 < off.metric("remote_fetches"),
        "on {:?} off {:?}",
        nodes(&on),
        nodes(&off)
    );
    assert_eq!(printed(&on.stdout, "checksum="), printed(&off.stdout, "checksum="));
}

/// Under `--node-memory` a node that reads pages another node wrote takes
/// read copies (the writer keeps the pages), and when its bound is
/// reached it drops read copies (nothing moves) rather than taking or
/// evicting the pages themselves: node 0 reads 2 MiB written on node 1
/// twice with room for 2 MiB in all.
#[test]
fn read_copies_are_made_and_dropped_within_the_node_memory_bound() {
    if !kvm_or_skip("vcpus read copies under a bound") {
        return;
    }
    let budget_pages = 512; // --node-memory 2M
    let args = ["--nodes", "2", "--fabric", "shm", "--migration", "off"];
    let free = run("migrate", "mode=1 mib=2 rounds=2", &args);
    free.expect_status(0);
    let bound = run("migrate", "mode=1 mib=2 rounds=2", &[&args[..], &["--node-memory", "2M"]].concat());
    bound.expect_status(0);
    assert!(bound.stdout.contains("ended on node 0"), "{}", bound.stdout);
    assert_eq!(printed(&bound.stdout, "checksum="), printed(&free.stdout, "checksum="));
    let ns = nodes(&bound);
    for n in &ns {
        assert!(get(n, "pages_resident") <= budget_pages, "{n}");
        assert_eq!(get(n, "memfd_bytes"), 4096 * get(n, "pages_resident"), "{n}");
    }
    let reader = &ns[0];
    // every page of the data came as a read copy; the pages taken were
    // node 0's own, evicted and taken back, and the few the vCPU wrote on
    // node 1 too (its stack, the guest's globals), never the data; copies
    // were dropped to stay within the bound
    assert!(get(reader, "faults_remote_read") >= 512, "{reader}");
    let taken = get(reader, "faults_remote_write").saturating_sub(get(reader, "pages_fetched_back"));
    assert!(taken < 16, "{reader}");
    assert!(get(reader, "read_copies_dropped") > 0, "{reader}");
}

/// An owner short of memory evicts pages another node reads: node 1
/// writes 2 MiB, node 0 reads them (read copies), node 1 writes 2 MiB
/// more with room for 3 MiB: the shared pages must leave node 1 (their
/// readers invalidated first), and both nodes then read every byte as
/// written. (Before, the protocol evicted only pages without readers.)
#[test]
fn an_owner_evicts_pages_others_read_when_it_needs_the_room() {
    if !kvm_or_skip("vcpus shared eviction") {
        return;
    }
    let budget_pages = 768; // --node-memory 3M
    let args = ["--nodes", "2", "--fabric", "shm", "--migration", "off"];
    let free = run("migrate", "mode=4 mib=2", &args);
    free.expect_status(0);
    let bound = run("migrate", "mode=4 mib=2", &[&args[..], &["--node-memory", "3M"]].concat());
    bound.expect_status(0);
    let want = printed(&free.stdout, "checksum=");
    assert!(!want.is_empty(), "{}", free.stdout);
    assert_eq!(printed(&bound.stdout, "checksum="), want, "{}", bound.stdout);
    assert_eq!(printed(&bound.stdout, "checksum0="), want, "{}", bound.stdout);
    assert_eq!(printed(&bound.stdout, "first="), printed(&free.stdout, "first="));
    let ns = nodes(&bound);
    for n in &ns {
        assert!(get(n, "pages_resident") <= budget_pages, "{n}");
        assert_eq!(get(n, "memfd_bytes"), 4096 * get(n, "pages_resident"), "{n}");
    }
    let (reader, owner) = (&ns[0], &ns[1]);
    // node 0 read the first 2 MiB as read copies; node 1, writing the
    // next 2 MiB, sent the oldest pages away: those node 0 read, whose
    // copies were invalidated (counted where the home is another node:
    // about half of them). Skipping them instead (as before) left node 1
    // evicting the pages it had just been granted, which came back to be
    // zero-filled again (1964 to 2034 zero-fills against 1524 unbound,
    // 42 invalidations, in three runs each)
    assert!(get(reader, "pages_shared") >= 512, "{reader}");
    assert!(get(owner, "pages_evicted") >= 256, "{owner}");
    assert!(get(reader, "invalidations") >= 256, "{reader}");
    let zero_filled = |r: &Run| r.metric("pages_zero_filled");
    // (slack for a probe's timing; observed: equal)
    assert!(zero_filled(&bound) <= zero_filled(&free) + 32, "{} vs {}", zero_filled(&bound), zero_filled(&free));
}

/// Two nodes whose bounds together barely hold what the guest touched
/// (`migrate mode=4` as above, 2300 KiB each) do not pass the pages
/// another node's eviction parked on them back and forth: those leave
/// only when faults wait for room. Before, such a run took 85 000 to
/// 88 000 evictions for 2 500 faults (three runs), and at 2200 KiB one did
/// not end in minutes.
#[test]
fn full_nodes_do_not_pass_evicted_pages_back_and_forth() {
    if !kvm_or_skip("vcpus eviction ping-pong") {
        return;
    }
    let args = ["--nodes", "2", "--fabric", "shm", "--migration", "off", "--node-memory", "2300K"];
    let r = run("migrate", "mode=4 mib=2", &args);
    r.expect_status(0);
    assert!(r.stdout.contains("migrate: shared:") && !r.stdout.contains("FAILED"), "{}", r.stdout);
    let (evicted, faults) = (r.metric("pages_evicted"), r.metric("faults"));
    // (measured here: 0.64 to 0.93 evictions per fault)
    assert!(evicted <= 2 * faults, "{evicted} evictions for {faults} faults");
    for n in &nodes(&r) {
        assert!(get(n, "pages_resident") <= 575, "{n}");
        assert_eq!(get(n, "memfd_bytes"), 4096 * get(n, "pages_resident"), "{n}");
    }
}

fn printed(stdout: &str, key: &str) -> String {
    stdout.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_default().to_string()
}

#[test]
fn a_migration_to_a_node_outside_the_pod_ends_the_vm_clearly() {
    if !kvm_or_skip("vcpus migrate bad node") {
        return;
    }
    // mode=1 asks for node 1: a VM alone has only node 0
    let r = run("migrate", "mode=1 mib=1", &[]);
    assert_eq!(r.status, 2, "the guest refuses first: {}", r.stdout);
    // a tour of one node stays put
    let r = run("migrate", "mode=0 mib=1", &[]);
    r.expect_status(0);
    assert!(r.stdout.contains("1 moves over 1 nodes"), "{}", r.stdout);
    assert_eq!(r.metric("vcpu_migrations_out"), 0);
    // the hypercall naming a node past the last, alone and on a pod
    for extra in [&[][..], &["--nodes", "2", "--fabric", "shm"][..]] {
        let r = run("migrate", "mode=2 mib=1", extra);
        assert_eq!(r.status, 70, "{extra:?}: {}", r.stderr);
        let n = if extra.is_empty() { 1 } else { 2 };
        let want = format!("the guest asked to move vCPU 0 to node {n}; the pod has {n} node(s)");
        assert!(r.stderr.contains(&want), "{extra:?}: {}", r.stderr);
        assert!(!r.stdout.contains("FAILED"), "{}", r.stdout);
    }
}

#[test]
fn bad_placements_are_refused_before_any_node_starts() {
    for (args, want) in [
        (vec!["--cpus", "2", "--nodes", "2", "--placement", "0,2"], "vCPU 1 on node 2, outside the pod of 2"),
        (vec!["--cpus", "3", "--nodes", "2", "--placement", "0,1"], "2 vCPU(s) but --cpus is 3"),
        (vec!["--cpus", "2", "--placement", "0,1"], "vCPU 1 on node 1, outside the pod of 1"),
        (vec!["--cpus", "2", "--nodes", "2", "--placement", "0,x"], "is not a node number"),
        (vec!["--cpus", "0", "--nodes", "2"], "--cpus must be between 1 and"),
    ] {
        let mut full = vec!["run", "--guest", "smp", "--memory", "64M"];
        full.extend(args.iter().copied());
        let r = shoal(&full, LIMIT);
        assert_eq!(r.status, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
        assert!(!r.stderr.contains("shoal node"), "no node was started: {}", r.stderr);
    }
}

/// A pod running `sharing` for a long time with a vCPU on each of three
/// nodes, in the background.
fn busy(fabric: &str) -> BackgroundPod {
    BackgroundPod::start(&[
        "run",
        "--guest",
        "sharing",
        "--memory",
        "64M",
        "--cmdline",
        "rounds=100000000 ipi=1",
        "--cpus",
        "3",
        "--nodes",
        "3",
        "--fabric",
        fabric,
        "--migration",
        "off",
    ])
}

#[test]
fn a_killed_node_with_vcpus_ends_the_pod_naming_it() {
    if !kvm_or_skip("vcpus kill") {
        return;
    }
    let mut pod = busy("tcp");
    let node2 = pod.node(2, 2, Duration::from_secs(2));
    let since = Instant::now();
    // SAFETY: SIGKILL to a process of the pod we started.
    unsafe { libc::kill(node2 as i32, libc::SIGKILL) };
    let end = pod.end(since, Duration::from_secs(20));
    assert_eq!(end.status, Some(70), "{}", end.stderr);
    assert!(end.failure.contains("node 2"), "{}", end.stderr);
}

/// How long the failure line says a node was silent: the beats name it
/// ("nothing heard from it for 1.6 s"), or a page read that waited for it
/// ("got no answer for 1.5 s"), whichever thread noticed first; both are
/// bounded by the same limit.
fn named_silence(line: &str) -> f64 {
    line.split(" for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no silence named in: {line}"))
}

/// A node that hangs (stopped: its connections stay up) is named by its
/// silence: every node beats every 250 ms and a peer silent for 1.5 s has
/// failed, so the pod ends within 2 s of the hang (plus the teardown).
#[test]
fn a_hung_node_with_vcpus_is_named_within_two_seconds() {
    if !kvm_or_skip("vcpus hang") {
        return;
    }
    for fabric in ["shm", "tcp"] {
        let mut pod = busy(fabric);
        let node2 = pod.node(2, 2, Duration::from_secs(2));
        let since = Instant::now();
        // SAFETY: SIGSTOP to a process of the pod we started.
        unsafe { libc::kill(node2 as i32, libc::SIGSTOP) };
        let end = pod.end(since, Duration::from_secs(20));
        assert_eq!(end.status, Some(70), "{}", end.stderr);
        let (took, line) = (end.took, end.failure);
        // SAFETY: as above; let it go so it can be reaped.
        unsafe { libc::kill(node2 as i32, libc::SIGCONT) };
        assert!(line.contains("node 2 does not answer"), "{fabric}: {line}");
        // named after at most 2 s of silence (the beats' bound) ...
        assert!(named_silence(&line) <= 2.0, "{fabric}: {line}");
        // ... and the whole pod gone soon after: a hang guard, not the
        // promise (that is the silence named above). The pod's end is the
        // silence, node 0's 500 ms grace for its members (the stopped one
        // never exits: it is killed) and the teardown, 2.1-2.6 s; the 10 s
        // fault watchdog would name no node (the line above rules it out)
        assert!(took < Duration::from_secs(8), "{fabric}: ended {took:?} after the hang: {line}");
    }
}

/// A hung node that serves pages: node 0's vCPU keeps pulling evicted
/// pages back from nodes 1 and 2 (a hot set of 20 MiB over a bound of 12), so
/// over tcp a thread of node 0 may be in a page read from node 2 when it
/// stops. The pod still names node 2 within the bound, and no node takes
/// a reader that was only waiting for node 2 for the hung one.
#[test]
fn a_hung_node_serving_pages_is_named_not_the_nodes_reading_from_it() {
    if !kvm_or_skip("vcpus hang reads") {
        return;
    }
    let mut pod = BackgroundPod::start(&[
        "run",
        "--guest",
        "memtouch",
        "--memory",
        "64M",
        "--cmdline",
        "mib=24 hot=20 rounds=100000000",
        "--nodes",
        "3",
        "--node-memory",
        "12M",
        "--fabric",
        "tcp",
        "--migration",
        "off",
    ]);
    let node2 = pod.node(2, 2, Duration::from_secs(3));
    let since = Instant::now();
    // SAFETY: SIGSTOP to a process of the pod we started.
    unsafe { libc::kill(node2 as i32, libc::SIGSTOP) };
    let end = pod.end(since, Duration::from_secs(20));
    // SAFETY: as above; let it go so it can be reaped.
    unsafe { libc::kill(node2 as i32, libc::SIGCONT) };
    assert_eq!(end.status, Some(70), "{}", end.stderr);
    assert!(end.failure.contains("node 2 does not answer"), "{}", end.stderr);
    for wrong in ["node 0 does not answer", "node 1 does not answer"] {
        assert!(!end.stderr.contains(wrong), "blamed a reader ({wrong}):\n{}", end.stderr);
    }
    assert!(named_silence(&end.failure) <= 2.0, "{}", end.failure);
}

/// Dormant pages stay free with vCPUs on every node: each of three vCPUs,
/// one per node, first-touches its own 8 MiB; every node zero-fills its
/// slice locally, and only the few pages with contents (code, boot data,
/// the guest's shared report page) cross the fabric.
#[test]
fn first_touches_on_every_node_send_no_dormant_page() {
    if !kvm_or_skip("vcpus touch") {
        return;
    }
    let r = shoal(
        &["run", "--guest", "touch", "--memory", "128M", "--cmdline", "mib=8", "--cpus", "3", "--nodes", "3"]
            .into_iter()
            .chain(["--fabric", "tcp", "--migration", "off"])
            .collect::<Vec<_>>(),
        LIMIT,
    );
    r.expect_status(0);
    assert!(r.stdout.contains("touch: vcpus=3 pages=6144") && r.stdout.contains("bad=0"), "{}", r.stdout);
    let ns = nodes(&r);
    for n in &ns {
        assert!(get(n, "pages_zero_filled") >= 2048, "each node zero-filled its own slice: {n}");
        assert_eq!(get(n, "bytes_fabric_read"), 4096 * get(n, "remote_fetches"), "{n}");
    }
    // 6144 pages touched; what crossed is the handful with contents
    assert!(r.metric("remote_fetches") <= 32, "{ns:?}");
}

/// IPIs chase a moving vCPU: vCPU 1 sends vCPU 0 200 IPIs while vCPU 0
/// tours three nodes five times; exactly 200 arrive (the guest counts), and
/// every IPI that crossed the fabric was posted exactly once.
#[test]
fn ipis_find_a_vcpu_that_keeps_moving() {
    if !kvm_or_skip("vcpus ipis while moving") {
        return;
    }
    let r = run(
        "migrate",
        "mode=3 ipis=200 rounds=5",
        &["--cpus", "2", "--nodes", "3", "--fabric", "tcp", "--migration", "off"],
    );
    r.expect_status(0);
    assert!(r.stdout.contains("migrate: ipis ok: 200 IPIs while moving 15 times over 3 nodes"), "{}", r.stdout);
    assert_eq!(r.metric("vcpu_migrations_out"), 15);
    assert_eq!(r.metric("vcpu_migrations_in"), 15);
    // sent across nodes (first hop) = posted from a message (last hop)
    assert_eq!(r.metric("ipis_sent"), r.metric("ipis_received"), "{:?}", nodes(&r));
    assert!(r.metric("ipis_sent") > 0);
}
