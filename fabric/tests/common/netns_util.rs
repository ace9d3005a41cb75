//! Two network namespaces joined by a veth pair, for tests that need two
//! hosts on one machine. Included by path from the fabric's and the VMM's
//! tests (one copy of the setup).

use std::process::Command;

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces and the veth between them; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub a: String,
    pub b: String,
    /// The veth's end in `a`, and in `b`.
    pub dev_a: String,
    pub dev_b: String,
}

impl Netns {
    pub fn create(tag: &str, a_ip: &str, b_ip: &str) -> Result<Netns, String> {
        let n = Netns {
            a: format!("shoal-{tag}-a"),
            b: format!("shoal-{tag}-b"),
            dev_a: format!("sh{tag}a"),
            dev_b: format!("sh{tag}b"),
        };
        let _ = ip(&["netns", "del", &n.a]);
        let _ = ip(&["netns", "del", &n.b]);
        ip(&["netns", "add", &n.a])?;
        ip(&["netns", "add", &n.b])?;
        let (va, vb) = (&n.dev_a, &n.dev_b);
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
        ip(&["link", "set", va, "netns", &n.a])?;
        ip(&["link", "set", vb, "netns", &n.b])?;
        for (ns, dev, addr) in [(&n.a, va, a_ip), (&n.b, vb, b_ip)] {
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

pub fn netns_usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    ip(&["-V"]).map_err(|e| format!("iproute2 missing: {e}"))
}
