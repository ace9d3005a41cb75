//! tcp between two network namespaces joined by a veth pair: two hosts on
//! one machine, so the bytes cross a real (virtual) link, not loopback.
//! Needs root and iproute2; skips loudly without them, unless
//! SHOAL_REQUIRE_NETNS=1 (CI), where that is a failure.

mod common;

use std::io::Write;
use std::process::Command;

use common::*;
use shoal_fabric::Kind;

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("SHOAL_FABRIC_CHILD") {
        child_main(&spec);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces and the veth between them; deleted on drop.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn create(tag: &str, a_ip: &str, b_ip: &str) -> Result<Netns, String> {
        let n = Netns { a: format!("shoal-{tag}-a"), b: format!("shoal-{tag}-b") };
        let _ = ip(&["netns", "del", &n.a]);
        let _ = ip(&["netns", "del", &n.b]);
        ip(&["netns", "add", &n.a])?;
        ip(&["netns", "add", &n.b])?;
        let (va, vb) = (format!("sh{tag}a"), format!("sh{tag}b"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &n.a])?;
        ip(&["link", "set", &vb, "netns", &n.b])?;
        for (ns, dev, addr) in [(&n.a, &va, a_ip), (&n.b, &vb, b_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // deleting a namespace deletes the veth end inside it, and its peer
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn netns_usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    ip(&["-V"]).map_err(|e| format!("iproute2 missing: {e}"))
}

#[test]
fn tcp_across_two_network_namespaces() {
    if let Err(why) = netns_usable() {
        if std::env::var("SHOAL_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("network namespaces unusable ({why}) and SHOAL_REQUIRE_NETNS=1");
        }
        let _ = writeln!(std::io::stderr(), "\n*** SKIPPED tcp_across_two_network_namespaces: {why} ***");
        return;
    }
    let tag = format!("{}", std::process::id() % 100_000);
    let subnet = 10 + std::process::id() % 200;
    let (a_ip, b_ip) = (format!("10.201.{subnet}.1"), format!("10.201.{subnet}.2"));
    let ns = Netns::create(&tag, &a_ip, &b_ip).unwrap();

    let mut owner = ChildNode::start(Kind::Tcp, 0, &format!("{a_ip}:0"), "serve", Some(&ns.a));
    let mut reader = ChildNode::start(Kind::Tcp, 1, &format!("{b_ip}:0"), "read-verify 0 200", Some(&ns.b));
    assert!(owner.addr.starts_with(&a_ip) && reader.addr.starts_with(&b_ip));
    owner.send_peers(&[(1, reader.addr.clone())]);
    reader.send_peers(&[(0, owner.addr.clone())]);
    assert_eq!(owner.line(), "JOINED");
    assert_eq!(reader.line(), "JOINED");
    let result = reader.line();
    assert!(result.starts_with("VERIFIED 200 bytes_read="), "{result}");
    let bytes: u64 = result.rsplit('=').next().unwrap().parse().unwrap();
    assert!(bytes >= 200 * 1024, "{bytes}");
    assert!(reader.child.wait().unwrap().success());
    drop(owner.child.stdin.take()); // the owner serves until its stdin closes
    assert!(owner.child.wait().unwrap().success());
}
