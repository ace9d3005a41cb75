//! Starting a pod's nodes: the pod file, the launcher's environment
//! (Slurm, Open MPI), where each node listens, and `shoal run --nodes N`,
//! which starts N-1 node processes on this host itself.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_fabric::{Addr, Identity, Kind, LocalRegion, Options, Transport};
use shoal_protocol::NodeId;

use crate::memory::GuestMemory;

/// The environment variable that carries the pod secret (hex), when the
/// pod file names no `secret_file`.
pub const SECRET_ENV: &str = "SHOAL_POD_SECRET";
/// Default first port of tcp and verbs pods: node i listens on PORT + i.
pub const DEFAULT_PORT: u16 = 7470;
/// Most nodes in a pod: every node connects to every other, and works out
/// every node's address before it joins (a pod file saying 400 million
/// nodes made a node allocate gigabytes of addresses).
pub const MAX_POD_NODES: u32 = 1024;

/// A pod file (`shoal node --pod POD.toml`). Every node of a pod reads the
/// same one. See README.md for an example.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodFile {
    /// Names the pod; nodes of another pod are refused.
    pub pod_id: String,
    /// Number of nodes (default: the launcher's task count).
    pub nodes: Option<u32>,
    /// shm, tcp, verbs or auto (default auto).
    pub fabric: Option<String>,
    /// tcp/verbs: node i listens on `port + i` (default 7470).
    pub port: Option<u16>,
    /// Every node's address, `host:port`, by rank (default: from the
    /// launcher's node list, with `port + rank`).
    pub addresses: Option<Vec<String>>,
    /// shm: where the nodes' sockets live (default /tmp).
    pub socket_dir: Option<PathBuf>,
    /// A file holding the pod secret (default: $SHOAL_POD_SECRET, hex).
    pub secret_file: Option<PathBuf>,
    pub memory: String,
    pub node_memory: Option<String>,
    pub guest: Option<String>,
    pub kernel: Option<PathBuf>,
    /// A Linux guest's initramfs.
    pub initrd: Option<PathBuf>,
    /// Show XSAVE and AVX to a Linux guest (default true).
    pub xsave: Option<bool>,
    /// A Linux guest's disks, `PATH` or `PATH,readonly` each (as
    /// `--disk`); node 0 serves them, only its host needs the files.
    pub disks: Option<Vec<String>>,
    pub cmdline: Option<String>,
    pub cpus: Option<u32>,
    /// Each vCPU's first node (default: contiguous blocks).
    pub placement: Option<Vec<u32>>,
    /// Whether vCPUs may move to their data (default true).
    pub migration: Option<bool>,
    /// Check every page pulled from a peer against its owner's digest
    /// (default false; every node must agree).
    pub verify_pages: Option<bool>,
    /// Which page leaves a node first under the memory bound: "clock"
    /// (default) or "fifo".
    pub eviction: Option<crate::pod::residency::Eviction>,
    /// How a bzImage's kernel is entered: "auto" (default), "pvh" or
    /// "boot64" (see `--bzimage-entry`).
    pub bzimage_entry: Option<crate::linux::BzEntry>,
    /// virtio-balloon with free page reporting (default: on for a Linux
    /// guest).
    pub balloon: Option<bool>,
    pub dormant: Option<bool>,
    pub metrics_json: Option<PathBuf>,
    pub timeout: Option<f64>,
    /// Seconds joining may take (default 30).
    pub join_timeout: Option<f64>,
    /// Seconds a node may stay silent before the pod counts it as hung
    /// (default 1.5).
    pub liveness_timeout: Option<f64>,
    /// Authenticate every fabric frame after the handshake (default
    /// false; every node must agree).
    pub frame_auth: Option<bool>,
}

impl PodFile {
    /// The pod file's text, written by the TOML serializer (strings quoted
    /// and escaped as TOML wants, whatever a path or command line holds).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a pod file serialises")
    }

    /// Reads and parses a pod file.
    pub fn read(path: &Path) -> Result<PodFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("pod file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            // one line, not the parser's excerpt of the file
            let at = e.span().map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(", line {line}, column {column}")
            });
            format!("pod file {}{}: {}", path.display(), at.unwrap_or_default(), e.message().trim())
        })
    }
}

/// Where this node stands in its pod, from flags, the launcher's
/// environment and the pod file, in that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: NodeId,
    pub nodes: u32,
    /// Where each node listens (None: learned at rendezvous over stdio).
    pub addresses: Option<Vec<Addr>>,
    /// Where this node binds.
    pub listen: Addr,
}

/// The launcher's rank and size: Slurm's, then Open MPI's.
pub fn launcher_rank_size(env: &dyn Fn(&str) -> Option<String>) -> Option<(u32, u32, &'static str)> {
    let pair = |r: &str, s: &str| Some((env(r)?.parse().ok()?, env(s)?.parse().ok()?));
    if let Some((r, s)) = pair("SLURM_PROCID", "SLURM_NTASKS") {
        return Some((r, s, "slurm"));
    }
    if let Some((r, s)) = pair("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE") {
        return Some((r, s, "mpi"));
    }
    None
}

/// Expands a Slurm host list: `n[1-3,7],gpu01` → n1 n2 n3 n7 gpu01
/// (keeping leading zeros of ranges like `n[01-03]`).
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        // one item: up to a comma outside brackets
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let item = &rest[..end];
        rest = rest[end..].trim_start_matches(',');
        match item.find('[') {
            None => out.push(item.to_string()),
            Some(open) => {
                let close =
                    item.rfind(']').filter(|&c| c > open).ok_or_else(|| format!("host list {list:?}: unclosed '['"))?;
                let (prefix, suffix) = (&item[..open], &item[close + 1..]);
                for part in item[open + 1..close].split(',') {
                    let (lo, hi) = part.split_once('-').unwrap_or((part, part));
                    let width = lo.len();
                    let bad = || format!("host list {list:?}: bad range {part:?}");
                    let (a, b): (u64, u64) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
                    if b < a || b - a > 100_000 {
                        return Err(bad());
                    }
                    for n in a..=b {
                        out.push(format!("{prefix}{n:0width$}{suffix}"));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Expands Slurm's tasks per node, `2(x3),1` → [2, 2, 2, 1].
pub fn expand_tasks_per_node(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("SLURM_STEP_TASKS_PER_NODE {s:?}: bad part {part:?}");
        match part.split_once("(x") {
            Some((n, times)) => {
                let n: u32 = n.parse().map_err(|_| bad())?;
                let times: usize = times.trim_end_matches(')').parse().map_err(|_| bad())?;
                out.extend(std::iter::repeat_n(n, times.min(100_000)));
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// Each rank's host under Slurm's block distribution.
fn slurm_hosts(env: &dyn Fn(&str) -> Option<String>, nodes: u32) -> Result<Vec<String>, String> {
    let list = env("SLURM_STEP_NODELIST").or_else(|| env("SLURM_JOB_NODELIST")).ok_or("no SLURM_STEP_NODELIST")?;
    let hosts = expand_hostlist(&list)?;
    let per_node = match env("SLURM_STEP_TASKS_PER_NODE") {
        Some(s) => expand_tasks_per_node(&s)?,
        None if hosts.len() == 1 => vec![nodes],
        None => return Err("SLURM_STEP_TASKS_PER_NODE is not set".into()),
    };
    let mut out = Vec::new();
    for (host, n) in hosts.iter().zip(per_node) {
        out.extend(std::iter::repeat_n(host.clone(), n as usize));
    }
    if out.len() < nodes as usize {
        return Err(format!("Slurm's node list {list:?} places {} tasks, not {nodes}", out.len()));
    }
    out.truncate(nodes as usize);
    Ok(out)
}

fn resolve(hostport: &str) -> Result<SocketAddr, String> {
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("address {hostport:?}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("address {hostport:?} has no IPv4 address"))
}

/// Works out this node's rank, the pod's size and every node's address.
pub fn place(
    file: &PodFile,
    kind: Kind,
    rank_flag: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Placement, String> {
    let launcher = launcher_rank_size(env);
    let rank = rank_flag
        .or(launcher.map(|l| l.0))
        .ok_or("no rank: pass --rank, or run under Slurm (SLURM_PROCID) or an MPI launcher (OMPI_COMM_WORLD_RANK)")?;
    let nodes = file
        .nodes
        .or(launcher.map(|l| l.1))
        .or(file.addresses.as_ref().map(|a| a.len() as u32))
        .ok_or("no pod size: set nodes in the pod file, or run under Slurm or an MPI launcher")?;
    if let (Some(n), Some((_, size, which))) = (file.nodes, launcher) {
        if n != size {
            return Err(format!("the pod file says {n} nodes, the {which} launcher started {size} tasks"));
        }
    }
    if nodes < 2 {
        return Err(format!("a pod needs at least 2 nodes, not {nodes}"));
    }
    if nodes > MAX_POD_NODES {
        return Err(format!("a pod has at most {MAX_POD_NODES} nodes, not {nodes}"));
    }
    if rank >= nodes {
        return Err(format!("rank {rank} is outside a pod of {nodes} nodes"));
    }
    let port = file.port.unwrap_or(DEFAULT_PORT);
    if kind == Kind::Shm {
        let dir = file.socket_dir.clone().unwrap_or_else(|| PathBuf::from("/tmp"));
        let addrs: Vec<Addr> =
            (0..nodes).map(|i| Addr::Unix(dir.join(format!("shoal-{}-{i}.sock", file.pod_id)))).collect();
        // a socket's path has room for 107 bytes (sun_path, its NUL last)
        if let Some(Addr::Unix(long)) = addrs.iter().find(|a| matches!(a, Addr::Unix(p) if p.as_os_str().len() > 107)) {
            return Err(format!(
                "the socket path {} is {} bytes, more than a Unix socket's 107: shorten socket_dir or pod_id",
                long.display(),
                long.as_os_str().len()
            ));
        }
        return Ok(Placement { rank, nodes, listen: addrs[rank as usize].clone(), addresses: Some(addrs) });
    }
    let hostports: Vec<String> = match &file.addresses {
        Some(a) if a.len() != nodes as usize => {
            return Err(format!("the pod file lists {} addresses for {nodes} nodes", a.len()))
        }
        Some(a) => a.clone(),
        None => match launcher {
            Some((_, _, "slurm")) => slurm_hosts(env, nodes)?
                .into_iter()
                .enumerate()
                .map(|(i, h)| format!("{h}:{}", u32::from(port) + i as u32))
                .collect(),
            _ if env("OMPI_COMM_WORLD_LOCAL_SIZE").is_some_and(|l| l == nodes.to_string()) => {
                (0..nodes).map(|i| format!("127.0.0.1:{}", u32::from(port) + i)).collect()
            }
            _ => return Err("no addresses: list them in the pod file (addresses = [\"host:port\", ...])".into()),
        },
    };
    let addrs = hostports.iter().map(|h| resolve(h).map(Addr::Tcp)).collect::<Result<Vec<_>, _>>()?;
    let Addr::Tcp(mine) = &addrs[rank as usize] else { unreachable!() };
    // listen on every interface at our port: the name may resolve to an
    // address of another interface than the one peers reach us by
    let listen = Addr::Tcp(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), mine.port()));
    Ok(Placement { rank, nodes, listen, addresses: Some(addrs) })
}

/// Reads the pod secret: `secret_file`, else $SHOAL_POD_SECRET (hex).
pub fn read_secret(file: &PodFile, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<u8>, String> {
    let secret = match &file.secret_file {
        Some(p) => {
            crate::config::read_input_file(p, 64 << 10).map_err(|e| format!("secret file {}: {e}", p.display()))?
        }
        None => {
            let hex = env(SECRET_ENV).ok_or_else(|| format!("no pod secret: set secret_file or ${SECRET_ENV}"))?;
            from_hex(hex.trim()).ok_or_else(|| format!("${SECRET_ENV} is not hexadecimal"))?
        }
    };
    if secret.len() < 16 {
        return Err(format!("the pod secret is {} bytes; use at least 16", secret.len()));
    }
    Ok(secret)
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The hex of `b`, as `$SHOAL_POD_SECRET` carries a secret.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh random pod secret.
pub fn random_secret() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    getrandom::getrandom(&mut s).expect("the kernel's random source");
    s
}

/// Exposes `mem` to the fabric as region 0.
pub fn memory_region(mem: &GuestMemory) -> std::io::Result<LocalRegion> {
    let memfd = mem.memfd().ok_or_else(|| std::io::Error::other("a pod needs memfd-backed memory"))?;
    let fd = memfd.try_clone()?.into();
    // SAFETY: the alias view maps the memfd from offset 0 over the whole
    // guest size, and `mem` outlives the transport (the node keeps both
    // until the transport is shut down).
    Ok(unsafe { LocalRegion::with_memfd(super::engine::REGION_MEMORY, mem.alias_base(), mem.layout().size(), fd) })
}

/// Why joining failed, and whether the configuration is at fault (a
/// wrong pod secret, another version or pod: shoal exits 2 then).
#[derive(Debug)]
pub struct JoinError {
    pub text: String,
    pub misconfigured: bool,
}

impl From<String> for JoinError {
    fn from(text: String) -> Self {
        JoinError { text, misconfigured: false }
    }
}

impl From<shoal_fabric::Error> for JoinError {
    fn from(e: shoal_fabric::Error) -> Self {
        JoinError { misconfigured: e.is_misconfiguration(), text: e.to_string() }
    }
}

/// Binds, learns the peers' addresses (from `placement`, or over
/// stdin/stdout from the process that started us), and joins the pod.
pub fn join(
    kind: Kind,
    placement: &Placement,
    pod_id: &str,
    secret: Vec<u8>,
    region: LocalRegion,
    opts: Options,
) -> Result<Box<dyn Transport>, JoinError> {
    let binding = shoal_fabric::bind(kind, &placement.listen)?;
    let addrs = match &placement.addresses {
        Some(a) => a.clone(),
        None => stdio_rendezvous(binding.local_addr(), opts.join_timeout)?,
    };
    let me = placement.rank;
    let peers: Vec<(NodeId, Addr)> =
        addrs.into_iter().enumerate().map(|(i, a)| (i as NodeId, a)).filter(|(i, _)| *i != me).collect();
    let id = Identity { node: me, pod_id: pod_id.to_string(), secret };
    Ok(binding.join(id, &peers, vec![region], opts)?)
}

/// A node started by `shoal run --nodes N`: print where we listen, read
/// every node's address (`PEERS a0 a1 ...`) from stdin.
fn stdio_rendezvous(mine: &Addr, timeout: Duration) -> Result<Vec<Addr>, String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "LISTEN {}", addr_text(mine)).and_then(|()| out.flush()).map_err(|e| e.to_string())?;
    drop(out);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(std::io::stdin().lock().read_line(&mut line).map(|_| line));
    });
    let line = rx
        .recv_timeout(timeout)
        .map_err(|_| format!("no peer list on stdin within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let list = line.trim().strip_prefix("PEERS ").ok_or_else(|| format!("expected PEERS on stdin, got {line:?}"))?;
    list.split(' ').map(parse_addr).collect()
}

fn addr_text(a: &Addr) -> String {
    match a {
        Addr::Unix(p) => format!("unix:{}", p.display()),
        Addr::Tcp(s) => format!("tcp:{s}"),
    }
}

fn parse_addr(s: &str) -> Result<Addr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Addr::Unix(PathBuf::from(p)));
    }
    let t = s.strip_prefix("tcp:").ok_or_else(|| format!("bad address {s:?}"))?;
    t.parse().map(Addr::Tcp).map_err(|e| format!("bad address {s:?}: {e}"))
}

/// The N-1 node processes `shoal run --nodes N` started on this host.
#[derive(Debug)]
pub struct LocalNodes {
    children: Vec<(NodeId, Child)>,
    dir: PathBuf,
}

impl LocalNodes {
    /// Starts nodes 1..n as `shoal node --pod FILE --rank i`, each told to
    /// bind `listen(i)`. Returns them once every one listens, with every
    /// node's address (node 0's is `node0`); they get the list when
    /// [`LocalNodes::send_peers`] is called.
    pub fn spawn(
        file: &PodFile,
        secret: &[u8],
        node0: &Addr,
        listen: impl Fn(NodeId) -> Addr,
        timeout: Duration,
    ) -> Result<(LocalNodes, Vec<Addr>), String> {
        let nodes = file.nodes.unwrap_or(1);
        let dir = std::env::temp_dir().join(format!("shoal-pod-{}", file.pod_id));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pod_path = dir.join("pod.toml");
        std::fs::write(&pod_path, file.to_toml()).map_err(|e| format!("{}: {e}", pod_path.display()))?;
        let exe = std::env::current_exe().map_err(|e| format!("finding shoal's own executable: {e}"))?;
        let mut me = LocalNodes { children: Vec::new(), dir };
        let mut addrs = vec![node0.clone()];
        let deadline = Instant::now() + timeout;
        for i in 1..nodes {
            let mut cmd = Command::new(&exe);
            cmd.arg("node")
                .arg("--pod")
                .arg(&pod_path)
                .args(["--rank", &i.to_string(), "--listen", &addr_text(&listen(i)), "--rendezvous", "stdio"])
                .env(SECRET_ENV, to_hex(secret))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; it only
            // makes the child die with us, so no node outlives shoal run.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(|e| format!("starting node {i}: {e}"))?;
            let stdout = child.stdout.take().expect("piped");
            me.children.push((i, child));
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                let _ = tx.send(r.read_line(&mut line).map(|_| line));
                // keep draining so the node never blocks on a full pipe
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(Ok(l)) if l.starts_with("LISTEN ") => l,
                Ok(Ok(_)) | Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("node {i} exited before it listened"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("node {i} did not listen within {timeout:?}"))
                }
            };
            addrs.push(parse_addr(line.trim().trim_start_matches("LISTEN "))?);
        }
        Ok((me, addrs))
    }

    /// Tells every started node where every node listens.
    pub fn send_peers(&mut self, addrs: &[Addr]) -> Result<(), String> {
        let line = format!("PEERS {}\n", addrs.iter().map(addr_text).collect::<Vec<_>>().join(" "));
        for (i, c) in &mut self.children {
            let stdin = c.stdin.as_mut().expect("piped");
            stdin.write_all(line.as_bytes()).map_err(|e| format!("telling node {i} its peers: {e}"))?;
        }
        Ok(())
    }

    /// The started nodes' process ids, by node.
    pub fn pids(&self) -> Vec<(NodeId, u32)> {
        self.children.iter().map(|(i, c)| (*i, c.id())).collect()
    }

    /// Waits (bounded) for every node to exit; kills the ones that do not.
    /// Returns the nodes that failed, with how.
    pub fn wait(mut self, timeout: Duration) -> Vec<(NodeId, String)> {
        let deadline = Instant::now() + timeout;
        let mut failed = Vec::new();
        for (i, c) in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(st)) if st.success() => break,
                    Ok(Some(st)) => {
                        failed.push((*i, st.to_string()));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    Ok(None) | Err(_) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        failed.push((*i, "did not exit; killed".into()));
                        break;
                    }
                }
            }
        }
        self.children.clear();
        failed
    }
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fabric options of every node of a pod.
pub fn fabric_options(join_timeout: Duration, liveness: Duration, authenticate_frames: bool) -> shoal_fabric::Options {
    shoal_fabric::Options {
        join_timeout,
        // a read a peer does not answer within the silence limit is that
        // peer not answering: the same bound, so a hung node is named
        // within it whichever notices first (a page read on the receiving
        // thread, or the beats)
        io_timeout: liveness,
        authenticate_frames,
        // the page engine exposes what peers may read, page by page: a
        // peer's request for a whole chunk's key is refused
        chunk_keys: false,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_nodes_refuse_chunk_keys_and_bound_io_by_the_liveness_limit() {
        let o = fabric_options(Duration::from_secs(7), Duration::from_millis(1500), true);
        // (what refusing chunk keys does: the fabric's conformance test
        // `without_chunk_keys`; pod-verbs counts no chunk registered)
        assert!(!o.chunk_keys, "the page engine exposes pages itself: no peer may pin a chunk");
        assert_eq!((o.join_timeout, o.io_timeout), (Duration::from_secs(7), Duration::from_millis(1500)));
        assert!(o.authenticate_frames);
    }
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn slurm_host_lists_expand() {
        assert_eq!(expand_hostlist("n[1-3,7],gpu01").unwrap(), ["n1", "n2", "n3", "n7", "gpu01"]);
        assert_eq!(expand_hostlist("c[08-10]").unwrap(), ["c08", "c09", "c10"]);
        assert_eq!(expand_hostlist("solo").unwrap(), ["solo"]);
        assert!(expand_hostlist("n[1-").is_err());
        assert!(expand_hostlist("n[3-1]").is_err());
        assert!(expand_hostlist("a]b[c").is_err());
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert!(expand_tasks_per_node("x").is_err());
    }

    #[test]
    fn rank_size_and_addresses_come_from_slurm() {
        let env = env_of(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "3"),
            ("SLURM_STEP_NODELIST", "localhost"),
            ("SLURM_STEP_TASKS_PER_NODE", "3"),
        ]);
        let file = PodFile { pod_id: "p".into(), port: Some(9000), ..Default::default() };
        let p = place(&file, Kind::Tcp, None, &env).unwrap();
        assert_eq!((p.rank, p.nodes), (1, 3));
        let ports: Vec<u16> =
            p.addresses.unwrap().iter().map(|a| if let Addr::Tcp(s) = a { s.port() } else { 0 }).collect();
        assert_eq!(ports, [9000, 9001, 9002]);
        assert_eq!(p.listen, Addr::Tcp("0.0.0.0:9001".parse().unwrap()));
    }

    #[test]
    fn mpi_ranks_and_bad_placements() {
        let env = env_of(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]);
        let file = PodFile { pod_id: "p".into(), ..Default::default() };
        let p = place(&file, Kind::Tcp, None, &env).unwrap();
        assert_eq!((p.rank, p.nodes), (0, 2));
        let none = env_of(&[]);
        assert!(place(&file, Kind::Tcp, None, &none).unwrap_err().contains("no rank"));
        let three = PodFile { nodes: Some(3), ..file.clone() };
        assert!(place(&three, Kind::Tcp, None, &env).unwrap_err().contains("3 nodes"));
        let one = PodFile { nodes: Some(1), ..file.clone() };
        assert!(place(&one, Kind::Shm, Some(0), &none).unwrap_err().contains("at least 2"));
        let two = PodFile { nodes: Some(2), ..file.clone() };
        assert!(place(&two, Kind::Shm, Some(5), &none).unwrap_err().contains("outside"));
        // found by fuzz/ (pod_file): 400 million nodes in a pod file took
        // more than 2 GiB for their addresses before anything was checked
        let huge = PodFile { nodes: Some(400_000_000), ..file.clone() };
        assert!(place(&huge, Kind::Shm, Some(0), &none).unwrap_err().contains("at most 1024"));
        let most = PodFile { nodes: Some(MAX_POD_NODES), ..file };
        assert_eq!(place(&most, Kind::Shm, Some(0), &none).unwrap().addresses.unwrap().len(), 1024);
    }

    #[test]
    fn secrets_and_pod_files() {
        let file = PodFile { pod_id: "p".into(), ..Default::default() };
        let env = env_of(&[(SECRET_ENV, "00112233445566778899aabbccddeeff")]);
        assert_eq!(read_secret(&file, &env).unwrap().len(), 16);
        assert!(read_secret(&file, &env_of(&[(SECRET_ENV, "abc")])).is_err());
        assert!(read_secret(&file, &env_of(&[(SECRET_ENV, "0011")])).unwrap_err().contains("at least 16"));
        assert!(read_secret(&file, &env_of(&[])).unwrap_err().contains("no pod secret"));
        let text = (PodFile {
            pod_id: "x".into(),
            memory: "64M".into(),
            nodes: Some(3),
            guest: Some("memtouch".into()),
            dormant: Some(false),
            eviction: Some(crate::pod::residency::Eviction::Fifo),
            balloon: Some(false),
            bzimage_entry: Some(crate::linux::BzEntry::Boot64),
            ..Default::default()
        })
        .to_toml();
        assert!(text.contains("eviction = \"fifo\""), "{text}");
        assert!(text.contains("bzimage_entry = \"boot64\""), "{text}");
        assert!(text.contains("balloon = false"), "{text}");
        let back: PodFile = toml::from_str(&text).unwrap();
        assert_eq!((back.nodes, back.guest.as_deref(), back.dormant), (Some(3), Some("memtouch"), Some(false)));
        assert_eq!(back.eviction, Some(crate::pod::residency::Eviction::Fifo));
        assert_eq!(back.balloon, Some(false));
        assert_eq!(back.bzimage_entry, Some(crate::linux::BzEntry::Boot64));
        assert!(toml::from_str::<PodFile>("pod_id = \"x\"\nmemory = \"1G\"\nbzimage_entry = \"x\"\n").is_err());
        assert!(toml::from_str::<PodFile>("pod_id = \"x\"\nmemory = \"1G\"\nballoon = \"on\"\n").is_err());
        assert!(toml::from_str::<PodFile>("pod_id = \"x\"\nmemory = \"1G\"\neviction = \"lru\"\n").is_err());
        assert!(toml::from_str::<PodFile>("pod_id = \"x\"\nmemory = \"1G\"\nbogus = 1\n").is_err());
    }
}
