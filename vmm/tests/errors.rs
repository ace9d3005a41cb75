//! Bad input gets a one-line error and exit status 2, never a panic; a VM
//! that fails ends with an error (status 70), never a hang.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Runs shoal and checks: status 2, one `shoal: error:` line naming the
/// problem (or clap's usage error), no panic.
fn refused(args: &[&str], needle: &str) {
    let r = shoal(args, LIMIT);
    assert_eq!(r.status, 2, "{args:?}: status; stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{args:?} panicked:\n{}", r.stderr);
    assert!(r.stderr.contains(needle), "{args:?}: expected {needle:?} in:\n{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{args:?}: one line:\n{}", r.stderr);
    assert!(r.stdout.is_empty(), "{args:?}: nothing reaches the console: {}", r.stdout);
}

/// A member's bad pod file is one line and exit status 2 at once, before
/// it joins anything: a TOML error, a socket path too long for a Unix
/// socket, a memory bound the guest image cannot fit in.
#[test]
fn a_members_bad_pod_file_is_one_line_before_any_join() {
    let dir = scratch("member-pod-file");
    let secret = write_file(&dir, "secret", b"0123456789abcdef0123");
    let pod = |name: &str, extra: &str| {
        // a join that waits a day: a member that got as far as joining
        // would outlive the test's bound instead of exiting 2
        let text = format!(
            "nodes = 2\nfabric = \"shm\"\nmemory = \"64M\"\nguest = \"hello\"\nsecret_file = \"{secret}\"\n\
             join_timeout = 86400.0\n{extra}\n"
        );
        write_file(&dir, name, text.as_bytes())
    };
    let member = |file: &str, needle: &str| refused(&["node", "--pod", file, "--rank", "1"], needle);
    member(&pod("port", "pod_id = \"p\"\nport = 99999"), "line 8, column 8: invalid value");
    let long = "a".repeat(200);
    member(&pod("long", &format!("pod_id = \"{long}\"")), "more than a Unix socket's 107");
    member(&pod("bound", "pod_id = \"q\"\nnode_memory = \"1\""), "the guest image alone fills");
}

/// Usage errors (clap's) are one line too, and a pod refuses bad input
/// before it starts any other node (no "node 1 ended badly").
#[test]
fn usage_errors_and_a_pods_bad_input_are_one_line() {
    refused(&["run", "--guest", "hello", "--memory", "99999999T"], "does not fit in 64 bits");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--join-timeout", "-1"], "--join-timeout must be");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--cpus", "99999999999"], "--cpus");
    refused(&["run", "--bogus"], "unexpected argument '--bogus'");
    refused(&["frob"], "unrecognized subcommand 'frob'");
    let dir = scratch("pod-preflight");
    let junk = write_file(&dir, "junk", &[0x42u8; 1000]);
    fn pod<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["run", "--memory", "64M", "--nodes", "2"];
        a.extend_from_slice(extra);
        a
    }
    refused(&pod(&["--kernel", &junk]), "not an ELF file");
    refused(&pod(&["--guest", "hello", "--memory-backing", "anonymous"]), "a pod needs --memory-backing memfd");
    refused(&pod(&["--guest", "hello", "--node-memory", "1"]), "the guest image alone fills");
    let far = write_file(&dir, "far", &tiny_elf(&[0xf4], 0x800_0000, 2));
    refused(&pod(&["--kernel", &far]), "outside guest RAM");
    // (refused before any node starts, with or without an RDMA device)
    refused(
        &pod(&["--guest", "hello", "--fabric", "verbs", "--dormant", "off"]),
        "--dormant off does not run over verbs",
    );
}

#[test]
fn missing_image() {
    refused(&["run", "--kernel", "/nonexistent/guest.elf", "--memory", "64M"], "No such file");
}

#[test]
fn unreadable_image() {
    // a directory cannot be read as a file, even by root
    let dir = scratch("unreadable");
    refused(&["run", "--kernel", dir.to_str().unwrap(), "--memory", "64M"], "guest image");
}

#[test]
fn not_an_elf() {
    let dir = scratch("notelf");
    let p = write_file(&dir, "x", b"#!/bin/sh\necho hi\n");
    refused(&["run", "--kernel", &p, "--memory", "64M"], "not an ELF file");
    let empty = write_file(&dir, "empty", b"");
    refused(&["run", "--kernel", &empty, "--memory", "64M"], "not an ELF file");
}

#[test]
fn elf_32_bit() {
    let dir = scratch("elf32");
    let p = write_file(&dir, "g32", &tiny_elf(&[0xf4], 0x10_0000, 1));
    refused(&["run", "--kernel", &p, "--memory", "64M"], "32-bit ELF");
}

#[test]
fn host_executable_is_not_a_guest() {
    refused(&["run", "--kernel", "/bin/true", "--memory", "64M"], "not loadable");
}

#[test]
fn segment_outside_guest_memory() {
    let dir = scratch("outside");
    let p = write_file(&dir, "far", &tiny_elf(&[0xf4], 0x800_0000, 2)); // 128 MiB
    refused(&["run", "--kernel", &p, "--memory", "64M"], "outside guest RAM");
}

#[test]
fn memory_sizes() {
    refused(&["run", "--guest", "hello", "--memory", "0"], "must be more than 0");
    refused(&["run", "--guest", "hello", "--memory", "12345"], "not a multiple of the 4 KiB page size");
    refused(&["run", "--guest", "hello", "--memory", "4T"], "limit of 1024 GiB");
    refused(&["run", "--guest", "hello", "--memory", "99999999999T"], "does not fit in 64 bits");
    refused(&["run", "--guest", "hello", "--memory", "64Q"], "expected a number with an optional unit");
    refused(&["run", "--guest", "hello", "--memory", "1M"], "below shoal's minimum");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--node-memory", "lots"], "expected a number");
}

#[test]
fn unknown_guest() {
    refused(&["run", "--guest", "nosuch", "--memory", "64M"], "unknown guest \"nosuch\"; the guests are: hello");
}

#[test]
fn malformed_cmdlines() {
    refused(&["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", "mb=4"], "unknown command-line key \"mb\"");
    refused(&["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", "mib=four"], "must be a decimal");
    refused(&["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", "mib"], "is not a key=value word");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--cmdline", "a\tb"], "only printable ASCII");
    let long = "x".repeat(3000);
    let dir = scratch("longcmd");
    let p = write_file(&dir, "hello", shoal_guest_images::find("hello").unwrap().elf);
    refused(&["run", "--kernel", &p, "--memory", "64M", "--cmdline", &long], "the limit is 2048");
}

#[test]
fn usage_errors() {
    refused(&["run", "--guest", "hello"], "--memory");
    refused(&["run", "--memory", "64M"], "--guest");
    refused(&["run", "--guest", "hello", "--kernel", "/x", "--memory", "64M"], "cannot be used with");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--cpus", "0"], "--cpus must be between 1");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--dormant", "maybe"], "invalid value 'maybe'");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--timeout=-1"], "--timeout must be a positive");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--timeout", "soon"], "invalid value 'soon'");
}

#[test]
fn budget_too_small_for_the_image() {
    refused(&["run", "--guest", "hello", "--memory", "64M", "--node-memory", "4K"], "the loader alone writes");
}

/// A failed fault resolution ends the VM with an error naming it: the
/// vCPU blocked on the fault is released, nothing hangs.
#[test]
fn a_fault_over_the_memory_budget_ends_the_vm() {
    if !kvm_or_skip("budget") {
        return;
    }
    let r =
        shoal(&["run", "--guest", "memtouch", "--memory", "64M", "--cmdline", "mib=32", "--node-memory", "8M"], LIMIT);
    r.expect_status(70);
    assert!(r.stderr.contains("node memory budget exhausted: 2048 pages (8 MiB) are resident"), "{}", r.stderr);
    assert!(
        r.stderr.contains("raise --node-memory (a single node has nowhere to evict to)"),
        "names the flag and why: {}",
        r.stderr
    );
    // fault-around fills up to the bound exactly, then a fault finds no
    // room: the page engine parks it, and alone it cannot evict
    assert_eq!(r.metric("pages_resident"), 2048, "the budget held, and was used");
    assert_eq!(r.metric("faults_parked"), 1);
    assert_eq!((r.metric("pages_evicted"), r.metric("pages_redormanted")), (0, 0), "nowhere to evict to");
    // the kernel's count too: after the failure the vCPU is released by
    // unregistering userfaultfd, and may get at most a page or so more
    assert!(r.metric("memfd_bytes") <= (8 << 20) + (64 << 10), "memfd holds {}", r.metric("memfd_bytes"));
    assert!(!r.stdout.contains("verified"), "the guest must not finish");
}

#[test]
fn a_guest_that_only_halts_fails_the_vm() {
    if !kvm_or_skip("halt") {
        return;
    }
    let dir = scratch("halt");
    let p = write_file(&dir, "halt", &tiny_elf(&[0xf4], 0x10_0000, 2)); // hlt
    let r = shoal(&["run", "--kernel", &p, "--memory", "16M", "--cpus", "2"], LIMIT);
    r.expect_status(70);
    assert!(r.stderr.contains("every vCPU halted without calling exit"), "{}", r.stderr);
}

#[test]
fn a_guest_touching_the_mmio_hole_fails_the_vm() {
    if !kvm_or_skip("mmio") {
        return;
    }
    // mov rax, 0xd0000000; mov [rax], rax  (inside the hole below 4 GiB)
    let code = [0x48, 0xb8, 0, 0, 0, 0xd0, 0, 0, 0, 0, 0x48, 0x89, 0x00, 0xf4];
    let dir = scratch("mmio");
    let p = write_file(&dir, "mmio", &tiny_elf(&code, 0x10_0000, 2));
    let r = shoal(&["run", "--kernel", &p, "--memory", "16M"], LIMIT);
    r.expect_status(70);
    assert!(r.stderr.contains("the guest accessed 0xd0000000, which is not RAM"), "{}", r.stderr);
}

#[test]
fn a_triple_fault_fails_the_vm() {
    if !kvm_or_skip("triple fault") {
        return;
    }
    // ud2 with no IDT: #UD, then #DF, then shutdown
    let dir = scratch("ud2");
    let p = write_file(&dir, "ud2", &tiny_elf(&[0x0f, 0x0b], 0x10_0000, 2));
    let r = shoal(&["run", "--kernel", &p, "--memory", "16M"], LIMIT);
    r.expect_status(70);
    assert!(r.stderr.contains("triple fault") && r.stderr.contains("rip 0x100000"), "{}", r.stderr);
}

#[test]
fn timeout_stops_a_spinning_guest() {
    if !kvm_or_skip("timeout") {
        return;
    }
    let dir = scratch("spin");
    let p = write_file(&dir, "spin", &tiny_elf(&[0xeb, 0xfe], 0x10_0000, 2)); // jmp .
    let r = shoal(&["run", "--kernel", &p, "--memory", "16M", "--cpus", "2", "--timeout", "0.5"], LIMIT);
    r.expect_status(124);
    assert!(r.stderr.contains("ran past --timeout"), "{}", r.stderr);
}

#[test]
fn guest_exit_status_passes_through() {
    if !kvm_or_skip("exit status") {
        return;
    }
    // mov edi, 42; mov eax, HC_EXIT; mov edx, HC_PORT; out dx, eax
    let code = [0xbf, 42, 0, 0, 0, 0xb8, 2, 0, 0, 0, 0xba, 0x10, 0x05, 0, 0, 0xef, 0xf4];
    let dir = scratch("exit42");
    let p = write_file(&dir, "exit42", &tiny_elf(&code, 0x10_0000, 2));
    let r = shoal(&["run", "--kernel", &p, "--memory", "16M"], LIMIT);
    r.expect_status(42);
}

/// A file that starts like a bzImage: the Linux boot protocol's header
/// magic at 0x202, with `version` and `loadflags` as given.
fn fake_bzimage(version: u16, loadflags: u8) -> Vec<u8> {
    let mut k = vec![0u8; 64 << 10];
    k[0x1f1] = 1; // setup_sects
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    k[0x211] = loadflags;
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    k
}

#[test]
fn linux_kernels_with_bad_input() {
    let dir = scratch("linux-bad");
    let old = write_file(&dir, "old", &fake_bzimage(0x0100, 1));
    refused(&["run", "--kernel", &old, "--memory", "256M"], "not a bzImage this loader can boot");
    let k = write_file(&dir, "k", &fake_bzimage(0x020f, 1));
    refused(&["run", "--kernel", &k, "--memory", "64M"], "at least 128 MiB");
    refused(
        &["run", "--kernel", &k, "--initrd", "/nonexistent/initrd.img", "--memory", "256M"],
        "initrd /nonexistent/initrd.img",
    );
    // an initramfs bigger than the guest
    let big = dir.join("big.img");
    std::fs::File::create(&big).unwrap().set_len(300 << 20).unwrap();
    refused(&["run", "--kernel", &k, "--initrd", big.to_str().unwrap(), "--memory", "256M"], "does not fit");
    refused(&["run", "--kernel", &k, "--cpus", "255", "--memory", "256M"], "1 to 254 vCPUs");
    // a bzImage whose payload shoal cannot decompress, entered through
    // PVH on demand (auto would run the guest's decompressor instead)
    let mut zstd = fake_bzimage(0x020f, 1);
    zstd[0x24c..0x250].copy_from_slice(&64u32.to_le_bytes()); // payload: 64 bytes at 1 KiB
    zstd[1024..1028].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    let z = write_file(&dir, "zstd", &zstd);
    refused(
        &["run", "--kernel", &z, "--memory", "256M", "--bzimage-entry", "pvh"],
        "cannot be entered through a PVH entry: its payload's compression (zstd) is not one shoal reads",
    );
    refused(&["run", "--kernel", &z, "--memory", "256M", "--bzimage-entry", "sideways"], "--bzimage-entry");
    // an initramfs for a guest that is not Linux
    refused(
        &["run", "--guest", "hello", "--initrd", big.to_str().unwrap(), "--memory", "64M"],
        "--initrd needs a Linux kernel",
    );
    // a Linux guest runs its vCPUs on node 0 (for now), refused before
    // any node starts
    refused(
        &["run", "--kernel", &k, "--memory", "256M", "--cpus", "2", "--nodes", "2", "--placement", "0,1"],
        "a Linux guest runs every vCPU on node 0 for now",
    );
}

#[test]
fn unbounded_or_odd_inputs_are_refused() {
    // a device that never ends, and a directory, as a guest image
    refused(&["run", "--kernel", "/dev/zero", "--memory", "64M"], "not a regular file");
    refused(&["run", "--kernel", "/tmp", "--memory", "64M"], "not a regular file");
    refused(&["run", "--kernel", "/dev/zero", "--memory", "64M", "--nodes", "2"], "not a regular file");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--nodes", "100000"], "--nodes must be between 1 and 64");
    refused(&["run", "--guest", "hello", "--memory", "64M", "--fault-threads", "99999"], "--fault-threads must be");
    refused(
        &["run", "--guest", "hello", "--memory", "64M", "--nodes", "2", "--liveness-timeout", "0.1"],
        "--liveness-timeout must be between",
    );
    // seconds beyond what a duration holds are refused, not a panic
    refused(&["run", "--guest", "hello", "--memory", "64M", "--timeout", "1e300"], "--timeout must be");
    refused(
        &["run", "--guest", "hello", "--memory", "64M", "--nodes", "2", "--join-timeout", "1e300"],
        "--join-timeout must be",
    );
}

#[test]
fn bad_disks_are_refused_before_anything_starts() {
    let dir = scratch("disks");
    let k = write_file(&dir, "k", &fake_bzimage(0x020f, 1));
    let odd = write_file(&dir, "odd.img", &[0u8; 1000]);
    let empty = write_file(&dir, "empty.img", b"");
    let good = write_file(&dir, "good.img", &[0u8; 4096]);
    let linux = |disk: &str| {
        vec!["run", "--kernel", &k, "--memory", "256M", "--disk"]
            .into_iter()
            .chain([disk])
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let one_line = |args: Vec<String>, needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = shoal(&args, LIMIT);
        assert_eq!(r.status, 2, "{args:?}: status; stderr:\n{}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: expected {needle:?} in:\n{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: one line:\n{}", r.stderr);
        assert!(r.stdout.is_empty());
    };
    one_line(linux("/nonexistent/root.img"), "--disk /nonexistent/root.img: No such file");
    one_line(linux(dir.to_str().unwrap()), "--disk");
    one_line(linux(&format!("{},readonly", dir.display())), "not a regular file");
    one_line(linux(&odd), "1000 bytes, not a multiple of the 512-byte sector");
    one_line(linux(&empty), "the image is empty");
    one_line(linux(&format!("{good},ro")), "unknown option \"ro\"");
    // on a pod, before any other node starts
    let mut pod = linux(&odd);
    pod.extend(["--nodes", "2"].map(String::from));
    one_line(pod, "not a multiple of the 512-byte sector");
    // a disk for a guest that is not Linux
    one_line(
        ["run", "--guest", "hello", "--memory", "64M", "--disk", &good].map(String::from).to_vec(),
        "--disk needs a Linux kernel",
    );
}

#[test]
fn a_balloon_where_it_cannot_work_is_refused() {
    let dir = scratch("balloon");
    let k = write_file(&dir, "k", &fake_bzimage(0x020f, 1));
    refused(&["run", "--guest", "hello", "--memory", "64M", "--balloon", "on"], "--balloon on needs a Linux kernel");
    refused(
        &["run", "--kernel", &k, "--memory", "256M", "--balloon", "on", "--memory-backing", "anonymous"],
        "--balloon on needs --memory-backing memfd",
    );
    refused(&["run", "--kernel", &k, "--memory", "256M", "--balloon", "on", "--dormant", "off"], "--dormant off");
    refused(&["run", "--kernel", &k, "--memory", "256M", "--balloon", "maybe"], "--balloon");
    // off (or left out) is no error for any guest
    let r = shoal(&["run", "--guest", "hello", "--memory", "64M", "--balloon", "off"], LIMIT);
    if kvm_or_skip("balloon off") {
        assert_eq!(r.status, 0, "{}", r.stderr);
    }
}
