//! Every embedded guest booted under real KVM and real userfaultfd, with
//! exit status, console output and metrics checked.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn hello_prints_on_serial_and_through_the_hypercall() {
    if !kvm_or_skip("hello") {
        return;
    }
    let r = shoal(&["run", "--guest", "hello", "--memory", "64M"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains("hello from shoal: vcpu 0 of 1, node 0 of 1, 64 MiB of RAM\n"), "{}", r.stdout);
    assert!(r.stdout.contains("hello through the print hypercall\n"), "{}", r.stdout);
    assert!(r.stderr.contains("shoal: ") && r.stderr.contains("faults"), "one-line summary: {}", r.stderr);
    assert!(r.metric("pages_loaded") > 0);
    assert_eq!(r.metric("bytes_fabric_read"), 0);
    assert_eq!(r.metric("remote_fetches"), 0);
    // the stack's first touch: one fault resolves a whole dormant run
    assert!(r.metric("faults") >= 1);
    assert!(r.metric("pages_zero_filled") > r.metric("faults"), "fault-around batches");
}

#[test]
fn memtouch_64_mib_zero_fills_dormant_pages_and_verifies() {
    if !kvm_or_skip("memtouch") {
        return;
    }
    let r = shoal(&["run", "--guest", "memtouch", "--memory", "128M", "--cmdline", "mib=64 seed=7"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains("memtouch: verified 16384 pages"), "{}", r.stdout);
    assert_eq!(printed_checksum(&r.stdout), expected_checksum(64, 7));
    let (filled, loaded, resident) =
        (r.metric("pages_zero_filled"), r.metric("pages_loaded"), r.metric("pages_resident"));
    assert!(filled >= 16384, "pages_zero_filled = {filled}");
    assert_eq!(r.metric("pages_copied"), 0);
    assert_eq!(r.metric("bytes_fabric_read"), 0);
    assert_eq!(filled + loaded, resident, "every resident page was loaded or zero-filled");
    assert_eq!(r.metric("memfd_bytes"), resident * 4096, "the kernel agrees with the page engine");
    // 2 MiB fault-around: 64 MiB is 32 blocks, so few faults, not 16384
    let faults = r.metric("faults");
    assert!(faults <= 64, "faults = {faults}");
}

#[test]
fn memtouch_with_dormant_off_copies_every_page_instead() {
    if !kvm_or_skip("memtouch dormant off") {
        return;
    }
    let r = shoal(
        &["run", "--guest", "memtouch", "--memory", "128M", "--cmdline", "mib=16 seed=7", "--dormant", "off"],
        LIMIT,
    );
    r.expect_status(0);
    assert_eq!(printed_checksum(&r.stdout), expected_checksum(16, 7));
    assert_eq!(r.metric("pages_zero_filled"), 0, "no dormant shortcut");
    let copied = r.metric("pages_copied");
    assert!(copied >= 4096, "pages_copied = {copied}");
    assert_eq!(copied + r.metric("pages_loaded"), r.metric("pages_resident"));
    assert_eq!(r.metric("bytes_fabric_read"), 0, "one node: nothing on a fabric");
}

#[test]
fn zeroboot_zeroes_all_ram_then_verifies_a_pattern() {
    if !kvm_or_skip("zeroboot") {
        return;
    }
    let r = shoal(&["run", "--guest", "zeroboot", "--memory", "64M", "--cmdline", "mib=8 seed=3"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains(" 0 not zero"), "{}", r.stdout);
    assert_eq!(printed_checksum(&r.stdout), expected_checksum(8, 3));
    // every page above the image was touched, and a block's first fault
    // zero-fills all its dormant pages (the first MiB, below the image,
    // too): all of RAM is resident, loaded or zero-filled, and none of it
    // crossed a fabric
    let pages = 64 * 256;
    assert_eq!(r.metric("pages_resident"), pages);
    assert_eq!(r.metric("pages_zero_filled") + r.metric("pages_loaded"), pages);
    assert_eq!(r.metric("bytes_fabric_read"), 0);
}

/// A node alone is a pod of one: its faults go through the page engine,
/// the same as every node of a pod. The engine's own counters show it: it
/// splits faults by how they were resolved (`faults_zero`: the pager kept
/// no such count), each 2 MiB block is granted to the node by the
/// protocol (the node is every page's home) and zero-filled whole by its
/// first fault, and nothing is sent, fetched or transferred.
#[test]
fn a_node_alone_faults_through_the_page_engine() {
    if !kvm_or_skip("page engine alone") {
        return;
    }
    let r = shoal(&["run", "--guest", "zeroboot", "--memory", "64M", "--cmdline", "mib=8 seed=3"], LIMIT);
    r.expect_status(0);
    let (blocks, pages) = (32, 64 * 256);
    assert_eq!(r.metric("faults_zero"), blocks, "one zero-filling fault per 2 MiB block");
    assert_eq!(r.metric("pages_zero_filled"), pages - r.metric("pages_loaded"));
    // every other fault is a first touch of a page the loader wrote (in
    // the memfd, mapped on its first touch) or of one a block's fault
    // filled before the vCPU came back to it
    assert_eq!(r.metric("faults"), blocks + r.metric("faults_already_resident"));
    assert_eq!(r.metric("faults_parked"), 0);
    for none in ["messages_sent", "messages_received", "ownership_transfers", "remote_fetches", "pages_shared"] {
        assert_eq!(r.metric(none), 0, "{none}: a pod of one has no peer");
    }
}

#[test]
fn smp_counts_atomically_on_1_2_and_4_vcpus() {
    if !kvm_or_skip("smp") {
        return;
    }
    for cpus in ["1", "2", "4"] {
        let r = shoal(&["run", "--guest", "smp", "--memory", "64M", "--cpus", cpus, "--cmdline", "iters=3000"], LIMIT);
        r.expect_status(0);
        let n: u64 = cpus.parse().unwrap();
        let want = format!("smp: vcpus={n} iters=3000 counter={} expected={}", 3000 * n, 3000 * n);
        assert!(r.stdout.contains(&want), "{}", r.stdout);
        assert!(r.stdout.contains("smp: each vcpu had its own boot-info block and stack"), "{}", r.stdout);
    }
}

#[test]
fn guests_other_than_smp_run_on_vcpu_0_while_the_others_halt() {
    if !kvm_or_skip("boot info") {
        return;
    }
    // hello runs on vCPU 0 and reports the count; vCPUs 1 and 2 halt, which
    // retires them without ending the VM
    let r = shoal(&["run", "--guest", "hello", "--memory", "64M", "--cpus", "3"], LIMIT);
    r.expect_status(0);
    assert_eq!(r.stdout.matches("hello from shoal").count(), 1, "{}", r.stdout);
    assert!(r.stdout.contains("vcpu 0 of 3"), "{}", r.stdout);
}

#[test]
fn a_64_gib_guest_that_touches_10_mib_stays_small() {
    if !kvm_or_skip("64 GiB") {
        return;
    }
    let r = shoal(&["run", "--guest", "touch", "--memory", "64G", "--cmdline", "mib=10"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains("touch: pages=2560 ") && r.stdout.contains(" bad=0"), "{}", r.stdout);
    let memfd = r.metric("memfd_bytes");
    let rss = r.metric("peak_rss_bytes");
    assert!(memfd < 16 << 20, "memfd holds {memfd} bytes");
    assert!(rss < 64 << 20, "peak RSS {rss} bytes for a 64 GiB guest");
}

#[test]
fn large_guests_use_ram_above_the_mmio_hole() {
    if !kvm_or_skip("above 4 GiB") {
        return;
    }
    // 3 GiB below the hole, 1 GiB above: touching 4080 MiB of free RAM
    // reaches well above 4 GiB
    let r = shoal(&["run", "--guest", "touch", "--memory", "4G", "--cmdline", "mib=4080"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains(" bad=0"), "{}", r.stdout);
    assert!(r.metric("pages_resident") >= 4080 * 256);
}

#[test]
fn guests_lists_and_exports_runnable_images() {
    if !kvm_or_skip("guests --export") {
        return;
    }
    let list = shoal(&["guests"], LIMIT);
    list.expect_status(0);
    for name in ["hello", "memtouch", "zeroboot", "smp", "touch"] {
        assert!(list.stdout.lines().any(|l| l.starts_with(name)), "{name} in:\n{}", list.stdout);
    }
    let dir = scratch("export");
    let out = shoal(&["guests", "--export", dir.to_str().unwrap()], LIMIT);
    out.expect_status(0);
    let hello = dir.join("hello.elf");
    let r = shoal(&["run", "--kernel", hello.to_str().unwrap(), "--memory", "32M"], LIMIT);
    r.expect_status(0);
    assert!(r.stdout.contains("hello from shoal"), "{}", r.stdout);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_anonymous_baseline_runs_the_same_guest_without_userfaultfd() {
    if !kvm_or_skip("anonymous baseline") {
        return;
    }
    let r = shoal(
        &[
            "run",
            "--guest",
            "memtouch",
            "--memory",
            "64M",
            "--cmdline",
            "mib=4 seed=9",
            "--memory-backing",
            "anonymous",
        ],
        LIMIT,
    );
    r.expect_status(0);
    assert_eq!(printed_checksum(&r.stdout), expected_checksum(4, 9));
    assert_eq!(r.metric("faults"), 0);
    assert_eq!(r.metric("pages_zero_filled"), 0);
    assert!(r.metric("pages_resident") >= 4 * 256, "mincore sees the touched pages");
}
