//! What the node and its running containers use, for `kubectl top`. The control plane asks
//! over the link (as metrics-server asks each kubelet) and gets CPU as a rate over the last
//! window and memory as the working set now. Counters are read every [`TICK`] and kept in
//! memory, so a window is at most that long; nothing is written to disk.
//!
//! A Wasm guest's counters are its runtime's ([`outpost_wasm_runtime::Usage`]: the time its
//! code was polled, its linear memory); an OCI container's are its cgroup's, as the kubelet
//! reads them (CPU time, usage less inactive file pages).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_api::link::{PodUsage, Usage, Use};

/// How often counters are read.
pub const TICK: Duration = Duration::from_secs(10);
/// The shortest window a rate is taken over.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// Where a container's counters come from.
pub enum Meter {
    Guest(Arc<outpost_wasm_runtime::Usage>),
    /// A cgroup path (`/outpost/POD/CONTAINER`) under every hierarchy.
    Cgroup(String),
}

impl Meter {
    /// CPU time so far, and memory now.
    fn read(&self) -> Option<(Duration, u64)> {
        match self {
            Meter::Guest(u) => Some((u.cpu(), u.memory())),
            Meter::Cgroup(path) => cgroup(Path::new("/sys/fs/cgroup"), path),
        }
    }
}

/// One run of a container, while it runs.
pub struct Run {
    /// Distinguishes this run from the container's others (a restart starts counting anew).
    pub id: u64,
    pub started: Instant,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub meter: Meter,
}

impl Run {
    pub fn new(namespace: &str, pod: &str, container: &str, meter: Meter) -> Run {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Run {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            meter,
        }
    }
}

/// Counters at one moment.
#[derive(Clone)]
struct Reading {
    at: Instant,
    node: Option<Duration>,
    runs: HashMap<u64, Duration>,
}

fn read(runs: &[Arc<Run>]) -> (Reading, HashMap<u64, u64>) {
    let mut cpu = HashMap::new();
    let mut memory = HashMap::new();
    for r in runs {
        if let Some((c, m)) = r.meter.read() {
            cpu.insert(r.id, c);
            memory.insert(r.id, m);
        }
    }
    let stat = std::fs::read_to_string("/proc/stat").ok();
    (
        Reading {
            at: Instant::now(),
            node: stat.as_deref().and_then(node_cpu),
            runs: cpu,
        },
        memory,
    )
}

/// The last readings, oldest first.
#[derive(Default)]
pub struct Meters {
    readings: Mutex<VecDeque<Reading>>,
}

impl Meters {
    /// Take a reading to measure later ones against.
    pub fn tick(&self, runs: &[Arc<Run>]) {
        let (r, _) = read(runs);
        if let Ok(mut q) = self.readings.lock() {
            q.push_back(r);
            while q.len() > 2 {
                q.pop_front();
            }
        }
    }

    /// What the node and `runs` use now.
    pub async fn usage(&self, runs: &[Arc<Run>]) -> Usage {
        let base = loop {
            let newest_ok = self.readings.lock().ok().and_then(|q| {
                q.iter()
                    .rev()
                    .find(|r| r.at.elapsed() >= MIN_WINDOW)
                    .cloned()
            });
            match newest_ok {
                Some(r) => break r,
                None => {
                    // Only a reading younger than a window (or none): wait one out.
                    self.tick(runs);
                    tokio::time::sleep(MIN_WINDOW).await;
                }
            }
        };
        let (now, memory) = read(runs);
        let window = now.at.duration_since(base.at);
        let mut pods: Vec<PodUsage> = Vec::new();
        for r in runs {
            let (Some(cpu), Some(mem)) = (now.runs.get(&r.id), memory.get(&r.id)) else {
                continue;
            };
            let nanocores = match base.runs.get(&r.id) {
                Some(before) => rate(cpu.saturating_sub(*before), window),
                None => rate(*cpu, now.at.duration_since(r.started)),
            };
            let u = Use {
                nanocores,
                memory: *mem,
            };
            match pods
                .iter_mut()
                .find(|p| p.namespace == r.namespace && p.name == r.pod)
            {
                Some(p) => p.containers.push((r.container.clone(), u)),
                None => pods.push(PodUsage {
                    namespace: r.namespace.clone(),
                    name: r.pod.clone(),
                    containers: vec![(r.container.clone(), u)],
                }),
            }
        }
        let node_cpu = match (now.node, base.node) {
            (Some(n), Some(b)) => rate(n.saturating_sub(b), window),
            _ => 0,
        };
        let node_memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| working_set(&m))
            .unwrap_or(0);
        Usage {
            time: jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            node: Use {
                nanocores: node_cpu,
                memory: node_memory,
            },
            pods,
        }
    }
}

/// CPU time `spent` over `window`, in billionths of a core.
fn rate(spent: Duration, window: Duration) -> u64 {
    if window.is_zero() {
        return 0;
    }
    u64::try_from(spent.as_nanos() * 1_000_000_000 / window.as_nanos()).unwrap_or(u64::MAX)
}

/// The CPU time all cores spent busy, from `/proc/stat` (its first line, in clock ticks of
/// 1/100 s: user, nice, system, idle, iowait, irq, softirq, steal).
fn node_cpu(stat: &str) -> Option<Duration> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 4 {
        return None;
    }
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(Duration::from_millis(busy * 10))
}

/// Memory in use, from `/proc/meminfo`: what is not available to start new work.
fn working_set(meminfo: &str) -> Option<u64> {
    let kb = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(kb("MemTotal:")?.saturating_sub(kb("MemAvailable:")?) * 1024)
}

fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// CPU time and working set of cgroup `path` under `base`: cgroup v1's `cpuacct` and
/// `memory` hierarchies, else the unified one.
fn cgroup(base: &Path, path: &str) -> Option<(Duration, u64)> {
    let rel = path.trim_start_matches('/');
    let text = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    let v1 = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|h| text(base.join(h).join(rel).join("cpuacct.usage")));
    if let Some(ns) = v1 {
        let mem = base.join("memory").join(rel);
        let usage: u64 = text(mem.join("memory.usage_in_bytes"))?
            .trim()
            .parse()
            .ok()?;
        let inactive = text(mem.join("memory.stat"))
            .and_then(|s| stat_field(&s, "total_inactive_file"))
            .unwrap_or(0);
        return Some((
            Duration::from_nanos(ns.trim().parse().ok()?),
            usage.saturating_sub(inactive),
        ));
    }
    let dir = base.join(rel);
    let usec = stat_field(&text(dir.join("cpu.stat"))?, "usage_usec")?;
    let current: u64 = text(dir.join("memory.current"))?.trim().parse().ok()?;
    let inactive = text(dir.join("memory.stat"))
        .and_then(|s| stat_field(&s, "inactive_file"))
        .unwrap_or(0);
    Some((
        Duration::from_micros(usec),
        current.saturating_sub(inactive),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_billionths_of_a_core() {
        assert_eq!(
            rate(Duration::from_millis(250), Duration::from_secs(1)),
            250_000_000
        );
        assert_eq!(
            rate(Duration::from_secs(3), Duration::from_secs(2)),
            1_500_000_000
        );
        assert_eq!(rate(Duration::from_secs(1), Duration::ZERO), 0);
    }

    #[test]
    fn node_figures_come_from_proc() {
        let stat = "cpu  100 5 50 9000 40 3 2 0 0 0\ncpu0 50 2 25 4500 20 1 1 0 0 0\n";
        // user + nice + system + irq + softirq + steal, not idle or iowait: 160 ticks.
        assert_eq!(node_cpu(stat), Some(Duration::from_millis(1600)));
        assert_eq!(node_cpu("intr 1 2 3\n"), None);
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(working_set(meminfo), Some(4_000_000 * 1024));
        assert_eq!(working_set("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn cgroups_read_as_the_kubelet_reads_them() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        let v1 = |h: &str, f: &str, v: &str| {
            let p = b.join(h).join("outpost/p/c");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join(f), v).unwrap();
        };
        v1("cpuacct", "cpuacct.usage", "2500000000\n");
        v1("memory", "memory.usage_in_bytes", "10485760\n");
        v1(
            "memory",
            "memory.stat",
            "cache 4096\ninactive_file 1\ntotal_inactive_file 2097152\n",
        );
        assert_eq!(
            cgroup(b, "/outpost/p/c"),
            Some((Duration::from_millis(2500), 8 << 20))
        );
        let u = b.join("outpost/q/c");
        std::fs::create_dir_all(&u).unwrap();
        std::fs::write(u.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(u.join("memory.current"), "4096000\n").unwrap();
        std::fs::write(u.join("memory.stat"), "anon 1\ninactive_file 96000\n").unwrap();
        assert_eq!(
            cgroup(b, "/outpost/q/c"),
            Some((Duration::from_micros(1500), 4_000_000))
        );
        assert_eq!(cgroup(b, "/outpost/none"), None);
    }

    #[tokio::test]
    async fn a_guest_that_runs_shows_its_rate_and_one_that_ended_does_not() {
        let m = Meters::default();
        let guest = Arc::new(outpost_wasm_runtime::Usage::default());
        let run = Arc::new(Run::new("ns", "p", "c", Meter::Guest(guest.clone())));
        m.tick(std::slice::from_ref(&run));
        let u = m.usage(std::slice::from_ref(&run)).await;
        assert!(u.window_ms >= 1000, "{}", u.window_ms);
        assert_eq!(u.pods.len(), 1);
        assert_eq!(
            (u.pods[0].namespace.as_str(), u.pods[0].name.as_str()),
            ("ns", "p")
        );
        assert_eq!(u.pods[0].containers[0].0, "c");
        assert_eq!(u.pods[0].containers[0].1.nanocores, 0, "an idle guest");
        assert!(u.node.memory > 0);
        assert!(m.usage(&[]).await.pods.is_empty());
    }
}
