//! What connections that never authenticate can do to a joining node:
//! hold at most `MAX_PENDING_HANDSHAKES` handshakes (threads), send no
//! more than a Hello's worth of bytes before they are dropped, and never
//! end a join that an honest peer completes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use shoal_fabric::wire::{read_handshake_frame, write_frame, Frame, MAX_FRAME};
use shoal_fabric::{bind, Addr, Identity, Kind, MAX_PENDING_HANDSHAKES};

/// The child-process entry point: a no-op unless SHOAL_FABRIC_CHILD is set.
#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("SHOAL_FABRIC_CHILD") {
        child_main(&spec);
    }
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn id(node: u32, secret: &[u8]) -> Identity {
    Identity { node, pod_id: "test-pod".into(), secret: secret.to_vec() }
}

/// 48 connections that never authenticate (32 silent, 8 sending junk, 8
/// with the wrong secret) are open while node 0 joins: its threads stay
/// within the cap on pending handshakes, and the honest node 1 still joins.
#[test]
fn a_join_completes_while_bogus_connections_hold_every_slot() {
    let mut child = ChildNode::start(Kind::Tcp, 0, "127.0.0.1:0", "serve", None);
    let pid = child.child.id();
    let addr0: SocketAddr = child.addr.parse().unwrap();
    let baseline = threads_of(pid);
    let dir = scratch("bogus");
    let b1 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &dir, 1)).unwrap();
    let a1 = b1.local_addr().to_string();
    child.send_peers(&[(1, a1)]);

    let mut held = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..48 {
        match i % 6 {
            0..=3 => held.push(TcpStream::connect(addr0).unwrap()),
            4 => {
                let mut s = TcpStream::connect(addr0).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: shoal\r\n\r\n").unwrap();
                held.push(s);
            }
            _ => wrong.push(std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr0).unwrap();
                shoal_fabric::auth::handshake(&mut s, &id(1, b"a guess"), Kind::Tcp, Some(0), true).map(|_| ())
            })),
        }
    }
    // node 0 is accepting them all now: watch its threads (the wrong
    // secrets claim node 1, so node 0 also checks node 1's address: one
    // probe thread at a time)
    let bound = baseline + MAX_PENDING_HANDSHAKES + 1 + 2;
    let mut most = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        most = most.max(threads_of(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        most <= bound,
        "node 0 ran {most} threads with 48 unauthenticated connections open ({baseline} before; the cap is \
         {MAX_PENDING_HANDSHAKES} handshakes, plus a probe, plus 2 for threads that are ending)"
    );
    // every wrong secret fails. When the slots are full, a new connection
    // cuts the oldest unfinished handshake, so a wrong-secret client slow
    // to send its proof may be cut first and hear only a closed
    // connection; the last to connect has at most 7 connections after it
    // and is never cut, so some must hear the refusal
    let errors: Vec<String> = wrong.into_iter().map(|w| w.join().unwrap().unwrap_err().to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("wrong pod secret")), "no wrong secret was named: {errors:?}");
    for e in &errors {
        let cut = ["connection closed", "reset", "Broken pipe"].iter().any(|w| e.contains(w));
        assert!(e.contains("wrong pod secret") || cut, "neither refused nor cut: {e}");
    }

    // the honest node 1 joins while the silent connections are still open.
    // They would hold node 0's handshake slots for 10 s (its handshake
    // bound): joining within 5 s takes the cut of the oldest handshake.
    let mem = Memory::new(1, REGION);
    let opts = shoal_fabric::Options { join_timeout: Duration::from_secs(5), ..quick_options() };
    let t = b1.join(id(1, b"pod secret"), &[(0, Addr::Tcp(addr0))], vec![mem.region()], opts);
    let t = t.unwrap_or_else(|e| panic!("node 1 could not join beside the bogus connections: {e}"));
    assert_eq!(child.line(), "JOINED", "node 0 joined too");
    assert!(t.peers() == vec![0]);
    drop(held);
}

/// Before authentication a frame is at most a Hello: a client that
/// announces a 1 MiB frame (fine after authentication) is disconnected at
/// once, without node 0 waiting for or allocating the megabyte; then the
/// honest node 1 joins.
#[test]
fn a_preauth_frame_over_the_bound_is_dropped_at_once() {
    let dir = scratch("preauth-bound");
    let b0 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &dir, 0)).unwrap();
    let b1 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &dir, 1)).unwrap();
    let (a0, a1) = (b0.local_addr().clone(), b1.local_addr().clone());
    let Addr::Tcp(sa0) = a0.clone() else { unreachable!() };
    let node0 = std::thread::spawn(move || {
        let mem = Memory::new(0, REGION);
        b0.join(id(0, b"pod secret"), &[(1, a1)], vec![mem.region()], quick_options()).map(|t| t.peers())
    });
    let mut s = TcpStream::connect(sa0).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(read_handshake_frame(&mut s).unwrap(), Frame::Hello(_)), "node 0 says Hello first");
    let claim = (1u32 << 20).to_le_bytes();
    const { assert!(1 << 20 <= MAX_FRAME, "a length a frame may have after authentication") };
    s.write_all(&claim).unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    // closed (EOF) or reset: either way not left waiting for the megabyte
    match r {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("node 0 kept the connection open after a 1 MiB pre-auth length ({e}, {:?})", start.elapsed()),
    }
    let mem = Memory::new(1, REGION);
    let t1 = b1.join(id(1, b"pod secret"), &[(0, a0)], vec![mem.region()], quick_options());
    assert_eq!(t1.unwrap().peers(), vec![0]);
    assert_eq!(node0.join().unwrap().unwrap(), vec![1], "the bogus client did not end node 0's join");
}

/// Answers a dialer's Hello as a node with another pod secret would, before
/// any proof (anyone can): returns whether a Hello came and was refused.
fn refuse_hello(s: &mut TcpStream) -> bool {
    if !matches!(read_handshake_frame(s), Ok(Frame::Hello(_))) {
        return false;
    }
    let reason = "authentication failed: wrong pod secret".into();
    write_frame(s, &Frame::Refuse { reason }).is_ok()
}

/// A listener at node 0's address that is not node 0, node 1's address,
/// and node 1 joining in a thread of its own (with `opts`), dialing it.
fn node1_dialing_a_squatter(
    tag: &str,
    opts: shoal_fabric::Options,
) -> (TcpListener, Addr, std::thread::JoinHandle<shoal_fabric::Result<Vec<u32>>>) {
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr0 = Addr::Tcp(squatter.local_addr().unwrap());
    let b1 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &scratch(tag), 1)).unwrap();
    let a1 = b1.local_addr().clone();
    let node1 = std::thread::spawn(move || {
        let mem = Memory::new(1, REGION);
        b1.join(id(1, b"pod secret"), &[(0, addr0)], vec![mem.region()], opts).map(|t| t.peers())
    });
    (squatter, a1, node1)
}

/// Whatever answers the address of the node we dial first refuses us
/// (anyone can send a Refuse before authentication); the real node 0 then
/// listens there. The dialing node keeps trying and joins.
#[test]
fn a_refusal_before_authentication_does_not_end_a_dialers_join() {
    let (squatter, a1, node1) = node1_dialing_a_squatter("squatter", quick_options());
    let addr0 = squatter.local_addr().unwrap();
    let (mut s, _) = squatter.accept().unwrap();
    assert!(refuse_hello(&mut s), "no Hello came");
    drop((s, squatter));
    let b0 = bind(Kind::Tcp, &Addr::Tcp(addr0)).unwrap();
    let mem = Memory::new(0, REGION);
    let t0 = b0.join(id(0, b"pod secret"), &[(1, a1)], vec![mem.region()], quick_options());
    assert_eq!(t0.unwrap().peers(), vec![1]);
    let r1 = node1.join().unwrap();
    assert_eq!(r1.unwrap_or_else(|e| panic!("node 1 gave up: {e}")), vec![0]);
}

/// Something claiming to be node 1 dials node 0 with a wrong proof over
/// and over, while the real node 1 is still starting: node 0 checks node
/// 1's own address (not listening yet, then the real node, which proves
/// the secret) and keeps waiting; the real node 1 joins. A stranger's
/// refusals never end a join (only the node's own address can).
#[test]
fn an_impostor_of_a_peer_does_not_end_the_join() {
    let dir = scratch("impostor");
    let b0 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &dir, 0)).unwrap();
    let Addr::Tcp(addr0) = b0.local_addr().clone() else { unreachable!() };
    // node 1's address, free for now (bound once the impostor has begun)
    let a1 = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let node0 = std::thread::spawn(move || {
        let mem = Memory::new(0, REGION);
        b0.join(id(0, b"pod secret"), &[(1, Addr::Tcp(a1))], vec![mem.region()], quick_options()).map(|t| t.peers())
    });
    let impostor = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_millis(2500);
        let mut refused = 0;
        while Instant::now() < until {
            if let Ok(mut s) = TcpStream::connect(addr0) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let r = shoal_fabric::auth::handshake(&mut s, &id(1, b"a guess"), Kind::Tcp, Some(0), true);
                refused += usize::from(r.is_err());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        refused
    });
    std::thread::sleep(Duration::from_millis(1000));
    let b1 = bind(Kind::Tcp, &Addr::Tcp(a1)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mem = Memory::new(1, REGION);
    let t1 = b1.join(id(1, b"pod secret"), &[(0, Addr::Tcp(addr0))], vec![mem.region()], quick_options());
    assert_eq!(t1.unwrap_or_else(|e| panic!("node 1 gave up: {e}")).peers(), vec![0]);
    let r0 = node0.join().unwrap();
    assert_eq!(r0.unwrap_or_else(|e| panic!("node 0 gave up: {e}")), vec![1]);
    assert!(impostor.join().unwrap() >= 5, "the impostor was not refused over and over");
}

/// Whatever holds the address of the node we dial refuses us every time
/// (a node with another pod secret, or an impostor that could as well keep
/// the node from listening there): the join ends within seconds naming
/// the refusal, not at the join timeout.
#[test]
fn an_address_that_always_refuses_ends_the_join_in_seconds() {
    let started = Instant::now();
    let opts = shoal_fabric::Options { join_timeout: Duration::from_secs(60), ..quick_options() };
    let (squatter, _, node1) = node1_dialing_a_squatter("refuser", opts);
    squatter.set_nonblocking(true).unwrap();
    let mut refusals = 0;
    while !node1.is_finished() && started.elapsed() < Duration::from_secs(20) {
        match squatter.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                refusals += usize::from(refuse_hello(&mut s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let e = node1.join().unwrap().expect_err("node 1 joined a refusing address");
    assert!(matches!(e, shoal_fabric::Error::Refusing { peer: 0, .. }), "{e}");
    assert!(e.is_misconfiguration() && e.to_string().contains("wrong pod secret"), "{e}");
    assert!(refusals >= 3, "{refusals} refusals");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// Node 0 listens but has not begun its join (a node still starting):
/// nodes 1 and 2, with different secrets, still end their joins within
/// seconds naming the secret. Dials run in threads of their own, so the
/// dial to node 0, held until its handshake bound, holds up nothing else.
#[test]
fn a_node_listening_without_joining_does_not_hold_up_the_end() {
    let dir = scratch("idle0");
    let b0 = bind(Kind::Tcp, &test_addr(Kind::Tcp, &dir, 0)).unwrap();
    let addrs: Vec<Addr> = std::iter::once(b0.local_addr().clone())
        .chain((1..3).map(|_| Addr::Tcp(TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap())))
        .collect();
    let started = Instant::now();
    let nodes: Vec<_> = [(1u32, b"pod secret".as_slice()), (2, b"another secret")]
        .into_iter()
        .map(|(n, secret)| {
            let b = bind(Kind::Tcp, &addrs[n as usize]).unwrap();
            let peers: Vec<(u32, Addr)> = (0..3).filter(|&j| j != n).map(|j| (j, addrs[j as usize].clone())).collect();
            let secret = secret.to_vec();
            std::thread::spawn(move || {
                let mem = Memory::new(n, REGION);
                let opts = shoal_fabric::Options { join_timeout: Duration::from_secs(60), ..quick_options() };
                b.join(id(n, &secret), &peers, vec![mem.region()], opts).map(|t| t.peers())
            })
        })
        .collect();
    for (n, node) in (1..3).zip(nodes) {
        let e = node.join().unwrap().expect_err("a node joined with a wrong secret");
        assert!(matches!(e, shoal_fabric::Error::Refusing { .. }), "node {n}: {e}");
        assert!(e.to_string().contains("wrong pod secret"), "node {n}: {e}");
    }
    // (about 1.7 s; before dials ran in threads, node 1 waited 10 s on
    // node 0's handshake first)
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    drop(b0);
}
