//! Controllers through the real kubectl on `outpost up`: Deployments create ReplicaSets and
//! pods, scale, roll out a new template (followed with `kubectl rollout status`), undo, and
//! take their pods with them when deleted; ReplicationControllers keep their pods as
//! ReplicaSets do.

use std::time::{Duration, Instant};

use outpost_tests::{example, Up};

fn field(up: &Up, what: &[&str], path: &str) -> anyhow::Result<String> {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let jp = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &jp]);
    Ok(up.kubectl(&args)?.expect_ok("get")?.stdout)
}

/// `outpost up` in a new directory, with the example module `name` pushed to its module
/// store (as `module:NAME`).
fn with_module(name: &str) -> anyhow::Result<(tempfile::TempDir, Up)> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let module = example(name)?;
    up.outpost(&["module", "push", module.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    Ok((dir, up))
}

/// Wait until the pods labelled `app=web` are exactly `n`, all Running with `image`.
fn web_pods(up: &Up, n: usize, image: &str) -> anyhow::Result<Vec<String>> {
    let t = Instant::now();
    loop {
        let out = field(
            up,
            &["pods", "-l", "app=web"],
            "{range .items[*]}{.metadata.name} {.status.phase} {.spec.containers[0].image}{\"\\n\"}{end}",
        )?;
        let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
        if rows.len() == n
            && rows
                .iter()
                .all(|r| r.get(1) == Some(&"Running") && r.get(2) == Some(&image))
        {
            return Ok(rows.iter().map(|r| r[0].to_string()).collect());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "wanted {n} running web pods with {image}, have:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn deployments_scale_roll_out_and_undo() -> anyhow::Result<()> {
    let (_dir, up) = with_module("sleeper")?;
    // The same module by digest: another image string, so another template.
    let module = example("sleeper")?;
    let by_digest = up
        .outpost(&["module", "push", module.to_str().unwrap_or_default()])?
        .expect_ok("module push")?
        .stdout
        .trim()
        .to_string();

    up.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=module:sleeper",
        "--replicas=3",
    ])?
    .expect_ok("create deployment")?;
    let first = web_pods(&up, 3, "module:sleeper")?;
    let owner = field(
        &up,
        &["pod", &first[0]],
        "{.metadata.ownerReferences[0].kind}",
    )?;
    assert_eq!(owner, "ReplicaSet");
    let rollout = up
        .kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"])?
        .expect_ok("rollout status")?;
    assert!(
        rollout.stdout.contains("successfully rolled out"),
        "{}",
        rollout.stdout
    );
    let ready = field(
        &up,
        &["deployment", "web"],
        "{.status.readyReplicas}/{.status.updatedReplicas}",
    )?;
    assert_eq!(ready, "3/3");
    // What the controllers did is in the events `kubectl describe` shows.
    let t = Instant::now();
    loop {
        let d = up
            .kubectl(&["describe", "deployment", "web"])?
            .expect_ok("describe")?
            .stdout;
        let rs = up
            .kubectl(&["describe", "replicasets", "-l", "app=web"])?
            .expect_ok("describe")?
            .stdout;
        if d.contains("Scaled up replica set web-")
            && rs.contains(&format!("Created pod: {}", first[0]))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{d}\n{rs}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Scaled up and down, the same ReplicaSet grows and shrinks.
    up.kubectl(&["scale", "deployment/web", "--replicas=5"])?
        .expect_ok("scale up")?;
    web_pods(&up, 5, "module:sleeper")?;
    up.kubectl(&["scale", "deployment/web", "--replicas=2"])?
        .expect_ok("scale down")?;
    web_pods(&up, 2, "module:sleeper")?;
    let sets = field(
        &up,
        &["replicasets", "-l", "app=web"],
        "{.items[*].metadata.name}",
    )?;
    assert_eq!(sets.split(' ').count(), 1, "{sets}");

    // A new template rolls out; `kubectl rollout status` follows it to the end.
    up.kubectl(&["set", "image", "deployment/web", &format!("*={by_digest}")])?
        .expect_ok("set image")?;
    let rollout = up
        .kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?
        .expect_ok("rollout status")?;
    assert!(
        rollout.stdout.contains("successfully rolled out"),
        "{}",
        rollout.stdout
    );
    web_pods(&up, 2, &by_digest)?;
    let sizes = field(
        &up,
        &["replicasets", "-l", "app=web"],
        "{range .items[*]}{.metadata.annotations.deployment\\.kubernetes\\.io/revision}={.spec.replicas} {end}",
    )?;
    let mut sizes: Vec<&str> = sizes.split_whitespace().collect();
    sizes.sort();
    assert_eq!(sizes, ["1=0", "2=2"]);

    // Undo goes back to the first template, as revision 3.
    up.kubectl(&["rollout", "undo", "deployment/web"])?
        .expect_ok("rollout undo")?;
    up.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?
        .expect_ok("rollout status after undo")?;
    web_pods(&up, 2, "module:sleeper")?;
    let history = up
        .kubectl(&["rollout", "history", "deployment/web"])?
        .expect_ok("rollout history")?
        .stdout;
    assert!(history.contains('2') && history.contains('3'), "{history}");
    let revision = field(
        &up,
        &["deployment", "web"],
        "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    )?;
    assert_eq!(revision, "3");

    // A Recreate Deployment replaces all its pods at once.
    up.kubectl(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        &format!(
            "{{\"spec\":{{\"strategy\":{{\"type\":\"Recreate\",\"rollingUpdate\":null}},\"template\":{{\"spec\":{{\"containers\":[{{\"name\":\"module\",\"image\":\"{by_digest}\"}}]}}}}}}}}"
        ),
    ])?
    .expect_ok("patch to Recreate")?;
    up.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?
        .expect_ok("rollout status (Recreate)")?;
    web_pods(&up, 2, &by_digest)?;

    // A rollout that makes no progress for progressDeadlineSeconds fails, and `kubectl
    // rollout status` says so.
    // Its pod never passes its readiness probe (nothing listens on port 9).
    let stuck = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: stuck\nspec:\n  progressDeadlineSeconds: 3\n  selector:\n    matchLabels:\n      app: stuck\n  template:\n    metadata:\n      labels:\n        app: stuck\n    spec:\n      containers:\n      - name: main\n        image: module:sleeper\n        readinessProbe:\n          tcpSocket:\n            port: 9\n          periodSeconds: 1\n";
    up.kubectl_in(&["apply", "-f", "-"], stuck)?
        .expect_ok("apply stuck")?;
    let failed = up
        .kubectl(&["rollout", "status", "deployment/stuck", "--timeout=60s"])?
        .expect_err("a stuck rollout")?;
    assert!(
        failed.stderr.contains("exceeded its progress deadline"),
        "{}",
        failed.stderr
    );
    up.kubectl(&["delete", "deployment", "stuck"])?
        .expect_ok("delete stuck")?;

    // A Deployment applied before its ServiceAccount: the ReplicaSet says why it has no pods
    // (FailedCreate), and makes them soon after the account appears.
    let late = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: late\nspec:\n  selector:\n    matchLabels:\n      app: late\n  template:\n    metadata:\n      labels:\n        app: late\n    spec:\n      serviceAccountName: late\n      containers:\n      - name: main\n        image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], late)?
        .expect_ok("apply late")?;
    let t = Instant::now();
    loop {
        let events = field(
            &up,
            &["events"],
            "{.items[?(@.reason==\"FailedCreate\")].message}",
        )?;
        if events.contains("error looking up service account default/late") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "events: {events}");
        std::thread::sleep(Duration::from_millis(250));
    }
    up.kubectl(&["create", "serviceaccount", "late"])?
        .expect_ok("create the account")?;
    up.kubectl(&["rollout", "status", "deployment/late", "--timeout=30s"])?
        .expect_ok("late rolls out once its account exists")?;
    up.kubectl(&["delete", "deployment", "late"])?
        .expect_ok("delete late")?;

    // With minReadySeconds, a ready pod counts as available only after that long.
    let patient = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: patient\nspec:\n  minReadySeconds: 5\n  selector:\n    matchLabels:\n      app: patient\n  template:\n    metadata:\n      labels:\n        app: patient\n    spec:\n      containers:\n      - name: main\n        image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], patient)?
        .expect_ok("apply patient")?;
    let t = Instant::now();
    up.wait_field(
        30,
        &["deployment", "patient"],
        "{.status.readyReplicas}/{.status.availableReplicas}",
        |s| s == "1/0" || s == "1/",
    )?;
    up.wait_field(
        30,
        &["deployment", "patient"],
        "{.status.availableReplicas}",
        |s| s == "1",
    )?;
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    up.kubectl(&["delete", "deployment", "patient"])?
        .expect_ok("delete patient")?;

    // Deleted with --cascade=orphan, its ReplicaSet and pods stay; a new Deployment with the
    // same template adopts them (the same pods, no new ones).
    let before = web_pods(&up, 2, &by_digest)?;
    up.kubectl(&["delete", "deployment", "web", "--cascade=orphan"])?
        .expect_ok("orphan delete")?;
    let owners = field(
        &up,
        &["replicasets", "-l", "app=web"],
        "{.items[*].metadata.ownerReferences}",
    )?;
    assert_eq!(owners, "", "orphaned");
    up.kubectl(&[
        "create",
        "deployment",
        "web",
        &format!("--image={by_digest}"),
        "--replicas=2",
    ])?
    .expect_ok("create again")?;
    let uid = field(&up, &["deployment", "web"], "{.metadata.uid}")?;
    up.wait_field(
        30,
        &["replicasets", "-l", "app=web"],
        "{.items[*].metadata.ownerReferences[0].uid}",
        |s| !s.is_empty() && s.split(' ').all(|u| u == uid),
    )?;
    up.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"])?
        .expect_ok("rollout status after adoption")?;
    let mut after = web_pods(&up, 2, &by_digest)?;
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "the same pods, adopted");

    // Deleted, its ReplicaSets and pods go with it.
    up.kubectl(&["delete", "deployment", "web"])?
        .expect_ok("delete deployment")?;
    let t = Instant::now();
    loop {
        let left = field(
            &up,
            &["pods,replicasets", "-l", "app=web"],
            "{.items[*].metadata.name}",
        )?;
        if left.trim().is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "left behind: {left}");
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// A node whose agent dies goes Unknown and is tainted after the grace period, keeps its
/// pods through its autonomy window, has them evicted after it, and is untainted when it
/// comes back.
#[test]
fn an_unreachable_node_keeps_its_pods_for_its_autonomy_window() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start_with(dir.path(), &["--node-grace", "2"])?;
    let module = example("sleeper")?;
    up.outpost(&["module", "push", module.to_str().unwrap_or_default()])?
        .expect_ok("module push")?;
    let edge_dir = dir.path().join("edge-1");
    let mut edge = up.join(&edge_dir, "edge-1")?;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: steady\nspec:\n  nodeSelector:\n    kubernetes.io/hostname: edge-1\n  containers:\n  - name: main\n    image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], pod)?
        .expect_ok("apply")?;
    up.wait_field(60, &["pod", "steady"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    // A DaemonSet pod on the node too: never evicted.
    let keeper = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: keeper\nspec:\n  selector:\n    matchLabels:\n      app: keeper\n  template:\n    metadata:\n      labels:\n        app: keeper\n    spec:\n      nodeSelector:\n        kubernetes.io/hostname: edge-1\n      containers:\n      - name: main\n        image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], keeper)?
        .expect_ok("apply daemonset")?;
    let ready = "{.items[0].status.conditions[?(@.type==\"Ready\")].status}";
    let keeper_pod = ["pods", "-l", "app=keeper"];
    up.wait_field(60, &keeper_pod, ready, |s| s == "True")?;

    // SIGKILL: the link is lost when the gateway stops hearing from it (20 s), then grace.
    edge.kill();
    up.wait_field(
        60,
        &["node", "edge-1"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "Unknown",
    )?;
    let taints = up.wait_field(
        10,
        &["node", "edge-1"],
        "{.spec.taints[*].key}/{.spec.taints[*].effect}",
        |t| t.contains("node.kubernetes.io/unreachable"),
    )?;
    assert!(taints.contains("NoExecute"), "{taints}");
    let listed = up
        .kubectl(&["get", "nodes"])?
        .expect_ok("get nodes")?
        .stdout;
    assert!(listed.contains("NotReady"), "{listed}");
    // Its pods are marked not ready, so Services stop sending to them.
    up.wait_field(
        10,
        &["pod", "steady"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "False",
    )?;
    up.wait_field(10, &keeper_pod, ready, |s| s == "False")?;
    // Inside the window (24 h by default) the pod stays, neither deleted nor replaced.
    std::thread::sleep(Duration::from_secs(3));
    let deleting = field(&up, &["pod", "steady"], "{.metadata.deletionTimestamp}")?;
    assert_eq!(deleting, "", "evicted inside the autonomy window");

    // A window of one second on this node: the pod is evicted.
    up.kubectl(&[
        "annotate",
        "node",
        "edge-1",
        "outpost.dev/autonomy-window=1",
    ])?
    .expect_ok("annotate")?;
    up.wait_field(
        30,
        &["pod", "steady"],
        "{.metadata.deletionTimestamp}",
        |d| !d.is_empty(),
    )?;

    // Back again: the taints go, the node says Ready, and it finishes the eviction.
    edge.start(&[])?;
    up.node_ready(&edge, "edge-1", 60)?;
    // The DaemonSet pod stayed, and the agent reports it ready again.
    up.wait_field(30, &keeper_pod, ready, |s| s == "True")?;
    let t = Instant::now();
    loop {
        let taints = field(&up, &["node", "edge-1"], "{.spec.taints[*].key}")?;
        let pods = field(&up, &["pods"], "{.items[*].metadata.name}")?;
        if !taints.contains("unreachable") && !pods.contains("steady") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "taints {taints}, pods {pods}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The node's story is in its events, as `kubectl describe node` shows them.
    up.wait_described(
        10,
        &["node", "edge-1"],
        &[
            "RegisteredNode",
            "Registered Node edge-1 in Controller",
            "NodeNotReady",
            "Node edge-1 status is now: NodeNotReady",
            "NodeReady",
            "Node edge-1 status is now: NodeReady",
        ],
    )?;
    // A node deleted by hand takes its pods with it, after the grace period, as the pod
    // garbage collector deletes pods bound to a node that does not exist.
    up.kubectl(&["delete", "node", "edge-1"])?
        .expect_ok("delete node")?;
    let t = Instant::now();
    loop {
        let pods = field(
            &up,
            &["pods", "-l", "app=keeper"],
            "{.items[*].metadata.name}",
        )?;
        if pods.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "still {pods}");
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// A DaemonSet puts one pod on every node it selects, follows a node that joins, and rolls
/// out a new template; Jobs complete, or stop at their backoffLimit.
#[test]
fn daemonsets_follow_nodes_and_jobs_finish() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    for m in ["sleeper", "hello", "memory-hog"] {
        let path = example(m)?;
        up.outpost(&["module", "push", path.to_str().unwrap_or_default()])?
            .expect_ok("module push")?;
    }
    let _edge1 = up.join(&dir.path().join("edge-1"), "edge-1")?;
    let ds = |image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  selector:\n    matchLabels:\n      app: agent\n  template:\n    metadata:\n      labels:\n        app: agent\n    spec:\n      containers:\n      - name: agent\n        image: {image}\n"
        )
    };
    up.kubectl_in(&["apply", "-f", "-"], &ds("module:sleeper"))?
        .expect_ok("apply daemonset")?;
    let placed = |n: usize| -> anyhow::Result<Vec<String>> {
        let t = Instant::now();
        loop {
            let out = field(
                &up,
                &["pods", "-l", "app=agent"],
                "{range .items[*]}{.spec.nodeName} {.status.phase}{\"\\n\"}{end}",
            )?;
            let mut nodes: Vec<String> = out
                .lines()
                .filter(|l| l.ends_with(" Running"))
                .map(|l| l.split(' ').next().unwrap_or("").to_string())
                .collect();
            nodes.sort();
            if nodes.len() == n && out.lines().count() == n {
                return Ok(nodes);
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "pods: {out}");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let nodes = placed(2)?;
    assert!(nodes.contains(&"edge-1".to_string()), "{nodes:?}");
    up.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=60s"])?
        .expect_ok("rollout status ds")?;
    // A node that joins gets its pod.
    let _edge2 = up.join(&dir.path().join("edge-2"), "edge-2")?;
    let nodes = placed(3)?;
    assert!(nodes.contains(&"edge-2".to_string()), "{nodes:?}");
    let desired = field(
        &up,
        &["daemonset", "agent"],
        "{.status.desiredNumberScheduled}/{.status.numberReady}",
    )?;
    assert_eq!(desired, "3/3");
    // A node selector narrows it to the nodes labelled for it.
    up.kubectl(&["label", "node", "edge-1", "role=edge"])?
        .expect_ok("label")?;
    up.kubectl(&[
        "patch",
        "daemonset",
        "agent",
        "--type=merge",
        "-p",
        "{\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":{\"role\":\"edge\"}}}}}",
    ])?
    .expect_ok("patch selector")?;
    assert_eq!(placed(1)?, ["edge-1"]);
    up.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=60s"])?
        .expect_ok("rollout status ds after selector")?;
    // Each template is a ControllerRevision: the history lists two, and an undo brings the
    // first back (as revision 3) and the pods to every node again.
    let revisions = |want: &str| {
        up.wait_field(
            30,
            &["controllerrevisions", "-l", "app=agent"],
            "{.items[*].revision}",
            |s| {
                let mut r: Vec<&str> = s.split_whitespace().collect();
                r.sort();
                r.join(" ") == want
            },
        )
    };
    revisions("1 2")?;
    let history = up
        .kubectl(&["rollout", "history", "daemonset/agent"])?
        .expect_ok("rollout history ds")?
        .stdout;
    let listed: Vec<&str> = history
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, ["1", "2"], "{history}");
    up.kubectl(&["rollout", "undo", "daemonset/agent"])?
        .expect_ok("rollout undo ds")?;
    assert_eq!(
        field(
            &up,
            &["daemonset", "agent"],
            "{.spec.template.spec.nodeSelector}"
        )?,
        ""
    );
    assert_eq!(placed(3)?.len(), 3);
    revisions("2 3")?;

    // A Job of three completions, two at a time, completes.
    let job = |name: &str, image: &str, extra: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n  completions: 3\n  parallelism: 2\n{extra}  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: {image}\n        resources:\n          limits:\n            memory: 32Mi\n"
        )
    };
    up.kubectl_in(&["apply", "-f", "-"], &job("ok", "module:hello", ""))?
        .expect_ok("apply job")?;
    up.kubectl(&[
        "wait",
        "--for=condition=complete",
        "job/ok",
        "--timeout=60s",
    ])?
    .expect_ok("wait complete")?;
    assert_eq!(field(&up, &["job", "ok"], "{.status.succeeded}")?, "3");
    // Made without labels, it shows its pods'.
    assert_eq!(
        field(&up, &["job", "ok"], "{.metadata.labels.job-name}")?,
        "ok"
    );
    let listed = up
        .kubectl(&["get", "job", "ok"])?
        .expect_ok("get job")?
        .stdout;
    assert!(listed.contains("3/3"), "{listed}");
    // Its pods deleted (as a drain would): what was counted stays counted.
    up.kubectl(&["delete", "pods", "-l", "job-name=ok", "--wait=true"])?
        .expect_ok("delete the job's pods")?;
    assert_eq!(field(&up, &["job", "ok"], "{.status.succeeded}")?, "3");
    assert_eq!(
        field(&up, &["job", "ok"], "{.status.conditions[0].reason}")?,
        "CompletionsReached"
    );
    // Suspended, a Job's running pods go; resumed, they come back.
    up.kubectl_in(&["apply", "-f", "-"], &job("pause", "module:sleeper", ""))?
        .expect_ok("apply long job")?;
    let running = |n: usize| {
        up.wait_field(
            60,
            &["pods", "-l", "job-name=pause"],
            "{range .items[*]}{.status.phase} {end}",
            move |s| {
                s.split_whitespace().filter(|p| *p == "Running").count() == n
                    && s.split_whitespace().count() == n
            },
        )
    };
    let suspend = |on: bool| {
        let body = format!(r#"{{"spec":{{"suspend":{on}}}}}"#);
        up.kubectl(&["patch", "job", "pause", "--type=merge", "-p", &body])?
            .expect_ok("suspend or resume")
    };
    running(2)?;
    suspend(true)?;
    running(0)?;
    up.kubectl(&[
        "wait",
        "--for=condition=suspended",
        "job/pause",
        "--timeout=30s",
    ])?
    .expect_ok("suspended condition")?;
    assert_eq!(field(&up, &["job", "pause"], "{.status.startTime}")?, "");
    suspend(false)?;
    running(2)?;
    let events = up
        .kubectl(&["events", "--for", "job/pause"])?
        .expect_ok("job events")?
        .stdout;
    assert!(
        events.contains("Suspended") && events.contains("Resumed"),
        "{events}"
    );
    up.kubectl(&["delete", "job", "pause", "--wait=false"])?
        .expect_ok("delete long job")?;
    // An Indexed one runs one pod per index, each told its index, and lists them done.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job("indexed", "module:hello", "  completionMode: Indexed\n"),
    )?
    .expect_ok("apply indexed job")?;
    up.kubectl(&[
        "wait",
        "--for=condition=complete",
        "job/indexed",
        "--timeout=60s",
    ])?
    .expect_ok("wait indexed")?;
    assert_eq!(
        field(&up, &["job", "indexed"], "{.status.completedIndexes}")?,
        "0-2"
    );
    let indexes = up
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "job-name=indexed",
            "-o",
            "jsonpath={range .items[*]}{.metadata.annotations.batch\\.kubernetes\\.io/job-completion-index}:{.spec.containers[0].env[?(@.name==\"JOB_COMPLETION_INDEX\")].value} {end}",
        ])?
        .expect_ok("indexed pods")?
        .stdout;
    let mut seen: Vec<&str> = indexes.split_whitespace().collect();
    seen.sort_unstable();
    assert_eq!(seen, ["0:0", "1:1", "2:2"], "{indexes}");
    // One that fails every time stops after backoffLimit + 1 failed pods.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job("bad", "module:memory-hog", "  backoffLimit: 1\n"),
    )?
    .expect_ok("apply failing job")?;
    up.kubectl(&["wait", "--for=condition=failed", "job/bad", "--timeout=60s"])?
        .expect_ok("wait failed")?;
    let reason = field(&up, &["job", "bad"], "{.status.conditions[0].reason}")?;
    assert_eq!(reason, "BackoffLimitExceeded");
    std::thread::sleep(Duration::from_secs(2));
    let failed: usize = field(&up, &["job", "bad"], "{.status.failed}")?.parse()?;
    assert!((2..=3).contains(&failed), "failed pods: {failed}");
    let active = field(&up, &["job", "bad"], "{.status.active}")?;
    assert_eq!(active, "0");
    // Past its activeDeadlineSeconds a Job fails and its pods go; a finished Job with
    // ttlSecondsAfterFinished is deleted after it.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job(
            "slow",
            "module:sleeper",
            "  activeDeadlineSeconds: 2
",
        ),
    )?
    .expect_ok("apply slow job")?;
    up.kubectl(&[
        "wait",
        "--for=condition=failed",
        "job/slow",
        "--timeout=60s",
    ])?
    .expect_ok("wait deadline")?;
    let reason = field(&up, &["job", "slow"], "{.status.conditions[0].reason}")?;
    assert_eq!(reason, "DeadlineExceeded");
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job(
            "brief",
            "module:hello",
            "  ttlSecondsAfterFinished: 1
",
        ),
    )?
    .expect_ok("apply brief job")?;
    let t = Instant::now();
    loop {
        let jobs = field(&up, &["jobs"], "{.items[*].metadata.name}")?;
        if !jobs.contains("brief") && t.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "still there: {jobs}");
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// `kubectl rollout status` of the StatefulSet `shop/db`, which must succeed.
fn sts_rolled_out(up: &Up, what: &str) -> anyhow::Result<String> {
    let args = [
        "rollout",
        "status",
        "statefulset/db",
        "-n",
        "shop",
        "--timeout=90s",
    ];
    Ok(up.kubectl(&args)?.expect_ok(what)?.stdout)
}

/// A StatefulSet makes its pods in order under stable names, and its Service's Endpoints and
/// EndpointSlices follow them; draining a node moves its pods (same names) elsewhere; it
/// scales down from the top, rolls a restart through every pod, and deleting its namespace
/// stops and removes everything in it.
#[test]
fn statefulsets_endpoints_drain_and_namespace_delete() -> anyhow::Result<()> {
    let (dir, up) = with_module("sleeper")?;
    let _edge = up.join(&dir.path().join("edge-1"), "edge-1")?;
    up.kubectl(&["create", "namespace", "shop"])?
        .expect_ok("create ns")?;
    let manifest = "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: shop\nspec:\n  clusterIP: None\n  selector:\n    app: db\n  ports:\n  - name: sql\n    port: 5432\n    targetPort: 8080\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\n  namespace: shop\nspec:\n  serviceName: db\n  replicas: 3\n  selector:\n    matchLabels:\n      app: db\n  template:\n    metadata:\n      labels:\n        app: db\n    spec:\n      containers:\n      - name: db\n        image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], manifest)?
        .expect_ok("apply")?;
    sts_rolled_out(&up, "rollout status sts")?;
    let pods = field(
        &up,
        &["pods", "-n", "shop"],
        "{range .items[*]}{.metadata.name} {.status.phase} {.spec.hostname}.{.spec.subdomain}{\"\\n\"}{end}",
    )?;
    assert_eq!(
        pods.trim(),
        "db-0 Running db-0.db\ndb-1 Running db-1.db\ndb-2 Running db-2.db"
    );
    // In order: each pod was made only once the one before it was ready.
    let events = field(
        &up,
        &[
            "events",
            "-n",
            "shop",
            "--field-selector",
            "reason=SuccessfulCreate",
        ],
        "{range .items[*]}{.message}{\"\\n\"}{end}",
    )?;
    assert!(
        events.contains("create Pod db-2 in StatefulSet db successful"),
        "{events}"
    );
    let ready_at = |p: &str| {
        field(
            &up,
            &["pod", p, "-n", "shop"],
            "{.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
        )
    };
    let created_at = |p: &str| {
        field(
            &up,
            &["pod", p, "-n", "shop"],
            "{.metadata.creationTimestamp}",
        )
    };
    assert!(created_at("db-1")? >= ready_at("db-0")?);
    assert!(created_at("db-2")? >= ready_at("db-1")?);

    // The Service's endpoints: every ready pod, at the target port.
    let endpoints = |want: &str| {
        up.wait_field(
            30,
            &["endpoints", "db", "-n", "shop"],
            "{.subsets[0].addresses[*].targetRef.name}:{.subsets[0].ports[0].port}",
            |s| {
                let (names, port) = s.split_once(':').unwrap_or_default();
                let mut names: Vec<&str> = names.split_whitespace().collect();
                names.sort();
                names.join(" ") == want && (want.is_empty() || port == "8080")
            },
        )
    };
    endpoints("db-0 db-1 db-2")?;
    up.wait_field(
        30,
        &[
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=db",
        ],
        "{.items[0].endpoints[*].conditions.ready}",
        |s| s == "true true true",
    )?;
    let listed = up
        .kubectl(&["get", "endpoints", "db", "-n", "shop"])?
        .expect_ok("get endpoints")?
        .stdout;
    assert!(listed.contains(":8080"), "{listed}");
    let slices = up
        .kubectl(&["get", "endpointslices", "-n", "shop"])?
        .expect_ok("get endpointslices")?
        .stdout;
    assert!(
        slices.contains("IPv4") && slices.contains("8080"),
        "{slices}"
    );

    // Drained, edge-1 is cordoned and its pods come back under the same names elsewhere.
    let on_edge = field(
        &up,
        &[
            "pods",
            "-n",
            "shop",
            "--field-selector",
            "spec.nodeName=edge-1",
        ],
        "{.items[*].metadata.name}",
    )?;
    assert!(
        !on_edge.is_empty(),
        "the scheduler spreads a StatefulSet's pods"
    );
    up.kubectl(&["drain", "edge-1", "--ignore-daemonsets", "--timeout=60s"])?
        .expect_ok("drain")?;
    assert_eq!(
        field(&up, &["node", "edge-1"], "{.spec.unschedulable}")?,
        "true"
    );
    sts_rolled_out(&up, "rollout status after drain")?;
    let moved = up.wait_field(
        60,
        &["pods", "-n", "shop"],
        "{range .items[*]}{.metadata.name}@{.spec.nodeName} {end}",
        |s| s.split_whitespace().count() == 3 && !s.contains("@edge-1"),
    )?;
    for p in on_edge.split_whitespace() {
        assert!(moved.contains(&format!("{p}@")), "{p} not back: {moved}");
    }
    up.kubectl(&["uncordon", "edge-1"])?.expect_ok("uncordon")?;

    // Scaled down, the highest ordinals go and the endpoints follow.
    up.kubectl(&["scale", "statefulset/db", "-n", "shop", "--replicas=1"])?
        .expect_ok("scale")?;
    up.wait_field(
        60,
        &["pods", "-n", "shop"],
        "{.items[*].metadata.name}",
        |s| s == "db-0",
    )?;
    endpoints("db-0")?;

    // Deleted with its pods orphaned and created again, the StatefulSet takes db-0 back
    // (the same pod).
    let uid = field(&up, &["pod", "db-0", "-n", "shop"], "{.metadata.uid}")?;
    up.kubectl(&[
        "delete",
        "statefulset",
        "db",
        "-n",
        "shop",
        "--cascade=orphan",
    ])?
    .expect_ok("delete --cascade=orphan")?;
    up.wait_field(
        30,
        &["pod", "db-0", "-n", "shop"],
        "{.metadata.ownerReferences}",
        str::is_empty,
    )?;
    let one = manifest.replace("replicas: 3", "replicas: 1");
    up.kubectl_in(&["apply", "-f", "-"], &one)?
        .expect_ok("apply again")?;
    sts_rolled_out(&up, "rollout status after adoption")?;
    let sts = field(&up, &["statefulset", "db", "-n", "shop"], "{.metadata.uid}")?;
    up.wait_field(
        30,
        &["pod", "db-0", "-n", "shop"],
        "{.metadata.uid} {.metadata.ownerReferences[0].uid}",
        |s| s == format!("{uid} {sts}"),
    )?;

    // A restart replaces the pod at the new revision.
    let uid = field(&up, &["pod", "db-0", "-n", "shop"], "{.metadata.uid}")?;
    up.kubectl(&["rollout", "restart", "statefulset/db", "-n", "shop"])?
        .expect_ok("rollout restart")?;
    let status = sts_rolled_out(&up, "rollout status after restart")?;
    // With a partition set (0 by default, as in Kubernetes) kubectl calls it partitioned.
    assert!(status.contains("roll out complete"), "{status}");
    up.wait_field(
        30,
        &["pod", "db-0", "-n", "shop"],
        "{.metadata.uid} {.status.phase}",
        |s| !s.starts_with(&uid) && s.ends_with("Running"),
    )?;
    let revs = field(
        &up,
        &["statefulset", "db", "-n", "shop"],
        "{.status.currentRevision} {.status.updateRevision}",
    )?;
    let (current, update) = revs.split_once(' ').unwrap_or_default();
    assert_eq!(current, update, "{revs}");
    // Two templates, two revisions (the first adopted back with the pod), the newest current.
    let history = up
        .kubectl(&["rollout", "history", "statefulset/db", "-n", "shop"])?
        .expect_ok("rollout history sts")?
        .stdout;
    assert!(
        history.contains("\n1 ") && history.contains("\n2 "),
        "{history}"
    );
    let newest = field(
        &up,
        &["controllerrevisions", "-n", "shop", "-l", "app=db"],
        "{range .items[?(@.revision==2)]}{.metadata.name}{end}",
    )?;
    assert_eq!(newest, update, "{revs}");

    // Deleting the namespace stops its pods on their nodes and removes everything in it.
    up.kubectl(&["delete", "namespace", "shop", "--timeout=90s"])?
        .expect_ok("delete namespace")?;
    let left = up
        .kubectl(&["get", "namespace", "shop"])?
        .expect_err("namespace gone")?;
    assert!(left.stderr.contains("not found"), "{}", left.stderr);
    let pods = up
        .kubectl(&[
            "get",
            "pods,statefulsets,endpoints,services",
            "-n",
            "shop",
            "-o",
            "name",
        ])?
        .expect_ok("list")?
        .stdout;
    assert!(pods.trim().is_empty(), "left in shop: {pods}");
    Ok(())
}

/// A PodDisruptionBudget counts its pods' health. An eviction it does not allow gets 429 and
/// the pod stays (`kubectl drain` retries until its timeout); evictions it allows go through,
/// one disruption at a time, while the Deployment replaces the pods elsewhere.
#[test]
fn disruption_budgets_hold_evictions() -> anyhow::Result<()> {
    let (dir, up) = with_module("sleeper")?;
    let _edge = up.join(&dir.path().join("edge-1"), "edge-1")?;
    up.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=module:sleeper",
        "--replicas=2",
    ])?
    .expect_ok("create deployment")?;
    let pods = web_pods(&up, 2, "module:sleeper")?;

    let both = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: bad\nspec:\n  minAvailable: 1\n  maxUnavailable: 50%\n  selector:\n    matchLabels:\n      app: web\n";
    let refused = up
        .kubectl_in(&["apply", "-f", "-"], both)?
        .expect_err("a budget with both bounds")?;
    assert!(
        refused
            .stderr
            .contains("minAvailable and maxUnavailable cannot be both set"),
        "{}",
        refused.stderr
    );

    up.kubectl(&[
        "create",
        "poddisruptionbudget",
        "web",
        "--selector=app=web",
        "--min-available=2",
    ])?
    .expect_ok("create pdb")?;
    let counts = "{.status.currentHealthy}/{.status.desiredHealthy}/{.status.disruptionsAllowed}/{.status.expectedPods}";
    up.wait_field(30, &["pdb", "web"], counts, |s| s == "2/2/0/2")?;
    let table = up.kubectl(&["get", "pdb"])?.expect_ok("get pdb")?.stdout;
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.get(1..4), Some(&["2", "N/A", "0"][..]), "{table}");

    // Over budget: the eviction is refused with the budget's reason, the pod stays.
    let victim = &pods[0];
    let eviction = format!(
        "{{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{{\"name\":\"{victim}\",\"namespace\":\"default\"}}}}"
    );
    let path = format!("/api/v1/namespaces/default/pods/{victim}/eviction");
    let refused = up
        .kubectl_in(&["create", "--raw", &path, "-f", "-"], &eviction)?
        .expect_err("an eviction over budget")?;
    assert!(
        refused.stderr.contains("TooManyRequests")
            && refused
                .stderr
                .contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{}",
        refused.stderr
    );
    let node = field(&up, &["pod", victim], "{.spec.nodeName}")?;
    let drain = up
        .kubectl(&["drain", &node, "--ignore-daemonsets", "--timeout=8s"])?
        .expect_err("a drain over budget")?;
    let said = format!("{}{}", drain.stdout, drain.stderr);
    assert!(said.contains("disruption budget"), "{said}");
    assert_eq!(web_pods(&up, 2, "module:sleeper")?, pods);
    up.wait_field(10, &["pdb", "web"], counts, |s| s == "2/2/0/2")?;

    // One pod may go at a time: the drain evicts, waits for the replacement, evicts again.
    up.kubectl(&[
        "patch",
        "pdb",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/minAvailable"},{"op":"add","path":"/spec/maxUnavailable","value":1}]"#,
    ])?
    .expect_ok("patch pdb")?;
    up.wait_field(30, &["pdb", "web"], counts, |s| s == "2/1/1/2")?;
    up.kubectl(&["drain", &node, "--ignore-daemonsets", "--timeout=90s"])?
        .expect_ok("a drain within budget")?;
    let moved = web_pods(&up, 2, "module:sleeper")?;
    for p in &moved {
        assert_ne!(field(&up, &["pod", p], "{.spec.nodeName}")?, node, "{p}");
    }
    assert!(!moved.contains(victim));
    up.wait_field(30, &["pdb", "web"], counts, |s| s == "2/1/1/2")?;

    // An evicted pod is told why before it goes (held here by a finalizer to look at it).
    let held = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\nspec:\n  containers:\n  - name: main\n    image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], held)?
        .expect_ok("apply held")?;
    up.wait_field(60, &["pod", "held"], "{.status.phase}", |s| s == "Running")?;
    let eviction = "{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{\"name\":\"held\",\"namespace\":\"default\"}}";
    up.kubectl_in(
        &[
            "create",
            "--raw",
            "/api/v1/namespaces/default/pods/held/eviction",
            "-f",
            "-",
        ],
        eviction,
    )?
    .expect_ok("evict held")?;
    up.wait_field(
        30,
        &["pod", "held"],
        "{.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"DisruptionTarget\")].reason}",
        |s| s.ends_with(" EvictionByEvictionAPI") && !s.starts_with(' '),
    )?;
    up.kubectl(&[
        "patch",
        "pod",
        "held",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?
    .expect_ok("release held")?;
    Ok(())
}

/// A CronJob starts a Job at each scheduled minute (named after it, owned by the CronJob),
/// records its last schedule and success, refuses a bad schedule with the field, and takes
/// its Jobs with it when deleted. `kubectl create job --from=cronjob/…` runs its template.
#[test]
fn cronjobs_start_jobs_on_schedule() -> anyhow::Result<()> {
    let (_dir, up) = with_module("hello")?;
    let bad = up
        .kubectl(&[
            "create",
            "cronjob",
            "bad",
            "--image=module:hello",
            "--schedule=61 * * * *",
        ])?
        .expect_err("a bad schedule")?;
    assert!(
        bad.stderr
            .contains("spec.schedule: Invalid value: \"61 * * * *\""),
        "{}",
        bad.stderr
    );
    up.kubectl(&[
        "create",
        "cronjob",
        "tick",
        "--image=module:hello",
        "--schedule=* * * * *",
    ])?
    .expect_ok("create cronjob")?;
    // Within a minute (and the run's own time) a Job has started and succeeded.
    up.wait_field(
        100,
        &["cronjob", "tick"],
        "{.status.lastSuccessfulTime}",
        |s| !s.is_empty(),
    )?;
    let jobs = field(
        &up,
        &["jobs"],
        "{range .items[*]}{.metadata.name} {.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {.metadata.annotations.batch\\.kubernetes\\.io/cronjob-scheduled-timestamp}{\"\\n\"}{end}",
    )?;
    let first = jobs.lines().next().unwrap_or_default().to_string();
    let parts: Vec<&str> = first.split(' ').collect();
    assert_eq!(parts.get(1), Some(&"CronJob/tick"), "{jobs}");
    // Named after its scheduled minute, which the annotation gives.
    let scheduled: jiff::Timestamp = parts.get(2).unwrap_or(&"").parse()?;
    assert_eq!(
        parts[0],
        format!("tick-{}", scheduled.as_second() / 60),
        "{jobs}"
    );
    let last = field(&up, &["cronjob", "tick"], "{.status.lastScheduleTime}")?;
    assert!(last.parse::<jiff::Timestamp>()? >= scheduled, "{last}");
    let table = up
        .kubectl(&["get", "cronjob", "tick"])?
        .expect_ok("get")?
        .stdout;
    assert!(table.contains("* * * * *"), "{table}");

    up.kubectl(&["create", "job", "--from=cronjob/tick", "manual"])?
        .expect_ok("create job --from")?;
    up.wait_field(60, &["job", "manual"], "{.status.succeeded}", |s| s == "1")?;

    up.kubectl(&["delete", "cronjob", "tick"])?
        .expect_ok("delete cronjob")?;
    up.wait_field(60, &["jobs"], "{.items[*].metadata.name}", |s| {
        s.split_whitespace().all(|j| j == "manual")
    })?;
    Ok(())
}

/// A Job's pod failure policy ends it on the exit code it names, and a limit per index gives
/// up one index while the others complete; a policy with a restartPolicy other than Never is
/// refused with the field.
#[test]
fn pod_failure_policies_and_backoff_per_index() -> anyhow::Result<()> {
    let (_dir, up) = with_module("hello")?;
    let job = |name: &str, restart: &str, spec: &str, env: &str| {
        format!("apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{spec}  template:\n    spec:\n      restartPolicy: {restart}\n      containers:\n      - name: main\n        image: module:hello\n        env:\n{env}")
    };
    let policy = "  podFailurePolicy:\n    rules:\n    - action: FailJob\n      onExitCodes:\n        containerName: main\n        operator: In\n        values: [42]\n";
    let refused = up
        .kubectl_in(
            &["apply", "-f", "-"],
            &job(
                "bad",
                "OnFailure",
                policy,
                "        - {name: X, value: \"1\"}\n",
            ),
        )?
        .expect_err("a policy with OnFailure")?;
    assert!(
        refused
            .stderr
            .contains("only \"Never\" is supported when podFailurePolicy is specified"),
        "{}",
        refused.stderr
    );
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job(
            "stop",
            "Never",
            policy,
            "        - {name: EXIT_CODE, value: \"42\"}\n",
        ),
    )?
    .expect_ok("apply stop")?;
    let failed = "{.status.conditions[?(@.type==\"Failed\")].reason}";
    up.wait_field(60, &["job", "stop"], failed, |s| s == "PodFailurePolicy")?;
    let said = field(
        &up,
        &["job", "stop"],
        "{.status.conditions[?(@.type==\"Failed\")].message} {.status.failed}",
    )?;
    assert!(
        said.contains("failed with exit code 42 matching FailJob rule at index 0")
            && said.ends_with(" 1"),
        "{said}"
    );

    let indexed = "  completionMode: Indexed\n  completions: 3\n  parallelism: 3\n  backoffLimitPerIndex: 1\n";
    up.kubectl_in(
        &["apply", "-f", "-"],
        &job(
            "per-index",
            "Never",
            indexed,
            "        - {name: EXIT_CODE, value: \"3\"}\n        - {name: EXIT_INDEX, value: \"1\"}\n",
        ),
    )?
    .expect_ok("apply per-index")?;
    up.wait_field(90, &["job", "per-index"], failed, |s| s == "FailedIndexes")?;
    let indexes = field(
        &up,
        &["job", "per-index"],
        "{.status.completedIndexes} {.status.failedIndexes} {.spec.backoffLimit}",
    )?;
    assert_eq!(indexes, "0,2 1 2147483647");
    let tries = field(
        &up,
        &[
            "pods",
            "-l",
            "batch.kubernetes.io/job-completion-index=1,job-name=per-index",
        ],
        "{.items[*].status.phase}",
    )?;
    assert_eq!(tries, "Failed Failed", "index 1 ran twice");
    // The second try waited out the back-off (10 s after the first failure).
    let created = field(
        &up,
        &[
            "pods",
            "-l",
            "batch.kubernetes.io/job-completion-index=1,job-name=per-index",
        ],
        "{.items[*].metadata.creationTimestamp}",
    )?;
    let mut at: Vec<jiff::Timestamp> = created
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    at.sort();
    assert!(
        at.len() == 2 && (at[1] - at[0]).get_seconds() >= 9,
        "{created}"
    );
    Ok(())
}

/// Wait until pod `name` is Running as a pod other than `not_uid`; its uid.
fn running_anew(up: &Up, name: &str, not_uid: &str) -> anyhow::Result<String> {
    let out = up.wait_field(60, &["pod", name], "{.metadata.uid} {.status.phase}", |s| {
        s.ends_with(" Running") && !s.starts_with(not_uid)
    })?;
    Ok(out.split(' ').next().unwrap_or_default().to_string())
}

/// A StatefulSet's claim templates give each pod its own claim, provisioned as a local
/// volume on the pod's node by the default `local-path` class; the data outlives the pod;
/// claims stay when the set scales down and their volumes (and directories) go when they are
/// deleted; with `whenScaled: Delete` they go with their pods. A static hostPath volume binds to a claim that asks for its class; that claim,
/// deleted while its pod runs, waits for the pod. A claim that leaves out what it must say is
/// refused with the field.
#[test]
fn statefulset_claims_get_local_volumes_that_outlive_pods() -> anyhow::Result<()> {
    let (dir, up) = with_module("sleeper")?;
    let classes = up
        .kubectl(&["get", "storageclass"])?
        .expect_ok("get sc")?
        .stdout;
    assert!(
        classes.contains("local-path (default)")
            && classes.contains("outpost.dev/local-path")
            && classes.contains("WaitForFirstConsumer"),
        "{classes}"
    );
    let manifest = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: web\nspec:\n  serviceName: web\n  replicas: 2\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: web\n        image: module:sleeper\n        env:\n        - name: STATE_FILE\n          value: /data/state\n        volumeMounts:\n        - name: data\n          mountPath: /data\n  volumeClaimTemplates:\n  - metadata:\n      name: data\n    spec:\n      accessModes: [ReadWriteOnce]\n      resources:\n        requests:\n          storage: 64Mi\n";
    up.kubectl_in(&["apply", "-f", "-"], manifest)?
        .expect_ok("apply")?;
    up.kubectl(&["rollout", "status", "statefulset/web", "--timeout=90s"])?
        .expect_ok("rollout status")?;
    let claim = field(
        &up,
        &["pvc", "data-web-0"],
        "{.status.phase} {.spec.storageClassName} {.spec.volumeName} {.status.capacity.storage}",
    )?;
    let parts: Vec<&str> = claim.split(' ').collect();
    assert_eq!(parts.len(), 4, "{claim}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("Bound", "local-path", "64Mi")
    );
    let pv = parts[2];
    let table = up.kubectl(&["get", "pvc"])?.expect_ok("get pvc")?.stdout;
    assert!(
        table.contains("data-web-1") && table.contains("RWO") && table.contains("Bound"),
        "{table}"
    );
    // The volume is a directory on the pod's node, and only that node can take the pod.
    let node = field(&up, &["pod", "web-0"], "{.spec.nodeName}")?;
    let volume = field(
        &up,
        &["pv", pv],
        "{.spec.hostPath.path} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]} {.spec.claimRef.name} {.status.phase} {.spec.persistentVolumeReclaimPolicy}",
    )?;
    let v: Vec<&str> = volume.split(' ').collect();
    assert_eq!(
        &v[1..],
        [node.as_str(), "data-web-0", "Bound", "Delete"],
        "{volume}"
    );
    let path = std::path::PathBuf::from(v[0]);
    assert_eq!(
        std::fs::read_to_string(path.join("state"))?,
        "started\n",
        "the pod wrote into its volume"
    );
    let logs = |pod: &str| -> anyhow::Result<String> {
        Ok(up.kubectl(&["logs", pod])?.expect_ok("logs")?.stdout)
    };
    assert!(logs("web-0")?.contains("starts: 1"), "{}", logs("web-0")?);

    // A new web-0 gets the same claim, and finds what the last one wrote.
    let uid = field(&up, &["pod", "web-0"], "{.metadata.uid}")?;
    up.kubectl(&["delete", "pod", "web-0", "--wait=true"])?
        .expect_ok("delete pod")?;
    running_anew(&up, "web-0", &uid)?;
    let t = Instant::now();
    while !logs("web-0")?.contains("starts: 2") {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", logs("web-0")?);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        field(&up, &["pvc", "data-web-0"], "{.spec.volumeName}")?,
        pv
    );

    // Scaled down, the claim stays (the default retention); deleted, its volume goes, and
    // the node removes the directory.
    up.kubectl(&["scale", "statefulset", "web", "--replicas=1"])?
        .expect_ok("scale")?;
    up.kubectl(&["wait", "--for=delete", "pod/web-1", "--timeout=60s"])?
        .expect_ok("web-1 gone")?;
    let pv1 = field(
        &up,
        &["pvc", "data-web-1"],
        "{.status.phase} {.spec.volumeName}",
    )?;
    let (phase, pv1) = pv1.split_once(' ').unwrap_or_default();
    assert_eq!(phase, "Bound");
    let dir1 = field(&up, &["pv", pv1], "{.spec.hostPath.path}")?;
    assert!(std::path::Path::new(&dir1).is_dir(), "{dir1}");
    up.kubectl(&["delete", "pvc", "data-web-1"])?
        .expect_ok("delete pvc")?;
    up.kubectl(&[
        "wait",
        "--for=delete",
        &format!("pv/{pv1}"),
        "--timeout=30s",
    ])?
    .expect_ok("volume deleted with its claim")?;
    let t = Instant::now();
    while std::path::Path::new(&dir1).exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{dir1} still there");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(path.is_dir(), "the other claim's directory stays");

    // With `whenScaled: Delete`, a pod scaled away takes its claim (and the volume) with it;
    // scaled up again, the pod gets a new, empty one.
    up.kubectl(&[
        "patch",
        "statefulset",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"persistentVolumeClaimRetentionPolicy":{"whenScaled":"Delete"}}}"#,
    ])?
    .expect_ok("patch retention")?;
    up.kubectl(&["scale", "statefulset", "web", "--replicas=0"])?
        .expect_ok("scale to 0")?;
    up.kubectl(&["wait", "--for=delete", "pvc/data-web-0", "--timeout=60s"])?
        .expect_ok("claim deleted with its pod")?;
    up.kubectl(&["wait", "--for=delete", &format!("pv/{pv}"), "--timeout=30s"])?
        .expect_ok("its volume deleted")?;
    up.kubectl(&["scale", "statefulset", "web", "--replicas=1"])?
        .expect_ok("scale to 1")?;
    running_anew(&up, "web-0", &uid)?;
    let fresh = field(&up, &["pvc", "data-web-0"], "{.spec.volumeName}")?;
    assert!(!fresh.is_empty() && fresh != pv, "{fresh}");
    let t = Instant::now();
    while !logs("web-0")?.contains("starts: 1") {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", logs("web-0")?);
        std::thread::sleep(Duration::from_millis(250));
    }

    // A static volume: bound to the claim that asks for its class and fits, used by a pod.
    let host = dir.path().join("static");
    std::fs::create_dir_all(&host)?;
    let manifest = format!("apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: manual-1\nspec:\n  storageClassName: manual\n  capacity:\n    storage: 1Gi\n  accessModes: [ReadWriteOnce]\n  hostPath:\n    path: {}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: notes\nspec:\n  storageClassName: manual\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 100Mi\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: notes\nspec:\n  runtimeClassName: wasm\n  containers:\n  - name: notes\n    image: module:sleeper\n    env:\n    - name: STATE_FILE\n      value: /notes/state\n    volumeMounts:\n    - name: notes\n      mountPath: /notes\n  volumes:\n  - name: notes\n    persistentVolumeClaim:\n      claimName: notes\n", host.display());
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply static")?;
    up.wait_field(
        30,
        &["pvc", "notes"],
        "{.status.phase} {.spec.volumeName}",
        |s| s == "Bound manual-1",
    )?;
    up.wait_field(60, &["pod", "notes"], "{.status.phase}", |s| s == "Running")?;
    let t = Instant::now();
    while std::fs::read_to_string(host.join("state")).unwrap_or_default() != "started\n" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "nothing written to {host:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let pvs = up
        .kubectl(&["get", "pv", "manual-1"])?
        .expect_ok("get pv")?
        .stdout;
    assert!(
        pvs.contains("default/notes") && pvs.contains("Retain") && pvs.contains("manual"),
        "{pvs}"
    );

    // Deleted while its pod runs, the claim waits for the pod; then its volume is released
    // (kept, as its policy says).
    up.kubectl(&["delete", "pvc", "notes", "--wait=false"])?
        .expect_ok("delete pvc")?;
    std::thread::sleep(Duration::from_secs(2));
    let table = up
        .kubectl(&["get", "pvc", "notes"])?
        .expect_ok("get pvc")?
        .stdout;
    assert!(table.contains("Terminating"), "{table}");
    assert_eq!(field(&up, &["pod", "notes"], "{.status.phase}")?, "Running");
    up.kubectl(&["delete", "pod", "notes"])?
        .expect_ok("delete pod")?;
    up.kubectl(&["wait", "--for=delete", "pvc/notes", "--timeout=30s"])?
        .expect_ok("claim gone with its pod")?;
    up.wait_field(30, &["pv", "manual-1"], "{.status.phase}", |s| {
        s == "Released"
    })?;
    assert_eq!(std::fs::read_to_string(host.join("state"))?, "started\n");

    // A claim without access modes or size is refused, naming both fields.
    let bad = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: bad\nspec:\n  resources: {}\n";
    let out = up.kubectl_in(&["apply", "-f", "-"], bad)?;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("spec.accessModes: Required value")
            && out
                .stderr
                .contains("spec.resources[storage]: Required value"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn replication_controllers_and_cluster_info_dump() -> anyhow::Result<()> {
    let (_dir, up) = with_module("sleeper")?;
    // No selector and no labels: both come from the template's labels.
    let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      containers:\n      - name: web\n        image: module:sleeper\n";
    up.kubectl_in(&["apply", "-f", "-"], rc)?
        .expect_ok("apply rc")?;
    let pods = web_pods(&up, 2, "module:sleeper")?;
    let owner = field(
        &up,
        &["pod", &pods[0]],
        "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
    )?;
    assert_eq!(owner, "ReplicationController/web");
    assert_eq!(
        field(
            &up,
            &["rc", "web"],
            "{.spec.selector.app} {.metadata.labels.app}"
        )?,
        "web web"
    );
    up.wait_field(30, &["rc", "web"], "{.status.readyReplicas}", |s| s == "2")?;
    let table = up
        .kubectl(&["get", "rc", "-o", "wide"])?
        .expect_ok("get rc")?;
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or("");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols.get(1..4),
        Some(&["2", "2", "2"][..]),
        "{}",
        table.stdout
    );
    assert_eq!(cols.last(), Some(&"app=web"), "{}", table.stdout);

    // Scaled through the scale subresource; a pod deleted is replaced.
    up.kubectl(&["scale", "rc", "web", "--replicas=3"])?
        .expect_ok("scale rc")?;
    let pods = web_pods(&up, 3, "module:sleeper")?;
    up.kubectl(&["delete", "pod", &pods[0]])?
        .expect_ok("delete pod")?;
    let again = web_pods(&up, 3, "module:sleeper")?;
    assert!(!again.contains(&pods[0]), "{again:?}");
    let described = up
        .kubectl(&["describe", "rc", "web"])?
        .expect_ok("describe rc")?;
    assert!(
        described.stdout.contains("3 current / 3 desired"),
        "{}",
        described.stdout
    );

    // A template its selector does not take is refused with the field.
    let bad = rc.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  selector:\n    app: other\n",
    );
    let bad = bad.replace("name: web\nspec", "name: bad\nspec");
    let refused = up
        .kubectl_in(&["apply", "-f", "-"], &bad)?
        .expect_err("apply a mismatched rc")?;
    assert!(
        refused.stderr.contains("spec.template.metadata.labels"),
        "{}",
        refused.stderr
    );

    // `cluster-info dump` lists every kind it asks for and the pods' logs.
    let dump = up
        .kubectl(&["cluster-info", "dump", "--namespaces", "default"])?
        .expect_ok("cluster-info dump")?;
    for want in [
        "\"kind\": \"ReplicationControllerList\"",
        "\"kind\": \"NodeList\"",
        "==== START logs for container web of pod default/",
    ] {
        assert!(dump.stdout.contains(want), "no {want} in the dump");
    }
    assert!(
        dump.stdout.contains("\nup\n"),
        "no sleeper output in the dump"
    );

    // Deleted, it takes its pods with it.
    up.kubectl(&["delete", "rc", "web", "--cascade=foreground"])?
        .expect_ok("delete rc")?;
    up.wait_field(
        60,
        &["pods", "-l", "app=web"],
        "{.items[*].metadata.name}",
        |s| s.is_empty(),
    )?;
    Ok(())
}
