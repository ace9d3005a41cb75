//! tcp between two network namespaces joined by a veth pair: two hosts on
//! one machine, so the bytes cross a real (virtual) link, not loopback.
//! Needs root and iproute2; skips loudly without them, unless
//! SHOAL_REQUIRE_NETNS=1 (CI), where that is a failure.

mod common;
// shared with the VMM's pod tests
#[path = "common/netns_util.rs"]
mod netns_util;

use std::io::Write;

use common::*;
use netns_util::*;
use shoal_fabric::Kind;

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("SHOAL_FABRIC_CHILD") {
        child_main(&spec);
    }
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
