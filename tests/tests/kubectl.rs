//! The real kubectl against `outpost up`: discovery, reads, writes, patches, server-side
//! apply, deletes with each cascade, watch, auth, restarts, and older and newer kubectl.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use outpost_tests::{kubectl_bin, kubectl_with, Up};
use serde_json::Value;

const DEPLOY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web, tier: front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        env: [{name: A, value: "1"}]
        ports: [{containerPort: 80}]
        resources: {limits: {cpu: "1", memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
"#;

fn json(s: &str) -> anyhow::Result<Value> {
    serde_json::from_str(s).with_context(|| format!("not JSON: {s}"))
}

fn up() -> anyhow::Result<(tempfile::TempDir, Up)> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    Ok((dir, up))
}

#[test]
fn discovery_and_reads() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    let info = up.kubectl(&["cluster-info"])?.expect_ok("cluster-info")?;
    ensure!(info.stdout.contains(&up.api), "{}", info.stdout);
    let v = up
        .kubectl(&["version", "-o", "json"])?
        .expect_ok("version")?;
    ensure!(json(&v.stdout)?["serverVersion"]["minor"] == "32");
    let ready = up
        .kubectl(&["get", "--raw", "/readyz?verbose"])?
        .expect_ok("readyz")?;
    ensure!(
        ready.stdout.contains("[+]etcd ok") && ready.stdout.contains("readyz check passed"),
        "{}",
        ready.stdout
    );
    up.kubectl(&["get", "namespaces"])?
        .expect_ok("get namespaces")?;
    let metrics = up
        .kubectl(&["get", "--raw", "/metrics"])?
        .expect_ok("metrics")?;
    let namespaces = metrics
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("apiserver_storage_objects{resource=\"namespaces\"} "))
        .and_then(|n| n.parse::<u32>().ok());
    ensure!(
        namespaces >= Some(4)
            && metrics.stdout.lines().any(|l| l.starts_with(
                "apiserver_request_total{verb=\"LIST\",group=\"\",version=\"v1\",resource=\"namespaces\""
            ))
            && metrics.stdout.contains("outpost_store_is_leader 1"),
        "{}",
        metrics.stdout
    );
    let res = up.kubectl(&["api-resources"])?.expect_ok("api-resources")?;
    for r in [
        "deployments",
        "pods",
        "roles",
        "leases",
        "runtimeclasses",
        "endpointslices",
        "selfsubjectaccessreviews",
    ] {
        ensure!(
            res.stdout.contains(r),
            "api-resources lacks {r}:\n{}",
            res.stdout
        );
    }
    let wide = up
        .kubectl(&["api-resources", "-o", "wide"])?
        .expect_ok("api-resources -o wide")?;
    ensure!(
        wide.stdout
            .contains("create,delete,deletecollection,get,list,patch,update,watch"),
        "{}",
        wide.stdout
    );
    let vs = up.kubectl(&["api-versions"])?.expect_ok("api-versions")?;
    ensure!(vs.stdout.lines().any(|l| l == "apps/v1") && vs.stdout.lines().any(|l| l == "v1"));
    let ns = up
        .kubectl(&["get", "namespaces", "-o", "name"])?
        .expect_ok("get ns")?;
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        ensure!(
            ns.stdout.contains(&format!("namespace/{n}")),
            "{}",
            ns.stdout
        );
    }

    up.kubectl_in(&["apply", "-f", "-"], DEPLOY)?
        .expect_ok("apply")?;
    let wide = up
        .kubectl(&["get", "deploy", "-o", "wide"])?
        .expect_ok("get -o wide")?;
    let header = wide.stdout.lines().next().unwrap_or("");
    for col in [
        "NAME",
        "READY",
        "UP-TO-DATE",
        "AVAILABLE",
        "AGE",
        "CONTAINERS",
        "IMAGES",
        "SELECTOR",
    ] {
        ensure!(header.contains(col), "missing {col}: {header}");
    }
    ensure!(wide.stdout.contains("nginx:1.25") && wide.stdout.contains("app=web"));
    let svc = up.kubectl(&["get", "svc", "web"])?.expect_ok("get svc")?;
    ensure!(
        svc.stdout.contains("ClusterIP")
            && svc.stdout.contains("80/TCP")
            && svc.stdout.contains("10.96."),
        "{}",
        svc.stdout
    );
    let y = up
        .kubectl(&["get", "deploy", "web", "-o", "yaml"])?
        .expect_ok("-o yaml")?;
    ensure!(
        y.stdout.contains("revisionHistoryLimit: 10")
            && y.stdout.contains("imagePullPolicy: IfNotPresent")
    );
    let j = json(
        &up.kubectl(&["get", "deploy", "web", "-o", "json"])?
            .expect_ok("-o json")?
            .stdout,
    )?;
    ensure!(j["metadata"]["generation"] == 1 && j["metadata"]["uid"].is_string());
    ensure!(j["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|s| s.parse::<u64>().is_ok()));
    let jp = up.kubectl(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].ports[0].protocol}",
    ])?;
    ensure!(jp.stdout == "TCP", "{}", jp.stdout);
    let all = up
        .kubectl(&["get", "deploy,svc", "-A"])?
        .expect_ok("get -A")?;
    ensure!(
        all.stdout.contains("NAMESPACE") && all.stdout.contains("default"),
        "{}",
        all.stdout
    );
    let l = up
        .kubectl(&["get", "deploy", "-l", "tier=front", "-o", "name"])?
        .expect_ok("-l")?;
    ensure!(l.stdout.trim() == "deployment.apps/web");
    let none = up
        .kubectl(&["get", "deploy", "-l", "tier in (back)", "-o", "name"])?
        .expect_ok("-l in")?;
    ensure!(none.stdout.trim().is_empty());
    let fs = up.kubectl(&[
        "get",
        "svc",
        "-A",
        "--field-selector",
        "metadata.name=kubernetes",
        "-o",
        "name",
    ])?;
    ensure!(fs.stdout.trim() == "service/kubernetes", "{}", fs.stdout);
    let bad = up
        .kubectl(&["get", "cm", "--field-selector", "spec.nodeName=x"])?
        .expect_err("bad field selector")?;
    ensure!(
        bad.stderr
            .contains("field label not supported: spec.nodeName"),
        "{}",
        bad.stderr
    );
    let chunked = up
        .kubectl(&["get", "ns", "--chunk-size=1", "-o", "name"])?
        .expect_ok("chunked")?;
    ensure!(chunked.stdout.lines().count() == 4, "{}", chunked.stdout);
    let d = up
        .kubectl(&["describe", "deploy", "web"])?
        .expect_ok("describe")?;
    ensure!(
        d.stdout.contains("Replicas:") && d.stdout.contains("nginx:1.25"),
        "{}",
        d.stdout
    );
    let e = up
        .kubectl(&["explain", "deployment.spec.replicas"])?
        .expect_ok("explain")?;
    ensure!(
        e.stdout.contains("replicas") && e.stdout.contains("<integer>"),
        "{}",
        e.stdout
    );
    up.kubectl(&["get", "deploy", "nope"])?
        .expect_refusal("get missing", "Error from server (NotFound)")?;
    Ok(())
}

#[test]
fn writes_patches_and_errors() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    up.kubectl_in(&["apply", "-f", "-"], DEPLOY)?
        .expect_ok("apply")?;
    let again = up
        .kubectl_in(&["apply", "-f", "-"], DEPLOY)?
        .expect_ok("apply again")?;
    ensure!(
        again.stdout.contains("deployment.apps/web unchanged"),
        "{}",
        again.stdout
    );
    let changed = DEPLOY
        .replace("nginx:1.25", "nginx:1.27")
        .replace("replicas: 2", "replicas: 3");
    let r = up
        .kubectl_in(&["apply", "-f", "-"], &changed)?
        .expect_ok("apply change")?;
    ensure!(
        r.stdout.contains("deployment.apps/web configured"),
        "{}",
        r.stdout
    );
    let j = json(&up.kubectl(&["get", "deploy", "web", "-o", "json"])?.stdout)?;
    ensure!(j["spec"]["replicas"] == 3 && j["metadata"]["generation"] == 2);
    ensure!(j["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27");
    ensure!(j["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "1");
    // What the controllers write is kube-controller-manager's, as its managedFields say.
    let rs = up
        .kubectl(&[
            "get",
            "rs",
            "-l",
            "app=web",
            "--show-managed-fields",
            "-o",
            "jsonpath={.items[0].metadata.managedFields[*].manager}",
        ])?
        .expect_ok("replicaset managers")?;
    ensure!(
        rs.stdout
            .split_whitespace()
            .all(|m| m == "kube-controller-manager"),
        "{}",
        rs.stdout
    );
    // Every new object with a status has one, if only `{}`, whatever the body said.
    let fresh = json(
        &up.kubectl_in(
            &["create", "-f", "-", "-o", "json"],
            "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n",
        )?
        .expect_ok("create service")?
        .stdout,
    )?;
    ensure!(
        fresh["status"] == serde_json::json!({"loadBalancer": {}}),
        "{fresh}"
    );
    ensure!(j["status"].is_object(), "{j}");
    // Fields the schema does not know: refused by default (Strict), said and dropped with
    // --validate=warn, dropped with --validate=false.
    let odd = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: odd}\nfoo: bar\ndata: {a: b}\n";
    let r = up
        .kubectl_in(&["create", "--validate=warn", "-f", "-"], odd)?
        .expect_ok("create with an unknown field")?;
    ensure!(r.stderr.contains("unknown field \"foo\""), "{}", r.stderr);
    let stored = json(&up.kubectl(&["get", "cm", "odd", "-o", "json"])?.stdout)?;
    ensure!(
        stored.get("foo").is_none() && stored["data"]["a"] == "b",
        "{stored}"
    );
    up.kubectl_in(
        &["replace", "--validate=false", "-f", "-"],
        &odd.replace("foo: bar", "bar: baz"),
    )?
    .expect_ok("replace ignoring an unknown field")?;
    let stored = json(&up.kubectl(&["get", "cm", "odd", "-o", "json"])?.stdout)?;
    ensure!(stored.get("bar").is_none(), "{stored}");
    // `kubectl replace` of the manifest a Service was made from keeps its allocations.
    let (ip, port) = (
        fresh["spec"]["clusterIP"].clone(),
        fresh["spec"]["ports"][0]["nodePort"].clone(),
    );
    up.kubectl_in(
        &["replace", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\n",
    )?
    .expect_ok("replace service")?;
    let now = json(&up.kubectl(&["get", "svc", "np", "-o", "json"])?.stdout)?;
    ensure!(
        now["spec"]["clusterIP"] == ip && now["spec"]["ports"][0]["nodePort"] == port,
        "{now}"
    );

    up.kubectl(&["create", "ns", "team"])?
        .expect_ok("create ns")?;
    up.kubectl(&[
        "create",
        "deployment",
        "hello",
        "--image=busybox:1.36",
        "-n",
        "team",
    ])?
    .expect_ok("create deployment")?;
    let cm = [
        "create",
        "configmap",
        "cfg",
        "--from-literal=a=b",
        "-n",
        "team",
    ];
    up.kubectl(&cm)?.expect_ok("create cm")?;
    up.kubectl(&cm)?
        .expect_refusal("dup", "configmaps \"cfg\" already exists")?;
    // kubectl sends these as protobuf; their `type` must arrive.
    up.kubectl(&[
        "create",
        "service",
        "nodeport",
        "np",
        "--tcp=80:8080",
        "-n",
        "team",
    ])?
    .expect_ok("create service nodeport")?;
    up.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "reg",
        "--docker-server=r.example",
        "--docker-username=u",
        "--docker-password=p",
        "-n",
        "team",
    ])?
    .expect_ok("create secret docker-registry")?;
    let types = up
        .kubectl(&[
            "get",
            "-n",
            "team",
            "service/np",
            "secret/reg",
            "-o",
            "jsonpath={.items[*].spec.type} {.items[*].type}",
        ])?
        .expect_ok("types")?;
    ensure!(
        types.stdout.trim() == "NodePort kubernetes.io/dockerconfigjson",
        "{}",
        types.stdout
    );
    up.kubectl(&["create", "configmap", "x", "-n", "nope"])?
        .expect_refusal("missing ns", "namespaces \"nope\" not found")?;

    up.kubectl(&["patch", "deploy", "web", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"nginx","env":[{"name":"B","value":"2"}]}]}}}}"#])?.expect_ok("strategic")?;
    up.kubectl(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"merged":"yes"}}}"#,
    ])?
    .expect_ok("merge")?;
    up.kubectl(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ])?
    .expect_ok("json")?;
    up.kubectl(&["label", "deploy", "web", "team=edge"])?
        .expect_ok("label")?;
    up.kubectl(&["annotate", "deploy", "web", "note=hello"])?
        .expect_ok("annotate")?;
    let j = json(&up.kubectl(&["get", "deploy", "web", "-o", "json"])?.stdout)?;
    let env = &j["spec"]["template"]["spec"]["containers"][0]["env"];
    ensure!(
        env.as_array().map(Vec::len) == Some(2),
        "strategic merge kept A and added B: {env}"
    );
    ensure!(
        j["metadata"]["labels"]["merged"] == "yes" && j["metadata"]["labels"]["team"] == "edge"
    );
    ensure!(j["metadata"]["annotations"]["note"] == "hello" && j["spec"]["replicas"] == 4);
    up.kubectl(&["scale", "deploy", "web", "--replicas=1"])?
        .expect_ok("scale")?;
    let rep = up.kubectl(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])?;
    ensure!(rep.stdout == "1", "{}", rep.stdout);
    up.kubectl(&[
        "scale",
        "deploy",
        "web",
        "--current-replicas=1",
        "--replicas=2",
    ])?
    .expect_ok("scale --current-replicas")?;
    up.kubectl(&[
        "scale",
        "deploy",
        "web",
        "--current-replicas=7",
        "--replicas=3",
    ])?
    .expect_err("scale with a wrong precondition")?;

    // A stale resourceVersion is a conflict.
    let mut stale = json(
        &up.kubectl(&["get", "cm", "cfg", "-n", "team", "-o", "json"])?
            .stdout,
    )?;
    up.kubectl(&["label", "cm", "cfg", "-n", "team", "bump=1"])?
        .expect_ok("bump")?;
    stale["data"]["a"] = "c".into();
    up.kubectl_in(&["replace", "-f", "-"], &stale.to_string())?
        .expect_refusal("stale replace", "the object has been modified")?;

    // A bad manifest gets field-level errors.
    let bad =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers: [{name: c}]\n";
    let e = up
        .kubectl_in(&["apply", "-f", "-"], bad)?
        .expect_err("bad pod")?;
    ensure!(
        e.stderr
            .contains("spec.containers[0].image: Required value"),
        "{}",
        e.stderr
    );
    let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: u}\ndatta: {a: b}\n";
    up.kubectl_in(&["apply", "-f", "-"], unknown)?
        .expect_refusal("unknown field", "unknown field \"datta\"")?;
    let dry = up
        .kubectl(&[
            "create",
            "configmap",
            "dry",
            "--dry-run=server",
            "-o",
            "name",
        ])?
        .expect_ok("dry run")?;
    ensure!(dry.stdout.contains("configmap/dry"));
    up.kubectl(&["get", "cm", "dry"])?
        .expect_err("dry run stored nothing")?;
    Ok(())
}

#[test]
fn server_side_apply_conflicts() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    let cm = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ssa}}\ndata: {{key: \"{v}\"}}\n"
        )
    };
    let r = up
        .kubectl_in(&["apply", "--server-side", "-f", "-"], &cm("one"))?
        .expect_ok("ssa create")?;
    ensure!(r.stdout.contains("serverside-applied"), "{}", r.stdout);
    up.kubectl_in(&["apply", "--server-side", "-f", "-"], &cm("two"))?
        .expect_ok("ssa update")?;
    let e = up
        .kubectl_in(
            &["apply", "--server-side", "--field-manager=other", "-f", "-"],
            &cm("three"),
        )?
        .expect_err("conflict")?;
    ensure!(
        e.stderr.contains("conflict with \"kubectl\"") && e.stderr.contains(".data.key"),
        "{}",
        e.stderr
    );
    up.kubectl_in(
        &[
            "apply",
            "--server-side",
            "--field-manager=other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &cm("three"),
    )?
    .expect_ok("forced")?;
    let j = json(
        &up.kubectl(&["get", "cm", "ssa", "-o", "json", "--show-managed-fields"])?
            .stdout,
    )?;
    ensure!(j["data"]["key"] == "three");
    let managers: Vec<&str> = j["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    ensure!(managers.contains(&"other"), "{managers:?}");
    // Client-side apply, then server-side apply of the same manifest, as users migrate.
    // The pod's token volume and the claim's default class are admission's, not the
    // writer's: an apply that leaves them out keeps them (else the pod's spec would change,
    // which is refused, and kubectl's re-apply after the move would fail).
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: moving}\nspec:\n  runtimeClassName: wasm\n  containers:\n  - {name: main, image: module:sleeper}\n";
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: moving}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Mi}}\n";
    for m in [DEPLOY, pod, claim] {
        up.kubectl_in(&["apply", "-f", "-"], m)?.expect_ok("csa")?;
        for _ in 0..2 {
            let r = up
                .kubectl_in(&["apply", "--server-side", "-f", "-"], m)?
                .expect_ok("ssa after csa")?;
            ensure!(!r.stderr.contains("failed"), "{m}\n{}", r.stderr);
        }
    }
    let vols = up
        .kubectl(&[
            "get",
            "pod",
            "moving",
            "-o",
            "jsonpath={.spec.volumes[*].name}",
        ])?
        .expect_ok("get pod")?;
    ensure!(
        vols.stdout.starts_with("kube-api-access-"),
        "{}",
        vols.stdout
    );
    // A change to what client-side apply managed is taken over, not a conflict (the
    // upgrade kube-apiserver allows kubectl), and the last-applied annotation follows it.
    let cm2 = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: csa}}\ndata: {{key: \"{v}\"}}\n"
        )
    };
    up.kubectl_in(&["apply", "-f", "-"], &cm2("one"))?
        .expect_ok("csa")?;
    up.kubectl_in(&["apply", "--server-side", "-f", "-"], &cm2("two"))?
        .expect_ok("ssa takes over from csa")?;
    let j = json(&up.kubectl(&["get", "cm", "csa", "-o", "json"])?.stdout)?;
    ensure!(j["data"]["key"] == "two", "{j}");
    let last = j["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap_or_default();
    ensure!(last.contains("\"two\""), "{last}");
    up.kubectl_in(&["apply", "-f", "-"], &cm2("three"))?
        .expect_ok("csa again")?;
    let j = json(&up.kubectl(&["get", "cm", "csa", "-o", "json"])?.stdout)?;
    ensure!(j["data"]["key"] == "three", "{j}");
    // A value another hand changed since the last client-side apply is a conflict.
    up.kubectl(&["patch", "cm", "csa", "-p", r#"{"data":{"key":"zzz"}}"#])?
        .expect_ok("patch")?;
    let e = up
        .kubectl_in(&["apply", "--server-side", "-f", "-"], &cm2("four"))?
        .expect_err("conflict with the patch")?;
    ensure!(
        e.stderr.contains("conflict with \"kubectl-patch\"") && e.stderr.contains(".data.key"),
        "{}",
        e.stderr
    );
    // Items no longer applied go whole: a container, an env var, a Service port.
    let two = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: sides}\nspec:\n  selector: {matchLabels: {app: sides}}\n  template:\n    metadata: {labels: {app: sides}}\n    spec:\n      runtimeClassName: wasm\n      containers:\n      - name: c1\n        image: module:sleeper\n        env: [{name: E1, value: \"1\"}, {name: E2, value: \"2\"}]\n      - {name: c2, image: module:sleeper}\n";
    let one = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: sides}\nspec:\n  selector: {matchLabels: {app: sides}}\n  template:\n    metadata: {labels: {app: sides}}\n    spec:\n      runtimeClassName: wasm\n      containers:\n      - name: c1\n        image: module:sleeper\n        env: [{name: E1, value: \"1\"}]\n";
    let svc = |ports: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: sides}}\nspec:\n  selector: {{app: sides}}\n  ports: [{ports}]\n")
    };
    for (m, what) in [
        (two, "deploy"),
        (&svc("{name: a, port: 80}, {name: b, port: 81}"), "svc"),
    ] {
        up.kubectl_in(&["apply", "--server-side", "-f", "-"], m)?
            .expect_ok(what)?;
    }
    for (m, what) in [(one, "deploy"), (&svc("{name: a, port: 80}"), "svc")] {
        up.kubectl_in(&["apply", "--server-side", "-f", "-"], m)?
            .expect_ok(&format!("{what} with an item dropped"))?;
    }
    let left = up
        .kubectl(&["get", "deploy", "sides", "-o", "jsonpath={.spec.template.spec.containers[*].name}/{.spec.template.spec.containers[*].env}"])?
        .expect_ok("containers")?;
    ensure!(
        left.stdout == r#"c1/[{"name":"E1","value":"1"}]"#,
        "{}",
        left.stdout
    );
    let ports = up
        .kubectl(&[
            "get",
            "svc",
            "sides",
            "-o",
            "jsonpath={.spec.ports[*].name}",
        ])?
        .expect_ok("ports")?;
    ensure!(ports.stdout == "a", "{}", ports.stdout);
    Ok(())
}

fn owned_rs(up: &Up, name: &str) -> anyhow::Result<()> {
    let uid = up
        .kubectl(&["get", "deploy", name, "-o", "jsonpath={.metadata.uid}"])?
        .expect_ok("uid")?
        .stdout;
    let rs = format!(
        r#"{{"apiVersion":"apps/v1","kind":"ReplicaSet","metadata":{{"name":"{name}-rs","labels":{{"app":"{name}"}},
        "ownerReferences":[{{"apiVersion":"apps/v1","kind":"Deployment","name":"{name}","uid":"{uid}","controller":true}}]}},
        "spec":{{"replicas":0,"selector":{{"matchLabels":{{"app":"{name}"}}}},"template":{{"metadata":{{"labels":{{"app":"{name}"}}}},
        "spec":{{"containers":[{{"name":"c","image":"busybox"}}]}}}}}}}}"#
    );
    up.kubectl_in(&["create", "-f", "-"], &rs)?
        .expect_ok("create owned rs")?;
    Ok(())
}

fn gone(up: &Up, what: &str) -> anyhow::Result<bool> {
    let r = up.kubectl(&["get", what, "--ignore-not-found", "-o", "name"])?;
    Ok(r.ok && r.stdout.trim().is_empty())
}

fn until(secs: u64, what: &str, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn deletes_with_each_cascade() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    for (name, cascade) in [("bg", "background"), ("fg", "foreground"), ("or", "orphan")] {
        up.kubectl(&["create", "deployment", name, "--image=busybox"])?
            .expect_ok("create")?;
        owned_rs(&up, name)?;
        let r = up
            .kubectl(&["delete", "deploy", name, &format!("--cascade={cascade}")])?
            .expect_ok("delete")?;
        ensure!(r.stdout.contains("deleted"), "{}", r.stdout);
        ensure!(
            gone(&up, &format!("deploy/{name}"))?,
            "{cascade}: the deployment is still there"
        );
        let rs = format!("rs/{name}-rs");
        if cascade == "orphan" {
            let j = json(
                &up.kubectl(&["get", &rs, "-o", "json"])?
                    .expect_ok("orphan kept")?
                    .stdout,
            )?;
            ensure!(
                j["metadata"]["ownerReferences"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
                "{j}"
            );
        } else {
            until(20, "dependents to go", || gone(&up, &rs))?;
        }
    }
    up.kubectl(&["create", "configmap", "w"])?.expect_ok("cm")?;
    up.kubectl(&[
        "patch",
        "cm",
        "w",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ])?
    .expect_ok("finalizer")?;
    up.kubectl(&["delete", "cm", "w", "--wait=false"])?
        .expect_ok("delete held")?;
    let j = json(
        &up.kubectl(&["get", "cm", "w", "-o", "json"])?
            .expect_ok("still there")?
            .stdout,
    )?;
    ensure!(j["metadata"]["deletionTimestamp"].is_string());
    let waiter = std::thread::spawn({
        let kc = up.kubeconfig.clone();
        let cache = up.cache_dir().to_path_buf();
        move || -> anyhow::Result<outpost_tests::Run> {
            kubectl_with(
                &kubectl_bin(None)?,
                &kc,
                &cache,
                &["wait", "--for=delete", "cm/w", "--timeout=30s"],
                None,
            )
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    up.kubectl(&[
        "patch",
        "cm",
        "w",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?
    .expect_ok("release")?;
    let w = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiter panicked"))??;
    w.expect_ok("wait --for=delete")?;
    ensure!(gone(&up, "cm/w")?);
    // Deleting a namespace removes what it held, after a grace in which `delete -f` of a
    // manifest listing the Namespace first still finds the rest.
    let app = "apiVersion: v1\nkind: Namespace\nmetadata: {name: tmp}\n---\n\
        apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: tmp}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: tmp}\n\
        spec: {ports: [{port: 80}]}\n";
    up.kubectl_in(&["apply", "-f", "-"], app)?
        .expect_ok("apply app")?;
    let del = up
        .kubectl_in(&["delete", "-f", "-", "--wait=false"], app)?
        .expect_ok("delete -f with the namespace first")?;
    for what in ["namespace \"tmp\"", "configmap \"x\"", "service \"s\""] {
        ensure!(
            del.stdout.contains(&format!("{what} deleted")),
            "{}",
            del.stdout
        );
    }
    let phase = up
        .kubectl(&["get", "ns", "tmp", "-o", "jsonpath={.status.phase}"])?
        .expect_ok("terminating")?;
    ensure!(phase.stdout == "Terminating", "{}", phase.stdout);
    up.kubectl(&["create", "configmap", "y", "-n", "tmp"])?
        .expect_refusal(
            "create in a terminating namespace",
            "because it is being terminated",
        )?;
    up.kubectl(&["wait", "--for=delete", "ns/tmp", "--timeout=30s"])?
        .expect_ok("namespace gone")?;
    ensure!(gone(&up, "ns/tmp")?);
    Ok(())
}

#[test]
fn watch_streams_changes() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    let mut child = std::process::Command::new(kubectl_bin(None)?)
        .arg("--kubeconfig")
        .arg(&up.kubeconfig)
        .arg("--cache-dir")
        .arg(up.cache_dir())
        .args(["get", "configmaps", "-w", "--output-watch-events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    up.kubectl(&["create", "configmap", "seen"])?
        .expect_ok("create")?;
    up.kubectl(&["delete", "configmap", "seen"])?
        .expect_ok("delete")?;
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !lines.iter().any(|l: &String| l.contains("DELETED")) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("ADDED") && l.contains("seen")),
        "{lines:?}"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("DELETED") && l.contains("seen")),
        "{lines:?}"
    );
    Ok(())
}

/// Write to `path` a kubeconfig for `up`'s cluster whose only credential is the bearer
/// `token`.
fn token_kubeconfig(up: &Up, path: &std::path::Path, token: &str) -> anyhow::Result<()> {
    user_kubeconfig(up, path, &format!("token: {token}"))
}

/// A kubeconfig for `up`'s cluster whose user is `user` (YAML under `user:`).
fn user_kubeconfig(up: &Up, path: &std::path::Path, user: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&up.kubeconfig)?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("server")?;
    let ca = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .context("ca")?;
    std::fs::write(path, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    {user}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: default}}\ncurrent-context: c\n"))?;
    Ok(())
}

#[test]
fn authentication_and_rbac() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("outpost").join("control").join("pki");
    std::fs::create_dir_all(&pki)?;
    std::fs::write(
        pki.join("tokens.csv"),
        "s3cret-token,alice,u-alice,\"devs\"\n",
    )?;
    let up = Up::start(dir.path())?;
    let yes = up
        .kubectl(&["auth", "can-i", "delete", "nodes"])?
        .expect_ok("admin can-i")?;
    ensure!(yes.stdout.trim() == "yes");
    let who = up
        .kubectl(&["auth", "whoami", "-o", "json"])?
        .expect_ok("whoami")?;
    ensure!(json(&who.stdout)?["status"]["userInfo"]["username"] == "admin");

    // alice has a token and, at first, no role.
    let text = std::fs::read_to_string(&up.kubeconfig)?;
    let alice_cfg = dir.path().join("alice");
    token_kubeconfig(&up, &alice_cfg, "s3cret-token")?;
    let anon_cfg = dir.path().join("anon");
    std::fs::write(&anon_cfg, text.split("users:").next().unwrap_or("").to_string()
        + "users:\n- name: nobody\n  user: {token: not-a-token}\ncontexts:\n- name: c\n  context: {cluster: outpost, user: nobody}\ncurrent-context: c\n")?;
    let cache = dir.path().join("alice-cache");
    let kb = kubectl_bin(None)?;
    let alice = |args: &[&str]| kubectl_with(&kb, &alice_cfg, &cache, args, None);
    let no = alice(&["auth", "can-i", "list", "pods"])?;
    ensure!(no.stdout.trim() == "no", "{no:?}");
    let f = alice(&["get", "pods"])?.expect_err("forbidden")?;
    ensure!(
        f.stderr.contains("Forbidden") && f.stderr.contains("User \"alice\" cannot list"),
        "alice get pods: {f:?}"
    );
    up.kubectl(&[
        "create",
        "role",
        "reader",
        "--verb=get,list,watch",
        "--resource=pods,configmaps",
    ])?
    .expect_ok("role")?;
    up.kubectl(&[
        "create",
        "rolebinding",
        "devs-read",
        "--role=reader",
        "--group=devs",
    ])?
    .expect_ok("binding")?;
    let ok = alice(&["auth", "can-i", "list", "pods"])?;
    ensure!(ok.stdout.trim() == "yes", "{ok:?}");
    alice(&["get", "pods"])?.expect_ok("alice lists pods")?;
    let other_ns = alice(&["auth", "can-i", "list", "pods", "-n", "kube-system"])?;
    ensure!(other_ns.stdout.trim() == "no");
    alice(&["create", "configmap", "x"])?.expect_err("alice may not create")?;
    // `--as`: the admin acts as alice, or as a service account with its groups, and gets
    // their answers; alice may not act as anyone.
    let as_alice = up.kubectl(&[
        "auth",
        "can-i",
        "create",
        "configmaps",
        "--as=alice",
        "--as-group=devs",
    ])?;
    ensure!(as_alice.stdout.trim() == "no", "{as_alice:?}");
    let as_alice = up.kubectl(&["get", "pods", "--as=alice", "--as-group=devs"])?;
    ensure!(as_alice.ok, "{as_alice:?}");
    up.kubectl(&[
        "create",
        "rolebinding",
        "sa-read",
        "--role=reader",
        "--serviceaccount=default:bot",
    ])?
    .expect_ok("binding for a service account")?;
    let bot = "--as=system:serviceaccount:default:bot";
    let r = up.kubectl(&["auth", "can-i", "list", "pods", bot])?;
    ensure!(r.stdout.trim() == "yes", "{r:?}");
    let r = up.kubectl(&["auth", "can-i", "delete", "pods", bot])?;
    ensure!(r.stdout.trim() == "no", "{r:?}");
    let who = up
        .kubectl(&["auth", "whoami", bot, "-o", "json"])?
        .expect_ok("whoami as a service account")?;
    let info = &json(&who.stdout)?["status"]["userInfo"];
    ensure!(
        info["username"] == "system:serviceaccount:default:bot"
            && info["groups"]
                .to_string()
                .contains("system:serviceaccounts:default"),
        "{info}"
    );
    let f = up
        .kubectl(&["delete", "configmap", "kube-root-ca.crt", bot])?
        .expect_err("the service account may not delete")?;
    ensure!(f.stderr.contains("cannot delete"), "{f:?}");
    let f = alice(&["get", "pods", "--as=admin"])?.expect_err("alice may not impersonate")?;
    ensure!(
        f.stderr
            .contains("User \"alice\" cannot impersonate resource \"users\""),
        "{f:?}"
    );

    let anon = kubectl_with(
        &kb,
        &anon_cfg,
        &dir.path().join("anon-cache"),
        &["get", "--raw", "/api/v1/namespaces"],
        None,
    )?
    .expect_err("anonymous")?;
    ensure!(
        anon.stderr.contains("Unauthorized") || anon.stderr.contains("logged in"),
        "{}",
        anon.stderr
    );
    let unknown = kubectl_with(
        &kb,
        &anon_cfg,
        &dir.path().join("anon-cache"),
        &["get", "ns"],
        None,
    )?
    .expect_err("unknown token")?;
    ensure!(
        unknown
            .stderr
            .contains("You must be logged in to the server"),
        "{}",
        unknown.stderr
    );
    Ok(())
}

/// `kubectl create token` issues ServiceAccount tokens the API accepts as that account (with
/// its groups, under RBAC) until the account or the object the token is bound to is gone.
#[test]
fn serviceaccount_tokens() -> anyhow::Result<()> {
    let (dir, up) = up()?;
    // Every namespace, old or new, holds the cluster CA for clients inside the cluster.
    let text = std::fs::read_to_string(&up.kubeconfig)?;
    let ca = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .context("ca")?;
    let ca = String::from_utf8(base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        ca,
    )?)?;
    up.kubectl(&["create", "namespace", "team"])?
        .expect_ok("create ns")?;
    for ns in ["default", "kube-system", "team"] {
        let got = up
            .kubectl(&[
                "get",
                "configmap",
                "kube-root-ca.crt",
                "-n",
                ns,
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ])?
            .expect_ok("get kube-root-ca.crt")?;
        ensure!(got.stdout.trim() == ca.trim(), "{ns}: {}", got.stdout);
    }
    up.kubectl(&["create", "serviceaccount", "bot"])?
        .expect_ok("create sa")?;
    let token = up
        .kubectl(&["create", "token", "bot"])?
        .expect_ok("create token")?
        .stdout
        .trim()
        .to_string();
    ensure!(token.split('.').count() == 3, "{token}");
    let short = up
        .kubectl(&["create", "token", "bot", "--duration=5m"])?
        .expect_err("a token shorter than 10 minutes")?;
    ensure!(
        short
            .stderr
            .contains("may not specify a duration less than 10 minutes"),
        "{}",
        short.stderr
    );
    up.kubectl(&["create", "token", "nobody"])?
        .expect_refusal("a token for a missing account", "not found")?;
    let req = up
        .kubectl(&["create", "token", "bot", "--duration=2h", "-o", "json"])?
        .expect_ok("create token -o json")?;
    let req = json(&req.stdout)?;
    ensure!(req["kind"] == "TokenRequest", "{req}");
    ensure!(req["spec"]["expirationSeconds"] == 7200, "{req}");

    let kb = kubectl_bin(None)?;
    let as_token = |name: &str, token: &str, args: &[&str]| {
        let cfg = dir.path().join(name);
        token_kubeconfig(&up, &cfg, token)?;
        kubectl_with(
            &kb,
            &cfg,
            &dir.path().join(format!("{name}-cache")),
            args,
            None,
        )
    };
    // A token the API does not take: kubectl is told to log in.
    let refused = |name: &str, token: &str, why: &str| -> anyhow::Result<()> {
        let r = as_token(name, token, &["get", "pods"])?.expect_err(why)?;
        ensure!(
            r.stderr.contains("You must be logged in"),
            "{why}: {}",
            r.stderr
        );
        Ok(())
    };
    let who = as_token("bot", &token, &["auth", "whoami", "-o", "json"])?.expect_ok("whoami")?;
    let info = &json(&who.stdout)?["status"]["userInfo"];
    ensure!(
        info["username"] == "system:serviceaccount:default:bot",
        "{info}"
    );
    for g in [
        "system:serviceaccounts",
        "system:serviceaccounts:default",
        "system:authenticated",
    ] {
        ensure!(
            info["groups"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == g)),
            "{info}"
        );
    }
    let f = as_token("bot", &token, &["get", "pods"])?.expect_err("forbidden")?;
    ensure!(
        f.stderr
            .contains("User \"system:serviceaccount:default:bot\" cannot list"),
        "{}",
        f.stderr
    );
    up.kubectl(&[
        "create",
        "role",
        "reader",
        "--verb=get,list",
        "--resource=pods",
    ])?
    .expect_ok("role")?;
    up.kubectl(&[
        "create",
        "rolebinding",
        "bot-read",
        "--role=reader",
        "--serviceaccount=default:bot",
    ])?
    .expect_ok("rolebinding")?;
    as_token("bot", &token, &["get", "pods"])?.expect_ok("the bot lists pods")?;

    // A token bound to a Secret ends with the Secret.
    up.kubectl(&["create", "secret", "generic", "session"])?
        .expect_ok("secret")?;
    let bound = up
        .kubectl(&[
            "create",
            "token",
            "bot",
            "--bound-object-kind=Secret",
            "--bound-object-name=session",
        ])?
        .expect_ok("bound token")?
        .stdout
        .trim()
        .to_string();
    as_token("bound", &bound, &["get", "pods"])?.expect_ok("the bound token works")?;
    up.kubectl(&["delete", "secret", "session"])?
        .expect_ok("delete secret")?;
    refused("bound", &bound, "the bound object is gone")?;
    as_token("bot", &token, &["get", "pods"])?.expect_ok("the unbound token still works")?;

    // A tampered token and a deleted account's token are refused.
    let mut forged = token.clone().into_bytes();
    let at = forged.len() - 10;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    refused("forged", &forged, "a tampered token")?;
    // A token for another audience is not for this API.
    let other = up
        .kubectl(&["create", "token", "bot", "--audience=https://vault.example"])?
        .expect_ok("token for another audience")?
        .stdout
        .trim()
        .to_string();
    refused("other", &other, "another audience")?;
    up.kubectl(&["delete", "serviceaccount", "bot"])?
        .expect_ok("delete sa")?;
    refused("bot", &token, "the account is gone")?;
    Ok(())
}

#[test]
fn restart_keeps_every_object() -> anyhow::Result<()> {
    let (_d, mut up) = up()?;
    up.kubectl_in(&["apply", "-f", "-"], DEPLOY)?
        .expect_ok("apply")?;
    up.kubectl(&["create", "ns", "keep"])?.expect_ok("ns")?;
    let before = json(&up.kubectl(&["get", "deploy", "web", "-o", "json"])?.stdout)?;
    // Bootstrap roles as an older version left them (wider, and not aggregated): put back
    // at start, unless kept.
    let wide = r#"[{"op":"replace","path":"/rules","value":[{"apiGroups":["*"],"resources":["*"],"verbs":["*"]}]},{"op":"remove","path":"/aggregationRule"}]"#;
    for role in ["edit", "view"] {
        up.kubectl(&["patch", "clusterrole", role, "--type=json", "-p", wide])?
            .expect_ok("widen role")?;
    }
    up.kubectl(&[
        "annotate",
        "--overwrite",
        "clusterrole",
        "view",
        "rbac.authorization.kubernetes.io/autoupdate=false",
    ])?
    .expect_ok("keep view")?;
    // Kept out of edit too: an aggregated role takes whatever is labelled to join it.
    up.kubectl(&[
        "label",
        "clusterrole",
        "view",
        "rbac.authorization.k8s.io/aggregate-to-edit-",
    ])?
    .expect_ok("view out of edit")?;
    up.restart()?;
    let rules = |role: &str| -> anyhow::Result<String> {
        Ok(up
            .kubectl(&[
                "get",
                "clusterrole",
                role,
                "-o",
                "jsonpath={.rules[*].apiGroups}",
            ])?
            .expect_ok("rules")?
            .stdout)
    };
    let (edit, view) = (rules("edit")?, rules("view")?);
    ensure!(!edit.contains("\"*\"") && edit.contains("apps"), "{edit}");
    ensure!(view == r#"["*"]"#, "{view}");
    let agg = up
        .kubectl(&[
            "get",
            "clusterrole",
            "edit",
            "-o",
            "jsonpath={.aggregationRule}",
        ])?
        .expect_ok("aggregation rule")?;
    ensure!(agg.stdout.contains("aggregate-to-edit"), "{}", agg.stdout);
    let after = json(
        &up.kubectl(&["get", "deploy", "web", "-o", "json"])?
            .expect_ok("after restart")?
            .stdout,
    )?;
    ensure!(before["metadata"]["uid"] == after["metadata"]["uid"]);
    ensure!(before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]);
    up.kubectl(&["get", "ns", "keep"])?.expect_ok("ns kept")?;
    up.kubectl(&["create", "configmap", "new"])?
        .expect_ok("writes after restart")?;
    Ok(())
}

/// A pod's spec is fixed but for its images (and a few scheduling fields): another change is
/// refused with the reason, as by kube-apiserver, and the pod is left as it was.
#[test]
fn pod_updates_change_only_images() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    let pod = |image: &str, value: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: fixed}}\nspec:\n  nodeSelector: {{nowhere: \"true\"}}\n  containers:\n  - name: c\n    image: {image}\n    env:\n    - {{name: X, value: \"{value}\"}}\n")
    };
    up.kubectl_in(&["apply", "-f", "-"], &pod("busybox:1", "1"))?
        .expect_ok("create")?;
    let e = up
        .kubectl_in(&["apply", "-f", "-"], &pod("busybox:1", "2"))?
        .expect_err("an env change")?;
    ensure!(
        e.stderr.contains("is invalid")
            && e.stderr.contains("pod updates may not change fields")
            && e.stderr.contains("spec.containers"),
        "{}",
        e.stderr
    );
    up.kubectl_in(&["apply", "-f", "-"], &pod("busybox:2", "1"))?
        .expect_ok("an image change")?;
    up.kubectl(&["set", "image", "pod/fixed", "c=busybox:3"])?
        .expect_ok("set image")?;
    up.kubectl(&["label", "pod", "fixed", "tier=a"])?
        .expect_ok("label")?;
    let spec = up
        .kubectl(&[
            "get",
            "pod",
            "fixed",
            "-o",
            "jsonpath={.spec.containers[0].image} {.spec.containers[0].env[0].value}",
        ])?
        .expect_ok("get")?;
    ensure!(spec.stdout == "busybox:3 1", "{}", spec.stdout);
    Ok(())
}

#[test]
fn older_and_newer_kubectl() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    // The node's kubelet version is the server's: never newer, as version skew allows.
    let kubelet = up.wait_field(
        30,
        &["nodes"],
        "{.items[0].status.nodeInfo.kubeletVersion}",
        |v| !v.is_empty(),
    )?;
    ensure!(kubelet == "v1.32.0-outpost", "{kubelet}");
    for v in ["1.27", "1.33"] {
        let ns = format!("k{}", v.replace('.', "-"));
        let r = up.kubectl_v(v, &["version"])?.expect_ok("version")?;
        ensure!(r.stdout.contains("v1.32.0-outpost"), "{}", r.stdout);
        up.kubectl_v(v, &["create", "namespace", &ns])?
            .expect_ok("create ns")?;
        up.kubectl_v(
            v,
            &["create", "configmap", "c", "-n", &ns, "--from-literal=a=1"],
        )?
        .expect_ok("create cm")?;
        let g = up
            .kubectl_v(v, &["get", "cm", "-n", &ns])?
            .expect_ok("get")?;
        ensure!(g.stdout.contains("DATA"), "{}", g.stdout);
        up.kubectl_v(v, &["label", "cm", "c", "-n", &ns, "x=y"])?
            .expect_ok("label")?;
        up.kubectl_v(v, &["delete", "namespace", &ns, "--wait=false"])?
            .expect_ok("delete ns")?;
    }
    Ok(())
}

const EXTRAS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  ingressClassName: edge
  rules:
  - host: web.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-web}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 2
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: high}
value: 1000
preemptionPolicy: Never
"#;

/// Kinds common manifests carry beside their workloads (charts' Ingresses, autoscalers,
/// network policies, priority classes) are stored and printed as kubectl expects; a pod's
/// priority comes from the class it names.
#[test]
fn ingresses_autoscalers_policies_and_priorities() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    up.kubectl_in(&["apply", "-f", "-"], EXTRAS)?
        .expect_ok("apply extras")?;
    // What a CSI driver's, metrics-server's or a chart's manifests carry is stored, and the
    // metrics this API serves itself keep answering.
    let carried = "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: v1beta1.metrics.k8s.io}\nspec: {service: {name: metrics-server, namespace: kube-system}, group: metrics.k8s.io, version: v1beta1, groupPriorityMinimum: 100, versionPriority: 100}\n---\napiVersion: storage.k8s.io/v1\nkind: CSIDriver\nmetadata: {name: nfs.csi.k8s.io}\nspec: {attachRequired: false}\n---\napiVersion: flowcontrol.apiserver.k8s.io/v1\nkind: FlowSchema\nmetadata: {name: fs}\nspec: {priorityLevelConfiguration: {name: global-default}, matchingPrecedence: 1000}\n";
    up.kubectl_in(&["apply", "-f", "-"], carried)?
        .expect_ok("apply carried kinds")?;
    let names = up
        .kubectl(&["get", "apiservices,csidrivers,flowschemas", "-o", "name"])?
        .expect_ok("get carried kinds")?;
    ensure!(names.stdout.lines().count() == 3, "{}", names.stdout);
    up.kubectl(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes"])?
        .expect_ok("metrics still served")?;
    let got = up
        .kubectl(&["get", "ingress,netpol,hpa", "--no-headers"])?
        .expect_ok("get extras")?;
    let rows: Vec<Vec<&str>> = got
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(rows.len() == 3, "{}", got.stdout);
    ensure!(
        rows[0][..4] == ["ingress.networking.k8s.io/web", "edge", "web.example", "80"],
        "{:?}",
        rows[0]
    );
    ensure!(
        rows[1][..2] == ["networkpolicy.networking.k8s.io/only-web", "app=web"],
        "{:?}",
        rows[1]
    );
    ensure!(
        rows[2][..6]
            == [
                "horizontalpodautoscaler.autoscaling/web",
                "Deployment/web",
                "cpu:",
                "<unknown>/80%",
                "2",
                "5"
            ],
        "{:?}",
        rows[2]
    );
    // `kubectl create` sends protobuf, where an ingress rule's `http` is nested one deeper.
    up.kubectl(&[
        "create",
        "ingress",
        "simple",
        "--rule=foo.com/bar=svc1:8080",
    ])?
    .expect_ok("create ingress")?;
    let backend = up
        .kubectl(&[
            "get",
            "ingress",
            "simple",
            "-o",
            "jsonpath={.spec.rules[0].http.paths[0].backend.service.name}",
        ])?
        .expect_ok("get ingress")?;
    ensure!(backend.stdout == "svc1", "{}", backend.stdout);
    let pcs = up
        .kubectl(&["get", "priorityclasses", "--no-headers"])?
        .expect_ok("get pc")?;
    for want in ["high ", "system-node-critical ", "system-cluster-critical "] {
        ensure!(pcs.stdout.contains(want), "{}", pcs.stdout);
    }
    let res = up
        .kubectl(&[
            "api-resources",
            "--api-group=networking.k8s.io",
            "-o",
            "name",
        ])?
        .expect_ok("api-resources")?;
    ensure!(
        res.stdout.contains("ingresses.networking.k8s.io"),
        "{}",
        res.stdout
    );

    let pod = |name: &str, class: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  priorityClassName: {class}\n  containers: [{{name: c, image: module:x}}]\n")
    };
    up.kubectl_in(&["apply", "-f", "-"], &pod("urgent", "high"))?
        .expect_ok("pod with a class")?;
    let p = up
        .kubectl(&[
            "get",
            "pod",
            "urgent",
            "-o",
            "jsonpath={.spec.priority} {.spec.preemptionPolicy}",
        ])?
        .expect_ok("get pod")?;
    ensure!(p.stdout == "1000 Never", "{}", p.stdout);
    let refused = up
        .kubectl_in(&["apply", "-f", "-"], &pod("lost", "nonesuch"))?
        .expect_err("pod naming a missing class")?;
    ensure!(
        refused
            .stderr
            .contains("no PriorityClass with name nonesuch was found"),
        "{}",
        refused.stderr
    );
    Ok(())
}

const LIMITS: &str = r#"
apiVersion: v1
kind: LimitRange
metadata: {name: team-limits}
spec:
  limits:
  - type: Container
    default: {memory: 64Mi}
    defaultRequest: {cpu: 100m}
    max: {memory: 256Mi}
---
apiVersion: v1
kind: ResourceQuota
metadata: {name: team-quota}
spec:
  hard: {pods: "2", requests.cpu: "1", limits.memory: 1Gi, count/configmaps: "5", services.nodeports: "1"}
"#;

#[test]
fn quotas_and_limit_ranges() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    up.kubectl(&["create", "namespace", "team"])?
        .expect_ok("namespace")?;
    up.kubectl_in(&["apply", "-n", "team", "-f", "-"], LIMITS)?
        .expect_ok("apply limits")?;
    // The LimitRange fills in what a container leaves out.
    up.kubectl(&["-n", "team", "run", "a", "--image=busybox"])?
        .expect_ok("run a")?;
    let res = up
        .kubectl(&[
            "-n",
            "team",
            "get",
            "pod",
            "a",
            "-o",
            "jsonpath={.spec.containers[0].resources}",
        ])?
        .expect_ok("resources")?;
    let res = json(&res.stdout)?;
    ensure!(
        res["limits"]["memory"] == "64Mi" && res["requests"]["cpu"] == "100m",
        "{res}"
    );
    // And refuses what passes its bounds.
    let big = up
        .kubectl(&[
            "-n",
            "team",
            "run",
            "big",
            "--image=busybox",
            "--overrides",
            r#"{"spec":{"containers":[{"name":"big","image":"busybox","resources":{"limits":{"memory":"1Gi"}}}]}}"#,
        ])?
        .expect_err("run big")?;
    ensure!(
        big.stderr.contains(
            "pods \"big\" is forbidden: maximum memory usage per Container is 256Mi, but limit is 1Gi"
        ),
        "{}",
        big.stderr
    );
    // A server-side apply creates through the same admission.
    let applied = up
        .kubectl_in(
            &["apply", "--server-side", "-n", "team", "-f", "-"],
            "apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers:\n  - {name: big, image: busybox, resources: {limits: {memory: 1Gi}}}\n",
        )?
        .expect_err("server-side apply big")?;
    ensure!(
        applied
            .stderr
            .contains("maximum memory usage per Container is 256Mi, but limit is 1Gi"),
        "{}",
        applied.stderr
    );
    // The quota counts as it admits: the third pod is one too many.
    up.kubectl(&["-n", "team", "run", "b", "--image=busybox"])?
        .expect_ok("run b")?;
    let c = up
        .kubectl(&["-n", "team", "run", "c", "--image=busybox"])?
        .expect_err("run c")?;
    ensure!(
        c.stderr.contains(
            "exceeded quota: team-quota, requested: pods=1, used: pods=2, limited: pods=2"
        ),
        "{}",
        c.stderr
    );
    let table = up
        .kubectl(&["-n", "team", "get", "quota", "--no-headers"])?
        .expect_ok("get quota")?;
    ensure!(
        table.stdout.contains("pods: 2/2")
            && table.stdout.contains("requests.cpu: 200m/1")
            && table.stdout.contains("limits.memory: 128Mi/1Gi"),
        "{}",
        table.stdout
    );
    // A delete is given back by the quota controller; then there is room again.
    up.kubectl(&["-n", "team", "delete", "pod", "a", "--wait=false"])?
        .expect_ok("delete a")?;
    up.wait_field(
        30,
        &["-n", "team", "quota", "team-quota"],
        "{.status.used.pods}",
        |u| u == "1",
    )?;
    up.kubectl(&["-n", "team", "run", "c", "--image=busybox"])?
        .expect_ok("run c again")?;
    let d = up
        .kubectl(&["describe", "namespace", "team"])?
        .expect_ok("describe namespace")?;
    ensure!(
        d.stdout.contains("team-quota")
            && d.stdout.contains("count/configmaps")
            && d.stdout.contains("Resource Limits"),
        "{}",
        d.stdout
    );
    // The namespace's admin works in it but cannot lift its caps, not even by granting
    // itself more: RBAC's escalation check.
    up.kubectl(&[
        "-n",
        "team",
        "create",
        "rolebinding",
        "lead",
        "--clusterrole=admin",
        "--user=lead",
    ])?
    .expect_ok("admin binding")?;
    let lead = |args: &[&str]| {
        let mut a = vec!["-n", "team", "--as=lead"];
        a.extend_from_slice(args);
        up.kubectl(&a)
    };
    lead(&[
        "create",
        "rolebinding",
        "helper",
        "--clusterrole=edit",
        "--user=helper",
    ])?
    .expect_ok("lead grants edit")?;
    lead(&[
        "patch",
        "quota",
        "team-quota",
        "-p",
        r#"{"spec":{"hard":{"pods":"100"}}}"#,
    ])?
    .expect_err("lead raises the quota")?;
    for grab in [
        vec![
            "create",
            "rolebinding",
            "grab",
            "--clusterrole=cluster-admin",
            "--user=lead",
        ],
        vec![
            "create",
            "role",
            "quotas",
            "--verb=update",
            "--resource=resourcequotas",
        ],
    ] {
        let e = lead(&grab)?.expect_err("escalation")?;
        ensure!(
            e.stderr
                .contains("is attempting to grant RBAC permissions not currently held"),
            "{}",
            e.stderr
        );
    }
    // An update that uses more is counted too: a Service turned NodePort.
    up.kubectl(&[
        "-n",
        "team",
        "create",
        "service",
        "clusterip",
        "s",
        "--tcp=80,443",
    ])?
    .expect_ok("create service")?;
    up
        .kubectl(&[
            "-n",
            "team",
            "patch",
            "service",
            "s",
            "-p",
            r#"{"spec":{"type":"NodePort"}}"#,
        ])?
        .expect_refusal("patch to NodePort", "exceeded quota: team-quota, requested: services.nodeports=2, used: services.nodeports=0, limited: services.nodeports=1")?;
    // A pod made by server-side apply is admitted whole: it has its QoS class too.
    up.kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: qos}\nspec:\n  containers:\n  - {name: c, image: busybox, resources: {limits: {memory: 64Mi}}}\n",
    )?
    .expect_ok("server-side apply qos")?;
    let qos = up
        .kubectl(&["get", "pod", "qos", "-o", "jsonpath={.status.qosClass}"])?
        .expect_ok("qos class")?;
    ensure!(qos.stdout == "Burstable", "{}", qos.stdout);
    Ok(())
}

const CRONTAB_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: crontabs.stable.example.com
spec:
  group: stable.example.com
  scope: Namespaced
  names: {plural: crontabs, kind: CronTab, listKind: CronTabCollection, shortNames: [ct], categories: [all]}
  versions:
  - name: v1beta1
    served: true
    storage: false
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [cronSpec]
            properties:
              cronSpec: {type: string, description: When it runs.}
              image: {type: string}
              replicas: {type: integer, minimum: 1, default: 1}
          status:
            type: object
            properties:
              replicas: {type: integer}
              selector: {type: string}
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas, labelSelectorPath: .status.selector}
    selectableFields: [{jsonPath: .spec.image}]
    additionalPrinterColumns:
    - {name: Spec, type: string, jsonPath: .spec.cronSpec}
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
"#;

const CRONTAB: &str = r#"
apiVersion: stable.example.com/v1
kind: CronTab
metadata: {name: nightly}
spec: {cronSpec: "0 3 * * *", image: backup:1}
"#;

#[test]
fn custom_resources() -> anyhow::Result<()> {
    let (_d, mut up) = up()?;
    up.kubectl_in(&["apply", "-f", "-"], CRONTAB_CRD)?
        .expect_ok("apply the CRD")?;
    up.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=20s",
        "crd/crontabs.stable.example.com",
    ])?
    .expect_ok("established")?;
    up.kubectl_in(&["apply", "-f", "-"], CRONTAB)?
        .expect_ok("apply a CronTab")?;
    // Printed with the CRD's columns, found by its short name; defaults filled in.
    let t = up.kubectl(&["get", "ct"])?.expect_ok("get ct")?;
    let head: Vec<&str> = t
        .stdout
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(head == ["NAME", "SPEC", "REPLICAS", "AGE"], "{}", t.stdout);
    ensure!(
        t.stdout.contains("nightly") && t.stdout.contains("0 3 * * *"),
        "{}",
        t.stdout
    );
    let o = json(
        &up.kubectl(&["get", "crontab", "nightly", "-o", "json"])?
            .expect_ok("get")?
            .stdout,
    )?;
    ensure!(
        o["spec"]["replicas"] == 1 && o["metadata"]["generation"] == 1,
        "{o}"
    );
    ensure!(
        up.kubectl_in(&["apply", "-f", "-"], CRONTAB)?
            .expect_ok("again")?
            .stdout
            .contains("unchanged"),
        "a second apply changed something"
    );
    // Unknown fields are refused under kubectl's strict validation, bad values field by field.
    let bad = CRONTAB.replace("image: backup:1", "image: backup:1, colour: red");
    let e = up
        .kubectl_in(&["apply", "-f", "-"], &bad)?
        .expect_err("unknown field")?;
    ensure!(
        e.stderr
            .contains("strict decoding error: unknown field \"spec.colour\""),
        "{}",
        e.stderr
    );
    let bad = "apiVersion: stable.example.com/v1\nkind: CronTab\nmetadata: {name: bad}\nspec: {cronSpec: 5, replicas: 0}\n";
    let e = up
        .kubectl_in(&["create", "-f", "-"], bad)?
        .expect_err("bad values")?;
    ensure!(
        e.stderr.contains("spec.cronSpec: Invalid value: \"integer\": spec.cronSpec in body must be of type string")
            && e.stderr.contains("spec.replicas in body should be greater than or equal to 1"),
        "{}",
        e.stderr
    );
    up
        .kubectl_in(&["create", "-f", "-"], "apiVersion: stable.example.com/v1\nkind: CronTab\nmetadata: {name: bad}\nspec: {image: x}\n")?
        .expect_refusal("required", "spec.cronSpec: Required value")?;
    // The scale and status subresources, at the CRD's paths.
    up.kubectl(&["scale", "ct", "nightly", "--replicas=3"])?
        .expect_ok("scale")?;
    up.kubectl(&[
        "patch",
        "ct",
        "nightly",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":3,"selector":"app=backup"}}"#,
    ])?
    .expect_ok("status")?;
    let scale = json(
        &up.kubectl(&["get", "ct", "nightly", "--subresource=scale", "-o", "json"])?
            .expect_ok("get scale")?
            .stdout,
    )?;
    ensure!(
        scale["spec"]["replicas"] == 3 && scale["status"]["selector"] == "app=backup",
        "{scale}"
    );
    // A main-resource write leaves the status alone.
    up.kubectl(&[
        "patch",
        "ct",
        "nightly",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":9}}"#,
    ])?
    .expect_ok("patch status through the main resource")?;
    let st = up
        .kubectl(&["get", "ct", "nightly", "-o", "jsonpath={.status.replicas}"])?
        .expect_ok("status")?;
    ensure!(st.stdout == "3", "{}", st.stdout);
    // The other served version is the same object with its own apiVersion.
    let av = up
        .kubectl(&[
            "get",
            "crontabs.v1beta1.stable.example.com",
            "nightly",
            "-o",
            "jsonpath={.apiVersion}",
        ])?
        .expect_ok("v1beta1")?;
    ensure!(av.stdout == "stable.example.com/v1beta1", "{}", av.stdout);
    // Lists are of the CRD's listKind, in the version asked for.
    for (v, want) in [("v1", "v1"), ("v1beta1", "v1beta1")] {
        let list = json(
            &up.kubectl(&[
                "get",
                "--raw",
                &format!("/apis/stable.example.com/{v}/namespaces/default/crontabs"),
            ])?
            .expect_ok("raw list")?
            .stdout,
        )?;
        ensure!(
            list["kind"] == "CronTabCollection"
                && list["apiVersion"] == format!("stable.example.com/{want}").as_str()
                && list["items"][0]["apiVersion"] == format!("stable.example.com/{want}").as_str(),
            "{list}"
        );
    }
    // Written through it, an object meets that version's schema (which keeps anything), and
    // is stored as the storage version has it.
    up.kubectl_in(
        &["create", "-f", "-"],
        "apiVersion: stable.example.com/v1beta1\nkind: CronTab\nmetadata: {name: old}\nspec: {cronSpec: '@daily', colour: red}\n",
    )?
    .expect_ok("create through v1beta1")?;
    let old = json(
        &up.kubectl(&["get", "ct", "old", "-o", "json"])?
            .expect_ok("get old")?
            .stdout,
    )?;
    ensure!(
        old["apiVersion"] == "stable.example.com/v1"
            && old["spec"] == serde_json::json!({"cronSpec": "@daily", "replicas": 1}),
        "{old}"
    );
    up.kubectl(&["delete", "ct", "old"])?
        .expect_ok("delete old")?;
    // A selectable field picks by value; another is refused as Kubernetes refuses it.
    let picked = up
        .kubectl(&[
            "get",
            "ct",
            "--field-selector",
            "spec.image=backup:1",
            "-o",
            "name",
        ])?
        .expect_ok("selectable field")?;
    ensure!(
        picked.stdout.trim() == "crontab.stable.example.com/nightly",
        "{}",
        picked.stdout
    );
    let none = up
        .kubectl(&[
            "get",
            "ct",
            "--field-selector",
            "spec.image=other",
            "-o",
            "name",
        ])?
        .expect_ok("selectable field, no match")?;
    ensure!(none.stdout.trim().is_empty(), "{}", none.stdout);
    let e = up
        .kubectl(&["get", "ct", "--field-selector", "spec.cronSpec=x"])?
        .expect_err("not selectable")?;
    ensure!(
        e.stderr
            .contains("field label not supported: spec.cronSpec"),
        "{}",
        e.stderr
    );
    let explain = up
        .kubectl(&["explain", "crontab.spec.cronSpec"])?
        .expect_ok("explain")?;
    ensure!(
        explain.stdout.contains("When it runs."),
        "{}",
        explain.stdout
    );
    let explain = up
        .kubectl(&["explain", "crontab.metadata.labels"])?
        .expect_ok("explain metadata")?;
    ensure!(
        explain.stdout.contains("map[string]string"),
        "{}",
        explain.stdout
    );
    let all = up.kubectl(&["get", "all"])?.expect_ok("get all")?;
    ensure!(
        all.stdout.contains("crontab.stable.example.com/nightly"),
        "{}",
        all.stdout
    );
    // kubectl 1.27 reads only OpenAPI v2, and still applies.
    up.kubectl_v_in(
        "1.27",
        &["apply", "-f", "-"],
        &CRONTAB.replace("nightly", "hourly"),
    )?
    .expect_ok("kubectl 1.27 apply")?;
    // A second CRD claiming the same kind is not established.
    let clash = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: crontabz.stable.example.com}\nspec:\n  group: stable.example.com\n  scope: Namespaced\n  names: {plural: crontabz, kind: CronTab}\n  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object}}}]\n";
    up.kubectl_in(&["create", "-f", "-"], clash)?
        .expect_ok("clashing CRD")?;
    let cond = up
        .kubectl(&[
            "get",
            "crd",
            "crontabz.stable.example.com",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"NamesAccepted\")].message}",
        ])?
        .expect_ok("clash status")?;
    ensure!(
        cond.stdout.contains("\"CronTab\" is already in use"),
        "{}",
        cond.stdout
    );
    let e = up
        .kubectl_in(&["create", "-f", "-"], "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: x.example.com}\nspec: {group: example.com, scope: Planet, names: {plural: things, kind: Thing}, versions: [{name: v1, served: true, storage: true}]}\n")?
        .expect_err("bad CRD")?;
    ensure!(
        e.stderr.contains("metadata.name: Invalid value: \"x.example.com\": must be spec.names.plural+\".\"+spec.group")
            && e.stderr.contains("spec.scope: Unsupported value: \"Planet\"")
            && e.stderr.contains("spec.versions[0].schema.openAPIV3Schema: Required value"),
        "{}",
        e.stderr
    );
    // A ClusterRole labelled to join edit extends edit, and admin through it, to the CRD's
    // objects, as an operator's chart does; view still shows no Secrets.
    let can = |user: &str, what: &[&str]| -> anyhow::Result<String> {
        let mut a = vec!["auth", "can-i", "-n", "default"];
        a.extend_from_slice(what);
        let who = format!("--as={user}");
        a.push(&who);
        Ok(up.kubectl(&a)?.stdout.trim().to_string())
    };
    for (b, role) in [("lead", "admin"), ("viewer", "view")] {
        up.kubectl(&[
            "create",
            "rolebinding",
            b,
            &format!("--clusterrole={role}"),
            &format!("--user={b}"),
        ])?
        .expect_ok("rolebinding")?;
    }
    ensure!(can("lead", &["create", "crontabs"])? == "no");
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: crontab-edit\n  labels: {rbac.authorization.k8s.io/aggregate-to-edit: \"true\"}\nrules: [{apiGroups: [stable.example.com], resources: [crontabs], verbs: [\"*\"]}]\n",
    )?
    .expect_ok("aggregated role")?;
    until(10, "admin aggregates the CRD's role", || {
        Ok(can("lead", &["create", "crontabs"])? == "yes")
    })?;
    ensure!(can("viewer", &["get", "crontabs"])? == "no");
    ensure!(
        can("viewer", &["get", "secrets"])? == "no" && can("viewer", &["get", "pods"])? == "yes"
    );
    up.kubectl(&["delete", "clusterrole", "crontab-edit"])?
        .expect_ok("delete role")?;
    until(10, "admin loses it again", || {
        Ok(can("lead", &["create", "crontabs"])? == "no")
    })?;
    // Only full authority may make an aggregated role: it would take the rules of any role
    // it selects (cluster-admin's among them).
    up.kubectl(&[
        "create",
        "clusterrole",
        "role-maker",
        "--verb=create",
        "--resource=clusterroles",
    ])?
    .expect_ok("role-maker")?;
    up.kubectl(&[
        "create",
        "clusterrolebinding",
        "maker",
        "--clusterrole=role-maker",
        "--user=maker",
    ])?
    .expect_ok("maker binding")?;
    let grab = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: grab}\naggregationRule:\n  clusterRoleSelectors: [{matchLabels: {kubernetes.io/bootstrapping: rbac-defaults}}]\nrules: []\n";
    let e = up
        .kubectl_in(&["create", "-f", "-", "--as=maker"], grab)?
        .expect_err("aggregated role by a non-admin")?;
    ensure!(
        e.stderr
            .contains("must have cluster-admin privileges to use the aggregationRule"),
        "{}",
        e.stderr
    );
    // Quotas count a CRD's objects by `count/PLURAL.GROUP`.
    up.kubectl(&["create", "namespace", "q"])?
        .expect_ok("namespace")?;
    up.kubectl(&[
        "-n",
        "q",
        "create",
        "quota",
        "cq",
        "--hard=count/crontabs.stable.example.com=1",
    ])?
    .expect_ok("quota")?;
    up.kubectl_in(&["-n", "q", "create", "-f", "-"], CRONTAB)?
        .expect_ok("first in q")?;
    let e = up
        .kubectl_in(
            &["-n", "q", "create", "-f", "-"],
            &CRONTAB.replace("nightly", "second"),
        )?
        .expect_err("second in q")?;
    ensure!(
        e.stderr
            .contains("crontabs.stable.example.com \"second\" is forbidden: exceeded quota: cq"),
        "{}",
        e.stderr
    );
    up.kubectl(&["delete", "namespace", "q"])?
        .expect_ok("delete q")?;
    // Served again after a restart, before anything is asked of the CRDs.
    up.restart()?;
    let got = up
        .kubectl(&["get", "ct", "-o", "name"])?
        .expect_ok("after restart")?;
    ensure!(
        got.stdout.lines().collect::<Vec<_>>()
            == [
                "crontab.stable.example.com/hourly",
                "crontab.stable.example.com/nightly"
            ],
        "{}",
        got.stdout
    );
    // Deleting the CRD deletes its objects, and frees its names: the CRD that waited for
    // them takes them. Made again, the first has no objects.
    up.kubectl(&[
        "delete",
        "crd",
        "crontabs.stable.example.com",
        "--timeout=30s",
    ])?
    .expect_ok("delete the CRD")?;
    up.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=20s",
        "crd/crontabz.stable.example.com",
    ])?
    .expect_ok("the waiting CRD established")?;
    up.kubectl(&[
        "delete",
        "crd",
        "crontabz.stable.example.com",
        "--timeout=30s",
    ])?
    .expect_ok("delete the second CRD")?;
    up.kubectl_in(&["apply", "-f", "-"], CRONTAB_CRD)?
        .expect_ok("apply the CRD again")?;
    up.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=20s",
        "crd/crontabs.stable.example.com",
    ])?
    .expect_ok("established again")?;
    let none = up
        .kubectl(&["get", "ct", "-A", "-o", "name"])?
        .expect_ok("empty")?;
    ensure!(none.stdout.trim().is_empty(), "{}", none.stdout);
    Ok(())
}

/// A webhook configuration of `kind` named `name` calling `url` for ConfigMaps (`configmaps/*`
/// covers the resource itself too) and execs in namespaces labelled `hooked: "yes"`.
fn webhook_config(kind: &str, name: &str, url: &str, ca: &str, policy: &str) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: {kind}
metadata: {{name: {name}}}
webhooks:
- name: {name}
  clientConfig: {{url: "{url}", caBundle: "{ca}"}}
  rules:
  - {{operations: ["CREATE", "UPDATE", "DELETE"], apiGroups: [""], apiVersions: ["v1"], resources: ["configmaps/*"]}}
  - {{operations: ["CONNECT"], apiGroups: [""], apiVersions: ["v1"], resources: ["pods/exec"]}}
  namespaceSelector: {{matchLabels: {{hooked: "yes"}}}}
  failurePolicy: {policy}
  sideEffects: None
  admissionReviewVersions: ["v1"]
"#
    )
}

#[test]
fn admission_webhooks() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    let hookd = outpost_tests::hookd::Hookd::start("127.0.0.1")?;
    let base = format!("https://{}", hookd.addr);
    up.kubectl(&["create", "namespace", "hooked"])?
        .expect_ok("namespace")?;
    up.kubectl(&["label", "namespace", "hooked", "hooked=yes"])?
        .expect_ok("label")?;
    let validating = webhook_config(
        "ValidatingWebhookConfiguration",
        "deny.hooks.outpost.test",
        &format!("{base}/validate"),
        &hookd.ca_bundle,
        "Fail",
    );
    let mutating = webhook_config(
        "MutatingWebhookConfiguration",
        "label.hooks.outpost.test",
        &format!("{base}/mutate"),
        &hookd.ca_bundle,
        "Fail",
    );
    up.kubectl_in(&["apply", "-f", "-"], &format!("{validating}---{mutating}"))?
        .expect_ok("apply the webhooks")?;
    let t = up
        .kubectl(&["get", "validatingwebhookconfigurations"])?
        .expect_ok("get")?;
    ensure!(
        t.stdout.contains("WEBHOOKS") && t.stdout.contains("deny.hooks.outpost.test"),
        "{}",
        t.stdout
    );
    let o = json(
        &up.kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            "label.hooks.outpost.test",
            "-o",
            "json",
        ])?
        .expect_ok("get")?
        .stdout,
    )?;
    // Defaults as kube-apiserver fills them in.
    let w = &o["webhooks"][0];
    ensure!(
        w["timeoutSeconds"] == 10
            && w["matchPolicy"] == "Equivalent"
            && w["reinvocationPolicy"] == "Never"
            && w["objectSelector"] == serde_json::json!({})
            && w["rules"][0]["scope"] == "*",
        "{w}"
    );

    // The mutating webhook labels what it sees (with a warning kubectl prints); the
    // validating one refuses a label.
    let a = up
        .kubectl(&[
            "create",
            "configmap",
            "a",
            "-n",
            "hooked",
            "--from-literal=k=v",
        ])?
        .expect_ok("create a")?;
    ensure!(
        a.stderr.contains("Warning: labelled by hookd"),
        "{}",
        a.stderr
    );
    let a = json(
        &up.kubectl(&["get", "cm", "a", "-n", "hooked", "-o", "json"])?
            .expect_ok("get a")?
            .stdout,
    )?;
    ensure!(a["metadata"]["labels"]["hook/mutated"] == "yes", "{a}");
    let denied = up
        .kubectl_in(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, namespace: hooked, labels: {hook/deny: x}}\n",
        )?
        .expect_err("a denied create")?;
    ensure!(
        denied.stderr.contains(
            "admission webhook \"deny.hooks.outpost.test\" denied the request: label hook/deny is set"
        ),
        "{}",
        denied.stderr
    );
    let b = up
        .kubectl(&[
            "get",
            "cm",
            "b",
            "-n",
            "hooked",
            "--ignore-not-found",
            "-o",
            "name",
        ])?
        .expect_ok("get b")?;
    ensure!(b.stdout.trim().is_empty(), "a denied object was stored");
    // Updates and deletes go through them too; dry runs as well.
    up.kubectl(&["label", "cm", "a", "-n", "hooked", "hook/deny=x"])?
        .expect_err("a denied update")?;
    up.kubectl(&["label", "cm", "a", "-n", "hooked", "hook/keep=x"])?
        .expect_ok("label keep")?;
    up.kubectl(&["delete", "cm", "a", "-n", "hooked", "--dry-run=server"])?
        .expect_refusal("a denied delete", "this object is kept")?;
    up.kubectl(&["label", "cm", "a", "-n", "hooked", "hook/keep-"])?
        .expect_ok("unlabel keep")?;
    // An exec is a CONNECT, its options the object.
    up.kubectl(&["run", "shell", "-n", "hooked", "--image=busybox"])?
        .expect_ok("a pod")?;
    let exec = up
        .kubectl(&["exec", "shell", "-n", "hooked", "--", "rm", "-rf", "/"])?
        .expect_err("a refused exec")?;
    ensure!(
        exec.stderr
            .contains("denied the request: exec of rm is not allowed"),
        "{}",
        exec.stderr
    );
    // Outside the selected namespaces nothing is called.
    up.kubectl(&["create", "configmap", "c", "--from-literal=k=v"])?
        .expect_ok("create c")?;
    let c = json(
        &up.kubectl(&["get", "cm", "c", "-o", "json"])?
            .expect_ok("get c")?
            .stdout,
    )?;
    ensure!(c["metadata"]["labels"].is_null(), "{c}");

    // A bad configuration is refused field by field.
    let bad = up
        .kubectl_in(
            &["apply", "-f", "-"],
            &webhook_config(
                "ValidatingWebhookConfiguration",
                "bad",
                "http://127.0.0.1:1/x",
                "",
                "Sometimes",
            ),
        )?
        .expect_err("a bad configuration")?;
    for want in [
        "webhooks[0].name",
        "webhooks[0].failurePolicy",
        "'https' is the only allowed URL scheme",
    ] {
        ensure!(bad.stderr.contains(want), "{want}: {}", bad.stderr);
    }

    // An unreachable webhook refuses under failurePolicy Fail and is passed under Ignore.
    drop(hookd);
    let failed = up
        .kubectl(&["create", "configmap", "d", "-n", "hooked"])?
        .expect_err("an unreachable webhook")?;
    ensure!(
        failed
            .stderr
            .contains("failed calling webhook \"label.hooks.outpost.test\""),
        "{}",
        failed.stderr
    );
    for kind in [
        "validatingwebhookconfiguration/deny.hooks.outpost.test",
        "mutatingwebhookconfiguration/label.hooks.outpost.test",
    ] {
        up.kubectl(&[
            "patch",
            kind,
            "--type=json",
            "-p",
            r#"[{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]"#,
        ])?
        .expect_ok("failurePolicy Ignore")?;
    }
    up.kubectl(&["create", "configmap", "d", "-n", "hooked"])?
        .expect_ok("create past an ignored webhook")?;
    // Only full authority configures webhooks: not admin, even bound cluster-wide.
    up.kubectl(&[
        "create",
        "clusterrolebinding",
        "ops",
        "--clusterrole=admin",
        "--user=ops",
    ])?
    .expect_ok("bind admin")?;
    let can = |what: &str| -> anyhow::Result<String> {
        Ok(up
            .kubectl(&["auth", "can-i", "create", what, "--as=ops"])?
            .stdout
            .trim()
            .to_string())
    };
    ensure!(can("validatingwebhookconfigurations")? == "no");
    ensure!(can("mutatingwebhookconfigurations")? == "no");
    ensure!(can("configmaps")? == "yes");
    // Gone, they are called no more.
    up.kubectl(&[
        "delete",
        "validatingwebhookconfigurations,mutatingwebhookconfigurations",
        "--all",
    ])?
    .expect_ok("delete the webhooks")?;
    up.kubectl(&["create", "configmap", "e", "-n", "hooked"])?
        .expect_ok("create e")?;
    Ok(())
}

#[test]
fn refusals_and_details_as_in_kubernetes() -> anyhow::Result<()> {
    let (_d, up) = up()?;
    // The namespaces the cluster needs stay.
    let r = up
        .kubectl(&["delete", "namespace", "default"])?
        .expect_err("delete default")?;
    ensure!(
        r.stderr
            .contains("namespaces \"default\" is forbidden: this namespace may not be deleted"),
        "{}",
        r.stderr
    );
    // kube-apiserver's wording for a refusal by RBAC.
    let r = up
        .kubectl(&["get", "pods", "--as=nobody"])?
        .expect_err("nobody lists pods")?;
    ensure!(
        r.stderr.contains(
            "pods is forbidden: User \"nobody\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        r.stderr
    );
    // A Service's one unnamed port: its EndpointSlice names it "", which describe needs.
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: plain}\nspec:\n  selector: {app: plain}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?
    .expect_ok("a Service")?;
    up.wait_field(
        20,
        &["endpointslices", "-l", "kubernetes.io/service-name=plain"],
        "{.items[0].ports[0].port}",
        |s| s == "8080",
    )?;
    let name = up
        .kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=plain",
            "-o",
            "json",
        ])?
        .expect_ok("slices")?;
    ensure!(
        json(&name.stdout)?["items"][0]["ports"][0]["name"] == "",
        "{}",
        name.stdout
    );
    up.kubectl(&["describe", "service", "plain"])?
        .expect_ok("describe")?;
    // Node ports: in range, and not taken twice.
    let r = up
        .kubectl(&[
            "create",
            "service",
            "nodeport",
            "low",
            "--tcp=80",
            "--node-port=80",
        ])?
        .expect_err("a node port out of range")?;
    ensure!(
        r.stderr
            .contains("spec.ports[0].nodePort: Invalid value: \"80\": provided port is not in the valid range"),
        "{}",
        r.stderr
    );
    up.kubectl(&[
        "create",
        "service",
        "nodeport",
        "np1",
        "--tcp=80",
        "--node-port=30080",
    ])?
    .expect_ok("a node port")?;
    up.kubectl(&[
        "create",
        "service",
        "nodeport",
        "np2",
        "--tcp=80",
        "--node-port=30080",
    ])?
    .expect_refusal("a taken node port", "provided port is already allocated")?;
    // Fields that may not change.
    let ip = up
        .kubectl(&["get", "svc", "plain", "-o", "jsonpath={.spec.clusterIP}"])?
        .expect_ok("ip")?
        .stdout;
    let other = if ip.trim() == "10.96.0.99" {
        "10.96.0.98"
    } else {
        "10.96.0.99"
    };
    up.kubectl(&[
        "patch",
        "svc",
        "plain",
        "-p",
        &format!(r#"{{"spec":{{"clusterIP":"{other}"}}}}"#),
    ])?
    .expect_refusal("a new cluster IP", "may not change once set")?;
    up.kubectl(&["create", "configmap", "frozen", "--from-literal=k=v"])?
        .expect_ok("configmap")?;
    up.kubectl(&["patch", "cm", "frozen", "-p", r#"{"immutable":true}"#])?
        .expect_ok("immutable")?;
    let r = up
        .kubectl(&["patch", "cm", "frozen", "-p", r#"{"data":{"k":"x"}}"#])?
        .expect_err("data of an immutable ConfigMap")?;
    ensure!(
        r.stderr
            .contains("field is immutable when `immutable` is set"),
        "{}",
        r.stderr
    );
    up.kubectl_in(&["apply", "-f", "-"], DEPLOY)?
        .expect_ok("deployment")?;
    let r = up
        .kubectl(&[
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"selector":{"matchLabels":{"app":"x"}},"template":{"metadata":{"labels":{"app":"x"}}}}}"#,
        ])?
        .expect_err("a new selector")?;
    ensure!(
        r.stderr.contains("spec.selector") && r.stderr.contains("field is immutable"),
        "{}",
        r.stderr
    );
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  serviceName: db\n  replicas: 0\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: c, image: \"module:hello\"}]}\n",
    )?
    .expect_ok("a StatefulSet")?;
    up.kubectl(&["scale", "statefulset", "db", "--replicas=0"])?
        .expect_ok("scale")?;
    let r = up
        .kubectl(&[
            "patch",
            "statefulset",
            "db",
            "-p",
            r#"{"spec":{"serviceName":"other"}}"#,
        ])?
        .expect_err("a new service name")?;
    ensure!(
        r.stderr
            .contains("updates to statefulset spec for fields other than"),
        "{}",
        r.stderr
    );
    // The change cause goes to the ReplicaSet, so rollout history shows it.
    up.kubectl(&[
        "annotate",
        "deploy",
        "web",
        "kubernetes.io/change-cause=nginx 1.26",
    ])?
    .expect_ok("annotate")?;
    up.kubectl(&["set", "image", "deploy/web", "nginx=nginx:1.26"])?
        .expect_ok("set image")?;
    let t = Instant::now();
    loop {
        let h = up
            .kubectl(&["rollout", "history", "deploy/web"])?
            .expect_ok("history")?;
        if h.stdout.contains("nginx 1.26") {
            break;
        }
        ensure!(t.elapsed() < Duration::from_secs(20), "{}", h.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    // A NoExecute taint evicts the pods that do not tolerate it.
    let node = up
        .kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"])?
        .expect_ok("node")?
        .stdout;
    up.kubectl(&["run", "goes", "--image=module:hello"])?
        .expect_ok("goes")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: stays}\nspec:\n  tolerations: [{key: maint, operator: Exists}]\n  containers: [{name: c, image: \"module:hello\"}]\n",
    )?
    .expect_ok("stays")?;
    for p in ["goes", "stays"] {
        up.wait_field(20, &["pod", p], "{.spec.nodeName}", |s| !s.is_empty())?;
    }
    up.kubectl(&["taint", "nodes", &node, "maint=now:NoExecute"])?
        .expect_ok("taint")?;
    until(20, "the untolerating pod evicted", || gone(&up, "pod/goes"))?;
    ensure!(!gone(&up, "pod/stays")?, "a tolerating pod was evicted");
    up.kubectl(&["taint", "nodes", &node, "maint-"])?
        .expect_ok("untaint")?;
    // The proxy never leads to the control plane's own loopback, whatever a slice says.
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: loop}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: loop-1, labels: {kubernetes.io/service-name: loop}}\naddressType: IPv4\nports: [{name: \"\", port: 7481}]\nendpoints: [{addresses: [127.0.0.1]}]\n",
    )?
    .expect_ok("a slice to loopback")?;
    up.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/services/loop:80/proxy/",
    ])?
    .expect_refusal("a proxy to loopback", "not permitted")?;
    // Wide events show where they came from and how often.
    let ev = up
        .kubectl(&["get", "events", "-o", "wide"])?
        .expect_ok("events")?;
    let head = ev.stdout.lines().next().unwrap_or("");
    for col in ["SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"] {
        ensure!(head.contains(col), "{col}: {head}");
    }
    Ok(())
}

#[test]
fn token_secrets_and_reviews_for_other_users() -> anyhow::Result<()> {
    let (d, up) = up()?;
    up.kubectl(&["create", "serviceaccount", "robot"])?
        .expect_ok("sa")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: robot-token\n  annotations: {kubernetes.io/service-account.name: robot}\ntype: kubernetes.io/service-account-token\n",
    )?
    .expect_ok("token secret")?;
    // Filled in as the token controller does: token, CA, namespace.
    let b64 = up.wait_field(20, &["secret", "robot-token"], "{.data.token}", |s| {
        !s.is_empty()
    })?;
    let s = json(
        &up.kubectl(&["get", "secret", "robot-token", "-o", "json"])?
            .expect_ok("get")?
            .stdout,
    )?;
    ensure!(
        !s["data"]["ca.crt"].is_null() && s["data"]["namespace"] == "ZGVmYXVsdA==",
        "{s}"
    );
    let token = {
        use base64::Engine;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim())?)?
    };
    let cfg = d.path().join("robot");
    token_kubeconfig(&up, &cfg, &token)?;
    let cache = d.path().join("robot-cache");
    let kb = kubectl_bin(None)?;
    let robot = |args: &[&str]| kubectl_with(&kb, &cfg, &cache, args, None);
    let who = robot(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ])?
    .expect_ok("whoami")?;
    ensure!(
        who.stdout == "system:serviceaccount:default:robot",
        "{}",
        who.stdout
    );
    // A service account reads how to check its token: the issuer's discovery and keys.
    let oidc = json(
        &robot(&["get", "--raw", "/.well-known/openid-configuration"])?
            .expect_ok("issuer discovery")?
            .stdout,
    )?;
    ensure!(
        oidc["issuer"] == "https://kubernetes.default.svc.cluster.local"
            && oidc["jwks_uri"]
                .as_str()
                .is_some_and(|u| u.ends_with("/openid/v1/jwks")),
        "{oidc}"
    );
    let keys = json(
        &robot(&["get", "--raw", "/openid/v1/jwks"])?
            .expect_ok("issuer keys")?
            .stdout,
    )?;
    ensure!(keys["keys"][0]["kty"] == "EC", "{keys}");

    // TokenReview and SubjectAccessReview: RBAC decides who may ask. (kubectl's own
    // validation of a review kind lists CRDs, which this user may not: skipped, as it must be
    // against any Kubernetes.)
    let review = format!(
        "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec: {{token: {token}}}\n"
    );
    let r = kubectl_with(
        &kb,
        &cfg,
        &cache,
        &["create", "--validate=false", "-f", "-", "-o", "json"],
        Some(&review),
    )?
    .expect_err("a review without rights")?;
    ensure!(r.stderr.contains("tokenreviews"), "{}", r.stderr);
    up.kubectl(&[
        "create",
        "clusterrolebinding",
        "robot-delegator",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=default:robot",
    ])?
    .expect_ok("bind")?;
    let t = Instant::now();
    let answer = loop {
        let r = kubectl_with(
            &kb,
            &cfg,
            &cache,
            &["create", "--validate=false", "-f", "-", "-o", "json"],
            Some(&review),
        )?;
        if r.ok {
            break json(&r.stdout)?;
        }
        ensure!(t.elapsed() < Duration::from_secs(10), "{}", r.stderr);
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        answer["status"]["authenticated"] == true
            && answer["status"]["user"]["username"] == "system:serviceaccount:default:robot",
        "{answer}"
    );
    let bad = kubectl_with(
        &kb,
        &cfg,
        &cache,
        &["create", "--validate=false", "-f", "-", "-o", "json"],
        Some("apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec: {token: nonsense}\n"),
    )?
    .expect_ok("a bad token reviewed")?;
    ensure!(
        json(&bad.stdout)?["status"]["authenticated"] == false,
        "{}",
        bad.stdout
    );
    // A token for the API server is not one for another audience.
    let other = kubectl_with(
        &kb,
        &cfg,
        &cache,
        &["create", "--validate=false", "-f", "-", "-o", "json"],
        Some(&format!(
            "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec: {{token: {token}, audiences: [vault]}}\n"
        )),
    )?
    .expect_ok("a review for another audience")?;
    ensure!(
        json(&other.stdout)?["status"]["authenticated"] == false,
        "{}",
        other.stdout
    );
    let sar = |verb: &str| {
        format!("apiVersion: authorization.k8s.io/v1\nkind: SubjectAccessReview\nspec:\n  user: alice\n  resourceAttributes: {{verb: {verb}, resource: pods, namespace: default}}\n")
    };
    let ask = |verb: &str| -> anyhow::Result<bool> {
        let r = kubectl_with(
            &kb,
            &cfg,
            &cache,
            &["create", "--validate=false", "-f", "-", "-o", "json"],
            Some(&sar(verb)),
        )?
        .expect_ok("a subject access review")?;
        Ok(json(&r.stdout)?["status"]["allowed"] == true)
    };
    ensure!(!ask("list")?, "alice may not list pods yet");
    up.kubectl(&[
        "create",
        "rolebinding",
        "alice-view",
        "--clusterrole=view",
        "--user=alice",
    ])?
    .expect_ok("bind alice")?;
    until(10, "alice's binding", || ask("list"))?;
    ensure!(!ask("delete")?, "view does not delete");
    // The token holds only while its Secret exists.
    up.kubectl(&["delete", "secret", "robot-token"])?
        .expect_ok("delete the secret")?;
    let r = robot(&["auth", "whoami"])?.expect_err("a token of a deleted secret")?;
    ensure!(
        r.stderr.contains("Unauthorized") || r.stderr.contains("logged in"),
        "{}",
        r.stderr
    );
    Ok(())
}

/// A CertificateSigningRequest for `user` in `group`, and its private key (PEM).
fn user_csr(name: &str, user: &str, group: &str, usages: &str) -> anyhow::Result<(String, String)> {
    use base64::Engine;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, group);
    let pem = params.serialize_request(&key)?.pem()?;
    let request = base64::engine::general_purpose::STANDARD.encode(pem);
    Ok((
        format!("apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {name}}}\nspec:\n  request: {request}\n  signerName: kubernetes.io/kube-apiserver-client\n  expirationSeconds: 86400\n  usages: [{usages}]\n"),
        key.serialize_pem(),
    ))
}

/// Create and approve a CSR the signer will not sign; the message of its Failed condition.
fn approved_but_failed(
    up: &Up,
    name: &str,
    user: &str,
    group: &str,
    usages: &str,
) -> anyhow::Result<String> {
    let (csr, _) = user_csr(name, user, group, usages)?;
    up.kubectl_in(&["create", "-f", "-"], &csr)?
        .expect_ok("create the CSR")?;
    up.kubectl(&["certificate", "approve", name])?
        .expect_ok("approve")?;
    up.wait_field(
        20,
        &["csr", name],
        "{.status.conditions[?(@.type==\"Failed\")].message}",
        |s| !s.is_empty(),
    )
}

#[test]
fn certificate_signing_requests_add_users() -> anyhow::Result<()> {
    let (d, up) = up()?;
    let (csr, key) = user_csr("jane", "jane", "devs", "client auth")?;
    up.kubectl_in(&["create", "-f", "-"], &csr)?
        .expect_ok("create the CSR")?;
    let t = up.kubectl(&["get", "csr", "jane"])?.expect_ok("get csr")?;
    ensure!(
        t.stdout.contains("Pending") && t.stdout.contains("kubernetes.io/kube-apiserver-client"),
        "{}",
        t.stdout
    );
    up.kubectl(&["certificate", "approve", "jane"])?
        .expect_ok("approve")?;
    let cert = up.wait_field(20, &["csr", "jane"], "{.status.certificate}", |s| {
        !s.is_empty()
    })?;
    let t = up.kubectl(&["get", "csr", "jane"])?.expect_ok("get csr")?;
    ensure!(t.stdout.contains("Approved,Issued"), "{}", t.stdout);
    // The certificate and key make a kubeconfig for jane, in group devs.
    let key_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(key)
    };
    let cfg = d.path().join("jane");
    user_kubeconfig(
        &up,
        &cfg,
        &format!(
            "client-certificate-data: {}\n    client-key-data: {key_b64}",
            cert.trim()
        ),
    )?;
    let who = kubectl_with(
        &kubectl_bin(None)?,
        &cfg,
        &d.path().join("jane-cache"),
        &["auth", "whoami", "-o", "json"],
        None,
    )?
    .expect_ok("whoami")?;
    let info = &json(&who.stdout)?["status"]["userInfo"];
    ensure!(
        info["username"] == "jane"
            && info["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g == "devs")),
        "{info}"
    );
    // A usage this signer does not give fails with the reason; a denied one is never signed.
    let why = approved_but_failed(&up, "web", "web", "x", "server auth")?;
    ensure!(why.contains("client auth"), "{why}");
    let (csr, _) = user_csr("mallory", "admin", "system:masters", "client auth")?;
    up.kubectl_in(&["create", "-f", "-"], &csr)?
        .expect_ok("mallory's CSR")?;
    up.kubectl(&["certificate", "deny", "mallory"])?
        .expect_ok("deny")?;
    std::thread::sleep(Duration::from_secs(1));
    let c = up
        .kubectl(&[
            "get",
            "csr",
            "mallory",
            "-o",
            "jsonpath={.status.certificate}",
        ])?
        .expect_ok("get")?;
    ensure!(c.stdout.is_empty(), "a denied CSR was signed");
    // Approved is set through approval only: a status write does not approve.
    let (csr, _) = user_csr("sneaky", "sneaky", "x", "client auth")?;
    up.kubectl_in(&["create", "-f", "-"], &csr)?
        .expect_ok("sneaky's CSR")?;
    up.kubectl(&[
        "patch",
        "csr",
        "sneaky",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Approved","status":"True","reason":"Self","message":"me"}]}}"#,
    ])?
    .expect_ok("a status write")?;
    let c = up
        .kubectl(&[
            "get",
            "csr",
            "sneaky",
            "-o",
            "jsonpath={.status.conditions}",
        ])?
        .expect_ok("get")?;
    ensure!(!c.stdout.contains("Approved"), "{}", c.stdout);
    // Node identities are not this signer's to give.
    let why = approved_but_failed(
        &up,
        "node",
        "system:node:evil",
        "system:nodes",
        "client auth",
    )?;
    ensure!(why.contains("node or member"), "{why}");
    // Approving takes `approve` on the signer besides the approval subresource.
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: csr-approval}\nrules:\n- {apiGroups: [certificates.k8s.io], resources: [certificatesigningrequests, certificatesigningrequests/approval], verbs: [get, list, update]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: ops-csr}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: csr-approval}\nsubjects: [{kind: User, name: ops}]\n",
    )?
    .expect_ok("approval rights")?;
    let (csr, _) = user_csr("late", "late", "x", "client auth")?;
    up.kubectl_in(&["create", "-f", "-"], &csr)?
        .expect_ok("late's CSR")?;
    up.kubectl(&["certificate", "approve", "late", "--as=ops"])?
        .expect_refusal("approve without the signer", "signers")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: signer}\nrules:\n- {apiGroups: [certificates.k8s.io], resources: [signers], resourceNames: [kubernetes.io/*], verbs: [approve]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: ops-signer}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: signer}\nsubjects: [{kind: User, name: ops}]\n",
    )?
    .expect_ok("signer rights")?;
    up.kubectl(&["certificate", "approve", "late", "--as=ops"])?
        .expect_ok("approve with the signer")?;
    up.wait_field(20, &["csr", "late"], "{.status.certificate}", |s| {
        !s.is_empty()
    })?;
    // A request that is not one is refused field by field.
    up
        .kubectl_in(
            &["create", "-f", "-"],
            "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {name: bad}\nspec: {request: aGVsbG8=, signerName: kubernetes.io/kube-apiserver-client, usages: [client auth]}\n",
        )?
        .expect_refusal("a bad request", "spec.request")?;
    Ok(())
}
