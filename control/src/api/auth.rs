//! Who is asking, and may they: users from client certificates and bearer tokens, RBAC over
//! the stored Roles and Bindings, and the bootstrap policy. The rule matching is pure.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

/// An authenticated user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What a request wants to do, as RBAC sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attrs {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for non-resource requests (`/version`, `/healthz`).
    pub path: Option<String>,
}

/// Static bearer tokens, in the Kubernetes token-file format: `token,user,uid,"g1,g2"`.
pub fn load_tokens(path: &Path) -> std::io::Result<HashMap<String, User>> {
    let mut out = HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.splitn(4, ',');
        let (Some(token), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let uid = parts.next().unwrap_or("").to_string();
        let groups = parts
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(String::from)
            .collect();
        out.insert(
            token.to_string(),
            User {
                name: name.to_string(),
                uid,
                groups,
            },
        );
    }
    Ok(out)
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array()
        .is_some_and(|a| a.iter().any(|x| x == "*" || x == want))
}

/// Does one PolicyRule allow `a`?
pub fn rule_allows(rule: &Value, a: &Attrs) -> bool {
    if !has(&rule["verbs"], &a.verb) {
        return false;
    }
    if let Some(path) = &a.path {
        return rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter().filter_map(Value::as_str).any(|u| {
                u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            })
        });
    }
    if !has(&rule["apiGroups"], &a.group) {
        return false;
    }
    let combined = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let res_ok = rule["resources"].as_array().is_some_and(|rs| {
        rs.iter().filter_map(Value::as_str).any(|r| {
            r == "*"
                || r == combined
                || (!a.subresource.is_empty() && r == format!("*/{}", a.subresource))
        })
    });
    if !res_ok {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => names.iter().any(|n| n == a.name.as_str()),
        _ => true,
    }
}

/// Does a binding's subject list include `u`?
pub fn subject_matches(subjects: &Value, u: &User) -> bool {
    subjects.as_array().is_some_and(|ss| {
        ss.iter().any(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["kind"].as_str() {
                Some("User") => name == u.name,
                Some("Group") => u.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    u.name
                        == format!(
                            "system:serviceaccount:{}:{name}",
                            s["namespace"].as_str().unwrap_or("")
                        )
                }
                _ => false,
            }
        })
    })
}

/// The RBAC objects a decision needs.
#[derive(Debug, Default)]
pub struct Policy {
    pub cluster_roles: HashMap<String, Value>,
    /// (namespace, name) → Role.
    pub roles: HashMap<(String, String), Value>,
    pub cluster_bindings: Vec<Value>,
    pub bindings: Vec<Value>,
}

impl Policy {
    /// The rules granted to `u` in namespace `ns` ("" for cluster-wide only).
    pub fn rules_for(&self, u: &User, ns: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let role_rules = |rr: &Value, bns: &str| -> Vec<Value> {
            let name = rr["name"].as_str().unwrap_or("").to_string();
            let role = match rr["kind"].as_str() {
                Some("ClusterRole") => self.cluster_roles.get(&name),
                _ => self.roles.get(&(bns.to_string(), name)),
            };
            role.and_then(|r| r["rules"].as_array().cloned())
                .unwrap_or_default()
        };
        for b in &self.cluster_bindings {
            if subject_matches(&b["subjects"], u) {
                out.extend(role_rules(&b["roleRef"], ""));
            }
        }
        for b in &self.bindings {
            let bns = b["metadata"]["namespace"].as_str().unwrap_or("");
            if bns == ns && !ns.is_empty() && subject_matches(&b["subjects"], u) {
                out.extend(role_rules(&b["roleRef"], bns));
            }
        }
        out
    }

    pub fn allows(&self, u: &User, a: &Attrs) -> bool {
        u.is_master()
            || self
                .rules_for(u, &a.namespace)
                .iter()
                .any(|r| rule_allows(r, a))
    }
}

/// Rules granting `verbs` on every resource of `groups` and of the core group, but for what
/// caps a namespace (ResourceQuotas, LimitRanges), which get only `read`: as Kubernetes'
/// `admin` and `edit` roles, so whoever a namespace is given to cannot raise its limits.
fn limited(groups: &[&str], verbs: &[&str], read: &Value) -> Value {
    const CAPS: [&str; 2] = ["resourcequotas", "limitranges"];
    let mut core: Vec<String> = Vec::new();
    for r in super::resources::RESOURCES
        .iter()
        .filter(|r| r.group.is_empty() && !CAPS.contains(&r.plural))
    {
        core.push(r.plural.to_string());
        core.extend(
            r.subresources
                .iter()
                .map(|s| format!("{}/{}", r.plural, s.name())),
        );
    }
    let others: Vec<&str> = if groups == ["*"] {
        super::resources::groups()
            .into_iter()
            .map(|(g, _)| g)
            // Webhooks see every write they select (Secrets too): only full authority
            // configures them, as in Kubernetes, whose admin role leaves them out.
            // Nor certificates: an approved request is signed for whatever user and groups
            // it names.
            .filter(|g| !g.is_empty() && *g != super::hooks::GROUP && *g != "certificates.k8s.io")
            .collect()
    } else {
        groups.to_vec()
    };
    json!([
        {"apiGroups": others, "resources": ["*"], "verbs": verbs},
        {"apiGroups": [""], "resources": core, "verbs": verbs},
        {"apiGroups": [""], "resources": ["resourcequotas", "resourcequotas/status", "limitranges"],
         "verbs": read},
    ])
}

/// Objects every cluster starts with: the well-known namespaces and the bootstrap RBAC policy.
pub fn bootstrap_objects() -> Vec<(&'static str, &'static str, Value)> {
    let ns = |n: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
    let cr = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
               "rules": rules})
    };
    let crb = |name: &str, role: &str, group: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!(["create", "delete", "deletecollection", "patch", "update"]);
    let read_write: Vec<&str> = [&read, &write]
        .into_iter()
        .flat_map(|v| v.as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let mut out = vec![
        ("", "Namespace", ns("default")),
        ("", "Namespace", ns("kube-system")),
        ("", "Namespace", ns("kube-public")),
        ("", "Namespace", ns("kube-node-lease")),
        // The classes kube-apiserver makes for critical pods.
        (
            "scheduling.k8s.io",
            "PriorityClass",
            json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": "system-cluster-critical"}, "value": 2_000_000_000,
                   "description": "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary."}),
        ),
        (
            "scheduling.k8s.io",
            "PriorityClass",
            json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": "system-node-critical"}, "value": 2_000_001_000,
                   "description": "Used for system critical pods that must not be moved from their current node."}),
        ),
        // Pods that name this class run on the nodes' Wasm runtime.
        (
            "node.k8s.io",
            "RuntimeClass",
            json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                   "metadata": {"name": "wasm"}, "handler": "wasm",
                   "scheduling": {"nodeSelector": {"outpost.dev/runtime-wasm": "true"}}}),
        ),
        // Claims that name no class get local directories on the node their first pod
        // is scheduled to (the class `outpost up` users and K3s users expect).
        (
            "storage.k8s.io",
            "StorageClass",
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                   "metadata": {"name": "local-path", "annotations":
                       {"storageclass.kubernetes.io/is-default-class": "true"}},
                   "provisioner": crate::controllers::volumes::PROVISIONER,
                   "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"}),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "cluster-admin",
                json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                       {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
    ];
    // admin, edit and view are aggregated, as in Kubernetes: each is the union of the
    // ClusterRoles labelled to join it (`rbac.authorization.k8s.io/aggregate-to-edit`, …),
    // so an operator's ClusterRole so labelled extends them to its CRDs. The server's own
    // part of each is a `system:aggregate-to-…` role; edit joins admin and view joins edit.
    let admin_rules = {
        // What edit may, on every group, without `escalate` or `bind` (RBAC's own check
        // then keeps an admin from granting more than it holds), and acting as the
        // namespace's service accounts.
        let mut rules = limited(&["*"], &read_write, &read);
        if let Some(list) = rules.as_array_mut() {
            list.push(json!({"apiGroups": [""], "resources": ["serviceaccounts"],
                "verbs": ["impersonate"]}));
        }
        rules
    };
    // Not discovery.k8s.io: a hand-made EndpointSlice leads Services (and the API server's
    // proxy) wherever it says, so edit reads them only (view's rules, joined below).
    let edit_rules = limited(
        &[
            "apps",
            "batch",
            "policy",
            "coordination.k8s.io",
            "metrics.k8s.io",
        ],
        &read_write,
        &read,
    );
    // Everything of these groups but Secrets, which view does not show.
    let core: Vec<&str> = super::resources::RESOURCES
        .iter()
        .filter(|r| r.group.is_empty() && r.plural != "secrets")
        .map(|r| r.plural)
        .collect();
    let view_rules = json!([
        {"apiGroups": [""], "resources": core, "verbs": read},
        {"apiGroups": ["apps", "batch", "policy", "discovery.k8s.io", "coordination.k8s.io",
                       "events.k8s.io", "node.k8s.io", "metrics.k8s.io"],
         "resources": ["*"], "verbs": read},
    ]);
    let label = |o: &mut Value, to: &str| {
        o["metadata"]["labels"][format!("{AGGREGATE}{to}")] = json!("true");
    };
    let mut parts = Vec::new();
    for (to, rules) in [
        ("admin", admin_rules),
        ("edit", edit_rules),
        ("view", view_rules),
    ] {
        let mut o = cr(&format!("system:aggregate-to-{to}"), rules);
        label(&mut o, to);
        parts.push(o);
    }
    for (name, joins) in [
        ("view", Some("edit")),
        ("edit", Some("admin")),
        ("admin", None),
    ] {
        let mut o = cr(name, json!([]));
        o["aggregationRule"] = json!({"clusterRoleSelectors":
            [{"matchLabels": {format!("{AGGREGATE}{name}"): "true"}}]});
        if let Some(to) = joins {
            label(&mut o, to);
        }
        o["rules"] = aggregate(&o, &parts).unwrap_or_default();
        parts.push(o);
    }
    out.extend(
        parts
            .into_iter()
            .map(|o| ("rbac.authorization.k8s.io", "ClusterRole", o)),
    );
    out.extend(vec![
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                        "/readyz", "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:monitoring",
                json!([{"nonResourceURLs": ["/metrics", "/livez", "/livez/*", "/readyz", "/readyz/*",
                        "/healthz", "/healthz/*"], "verbs": ["get"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb(
                "system:monitoring",
                "system:monitoring",
                "system:monitoring",
            ),
        ),
        // Service accounts may read how to check their tokens (the issuer's discovery and
        // keys), and anyone signed in the version and health.
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:service-account-issuer-discovery",
                json!([{"nonResourceURLs": ["/.well-known/openid-configuration",
                        "/.well-known/openid-configuration/", "/openid/v1/jwks",
                        "/openid/v1/jwks/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb(
                "system:service-account-issuer-discovery",
                "system:service-account-issuer-discovery",
                "system:serviceaccounts",
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version",
                        "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb(
                "system:public-info-viewer",
                "system:public-info-viewer",
                "system:authenticated",
            ),
        ),
        // What a component that checks its callers through the API server needs (an
        // operator's kube-rbac-proxy binds its service account to it).
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:auth-delegator",
                json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                       {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            cr(
                "system:basic-user",
                json!([{"apiGroups": ["authorization.k8s.io"],
                        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                       {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb("cluster-admin", "cluster-admin", "system:masters"),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb(
                "system:discovery",
                "system:discovery",
                "system:authenticated",
            ),
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            crb(
                "system:basic-user",
                "system:basic-user",
                "system:authenticated",
            ),
        ),
    ]);
    out
}

/// The label prefix that puts a ClusterRole into an aggregated one.
pub const AGGREGATE: &str = "rbac.authorization.k8s.io/aggregate-to-";

/// The rules of aggregated ClusterRole `role`: those of every ClusterRole among `roles`
/// its `aggregationRule` selects, in name order, each once. None if it aggregates nothing.
pub fn aggregate(role: &Value, roles: &[Value]) -> Option<Value> {
    let selectors = role["aggregationRule"]["clusterRoleSelectors"].as_array()?;
    let selectors: Vec<super::select::Labels> = selectors
        .iter()
        .map(super::select::Labels::from_selector)
        .filter(|l| !l.is_empty())
        .collect();
    let mut picked: Vec<&Value> = roles
        .iter()
        .filter(|r| r["metadata"]["name"] != role["metadata"]["name"])
        .filter(|r| {
            selectors
                .iter()
                .any(|l| l.matches(&r["metadata"]["labels"]))
        })
        .collect();
    picked.sort_by_key(|r| r["metadata"]["name"].as_str().unwrap_or(""));
    let mut rules: Vec<Value> = Vec::new();
    for rule in picked
        .iter()
        .flat_map(|r| r["rules"].as_array().into_iter().flatten())
    {
        if !rules.contains(rule) {
            rules.push(rule.clone());
        }
    }
    Some(Value::Array(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, res: &str, sub: &str, ns: &str) -> Attrs {
        Attrs {
            verb: verb.into(),
            group: group.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: "x".into(),
            path: None,
        }
    }

    #[test]
    fn aggregated_roles_take_the_rules_of_the_roles_they_select() {
        let role = |name: &str, label: Option<&str>, rules: Value| {
            let mut r = json!({"metadata": {"name": name}, "rules": rules});
            if let Some(l) = label {
                r["metadata"]["labels"] = json!({format!("{AGGREGATE}{l}"): "true"});
            }
            r
        };
        let get = json!({"apiGroups": ["x.io"], "resources": ["a"], "verbs": ["get"]});
        let put = json!({"apiGroups": ["x.io"], "resources": ["a"], "verbs": ["update"]});
        let mut agg = role("agg", Some("agg"), json!([]));
        agg["aggregationRule"] =
            json!({"clusterRoleSelectors": [{"matchLabels": {format!("{AGGREGATE}agg"): "true"}}]});
        let roles = vec![
            role("b", Some("agg"), json!([put, get])),
            role("a", Some("agg"), json!([get])),
            role("c", Some("other"), json!([{"verbs": ["*"]}])),
            agg.clone(),
        ];
        assert_eq!(aggregate(&agg, &roles), Some(json!([get, put])));
        assert_eq!(aggregate(&roles[0], &roles), None);
        // The bootstrap roles come aggregated: admin holds what edit and view hold.
        let boot = bootstrap_objects();
        let rules = |n: &str| {
            boot.iter()
                .find(|(_, _, o)| o["metadata"]["name"] == n)
                .map(|(_, _, o)| o["rules"].as_array().cloned().unwrap_or_default())
                .unwrap_or_default()
        };
        let admin = rules("admin");
        assert!(rules("view").iter().all(|r| admin.contains(r)));
        assert!(rules("edit").iter().all(|r| admin.contains(r)));
        assert!(!rules("view").is_empty());
    }

    #[test]
    fn bindings_grant_rules() {
        let mut p = Policy::default();
        for (_, kind, o) in bootstrap_objects() {
            if kind == "ClusterRole" {
                p.cluster_roles
                    .insert(o["metadata"]["name"].as_str().unwrap().into(), o);
            } else if kind == "ClusterRoleBinding" {
                p.cluster_bindings.push(o);
            }
        }
        p.roles.insert(
            ("team".into(), "pod-reader".into()),
            json!({"rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}]}),
        );
        p.bindings.push(json!({"metadata": {"namespace": "team"},
            "roleRef": {"kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "User", "name": "alice"}]}));
        let alice = User {
            name: "alice".into(),
            uid: String::new(),
            groups: vec!["system:authenticated".into()],
        };
        assert!(p.allows(&alice, &attrs("list", "", "pods", "", "team")));
        assert!(p.allows(&alice, &attrs("get", "", "pods", "log", "team")));
        assert!(!p.allows(&alice, &attrs("delete", "", "pods", "", "team")));
        assert!(!p.allows(&alice, &attrs("list", "", "pods", "", "other")));
        assert!(!p.allows(&alice, &attrs("get", "", "pods", "exec", "team")));
        let mut version = attrs("get", "", "", "", "");
        version.path = Some("/version".into());
        assert!(p.allows(&alice, &version));
        let admin = User {
            name: "admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into()],
        };
        assert!(p.allows(&admin, &attrs("delete", "apps", "deployments", "", "x")));
        // /metrics: the monitoring group's, not everyone's.
        let mut metrics = attrs("get", "", "", "", "");
        metrics.path = Some("/metrics".into());
        assert!(!p.allows(&alice, &metrics));
        let prometheus = User {
            name: "prometheus".into(),
            uid: String::new(),
            groups: vec!["system:monitoring".into()],
        };
        assert!(p.allows(&prometheus, &metrics));
        // A namespace's admins and editors work in it, but cannot raise its limits.
        for role in ["admin", "edit"] {
            p.bindings.push(json!({"metadata": {"namespace": "team"},
                "roleRef": {"kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "User", "name": role}]}));
            let u = User {
                name: role.into(),
                uid: String::new(),
                groups: vec!["system:authenticated".into()],
            };
            assert!(p.allows(&u, &attrs("create", "", "pods", "", "team")));
            assert!(p.allows(&u, &attrs("create", "", "pods", "exec", "team")));
            assert!(p.allows(&u, &attrs("patch", "apps", "deployments", "scale", "team")));
            assert!(p.allows(&u, &attrs("list", "", "resourcequotas", "", "team")));
            assert!(p.allows(&u, &attrs("get", "", "limitranges", "", "team")));
            for res in ["resourcequotas", "limitranges"] {
                assert!(
                    !p.allows(&u, &attrs("update", "", res, "", "team")),
                    "{role} {res}"
                );
                assert!(
                    !p.allows(&u, &attrs("delete", "", res, "", "team")),
                    "{role} {res}"
                );
            }
            assert!(!p.allows(&u, &attrs("patch", "", "resourcequotas", "status", "team")));
            assert!(!p.allows(&u, &attrs("create", "", "pods", "", "other")));
        }
    }

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.csv");
        std::fs::write(&f, "abc,bob,u1,\"dev,ops\"\n# comment\nxyz,carol\n").unwrap();
        let t = load_tokens(&f).unwrap();
        assert_eq!(t["abc"].groups, ["dev", "ops"]);
        assert_eq!(t["xyz"].name, "carol");
        assert!(load_tokens(&dir.path().join("none")).unwrap().is_empty());
    }
}
