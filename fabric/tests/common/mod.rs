//! Pods of fabric nodes for the tests: in threads of this process, or as
//! child processes (which can be killed, stopped, or put in network
//! namespaces). A child is this same test binary re-run with
//! `SHOAL_FABRIC_CHILD` set; see [`child_main`].

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shoal_fabric::{bind, Addr, Identity, Kind, LocalRegion, NodeId, Options, Transport};

/// Bytes every test node exposes as region 0.
pub const REGION: u64 = 8 << 20;

/// splitmix64's finaliser.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The byte at `offset` of node `node`'s region.
pub fn pattern_byte(node: NodeId, offset: u64) -> u8 {
    let word = mix64((u64::from(node) << 48) ^ (offset / 8));
    word.to_le_bytes()[(offset % 8) as usize]
}

pub fn expected(node: NodeId, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(node, offset + i)).collect()
}

/// A node's memory: a sealed memfd holding the pattern, mapped once.
pub struct Memory {
    pub ptr: *mut u8,
    pub len: u64,
    pub fd: OwnedFd,
}

// SAFETY: plain shared memory; the tests only read it after filling.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Memory {
    pub fn new(node: NodeId, len: u64) -> Memory {
        Self::with_seals(node, len, true)
    }

    /// A memfd that may still shrink: the shm backend must refuse it.
    pub fn unsealed(node: NodeId, len: u64) -> Memory {
        Self::with_seals(node, len, false)
    }

    fn with_seals(node: NodeId, len: u64, sealed: bool) -> Memory {
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"fabric-test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: sizing and sealing our own memfd.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as i64), 0);
            if sealed {
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), 0);
            }
        }
        // SAFETY: a new shared mapping of our memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let ptr = ptr.cast::<u8>();
        for w in 0..len / 8 {
            let v = mix64((u64::from(node) << 48) ^ w);
            // SAFETY: inside the mapping, 8-byte aligned.
            unsafe { ptr.cast::<u64>().add(w as usize).write(v.to_le()) };
        }
        Memory { ptr, len, fd }
    }

    pub fn region(&self) -> LocalRegion {
        // SAFETY: the memory outlives the transports of every test (each
        // test keeps its Memory until after its transports are dropped).
        unsafe { LocalRegion::with_memfd(0, self.ptr, self.len, self.fd.try_clone().unwrap()) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

/// Whether tests of `kind` can run here; prints loudly when not. Verbs
/// needs an RDMA device (the soft-RoCE harness has one, and sets
/// SHOAL_REQUIRE_VERBS=1 so that a missing device fails instead).
pub fn can_run(kind: Kind, test: &str) -> bool {
    if kind != Kind::Verbs {
        return true;
    }
    if shoal_fabric::verbs::device_present() {
        return true;
    }
    if std::env::var("SHOAL_REQUIRE_VERBS").as_deref() == Ok("1") {
        panic!("{test}: no RDMA device and SHOAL_REQUIRE_VERBS=1");
    }
    // straight to the process's stderr: the test harness captures eprintln!
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test} over verbs: no RDMA device here (ci/softroce.sh runs it on soft-RoCE) ***"
    );
    false
}

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-fabric-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The address a node of `kind` binds in a test.
pub fn test_addr(kind: Kind, dir: &std::path::Path, node: NodeId) -> Addr {
    match kind {
        Kind::Shm => Addr::Unix(dir.join(format!("node{node}.sock"))),
        Kind::Tcp | Kind::Verbs => Addr::Tcp("127.0.0.1:0".parse().unwrap()),
    }
}

/// Options of the test nodes: short bounds, and frames authenticated (off
/// by default) so that the suite runs every backend through the tagged
/// framing.
pub fn quick_options() -> Options {
    Options {
        join_timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(2),
        authenticate_frames: true,
        ..Options::default()
    }
}

/// A pod of `n` nodes in threads of this process. `secrets[i]` is node
/// i's pod secret. Returns each node's join result and its memory.
pub fn pod_with(
    kind: Kind,
    n: u32,
    secrets: &[&[u8]],
    opts: Options,
) -> Vec<(shoal_fabric::Result<Box<dyn Transport>>, Memory)> {
    pod_with_each(kind, &vec![opts; n as usize], secrets)
}

/// Nodes that join with options of their own (node i with `opts[i]`).
pub fn pod_with_each(
    kind: Kind,
    opts: &[Options],
    secrets: &[&[u8]],
) -> Vec<(shoal_fabric::Result<Box<dyn Transport>>, Memory)> {
    let n = opts.len() as u32;
    let dir = scratch(&format!("pod-{kind}-{}", rand_u64()));
    let bindings: Vec<_> = (0..n).map(|i| bind(kind, &test_addr(kind, &dir, i)).unwrap()).collect();
    let addrs: Vec<Addr> = bindings.iter().map(|b| b.local_addr().clone()).collect();
    let mut threads = Vec::new();
    for (i, b) in bindings.into_iter().enumerate() {
        let i = i as u32;
        let peers: Vec<(NodeId, Addr)> = (0..n).filter(|&j| j != i).map(|j| (j, addrs[j as usize].clone())).collect();
        let secret = secrets[i as usize].to_vec();
        let opts = opts[i as usize].clone();
        threads.push(std::thread::spawn(move || {
            let mem = Memory::new(i, REGION);
            let id = Identity { node: i, pod_id: "test-pod".into(), secret };
            let t = b.join(id, &peers, vec![mem.region()], opts);
            (t, mem)
        }));
    }
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A pod whose every node joined.
pub fn pod(kind: Kind, n: u32) -> (Vec<Box<dyn Transport>>, Vec<Memory>) {
    let secrets: Vec<&[u8]> = (0..n).map(|_| b"pod secret".as_slice()).collect();
    let mut ts = Vec::new();
    let mut ms = Vec::new();
    for (i, (t, m)) in pod_with(kind, n, &secrets, quick_options()).into_iter().enumerate() {
        ts.push(t.unwrap_or_else(|e| panic!("node {i} failed to join: {e}")));
        ms.push(m);
    }
    (ts, ms)
}

pub fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom_fill(&mut b);
    u64::from_le_bytes(b)
}

fn getrandom_fill(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").unwrap().read_exact(b).unwrap();
}

/// A small deterministic generator for reproducible random reads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix64(self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------
// child processes

/// A node in a child process. Lines on its stdout: `LISTEN addr`,
/// `JOINED`, then the result of its action; it reads `PEERS id=addr,...`
/// on stdin. Closing its stdin ends a serving child.
pub struct ChildNode {
    pub child: Child,
    pub addr: String,
    out: BufReader<std::process::ChildStdout>,
}

impl ChildNode {
    /// Starts node `node` of `kind` with `action` (`serve`, or `read-verify
    /// PEER COUNT`), optionally inside network namespace `netns`, listening
    /// on `listen`.
    pub fn start(kind: Kind, node: NodeId, listen: &str, action: &str, netns: Option<&str>) -> ChildNode {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env("SHOAL_FABRIC_CHILD", format!("{}|{node}|{listen}|{action}", kind.name()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn a child node");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("child node {node} exited before listening");
            }
            // the test harness may print "test child_entry ... " first
            if let Some(at) = line.find("LISTEN ") {
                break line[at + 7..].trim().to_string();
            }
        };
        ChildNode { child, addr, out }
    }

    pub fn send_peers(&mut self, peers: &[(NodeId, String)]) {
        let list: Vec<String> = peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "PEERS {}", list.join(",")).unwrap();
        stdin.flush().unwrap();
    }

    /// Stops the child with SIGSTOP and waits until every one of its
    /// threads is really stopped: kill(2) returns before the signal takes
    /// effect, and a thread already on a CPU may serve one more request
    /// (CI saw a tcp read answered after kill returned).
    pub fn stop(&mut self) {
        let pid = self.child.id();
        // SAFETY: SIGSTOP to our own child, which we have not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "child {pid} did not stop within 5 s");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Resumes a child stopped by [`ChildNode::stop`].
    pub fn resume(&mut self) {
        // SAFETY: SIGCONT to our own child, which we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// The next line the child prints (after LISTEN).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

/// Whether every thread of `pid` is in state `T` (stopped) per /proc.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // the state follows the command name in parentheses, which may hold spaces
        stat.rfind(')').and_then(|at| stat[at + 1..].split_whitespace().next()) == Some("T")
    })
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs in the child process.
pub fn child_main(spec: &str) {
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let kind: Kind = parts[0].parse().unwrap();
    let node: NodeId = parts[1].parse().unwrap();
    let listen = match kind {
        Kind::Shm => Addr::Unix(PathBuf::from(parts[2])),
        _ => Addr::Tcp(parts[2].parse::<SocketAddr>().unwrap()),
    };
    let action = parts[3];
    let binding = bind(kind, &listen).unwrap();
    let shown = match binding.local_addr() {
        Addr::Unix(p) => p.display().to_string(),
        Addr::Tcp(a) => a.to_string(),
    };
    println!("LISTEN {shown}");
    let stdin = std::io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line).unwrap();
    let peers: Vec<(NodeId, Addr)> = line
        .trim()
        .strip_prefix("PEERS ")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|p| {
            let (id, a) = p.split_once('=').unwrap();
            let addr = match kind {
                Kind::Shm => Addr::Unix(PathBuf::from(a)),
                _ => Addr::Tcp(a.parse().unwrap()),
            };
            (id.parse().unwrap(), addr)
        })
        .collect();
    let mem = Memory::new(node, REGION);
    let id = Identity { node, pod_id: "test-pod".into(), secret: b"pod secret".to_vec() };
    let t = binding.join(id, &peers, vec![mem.region()], quick_options()).unwrap();
    println!("JOINED");
    let words: Vec<&str> = action.split(' ').collect();
    match words[0] {
        "serve" => {
            // until the parent closes stdin (or kills us)
            let mut rest = String::new();
            let _ = stdin.lock().read_line(&mut rest);
        }
        "read-verify" => {
            let peer: NodeId = words[1].parse().unwrap();
            let count: u64 = words[2].parse().unwrap();
            let mut rng = Rng(u64::from(node) * 1000 + 7);
            for _ in 0..count {
                let len = (1 + rng.below(64)) as usize * 1024;
                let off = rng.below(REGION - len as u64);
                let mut buf = vec![0u8; len];
                t.read(peer, &mut [shoal_fabric::ReadOp { region: 0, offset: off, buf: &mut buf }]).unwrap();
                assert_eq!(buf, expected(peer, off, len), "bytes at {off:#x}+{len}");
            }
            println!("VERIFIED {count} bytes_read={}", t.stats().bytes_read);
        }
        other => panic!("unknown action {other}"),
    }
    t.shutdown();
    drop(mem);
}

/// Receives the descriptors of one SCM_RIGHTS message (and its one byte),
/// as a peer of the shm backend does.
pub fn recv_fds(sock: std::os::fd::RawFd) -> std::io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut cbuf = [0u64; 64];
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: every buffer `msg` points to is ours and sized as declared.
    if unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    // SAFETY: the CMSG macros walk what the kernel wrote into `cbuf`; each
    // descriptor it installed is ours to own once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                let n = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(out)
}

/// The inode of an open descriptor.
pub fn inode(fd: &OwnedFd) -> u64 {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
    f.metadata().unwrap().ino()
}

/// The mappings of this process of the file with inode `ino`: (start,
/// length, permissions as /proc/self/maps shows them).
pub fn mappings_of(ino: u64) -> Vec<(usize, usize, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[4].parse::<u64>().ok()? != ino {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
            Some((a, b - a, f[1].to_string()))
        })
        .collect()
}

/// A man in the middle for one tcp connection: listens on a fresh port,
/// forwards the first connection it accepts to `target` and back, and
/// flips the lowest bit of the byte at offset `flip_at` of what `target`
/// sends. Returns the address to dial instead of `target`.
pub fn flipping_proxy(target: SocketAddr, flip_at: u64) -> SocketAddr {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (client, _) = l.accept().unwrap();
        let server = std::net::TcpStream::connect(target).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
            let _ = s2.shutdown(std::net::Shutdown::Write);
        });
        let (mut from, mut to) = (server, client);
        let mut at = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (at..at + n as u64).contains(&flip_at) {
                buf[(flip_at - at) as usize] ^= 1;
            }
            at += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    addr
}
