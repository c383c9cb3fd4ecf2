//! One pod's life on the node: an explicit state machine per container, the kubelet's restart
//! rules and back-off, and the pod status they add up to.
//!
//! ```text
//!            prepare ok              exit
//! Waiting ──────────────▶ Running ─────────▶ Terminated ──policy says stay──▶ done
//! (ContainerCreating,                              │
//!  ErrImagePull, ...)  ◀── back-off (CrashLoopBackOff) ◀── policy says restart
//! ```
//!
//! Init containers run first, one at a time, each to a successful end (a sidecar, one with
//! `restartPolicy: Always`, only until it has started, and then beside the others); the
//! pod is Pending until they have, and Failed if one fails for good.
//!
//! The transitions and the status are pure functions; [`crate::agent`] drives them with IO.

use std::time::Duration;

use serde_json::{json, Value};

/// A container's state, as the kubelet reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started: String,
    },
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started: String,
        finished: String,
    },
}

impl State {
    pub fn waiting(reason: &str, message: impl Into<String>) -> State {
        State::Waiting {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// As the API shows it (a container status's `state` or `lastState`).
    pub fn json(&self) -> Value {
        match self {
            State::Waiting { reason, message } if message.is_empty() => {
                json!({"waiting": {"reason": reason}})
            }
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started } => json!({"running": {"startedAt": started}}),
            State::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => {
                let mut t = json!({"exitCode": code, "reason": reason,
                    "startedAt": started, "finishedAt": finished});
                if !message.is_empty() {
                    t["message"] = json!(message);
                }
                json!({ "terminated": t })
            }
        }
    }

    /// A terminated state back from its [`State::json`] (the node's cache keeps a run that
    /// ended for good so).
    pub fn terminated_from(v: &Value) -> Option<State> {
        let t = &v["terminated"];
        let text = |k: &str| t[k].as_str().map(String::from);
        Some(State::Terminated {
            code: i32::try_from(t["exitCode"].as_i64()?).ok()?,
            reason: text("reason")?,
            message: text("message").unwrap_or_default(),
            started: text("startedAt")?,
            finished: text("finishedAt")?,
        })
    }
}

/// One container of a pod, as the node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// `runtime://id`, as the kubelet's containerID; empty until a runtime took it.
    pub id: String,
    pub state: State,
    /// The previous run's end, once there was one.
    pub last: Option<State>,
    pub restarts: u32,
    /// The policy says this container will not run again.
    pub done: bool,
    /// Its startup probe passed (or it has none) in this run.
    pub started: bool,
    /// Its readiness probe passes (or it has none and has started) in this run.
    pub ready: bool,
    /// An ephemeral container (`kubectl debug`): run once, and neither part of the pod's
    /// phase nor of its readiness.
    pub ephemeral: bool,
    /// An init container, and whether it is a sidecar (`restartPolicy: Always`).
    pub init: bool,
    pub sidecar: bool,
}

impl Container {
    pub fn new(name: &str, image: &str) -> Container {
        Container {
            name: name.into(),
            image: image.into(),
            image_id: String::new(),
            id: String::new(),
            state: State::waiting("ContainerCreating", ""),
            last: None,
            restarts: 0,
            done: false,
            started: false,
            ready: false,
            ephemeral: false,
            init: false,
            sidecar: false,
        }
    }

    /// An init container; `sidecar` for one that keeps running beside the others.
    pub fn init(name: &str, image: &str, sidecar: bool) -> Container {
        Container {
            init: true,
            sidecar,
            state: State::waiting("PodInitializing", ""),
            ..Container::new(name, image)
        }
    }

    /// Done with initializing: an init container ended well, a sidecar has started.
    pub fn initialized(&self) -> bool {
        if self.sidecar {
            self.started && matches!(self.state, State::Running { .. }) || self.last.is_some()
        } else {
            self.done && matches!(self.state, State::Terminated { code: 0, .. })
        }
    }

    /// An init container that ended badly and will not run again: the pod has failed.
    pub fn failed_init(&self) -> bool {
        self.init && !self.sidecar && self.done && !self.initialized()
    }
}

/// What happens after a container ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Restart(Duration),
    Stay,
}

/// The kubelet's rule: `Always` restarts, `OnFailure` restarts a non-zero exit, `Never`
/// never does. Restarts back off from 10 s, doubling to 5 minutes; a run of 10 minutes or
/// more resets the back-off.
pub fn after_exit(policy: &str, code: i32, restarts: u32, ran: Duration) -> Next {
    let again = match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    };
    if !again {
        return Next::Stay;
    }
    Next::Restart(backoff(if ran >= Duration::from_secs(600) {
        0
    } else {
        restarts
    }))
}

pub fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << restarts.min(5)).min(300))
}

/// The pod phase the containers add up to.
pub fn phase(containers: &[&Container]) -> &'static str {
    if !containers.is_empty() && containers.iter().all(|c| c.done) {
        let ok = containers
            .iter()
            .all(|c| matches!(c.state, State::Terminated { code: 0, .. }));
        return if ok { "Succeeded" } else { "Failed" };
    }
    let started = containers.iter().any(|c| {
        matches!(c.state, State::Running { .. } | State::Terminated { .. }) || c.last.is_some()
    });
    if started {
        "Running"
    } else {
        "Pending"
    }
}

/// Whether the pod's init containers are through: each ended well (or, a sidecar, started),
/// or the others have begun.
pub fn initialized(all: &[Container]) -> bool {
    let begun = all.iter().any(|c| {
        !c.init
            && !c.ephemeral
            && (c.last.is_some() || !matches!(&c.state, State::Waiting { reason, .. } if reason == "PodInitializing"))
    });
    begun || all.iter().filter(|c| c.init).all(Container::initialized)
}

/// The pod's `status`, as the kubelet would write it.
pub fn status(all: &[Container], started: &str, host_ip: &str, pod_ip: &str, now: &str) -> Value {
    let ephemeral: Vec<&Container> = all.iter().filter(|c| c.ephemeral).collect();
    let inits: Vec<&Container> = all.iter().filter(|c| c.init).collect();
    let containers: Vec<&Container> = all.iter().filter(|c| !c.ephemeral && !c.init).collect();
    let initialized = initialized(all);
    let phase = if inits.iter().any(|c| c.failed_init()) {
        "Failed"
    } else if !initialized {
        "Pending"
    } else {
        phase(&containers)
    };
    let running = |c: &Container| matches!(c.state, State::Running { .. });
    let ready_now = |c: &Container| running(c) && c.ready;
    let sidecars_ready = inits.iter().filter(|c| c.sidecar).all(|c| ready_now(c));
    let ready = !containers.is_empty()
        && containers.iter().all(|c| ready_now(c))
        && sidecars_ready
        && initialized;
    let cond = |t: &str, ok: bool, reason: Option<&str>| {
        let mut c = json!({"type": t, "status": if ok { "True" } else { "False" },
            "lastProbeTime": null, "lastTransitionTime": now});
        // Null, not left out: status goes as a strategic merge patch, where a missing reason
        // would keep the one from before (a Ready pod still saying ContainersNotReady).
        c["reason"] = json!(reason);
        c
    };
    let not_ready = (!ready).then_some(if phase == "Succeeded" || phase == "Failed" {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    });
    let waiting_for: Vec<&str> = inits
        .iter()
        .filter(|c| !c.initialized())
        .map(|c| c.name.as_str())
        .collect();
    let of = |c: &Container| {
        let mut s = json!({
            "name": c.name, "image": c.image, "imageID": c.image_id,
            "ready": ready_now(c) && !c.ephemeral, "started": running(c) && c.started,
            "restartCount": c.restarts, "state": c.state.json(),
            "lastState": c.last.as_ref().map(State::json).unwrap_or(json!({})),
        });
        if !matches!(c.state, State::Waiting { .. }) || c.last.is_some() {
            s["containerID"] = json!(if c.id.is_empty() {
                format!("wasm://{}", c.name)
            } else {
                c.id.clone()
            });
        }
        s
    };
    let statuses: Vec<Value> = containers.iter().map(|c| of(c)).collect();
    let mut out = json!({
        "phase": phase,
        "conditions": [
            cond("PodReadyToStartContainers", true, None),
            if initialized {
                cond("Initialized", true, None)
            } else {
                let mut c = cond("Initialized", false, Some("ContainersNotInitialized"));
                c["message"] = json!(format!(
                    "containers with incomplete status: [{}]",
                    waiting_for.join(" ")
                ));
                c
            },
            cond("Ready", ready, not_ready),
            cond("ContainersReady", ready, not_ready),
            cond("PodScheduled", true, None),
        ],
        "hostIP": host_ip,
        // Status goes as a strategic merge patch, where these lists merge by `ip`: the
        // marker replaces them, so an address the pod had before does not stay first.
        "hostIPs": [{"$patch": "replace"}, {"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"$patch": "replace"}, {"ip": pod_ip}],
        "startTime": started,
        "containerStatuses": statuses,
    });
    if !ephemeral.is_empty() {
        out["ephemeralContainerStatuses"] = ephemeral.iter().map(|c| of(c)).collect();
    }
    if !inits.is_empty() {
        out["initContainerStatuses"] = inits.iter().map(|c| of(c)).collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(code: i32, done: bool) -> Container {
        Container {
            state: State::Terminated {
                code,
                reason: "x".into(),
                message: String::new(),
                started: "t".into(),
                finished: "t".into(),
            },
            done,
            ..Container::new("c", "i")
        }
    }

    #[test]
    fn a_terminated_state_reads_back_from_its_json() {
        let s = State::Terminated {
            code: 3,
            reason: "Error".into(),
            message: "bye".into(),
            started: "2026-12-07T05:00:00Z".into(),
            finished: "2026-12-07T05:00:01Z".into(),
        };
        assert_eq!(State::terminated_from(&s.json()), Some(s));
        assert_eq!(
            State::terminated_from(&State::waiting("X", "").json()),
            None
        );
    }

    #[test]
    fn restart_policy_and_backoff() {
        let s = Duration::from_secs(1);
        assert_eq!(after_exit("Never", 1, 0, s), Next::Stay);
        assert_eq!(after_exit("OnFailure", 0, 0, s), Next::Stay);
        assert_eq!(
            after_exit("OnFailure", 2, 0, s),
            Next::Restart(Duration::from_secs(10))
        );
        assert_eq!(
            after_exit("Always", 0, 1, s),
            Next::Restart(Duration::from_secs(20))
        );
        assert_eq!(
            after_exit("Always", 1, 9, s),
            Next::Restart(Duration::from_secs(300))
        );
        let long = Duration::from_secs(700);
        assert_eq!(
            after_exit("Always", 1, 9, long),
            Next::Restart(Duration::from_secs(10))
        );
    }

    #[test]
    fn an_ephemeral_container_is_reported_apart_and_leaves_the_phase_alone() {
        let mut running = Container::new("main", "i");
        running.state = State::Running {
            started: "t".into(),
        };
        running.ready = true;
        let debugger = Container {
            ephemeral: true,
            name: "debugger".into(),
            ..ended(0, true)
        };
        let s = status(&[running, debugger], "t0", "10.0.0.1", "10.0.0.2", "t1");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["conditions"][2]["status"], "True", "still Ready");
        assert_eq!(s["containerStatuses"].as_array().map(Vec::len), Some(1));
        assert_eq!(s["ephemeralContainerStatuses"][0]["name"], "debugger");
        assert_eq!(s["ephemeralContainerStatuses"][0]["ready"], false);
        assert_eq!(
            s["ephemeralContainerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
    }

    #[test]
    fn init_containers_hold_the_pod_pending_or_fail_it() {
        let waiting_main = || Container {
            state: State::waiting("PodInitializing", ""),
            ..Container::new("main", "i")
        };
        let running_init = Container {
            state: State::Running {
                started: "t".into(),
            },
            ..Container::init("init", "i", false)
        };
        let s = status(
            &[running_init, waiting_main()],
            "t0",
            "10.0.0.1",
            "10.0.0.2",
            "t1",
        );
        assert_eq!(s["phase"], "Pending");
        assert_eq!(s["conditions"][1]["type"], "Initialized");
        assert_eq!(s["conditions"][1]["status"], "False");
        assert_eq!(
            s["conditions"][1]["message"],
            "containers with incomplete status: [init]"
        );
        assert_eq!(s["initContainerStatuses"][0]["name"], "init");
        assert_eq!(s["containerStatuses"].as_array().map(Vec::len), Some(1));
        let failed = Container {
            init: true,
            ..ended(3, true)
        };
        let s = status(&[failed, waiting_main()], "t0", "h", "p", "t1");
        assert_eq!(s["phase"], "Failed");
        let ok = Container {
            init: true,
            ..ended(0, true)
        };
        let mut main = Container::new("main", "i");
        main.state = State::Running {
            started: "t".into(),
        };
        main.ready = true;
        let s = status(&[ok, main.clone()], "t0", "h", "p", "t1");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["conditions"][1]["status"], "True");
        assert_eq!(s["conditions"][2]["status"], "True", "Ready");
        // A sidecar that has started is through initializing; unready, it holds Ready back.
        let mut side = Container::init("side", "i", true);
        side.state = main.state.clone();
        side.started = true;
        assert!(side.initialized());
        let s = status(&[side, main], "t0", "h", "p", "t1");
        assert_eq!(s["conditions"][2]["status"], "False");
    }

    #[test]
    fn phases() {
        assert_eq!(phase(&[&Container::new("a", "i")]), "Pending");
        assert_eq!(phase(&[&ended(0, true)]), "Succeeded");
        assert_eq!(phase(&[&ended(0, true), &ended(1, true)]), "Failed");
        assert_eq!(phase(&[&ended(1, false)]), "Running");
        let mut backing_off = Container::new("a", "i");
        backing_off.last = Some(ended(1, false).state);
        backing_off.state = State::waiting("CrashLoopBackOff", "back-off");
        assert_eq!(phase(&[&backing_off]), "Running");
        let s = status(&[backing_off], "t0", "10.0.0.1", "10.0.0.1", "t1");
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "CrashLoopBackOff"
        );
        assert_eq!(
            s["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
            1
        );
        assert_eq!(s["conditions"][2]["status"], "False");
    }
}
