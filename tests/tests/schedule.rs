//! The scheduler seen through kubectl on `outpost up` and a joined `outpost-node`: taints and
//! tolerations, node selectors, cordon, requests, and the reasons a pod that fits nowhere is
//! given, retried when the cluster changes.

use outpost_tests::{example, Up};

fn pod(name: &str, extra_spec: &str, resources: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  runtimeClassName: wasm\n{extra_spec}  containers:\n  - name: main\n    image: module:sleeper\n{resources}"
    )
}

fn node_of(up: &Up, name: &str) -> anyhow::Result<String> {
    up.wait_field(30, &["pod", name], "{.spec.nodeName}", |n| !n.is_empty())
}

fn unschedulable(up: &Up, name: &str) -> anyhow::Result<String> {
    up.wait_field(
        30,
        &["pod", name],
        "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        |m| !m.is_empty(),
    )
}

#[test]
fn pods_follow_taints_selectors_cordons_and_room() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let module = example("sleeper")?;
    up.outpost(&["module", "push", module.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    let local = up
        .kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"])?
        .expect_ok("get nodes")?
        .stdout;
    let _edge = up.join(&dir.path().join("edge-1"), "edge-1")?;

    // A NoSchedule taint keeps pods that do not tolerate it off the node.
    up.kubectl(&["taint", "node", &local, "dedicated=edge:NoSchedule"])?
        .expect_ok("taint")?;
    for i in 0..4 {
        up.kubectl_in(&["apply", "-f", "-"], &pod(&format!("plain-{i}"), "", ""))?
            .expect_ok("apply plain")?;
    }
    for i in 0..4 {
        assert_eq!(node_of(&up, &format!("plain-{i}"))?, "edge-1");
    }
    // A toleration lets a pod in, and a node selector sends it there.
    let tolerant = format!(
        "  tolerations:\n  - key: dedicated\n    operator: Equal\n    value: edge\n    effect: NoSchedule\n  nodeSelector:\n    kubernetes.io/hostname: {local}\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &pod("tolerant", &tolerant, ""))?
        .expect_ok("apply tolerant")?;
    assert_eq!(node_of(&up, "tolerant")?, local);
    up.wait_field(30, &["pod", "tolerant"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    // The node now reports the module as one of its images (by digest and by name), which
    // the scheduler prefers.
    let images = up.wait_field(30, &["node", &local], "{.status.images[*].names}", |s| {
        s.contains("module:sleeper")
    })?;
    assert!(images.contains("module:sha256:"), "{images}");

    // A pod that fits nowhere says why, per node, as kube-scheduler words it.
    let huge = "    resources:\n      requests:\n        memory: 1000Gi\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("huge", "", huge))?
        .expect_ok("apply huge")?;
    assert_eq!(
        unschedulable(&up, "huge")?,
        "0/2 nodes are available: 1 Insufficient memory, 1 node(s) had untolerated taint {dedicated: edge}."
    );
    let t = std::time::Instant::now();
    loop {
        let described = up
            .kubectl(&["describe", "pod", "huge"])?
            .expect_ok("describe huge")?
            .stdout;
        let qos = described.lines().any(|l| {
            l.strip_prefix("QoS Class:")
                .is_some_and(|v| v.trim() == "Burstable")
        });
        if described.contains("FailedScheduling") && qos {
            break;
        }
        assert!(t.elapsed().as_secs() < 10, "{described}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Cordoned, a node takes nothing new; uncordoned, the waiting pod is placed without
    // being created again.
    up.kubectl(&["cordon", "edge-1"])?.expect_ok("cordon")?;
    up.kubectl_in(&["apply", "-f", "-"], &pod("later", "", ""))?
        .expect_ok("apply later")?;
    assert_eq!(
        unschedulable(&up, "later")?,
        "0/2 nodes are available: 1 node(s) had untolerated taint {dedicated: edge}, 1 node(s) were unschedulable."
    );
    up.kubectl(&["uncordon", "edge-1"])?.expect_ok("uncordon")?;
    assert_eq!(node_of(&up, "later")?, "edge-1");
    up.wait_field(30, &["pod", "later"], "{.status.phase}", |p| p == "Running")?;
    let described = up
        .kubectl(&["describe", "pod", "later"])?
        .expect_ok("describe later")?
        .stdout;
    assert!(
        described.contains("Successfully assigned default/later to edge-1"),
        "{described}"
    );
    let scheduled = up
        .kubectl(&[
            "get",
            "pod",
            "later",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].status}",
        ])?
        .expect_ok("get later")?
        .stdout;
    assert_eq!(scheduled, "True");
    // The pod that cannot fit is still waiting, with its reason.
    let phase = up
        .kubectl(&["get", "pod", "huge", "-o", "jsonpath={.status.phase}"])?
        .expect_ok("get huge")?
        .stdout;
    assert_eq!(phase, "Pending");

    // Required anti-affinity on the hostname: one pod per node, and the third one waits
    // with the reason. (The taint on the local node goes first.)
    up.kubectl(&["taint", "node", &local, "dedicated-"])?
        .expect_ok("untaint")?;
    let apart = "  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector:\n          matchLabels:\n            app: apart\n        topologyKey: kubernetes.io/hostname\n";
    for i in 0..3 {
        let p = pod(&format!("apart-{i}"), apart, "")
            .replace("metadata:\n", "metadata:\n  labels:\n    app: apart\n");
        up.kubectl_in(&["apply", "-f", "-"], &p)?
            .expect_ok("apply apart")?;
        if i < 2 {
            node_of(&up, &format!("apart-{i}"))?;
        }
    }
    let (a, b) = (node_of(&up, "apart-0")?, node_of(&up, "apart-1")?);
    assert_ne!(a, b, "anti-affinity puts them on different nodes");
    let why = unschedulable(&up, "apart-2")?;
    assert!(
        why.contains("2 node(s) didn't match pod anti-affinity rules"),
        "{why}"
    );
    // Required spreading by hostname with a skew of 1 keeps counts level.
    let level = "  topologySpreadConstraints:\n  - maxSkew: 1\n    topologyKey: kubernetes.io/hostname\n    whenUnsatisfiable: DoNotSchedule\n    labelSelector:\n      matchLabels:\n        app: level\n";
    let mut on = std::collections::HashMap::new();
    for i in 0..4 {
        let p = pod(&format!("level-{i}"), level, "")
            .replace("metadata:\n", "metadata:\n  labels:\n    app: level\n");
        up.kubectl_in(&["apply", "-f", "-"], &p)?
            .expect_ok("apply level")?;
        *on.entry(node_of(&up, &format!("level-{i}"))?).or_insert(0) += 1;
    }
    assert_eq!(on.values().copied().collect::<Vec<_>>(), [2, 2], "{on:?}");

    // A namespaceSelector counts the pods of the namespaces whose labels it matches: a pod
    // in `default` that avoids team=shop's `app=nsel` pods goes where the shop's is not.
    up.kubectl(&["create", "namespace", "shop"])?
        .expect_ok("create namespace")?;
    up.kubectl(&["label", "namespace", "shop", "team=shop"])?
        .expect_ok("label namespace")?;
    let shop_web = pod("shop-web", "", "").replace(
        "metadata:
",
        "metadata:
  namespace: shop
  labels:
    app: nsel
",
    );
    up.kubectl_in(&["apply", "-f", "-"], &shop_web)?
        .expect_ok("apply shop-web")?;
    let taken = up.wait_field(
        30,
        &["pod", "shop-web", "-n", "shop"],
        "{.spec.nodeName}",
        |n| !n.is_empty(),
    )?;
    let picky = "  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector:\n          matchLabels:\n            app: nsel\n        topologyKey: kubernetes.io/hostname\n        namespaceSelector:\n          matchLabels:\n            team: shop\n";
    for i in 0..3 {
        let name = format!("picky-{i}");
        up.kubectl_in(&["apply", "-f", "-"], &pod(&name, picky, ""))?
            .expect_ok("apply picky")?;
        assert_ne!(node_of(&up, &name)?, taken, "{name} went beside shop's pod");
    }
    Ok(())
}

#[test]
fn extended_resources_ephemeral_storage_and_bad_quantities() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let module = example("sleeper")?;
    up.outpost(&["module", "push", module.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    let node = up
        .kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"])?
        .expect_ok("get nodes")?
        .stdout;
    // The node reports its disk as ephemeral storage.
    let disk = up
        .kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.status.allocatable.ephemeral-storage}",
        ])?
        .expect_ok("get node")?
        .stdout;
    let bytes = outpost_api::quantity::bytes(&disk).unwrap_or(0);
    assert!(bytes > 1 << 20, "allocatable ephemeral-storage {disk:?}");

    // A quantity that does not parse cannot be decoded, as kube-apiserver answers.
    let typo = "    resources:\n      limits:\n        memory: 512mb\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("typo", "", typo))?
        .expect_refusal(
            "a bad quantity",
            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (spec.containers[0].resources.limits[memory]: \"512mb\")",
        )?;
    let over = "    resources:\n      requests:\n        cpu: 2\n      limits:\n        cpu: 1\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("over", "", over))?
        .expect_refusal(
            "a request over its limit",
            "spec.containers[0].resources.requests[cpu]: Invalid value: \"2\": must be less than or equal to cpu limit of 1",
        )?;

    // More disk than the node has, and a resource it does not advertise: both wait.
    let disk = "    resources:\n      requests:\n        ephemeral-storage: 1Ei\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("disk", "", disk))?
        .expect_ok("apply disk")?;
    assert_eq!(
        unschedulable(&up, "disk")?,
        "0/1 nodes are available: 1 Insufficient ephemeral-storage."
    );
    let dongle = "    resources:\n      limits:\n        example.com/dongle: 1\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod("dongle-0", "", dongle))?
        .expect_ok("apply dongle-0")?;
    assert_eq!(
        unschedulable(&up, "dongle-0")?,
        "0/1 nodes are available: 1 Insufficient example.com/dongle."
    );
    // Advertised as Kubernetes documents it (a JSON patch of the node's capacity), the
    // resource is allocatable, the waiting pod is placed, and a second one waits for it.
    up.kubectl(&[
        "patch",
        "node",
        &node,
        "--subresource=status",
        "--type=json",
        "-p",
        r#"[{"op": "add", "path": "/status/capacity/example.com~1dongle", "value": "1"}]"#,
    ])?
    .expect_ok("advertise the dongle")?;
    up.wait_field(
        10,
        &["node", &node],
        "{.status.allocatable.example\\.com/dongle}",
        |n| n == "1",
    )?;
    assert_eq!(node_of(&up, "dongle-0")?, node);
    up.wait_field(30, &["pod", "dongle-0"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let requested = up
        .kubectl(&[
            "get",
            "pod",
            "dongle-0",
            "-o",
            "jsonpath={.spec.containers[0].resources.requests.example\\.com/dongle}",
        ])?
        .expect_ok("get dongle-0")?
        .stdout;
    assert_eq!(requested, "1", "requests default to limits");
    up.kubectl_in(&["apply", "-f", "-"], &pod("dongle-1", "", dongle))?
        .expect_ok("apply dongle-1")?;
    assert_eq!(
        unschedulable(&up, "dongle-1")?,
        "0/1 nodes are available: 1 Insufficient example.com/dongle."
    );
    up.kubectl(&["delete", "pod", "dongle-0", "--grace-period=1"])?
        .expect_ok("delete dongle-0")?;
    assert_eq!(
        node_of(&up, "dongle-1")?,
        node,
        "the freed dongle goes to the waiting pod"
    );
    Ok(())
}
