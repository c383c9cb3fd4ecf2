//! `outpost-bench netd`: a Service's data path through netd against a direct connection and
//! against kernel DNAT with nftables (a DNAT map, as kube-proxy's nftables mode does), in the
//! same run, in network namespaces the benchmark makes.
//!
//! ```text
//!  this process's own netns                         netns outpost-bench-srv-PID
//!  client ── 10.201.0.2 (direct) ────────────┐
//!  client ── 10.96.0.20 ── TUN ── netd ──────┼── veth ── iperf3 -s, sockperf server
//!  client ── 10.97.0.20 ── nft DNAT map ─────┘
//! ```
//!
//! Single-stream throughput (`iperf3`) and TCP round trips of 64-byte messages (`sockperf
//! ping-pong --full-rtt`), the paths interleaved over several rounds (the median of each is
//! kept), with 10 and then 10,000 services defined (netd's table and the nftables map both
//! hold them all).

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use outpost_netd::table::Table;
use outpost_netd::{Config, Netd};
use serde_json::{json, Value};

const SRV: &str = "10.201.0.2";
const NETD_IP: &str = "10.96.0.20";
const NFT_IP: &str = "10.97.0.20";
const IPERF: u16 = 5201;
const SOCKPERF: u16 = 11111;

pub struct Path {
    pub name: &'static str,
    pub gbits: f64,
    /// Round-trip p50 and p99 (µs) with 10 services, then with 10,000.
    pub rtt: [(f64, f64); 2],
}

struct Netns(String, Vec<Child>);

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| args.join(" "))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn services(n: usize) -> (Vec<Value>, Vec<Value>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    let mut add = |name: String, ip: String, port: u16, backend: &str| {
        svcs.push(json!({"metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": "TCP"}]}}));
        slices.push(json!({"metadata": {"name": name, "namespace": "bench",
                                        "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [backend], "conditions": {"ready": true}}]}));
    };
    add("iperf".into(), NETD_IP.into(), IPERF, SRV);
    add("sockperf".into(), NETD_IP.into(), SOCKPERF, SRV);
    for i in 0..n.saturating_sub(2) {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + i as u32);
        add(format!("filler-{i}"), ip.to_string(), 80, "10.201.0.3");
    }
    (svcs, slices)
}

/// The nftables ruleset: a DNAT map holding `n` services.
fn nft_rules(n: usize) -> String {
    let mut elems = vec![
        format!("{NFT_IP} . {IPERF} : {SRV} . {IPERF}"),
        format!("{NFT_IP} . {SOCKPERF} : {SRV} . {SOCKPERF}"),
    ];
    for i in 0..n.saturating_sub(2) {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 1, 0)) + i as u32);
        elems.push(format!("{ip} . 80 : 10.201.0.3 . 80"));
    }
    format!(
        "flush ruleset\ntable ip outpost_bench {{\n  map services {{\n    type ipv4_addr . inet_service : ipv4_addr . inet_service\n    elements = {{ {} }}\n  }}\n  chain out {{\n    type nat hook output priority -100; policy accept;\n    dnat ip addr . port to ip daddr . tcp dport map @services\n  }}\n}}\n",
        elems.join(", ")
    )
}

fn iperf(ip: &str, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("iperf3")
        .args([
            "-c",
            ip,
            "-p",
            &IPERF.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()
        .context("iperf3 (scripts/setup.sh installs it with OUTPOST_BENCH=1)")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 to {ip}: {}", v["error"]))
}

fn sockperf(ip: &str, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("sockperf")
        .args(["ping-pong", "--tcp", "-i", ip, "-p", &SOCKPERF.to_string()])
        .args(["-t", &secs.to_string(), "-m", "64", "--full-rtt"])
        .output()
        .context("sockperf (scripts/setup.sh installs it with OUTPOST_BENCH=1)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let pick = |p: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    match (pick("50.000"), pick("99.000")) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!("sockperf to {ip}: {text}"),
    }
}

pub fn run(secs: u64, rounds: usize, many: usize) -> anyhow::Result<Vec<Path>> {
    if !outpost_oci_shim::run::is_root() {
        bail!("outpost-bench netd needs root: it makes network namespaces, a TUN device and nftables rules");
    }
    outpost_tests::private_netns()?;
    let ns = format!("outpost-bench-srv-{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "delete", &ns])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", &ns])?;
    let mut guard = Netns(ns.clone(), Vec::new());
    sh(&[
        "ip", "link", "add", "obc0", "type", "veth", "peer", "name", "obs0", "netns", &ns,
    ])?;
    sh(&["ip", "addr", "add", "10.201.0.1/24", "dev", "obc0"])?;
    sh(&["ip", "link", "set", "obc0", "up"])?;
    sh(&["ip", "route", "add", "10.97.0.0/16", "dev", "obc0"])?;
    for c in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.201.0.2/24", "dev", "obs0"],
        vec!["ip", "link", "set", "obs0", "up"],
    ] {
        let mut a = vec!["ip", "netns", "exec", &ns];
        a.extend(c);
        sh(&a)?;
    }
    let spawn = |args: &[&str]| -> anyhow::Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| args.join(" "))
    };
    guard
        .1
        .push(spawn(&["iperf3", "-s", "-p", &IPERF.to_string()])?);
    guard.1.push(spawn(&[
        "sockperf",
        "server",
        "--tcp",
        "-i",
        SRV,
        "-p",
        &SOCKPERF.to_string(),
    ])?);
    std::thread::sleep(Duration::from_millis(500));

    let netd = Netd::start(Config::new((Ipv4Addr::new(10, 96, 0, 0), 16)))?;
    let mut paths = vec![
        Path {
            name: "direct",
            gbits: 0.0,
            rtt: [(0.0, 0.0); 2],
        },
        Path {
            name: "netd",
            gbits: 0.0,
            rtt: [(0.0, 0.0); 2],
        },
        Path {
            name: "nftables DNAT",
            gbits: 0.0,
            rtt: [(0.0, 0.0); 2],
        },
    ];
    let ips = [SRV, NETD_IP, NFT_IP];
    for (round, n) in [10usize, many].into_iter().enumerate() {
        let (svcs, slices) = services(n);
        netd.update(Table::build(&svcs, &slices, netd.metrics()));
        let rules = std::env::temp_dir().join(format!("outpost-bench-nft-{}", std::process::id()));
        std::fs::write(&rules, nft_rules(n))?;
        sh(&["nft", "-f", rules.to_str().unwrap_or_default()])?;
        let _ = std::fs::remove_file(&rules);
        std::thread::sleep(Duration::from_millis(200));
        if round == 0 {
            for (p, ip) in paths.iter_mut().zip(ips) {
                p.gbits = iperf(ip, secs)?;
            }
        }
        // Round trips wander with the scheduler on a small machine: interleave the paths,
        // several times, and keep the median of each path's runs.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (r, ip) in runs.iter_mut().zip(ips) {
                r.push(sockperf(ip, secs)?);
            }
        }
        for (p, mut r) in paths.iter_mut().zip(runs) {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let p50 = r[r.len() / 2].0;
            r.sort_by(|a, b| a.1.total_cmp(&b.1));
            p.rtt[round] = (p50, r[r.len() / 2].1);
        }
    }
    let _ = sh(&["nft", "flush", "ruleset"]);
    drop(netd);
    drop(guard);
    Ok(paths)
}
