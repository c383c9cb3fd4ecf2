//! Pod networks for OCI pods: a network namespace per pod, a veth pair from it into the node
//! bridge, and an address from the node's pod CIDR, so each pod has its own IP and ports and
//! the node reaches them directly. Pods with `hostNetwork: true`, and Wasm pods, use the
//! node's network instead.
//!
//! ```text
//! /run/netns/outpost-UID ── eth0 (10.88.0.N/16, default via .1)
//!                              │ veth
//! node ── outpost0 bridge (10.88.0.1/16) ── voXXXXXXXXXXX
//! ```
//!
//! Addresses are leased host-wide, so several agents on one machine share the bridge: one
//! file per address under `/run/outpost/ipam/CIDR/`, created exclusively and naming the
//! namespace that holds it. A lease whose namespace is gone (its agent was killed) is free.
//! The links are made with iproute2's `ip`, in two batches per pod. Pods' traffic leaving the
//! node is masqueraded behind its address (nftables, [`PodNet::masquerade`]).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The node bridge every pod's veth joins.
pub const BRIDGE: &str = "outpost0";

/// The pod network when none is given (containerd's default bridge network is 10.88/16 too).
pub const DEFAULT_POD_CIDR: &str = "10.88.0.0/16";

/// The node's pod network.
#[derive(Debug, Clone)]
pub struct PodNet {
    base: u32,
    prefix: u8,
    ipam: PathBuf,
    /// Where `ip netns` keeps namespaces (/run/netns).
    netns: PathBuf,
}

/// A pod's namespace and address.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

fn name(uid: &str) -> String {
    format!("outpost-{uid}")
}

/// The host end of a pod's veth: at most 15 bytes, stable for the pod.
fn veth(uid: &str) -> String {
    let h = outpost_api::sha256_hex(uid.as_bytes());
    format!("vo{}", &h[..11])
}

/// A TCP listener on `addr` in the network namespace at `netns`, made by a thread of its
/// own that enters the namespace and ends: the socket stays in the pod's network, and no
/// thread of the agent is left in it.
pub fn listen_in(
    netns: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpListener> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread entering the pod's network failed",
            ))
        })
    })
}

/// Run `ip ARGS` with `batch` as its commands on stdin.
fn ip(args: &[&str], batch: &str) -> Result<(), String> {
    let mut all = args.to_vec();
    all.extend(["-batch", "-"]);
    piped("ip", "iproute2", &all, batch)
}

/// Run `nft -f -` with `script` on stdin.
fn nft(script: &str) -> Result<(), String> {
    piped("nft", "nftables", &["-f", "-"], script)
}

/// Run `program ARGS` (from Debian's `package`) with `input` on stdin; its error output if
/// it fails.
fn piped(program: &str, package: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {program} ({package}): {e}"))?;
    // A failed write shows as the program's own failure below; the child is reaped either way.
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl PodNet {
    /// The network of `cidr` (`A.B.C.D/N`, N from 8 to 30): the bridge takes its first
    /// address, pods the others.
    pub fn new(cidr: &str) -> Result<PodNet, String> {
        let bad =
            || format!("pod CIDR {cidr:?} is not an IPv4 network A.B.C.D/N with N from 8 to 30");
        let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        let base = u32::from(addr) & mask;
        Ok(PodNet {
            base,
            prefix,
            ipam: Path::new("/run/outpost/ipam").join(format!("{}-{prefix}", Ipv4Addr::from(base))),
            netns: PathBuf::from("/run/netns"),
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }

    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// Make the bridge if no agent has yet, with the gateway address, up.
    pub fn bridge(&self) -> Result<(), String> {
        if !link_exists(BRIDGE) {
            // Another agent may make it first: only a failure that leaves none counts.
            let made = ip(&[], &format!("link add name {BRIDGE} type bridge\n"));
            if made.is_err() && !link_exists(BRIDGE) {
                return made;
            }
        }
        let gw = format!("{}/{}", self.gateway(), self.prefix);
        let has = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", BRIDGE])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {gw} ")))
            .unwrap_or(false);
        if !has {
            let _ = ip(&[], &format!("addr add {gw} dev {BRIDGE}\n"));
        }
        ip(&[], &format!("link set {BRIDGE} up\n"))
    }

    /// Pods' traffic leaving the node goes out from the node's address (nftables `masquerade`
    /// in the table `ip outpost`), as the CNI bridge plugin's `ipMasq` does: nothing beyond
    /// the node knows the way back to its pod network. Traffic among its pods, into netd's
    /// TUN device and to other nodes' pod networks (the set `peers`, kept by [`unmasked`])
    /// keeps the pod's address. Made once per network; idempotent. The node forwards IPv4
    /// from here on, as the bridge plugin turns it on: a fresh Debian has it off, and then no
    /// packet of a pod leaves the node at all.
    pub fn masquerade(&self) -> Result<(), String> {
        let forward = Path::new("/proc/sys/net/ipv4/ip_forward");
        if std::fs::read_to_string(forward).is_ok_and(|v| v.trim() != "1") {
            std::fs::write(forward, "1")
                .map_err(|e| format!("turning on IPv4 forwarding ({}): {e}", forward.display()))?;
        }
        let cidr = self.cidr();
        let rule = format!(
            "ip saddr {cidr} ip daddr != {cidr} ip daddr != @peers oifname != {{ \"{BRIDGE}\", \"{}\" }} masquerade",
            outpost_netd::DEVICE
        );
        nft("table ip outpost {\n  set peers {\n    type ipv4_addr; flags interval;\n  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n  }\n}\n")?;
        let listed = Command::new("nft")
            .args(["list", "chain", "ip", "outpost", "postrouting"])
            .output()
            .map_err(|e| format!("running nft (nftables): {e}"))?;
        if String::from_utf8_lossy(&listed.stdout).contains(&format!("ip saddr {cidr} ")) {
            return Ok(());
        }
        nft(&format!("add rule ip outpost postrouting {rule}\n"))
    }

    /// Lease an address for namespace `ns`: the one it holds already, or the next free one
    /// after the last leased (round the range, as CNI's host-local IPAM goes): an address
    /// just freed is not handed out again at once, while other pods and the node may still
    /// hold its old owner's MAC. Agents on one machine take turns through a lock on the
    /// lease directory, so a stale lease is taken over by one of them only.
    fn lease(&self, ns: &str) -> Result<Ipv4Addr, String> {
        let io = |e: std::io::Error| format!("{}: {e}", self.ipam.display());
        std::fs::create_dir_all(&self.ipam).map_err(io)?;
        let lock = std::fs::File::create(self.ipam.join(".lock")).map_err(io)?;
        lock.lock().map_err(io)?;
        let size = 1u32 << (32 - self.prefix);
        let last_file = self.ipam.join(".last");
        let last = std::fs::read_to_string(&last_file)
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(|a| u32::from(a).wrapping_sub(self.base))
            .filter(|n| (2..size - 1).contains(n))
            .unwrap_or(1);
        // The first address is the network, the second the gateway, the last broadcast.
        // The lease the namespace holds already, wherever it is.
        for e in std::fs::read_dir(&self.ipam).map_err(io)?.flatten() {
            if let Ok(addr) = e.file_name().to_string_lossy().parse::<Ipv4Addr>() {
                if std::fs::read_to_string(e.path()).is_ok_and(|h| h == ns) {
                    return Ok(addr);
                }
            }
        }
        let usable = size - 3;
        for n in (0..usable).map(|i| 2 + (last - 1 + i) % usable) {
            let addr = Ipv4Addr::from(self.base + n);
            let leased = |addr: Ipv4Addr| {
                let _ = std::fs::write(&last_file, addr.to_string());
                Ok(addr)
            };
            let path = self.ipam.join(addr.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(ns.as_bytes()).map_err(io)?;
                    return leased(addr);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    if holder == ns {
                        return Ok(addr);
                    }
                    // Held by a namespace that no longer exists (its agent died), or by
                    // nobody (an agent died between making the file and writing it).
                    if holder.is_empty() || !self.netns.join(&holder).exists() {
                        let _ = std::fs::remove_file(&path);
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                        {
                            f.write_all(ns.as_bytes()).map_err(io)?;
                            return leased(addr);
                        }
                    }
                }
                Err(e) => return Err(io(e)),
            }
        }
        Err(format!(
            "the pod network {} has no free address",
            self.cidr()
        ))
    }

    /// A fresh namespace for pod `uid`, joined to the bridge, with its address. Whatever an
    /// earlier run of the pod left is replaced.
    pub fn attach(&self, uid: &str) -> Result<Attached, String> {
        let ns = name(uid);
        let netns = self.netns.join(&ns);
        if netns.exists() {
            let _ = ip(&[], &format!("netns delete {ns}\n"));
        }
        let v = veth(uid);
        if link_exists(&v) {
            let _ = ip(&[], &format!("link delete {v}\n"));
        }
        // The namespace before the lease: a lease without its namespace counts as free.
        ip(&[], &format!("netns add {ns}\n"))?;
        let done = (|| {
            let addr = self.lease(&ns)?;
            // The node forgets any MAC it knew for the address from an earlier pod.
            ip(
                &[],
                &format!(
                    "link add {v} type veth peer name eth0 netns {ns}\nlink set {v} master {BRIDGE} up\nneigh flush to {addr} dev {BRIDGE}\n"
                ),
            )?;
            ip(
                &["-n", &ns],
                &format!(
                    "link set lo up\naddr add {addr}/{} dev eth0\nlink set eth0 up\nroute add default via {}\n",
                    self.prefix,
                    self.gateway()
                ),
            )?;
            Ok(addr)
        })();
        match done {
            Ok(ip) => Ok(Attached { netns, ip }),
            Err(e) => {
                self.detach(uid);
                Err(e)
            }
        }
    }

    /// Remove pod `uid`'s namespace (its veth goes with it) and free its address.
    pub fn detach(&self, uid: &str) {
        let ns = name(uid);
        if self.netns.join(&ns).exists() {
            if let Err(e) = ip(&[], &format!("netns delete {ns}\n")) {
                tracing::warn!(netns = %ns, error = %e, "removing a pod's network namespace");
            }
        }
        for e in std::fs::read_dir(&self.ipam)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_to_string(e.path()).is_ok_and(|h| h == ns) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Routes to the pods of the other nodes: (their pod CIDR, their InternalIP) for every node
/// that has a pod CIDR other than `mine` and an address other than `my_ip`. Nodes sharing
/// this machine's address (several agents on one host) need none.
pub fn peer_routes(
    nodes: &[serde_json::Value],
    me: &str,
    mine: &str,
    my_ip: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for n in nodes {
        if n["metadata"]["name"].as_str() == Some(me) {
            continue;
        }
        let Some(cidr) = n["spec"]["podCIDR"]
            .as_str()
            .filter(|c| *c != mine && !c.is_empty())
        else {
            continue;
        };
        if PodNet::new(cidr).is_err() {
            continue;
        }
        let ip = n["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str())
            .filter(|ip| *ip != my_ip && ip.parse::<Ipv4Addr>().is_ok_and(|a| !a.is_loopback()));
        if let Some(ip) = ip {
            out.push((cidr.to_string(), ip.to_string()));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// Make this machine's routes to other nodes' pods `want`; `had` is what was routed before.
pub fn route_peers(had: &[(String, String)], want: &[(String, String)]) -> Result<(), String> {
    let mut batch = String::new();
    for (cidr, via) in want {
        if !had.contains(&(cidr.clone(), via.clone())) {
            batch.push_str(&format!("route replace {cidr} via {via}\n"));
        }
    }
    for (cidr, _) in had {
        if !want.iter().any(|(c, _)| c == cidr) {
            batch.push_str(&format!("route delete {cidr}\n"));
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    ip(&["-force"], &batch)
}

/// The nft commands that make the set `peers` hold exactly the other nodes' pod CIDRs of
/// `routes` (CIDR, via).
fn peers_script(routes: &[(String, String)]) -> String {
    let mut script = "flush set ip outpost peers\n".to_string();
    let cidrs: Vec<&str> = routes.iter().map(|(c, _)| c.as_str()).collect();
    if !cidrs.is_empty() {
        script.push_str(&format!(
            "add element ip outpost peers {{ {} }}\n",
            cidrs.join(", ")
        ));
    }
    script
}

/// Leave traffic to the other nodes' pod networks (the `routes` [`route_peers`] keeps) out
/// of the masquerade, so pods there see this node's pods' own addresses.
pub fn unmasked(routes: &[(String, String)]) -> Result<(), String> {
    nft(&peers_script(routes))
}

/// Whether this thread's network namespace has device `dev`. Read from
/// `/proc/thread-self/net/dev`, not `/sys/class/net`, which shows the namespace `/sys` was
/// mounted in, not necessarily ours.
fn link_exists(dev: &str) -> bool {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(name, _)| name.trim() == dev)
}

#[cfg(test)]
mod tests {
    #[test]
    fn other_nodes_pods_are_routed_through_their_addresses() {
        use serde_json::json;
        let node = |name: &str, cidr: &str, ip: &str| {
            json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
                   "status": {"addresses": [{"type": "Hostname", "address": name},
                                            {"type": "InternalIP", "address": ip}]}})
        };
        let nodes = [
            node("me", "10.88.0.0/24", "192.168.1.10"),
            node("b", "10.88.1.0/24", "192.168.1.11"),
            node("same-cidr", "10.88.0.0/24", "192.168.1.12"),
            node("same-host", "10.88.2.0/24", "192.168.1.10"),
            node("loop", "10.88.3.0/24", "127.0.0.1"),
            node("bad", "banana", "192.168.1.13"),
            json!({"metadata": {"name": "no-cidr"}}),
        ];
        assert_eq!(
            super::peer_routes(&nodes, "me", "10.88.0.0/24", "192.168.1.10"),
            vec![("10.88.1.0/24".to_string(), "192.168.1.11".to_string())]
        );
    }

    use super::*;

    #[test]
    fn the_peers_set_holds_exactly_the_routed_networks() {
        assert_eq!(peers_script(&[]), "flush set ip outpost peers\n");
        let routes = [
            ("10.89.0.0/24".to_string(), "192.168.1.7".to_string()),
            ("10.90.0.0/24".to_string(), "192.168.1.8".to_string()),
        ];
        assert_eq!(
            peers_script(&routes),
            "flush set ip outpost peers\nadd element ip outpost peers { 10.89.0.0/24, 10.90.0.0/24 }\n"
        );
    }

    #[test]
    fn cidrs_are_checked_and_normalised() {
        let n = PodNet::new("10.88.7.9/16").unwrap();
        assert_eq!(n.cidr(), "10.88.0.0/16");
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        for bad in [
            "10.88.0.0",
            "10.88.0.0/31",
            "10.88.0.0/4",
            "x/16",
            "10.88.0.0/x",
        ] {
            assert!(PodNet::new(bad).is_err(), "{bad}");
        }
        assert!(veth("0e4c1a2b-aaaa-bbbb-cccc-000000000000").len() <= 15);
    }

    #[test]
    fn leases_are_exclusive_reused_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = PodNet::new("10.99.0.0/29").unwrap();
        n.ipam = dir.path().join("ipam");
        n.netns = dir.path().join("netns");
        std::fs::create_dir_all(&n.netns).unwrap();
        let live: Vec<String> = (0..5).map(|i| format!("outpost-{i}")).collect();
        for l in &live {
            std::fs::write(n.netns.join(l), "").unwrap();
        }
        let a = n.lease(&live[0]).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(
            n.lease(&live[0]).unwrap(),
            a,
            "the holder gets its own lease back"
        );
        let b = n.lease(&live[1]).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 99, 0, 3));
        // A lease whose namespace is gone is taken over.
        std::fs::write(n.ipam.join("10.99.0.4"), "outpost-gone").unwrap();
        assert_eq!(n.lease(&live[2]).unwrap(), Ipv4Addr::new(10, 99, 0, 4));
        // .5 and .6 are left, then the network is full.
        n.lease(&live[3]).unwrap();
        n.lease(&live[4]).unwrap();
        assert!(n
            .lease("outpost-more")
            .unwrap_err()
            .contains("no free address"));
        // Freed, an address waits its turn: the next lease goes round the range first.
        std::fs::remove_file(n.ipam.join("10.99.0.2")).unwrap();
        std::fs::remove_file(n.ipam.join("10.99.0.4")).unwrap();
        assert_eq!(n.lease("outpost-x").unwrap(), Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(n.lease("outpost-y").unwrap(), Ipv4Addr::new(10, 99, 0, 4));
        std::fs::remove_file(n.ipam.join("10.99.0.2")).unwrap();
        std::fs::remove_file(n.ipam.join("10.99.0.3")).unwrap();
        assert_eq!(
            n.lease("outpost-z").unwrap(),
            Ipv4Addr::new(10, 99, 0, 2),
            "after .4, round to the first free"
        );
        let dir = tempfile::tempdir().unwrap();
        n.ipam = dir.path().join("ipam");
        let first = n.lease("outpost-a").unwrap();
        std::fs::remove_file(n.ipam.join(first.to_string())).unwrap();
        assert_ne!(
            n.lease("outpost-b").unwrap(),
            first,
            "not the one just freed"
        );
    }
}
