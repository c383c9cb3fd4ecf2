//! Container probes with the kubelet's semantics: `httpGet` (a status from 200 to 399 passes)
//! and `tcpSocket` (a connection passes), tried every `periodSeconds` after
//! `initialDelaySeconds`, each try bounded by `timeoutSeconds`, a verdict changing only after
//! `successThreshold` passes or `failureThreshold` failures in a row. Probes reach the
//! container on this node's loopback, where Wasm components listen, or at the pod's own
//! address when it has one. `exec` probes run their command in an OCI container (exit code
//! 0 passes); a Wasm container has no process to run one in.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

/// The output of a command an exec probe ran, or why it could not run.
pub type Ran = Pin<Box<dyn Future<Output = Result<(i32, String), String>> + Send>>;

/// Runs a command in the container: its exit code and output.
#[derive(Clone)]
pub struct ExecIn(pub Arc<dyn Fn(Vec<String>) -> Ran + Send + Sync>);

impl std::fmt::Debug for ExecIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecIn")
    }
}

impl PartialEq for ExecIn {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub check: Check,
    /// Where the container listens.
    pub host: IpAddr,
    /// Where an exec probe's command runs: set for containers that have processes.
    pub exec: Option<ExecIn>,
    pub delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub successes: u32,
    pub failures: u32,
}

/// The probe `key` (`livenessProbe`, `readinessProbe`, `startupProbe`) of a container spec,
/// or why it cannot run here.
pub fn parse(container: &Value, key: &str) -> Result<Option<Probe>, String> {
    let p = &container[key];
    if p.is_null() {
        return Ok(None);
    }
    let secs = |k: &str, default: u64| {
        Duration::from_secs(p[k].as_u64().filter(|s| *s > 0).unwrap_or(default))
    };
    let count = |k: &str, default: u32| {
        p[k].as_u64()
            .filter(|s| *s > 0)
            .map_or(default, |s| s.min(u32::MAX as u64) as u32)
    };
    let check = if !p["httpGet"].is_null() {
        let h = &p["httpGet"];
        if h["scheme"]
            .as_str()
            .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            return Err(format!("{key}: only HTTP httpGet probes are supported"));
        }
        let headers = h["httpHeaders"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| Some((x["name"].as_str()?.into(), x["value"].as_str()?.into())))
                    .collect()
            })
            .unwrap_or_default();
        let path = h["path"].as_str().filter(|s| !s.is_empty()).unwrap_or("/");
        if path.contains(['\r', '\n', ' ']) {
            return Err(format!("{key}: bad path {path:?}"));
        }
        Check::Http {
            port: port(container, &h["port"]).map_err(|e| format!("{key}: {e}"))?,
            path: path.into(),
            headers,
        }
    } else if !p["tcpSocket"].is_null() {
        Check::Tcp {
            port: port(container, &p["tcpSocket"]["port"]).map_err(|e| format!("{key}: {e}"))?,
        }
    } else if !p["exec"].is_null() {
        let command = outpost_oci_shim::spec::strings(&p["exec"]["command"]);
        if command.is_empty() {
            return Err(format!("{key}: an exec probe needs a command"));
        }
        Check::Exec { command }
    } else {
        return Err(format!(
            "{key}: only httpGet, tcpSocket and exec probes are supported"
        ));
    };
    Ok(Some(Probe {
        check,
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        exec: None,
        delay: Duration::from_secs(p["initialDelaySeconds"].as_u64().unwrap_or(0)),
        period: secs("periodSeconds", 10),
        timeout: secs("timeoutSeconds", 1),
        successes: count("successThreshold", 1),
        failures: count("failureThreshold", 3),
    }))
}

/// A port number, or the name of one of the container's ports.
fn port(container: &Value, v: &Value) -> Result<u16, String> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("bad port {n}"));
    }
    let name = v.as_str().ok_or("no port")?;
    if let Ok(n) = name.parse::<u16>() {
        return Ok(n);
    }
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| format!("the container has no port named {name:?}"))
}

/// A lifecycle hook's handler (`postStart`, `preStop`): a probe's check tried once, or a
/// pause.
#[derive(Debug, Clone)]
pub enum Hook {
    Sleep(Duration),
    Check {
        probe: Probe,
        /// `httpGet.host`: somewhere other than the container.
        host: Option<IpAddr>,
    },
}

/// The container's `lifecycle.KEY` hook, if it has one.
pub fn hook(container: &Value, key: &str) -> Result<Option<Hook>, String> {
    let h = &container["lifecycle"][key];
    if h.is_null() {
        return Ok(None);
    }
    if !h["sleep"].is_null() {
        let secs = h["sleep"]["seconds"].as_u64().unwrap_or(0);
        return Ok(Some(Hook::Sleep(Duration::from_secs(secs))));
    }
    let mut c = serde_json::json!({"ports": container["ports"]});
    c[key] = h.clone();
    let probe = parse(&c, key)?.ok_or_else(|| format!("{key}: no handler"))?;
    let host = match h["httpGet"]["host"].as_str().filter(|s| !s.is_empty()) {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| format!("{key}: httpGet.host {s:?} must be an IP address"))?,
        ),
        None => None,
    };
    Ok(Some(Hook::Check { probe, host }))
}

impl Hook {
    /// Run it once, given at most `limit`.
    pub async fn run(&self, limit: Duration) -> Result<(), String> {
        match self {
            Hook::Sleep(d) => {
                tokio::time::sleep((*d).min(limit)).await;
                Ok(())
            }
            Hook::Check { probe, host } => {
                let mut p = probe.clone();
                if let Some(h) = host {
                    p.host = *h;
                }
                p.timeout = limit;
                p.try_once().await
            }
        }
    }

    fn probe(&mut self) -> Option<&mut Probe> {
        match self {
            Hook::Check { probe, .. } => Some(probe),
            Hook::Sleep(_) => None,
        }
    }

    pub fn runs_a_command(&self) -> bool {
        matches!(self, Hook::Check { probe, .. } if matches!(probe.check, Check::Exec { .. }))
    }
}

/// The probe inside each of `hooks` that has one.
pub fn hook_probes<'a>(
    hooks: impl Iterator<Item = &'a mut Option<Hook>>,
) -> impl Iterator<Item = &'a mut Probe> {
    hooks.flatten().filter_map(Hook::probe)
}

/// Why an exec probe cannot run in a Wasm container.
pub const NO_PROCESS: &str =
    "exec probes need a process to run in; a Wasm container has none (use httpGet or tcpSocket)";

impl Probe {
    /// One try: `Ok` if it passed, otherwise what the kubelet would say in the event.
    pub async fn try_once(&self) -> Result<(), String> {
        let run = async {
            match (&self.check, &self.exec) {
                (Check::Exec { command }, Some(ExecIn(f))) => match f(command.clone()).await? {
                    (0, _) => Ok(()),
                    (code, out) => Err(format!(
                        "command {command:?} exited with {code}: {}",
                        out.trim()
                    )),
                },
                (Check::Exec { .. }, None) => Err(NO_PROCESS.to_string()),
                (c, _) => c.run(self.host).await,
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} timed out after {}s",
                self.check.what(),
                self.timeout.as_secs()
            )),
        }
    }
}

impl Check {
    fn what(&self) -> &'static str {
        match self {
            Check::Http { .. } => "HTTP probe",
            Check::Tcp { .. } => "TCP probe",
            Check::Exec { .. } => "command",
        }
    }

    async fn run(&self, host: IpAddr) -> Result<(), String> {
        match self {
            Check::Exec { .. } => Err(NO_PROCESS.to_string()),
            Check::Tcp { port } => TcpStream::connect((host, *port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}")),
            Check::Http {
                port,
                path,
                headers,
            } => {
                let mut s = TcpStream::connect((host, *port))
                    .await
                    .map_err(|e| format!("Get \"http://{host}:{port}{path}\": {e}"))?;
                let mut req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n"
                );
                for (k, v) in headers {
                    if !k.contains(['\r', '\n', ':']) && !v.contains(['\r', '\n']) {
                        req.push_str(&format!("{k}: {v}\r\n"));
                    }
                }
                req.push_str("\r\n");
                let io = |e: std::io::Error| format!("Get \"http://{host}:{port}{path}\": {e}");
                s.write_all(req.as_bytes()).await.map_err(io)?;
                // The status line is all a verdict needs.
                let mut head = Vec::with_capacity(64);
                let mut buf = [0u8; 256];
                while !head.contains(&b'\n') && head.len() < 4096 {
                    let n = s.read(&mut buf).await.map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&head);
                let code = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| format!("HTTP probe got no status line from {host}:{port}"))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
        }
    }
}

/// Consecutive results, turned into a verdict as the thresholds say.
#[derive(Debug, Default)]
pub struct Tally {
    passes: u32,
    fails: u32,
}

impl Tally {
    /// Record one result; `Some(verdict)` once a threshold is reached.
    pub fn record(&mut self, p: &Probe, ok: bool) -> Option<bool> {
        if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            (self.passes >= p.successes).then_some(true)
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            (self.fails >= p.failures).then_some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn named_ports_defaults_and_refusals() {
        let c = json!({"ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/healthz"}},
            "livenessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 2, "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["true"]}}});
        let r = parse(&c, "readinessProbe").unwrap().unwrap();
        assert_eq!(
            r.check,
            Check::Http {
                port: 8080,
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            (r.period, r.timeout, r.successes, r.failures),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let l = parse(&c, "livenessProbe").unwrap().unwrap();
        assert_eq!(
            (l.check.clone(), l.period, l.failures),
            (Check::Tcp { port: 9000 }, Duration::from_secs(2), 1)
        );
        let s = parse(&c, "startupProbe").unwrap().unwrap();
        assert_eq!(
            s.check,
            Check::Exec {
                command: vec!["true".into()]
            }
        );
        let empty = json!({"livenessProbe": {"exec": {"command": []}}});
        assert!(parse(&empty, "livenessProbe")
            .unwrap_err()
            .contains("needs a command"));
        assert_eq!(parse(&c, "nope").unwrap(), None);
        let bad = json!({"readinessProbe": {"httpGet": {"port": "web"}}});
        assert!(parse(&bad, "readinessProbe")
            .unwrap_err()
            .contains("no port named \"web\""));
    }

    #[test]
    fn thresholds_need_runs_in_a_row() {
        let c = json!({"readinessProbe": {"tcpSocket": {"port": 1}, "successThreshold": 2, "failureThreshold": 2}});
        let p = parse(&c, "readinessProbe").unwrap().unwrap();
        let mut t = Tally::default();
        assert_eq!(t.record(&p, true), None);
        assert_eq!(t.record(&p, false), None);
        assert_eq!(t.record(&p, true), None);
        assert_eq!(t.record(&p, true), Some(true));
        assert_eq!(t.record(&p, false), None);
        assert_eq!(t.record(&p, false), Some(false));
    }

    #[tokio::test]
    async fn http_and_tcp_tries() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let code = if n == 1 {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let probe = |check| Probe {
            check,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            exec: None,
            delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            successes: 1,
            failures: 1,
        };
        let http = probe(Check::Http {
            port,
            path: "/".into(),
            headers: vec![],
        });
        assert_eq!(http.try_once().await, Ok(()));
        assert_eq!(
            http.try_once().await,
            Err("HTTP probe failed with statuscode: 503".into())
        );
        assert_eq!(probe(Check::Tcp { port }).try_once().await, Ok(()));
        // An exec probe passes on exit code 0 and says what failed otherwise; without a
        // process to run in it fails with the reason.
        let exec = |code: i32| {
            let mut p = probe(Check::Exec {
                command: vec!["check".into()],
            });
            p.exec = Some(ExecIn(Arc::new(move |cmd: Vec<String>| -> Ran {
                Box::pin(async move { Ok((code, format!("{} said no\n", cmd[0]))) })
            })));
            p
        };
        assert_eq!(exec(0).try_once().await, Ok(()));
        assert_eq!(
            exec(3).try_once().await,
            Err("command [\"check\"] exited with 3: check said no".into())
        );
        let mut none = exec(0);
        none.exec = None;
        assert_eq!(none.try_once().await, Err(NO_PROCESS.into()));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(probe(Check::Tcp { port: dead })
            .try_once()
            .await
            .unwrap_err()
            .contains("dial tcp"));
    }
}
