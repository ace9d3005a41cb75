//! Helpers for the integration tests: run the real `shoal` binary under a
//! hard time bound, read its metrics, build tiny ELF images.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether KVM is here. Without it the test says so loudly and skips,
/// unless SHOAL_REQUIRE_KVM=1 (set by CI, whose machines have KVM), where
/// a missing /dev/kvm is a failure rather than a silent pass.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::File::options().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        if std::env::var("SHOAL_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and SHOAL_REQUIRE_KVM=1");
        }
        // straight to the process's stderr: the test harness captures eprintln!
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: /dev/kvm is missing or not accessible ***");
    }
    ok
}

/// What one run of `shoal` did.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub metrics: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl Run {
    /// The node-0 metric `key` as u64.
    pub fn metric(&self, key: &str) -> u64 {
        let m = self.metrics.as_ref().unwrap_or_else(|| panic!("no metrics; stderr:\n{}", self.stderr));
        m["total"][key].as_u64().unwrap_or_else(|| panic!("metric {key} missing in {m}"))
    }

    /// Fails with the run's output unless the status is `want`.
    pub fn expect_status(&self, want: i32) -> &Self {
        assert_eq!(self.status, want, "exit status; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

pub fn shoal_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal"))
}

/// A scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether a test that needs KVM and a debug build's test hooks
/// (`SHOAL_TEST_*`, which release builds ignore) can run; says why not.
pub fn kvm_and_test_hooks_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if !cfg!(debug_assertions) {
        eprintln!("\n*** SKIPPED: {test}: its test hooks are in debug builds only ***");
        return false;
    }
    true
}

/// Runs `shoal ARGS --metrics-json FILE` (for `run`), killing it after
/// `limit`: a hang is a test failure, never a stuck suite.
pub fn shoal(args: &[&str], limit: Duration) -> Run {
    shoal_with_env(args, &[], limit)
}

/// [`shoal`] with `env` added to its environment.
pub fn shoal_with_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let dir = scratch(&format!("run{}", rand_suffix()));
    let metrics_path = dir.join("metrics.json");
    let mut cmd = Command::new(shoal_bin());
    cmd.args(args).envs(env.iter().copied());
    if args.first() == Some(&"run") {
        cmd.arg("--metrics-json").arg(&metrics_path);
    }
    let out = run_bounded(cmd, limit);
    let metrics = std::fs::read_to_string(&metrics_path).ok().map(|s| serde_json::from_str(&s).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    Run { metrics, ..out }
}

/// Runs a command with stdin closed, capturing output, killed at `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?} (a hang)\nstdout:\n{}\nstderr:\n{}",
                out_t.join().unwrap(),
                err_t.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    let status = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Run {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        metrics: None,
        elapsed: start.elapsed(),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1_000_000 + u64::from(std::process::id())
}

/// splitmix64's finaliser, as the guests' runtime has it.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The checksum memtouch must print for `mib` and `seed` when every page
/// read back what was written: computed here independently of the guest.
pub fn expected_checksum(mib: u64, seed: u64) -> u64 {
    let mut c = 0u64;
    for page in 0..mib * 256 {
        let v = mix64(seed ^ page);
        c = mix64(c ^ v);
        c = mix64(c ^ v);
    }
    c
}

/// The `checksum=0x...` value a guest printed.
pub fn printed_checksum(stdout: &str) -> u64 {
    let hex = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checksum=0x"))
        .unwrap_or_else(|| panic!("no checksum in:\n{stdout}"));
    u64::from_str_radix(hex, 16).unwrap()
}

/// A minimal static ELF: one PT_LOAD segment holding `code` at `paddr`,
/// entered at its first byte. `class` 2 is 64-bit, 1 is 32-bit (a wrong
/// image for shoal).
pub fn tiny_elf(code: &[u8], paddr: u64, class: u8) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = class;
    e[5] = 1; // little-endian
    e[6] = 1; // version
    let put16 = |e: &mut Vec<u8>, o: usize, v: u16| e[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |e: &mut Vec<u8>, o: usize, v: u32| e[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |e: &mut Vec<u8>, o: usize, v: u64| e[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut e, 16, 2); // ET_EXEC
    put16(&mut e, 18, 62); // EM_X86_64
    put32(&mut e, 20, 1);
    put64(&mut e, 24, paddr); // entry
    put64(&mut e, 32, 64); // phoff
    put16(&mut e, 52, 64); // ehsize
    put16(&mut e, 54, 56); // phentsize
    put16(&mut e, 56, 1); // phnum
    let ph = 64;
    put32(&mut e, ph, 1); // PT_LOAD
    put32(&mut e, ph + 4, 5); // R+X
    put64(&mut e, ph + 8, 0x1000); // offset
    put64(&mut e, ph + 16, paddr); // vaddr
    put64(&mut e, ph + 24, paddr); // paddr
    put64(&mut e, ph + 32, code.len() as u64); // filesz
    put64(&mut e, ph + 40, code.len() as u64); // memsz
    put64(&mut e, ph + 48, 0x1000);
    e.extend_from_slice(code);
    e
}

/// Writes `bytes` to `dir/name` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// A pod started in the background (`shoal ARGS`, stdout discarded), for
/// tests that do something to its nodes while it runs.
pub struct BackgroundPod {
    child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
}

/// Whether process `pid` has a vCPU thread (named `shoal-vcpu...`).
pub fn runs_a_vcpu(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .filter_map(|t| t.ok())
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("shoal-vcpu")))
}

/// How a background pod ended.
#[derive(Debug)]
pub struct PodEnd {
    /// From the moment given to `BackgroundPod::end` to the exit.
    pub took: Duration,
    pub status: Option<i32>,
    pub stderr: String,
    /// Its `shoal: error: the VM failed: ...` line, if any.
    pub failure: String,
}

impl BackgroundPod {
    pub fn start(args: &[&str]) -> BackgroundPod {
        let mut child = Command::new(shoal_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        BackgroundPod { child, stderr }
    }

    /// The process id of node `n` (its `n`-th child) once all `members`
    /// member nodes run, node 0 runs a vCPU (it starts them only once the
    /// pod has joined: what is done to a node afterwards meets a running
    /// guest, not a join) and the guest has gone on for `after` since.
    pub fn node(&mut self, n: usize, members: usize, after: Duration) -> u32 {
        let start = Instant::now();
        let mut running: Option<Instant> = None;
        loop {
            let pid = self.child.id();
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            let kids: Vec<u32> = text.split_whitespace().filter_map(|s| s.parse().ok()).collect();
            if running.is_none() && kids.len() == members && runs_a_vcpu(pid) {
                running = Some(Instant::now());
            }
            if running.is_some_and(|t| t.elapsed() > after) && kids.len() == members {
                return kids[n - 1];
            }
            assert!(running.is_some() || start.elapsed() < Duration::from_secs(30), "the pod did not start");
            assert!(self.child.try_wait().unwrap().is_none(), "the pod ended early");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the pod to end; longer than `bound` after `since` is a
    /// hang (the test fails, the pod is killed).
    pub fn end(mut self, since: Instant, bound: Duration) -> PodEnd {
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if since.elapsed() > bound {
                let _ = self.child.kill();
                panic!("the pod did not end within {bound:?} (a hang)");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = since.elapsed();
        let stderr = self.stderr.join().unwrap();
        let failure =
            stderr.lines().find(|l| l.starts_with("shoal: error: the VM failed")).unwrap_or_default().to_string();
        PodEnd { took, status: status.code(), stderr, failure }
    }
}
