//! Admission: defaulting and validation of objects, as the Kubernetes API server does them.
//! Pure functions over JSON values; whatever needs the store (service IPs, namespaces) is
//! done by the caller.

use outpost_api::quantity::Quantity;
use serde_json::{json, Map, Value};

use super::error::Cause;
use super::select::Labels;

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

/// Set `v[key]` to `default` if it is absent or null.
fn or(v: &mut Value, key: &str, default: Value) {
    let m = obj(v);
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), default);
    }
}

/// [`or`], an empty string counting as unset too (an enumerated field's default, as
/// Kubernetes fills `imagePullPolicy: ""` in).
fn or_blank(v: &mut Value, key: &str, default: Value) {
    let m = obj(v);
    if m.get(key).is_none_or(|x| x.is_null() || x == "") {
        m.insert(key.to_string(), default);
    }
}

fn child<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    obj(v).entry(key.to_string()).or_insert(json!({}))
}

/// Quantities come in as numbers from YAML (`cpu: 1`); the API always holds strings.
pub fn normalize_quantities(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if matches!(
                    k.as_str(),
                    "limits" | "requests" | "capacity" | "allocatable" | "hard" | "used"
                ) {
                    if let Value::Object(q) = x {
                        for qv in q.values_mut() {
                            if let Value::Number(n) = qv {
                                *qv = Value::String(n.to_string());
                            }
                        }
                    }
                }
                normalize_quantities(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_quantities),
        _ => {}
    }
}

fn default_container(c: &mut Value) {
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    let last = image.rsplit('/').next().unwrap_or(image);
    let policy = if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            Some((_, "latest")) | None => "Always",
            Some(_) => "IfNotPresent",
        }
    };
    or_blank(c, "imagePullPolicy", json!(policy));
    or(c, "terminationMessagePath", json!("/dev/termination-log"));
    or_blank(c, "terminationMessagePolicy", json!("File"));
    or(c, "resources", json!({}));
    if let Some(Value::Array(ports)) = obj(c).get_mut("ports") {
        for p in ports {
            or_blank(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = obj(c).get_mut(probe) {
            if p.is_object() {
                or(p, "timeoutSeconds", json!(1));
                or(p, "periodSeconds", json!(10));
                or(p, "successThreshold", json!(1));
                or(p, "failureThreshold", json!(3));
            }
        }
    }
}

/// A pod's containers request what they limit unless they say otherwise (pods only, not
/// templates, as in Kubernetes).
fn requests_from_limits(spec: &mut Value) {
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            let Some(limits) = c["resources"]["limits"].as_object().cloned() else {
                continue;
            };
            let requests = child(child(c, "resources"), "requests");
            for (k, v) in limits {
                if requests.get(&k).is_none() {
                    obj(requests).insert(k, v);
                }
            }
        }
    }
}

/// A node offers the extended resources its capacity lists (an administrator advertises
/// one by patching the capacity, as in Kubernetes), and no others; its agent sets the rest
/// of its allocatable itself.
fn allocatable_from_capacity(node: &mut Value) {
    let Some(capacity) = node["status"]["capacity"].as_object().cloned() else {
        return;
    };
    let alloc = child(child(node, "status"), "allocatable");
    obj(alloc).retain(|k, _| !extended_resource(k) || capacity.contains_key(k));
    for (k, v) in capacity {
        if extended_resource(&k) && alloc.get(&k).is_none() {
            obj(alloc).insert(k, v);
        }
    }
}

/// Pod spec defaults (also inside every workload's template).
pub fn default_pod_spec(spec: &mut Value, restart: &str) {
    or_blank(spec, "restartPolicy", json!(restart));
    or_blank(spec, "dnsPolicy", json!("ClusterFirst"));
    or(spec, "terminationGracePeriodSeconds", json!(30));
    or(spec, "schedulerName", json!("default-scheduler"));
    or(spec, "securityContext", json!({}));
    let host_network = spec["hostNetwork"] == true;
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = obj(spec).get_mut(list) {
            cs.iter_mut().for_each(default_container);
            // On the node's network a container's port is the node's: the scheduler keeps
            // two such pods apart.
            for p in cs.iter_mut().filter(|_| host_network).flat_map(|c| {
                c.get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
            }) {
                if p["hostPort"].as_i64().unwrap_or(0) == 0 {
                    p["hostPort"] = p["containerPort"].clone();
                }
            }
        }
    }
    if let Some(Value::Array(vols)) = obj(spec).get_mut("volumes") {
        for v in vols {
            for (src, field) in [("configMap", "defaultMode"), ("secret", "defaultMode")] {
                if let Some(s) = obj(v).get_mut(src) {
                    or(s, field, json!(420));
                }
            }
        }
    }
}

/// Where a pod's containers find their service account's token, CA and namespace.
pub const TOKEN_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The lifetime the ServiceAccount admission asks for; the API server issues tokens asked
/// with it (and bound to a pod) for a year, as kube-apiserver does with
/// `--service-account-extend-token-expiration` (its default).
pub const ADMISSION_TOKEN_TTL: i64 = 3607;

pub use outpost_api::service_account;

/// What the ServiceAccount admission adds to a new pod whose token is automounted: the
/// projected volume `kube-api-access-<suffix>` (token, cluster CA, namespace) mounted
/// read-only at [`TOKEN_MOUNT`] in every container that mounts nothing there already.
pub fn mount_token(spec: &mut Value, suffix: &str) {
    let name = format!("kube-api-access-{suffix}");
    let mut used = false;
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(Value::Array(cs)) = obj(spec).get_mut(list) else {
            continue;
        };
        for c in cs {
            used |= mount_volume(c, &name);
        }
    }
    if !used {
        return;
    }
    let vols = obj(spec).entry("volumes").or_insert(json!([]));
    if let Value::Array(vs) = vols {
        vs.push(json!({"name": name, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": ADMISSION_TOKEN_TTL, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}));
    }
}

/// Mount the token volume `name` read-only at [`TOKEN_MOUNT`] in container `c`, unless it
/// mounts something there already; whether it did.
fn mount_volume(c: &mut Value, name: &str) -> bool {
    let mounts = obj(c).entry("volumeMounts").or_insert(json!([]));
    let Value::Array(ms) = mounts else {
        return false;
    };
    if ms
        .iter()
        .any(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(TOKEN_MOUNT))
    {
        return false;
    }
    ms.push(json!({"name": name, "readOnly": true, "mountPath": TOKEN_MOUNT}));
    true
}

/// What the ServiceAccount admission does for ephemeral containers added to `spec` after the
/// first `had`: each gets the pod's token volume, if the pod has one.
pub fn mount_token_ephemeral(spec: &mut Value, had: usize) {
    let Some(name) = spec["volumes"].as_array().and_then(|vs| {
        vs.iter().find_map(|v| {
            v["name"]
                .as_str()
                .filter(|n| n.starts_with("kube-api-access-"))
                .map(String::from)
        })
    }) else {
        return;
    };
    if let Some(cs) = spec["ephemeralContainers"].as_array_mut() {
        for c in cs.iter_mut().skip(had) {
            mount_volume(c, &name);
        }
    }
}

fn default_template(o: &mut Value, restart: &str) {
    let tpl = child(child(o, "spec"), "template");
    default_pod_spec(child(tpl, "spec"), restart);
}

/// Defaults for `kind` (`uid` is the object's new UID, used by Jobs for their selector).
pub fn defaults(group: &str, kind: &str, o: &mut Value) {
    // A custom object's fields mean what its CRD's schema says, not what ours would.
    if super::crd::by_kind(group, kind).is_some() {
        return;
    }
    normalize_quantities(o);
    match (group, kind) {
        (super::crd::GROUP, "CustomResourceDefinition") => super::crd::defaults(o),
        (super::hooks::GROUP, "MutatingWebhookConfiguration") => {
            super::hooks::default_config(o, true)
        }
        (super::hooks::GROUP, "ValidatingWebhookConfiguration") => {
            super::hooks::default_config(o, false)
        }
        ("", "LimitRange") => super::quota::default_limit_range(o),
        ("", "Node") => allocatable_from_capacity(o),
        ("", "Pod") => {
            let spec = child(o, "spec");
            default_pod_spec(spec, "Always");
            requests_from_limits(spec);
            or(spec, "serviceAccountName", json!("default"));
            or(spec, "enableServiceLinks", json!(true));
            or(spec, "priority", json!(0));
            or(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
            let tolerations = obj(spec)
                .entry("tolerations".to_string())
                .or_insert(json!([]));
            if let Value::Array(ts) = tolerations {
                for key in [
                    "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/unreachable",
                ] {
                    if !ts.iter().any(|t| t["key"] == key) {
                        ts.push(json!({"key": key, "operator": "Exists",
                            "effect": "NoExecute", "tolerationSeconds": 300}));
                    }
                }
            }
        }
        ("apps", "Deployment") => {
            let spec = child(o, "spec");
            or(spec, "replicas", json!(1));
            or(
                spec,
                "strategy",
                json!({"type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            let strategy = child(spec, "strategy");
            or(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = child(strategy, "rollingUpdate");
                or(ru, "maxUnavailable", json!("25%"));
                or(ru, "maxSurge", json!("25%"));
            }
            or(spec, "revisionHistoryLimit", json!(10));
            or(spec, "progressDeadlineSeconds", json!(600));
            default_template(o, "Always");
        }
        ("apps", "ReplicaSet") => {
            or(child(o, "spec"), "replicas", json!(1));
            default_template(o, "Always");
        }
        ("", "ReplicationController") => {
            // Selector and labels come from the template's labels when left out.
            let labels = o["spec"]["template"]["metadata"]["labels"].clone();
            let spec = child(o, "spec");
            or(spec, "replicas", json!(1));
            if labels.is_object() {
                if spec["selector"].as_object().is_none_or(|m| m.is_empty()) {
                    spec["selector"] = labels.clone();
                }
                let meta = child(o, "metadata");
                if meta["labels"].as_object().is_none_or(|m| m.is_empty()) {
                    meta["labels"] = labels;
                }
            }
            if o["spec"]["template"].is_object() {
                default_template(o, "Always");
            }
        }
        ("apps", "DaemonSet") => {
            let spec = child(o, "spec");
            or(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            or(spec, "revisionHistoryLimit", json!(10));
            default_template(o, "Always");
        }
        ("apps", "StatefulSet") => {
            let spec = child(o, "spec");
            or(spec, "replicas", json!(1));
            or(spec, "podManagementPolicy", json!("OrderedReady"));
            or(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            or(spec, "revisionHistoryLimit", json!(10));
            or(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            default_template(o, "Always");
        }
        ("batch", "Job") => {
            let spec = child(o, "spec");
            or(spec, "parallelism", json!(1));
            or(spec, "completions", json!(1));
            // With a limit per index, only that limit counts unless one is given for the Job.
            let whole = if spec["backoffLimitPerIndex"].is_null() {
                6
            } else {
                i32::MAX
            };
            or(spec, "backoffLimit", json!(whole));
            or(spec, "completionMode", json!("NonIndexed"));
            or(spec, "suspend", json!(false));
            or(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
            default_template(o, "Never");
        }
        ("batch", "CronJob") => {
            let spec = child(o, "spec");
            or(spec, "concurrencyPolicy", json!("Allow"));
            or(spec, "suspend", json!(false));
            or(spec, "successfulJobsHistoryLimit", json!(3));
            or(spec, "failedJobsHistoryLimit", json!(1));
            let job = child(child(spec, "jobTemplate"), "spec");
            default_pod_spec(child(child(job, "template"), "spec"), "Never");
        }
        ("", "Service") => {
            let spec = child(o, "spec");
            or(spec, "type", json!("ClusterIP"));
            or(spec, "sessionAffinity", json!("None"));
            if spec["type"] != "ExternalName" {
                or(spec, "ipFamilies", json!(["IPv4"]));
                or(spec, "ipFamilyPolicy", json!("SingleStack"));
                or(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
                or(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if spec["type"] == "LoadBalancer" {
                or(spec, "allocateLoadBalancerNodePorts", json!(true));
            }
            if let Some(Value::Array(ports)) = obj(spec).get_mut("ports") {
                for p in ports {
                    or(p, "protocol", json!("TCP"));
                    let port = p.get("port").cloned().unwrap_or(Value::Null);
                    or(p, "targetPort", port);
                }
            }
        }
        ("", "Namespace") => {
            let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
            let labels = child(child(o, "metadata"), "labels");
            obj(labels).insert("kubernetes.io/metadata.name".into(), json!(name));
            or(child(o, "spec"), "finalizers", json!(["kubernetes"]));
            or(child(o, "status"), "phase", json!("Active"));
        }
        ("", "Secret") => {
            or(o, "type", json!("Opaque"));
            // `stringData` is write-only: its entries go into `data`, base64-encoded, over
            // any of the same key, as kube-apiserver's conversion does. One that is not all
            // strings stays for validation to refuse.
            let strings = o["stringData"]
                .as_object()
                .filter(|m| m.values().all(Value::is_string))
                .cloned();
            if let Some(strings) = strings {
                obj(o).remove("stringData");
                let data = obj(child(o, "data"));
                for (k, v) in strings {
                    let text = v.as_str().unwrap_or_default();
                    let encoded =
                        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
                    data.insert(k, json!(encoded));
                }
            }
        }
        ("", "PersistentVolumeClaim") => or(child(o, "spec"), "volumeMode", json!("Filesystem")),
        ("", "PersistentVolume") => {
            let spec = child(o, "spec");
            or(spec, "volumeMode", json!("Filesystem"));
            or(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
        }
        ("storage.k8s.io", "StorageClass") => {
            or(o, "reclaimPolicy", json!("Delete"));
            or(o, "volumeBindingMode", json!("Immediate"));
        }
        _ => {}
    }
}

const ACCESS_MODES: [&str; 4] = [
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOnce",
    "ReadWriteOncePod",
];

/// A claim's or volume's access modes: at least one, each known.
fn check_access_modes(modes: &Value, at: &str, out: &mut Vec<Cause>) {
    let modes = modes.as_array().map(Vec::as_slice).unwrap_or_default();
    if modes.is_empty() {
        out.push(Cause::required(at));
    }
    for m in modes {
        let m = m.as_str().unwrap_or("");
        if !ACCESS_MODES.contains(&m) {
            out.push(Cause::new(
                "FieldValueNotSupported",
                at,
                format!("Unsupported value: \"{m}\": supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\""),
            ));
        }
    }
}

/// A storage quantity at `at` that must be there and be a positive size.
fn check_storage(q: &Value, at: &str, out: &mut Vec<Cause>) {
    match q.as_str() {
        None => out.push(Cause::required(at)),
        Some(s) => {
            if outpost_api::quantity::bytes(s).is_none_or(|b| b == 0) {
                out.push(Cause::invalid(at, s, "must be greater than zero"));
            }
        }
    }
}

/// A Job's selector and template labels tie its pods to it through its UID.
pub fn job_selector(o: &mut Value, uid: &str) {
    let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
    let spec = child(o, "spec");
    if spec.get("selector").is_none_or(Value::is_null) {
        obj(spec).insert(
            "selector".into(),
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        );
    }
    let labels = child(child(child(spec, "template"), "metadata"), "labels");
    let m = obj(labels);
    m.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
    m.insert("controller-uid".into(), json!(uid));
    m.insert("batch.kubernetes.io/job-name".into(), json!(name));
    m.insert("job-name".into(), json!(name));
}

pub(crate) fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(crate) fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

const LABEL_HINT: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_HINT: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// Names that must be DNS labels rather than subdomains.
fn label_named(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Service")
}

/// Is `name` acceptable for `kind`? (For `generateName` prefixes as well.)
pub fn check_name(kind: &str, name: &str) -> Option<Cause> {
    let ok = if label_named(kind) {
        dns_label(name)
    } else if matches!(
        kind,
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding"
    ) {
        !name.is_empty() && !name.contains('/') && name != "." && name != ".."
    } else {
        dns_subdomain(name)
    };
    (!ok).then(|| {
        let hint = if label_named(kind) {
            LABEL_HINT
        } else {
            SUBDOMAIN_HINT
        };
        Cause::invalid("metadata.name", name, hint)
    })
}

fn label_key_ok(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(dns_subdomain)
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

fn check_labels(labels: &Value, field: &str, out: &mut Vec<Cause>) {
    if let Some(m) = labels.as_object() {
        for (k, v) in m {
            if !label_key_ok(k) {
                out.push(Cause::invalid(field, k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            match v.as_str() {
                Some(s) if label_value_ok(s) => {}
                _ => out.push(Cause::invalid(
                    field,
                    &v.to_string(),
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
            }
        }
    }
}

/// Annotations' total size, keys and values, may not pass 256 KiB (which is why a big
/// CRD cannot be applied client-side: its last-applied annotation would be too long).
fn check_annotations(annotations: &Value, field: &str, out: &mut Vec<Cause>) {
    const MAX: usize = 256 * 1024;
    let size: usize = annotations
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size > MAX {
        out.push(Cause::new(
            "FieldValueTooLong",
            field,
            format!("Too long: may not be more than {MAX} bytes"),
        ));
    }
}

/// A CertificateSigningRequest as kube-apiserver checks one: a PEM certificate request, a
/// signer, known usages, and not both approved and denied.
fn check_csr(o: &Value, out: &mut Vec<Cause>) {
    use base64::Engine;
    let spec = &o["spec"];
    match spec["request"].as_str() {
        None | Some("") => out.push(Cause::required("spec.request")),
        Some(b) => {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(b)
                .ok()
                .and_then(|p| String::from_utf8(p).ok());
            let parsed = pem
                .as_deref()
                .is_some_and(|p| rcgen::CertificateSigningRequestParams::from_pem(p).is_ok());
            if !parsed {
                out.push(Cause::invalid(
                    "spec.request",
                    "",
                    "PEM block type must be CERTIFICATE REQUEST",
                ));
            }
        }
    }
    match spec["signerName"].as_str() {
        None | Some("") => out.push(Cause::required("spec.signerName")),
        Some(n)
            if n.split('/').count() != 2 || !dns_subdomain(n.split('/').next().unwrap_or("")) =>
        {
            out.push(Cause::invalid(
                "spec.signerName",
                n,
                "must be a fully qualified domain and path of the form 'example.com/signer-name'",
            ))
        }
        Some(_) => {}
    }
    const USAGES: [&str; 22] = [
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
    ];
    match spec["usages"].as_array() {
        None => out.push(Cause::required("spec.usages")),
        Some(list) => {
            for (i, u) in list.iter().enumerate() {
                if !u.as_str().is_some_and(|u| USAGES.contains(&u)) {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        format!("spec.usages[{i}]"),
                        format!("Unsupported value: {u}"),
                    ));
                }
            }
        }
    }
    let conds = o["status"]["conditions"].as_array();
    let has = |t: &str| conds.is_some_and(|c| c.iter().any(|c| c["type"] == t));
    if has("Approved") && has("Denied") {
        out.push(Cause::invalid(
            "status.conditions",
            "",
            "Approved and Denied conditions are mutually exclusive",
        ));
    }
}

/// `o.field`, when set, is one of `allowed` (kube-apiserver's `Unsupported value` otherwise).
fn one_of(o: &Value, field: &str, allowed: &[&str], at: &str, out: &mut Vec<Cause>) {
    let Some(v) = o.get(field).filter(|v| !v.is_null() && *v != "") else {
        return;
    };
    if v.as_str().is_some_and(|s| allowed.contains(&s)) {
        return;
    }
    let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    out.push(Cause::new(
        "FieldValueNotSupported",
        format!("{at}.{field}"),
        format!(
            "Unsupported value: {v}: supported values: {}",
            list.join(", ")
        ),
    ));
}

fn check_pod_spec(spec: &Value, at: &str, out: &mut Vec<Cause>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => out.push(Cause::required(format!("{at}.containers"))),
        Some(cs) if cs.is_empty() => out.push(Cause::required(format!("{at}.containers"))),
        Some(cs) => {
            let mut seen = Vec::new();
            for (i, c) in cs.iter().enumerate() {
                let f = format!("{at}.containers[{i}]");
                match c.get("name").and_then(Value::as_str) {
                    None | Some("") => out.push(Cause::required(format!("{f}.name"))),
                    Some(n) if !dns_label(n) => {
                        out.push(Cause::invalid(format!("{f}.name"), n, LABEL_HINT))
                    }
                    Some(n) if seen.contains(&n) => out.push(Cause::new(
                        "FieldValueDuplicate",
                        format!("{f}.name"),
                        format!("Duplicate value: \"{n}\""),
                    )),
                    Some(n) => seen.push(n),
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    out.push(Cause::required(format!("{f}.image")));
                }
                one_of(
                    c,
                    "imagePullPolicy",
                    &["Always", "IfNotPresent", "Never"],
                    &f,
                    out,
                );
                one_of(
                    c,
                    "terminationMessagePolicy",
                    &["File", "FallbackToLogsOnError"],
                    &f,
                    out,
                );
                check_resources(&c["resources"], &format!("{f}.resources"), out);
                for (j, e) in c["env"].as_array().into_iter().flatten().enumerate() {
                    if e["name"].as_str().unwrap_or("").is_empty() {
                        out.push(Cause::required(format!("{f}.env[{j}].name")));
                    }
                }
                if let Some(ports) = c.get("ports").and_then(Value::as_array) {
                    for (j, p) in ports.iter().enumerate() {
                        one_of(
                            p,
                            "protocol",
                            &["SCTP", "TCP", "UDP"],
                            &format!("{f}.ports[{j}]"),
                            out,
                        );
                        let n = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                        if !(1..=65535).contains(&n) {
                            out.push(Cause::invalid(
                                format!("{f}.ports[{j}].containerPort"),
                                &n.to_string(),
                                "must be between 1 and 65535, inclusive",
                            ));
                        }
                    }
                }
            }
        }
    }
    for (i, c) in spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        check_resources(
            &c["resources"],
            &format!("{at}.initContainers[{i}].resources"),
            out,
        );
    }
    one_of(
        spec,
        "dnsPolicy",
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
        at,
        out,
    );
    if let Some(p) = spec.get("restartPolicy").and_then(Value::as_str) {
        if !matches!(p, "Always" | "OnFailure" | "Never") {
            out.push(Cause::new(
                "FieldValueNotSupported",
                format!("{at}.restartPolicy"),
                format!("Unsupported value: \"{p}\": supported values: \"Always\", \"OnFailure\", \"Never\""),
            ));
        }
    }
}

/// A container's requests and limits, as kube-apiserver checks them: resource names a
/// container may ask for, no negative amounts, requests within limits, and extended
/// resources (`example.com/dongle`) in whole numbers that cannot be overcommitted.
fn check_resources(r: &Value, at: &str, out: &mut Vec<Cause>) {
    let amounts = |field: &str| -> Vec<(&str, &str, Quantity)> {
        r[field]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?, Quantity::parse(v.as_str()?)?)))
            .collect()
    };
    let (requests, limits) = (amounts("requests"), amounts("limits"));
    for (field, list) in [("limits", &limits), ("requests", &requests)] {
        for (name, text, q) in list {
            let path = format!("{at}.{field}[{name}]");
            let extended = extended_resource(name);
            let standard = matches!(*name, "cpu" | "memory" | "ephemeral-storage")
                || name.starts_with("hugepages-");
            if !standard && !extended {
                let why = if name.contains('/') || STANDARD_RESOURCES.contains(name) {
                    "must be a standard resource for containers"
                } else {
                    "must be a standard resource type or fully qualified"
                };
                out.push(Cause::invalid(&path, name, why));
            } else if q.is_negative() {
                out.push(Cause::invalid(
                    &path,
                    text,
                    "must be greater than or equal to 0",
                ));
            } else if extended && !q.is_integer() {
                out.push(Cause::invalid(&path, text, "must be an integer"));
            }
        }
    }
    for (name, text, q) in &requests {
        let extended = extended_resource(name);
        let path = format!("{at}.requests[{name}]");
        match limits.iter().find(|(n, ..)| n == name) {
            Some((_, lim, l)) if extended && q.milli() != l.milli() => out.push(Cause::invalid(
                &path,
                text,
                &format!("must be equal to {name} limit of {lim}"),
            )),
            Some((_, lim, l)) if q.milli() > l.milli() => out.push(Cause::invalid(
                &path,
                text,
                &format!("must be less than or equal to {name} limit of {lim}"),
            )),
            None if extended => out.push(Cause::required_msg(
                format!("{at}.limits"),
                "Limit must be set for non overcommitable resources",
            )),
            _ => {}
        }
    }
}

/// A resource outside Kubernetes' own names (`example.com/dongle`): whole units, never
/// overcommitted, offered by what a node's capacity lists.
fn extended_resource(name: &str) -> bool {
    name.contains('/') && !name.contains("kubernetes.io/")
}

/// Resource names Kubernetes knows that are not a container's to ask for.
const STANDARD_RESOURCES: &[&str] = &[
    "pods",
    "services",
    "storage",
    "persistentvolumeclaims",
    "configmaps",
    "secrets",
    "replicationcontrollers",
    "resourcequotas",
];

/// The first quantity in `o` that does not parse, with where it is: kube-apiserver cannot
/// decode such an object at all (a 400, not a 422). Looks where built-in kinds hold
/// quantities: requests and limits, capacity and allocatable, quota amounts, LimitRange
/// bounds, pod overhead and emptyDir sizes.
pub fn bad_quantity(o: &Value) -> Option<(String, String)> {
    fn walk(v: &Value, at: &mut String) -> Option<(String, String)> {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let len = at.len();
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(k);
                    let holds = matches!(
                        k.as_str(),
                        "limits"
                            | "requests"
                            | "capacity"
                            | "allocatable"
                            | "hard"
                            | "used"
                            | "overhead"
                            | "max"
                            | "min"
                            | "default"
                            | "defaultRequest"
                    );
                    let found = match x {
                        Value::Object(q) if holds => q.iter().find_map(|(name, qv)| {
                            let text = qv.as_str()?;
                            Quantity::parse(text)
                                .is_none()
                                .then(|| (format!("{at}[{name}]"), text.to_string()))
                        }),
                        Value::String(text)
                            if k == "sizeLimit" && Quantity::parse(text).is_none() =>
                        {
                            Some((at.clone(), text.clone()))
                        }
                        _ => None,
                    };
                    let found = found.or_else(|| walk(x, at));
                    at.truncate(len);
                    if found.is_some() {
                        return found;
                    }
                }
                None
            }
            Value::Array(items) => items.iter().enumerate().find_map(|(i, x)| {
                let len = at.len();
                at.push_str(&format!("[{i}]"));
                let found = walk(x, at);
                at.truncate(len);
                found
            }),
            _ => None,
        }
    }
    walk(o, &mut String::new())
}

/// Each container's volume mounts name one of the pod's volumes, as the API server checks
/// for pods (a StatefulSet's template may also name its claim templates, so templates are not
/// checked here; the pods made from them are).
fn check_mounts(spec: &Value, out: &mut Vec<Cause>) {
    let vols: Vec<&str> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            for (j, m) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = m["name"].as_str().unwrap_or("");
                if !vols.contains(&name) {
                    out.push(Cause::new(
                        "FieldValueNotFound",
                        format!("spec.{list}[{i}].volumeMounts[{j}].name"),
                        format!("Not found: \"{name}\""),
                    ));
                }
            }
        }
    }
}

/// A ReplicationController's spec: a label-map selector its template's labels match, and a
/// template whose pods restart always.
fn check_controller_spec(spec: &Value, out: &mut Vec<Cause>) {
    let sel = &spec["selector"];
    if sel.as_object().is_none_or(|m| m.is_empty()) {
        out.push(Cause::required("spec.selector"));
    }
    check_labels(sel, "spec.selector", out);
    if let Some(r) = spec["replicas"].as_i64().filter(|r| *r < 0) {
        out.push(Cause::invalid(
            "spec.replicas",
            &r.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let tpl = &spec["template"];
    if !tpl.is_object() {
        out.push(Cause::required("spec.template"));
        return;
    }
    let labels = &tpl["metadata"]["labels"];
    let matched = sel
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels[k.as_str()] == *v);
    if !matched {
        out.push(Cause::invalid(
            "spec.template.metadata.labels",
            &labels.to_string(),
            "`selector` does not match template `labels`",
        ));
    }
    check_labels(labels, "spec.template.metadata.labels", out);
    check_pod_spec(&tpl["spec"], "spec.template.spec", out);
    if let Some(p) = tpl["spec"]["restartPolicy"]
        .as_str()
        .filter(|p| *p != "Always")
    {
        out.push(Cause::new(
            "FieldValueNotSupported",
            "spec.template.spec.restartPolicy",
            format!("Unsupported value: \"{p}\": supported values: \"Always\""),
        ));
    }
}

fn check_selector_template(o: &Value, out: &mut Vec<Cause>) {
    let spec = &o["spec"];
    match spec.get("selector") {
        None | Some(Value::Null) => out.push(Cause::required("spec.selector")),
        Some(sel) => {
            let labels = &spec["template"]["metadata"]["labels"];
            let selector = Labels::from_selector(sel);
            if selector.is_empty() {
                out.push(Cause::invalid(
                    "spec.selector",
                    "{}",
                    "empty selector is invalid for deployment",
                ));
            } else if !selector.matches(labels) {
                out.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    &labels.to_string(),
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
    if let Some(r) = spec.get("replicas").and_then(Value::as_i64) {
        if r < 0 {
            out.push(Cause::invalid(
                "spec.replicas",
                &r.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
}

/// A Job's spec (`at` is its path: `spec`, or a CronJob's `spec.jobTemplate.spec`): its pod
/// template, a restartPolicy a Job may have, `podFailurePolicy` and `backoffLimitPerIndex`.
fn check_job_spec(spec: &Value, at: &str, out: &mut Vec<Cause>) {
    let pod = &spec["template"]["spec"];
    check_pod_spec(pod, &format!("{at}.template.spec"), out);
    if pod["restartPolicy"] == "Always" {
        out.push(Cause::new(
            "FieldValueNotSupported",
            format!("{at}.template.spec.restartPolicy"),
            "Unsupported value: \"Always\": supported values: \"OnFailure\", \"Never\"",
        ));
    }
    check_failure_policy(spec, at, out);
}

fn check_failure_policy(spec: &Value, at: &str, out: &mut Vec<Cause>) {
    let restart = spec["template"]["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Never");
    let indexed = spec["completionMode"] == "Indexed";
    if !spec["maxFailedIndexes"].is_null() && spec["backoffLimitPerIndex"].is_null() {
        out.push(Cause::required(format!("{at}.backoffLimitPerIndex")));
    }
    if !spec["backoffLimitPerIndex"].is_null() && !indexed {
        out.push(Cause::invalid(
            format!("{at}.backoffLimitPerIndex"),
            &spec["backoffLimitPerIndex"].to_string(),
            "requires indexed completion mode",
        ));
    }
    let Some(rules) = spec["podFailurePolicy"]["rules"].as_array() else {
        return;
    };
    if restart != "Never" {
        out.push(Cause::invalid(
            format!("{at}.template.spec.restartPolicy"),
            restart,
            "only \"Never\" is supported when podFailurePolicy is specified",
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let at = format!("{at}.podFailurePolicy.rules[{i}]");
        match r["action"].as_str() {
            Some("FailJob" | "Ignore" | "Count") => {}
            Some("FailIndex") if !spec["backoffLimitPerIndex"].is_null() => {}
            Some("FailIndex") => out.push(Cause::invalid(
                format!("{at}.action"),
                "FailIndex",
                "requires the backoffLimitPerIndex to be set",
            )),
            other => out.push(Cause::new(
                "FieldValueNotSupported",
                format!("{at}.action"),
                format!("Unsupported value: {:?}: supported values: \"Count\", \"FailIndex\", \"FailJob\", \"Ignore\"", other.unwrap_or("")),
            )),
        }
        let codes = &r["onExitCodes"];
        let conditions = &r["onPodConditions"];
        if codes.is_null() == conditions.is_null() {
            out.push(Cause::invalid(
                at.clone(),
                "",
                "specifying one of onExitCodes and onPodConditions is required",
            ));
        }
        if codes.is_object() {
            if !matches!(codes["operator"].as_str(), Some("In" | "NotIn")) {
                out.push(Cause::new(
                    "FieldValueNotSupported",
                    format!("{at}.onExitCodes.operator"),
                    "Unsupported value: supported values: \"In\", \"NotIn\"",
                ));
            }
            let values = codes["values"].as_array().cloned().unwrap_or_default();
            if values.is_empty() || values.iter().any(|v| !v.is_i64()) {
                out.push(Cause::required(format!("{at}.onExitCodes.values")));
            }
            if codes["operator"] == "In" && values.iter().any(|v| v == 0) {
                out.push(Cause::invalid(
                    format!("{at}.onExitCodes.values"),
                    "0",
                    "must not be 0 for the In operator",
                ));
            }
        }
    }
}

/// A PodDisruptionBudget's spec: one of minAvailable and maxUnavailable, each a
/// non-negative integer or a percentage of at most 100%.
fn check_budget(spec: &Value, out: &mut Vec<Cause>) {
    let (min, max) = (&spec["minAvailable"], &spec["maxUnavailable"]);
    if !min.is_null() && !max.is_null() {
        out.push(Cause::new(
            "FieldValueInvalid",
            "spec",
            "Invalid value: minAvailable and maxUnavailable cannot be both set",
        ));
    }
    for (field, v) in [("minAvailable", min), ("maxUnavailable", max)] {
        let path = format!("spec.{field}");
        match v {
            Value::Null => {}
            Value::Number(n) if n.as_i64().is_some_and(|n| n >= 0) => {}
            Value::Number(n) => out.push(Cause::invalid(
                path,
                &n.to_string(),
                "must be greater than or equal to 0",
            )),
            Value::String(s) => match s.strip_suffix('%').map(str::parse::<i64>) {
                Some(Ok(p)) if (0..=100).contains(&p) => {}
                Some(Ok(_)) => out.push(Cause::invalid(path, s, "must be no greater than 100%")),
                _ => out.push(Cause::invalid(
                    path,
                    s,
                    "a valid percent string must be a numeric string followed by an ending '%'",
                )),
            },
            other => out.push(Cause::invalid(
                path,
                &other.to_string(),
                "must be an integer or a percentage",
            )),
        }
    }
    if let Some(p) = spec["unhealthyPodEvictionPolicy"].as_str() {
        if !matches!(p, "IfHealthyBudget" | "AlwaysAllow") {
            out.push(Cause::new(
                "FieldValueNotSupported",
                "spec.unhealthyPodEvictionPolicy",
                format!("Unsupported value: \"{p}\": supported values: \"AlwaysAllow\", \"IfHealthyBudget\""),
            ));
        }
    }
}

/// The volume types a PersistentVolume may name (one of them).
const VOLUME_SOURCES: [&str; 12] = [
    "hostPath",
    "local",
    "nfs",
    "iscsi",
    "csi",
    "fc",
    "cephfs",
    "rbd",
    "cinder",
    "glusterfs",
    "awsElasticBlockStore",
    "gcePersistentDisk",
];

/// Field-level problems with `o`, a `kind` object whose defaults are already set.
/// What an update may not change, refused as kube-apiserver's update validation refuses it:
/// a workload's selector, a Job's template, a Service's cluster IP, an immutable ConfigMap's
/// or Secret's data.
pub fn validate_update(group: &str, kind: &str, old: &Value, new: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let mut fixed = |path: &[&str]| {
        let at = |v: &Value| path.iter().fold(v.clone(), |v, k| v[*k].clone());
        let (was, now) = (at(old), at(new));
        if was != now {
            out.push(Cause::invalid(
                path.join("."),
                &now.to_string(),
                "field is immutable",
            ));
        }
    };
    match (group, kind) {
        ("apps", "StatefulSet") => {
            // As kube-apiserver: only these may change; the rest (service name, claim
            // templates, pod management policy, selector) is fixed once made.
            const MAY: [&str; 7] = [
                "replicas",
                "template",
                "updateStrategy",
                "minReadySeconds",
                "ordinals",
                "revisionHistoryLimit",
                "persistentVolumeClaimRetentionPolicy",
            ];
            let rest = |v: &Value| {
                let mut v = v.clone();
                defaults("apps", "StatefulSet", &mut v);
                let mut spec = v["spec"].take();
                if let Some(m) = spec.as_object_mut() {
                    m.retain(|k, _| !MAY.contains(&k.as_str()));
                }
                spec
            };
            if rest(old) != rest(new) {
                out.push(Cause::new(
                    "FieldValueForbidden",
                    "spec",
                    "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                ));
            }
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet") => {
            fixed(&["spec", "selector"]);
        }
        ("batch", "Job") => {
            fixed(&["spec", "selector"]);
            fixed(&["spec", "completionMode"]);
            // Against the old template as today's defaults make it: a Job stored by an older
            // build may lack one, and every later update (a finalizer lifted) would fail.
            let mut was = old.clone();
            defaults("batch", "Job", &mut was);
            if was["spec"]["template"] != new["spec"]["template"] {
                out.push(Cause::invalid(
                    "spec.template",
                    &new["spec"]["template"].to_string(),
                    "field is immutable",
                ));
            }
        }
        ("", "Service") => {
            let ip = |v: &Value| v["spec"]["clusterIP"].as_str().unwrap_or("").to_string();
            let external = |v: &Value| v["spec"]["type"] == "ExternalName";
            let (was, now) = (ip(old), ip(new));
            if !was.is_empty() && !now.is_empty() && was != now && !external(old) && !external(new)
            {
                out.push(Cause::invalid(
                    "spec.clusterIPs[0]",
                    &now,
                    "may not change once set",
                ));
            }
        }
        ("", "Secret") if old["type"] != new["type"] => {
            fixed(&["type"]);
        }
        ("", "ConfigMap" | "Secret") if old["immutable"] == true => {
            let forbidden = |f: &str| {
                Cause::new(
                    "FieldValueForbidden",
                    f,
                    "Forbidden: field is immutable when `immutable` is set",
                )
            };
            for f in ["data", "binaryData"] {
                let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|m| m.is_empty());
                if old[f] != new[f] && !(empty(&old[f]) && empty(&new[f])) {
                    out.push(forbidden(f));
                }
            }
            if new["immutable"] != true {
                out.push(forbidden("immutable"));
            }
        }
        _ => {}
    }
    out
}

pub fn validate(group: &str, kind: &str, o: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let meta = &o["metadata"];
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => out.push(Cause::new(
            "FieldValueRequired",
            "metadata.name",
            "name or generateName is required",
        )),
        Some(n) => out.extend(check_name(kind, n)),
    }
    check_labels(&meta["labels"], "metadata.labels", &mut out);
    check_annotations(&meta["annotations"], "metadata.annotations", &mut out);
    match (group, kind) {
        (super::crd::GROUP, "CustomResourceDefinition") => out.extend(super::crd::validate(o)),
        ("certificates.k8s.io", "CertificateSigningRequest") => check_csr(o, &mut out),
        (super::hooks::GROUP, "MutatingWebhookConfiguration") => {
            out.extend(super::hooks::check_config(o, true))
        }
        (super::hooks::GROUP, "ValidatingWebhookConfiguration") => {
            out.extend(super::hooks::check_config(o, false))
        }
        ("", "Pod") => {
            check_pod_spec(&o["spec"], "spec", &mut out);
            check_mounts(&o["spec"], &mut out);
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            check_selector_template(o, &mut out);
            check_labels(
                &o["spec"]["template"]["metadata"]["labels"],
                "spec.template.metadata.labels",
                &mut out,
            );
            check_pod_spec(
                &o["spec"]["template"]["spec"],
                "spec.template.spec",
                &mut out,
            );
        }
        ("", "ReplicationController") => check_controller_spec(&o["spec"], &mut out),
        ("batch", "Job") => check_job_spec(&o["spec"], "spec", &mut out),
        ("policy", "PodDisruptionBudget") => check_budget(&o["spec"], &mut out),
        ("batch", "CronJob") => {
            let spec = &o["spec"];
            match spec["schedule"].as_str() {
                None | Some("") => out.push(Cause::required("spec.schedule")),
                Some(s) => {
                    if let Err(e) = crate::controllers::cron::parse(s) {
                        out.push(Cause::invalid("spec.schedule", s, &e));
                    }
                }
            }
            if let Some(tz) = spec["timeZone"].as_str() {
                if let Err(e) = crate::controllers::cron::zone(Some(tz)) {
                    out.push(Cause::invalid("spec.timeZone", tz, &e));
                }
            }
            if meta["name"].as_str().is_some_and(|n| n.len() > 52) {
                out.push(Cause::invalid(
                    "metadata.name",
                    meta["name"].as_str().unwrap_or(""),
                    "must be no more than 52 characters",
                ));
            }
            check_job_spec(
                &spec["jobTemplate"]["spec"],
                "spec.jobTemplate.spec",
                &mut out,
            );
        }
        ("", "Service") => {
            let spec = &o["spec"];
            let ports = spec["ports"].as_array().cloned().unwrap_or_default();
            let headless = spec["clusterIP"] == "None";
            if ports.is_empty() && spec["type"] != "ExternalName" && !headless {
                out.push(Cause::required("spec.ports"));
            }
            for (i, p) in ports.iter().enumerate() {
                let n = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                if !(1..=65535).contains(&n) {
                    out.push(Cause::invalid(
                        format!("spec.ports[{i}].port"),
                        &n.to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                if ports.len() > 1 && p.get("name").and_then(Value::as_str).is_none() {
                    out.push(Cause::required(format!("spec.ports[{i}].name")));
                }
            }
            if let Some(t) = spec["type"].as_str() {
                if !matches!(
                    t,
                    "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
                ) {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        "spec.type",
                        format!("Unsupported value: \"{t}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
                    ));
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            check_access_modes(&o["spec"]["accessModes"], "spec.accessModes", &mut out);
            check_storage(
                &o["spec"]["resources"]["requests"]["storage"],
                "spec.resources[storage]",
                &mut out,
            );
        }
        ("", "PersistentVolume") => {
            let spec = &o["spec"];
            check_access_modes(&spec["accessModes"], "spec.accessModes", &mut out);
            check_storage(&spec["capacity"]["storage"], "spec.capacity", &mut out);
            let sources = VOLUME_SOURCES
                .iter()
                .filter(|k| spec[**k].is_object())
                .count();
            if sources == 0 {
                out.push(Cause::new(
                    "FieldValueRequired",
                    "spec",
                    "Required value: must specify a volume type",
                ));
            } else if sources > 1 {
                out.push(Cause::new(
                    "FieldValueForbidden",
                    "spec",
                    "may not specify more than 1 volume type",
                ));
            }
            if spec["local"].is_object() && spec["nodeAffinity"].is_null() {
                out.push(Cause::new(
                    "FieldValueRequired",
                    "spec.nodeAffinity",
                    "Required value: Local volumes require node affinity",
                ));
            }
            for k in ["hostPath", "local"] {
                if let Some(p) = spec[k]["path"].as_str() {
                    if !p.starts_with('/') || p.split('/').any(|s| s == "..") {
                        out.push(Cause::invalid(
                            format!("spec.{k}.path"),
                            p,
                            "must be an absolute path without '..'",
                        ));
                    }
                }
            }
            if let Some(p) = spec["persistentVolumeReclaimPolicy"].as_str() {
                if !matches!(p, "Retain" | "Delete" | "Recycle") {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        "spec.persistentVolumeReclaimPolicy",
                        format!("Unsupported value: \"{p}\": supported values: \"Delete\", \"Recycle\", \"Retain\""),
                    ));
                }
            }
        }
        ("storage.k8s.io", "StorageClass") => {
            if o["provisioner"].as_str().is_none_or(str::is_empty) {
                out.push(Cause::required("provisioner"));
            }
            if let Some(m) = o["volumeBindingMode"].as_str() {
                if !matches!(m, "Immediate" | "WaitForFirstConsumer") {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        "volumeBindingMode",
                        format!("Unsupported value: \"{m}\": supported values: \"Immediate\", \"WaitForFirstConsumer\""),
                    ));
                }
            }
            if let Some(p) = o["reclaimPolicy"].as_str() {
                if !matches!(p, "Retain" | "Delete") {
                    out.push(Cause::new(
                        "FieldValueNotSupported",
                        "reclaimPolicy",
                        format!(
                            "Unsupported value: \"{p}\": supported values: \"Delete\", \"Retain\""
                        ),
                    ));
                }
            }
        }
        ("", "ConfigMap" | "Secret") => {
            check_config_size(kind, o, &mut out);
            if kind == "Secret" {
                check_secret_type(o, &mut out);
            }
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = o[field].as_object() {
                    for k in m.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                        if !ok {
                            out.push(Cause::invalid(
                                format!("{field}[{k}]"),
                                k,
                                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// The most a ConfigMap's or Secret's data may hold, as in Kubernetes.
const MAX_CONFIG_BYTES: usize = 1 << 20;

fn check_config_size(kind: &str, o: &Value, out: &mut Vec<Cause>) {
    // A Secret's and binaryData's values are base64: their bytes are three quarters of it.
    let decoded = |v: &Value| {
        v.as_str()
            .map_or(0, |t| t.trim_end_matches('=').len() * 3 / 4)
    };
    let mut total = 0;
    for field in ["data", "binaryData", "stringData"] {
        for (k, v) in o[field].as_object().into_iter().flatten() {
            let plain = kind == "ConfigMap" && field == "data" || field == "stringData";
            total += k.len() * usize::from(kind == "ConfigMap")
                + if plain {
                    v.as_str().map_or(0, str::len)
                } else {
                    decoded(v)
                };
        }
    }
    if total > MAX_CONFIG_BYTES {
        let at = if kind == "Secret" { "data" } else { "" };
        out.push(Cause::new(
            "FieldValueTooLong",
            at,
            format!("Too long: must have at most {MAX_CONFIG_BYTES} bytes"),
        ));
    }
}

/// The keys a Secret's type requires, as kube-apiserver's validation requires them.
fn check_secret_type(o: &Value, out: &mut Vec<Cause>) {
    let data = &o["data"];
    let has = |k: &str| data[k].as_str().is_some_and(|v| !v.is_empty());
    let need = |k: &str, out: &mut Vec<Cause>| {
        if !has(k) {
            out.push(Cause::required(format!("data[{k}]")));
        }
    };
    let json_at = |k: &str, out: &mut Vec<Cause>| {
        use base64::Engine;
        let text = data[k].as_str().unwrap_or("");
        let ok = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()
            .is_some_and(|b| serde_json::from_slice::<Value>(&b).is_ok());
        if has(k) && !ok {
            out.push(Cause::invalid(
                format!("data[{k}]"),
                "<secret contents redacted>",
                "must be valid JSON",
            ));
        }
    };
    match o["type"].as_str().unwrap_or("Opaque") {
        "kubernetes.io/service-account-token"
            if o["metadata"]["annotations"]["kubernetes.io/service-account.name"]
                .as_str()
                .unwrap_or("")
                .is_empty() =>
        {
            out.push(Cause::required(
                "metadata.annotations[kubernetes.io/service-account.name]",
            ));
        }
        "kubernetes.io/dockercfg" => {
            need(".dockercfg", out);
            json_at(".dockercfg", out);
        }
        "kubernetes.io/dockerconfigjson" => {
            need(".dockerconfigjson", out);
            json_at(".dockerconfigjson", out);
        }
        "kubernetes.io/basic-auth" if !has("username") && !has("password") => {
            need("username", out);
            need("password", out);
        }
        "kubernetes.io/ssh-auth" => need("ssh-privatekey", out),
        "kubernetes.io/tls" => {
            need("tls.key", out);
            need("tls.crt", out);
        }
        _ => {}
    }
}

/// A pod's quality-of-service class, as the API server sets it on create: Guaranteed when
/// every container limits CPU and memory and requests exactly that (requests default to
/// limits), BestEffort when none asks for either, Burstable otherwise.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let r = &c["resources"];
        for k in ["cpu", "memory"] {
            let (req, lim) = (&r["requests"][k], &r["limits"][k]);
            any |= !req.is_null() || !lim.is_null();
            guaranteed &= !lim.is_null() && (req.is_null() || req == lim);
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statefulset_keeps_what_it_was_made_with() {
        let sts = json!({"metadata": {"name": "db"}, "spec": {"serviceName": "db", "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": {"containers": [{"name": "c", "image": "i:1"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}});
        let mut stored = sts.clone();
        defaults("apps", "StatefulSet", &mut stored);
        // Scaled, a new image, a new strategy: allowed, against the stored (defaulted) one.
        let mut ok = sts.clone();
        ok["spec"]["replicas"] = json!(3);
        ok["spec"]["template"]["spec"]["containers"][0]["image"] = json!("i:2");
        ok["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(validate_update("apps", "StatefulSet", &stored, &ok).is_empty());
        // A bigger claim template or another service name: forbidden.
        let mut bigger = sts.clone();
        bigger["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
            json!("2Gi");
        let causes = validate_update("apps", "StatefulSet", &stored, &bigger);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec");
        let mut renamed = sts;
        renamed["spec"]["serviceName"] = json!("other");
        assert_eq!(
            validate_update("apps", "StatefulSet", &stored, &renamed).len(),
            1
        );
    }

    #[test]
    fn empty_enumerated_fields_are_defaulted() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"dnsPolicy": "",
            "containers": [{"name": "c", "image": "i:1", "imagePullPolicy": "",
                            "ports": [{"containerPort": 80, "protocol": ""}]}]}});
        defaults("", "Pod", &mut pod);
        assert!(validate("", "Pod", &pod).is_empty());
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(pod["spec"]["dnsPolicy"], "ClusterFirst");
    }

    #[test]
    fn enumerated_fields_take_only_their_values() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"dnsPolicy": "Cluster",
            "containers": [{"name": "c", "image": "i", "imagePullPolicy": "Sometimes",
                            "ports": [{"containerPort": 80, "protocol": "tcp"}]}]}});
        let causes = validate("", "Pod", &pod);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].imagePullPolicy",
                "spec.containers[0].ports[0].protocol",
                "spec.dnsPolicy"
            ],
            "{causes:?}"
        );
        assert_eq!(
            causes[0].message,
            "Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\""
        );
    }

    #[test]
    fn annotations_may_not_pass_256_kib_together() {
        let half = "x".repeat(130 * 1024);
        let mut cm = json!({"metadata": {"name": "c", "annotations": {"a": half}}});
        assert!(validate("", "ConfigMap", &cm).is_empty());
        cm["metadata"]["annotations"]["b"] = json!(half);
        let causes = validate("", "ConfigMap", &cm);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(
            (causes[0].field.as_str(), causes[0].reason.as_str()),
            ("metadata.annotations", "FieldValueTooLong")
        );
    }

    #[test]
    fn pod_defaults() {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "nginx", "ports": [{"containerPort": 80}],
             "resources": {"limits": {"cpu": 1}}},
            {"name": "b", "image": "reg/x:1.2"}]}});
        defaults("", "Pod", &mut p);
        let s = &p["spec"];
        assert_eq!(s["restartPolicy"], "Always");
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        assert_eq!(s["terminationGracePeriodSeconds"], 30);
        assert_eq!(s["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(s["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(s["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["containers"][0]["resources"]["limits"]["cpu"], "1");
        assert!(validate("", "Pod", &p).is_empty());
        assert!(s["containers"][0]["ports"][0].get("hostPort").is_none());
        let mut h = json!({"metadata": {"name": "h"}, "spec": {"hostNetwork": true,
            "containers": [{"name": "a", "image": "i", "ports": [{"containerPort": 8080}]}]}});
        defaults("", "Pod", &mut h);
        assert_eq!(h["spec"]["containers"][0]["ports"][0]["hostPort"], 8080);
    }

    #[test]
    fn container_resources_are_checked() {
        let pod = |r: Value| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "a", "image": "module:x", "resources": r}]}});
            defaults("", "Pod", &mut p);
            p
        };
        let causes = |r: Value| -> Vec<(String, String)> {
            validate("", "Pod", &pod(r))
                .into_iter()
                .map(|c| (c.field, c.message))
                .collect()
        };
        let at = "spec.containers[0].resources";
        assert!(causes(json!({"requests": {"cpu": "250m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "64Mi", "example.com/dongle": "1",
                "hugepages-2Mi": "2Mi", "ephemeral-storage": "1Gi"}}))
        .is_empty());
        // Requests default to limits on pods.
        let p = pod(json!({"limits": {"cpu": "1", "example.com/dongle": 2}}));
        assert_eq!(
            p["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "1", "example.com/dongle": "2"})
        );
        assert_eq!(
            causes(json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}})),
            [(
                format!("{at}.requests[cpu]"),
                "Invalid value: \"2\": must be less than or equal to cpu limit of 1".into()
            )]
        );
        assert_eq!(
            causes(json!({"limits": {"memory": "-1Mi"}}))[0],
            (
                format!("{at}.limits[memory]"),
                "Invalid value: \"-1Mi\": must be greater than or equal to 0".into()
            )
        );
        assert_eq!(
            causes(json!({"limits": {"gpu": "1"}}))[0],
            (
                format!("{at}.limits[gpu]"),
                "Invalid value: \"gpu\": must be a standard resource type or fully qualified"
                    .into()
            )
        );
        assert_eq!(
            causes(json!({"limits": {"pods": "1"}}))[0].1,
            "Invalid value: \"pods\": must be a standard resource for containers"
        );
        assert_eq!(
            causes(json!({"limits": {"example.com/dongle": "500m"}}))[0],
            (
                format!("{at}.limits[example.com/dongle]"),
                "Invalid value: \"500m\": must be an integer".into()
            )
        );
        assert_eq!(
            causes(json!({"requests": {"example.com/dongle": "1"},
                "limits": {"example.com/dongle": "2"}})),
            [(
                format!("{at}.requests[example.com/dongle]"),
                "Invalid value: \"1\": must be equal to example.com/dongle limit of 2".into()
            )]
        );
        assert_eq!(
            causes(json!({"requests": {"example.com/dongle": "1"}})),
            [(
                format!("{at}.limits"),
                "Required value: Limit must be set for non overcommitable resources".into()
            )]
        );
        // A template is checked too, but its requests are not defaulted.
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                {"name": "a", "image": "i", "resources": {"requests": {"memory": "2Gi"},
                    "limits": {"memory": "1Gi"}}}]}}}});
        defaults("apps", "Deployment", &mut d);
        assert_eq!(
            validate("apps", "Deployment", &d)[0].field,
            "spec.template.spec.containers[0].resources.requests[memory]"
        );
    }

    #[test]
    fn quantities_that_do_not_parse_are_found() {
        let p = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1"}}},
            {"name": "b", "resources": {"limits": {"memory": "512mb"}}}],
            "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}]}});
        assert_eq!(
            bad_quantity(&p),
            Some((
                "spec.containers[1].resources.limits[memory]".into(),
                "512mb".into()
            ))
        );
        let v = json!({"spec": {"volumes": [{"name": "v", "emptyDir": {"sizeLimit": "lots"}}]}});
        assert_eq!(
            bad_quantity(&v),
            Some(("spec.volumes[0].emptyDir.sizeLimit".into(), "lots".into()))
        );
        let q = json!({"spec": {"hard": {"requests.cpu": "4", "count/pods": "10"}},
            "status": {"used": {"pods": "1"}}});
        assert_eq!(bad_quantity(&q), None);
        let lr = json!({"spec": {"limits": [{"type": "Container", "max": {"cpu": "2x"}}]}});
        assert_eq!(
            bad_quantity(&lr),
            Some(("spec.limits[0].max[cpu]".into(), "2x".into()))
        );
    }

    #[test]
    fn a_secrets_string_data_goes_into_its_data() {
        let mut s = json!({"metadata": {"name": "s"}, "data": {"user": "b2xk", "keep": "eA=="},
            "stringData": {"user": "edge-admin", "password": "s3cret"}});
        defaults("", "Secret", &mut s);
        assert_eq!(s["type"], "Opaque");
        assert!(s.get("stringData").is_none(), "{s}");
        assert_eq!(
            s["data"],
            json!({"user": "ZWRnZS1hZG1pbg==", "password": "czNjcmV0", "keep": "eA=="})
        );
        // Not all strings: left for the type check to refuse, nothing dropped.
        let mut bad = json!({"metadata": {"name": "s"}, "stringData": {"n": 1}});
        defaults("", "Secret", &mut bad);
        assert_eq!(bad["stringData"], json!({"n": 1}));
        assert!(bad.get("data").is_none(), "{bad}");
    }

    #[test]
    fn token_volume_goes_where_nothing_is_mounted() {
        let mut spec = json!({"containers": [
            {"name": "a", "image": "x"},
            {"name": "b", "image": "x", "volumeMounts": [{"name": "own", "mountPath": format!("{TOKEN_MOUNT}/")}]}],
            "initContainers": [{"name": "i", "image": "x"}],
            "volumes": [{"name": "own", "emptyDir": {}}]});
        mount_token(&mut spec, "abcde");
        let vols = spec["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[1]["name"], "kube-api-access-abcde");
        let sources = vols[1]["projected"]["sources"].as_array().unwrap();
        assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
        assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
        assert_eq!(sources[2]["downwardAPI"]["items"][0]["path"], "namespace");
        for c in [&spec["containers"][0], &spec["initContainers"][0]] {
            assert_eq!(c["volumeMounts"][0]["mountPath"], TOKEN_MOUNT);
            assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        }
        assert_eq!(
            spec["containers"][1]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // Nobody left to mount it: no volume.
        let mut taken = json!({"containers": [{"name": "a", "volumeMounts": [
            {"name": "own", "mountPath": TOKEN_MOUNT}]}]});
        mount_token(&mut taken, "fghij");
        assert!(taken["volumes"].is_null());
        assert_eq!(service_account(&json!({"serviceAccount": "old"})), "old");
        assert_eq!(service_account(&json!({})), "default");
    }

    #[test]
    fn deployment_checks() {
        let mut d = json!({"metadata": {"name": "web"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "c"}]}}}});
        defaults("apps", "Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let causes = validate("apps", "Deployment", &d);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.template.metadata.labels",
                "spec.template.spec.containers[0].image"
            ]
        );
    }

    #[test]
    fn replication_controller_defaults_and_checks() {
        let mut rc = json!({"metadata": {"name": "web"}, "spec": {"template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
        defaults("", "ReplicationController", &mut rc);
        assert_eq!(rc["spec"]["replicas"], 1);
        assert_eq!(rc["spec"]["selector"], json!({"app": "web"}));
        assert_eq!(rc["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(rc["spec"]["template"]["spec"]["restartPolicy"], "Always");
        assert!(validate("", "ReplicationController", &rc).is_empty());

        rc["spec"]["selector"] = json!({"app": "other"});
        rc["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        rc["spec"]["replicas"] = json!(-1);
        let causes = validate("", "ReplicationController", &rc);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.replicas",
                "spec.template.metadata.labels",
                "spec.template.spec.restartPolicy"
            ]
        );
        let none = json!({"metadata": {"name": "web"}, "spec": {"replicas": 1}});
        let causes = validate("", "ReplicationController", &none);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.selector", "spec.template"]);
    }

    #[test]
    fn mounts_name_a_volume() {
        let p = json!({"metadata": {"name": "p"}, "spec": {
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
            "initContainers": [{"name": "i", "image": "x", "volumeMounts": [
                {"name": "cfg", "mountPath": "/c"}, {"name": "data", "mountPath": "/d"}]}],
            "containers": [{"name": "a", "image": "x", "volumeMounts": [
                {"name": "cfg", "mountPath": "/c"}]},
                {"name": "b", "image": "x", "volumeMounts": [{"name": "www", "mountPath": "/w"}]}]}});
        let causes = validate("", "Pod", &p);
        let got: Vec<(&str, &str, &str)> = causes
            .iter()
            .map(|c| (c.reason.as_str(), c.field.as_str(), c.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "FieldValueNotFound",
                    "spec.initContainers[0].volumeMounts[1].name",
                    "Not found: \"data\""
                ),
                (
                    "FieldValueNotFound",
                    "spec.containers[1].volumeMounts[0].name",
                    "Not found: \"www\""
                ),
            ]
        );
        // A StatefulSet's template may mount its claim templates.
        let sts = json!({"metadata": {"name": "db"}, "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}}],
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [
                {"name": "c", "image": "x", "volumeMounts": [{"name": "data", "mountPath": "/d"}]}]}}}});
        assert!(validate("apps", "StatefulSet", &sts).is_empty());
    }

    #[test]
    fn names() {
        assert!(check_name("Pod", "a.b-c").is_none());
        assert!(check_name("Service", "a.b").is_some());
        assert!(check_name("Pod", "Upper").is_some());
        let o = json!({"metadata": {"name": "x", "labels": {"bad key!": "v"}}});
        assert_eq!(validate("", "ConfigMap", &o).len(), 1);
    }

    #[test]
    fn qos_classes() {
        let c = |res: Value| json!({"containers": [{"name": "c", "resources": res}]});
        assert_eq!(qos_class(&c(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&c(json!({"requests": {"memory": "1Gi"}}))),
            "Burstable"
        );
        assert_eq!(
            qos_class(&c(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&c(json!({"limits": {"cpu": "1", "memory": "1Gi"},
                                 "requests": {"cpu": "500m"}}))),
            "Burstable"
        );
    }

    #[test]
    fn job_checks_apply_to_a_cronjobs_template_too() {
        let spec = |restart: &str| {
            json!({"podFailurePolicy": {"rules": [{"action": "FailIndex",
                    "onExitCodes": {"operator": "In", "values": [0]}}]},
                "template": {"spec": {"restartPolicy": restart,
                    "containers": [{"name": "c", "image": "i"}]}}})
        };
        let fields = |o: &Value, kind: &str| -> Vec<String> {
            validate("batch", kind, o)
                .into_iter()
                .map(|c| c.field)
                .collect()
        };
        let job = json!({"metadata": {"name": "j"}, "spec": spec("OnFailure")});
        let want = [
            "spec.template.spec.restartPolicy",
            "spec.podFailurePolicy.rules[0].action",
            "spec.podFailurePolicy.rules[0].onExitCodes.values",
        ];
        assert_eq!(fields(&job, "Job"), want);
        let cron = json!({"metadata": {"name": "c"}, "spec": {"schedule": "@hourly",
            "jobTemplate": {"spec": spec("OnFailure")}}});
        let nested: Vec<String> = want
            .iter()
            .map(|f| f.replacen("spec.", "spec.jobTemplate.spec.", 1))
            .collect();
        assert_eq!(fields(&cron, "CronJob"), nested);
    }

    #[test]
    fn secrets_hold_what_their_type_needs() {
        let fields = |o: Value| -> Vec<String> {
            validate("", "Secret", &o)
                .into_iter()
                .map(|c| c.field)
                .collect()
        };
        let secret =
            |t: &str, data: Value| json!({"metadata": {"name": "s"}, "type": t, "data": data});
        assert_eq!(
            fields(secret("kubernetes.io/tls", json!({"x": "eQ=="}))),
            ["data[tls.key]", "data[tls.crt]"]
        );
        assert!(fields(secret(
            "kubernetes.io/tls",
            json!({"tls.key": "eQ==", "tls.crt": "eQ=="})
        ))
        .is_empty());
        assert_eq!(
            fields(secret(
                "kubernetes.io/dockerconfigjson",
                json!({".dockerconfigjson": "bm90IGpzb24="})
            )),
            ["data[.dockerconfigjson]"]
        );
        assert!(fields(secret(
            "kubernetes.io/dockerconfigjson",
            json!({".dockerconfigjson": "e30="})
        ))
        .is_empty());
        assert_eq!(
            fields(secret("kubernetes.io/basic-auth", json!({}))),
            ["data[username]", "data[password]"]
        );
        assert_eq!(
            fields(secret("kubernetes.io/service-account-token", json!({}))),
            ["metadata.annotations[kubernetes.io/service-account.name]"]
        );
        assert!(fields(secret("Opaque", json!({}))).is_empty());
        // Over a mebibyte.
        let big = "a".repeat(MAX_CONFIG_BYTES + 1);
        let cm = json!({"metadata": {"name": "c"}, "data": {"k": big}});
        assert_eq!(
            validate("", "ConfigMap", &cm)[0].message,
            format!("Too long: must have at most {MAX_CONFIG_BYTES} bytes")
        );
        // A Secret's type is fixed once made.
        let (old, new) = (secret("Opaque", json!({})), secret("foo", json!({})));
        assert_eq!(validate_update("", "Secret", &old, &new)[0].field, "type");
        // Each env var is named.
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "i", "env": [{"name": "", "value": "2"}]}]}});
        let causes: Vec<String> = validate("", "Pod", &pod)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert!(
            causes.contains(&"spec.containers[0].env[0].name".to_string()),
            "{causes:?}"
        );
    }
}
