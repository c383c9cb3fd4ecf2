//! Server-side printing: the `meta.k8s.io/v1` Table columns `kubectl get` shows for each kind
//! (the same columns as the Kubernetes API server's printers). Pure; time is passed in.

use serde_json::{json, Value};

use super::resources::Resource;
use super::seconds;
use super::select::Labels;

/// (name, type, format, priority): priority 1 columns appear only in `-o wide`.
type Col = (&'static str, &'static str, &'static str, u8);

fn columns(kind: &str) -> &'static [Col] {
    const NAME: Col = ("Name", "string", "name", 0);
    const AGE: Col = ("Age", "string", "", 0);
    match kind {
        "Pod" => &[
            NAME,
            ("Ready", "string", "", 0),
            ("Status", "string", "", 0),
            ("Restarts", "string", "", 0),
            AGE,
            ("IP", "string", "", 1),
            ("Node", "string", "", 1),
            ("Nominated Node", "string", "", 1),
            ("Readiness Gates", "string", "", 1),
        ],
        "Node" => &[
            NAME,
            ("Status", "string", "", 0),
            ("Roles", "string", "", 0),
            AGE,
            ("Version", "string", "", 0),
            ("Internal-IP", "string", "", 1),
            ("External-IP", "string", "", 1),
            ("OS-Image", "string", "", 1),
            ("Kernel-Version", "string", "", 1),
            ("Container-Runtime", "string", "", 1),
        ],
        "Deployment" => &[
            NAME,
            ("Ready", "string", "", 0),
            ("Up-to-date", "string", "", 0),
            ("Available", "string", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "ReplicaSet" | "ReplicationController" => &[
            NAME,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "DaemonSet" => &[
            NAME,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0),
            ("Node Selector", "string", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "StatefulSet" => &[
            NAME,
            ("Ready", "string", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
        ],
        "Job" => &[
            NAME,
            ("Status", "string", "", 0),
            ("Completions", "string", "", 0),
            ("Duration", "string", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "CronJob" => &[
            NAME,
            ("Schedule", "string", "", 0),
            ("Timezone", "string", "", 0),
            ("Suspend", "boolean", "", 0),
            ("Active", "integer", "", 0),
            ("Last Schedule", "string", "", 0),
            AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "Service" => &[
            NAME,
            ("Type", "string", "", 0),
            ("Cluster-IP", "string", "", 0),
            ("External-IP", "string", "", 0),
            ("Port(s)", "string", "", 0),
            AGE,
            ("Selector", "string", "", 1),
        ],
        "Namespace" => &[NAME, ("Status", "string", "", 0), AGE],
        "ConfigMap" => &[NAME, ("Data", "string", "", 0), AGE],
        "Secret" => &[
            NAME,
            ("Type", "string", "", 0),
            ("Data", "string", "", 0),
            AGE,
        ],
        "ServiceAccount" => &[NAME, ("Secrets", "string", "", 0), AGE],
        "Endpoints" => &[NAME, ("Endpoints", "string", "", 0), AGE],
        "EndpointSlice" => &[
            NAME,
            ("AddressType", "string", "", 0),
            ("Ports", "string", "", 0),
            ("Endpoints", "string", "", 0),
            AGE,
        ],
        "Lease" => &[NAME, ("Holder", "string", "", 0), AGE],
        "ControllerRevision" => &[
            NAME,
            ("Controller", "string", "", 0),
            ("Revision", "integer", "", 0),
            AGE,
        ],
        "RuntimeClass" => &[NAME, ("Handler", "string", "", 0), AGE],
        "PersistentVolumeClaim" => &[
            NAME,
            ("Status", "string", "", 0),
            ("Volume", "string", "", 0),
            ("Capacity", "string", "", 0),
            ("Access Modes", "string", "", 0),
            ("StorageClass", "string", "", 0),
            ("VolumeAttributesClass", "string", "", 0),
            AGE,
            ("VolumeMode", "string", "", 1),
        ],
        "PersistentVolume" => &[
            NAME,
            ("Capacity", "string", "", 0),
            ("Access Modes", "string", "", 0),
            ("Reclaim Policy", "string", "", 0),
            ("Status", "string", "", 0),
            ("Claim", "string", "", 0),
            ("StorageClass", "string", "", 0),
            ("VolumeAttributesClass", "string", "", 0),
            ("Reason", "string", "", 0),
            AGE,
            ("VolumeMode", "string", "", 1),
        ],
        "ResourceQuota" => &[
            NAME,
            AGE,
            ("Request", "string", "", 0),
            ("Limit", "string", "", 0),
        ],
        "StorageClass" => &[
            NAME,
            ("Provisioner", "string", "", 0),
            ("ReclaimPolicy", "string", "", 0),
            ("VolumeBindingMode", "string", "", 0),
            ("AllowVolumeExpansion", "string", "", 0),
            AGE,
        ],
        "Event" => &[
            ("Last Seen", "string", "", 0),
            ("Type", "string", "", 0),
            ("Reason", "string", "", 0),
            ("Object", "string", "", 0),
            ("Subobject", "string", "", 1),
            ("Source", "string", "", 1),
            ("Message", "string", "", 0),
            ("First Seen", "string", "", 1),
            ("Count", "string", "", 1),
            ("Name", "string", "", 1),
        ],
        "RoleBinding" | "ClusterRoleBinding" => &[
            NAME,
            ("Role", "string", "", 0),
            AGE,
            ("Users", "string", "", 1),
            ("Groups", "string", "", 1),
            ("ServiceAccounts", "string", "", 1),
        ],
        "PodDisruptionBudget" => &[
            NAME,
            ("Min Available", "string", "", 0),
            ("Max Unavailable", "string", "", 0),
            ("Allowed Disruptions", "integer", "", 0),
            AGE,
        ],
        "Ingress" => &[
            NAME,
            ("Class", "string", "", 0),
            ("Hosts", "string", "", 0),
            ("Address", "string", "", 0),
            ("Ports", "string", "", 0),
            AGE,
        ],
        "IngressClass" => &[
            NAME,
            ("Controller", "string", "", 0),
            ("Parameters", "string", "", 0),
            AGE,
        ],
        "NetworkPolicy" => &[NAME, ("Pod-Selector", "string", "", 0), AGE],
        "HorizontalPodAutoscaler" => &[
            NAME,
            ("Reference", "string", "", 0),
            ("Targets", "string", "", 0),
            ("MinPods", "string", "", 0),
            ("MaxPods", "integer", "", 0),
            ("Replicas", "integer", "", 0),
            AGE,
        ],
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => {
            &[NAME, ("Webhooks", "integer", "", 0), AGE]
        }
        "CertificateSigningRequest" => &[
            NAME,
            AGE,
            ("SignerName", "string", "", 0),
            ("Requestor", "string", "", 0),
            ("RequestedDuration", "string", "", 0),
            ("Condition", "string", "", 0),
        ],
        "PriorityClass" => &[
            NAME,
            ("Value", "integer", "", 0),
            ("Global-Default", "boolean", "", 0),
            AGE,
            ("PreemptionPolicy", "string", "", 0),
        ],
        _ => &[NAME, ("Created At", "date", "", 0)],
    }
}

/// Go's `duration.HumanDuration`, which the API server uses for the Age column.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h) = (s / 60, s / 3600);
    let d = h / 24;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        if d % 365 == 0 {
            format!("{}y", d / 365)
        } else {
            format!("{}y{}d", d / 365, d % 365)
        }
    } else {
        format!("{}y", d / 365)
    }
}

fn age_text(v: &Value, now: i64) -> String {
    seconds(v).map_or("<unknown>".into(), |t| human_duration(now - t))
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Access modes as kubectl abbreviates them (`RWO,ROX`).
fn access_modes(v: &Value) -> String {
    let short: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m.as_str()? {
            "ReadWriteOnce" => Some("RWO"),
            "ReadOnlyMany" => Some("ROX"),
            "ReadWriteMany" => Some("RWX"),
            "ReadWriteOncePod" => Some("RWOP"),
            _ => None,
        })
        .collect();
    short.join(",")
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

/// An autoscaler's targets as kubectl prints them: `cpu: <unknown>/80%` for each resource
/// metric until a metrics pipeline reports a current value.
fn hpa_targets(spec: &Value, st: &Value) -> String {
    let metrics = spec["metrics"].as_array().cloned().unwrap_or_default();
    if metrics.is_empty() {
        return "<none>".into();
    }
    let current = st["currentMetrics"].as_array().cloned().unwrap_or_default();
    let parts: Vec<String> = metrics
        .iter()
        .map(|m| {
            let r = &m["resource"];
            let name = r["name"].as_str().unwrap_or("");
            let want = &r["target"];
            let now = current
                .iter()
                .find(|c| c["resource"]["name"] == name)
                .map(|c| &c["resource"]["current"]);
            let (have, goal) = match want["averageUtilization"].as_i64() {
                Some(u) => (
                    now.and_then(|c| c["averageUtilization"].as_i64())
                        .map(|c| format!("{c}%")),
                    format!("{u}%"),
                ),
                None => (
                    now.and_then(|c| c["averageValue"].as_str())
                        .map(String::from),
                    want["averageValue"]
                        .as_str()
                        .or(want["value"].as_str())
                        .unwrap_or("")
                        .to_string(),
                ),
            };
            let have = have.unwrap_or_else(|| "<unknown>".into());
            if m["type"] == "Resource" {
                format!("{name}: {have}/{goal}")
            } else {
                format!("{have}/{goal}")
            }
        })
        .collect();
    parts.join(", ")
}

fn containers_images(spec: &Value) -> (String, String) {
    let cs = spec["containers"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = cs.iter().filter_map(|c| c["name"].as_str()).collect();
    let images: Vec<&str> = cs.iter().filter_map(|c| c["image"].as_str()).collect();
    (names.join(","), images.join(","))
}

fn selector(sel: &Value) -> String {
    or_none(Labels::from_selector(sel).to_query())
}

fn map_selector(sel: &Value) -> String {
    let parts: Vec<String> = sel
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    or_none(parts.join(","))
}

/// A pod's STATUS, READY and RESTARTS as kubectl prints them: the phase (or the status's
/// reason), overridden by the first init container still initializing (`Init:1/2`,
/// `Init:Error`, `Init:CrashLoopBackOff`), else by the first container that is waiting or
/// has ended; `Terminating` while a pod that has not ended is being deleted. Sidecars (init
/// containers that keep running) count among the containers.
fn pod_summary(o: &Value) -> (String, usize, usize, i64) {
    let (spec, st) = (&o["spec"], &o["status"]);
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let phase = st["phase"].as_str().unwrap_or("Pending");
    let mut reason = st["reason"].as_str().unwrap_or(phase).to_string();
    if list(&st["conditions"])
        .iter()
        .any(|c| c["type"] == "PodScheduled" && c["reason"] == "SchedulingGated")
    {
        reason = "SchedulingGated".into();
    }
    let init_specs = list(&spec["initContainers"]);
    let sidecar = |name: &Value| {
        init_specs
            .iter()
            .any(|c| c["name"] == *name && c["restartPolicy"] == "Always")
    };
    let total =
        list(&spec["containers"]).len() + init_specs.iter().filter(|c| sidecar(&c["name"])).count();
    let (mut ready, mut restarts, mut sidecar_restarts) = (0usize, 0i64, 0i64);
    let inits = list(&st["initContainerStatuses"]);
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        restarts += int(&c["restartCount"]);
        if sidecar(&c["name"]) {
            sidecar_restarts += int(&c["restartCount"]);
        }
        let (term, wait) = (&c["state"]["terminated"], &c["state"]["waiting"]);
        if !term.is_null() && int(&term["exitCode"]) == 0 {
            continue;
        }
        if sidecar(&c["name"]) && c["started"] == true {
            if c["ready"] == true {
                ready += 1;
            }
            continue;
        }
        initializing = true;
        reason = if !term.is_null() {
            match term["reason"].as_str().filter(|r| !r.is_empty()) {
                Some(r) => format!("Init:{r}"),
                None => format!("Init:ExitCode:{}", int(&term["exitCode"])),
            }
        } else if let Some(r) = wait["reason"]
            .as_str()
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            format!("Init:{r}")
        } else {
            format!("Init:{i}/{}", init_specs.len())
        };
        break;
    }
    let initialized = list(&st["conditions"])
        .iter()
        .any(|c| c["type"] == "Initialized" && c["status"] == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        let mut running = false;
        for c in list(&st["containerStatuses"]).iter().rev() {
            restarts += int(&c["restartCount"]);
            let (term, wait) = (&c["state"]["terminated"], &c["state"]["waiting"]);
            if let Some(r) = wait["reason"].as_str().filter(|r| !r.is_empty()) {
                reason = r.into();
            } else if let Some(r) = term["reason"].as_str().filter(|r| !r.is_empty()) {
                reason = r.into();
            } else if !term.is_null() {
                reason = format!("ExitCode:{}", int(&term["exitCode"]));
            } else if c["ready"] == true && !c["state"]["running"].is_null() {
                running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && running {
            let has_ready = list(&st["conditions"])
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            reason = if has_ready { "Running" } else { "NotReady" }.into();
        }
    }
    let ended = matches!(phase, "Succeeded" | "Failed");
    if !o["metadata"]["deletionTimestamp"].is_null() {
        if st["reason"] == "NodeLost" {
            reason = "Unknown".into();
        } else if !ended {
            reason = "Terminating".into();
        }
    }
    (reason, ready, total, restarts)
}

fn cells(kind: &str, o: &Value, now: i64) -> Vec<Value> {
    let meta = &o["metadata"];
    let name = json!(meta["name"].as_str().unwrap_or(""));
    let age = json!(age_text(&meta["creationTimestamp"], now));
    let spec = &o["spec"];
    let st = &o["status"];
    match kind {
        "Pod" => {
            let (status, ready, total, restarts) = pod_summary(o);
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(or_none(st["podIP"].as_str().unwrap_or("").into())),
                json!(or_none(spec["nodeName"].as_str().unwrap_or("").into())),
                json!(or_none(
                    st["nominatedNodeName"].as_str().unwrap_or("").into()
                )),
                json!("<none>"),
            ]
        }
        "Node" => {
            let ready = st["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                // As kubectl's printer: anything but True is NotReady (Unknown included);
                // no Ready condition at all is Unknown.
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if spec["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<&str> = meta["labels"]
                .as_object()
                .map(|m| {
                    m.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect()
                })
                .unwrap_or_default();
            let addr = |t: &str| {
                st["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .and_then(|x| x["address"].as_str())
                    .unwrap_or("<none>")
                    .to_string()
            };
            let info = &st["nodeInfo"];
            let s = |v: &Value| json!(v.as_str().unwrap_or(""));
            vec![
                name,
                json!(status),
                json!(or_none(roles.join(","))),
                age,
                s(&info["kubeletVersion"]),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                s(&info["osImage"]),
                s(&info["kernelVersion"]),
                s(&info["containerRuntimeVersion"]),
            ]
        }
        "Deployment" => {
            let (c, i) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&st["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                json!(int(&st["updatedReplicas"])),
                json!(int(&st["availableReplicas"])),
                age,
                json!(c),
                json!(i),
                json!(selector(&spec["selector"])),
            ]
        }
        "ReplicaSet" | "ReplicationController" => {
            let (c, i) = containers_images(&spec["template"]["spec"]);
            // A ReplicationController's selector is a plain label map.
            let sel = if kind == "ReplicaSet" {
                selector(&spec["selector"])
            } else {
                map_selector(&spec["selector"])
            };
            vec![
                name,
                json!(int(&spec["replicas"])),
                json!(int(&st["replicas"])),
                json!(int(&st["readyReplicas"])),
                age,
                json!(c),
                json!(i),
                json!(sel),
            ]
        }
        "DaemonSet" => {
            let (c, i) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(int(&st["desiredNumberScheduled"])),
                json!(int(&st["currentNumberScheduled"])),
                json!(int(&st["numberReady"])),
                json!(int(&st["updatedNumberScheduled"])),
                json!(int(&st["numberAvailable"])),
                json!(map_selector(&spec["template"]["spec"]["nodeSelector"])),
                age,
                json!(c),
                json!(i),
                json!(selector(&spec["selector"])),
            ]
        }
        "StatefulSet" => {
            let (c, i) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&st["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                age,
                json!(c),
                json!(i),
            ]
        }
        "Job" => {
            let (c, i) = containers_images(&spec["template"]["spec"]);
            let cond = |t: &str| {
                st["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
            };
            let status = if cond("Complete") {
                "Complete"
            } else if cond("Failed") {
                "Failed"
            } else if spec["suspend"] == true {
                "Suspended"
            } else {
                "Running"
            };
            let duration = match (seconds(&st["startTime"]), seconds(&st["completionTime"])) {
                (Some(s), Some(e)) => human_duration(e - s),
                (Some(s), None) => human_duration(now - s),
                _ => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(format!(
                    "{}/{}",
                    int(&st["succeeded"]),
                    spec["completions"].as_i64().unwrap_or(1)
                )),
                json!(duration),
                age,
                json!(c),
                json!(i),
                json!(selector(&spec["selector"])),
            ]
        }
        "CronJob" => {
            let (c, i) = containers_images(&spec["jobTemplate"]["spec"]["template"]["spec"]);
            vec![
                name,
                json!(spec["schedule"].as_str().unwrap_or("")),
                json!(or_none(spec["timeZone"].as_str().unwrap_or("").into())),
                json!(spec["suspend"] == true),
                json!(st["active"].as_array().map_or(0, Vec::len)),
                json!(seconds(&st["lastScheduleTime"])
                    .map_or("<none>".into(), |t| human_duration(now - t))),
                age,
                json!(c),
                json!(i),
                json!(selector(&spec["jobTemplate"]["spec"]["selector"])),
            ]
        }
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64() {
                        Some(np) => format!("{}:{np}/{proto}", int(&p["port"])),
                        None => format!("{}/{proto}", int(&p["port"])),
                    }
                })
                .collect();
            let external = st["loadBalancer"]["ingress"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .or_else(|| spec["externalName"].as_str().map(String::from))
                .unwrap_or_else(|| {
                    if spec["type"] == "LoadBalancer" {
                        "<pending>".into()
                    } else {
                        "<none>".into()
                    }
                });
            vec![
                name,
                json!(spec["type"].as_str().unwrap_or("ClusterIP")),
                json!(or_none(spec["clusterIP"].as_str().unwrap_or("").into())),
                json!(external),
                json!(or_none(ports.join(","))),
                age,
                json!(map_selector(&spec["selector"])),
            ]
        }
        "Namespace" => vec![name, json!(st["phase"].as_str().unwrap_or("Active")), age],
        "ConfigMap" => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n.to_string()), age]
        }
        "Secret" => {
            let n = o["data"].as_object().map_or(0, |m| m.len());
            vec![
                name,
                json!(o["type"].as_str().unwrap_or("Opaque")),
                json!(n.to_string()),
                age,
            ]
        }
        "ResourceQuota" => {
            // `used/hard` of each cap, by name; limits.* in a column of their own.
            let (mut req, mut lim) = (Vec::new(), Vec::new());
            let mut names: Vec<&String> = o["spec"]["hard"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .collect();
            names.sort();
            for k in names {
                let q = |part: &str| st[part][k].as_str().unwrap_or("0").to_string();
                let cell = format!("{k}: {}/{}", q("used"), q("hard"));
                if k.starts_with("limits.") {
                    lim.push(cell);
                } else {
                    req.push(cell);
                }
            }
            vec![name, age, json!(req.join(", ")), json!(lim.join(", "))]
        }
        "ServiceAccount" => vec![
            name,
            json!(o["secrets"].as_array().map_or(0, Vec::len).to_string()),
            age,
        ],
        "Endpoints" => {
            let mut eps = Vec::new();
            for s in o["subsets"].as_array().into_iter().flatten() {
                for a in s["addresses"].as_array().into_iter().flatten() {
                    for p in s["ports"].as_array().into_iter().flatten() {
                        eps.push(format!(
                            "{}:{}",
                            a["ip"].as_str().unwrap_or(""),
                            int(&p["port"])
                        ));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![name, json!(or_none(shown)), age]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    p["port"]
                        .as_i64()
                        .map_or("<unset>".into(), |n| n.to_string())
                })
                .collect();
            let addrs: Vec<&str> = o["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            let shown = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                addrs.join(",")
            };
            let ports = if ports.is_empty() {
                "<unset>".to_string()
            } else {
                ports.join(",")
            };
            vec![
                name,
                json!(o["addressType"].as_str().unwrap_or("")),
                json!(ports),
                json!(or_none(shown)),
                age,
            ]
        }
        "ControllerRevision" => {
            // As kubectl's printer: the controlling owner as kind.group/name.
            let owner = meta["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["controller"] == true);
            let controller = owner.map_or(String::new(), |r| {
                let kind = r["kind"].as_str().unwrap_or("").to_lowercase();
                let group = r["apiVersion"]
                    .as_str()
                    .and_then(|v| v.rsplit_once('/'))
                    .map_or(String::new(), |(g, _)| format!(".{g}"));
                format!("{kind}{group}/{}", r["name"].as_str().unwrap_or(""))
            });
            vec![
                name,
                json!(controller),
                json!(o["revision"].as_i64().unwrap_or(0)),
                age,
            ]
        }
        "Lease" => vec![
            name,
            json!(spec["holderIdentity"].as_str().unwrap_or("")),
            age,
        ],
        "RuntimeClass" => vec![name, json!(o["handler"].as_str().unwrap_or("")), age],
        "PersistentVolumeClaim" => {
            let bound = st["phase"] == "Bound";
            let shown = |v: &Value| json!(if bound { v.as_str().unwrap_or("") } else { "" });
            let phase = if meta["deletionTimestamp"].is_null() {
                st["phase"].as_str().unwrap_or("")
            } else {
                "Terminating"
            };
            vec![
                name,
                json!(phase),
                json!(spec["volumeName"].as_str().unwrap_or("")),
                shown(&st["capacity"]["storage"]),
                json!(if bound {
                    access_modes(&st["accessModes"])
                } else {
                    String::new()
                }),
                json!(spec["storageClassName"].as_str().unwrap_or("<unset>")),
                json!(spec["volumeAttributesClassName"]
                    .as_str()
                    .unwrap_or("<unset>")),
                age,
                json!(spec["volumeMode"].as_str().unwrap_or("Filesystem")),
            ]
        }
        "PersistentVolume" => {
            let c = &spec["claimRef"];
            let claim = match (c["namespace"].as_str(), c["name"].as_str()) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => String::new(),
            };
            vec![
                name,
                json!(spec["capacity"]["storage"].as_str().unwrap_or("")),
                json!(access_modes(&spec["accessModes"])),
                json!(spec["persistentVolumeReclaimPolicy"].as_str().unwrap_or("")),
                json!(st["phase"].as_str().unwrap_or("")),
                json!(claim),
                json!(spec["storageClassName"].as_str().unwrap_or("")),
                json!(spec["volumeAttributesClassName"]
                    .as_str()
                    .unwrap_or("<unset>")),
                json!(st["reason"].as_str().unwrap_or("")),
                age,
                json!(spec["volumeMode"].as_str().unwrap_or("Filesystem")),
            ]
        }
        "StorageClass" => {
            let mut n = meta["name"].as_str().unwrap_or("").to_string();
            if super::rest::is_default_class(o) {
                n.push_str(" (default)");
            }
            vec![
                json!(n),
                json!(o["provisioner"].as_str().unwrap_or("")),
                json!(o["reclaimPolicy"].as_str().unwrap_or("Delete")),
                json!(o["volumeBindingMode"].as_str().unwrap_or("Immediate")),
                json!(o["allowVolumeExpansion"]
                    .as_bool()
                    .unwrap_or(false)
                    .to_string()),
                age,
            ]
        }
        "Event" => {
            let last = if !o["lastTimestamp"].is_null() {
                &o["lastTimestamp"]
            } else if !o["eventTime"].is_null() {
                &o["eventTime"]
            } else {
                &meta["creationTimestamp"]
            };
            let io = if o["involvedObject"].is_null() {
                &o["regarding"]
            } else {
                &o["involvedObject"]
            };
            let object = format!(
                "{}/{}",
                io["kind"].as_str().unwrap_or("").to_lowercase(),
                io["name"].as_str().unwrap_or("")
            );
            let first = if !o["firstTimestamp"].is_null() {
                &o["firstTimestamp"]
            } else if !o["eventTime"].is_null() {
                &o["eventTime"]
            } else {
                &meta["creationTimestamp"]
            };
            let text = |v: &Value| v.as_str().unwrap_or("").to_string();
            let or = |a: &Value, b: &Value| {
                let a = text(a);
                if a.is_empty() {
                    text(b)
                } else {
                    a
                }
            };
            // kubectl's "component, host", from the older fields or the newer ones.
            let component = or(&o["source"]["component"], &o["reportingController"]);
            let host = or(&o["source"]["host"], &o["reportingInstance"]);
            let source = if host.is_empty() {
                component
            } else {
                format!("{component}, {host}")
            };
            let count = o["series"]["count"]
                .as_i64()
                .or(o["count"].as_i64())
                .unwrap_or(0);
            vec![
                json!(age_text(last, now)),
                json!(o["type"].as_str().unwrap_or("")),
                json!(o["reason"].as_str().unwrap_or("")),
                json!(object),
                json!(text(&io["fieldPath"])),
                json!(source),
                json!(o["message"]
                    .as_str()
                    .or(o["note"].as_str())
                    .unwrap_or("")
                    .trim()),
                json!(age_text(first, now)),
                json!(count),
                json!(meta["name"].as_str().unwrap_or("")),
            ]
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let subj = |k: &str| {
                let v: Vec<String> = o["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["kind"] == k)
                    .map(|s| {
                        if k == "ServiceAccount" {
                            format!(
                                "{}/{}",
                                s["namespace"].as_str().unwrap_or(""),
                                s["name"].as_str().unwrap_or("")
                            )
                        } else {
                            s["name"].as_str().unwrap_or("").to_string()
                        }
                    })
                    .collect();
                v.join(", ")
            };
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    o["roleRef"]["kind"].as_str().unwrap_or(""),
                    o["roleRef"]["name"].as_str().unwrap_or("")
                )),
                age,
                json!(subj("User")),
                json!(subj("Group")),
                json!(subj("ServiceAccount")),
            ]
        }
        "PodDisruptionBudget" => {
            let s = |v: &Value| match v {
                Value::Null => "N/A".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            vec![
                name,
                json!(s(&spec["minAvailable"])),
                json!(s(&spec["maxUnavailable"])),
                json!(int(&st["disruptionsAllowed"])),
                age,
            ]
        }
        "Ingress" => {
            let rules = spec["rules"].as_array().cloned().unwrap_or_default();
            let hosts: Vec<&str> = rules.iter().filter_map(|r| r["host"].as_str()).collect();
            let hosts = if hosts.is_empty() {
                "*".to_string()
            } else {
                hosts.join(",")
            };
            let lbs = st["loadBalancer"]["ingress"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let address: Vec<&str> = lbs
                .iter()
                .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
                .collect();
            let tls = spec["tls"].as_array().is_some_and(|t| !t.is_empty());
            vec![
                name,
                json!(spec["ingressClassName"].as_str().unwrap_or("<none>")),
                json!(hosts),
                json!(address.join(",")),
                json!(if tls { "80, 443" } else { "80" }),
                age,
            ]
        }
        "IngressClass" => {
            let p = &spec["parameters"];
            let params = match p["kind"].as_str() {
                Some(k) => {
                    let group = p["apiGroup"].as_str().map(|g| format!(".{g}"));
                    format!(
                        "{k}{}/{}",
                        group.unwrap_or_default(),
                        p["name"].as_str().unwrap_or("")
                    )
                }
                None => "<none>".into(),
            };
            vec![
                name,
                json!(spec["controller"].as_str().unwrap_or("")),
                json!(params),
                age,
            ]
        }
        "NetworkPolicy" => {
            let sel = Labels::from_selector(&spec["podSelector"]).to_query();
            let sel = if sel.is_empty() {
                "<none>".to_string()
            } else {
                sel
            };
            vec![name, json!(sel), age]
        }
        "HorizontalPodAutoscaler" => {
            let r = &spec["scaleTargetRef"];
            let reference = format!(
                "{}/{}",
                r["kind"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or("")
            );
            let targets = hpa_targets(spec, st);
            let min = spec["minReplicas"].as_i64().unwrap_or(1);
            vec![
                name,
                json!(reference),
                json!(targets),
                json!(min.to_string()),
                json!(int(&spec["maxReplicas"])),
                json!(int(&st["currentReplicas"])),
                age,
            ]
        }
        "CertificateSigningRequest" => {
            let conds: Vec<&str> = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["type"].as_str())
                .collect();
            let mut condition = if conds.is_empty() {
                "Pending".to_string()
            } else {
                conds.join(",")
            };
            if o["status"]["certificate"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                condition.push_str(",Issued");
            }
            let duration = o["spec"]["expirationSeconds"]
                .as_i64()
                .map_or("<none>".to_string(), human_duration);
            vec![
                name,
                age,
                json!(o["spec"]["signerName"].as_str().unwrap_or("")),
                json!(o["spec"]["username"].as_str().unwrap_or("")),
                json!(duration),
                json!(condition),
            ]
        }
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => vec![
            name,
            json!(o["webhooks"].as_array().map_or(0, Vec::len)),
            age,
        ],
        "PriorityClass" => vec![
            name,
            json!(int(&o["value"])),
            json!(o["globalDefault"].as_bool().unwrap_or(false)),
            age,
            json!(o["preemptionPolicy"]
                .as_str()
                .unwrap_or("PreemptLowerPriority")),
        ],
        _ => vec![name, meta["creationTimestamp"].clone()],
    }
}

/// The Table columns for `kind`.
/// The Name column's description, as Kubernetes gives it.
pub const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";

pub fn column_definitions(kind: &str) -> Value {
    Value::Array(
        columns(kind)
            .iter()
            .map(|(name, ty, format, prio)| {
                let description = if *name == "Name" {
                    NAME_DESCRIPTION
                } else {
                    name
                };
                json!({"name": name, "type": ty, "format": format,
                       "description": description, "priority": prio})
            })
            .collect(),
    )
}

/// How much of each object a row carries (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

/// One Table row for `o`.
pub fn row(kind: &str, o: &Value, include: Include, now: i64) -> Value {
    row_of(cells(kind, o, now), o, include)
}

/// A Table row of `cells` for `o`, carrying as much of `o` as `include` asks.
pub fn row_of(cells: Vec<Value>, o: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells});
    match include {
        Include::None => {}
        Include::Metadata => {
            r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": o["metadata"].clone()});
        }
        Include::Object => r["object"] = o.clone(),
    }
    r
}

/// A Table of `objects`; `headers` false leaves `columnDefinitions` null (watch events after
/// the first).
pub fn table(
    res: &'static Resource,
    objects: &[Value],
    list_meta: Value,
    include: Include,
    headers: bool,
    now: i64,
) -> Value {
    if let Some(c) = super::crd::behind(res) {
        return super::crd::table(&c, objects, list_meta, include, headers, now);
    }
    let kind = res.kind;
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
        "columnDefinitions": if headers { column_definitions(kind) } else { Value::Null },
        "rows": objects.iter().map(|o| row(kind, o, include, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_go() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
            (-5, "<invalid>"),
        ] {
            assert_eq!(human_duration(s), want);
        }
    }

    #[test]
    fn pod_row() {
        let p = json!({"metadata": {"name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"ready": true, "restartCount": 2, "state": {"running": {}}},
                {"ready": false, "restartCount": 1, "state": {"running": {}}}]}});
        let now = seconds(&json!("2026-01-01T00:01:00Z")).unwrap();
        let r = row("Pod", &p, Include::Metadata, now);
        assert_eq!(
            r["cells"],
            json!(["web", "1/2", "Running", "3", "60s", "10.0.0.5", "n1", "<none>", "<none>"])
        );
        assert_eq!(r["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(
            columns("Pod").len(),
            r["cells"].as_array().map_or(0, Vec::len)
        );
    }

    #[test]
    fn pod_status_as_kubectl_prints_it() {
        let pod = |inits: Value, init_statuses: Value, statuses: Value, extra: Value| {
            let mut p = json!({"metadata": {"name": "p"},
                "spec": {"initContainers": inits, "containers": [{"name": "main"}]},
                "status": {"phase": "Pending", "initContainerStatuses": init_statuses,
                    "containerStatuses": statuses}});
            if let (Some(m), Some(e)) = (p["status"].as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
            let (status, ready, total, restarts) = pod_summary(&p);
            format!("{status} {ready}/{total} {restarts}")
        };
        let init = json!([{"name": "init"}]);
        let waiting = |r: &str| json!([{"name": "main", "state": {"waiting": {"reason": r}}}]);
        assert_eq!(
            pod(
                init.clone(),
                json!([{"name": "init", "state": {"running": {}}}]),
                waiting("PodInitializing"),
                json!({})
            ),
            "Init:0/1 0/1 0"
        );
        assert_eq!(
            pod(
                init.clone(),
                json!([{"name": "init", "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]),
                waiting("PodInitializing"),
                json!({})
            ),
            "Init:CrashLoopBackOff 0/1 2"
        );
        assert_eq!(
            pod(
                init.clone(),
                json!([{"name": "init",
                "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]),
                waiting("PodInitializing"),
                json!({"phase": "Failed"})
            ),
            "Init:Error 0/1 0"
        );
        assert_eq!(
            pod(
                init.clone(),
                json!([{"name": "init",
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]),
                waiting("PodInitializing"),
                json!({})
            ),
            "PodInitializing 0/1 0"
        );
        // A sidecar that has started counts as a container, ready or not.
        let side = json!([{"name": "side", "restartPolicy": "Always"}]);
        assert_eq!(
            pod(
                side,
                json!([{"name": "side", "started": true, "ready": true,
                "state": {"running": {}}}]),
                json!([{"name": "main", "ready": true, "state": {"running": {}}}]),
                json!({"phase": "Running",
                    "conditions": [{"type": "Initialized", "status": "True"}]})
            ),
            "Running 2/2 0"
        );
        let mut ended = json!({"metadata": {"name": "p", "deletionTimestamp": "t"},
            "spec": {"containers": [{"name": "main"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [{"name": "main",
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}});
        assert_eq!(
            pod_summary(&ended).0,
            "Completed",
            "an ended pod being deleted"
        );
        ended["status"]["phase"] = json!("Running");
        assert_eq!(pod_summary(&ended).0, "Terminating");
    }

    #[test]
    fn controller_revision_row() {
        let cr = json!({"metadata": {"name": "web-5d4f", "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                "uid": "u", "controller": true}]}, "revision": 2});
        let now = seconds(&json!("2026-01-01T00:01:00Z")).unwrap();
        let r = row("ControllerRevision", &cr, Include::Metadata, now);
        assert_eq!(
            r["cells"],
            json!(["web-5d4f", "statefulset.apps/web", 2, "60s"])
        );
        assert_eq!(columns("ControllerRevision").len(), 4);
    }
}
