//! Edge nodes end to end: `outpost up` with its own node and joined `outpost-node`
//! processes, Wasm pods driven by the real kubectl, the node link's refusals, and a node that
//! keeps its pods through a control-plane outage and an agent restart.

use std::time::{Duration, Instant};

use outpost_tests::{example, free_tcp_port, http_get as get, http_get_at, python, Node, Up};

fn push(up: &Up, name: &str) -> anyhow::Result<String> {
    let path = example(name)?;
    let r = up
        .outpost(&["module", "push", path.to_str().unwrap_or_default()])?
        .expect_ok("outpost module push")?;
    let image = r.stdout.trim().to_string();
    assert!(image.starts_with("module:sha256:"), "{image}");
    Ok(image)
}

fn pod_yaml(name: &str, image: &str, policy: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  runtimeClassName: wasm\n  restartPolicy: {policy}\n  containers:\n  - name: main\n    image: {image}\n{extra}"
    )
}

/// The http-hello example from its own manifest, on a port no other test uses, once its
/// readiness probe (GET /healthz) has made it Ready. Returns the port.
fn http_hello(up: &Up) -> anyhow::Result<u16> {
    push(up, "http-hello")?;
    let port = outpost_tests::free_tcp_port();
    let manifest = std::fs::read_to_string(
        outpost_tests::crate_dir().join("../examples/http-hello/pod.yaml"),
    )?
    .replace("containerPort: 8080", &format!("containerPort: {port}"));
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply http-hello")?;
    up.wait_field(
        60,
        &["pod", "http-hello"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "True",
    )?;
    // Ready keeps no reason from before it was; its container has an id of its own.
    let r = up
        .kubectl(&[
            "get",
            "pod",
            "http-hello",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}|{.status.containerStatuses[0].containerID}",
        ])?
        .expect_ok("ready reason")?;
    let (reason, id) = r.stdout.split_once('|').unwrap_or_default();
    anyhow::ensure!(reason.is_empty(), "{}", r.stdout);
    anyhow::ensure!(id.starts_with("wasm://") && id.len() == 39, "{}", r.stdout);
    Ok(port)
}

/// `kubectl port-forward` reaches a pod through its node's link, in each protocol kubectl and
/// the Python client speak; a port the pod does not have is refused with the reason.
#[test]
fn port_forward_reaches_a_pod_through_its_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let port = http_hello(&up)?;
    // A command pod shares the node's network, so one declaring the port of an echo server this test
    // runs reaches it: bulk bytes both ways, and a half-close that passes through.
    let echo_port = outpost_tests::echo_server()?;
    push(&up, "sleeper")?;
    let holder = format!(
        "{}    ports:\n    - containerPort: {echo_port}\n",
        pod_yaml("echo", "module:sleeper", "Always", "")
    );
    up.kubectl_in(&["apply", "-f", "-"], &holder)?
        .expect_ok("apply echo")?;
    up.wait_field(60, &["pod", "echo"], "{.status.phase}", |p| p == "Running")?;
    let bulk: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let remote = format!(":{port}");
    // kubectl 1.32 tunnels SPDY through a WebSocket; told not to, it speaks SPDY directly, as
    // kubectl 1.29 always does.
    type Env<'a> = &'a [(&'a str, &'a str)];
    let kinds: [(Option<&str>, Env<'_>); 3] = [
        (None, &[]),
        (None, &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]),
        (Some("1.29"), &[]),
    ];
    for (minor, env) in kinds {
        let fwd = up.port_forward(minor, env, &["pod/http-hello", &remote])?;
        // Connections one after another, then several at once, share the one session.
        for i in 0..3 {
            let (code, body) = get(fwd.local, &format!("/forwarded/{i}"))
                .map_err(|e| anyhow::anyhow!("{minor:?} {env:?}: {e}\n{}", fwd.stderr()))?;
            assert_eq!(code, 200, "{minor:?} {env:?}: {body} {}", fwd.stderr());
            assert_eq!(body, format!("hello from Outpost at /forwarded/{i}\n"));
        }
        let local = fwd.local;
        let at_once: Vec<_> = (0..4)
            .map(|i| std::thread::spawn(move || get(local, &format!("/at/once/{i}"))))
            .collect();
        for (i, h) in at_once.into_iter().enumerate() {
            let (code, body) = h.join().map_err(|_| anyhow::anyhow!("request thread"))??;
            assert_eq!(code, 200, "{minor:?} {env:?}: {body}");
            assert_eq!(body, format!("hello from Outpost at /at/once/{i}\n"));
        }
        let fwd = up.port_forward(minor, env, &["pod/echo", &format!(":{echo_port}")])?;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", fwd.local))?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut reader = conn.try_clone()?;
        let sent = bulk.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            std::io::Write::write_all(&mut conn, &sent)?;
            conn.shutdown(std::net::Shutdown::Write)
        });
        let mut back = Vec::with_capacity(bulk.len());
        std::io::Read::read_to_end(&mut reader, &mut back)?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread"))??;
        assert!(
            back == bulk,
            "{minor:?} {env:?}: {} of {} bytes came back intact: {}",
            back.len(),
            bulk.len(),
            fwd.stderr()
        );
    }
    // The Python client speaks the channel protocol instead of SPDY.
    let script = outpost_tests::crate_dir().join("py/portforward.py");
    let out = std::process::Command::new(python()?)
        .arg(&script)
        .arg("http-hello")
        .arg(port.to_string())
        .env("KUBECONFIG", &up.kubeconfig)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from Outpost at /from/python"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A port nothing listens on: kubectl says why, and the connection gets no answer. A pod
    // on the node's network (the echo pod, a command) reaches only the ports it declares; a
    // pod with an address of its own (the component), any of its own.
    for (pod, why) in [
        ("echo", "port 9 is not a port of pod default/echo"),
        (
            "http-hello",
            "error forwarding port 9 to pod default/http-hello: dial tcp",
        ),
    ] {
        let bad = up.port_forward(None, &[], &[&format!("pod/{pod}"), ":9"])?;
        let answer = get(bad.local, "/nope");
        assert!(
            answer.as_ref().map_or(true, |(code, _)| *code == 0),
            "{answer:?}"
        );
        let t = Instant::now();
        while !bad.stderr().contains(why) {
            assert!(t.elapsed() < Duration::from_secs(10), "{}", bad.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

#[test]
fn wasm_examples_run_through_kubectl() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    for n in ["hello", "memory-hog", "cpu-burner"] {
        push(&up, n)?;
    }
    let examples = outpost_tests::crate_dir().join("../examples");
    for n in ["hello", "memory-hog", "cpu-burner"] {
        let f = examples.join(n).join("pod.yaml");
        up.kubectl(&["apply", "-f", f.to_str().unwrap_or_default()])?
            .expect_ok("kubectl apply")?;
    }
    // hello prints and exits 0: Succeeded, and its output is what kubectl logs shows.
    up.wait_field(60, &["pod", "hello"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let logs = up.kubectl(&["logs", "hello"])?.expect_ok("kubectl logs")?;
    assert!(logs.stdout.contains("Hello, world!"), "{}", logs.stdout);
    assert!(
        logs.stdout.contains("args: from the edge"),
        "{}",
        logs.stdout
    );
    assert!(logs.stdout.contains("pod: hello"), "{}", logs.stdout);
    // The memory hog is stopped at its limit with the kubelet's reason.
    up.wait_field(60, &["pod", "memory-hog"], "{.status.phase}", |p| {
        p == "Failed"
    })?;
    let reason = up.wait_field(
        5,
        &["pod", "memory-hog"],
        "{.status.containerStatuses[0].state.terminated.reason}/{.status.containerStatuses[0].state.terminated.exitCode}",
        |r| !r.is_empty(),
    )?;
    assert_eq!(reason, "OOMKilled/137");
    // The burner runs, shows in `get pods` as Running on the local node, logs as it goes.
    up.wait_field(60, &["pod", "cpu-burner"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let node = up.wait_field(5, &["pod", "cpu-burner"], "{.spec.nodeName}", |n| {
        !n.is_empty()
    })?;
    up.wait_field(
        10,
        &["node", &node],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "True",
    )?;
    // Its lease, renewed over the link and kept in memory, is there for describe and get.
    let described = up
        .kubectl(&["describe", "node", &node])?
        .expect_ok("describe node")?;
    assert!(
        described
            .stdout
            .lines()
            .any(|l| l.trim() == format!("HolderIdentity:  {node}")),
        "{}",
        described.stdout
    );
    let holder = up
        .kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            &node,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?
        .expect_ok("get lease")?;
    assert_eq!(holder.stdout, node);
    // The host's boot id, as a kubelet reports it (a reboot shows as a new one).
    let boot = up
        .kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.status.nodeInfo.bootID}",
        ])?
        .expect_ok("boot id")?;
    let here = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    assert_eq!(boot.stdout, here.trim());
    let t = Instant::now();
    loop {
        let r = up
            .kubectl(&["logs", "cpu-burner", "--tail", "1"])?
            .expect_ok("logs --tail")?;
        if r.stdout.contains("rounds/s") {
            assert_eq!(r.stdout.trim().lines().count(), 1, "{}", r.stdout);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no output from the burner"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // `kubectl top` reads what the node measures: the burner holds about its fifth of a
    // core, and the node shows at least that.
    let t = Instant::now();
    let (cpu, memory) = loop {
        let r = up.kubectl(&["top", "pod", "cpu-burner", "--no-headers"])?;
        // `cpu-burner   199m   1Mi`
        let cols: Vec<String> = r.stdout.split_whitespace().map(String::from).collect();
        if r.ok && cols.len() == 3 {
            break (cols[1].clone(), cols[2].clone());
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "kubectl top pod: {} {}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let millis: u64 = cpu.trim_end_matches('m').parse()?;
    assert!((120..=300).contains(&millis), "the burner at {cpu}");
    assert!(memory.ends_with("Mi") || memory.ends_with("Ki"), "{memory}");
    let containers = up
        .kubectl(&["top", "pod", "--containers", "--no-headers"])?
        .expect_ok("kubectl top pod --containers")?;
    assert!(
        containers
            .stdout
            .lines()
            .any(|l| l.starts_with("cpu-burner") && l.contains("burner")),
        "{}",
        containers.stdout
    );
    let nodes = up
        .kubectl(&["top", "node", "--no-headers"])?
        .expect_ok("kubectl top node")?;
    let row: Vec<&str> = nodes.stdout.split_whitespace().collect();
    assert_eq!(row.first(), Some(&node.as_str()), "{}", nodes.stdout);
    let node_millis: u64 = row.get(1).unwrap_or(&"").trim_end_matches('m').parse()?;
    assert!(node_millis >= millis / 2, "{}", nodes.stdout);
    assert!(
        row.get(2).is_some_and(|p| p.ends_with('%')),
        "{}",
        nodes.stdout
    );
    let raw = up
        .kubectl(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes/none"])?
        .expect_err("metrics of a node that does not exist")?;
    assert!(raw.stderr.contains("NotFound"), "{}", raw.stderr);
    // Graceful delete: the node stops the guest and removes the pod.
    let t = Instant::now();
    up.kubectl(&["delete", "pod", "cpu-burner", "--timeout", "30s"])?
        .expect_ok("kubectl delete")?;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "delete took {:?}",
        t.elapsed()
    );
    up.kubectl(&["get", "pod", "cpu-burner"])?
        .expect_err("the pod is gone")?;
    // The same program as a WASI preview 2 component runs the same way.
    let p2 = push(&up, "hello-p2")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml(
            "hello-p2",
            &p2,
            "Never",
            // `$(VAR)` refers to earlier variables, in env values and in args, as with kubelet.
            "    env:\n    - name: WHO\n      value: component\n    - name: WHAT\n      value: a $(WHO)\n    args: [\"as\", \"$(WHAT)\", \"$$(WHAT)\", \"$(NOPE)\"]\n",
        ),
    )?
    .expect_ok("apply the component")?;
    up.wait_field(60, &["pod", "hello-p2"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let logs = up
        .kubectl(&["logs", "hello-p2"])?
        .expect_ok("logs of the component")?;
    assert!(
        logs.stdout.contains("args: as a component $(WHAT) $(NOPE)"),
        "{}",
        logs.stdout
    );
    // A module that is not there, and an image that is not a module: clear reasons.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml("missing", "module:no-such-module", "Never", ""),
    )?
    .expect_ok("apply")?;
    let msg = up.wait_field(
        30,
        &["pod", "missing"],
        "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        |m| m.starts_with("ErrImagePull"),
    )?;
    assert!(msg.contains("no module named"), "{msg}");
    // kubectl run -i: a Wasm guest reads what kubectl sends, to its end.
    let r = up.run_interactively(
        "reader",
        "module:hello",
        &["--env=READ_STDIN=1"],
        "one\ntwo\n",
    )?;
    assert!(r.ok, "{r:?}");
    assert!(
        r.stdout.contains("read: one\nread: two\nend of input\n")
            && !r.stderr.contains("falling back"),
        "{r:?}"
    );
    Ok(())
}

#[test]
fn a_crashing_pod_backs_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let image = push(&up, "hello")?;
    // hello exits at once; restartPolicy Always restarts it with the kubelet's back-off.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml("crashy", &image, "Always", ""),
    )?
    .expect_ok("apply")?;
    let state = up.wait_field(
        30,
        &["pod", "crashy"],
        "{.status.containerStatuses[0].state.waiting.reason}",
        |r| r == "CrashLoopBackOff",
    )?;
    assert_eq!(state, "CrashLoopBackOff");
    let last = up.wait_field(
        5,
        &["pod", "crashy"],
        "{.status.containerStatuses[0].lastState.terminated.exitCode}",
        |c| !c.is_empty(),
    )?;
    assert_eq!(last, "0");
    // The first back-off is 10 s; then it runs again and the count goes up.
    up.wait_field(
        40,
        &["pod", "crashy"],
        "{.status.containerStatuses[0].restartCount}",
        |c| c.parse::<u32>().unwrap_or(0) >= 1,
    )?;
    let prev = up
        .kubectl(&["logs", "crashy", "--previous"])?
        .expect_ok("logs --previous")?;
    assert!(prev.stdout.contains("Hello"), "{}", prev.stdout);
    // Each run is started the same way: one event, counted, as the kubelet records it.
    let counts = up.wait_field(
        10,
        &[
            "events",
            "--field-selector",
            "involvedObject.name=crashy,reason=Started",
        ],
        "{.items[*].count}",
        |c| c.split_whitespace().any(|n| n != "1"),
    )?;
    assert!(
        counts.split_whitespace().count() == 1 && counts.trim().parse::<u32>()? >= 2,
        "one Started event with a count of the runs: {counts}"
    );
    // Before each start, the image (a module here) and the container, as the kubelet says:
    // the module is present once the first run has fetched it.
    let pulled = up.wait_field(
        10,
        &[
            "events",
            "--field-selector",
            "involvedObject.name=crashy,reason=Pulled",
        ],
        "{.items[*].message}",
        |m| m.contains("already present on machine"),
    )?;
    assert!(pulled.contains("Container image \"module:"), "{pulled}");
    let created = up.wait_field(
        10,
        &[
            "events",
            "--field-selector",
            "involvedObject.name=crashy,reason=Created",
        ],
        "{.items[*].message}",
        |m| !m.is_empty(),
    )?;
    assert_eq!(created, "Created container main");
    // The same event through events.k8s.io, in that group's names.
    let new = up
        .kubectl(&[
            "get",
            "events.v1.events.k8s.io",
            "--field-selector",
            "regarding.name=crashy,reason=Started",
            "-o",
            "jsonpath={.items[*].deprecatedCount} {.items[*].note} {.items[*].reportingController}",
        ])?
        .expect_ok("events.k8s.io")?;
    let count = new.stdout.split_whitespace().next().unwrap_or("");
    assert!(
        count.parse::<u32>()? >= counts.trim().parse()?
            && new.stdout.contains("Started container")
            && new.stdout.ends_with("kubelet"),
        "{}",
        new.stdout
    );
    Ok(())
}

#[test]
fn nodes_join_with_tokens_and_see_only_their_own() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let token = up.token()?;
    assert!(token.starts_with("op1."), "{token}");
    let mut edge = Node::new(&dir.path().join("edge-1"));
    edge.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &token,
        "--name",
        "edge-1",
        "--node-ip",
        "203.0.113.77",
    ])?;
    up.node_ready(&edge, "edge-1", 30)?;
    // The address it was given, not the one it reaches the control plane from.
    let ip = up.wait_field(
        5,
        &["node", "edge-1"],
        "{.status.addresses[?(@.type==\"InternalIP\")].address}",
        |a| !a.is_empty(),
    )?;
    assert_eq!(ip, "203.0.113.77");
    let arch = up.wait_field(
        5,
        &["node", "edge-1"],
        "{.metadata.labels.kubernetes\\.io/arch}",
        |a| !a.is_empty(),
    )?;
    assert!(["amd64", "arm64"].contains(&arch.as_str()), "{arch}");

    // The token was for one join: a second node is refused, and says why.
    let mut second = Node::new(&dir.path().join("edge-2"));
    second.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &token,
        "--name",
        "edge-2",
    ])?;
    assert!(!second.wait_exit(30)?.success());
    assert!(
        second.logs().contains("already been used"),
        "{}",
        second.logs()
    );
    // A second machine under the name of a node that is connected is refused, and the
    // token is not spent: it still joins a machine of another name.
    let fresh = up.token()?;
    let mut twin = Node::new(&dir.path().join("twin"));
    twin.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &fresh,
        "--name",
        "edge-1",
    ])?;
    assert!(!twin.wait_exit(30)?.success());
    assert!(
        twin.logs()
            .contains("a node named \"edge-1\" is connected to the cluster now"),
        "{}",
        twin.logs()
    );
    let mut fourth = Node::new(&dir.path().join("edge-4"));
    fourth.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &fresh,
        "--name",
        "edge-4",
    ])?;
    up.node_ready(&fourth, "edge-4", 30)?;
    // A token whose CA hash is not this cluster's: the node will not trust the gateway.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = "0".repeat(64);
    let mut third = Node::new(&dir.path().join("edge-3"));
    third.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &parts.join("."),
        "--name",
        "edge-3",
    ])?;
    let status = third.wait_exit(40);
    third.kill();
    assert!(
        third.logs().contains("does not match the token's CA hash"),
        "{status:?} {}",
        third.logs()
    );

    // A pod pinned to edge-1 runs there, and kubectl logs reaches it through its link. It
    // prints what the ServiceAccount admission mounted for it: a token bound to the pod, the
    // cluster CA and its namespace.
    let image = push(&up, "hello")?;
    let extra = "  nodeName: edge-1\n";
    let sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let show = format!("    env:\n    - name: SHOW_FILES\n      value: {sa_dir}/namespace,{sa_dir}/ca.crt,{sa_dir}/token\n");
    let yaml =
        pod_yaml("on-edge", &image, "Never", &show).replace("spec:\n", &format!("spec:\n{extra}"));
    up.kubectl_in(&["apply", "-f", "-"], &yaml)?
        .expect_ok("apply")?;
    up.wait_field(60, &["pod", "on-edge"], "{.status.phase}", |p| {
        p == "Succeeded"
    })
    .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    let logs = up.kubectl(&["logs", "on-edge"])?.expect_ok("logs")?;
    assert!(logs.stdout.contains("Hello, edge!"), "{}", logs.stdout);
    let shown = |f: &str| {
        logs.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{sa_dir}/{f}: ")))
            .map(str::to_string)
    };
    assert_eq!(
        shown("namespace").as_deref(),
        Some("default"),
        "{}",
        logs.stdout
    );
    assert_eq!(
        shown("ca.crt").as_deref(),
        Some("-----BEGIN CERTIFICATE-----"),
        "{}",
        logs.stdout
    );
    let pod_token = shown("token").unwrap_or_default();
    assert!(pod_token.starts_with("eyJ"), "{}", logs.stdout);
    let mounts = up
        .kubectl(&[
            "get",
            "pod",
            "on-edge",
            "-o",
            "jsonpath={.spec.containers[0].volumeMounts[0].mountPath} {.spec.volumes[0].name}",
        ])?
        .expect_ok("the pod's token volume")?;
    assert!(
        mounts
            .stdout
            .starts_with(&format!("{sa_dir} kube-api-access-")),
        "{}",
        mounts.stdout
    );

    // The node's own certificate, used against the API: its pods yes, anything else no.
    let pki = edge.dir.join("pki");
    let kc = dir.path().join("edge-kubeconfig");
    let server = format!("https://{}", up.gateway());
    let b64 = |f: &str| -> anyhow::Result<String> {
        let out = std::process::Command::new("base64")
            .args(["-w0"])
            .arg(pki.join(f))
            .output()?;
        Ok(String::from_utf8(out.stdout)?)
    };
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: node\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: node\ncurrent-context: c\n",
            b64("ca.crt")?,
            b64("node.crt")?,
            b64("node.key")?
        ),
    )?;
    let as_node = |args: &[&str]| {
        outpost_tests::kubectl_with(
            &outpost_tests::kubectl_bin(None)?,
            &kc,
            &dir.path().join("edge-cache"),
            args,
            None,
        )
    };
    let own = as_node(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=edge-1",
        "-o",
        "name",
    ])?
    .expect_ok("a node lists its own pods")?;
    assert!(own.stdout.contains("on-edge"), "{}", own.stdout);
    let all = as_node(&["get", "pods", "-A"])?.expect_err("a node lists every pod")?;
    assert!(
        all.stderr.contains("Forbidden") || all.stderr.contains("forbidden"),
        "{}",
        all.stderr
    );
    let other = as_node(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=edge-2",
    ])?
    .expect_err("a node lists another node's pods")?;
    assert!(
        other.stderr.to_lowercase().contains("forbidden"),
        "{}",
        other.stderr
    );
    let secrets = as_node(&["get", "secret", "-n", "kube-system", "nope"])?
        .expect_err("a node reads a secret no pod of its uses")?;
    assert!(
        secrets.stderr.to_lowercase().contains("forbidden"),
        "{}",
        secrets.stderr
    );
    // Another node's Node object, the one `outpost up` runs: a node may not change it.
    let other = up.wait_field(
        5,
        &["nodes", "-l", "kubernetes.io/hostname!=edge-1"],
        "{.items[0].metadata.name}",
        |n| !n.is_empty(),
    )?;
    let label =
        as_node(&["label", "node", &other, "x=y"])?.expect_err("a node changes another node")?;
    assert!(
        label.stderr.to_lowercase().contains("forbidden"),
        "{}",
        label.stderr
    );
    let own_label = as_node(&["label", "node", "edge-1", "x=y"])?;
    assert!(
        own_label.ok,
        "a node labels its own Node: {}",
        own_label.stderr
    );

    // Tokens: a node gets one only bound to a pod of its own.
    let unbound = as_node(&["create", "token", "default"])?
        .expect_err("a node asks for a token bound to nothing")?;
    assert!(
        unbound.stderr.contains("must be bound to a pod"),
        "{}",
        unbound.stderr
    );
    let bound = as_node(&[
        "create",
        "token",
        "default",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "on-edge",
    ])?
    .expect_ok("a node asks for a token for its pod")?;
    assert!(bound.stdout.starts_with("eyJ"), "{}", bound.stdout);
    let elsewhere = as_node(&["create", "token", "default", "-n", "kube-system"])?
        .expect_err("a node asks for a token where it has no pod")?;
    assert!(
        elsewhere
            .stderr
            .contains("cannot request a token for serviceaccount kube-system/default"),
        "{}",
        elsewhere.stderr
    );

    // The pod's token works against the API as the pod's service account, which RBAC
    // grants nothing; once the pod is gone, the token is refused.
    let tkc = dir.path().join("token-kubeconfig");
    std::fs::write(
        &tkc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: pod\n  user:\n    token: {pod_token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: pod\ncurrent-context: c\n",
            b64("ca.crt")?
        ),
    )?;
    let as_pod = |args: &[&str]| {
        outpost_tests::kubectl_with(
            &outpost_tests::kubectl_bin(None)?,
            &tkc,
            &dir.path().join("pod-cache"),
            args,
            None,
        )
    };
    // As a pod sees the API: through the `kubernetes` Service's name, which the serving
    // certificate covers.
    let denied = as_pod(&["--tls-server-name", "kubernetes.default.svc", "get", "pods"])?
        .expect_err("the default account lists pods")?;
    assert!(
        denied
            .stderr
            .contains("\"system:serviceaccount:default:default\" cannot list"),
        "{}",
        denied.stderr
    );
    up.kubectl(&["delete", "pod", "on-edge", "--wait=true"])?
        .expect_ok("delete the pod")?;
    let stale = as_pod(&["get", "pods"])?.expect_err("the token of a deleted pod")?;
    assert!(
        stale.stderr.contains("Unauthorized") || stale.stderr.contains("provide credentials"),
        "{}",
        stale.stderr
    );

    // A pod of a service account that does not exist is refused, as kube-apiserver does;
    // one that opts out gets no token.
    let nope = pod_yaml("no-account", &image, "Never", "")
        .replace("spec:\n", "spec:\n  serviceAccountName: nope\n");
    let refused = up
        .kubectl_in(&["apply", "-f", "-"], &nope)?
        .expect_err("a pod of a missing account")?;
    assert!(
        refused
            .stderr
            .contains("error looking up service account default/nope"),
        "{}",
        refused.stderr
    );
    let opt_out = pod_yaml("no-token", &image, "Never", "")
        .replace("spec:\n", "spec:\n  automountServiceAccountToken: false\n");
    up.kubectl_in(&["apply", "-f", "-"], &opt_out)?
        .expect_ok("a pod without a token")?;
    let vols = up
        .kubectl(&["get", "pod", "no-token", "-o", "jsonpath={.spec.volumes}"])?
        .expect_ok("get")?;
    assert!(vols.stdout.trim().is_empty(), "{}", vols.stdout);
    Ok(())
}

/// Seconds of output in a log file, and its first line (a restart rewrites both).
fn log_state(path: &std::path::Path) -> (usize, String) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    (
        text.lines().count(),
        text.lines().next().unwrap_or("").to_string(),
    )
}

fn only_log(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let pods = dir.join("pods");
    for uid in std::fs::read_dir(&pods)? {
        let p = uid?.path().join("main.0.log");
        if p.exists() {
            return Ok(p);
        }
    }
    anyhow::bail!("no log file under {}", pods.display())
}

/// A control plane without a node of its own, and one node, `edge`, joined to it.
fn with_edge(dir: &std::path::Path) -> anyhow::Result<(Up, Node)> {
    let up = Up::start_with(dir, &["--no-node"])?;
    let token = up.token()?;
    let mut edge = Node::new(&dir.join("edge"));
    edge.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &token,
        "--name",
        "edge",
    ])?;
    Ok((up, edge))
}

#[test]
fn pods_outlive_the_control_plane_and_the_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut up, mut edge) = with_edge(dir.path())?;
    let image = push(&up, "cpu-burner")?;
    let limits = "    resources:\n      limits:\n        cpu: 500m\n";
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml("burner", &image, "Always", limits),
    )?
    .expect_ok("apply")?;
    up.wait_field(60, &["pod", "burner"], "{.status.phase}", |p| {
        p == "Running"
    })
    .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    let started = up.wait_field(
        5,
        &["pod", "burner"],
        "{.status.containerStatuses[0].state.running.startedAt}",
        |s| !s.is_empty(),
    )?;
    let log = only_log(&edge.dir)?;
    let t = Instant::now();
    while log_state(&log).0 < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no output from the burner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Pods that have ended, to see that they stay so: one completed, one failed past its
    // deadline. Each gives its directory on the node.
    let ended = |name: &str, image: &str, policy: &str, extra: &str, path: &str, want: &str| {
        up.kubectl_in(&["apply", "-f", "-"], &pod_yaml(name, image, policy, extra))?
            .expect_ok("apply")?;
        up.wait_field(60, &["pod", name], path, |v| v == want)?;
        let uid = up.wait_field(5, &["pod", name], "{.metadata.uid}", |u| !u.is_empty())?;
        anyhow::Ok(edge.dir.join("pods").join(uid))
    };
    let hello = push(&up, "hello")?;
    let once_dir = ended("once", &hello, "Never", "", "{.status.phase}", "Succeeded")?;
    assert!(once_dir.join("main.0.log").exists());
    let deadline = "  activeDeadlineSeconds: 2\n";
    let late_dir = ended(
        "late",
        &image,
        "Always",
        deadline,
        "{.status.reason}",
        "DeadlineExceeded",
    )?;

    // The control plane goes away: the pod keeps running.
    up.kill();
    let before = log_state(&log);
    std::thread::sleep(Duration::from_secs(3));
    let after = log_state(&log);
    assert!(
        after.0 > before.0,
        "the pod stopped writing with the control plane down"
    );
    assert_eq!(after.1, before.1, "the pod was restarted");

    // The agent dies too, and starts again with no control plane: the pod is back from the
    // cache within 10 s.
    edge.kill();
    std::thread::sleep(Duration::from_millis(500));
    edge.start(&[])?;
    // The new run is the next one, with a log of its own; the run before keeps its log.
    let log1 = log.with_file_name("main.1.log");
    let t = Instant::now();
    while log_state(&log1).0 < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the pod did not come back from the cache within 10 s: {}",
            edge.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted = log_state(&log1).1;
    assert_eq!(log_state(&log).1, after.1, "the run before lost its log");
    assert!(
        !once_dir.join("main.1.log").exists(),
        "the completed pod ran again: {}",
        edge.logs()
    );
    assert!(
        !late_dir.join("main.1.log").exists(),
        "the pod past its deadline ran again: {}",
        edge.logs()
    );

    // The control plane returns: the node reconnects, reports the run it started while
    // offline, and leaves it alone.
    up.restart()?;
    let again = up
        .wait_field(
            60,
            &["pod", "burner"],
            "{.status.containerStatuses[0].state.running.startedAt}",
            |s| s > started.as_str(),
        )
        .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    assert!(again > started);
    std::thread::sleep(Duration::from_secs(2));
    let now = log_state(&log1);
    assert_eq!(
        now.1,
        restarted,
        "reconnecting restarted the pod: {}",
        edge.logs()
    );
    // The agent's restart counts as the container's, as a reboot does for the kubelet; the
    // run it cut short ended unseen, and its output is the previous log.
    let status = |path: &str| up.wait_field(5, &["pod", "burner"], path, |v| !v.is_empty());
    assert_eq!(status("{.status.containerStatuses[0].restartCount}")?, "1");
    assert_eq!(
        status("{.status.containerStatuses[0].lastState.terminated.reason}")?,
        "Unknown"
    );
    assert_eq!(
        status("{.status.containerStatuses[0].lastState.terminated.exitCode}")?,
        "255"
    );
    assert_eq!(
        up.wait_field(
            5,
            &["pod", "once"],
            "{.status.phase} {.status.containerStatuses[0].restartCount}",
            |v| !v.is_empty()
        )?,
        "Succeeded 0"
    );
    assert!(!once_dir.join("main.1.log").exists());
    assert_eq!(
        up.wait_field(
            5,
            &["pod", "late"],
            "{.status.phase} {.status.reason}",
            |v| !v.is_empty()
        )?,
        "Failed DeadlineExceeded"
    );
    assert!(!late_dir.join("main.1.log").exists());
    let previous = up
        .kubectl(&["logs", "burner", "--previous"])?
        .expect_ok("logs --previous")?;
    // A CRI record: time, stream, tag, then the text.
    let first = after.1.splitn(4, ' ').nth(3).unwrap_or_default();
    assert_eq!(
        previous.stdout.lines().next(),
        Some(first),
        "{}",
        previous.stdout
    );
    // Deleted with the node linked (forced, so the control plane forgets it at once): the
    // node stops the pod and clears it away.
    up.kubectl(&["delete", "pod", "burner", "--grace-period=0", "--force"])?
        .expect_ok("force delete")?;
    let pod_dir = log
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let t = Instant::now();
    while pod_dir.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the deleted pod was not cleared: {}",
            edge.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The text of a run's log of `container` (any run) that contains `want`, if any.
fn log_with(dir: &std::path::Path, container: &str, want: &str) -> Option<String> {
    let pods = std::fs::read_dir(dir.join("pods")).ok()?;
    pods.flatten()
        .filter_map(|p| std::fs::read_dir(p.path()).ok())
        .flatten()
        .flatten()
        .filter(|f| {
            let n = f.file_name();
            let n = n.to_string_lossy();
            n.starts_with(&format!("{container}.")) && n.ends_with(".log")
        })
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .find(|t| t.contains(want))
}

/// A Wasm pod gets its config map, secret (written with `stringData`), downward API,
/// hostPath and emptyDir volumes as directories, its env from the config map and the secret,
/// and `$(VAR)` in its args; and it gets them again from the node's cache when the agent
/// restarts with the control plane down, its emptyDir as it was.
#[test]
fn a_wasm_pod_reads_its_volumes_and_env_online_and_from_the_cache() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut up, mut edge) = with_edge(dir.path())?;
    let image = push(&up, "hello")?;
    let sleeper = push(&up, "sleeper")?;
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    std::fs::write(host.join("seed"), "seeded")?;
    let shown =
        "/cfg/motd,/cfg/sub/deep,/sec/password,/host/seed,/dapi/cpu,/dapi/cores,/dapi/labels";
    let manifest = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: greet}}
data: {{target: volumes, motd: "from a config map", nested: "deep file"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret, user: edge-admin}}
---
apiVersion: v1
kind: Pod
metadata:
  name: vols
  labels: {{app: vols}}
spec:
  runtimeClassName: wasm
  restartPolicy: Always
  containers:
  - name: main
    image: {image}
    args: ["$(USER_NAME)", "$(PREFIX_motd)", "$(MEMORY_MI)"]
    resources: {{limits: {{memory: 32Mi}}, requests: {{cpu: 250m}}}}
    envFrom:
    - configMapRef: {{name: greet}}
      prefix: PREFIX_
    env:
    - name: GREETING_TARGET
      valueFrom: {{configMapKeyRef: {{name: greet, key: target}}}}
    - name: USER_NAME
      valueFrom: {{secretKeyRef: {{name: creds, key: user}}}}
    - name: MEMORY_MI
      valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}
    - name: SHOW_FILES
      value: {shown}
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: sec, mountPath: /sec, readOnly: true}}
    - {{name: host, mountPath: /host}}
    - {{name: dapi, mountPath: /dapi}}
  - name: keeper
    image: {sleeper}
    env:
    - {{name: STATE_FILE, value: /scratch/state}}
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - name: scratch
    emptyDir: {{}}
  - name: cfg
    configMap:
      name: greet
      items: [{{key: motd, path: motd}}, {{key: nested, path: sub/deep}}]
  - name: sec
    secret: {{secretName: creds}}
  - name: host
    hostPath: {{path: {host}, type: Directory}}
  - name: dapi
    downwardAPI:
      items:
      - {{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}
      - {{path: cpu, resourceFieldRef: {{containerName: main, resource: requests.cpu, divisor: 1m}}}}
      - {{path: cores, resourceFieldRef: {{containerName: main, resource: requests.cpu, divisor: "0"}}}}
"#,
        host = host.display()
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply")?;
    // The secret keeps what stringData said as data, base64-encoded.
    let user = up
        .kubectl(&["get", "secret", "creds", "-o", "jsonpath={.data.user}"])?
        .expect_ok("get secret")?;
    assert_eq!(user.stdout.trim(), "ZWRnZS1hZG1pbg==");
    let expected = [
        "Hello, volumes! A Wasm pod on Outpost.",
        "args: edge-admin from a config map 32",
        "/cfg/motd: from a config map",
        "/cfg/sub/deep: deep file",
        "/sec/password: s3cret",
        "/host/seed: seeded",
        "/dapi/cpu: 250",
        "/dapi/cores: 1",
        "/dapi/labels: app=\"vols\"",
    ];
    let logs_with = |container: &str, want: &str| -> anyhow::Result<String> {
        let t = Instant::now();
        loop {
            let out = up.kubectl(&["logs", "vols", "-c", container])?;
            if out.stdout.contains(want) {
                return Ok(out.stdout);
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no {want:?} from {container}: {}{}\nnode log: {}",
                out.stdout,
                out.stderr,
                edge.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let logs = logs_with("main", "/dapi/labels")?;
    for line in expected {
        assert!(logs.lines().any(|l| l == line), "{line:?} not in:\n{logs}");
    }
    // The keeper counts its starts in the emptyDir.
    logs_with("keeper", "starts: 1")?;

    // Control plane and agent down; the agent starts again with no link, runs the pod from
    // its cache and mounts the same files, the secret's among them.
    up.kill();
    edge.kill();
    for entry in std::fs::read_dir(edge.dir.join("pods"))?.flatten() {
        for f in std::fs::read_dir(entry.path())?.flatten() {
            if f.file_name().to_string_lossy().ends_with(".log") {
                std::fs::remove_file(f.path())?;
            }
        }
    }
    edge.start(&[])?;
    let t = Instant::now();
    let again = loop {
        if let Some(text) = log_with(&edge.dir, "main", "/dapi/labels") {
            break text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the pod did not run again from the cache within 10 s: {}",
            edge.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for line in expected {
        assert!(
            again.lines().any(|l| l.ends_with(line)),
            "{line:?} not in the offline run's log:\n{again}"
        );
    }
    let t = Instant::now();
    while log_with(&edge.dir, "keeper", "starts: 2").is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the keeper did not start again on the same emptyDir: {}",
            edge.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A UDP relay between a node and the gateway that can drop everything for a while, as a
/// cut link does. Ends with the test.
struct Relay {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(to: &str) -> anyhow::Result<Relay> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let front = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let back = std::net::UdpSocket::bind("127.0.0.1:0")?;
        back.connect(to)?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        let addr = front.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let (f2, b2) = (front.try_clone()?, back.try_clone()?);
        let (c1, d1, cl1) = (cut.clone(), done.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !d1.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    if let Ok(mut c) = cl1.lock() {
                        *c = Some(from);
                    }
                    if !c1.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]);
                    }
                }
            }
        });
        let (c2, d2) = (cut.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !d2.load(Ordering::Relaxed) {
                if let Ok(n) = b2.recv(&mut buf) {
                    let to = client.lock().ok().and_then(|c| *c);
                    if let (false, Some(to)) = (c2.load(Ordering::Relaxed), to) {
                        let _ = f2.send_to(&buf[..n], to);
                    }
                }
            }
        });
        Ok(Relay { addr, cut, done })
    }

    fn cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_cut_link_heals_without_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start_with(dir.path(), &["--no-node"])?;
    let token = up.token()?;
    let relay = Relay::start(&up.gateway())?;
    let mut edge = Node::new(&dir.path().join("edge"));
    edge.start(&["--server", &relay.addr, "--token", &token, "--name", "edge"])?;
    let image = push(&up, "sleeper")?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml("steady", &image, "Always", ""),
    )?
    .expect_ok("apply")?;
    let started = up
        .wait_field(
            60,
            &["pod", "steady"],
            "{.status.containerStatuses[0].state.running.startedAt}",
            |s| !s.is_empty(),
        )
        .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    // Cut for longer than the link's idle timeout (20 s), so the connection is lost for good.
    relay.cut(true);
    let t = Instant::now();
    while !edge.logs().contains("link to the control plane lost") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the cut went unnoticed: {}",
            edge.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("link lost after {:?}", t.elapsed());
    // While the node is away a second pod is bound to it; it starts once the link is back.
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml("later", &image, "Always", ""),
    )?
    .expect_ok("apply while cut")?;
    relay.cut(false);
    up.wait_field(60, &["pod", "later"], "{.status.phase}", |p| p == "Running")
        .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    let after = up.wait_field(5, &["pod", "steady"], "{.status.containerStatuses[0].state.running.startedAt}|{.status.containerStatuses[0].restartCount}", |s| !s.is_empty())?;
    assert_eq!(
        after,
        format!("{started}|0"),
        "the running pod was restarted across the cut"
    );
    let reconnects = edge
        .logs()
        .matches("connected to the control plane")
        .count();
    assert!(reconnects >= 2, "{}", edge.logs());
    Ok(())
}

#[test]
fn an_http_component_serves_and_is_probed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let port = http_hello(&up)?;
    // The node runs as root with a pod network: the component listens at an address of its
    // own, as an OCI pod does.
    let ip = up.wait_field(5, &["pod", "http-hello"], "{.status.podIP}", |s| {
        !s.is_empty()
    })?;
    assert!(ip.starts_with("10.88."), "{ip}");
    // The address it had before its network was up does not stay in podIPs.
    let ips = up.wait_field(5, &["pod", "http-hello"], "{.status.podIPs[*].ip}", |s| {
        !s.is_empty()
    })?;
    assert_eq!(ips, ip, "podIPs");
    let at: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let get = |_: u16, path: &str| http_get_at(at, path);
    let (code, body) = get(port, "/from/a/test")?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "hello from Outpost at /from/a/test\n");
    let (code, _) = get(port, "/healthz")?;
    assert_eq!(code, 200);
    // Each request's guest output lands in the container's log.
    let t = Instant::now();
    loop {
        let logs = up.kubectl(&["logs", "http-hello"])?.expect_ok("logs")?;
        if logs.stdout.contains("GET /from/a/test") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{}", logs.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    // The API server's proxy reaches it through its node's link, by pod and by Service.
    let raw = up
        .kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/pods/http-hello:{port}/proxy/by/pod?q=1"),
        ])?
        .expect_ok("pod proxy")?;
    assert_eq!(raw.stdout, "hello from Outpost at /by/pod?q=1\n");
    up.kubectl(&[
        "expose",
        "pod",
        "http-hello",
        "--name=front",
        "--port=80",
        &format!("--target-port={port}"),
    ])?
    .expect_ok("expose")?;
    up.wait_field(
        20,
        &["endpoints", "front"],
        "{.subsets[0].addresses[0].ip}",
        |s| !s.is_empty(),
    )?;
    let raw = up
        .kubectl(&[
            "get",
            "--raw",
            "/api/v1/namespaces/default/services/front:80/proxy/by/service",
        ])?
        .expect_ok("service proxy")?;
    assert_eq!(raw.stdout, "hello from Outpost at /by/service\n");
    let none = up
        .kubectl(&[
            "get",
            "--raw",
            "/api/v1/namespaces/default/services/nothing/proxy/",
        ])?
        .expect_err("no such service")?;
    assert!(none.stderr.contains("not found"), "{}", none.stderr);
    // --timestamps prefixes each line with when it was written; --since leaves older out.
    let stamped = up
        .kubectl(&["logs", "http-hello", "--timestamps"])?
        .expect_ok("logs --timestamps")?;
    let line = stamped
        .stdout
        .lines()
        .find(|l| l.ends_with(" GET /from/a/test"))
        .unwrap_or_default()
        .to_string();
    let (when, _) = line.split_once(' ').unwrap_or_default();
    assert!(
        when.starts_with("20") && when.ends_with('Z') && when.contains('T'),
        "{}",
        stamped.stdout
    );
    std::thread::sleep(Duration::from_secs(2));
    let _ = get(port, "/later")?;
    let recent = up
        .kubectl(&["logs", "http-hello", "--since=1s"])?
        .expect_ok("logs --since")?;
    assert!(
        recent.stdout.contains("GET /later") && !recent.stdout.contains("/from/a/test"),
        "{}",
        recent.stdout
    );
    // A second pod on the same port serves at its own address.
    let twin = format!(
        "{}    ports:\n    - containerPort: {port}\n",
        pod_yaml("twin", "module:http-hello", "Never", "")
    );
    up.kubectl_in(&["apply", "-f", "-"], &twin)?
        .expect_ok("apply twin")?;
    let twin_ip = up.wait_field(60, &["pod", "twin"], "{.status.podIP}", |s| {
        s.starts_with("10.88.")
    })?;
    assert_ne!(twin_ip, ip);
    let twin_at: std::net::SocketAddr = format!("{twin_ip}:{port}").parse()?;
    let (code, body) =
        outpost_tests::retry(30, "the twin serves", || http_get_at(twin_at, "/twin"))?;
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from Outpost at /twin\n")
    );
    // On the node's network a component's port is the node's: a second pod on it waits
    // for the scheduler, and one whose port something else on the node holds cannot
    // listen, with a clear reason, not a crash.
    let host_pod = |name: &str, port: u16| {
        format!(
            "{}    ports:\n    - containerPort: {port}\n",
            pod_yaml(name, "module:http-hello", "Never", "")
        )
        .replace("spec:\n", "spec:\n  hostNetwork: true\n")
    };
    let host = free_tcp_port();
    up.kubectl_in(&["apply", "-f", "-"], &host_pod("on-host", host))?
        .expect_ok("apply a host-network component")?;
    outpost_tests::retry(30, "the host-network component serves", || {
        http_get_at(([127, 0, 0, 1], host).into(), "/")
    })?;
    up.kubectl_in(&["apply", "-f", "-"], &host_pod("second", host))?
        .expect_ok("apply a second host-network component")?;
    let why = up.wait_field(
        30,
        &["pod", "second"],
        "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        |m| !m.is_empty(),
    )?;
    assert!(why.contains("didn't have free ports"), "{why}");
    let taken = std::net::TcpListener::bind(("0.0.0.0", 0))?;
    let busy = taken.local_addr()?.port();
    up.kubectl_in(&["apply", "-f", "-"], &host_pod("clash", busy))?
        .expect_ok("apply a component on a taken port")?;
    let msg = up.wait_field(
        60,
        &["pod", "clash"],
        "{.status.containerStatuses[0].state.terminated.message}",
        |m| !m.is_empty(),
    )?;
    assert!(
        msg.contains(&format!("listening on 0.0.0.0:{busy}")),
        "{msg}"
    );
    drop(taken);
    let (code, _) = get(port, "/still/there")?;
    assert_eq!(code, 200);
    // Deleted, it stops accepting, finishes what it serves, and is gone; its port is free.
    let idle = std::net::TcpStream::connect(at)?;
    let t = Instant::now();
    up.kubectl(&["delete", "pod", "http-hello", "--timeout", "30s"])?
        .expect_ok("delete http-hello")?;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(idle);
    assert!(get(port, "/gone").is_err(), "still serving");

    // A liveness probe that fails restarts the container and says why; a readiness probe
    // that fails keeps the pod Running but not Ready.
    let dead = outpost_tests::free_tcp_port();
    let probed = pod_yaml(
        "unhealthy",
        "module:sleeper",
        "Always",
        &format!(
            "    livenessProbe:\n      tcpSocket:\n        port: {dead}\n      periodSeconds: 1\n      failureThreshold: 2\n    readinessProbe:\n      httpGet:\n        port: {dead}\n      periodSeconds: 1\n"
        ),
    );
    push(&up, "sleeper")?;
    up.kubectl_in(&["apply", "-f", "-"], &probed)?
        .expect_ok("apply unhealthy")?;
    let last = up.wait_field(
        40,
        &["pod", "unhealthy"],
        "{.status.containerStatuses[0].lastState.terminated.message}",
        |m| !m.is_empty(),
    )?;
    assert!(
        last.starts_with("Liveness probe failed: dial tcp"),
        "{last}"
    );
    let killed = up
        .kubectl(&[
            "get",
            "pod",
            "unhealthy",
            "-o",
            "jsonpath={.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].lastState.terminated.reason}",
        ])?
        .expect_ok("get unhealthy")?
        .stdout;
    assert_eq!(killed, "137 Error", "killed, as the kubelet kills");
    let state = up.wait_field(
        5,
        &["pod", "unhealthy"],
        "{.status.phase}/{.status.conditions[?(@.type==\"Ready\")].status}",
        |s| !s.is_empty(),
    )?;
    assert_eq!(state, "Running/False");
    // The node reports what happened as events, which `kubectl describe` shows.
    up.wait_described(
        15,
        &["pod", "unhealthy"],
        &[
            "Started",
            "Unhealthy",
            "Liveness probe failed",
            "Readiness probe failed",
            "Killing",
            "failed liveness probe, will be restarted",
            "kubelet",
        ],
    )?;
    // exec probes cannot run in a Wasm container: a clear reason.
    let exec = pod_yaml(
        "exec-probe",
        "module:sleeper",
        "Always",
        "    livenessProbe:\n      exec:\n        command: [\"true\"]\n",
    );
    up.kubectl_in(&["apply", "-f", "-"], &exec)?
        .expect_ok("apply exec-probe")?;
    let msg = up.wait_field(
        30,
        &["pod", "exec-probe"],
        "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        |m| m.starts_with("CreateContainerConfigError"),
    )?;
    assert!(msg.contains("exec probes"), "{msg}");
    Ok(())
}

#[test]
fn wasm_artifacts_come_from_an_oci_registry() -> anyhow::Result<()> {
    let reg = outpost_tests::Registry::start()?;
    let hello = std::fs::read(example("hello")?)?;
    let image = reg.push("wasm/hello", "v1", "application/wasm", &hello)?;
    let tarball = reg.push(
        "wasm/not-wasm",
        "v1",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        b"not a wasm layer",
    )?;
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    up.kubectl_in(
        &["apply", "-f", "-"],
        &pod_yaml(
            "from-registry",
            &image,
            "Never",
            "    args: [\"from\", \"a\", \"registry\"]\n",
        ),
    )?
    .expect_ok("apply")?;
    up.wait_field(60, &["pod", "from-registry"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let logs = up.kubectl(&["logs", "from-registry"])?.expect_ok("logs")?;
    assert!(
        logs.stdout.contains("args: from a registry"),
        "{}",
        logs.stdout
    );
    let id = up.wait_field(
        5,
        &["pod", "from-registry"],
        "{.status.containerStatuses[0].imageID}",
        |i| !i.is_empty(),
    )?;
    assert!(id.starts_with("sha256:"), "{id}");
    // Not a Wasm artifact, and not there at all: clear reasons.
    for (name, img, says) in [
        ("tarball", tarball.as_str(), "is not a Wasm artifact"),
        (
            "absent",
            &format!("{}/wasm/absent:v1", reg.addr),
            "not found",
        ),
    ] {
        up.kubectl_in(&["apply", "-f", "-"], &pod_yaml(name, img, "Never", ""))?
            .expect_ok("apply")?;
        let msg = up.wait_field(
            30,
            &["pod", name],
            "{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
            |m| m.starts_with("ErrImagePull"),
        )?;
        assert!(msg.contains(says), "{msg}");
    }
    Ok(())
}

#[test]
fn an_autoscaler_scales_a_busy_deployment_on_its_metrics() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    push(&up, "cpu-burner")?;
    // Each burner uses its 200m limit, twice its 100m request: 200 % against a target of
    // 50 %, so the autoscaler wants four and stops at its maximum of three.
    up.kubectl_in(
        &["apply", "-f", "-"],
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: burn
spec:
  replicas: 1
  selector:
    matchLabels: {app: burn}
  template:
    metadata:
      labels: {app: burn}
    spec:
      runtimeClassName: wasm
      containers:
      - name: burner
        image: module:cpu-burner
        resources:
          requests: {cpu: 100m}
          limits: {cpu: 200m, memory: 16Mi}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: burn
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: burn}
  minReplicas: 1
  maxReplicas: 3
  metrics:
  - type: Resource
    resource:
      name: cpu
      target: {type: Utilization, averageUtilization: 50}
"#,
    )?
    .expect_ok("apply the deployment and its autoscaler")?;
    up.wait_field(
        60,
        &["deployment", "burn"],
        "{.spec.replicas}/{.status.readyReplicas}",
        |r| r == "3/3",
    )?;
    let hpa = up.wait_field(
        40,
        &["hpa", "burn"],
        "{.status.desiredReplicas} {.status.currentMetrics[0].resource.current.averageUtilization}",
        |s| s.starts_with("3 ") && s.len() > 2,
    )?;
    let util: u64 = hpa.split_whitespace().nth(1).unwrap_or("").parse()?;
    assert!(util >= 100, "{hpa}");
    let row = up.kubectl(&["get", "hpa", "burn"])?.expect_ok("get hpa")?;
    assert!(row.stdout.contains("%/50%"), "{}", row.stdout);
    let events = up
        .kubectl(&["describe", "hpa", "burn"])?
        .expect_ok("events")?;
    assert!(
        events.stdout.contains("SuccessfulRescale") && events.stdout.contains("New size: 3"),
        "{}",
        events.stdout
    );
    // `kubectl autoscale` writes autoscaling/v1 (as protobuf): served by conversion, read
    // back in either version. A target scaled to zero is left there.
    up.kubectl(&[
        "create",
        "deployment",
        "idle",
        "--image=module:cpu-burner",
        "--replicas=0",
    ])?
    .expect_ok("create deployment")?;
    let made = up
        .kubectl(&[
            "autoscale",
            "deployment",
            "idle",
            "--min=1",
            "--max=4",
            "--cpu-percent=60",
        ])?
        .expect_ok("kubectl autoscale")?;
    assert!(made.stdout.contains("autoscaled"), "{}", made.stdout);
    let v2 = up
        .kubectl(&[
            "get",
            "hpa",
            "idle",
            "-o",
            "jsonpath={.spec.metrics[0].resource.target.averageUtilization} {.spec.maxReplicas}",
        ])?
        .expect_ok("get hpa")?;
    assert_eq!(v2.stdout, "60 4");
    let v1 = up
        .kubectl(&[
            "get",
            "--raw",
            "/apis/autoscaling/v1/namespaces/default/horizontalpodautoscalers/idle",
        ])?
        .expect_ok("get the v1 form")?;
    let v1: serde_json::Value = serde_json::from_str(&v1.stdout)?;
    assert_eq!(v1["apiVersion"], "autoscaling/v1");
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 60);
    assert!(v1["spec"]["metrics"].is_null());
    // Server-side apply of a v1 manifest (an apply patch in YAML) converts the same way.
    up.kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        "apiVersion: autoscaling/v1\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: applied\nspec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: idle}\n  maxReplicas: 2\n  targetCPUUtilizationPercentage: 70\n",
    )?
    .expect_ok("server-side apply of a v1 autoscaler")?;
    let applied = up
        .kubectl(&[
            "get",
            "hpa",
            "applied",
            "-o",
            "jsonpath={.spec.metrics[0].resource.target.averageUtilization}",
        ])?
        .expect_ok("get the applied autoscaler")?;
    assert_eq!(applied.stdout, "70");
    std::thread::sleep(autoscale_round());
    let idle = up
        .kubectl(&[
            "get",
            "deployment",
            "idle",
            "-o",
            "jsonpath={.spec.replicas}",
        ])?
        .expect_ok("get deployment")?;
    assert_eq!(idle.stdout, "0");
    Ok(())
}

/// Longer than one round of the autoscaler (15 s).
fn autoscale_round() -> Duration {
    Duration::from_secs(16)
}

/// Init containers run first, one at a time, and their output is in `kubectl logs -c`; one
/// that fails for good fails the pod before its containers start; a sidecar (an init
/// container with `restartPolicy: Always`) runs beside them and stops once they end.
#[test]
fn init_containers_run_first_and_sidecars_beside() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let hello = push(&up, "hello")?;
    let sleeper = push(&up, "sleeper")?;
    let inits = |list: &str| format!("  initContainers:\n{list}");
    let init = |name: &str, image: &str, env: &str| {
        format!("  - name: {name}\n    image: {image}\n    env:\n    - name: GREETING_TARGET\n      value: {name}\n{env}")
    };
    // Two that succeed, then the main container.
    let ok = pod_yaml("init-ok", &sleeper, "Always", "").replace(
        "  containers:\n",
        &format!(
            "{}  containers:\n",
            inits(&(init("first", &hello, "") + &init("second", &hello, "")))
        ),
    );
    up.kubectl_in(&["apply", "-f", "-"], &ok)?
        .expect_ok("apply init-ok")?;
    up.wait_field(60, &["pod", "init-ok"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let ended = up
        .kubectl(&[
            "get",
            "pod",
            "init-ok",
            "-o",
            "jsonpath={range .status.initContainerStatuses[*]}{.name}={.state.terminated.reason} {end}",
        ])?
        .expect_ok("get init-ok")?
        .stdout;
    assert_eq!(ended.trim(), "first=Completed second=Completed");
    let initialized = up
        .kubectl(&[
            "get",
            "pod",
            "init-ok",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Initialized\")].status}",
        ])?
        .expect_ok("get init-ok")?
        .stdout;
    assert_eq!(initialized, "True");
    let logs = up
        .kubectl(&["logs", "init-ok", "-c", "second"])?
        .expect_ok("logs -c second")?
        .stdout;
    assert!(logs.contains("Hello, second!"), "{logs}");
    // The first one's start came before the second's, and the second's end before main.
    let times = up
        .kubectl(&[
            "get",
            "pod",
            "init-ok",
            "-o",
            "jsonpath={.status.initContainerStatuses[0].state.terminated.finishedAt} {.status.initContainerStatuses[1].state.terminated.startedAt} {.status.initContainerStatuses[1].state.terminated.finishedAt} {.status.containerStatuses[0].state.running.startedAt}",
        ])?
        .expect_ok("get times")?
        .stdout;
    let t: Vec<&str> = times.split_whitespace().collect();
    assert!(t.len() == 4 && t[0] <= t[1] && t[2] <= t[3], "{times}");

    // An init container that fails with restartPolicy Never fails the pod; main never runs.
    let bad = pod_yaml("init-bad", &hello, "Never", "").replace(
        "  containers:\n",
        &format!(
            "{}  containers:\n",
            inits(&init(
                "setup",
                &hello,
                "    - name: EXIT_CODE\n      value: \"3\"\n"
            ))
        ),
    );
    up.kubectl_in(&["apply", "-f", "-"], &bad)?
        .expect_ok("apply init-bad")?;
    up.wait_field(60, &["pod", "init-bad"], "{.status.phase}", |p| {
        p == "Failed"
    })?;
    let shown = up
        .kubectl(&["get", "pod", "init-bad", "--no-headers"])?
        .expect_ok("get init-bad")?
        .stdout;
    assert!(shown.contains("Init:Error"), "{shown}");
    let main = up
        .kubectl(&[
            "get",
            "pod",
            "init-bad",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason} {.status.initContainerStatuses[0].state.terminated.exitCode}",
        ])?
        .expect_ok("get init-bad")?
        .stdout;
    assert_eq!(main, "PodInitializing 3");

    // A sidecar starts first and keeps running beside main; when main ends, so does it.
    let side = format!("  - name: side\n    image: {sleeper}\n    restartPolicy: Always\n");
    let with_side = pod_yaml("with-side", &hello, "Never", "").replace(
        "  containers:\n",
        &format!("{}  containers:\n", inits(&side)),
    );
    up.kubectl_in(&["apply", "-f", "-"], &with_side)?
        .expect_ok("apply with-side")?;
    up.wait_field(60, &["pod", "with-side"], "{.status.phase}", |p| {
        p == "Succeeded"
    })?;
    let side_state = up.wait_field(
        30,
        &["pod", "with-side"],
        "{.status.initContainerStatuses[0].state.terminated.finishedAt}",
        |f| !f.is_empty(),
    )?;
    assert!(!side_state.is_empty());
    let main_log = up
        .kubectl(&["logs", "with-side", "-c", "main"])?
        .expect_ok("logs main")?
        .stdout;
    assert!(main_log.contains("Hello"), "{main_log}");
    Ok(())
}

/// A pod running longer than its `activeDeadlineSeconds` is stopped and Failed with reason
/// DeadlineExceeded, as the kubelet ends it; a container that fails with
/// `terminationMessagePolicy: FallbackToLogsOnError` has its last output as its message.
#[test]
fn a_pod_past_its_active_deadline_fails() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let sleeper = push(&up, "sleeper")?;
    let hello = push(&up, "hello")?;
    let words = pod_yaml(
        "last-words",
        &hello,
        "Never",
        "    terminationMessagePolicy: FallbackToLogsOnError\n    env:\n    - name: EXIT_CODE\n      value: \"2\"\n",
    );
    up.kubectl_in(&["apply", "-f", "-"], &words)?
        .expect_ok("apply last-words")?;
    let msg = up.wait_field(
        30,
        &["pod", "last-words"],
        "{.status.containerStatuses[0].state.terminated.message}",
        |m| !m.is_empty(),
    )?;
    assert!(msg.contains("Hello, edge! A Wasm pod on Outpost."), "{msg}");
    let pod = pod_yaml("deadline", &sleeper, "Always", "").replace(
        "  restartPolicy:",
        "  activeDeadlineSeconds: 2\n  restartPolicy:",
    );
    up.kubectl_in(&["apply", "-f", "-"], &pod)?
        .expect_ok("apply deadline")?;
    up.wait_field(30, &["pod", "deadline"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let t = Instant::now();
    let ended = up.wait_field(
        30,
        &["pod", "deadline"],
        "{.status.phase} {.status.reason}",
        |p| p.starts_with("Failed"),
    )?;
    assert_eq!(ended, "Failed DeadlineExceeded");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // It stays ended: nothing restarts it.
    std::thread::sleep(Duration::from_secs(2));
    let state = up
        .kubectl(&[
            "get",
            "pod",
            "deadline",
            "-o",
            "jsonpath={.status.phase} {.status.containerStatuses[0].state.terminated.reason}",
        ])?
        .expect_ok("get state")?
        .stdout;
    assert!(state.starts_with("Failed "), "{state}");
    Ok(())
}

/// A running container's configMap and secret volumes follow their objects (every sync,
/// here a second): a changed key is rewritten, a new one appears, a removed one goes.
#[test]
fn config_volumes_follow_their_objects() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    let sleeper = push(&up, "sleeper")?;
    let mut edge = Node::new(&dir.path().join("edge-1"));
    edge.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &up.token()?,
        "--name",
        "edge-1",
        "--sync-frequency",
        "1",
    ])?;
    up.node_ready(&edge, "edge-1", 30)?;
    up.kubectl(&["create", "configmap", "conf", "--from-literal=motd=one"])?
        .expect_ok("create configmap")?;
    up.kubectl(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=user=ann",
    ])?
    .expect_ok("create secret")?;
    let pod = pod_yaml(
        "follower",
        &sleeper,
        "Always",
        "    volumeMounts:\n    - {name: cfg, mountPath: /cfg}\n    - {name: sec, mountPath: /sec}\n",
    )
    .replace("spec:\n", "spec:\n  nodeSelector: {kubernetes.io/hostname: edge-1}\n")
        + "  volumes:\n  - name: cfg\n    configMap: {name: conf}\n  - name: sec\n    secret: {secretName: creds}\n";
    up.kubectl_in(&["apply", "-f", "-"], &pod)?
        .expect_ok("apply follower")?;
    up.wait_field(60, &["pod", "follower"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let uid = up
        .kubectl(&["get", "pod", "follower", "-o", "jsonpath={.metadata.uid}"])?
        .expect_ok("get uid")?
        .stdout;
    // The files live in the agent's own tmpfs: seen through its root.
    let pid = edge
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the agent is not running"))?;
    let vols = std::path::PathBuf::from(format!("/proc/{pid}/root"))
        .join(edge.dir.strip_prefix("/")?)
        .join("volatile")
        .join(&uid);
    let read = |f: &str| std::fs::read_to_string(vols.join(f)).ok();
    let until = |what: &str, ok: &dyn Fn() -> bool| -> anyhow::Result<()> {
        let t = Instant::now();
        while !ok() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: {:?}",
                std::fs::read_dir(vols.join("cfg"))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    assert_eq!(read("cfg/motd").as_deref(), Some("one"));
    up.kubectl(&[
        "patch",
        "configmap",
        "conf",
        "--type=merge",
        "-p",
        r#"{"data": {"motd": "two", "extra": "new"}}"#,
    ])?
    .expect_ok("patch configmap")?;
    until("the changed and the new key", &|| {
        read("cfg/motd").as_deref() == Some("two") && read("cfg/extra").as_deref() == Some("new")
    })?;
    up.kubectl(&[
        "patch",
        "configmap",
        "conf",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/data/extra"}]"#,
    ])?
    .expect_ok("remove a key")?;
    until("the removed key", &|| read("cfg/extra").is_none())?;
    up.kubectl(&[
        "patch",
        "secret",
        "creds",
        "--type=merge",
        "-p",
        r#"{"stringData": {"user": "bob"}}"#,
    ])?
    .expect_ok("patch secret")?;
    until("the secret", &|| read("sec/user").as_deref() == Some("bob"))?;
    // It was not restarted for it.
    let restarts = up
        .kubectl(&[
            "get",
            "pod",
            "follower",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ])?
        .expect_ok("get restarts")?
        .stdout;
    assert_eq!(restarts, "0");
    Ok(())
}

/// Lifecycle hooks: postStart reaches the container once it has started; preStop runs
/// when the pod is deleted, before the container is stopped (here it calls a server of the
/// test's, as `httpGet.host` allows); a hook that fails is a FailedPostStartHook event
/// and the container is killed.
#[test]
fn lifecycle_hooks_run_around_a_container() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let up = Up::start(dir.path())?;
    push(&up, "http-hello")?;
    let port = free_tcp_port();
    let told = std::net::TcpListener::bind("127.0.0.1:0")?;
    let told_port = told.local_addr()?.port();
    let hooked = format!(
        "{}    ports:\n    - containerPort: {port}\n    lifecycle:\n      postStart:\n        httpGet: {{port: {port}, path: /poststart}}\n      preStop:\n        httpGet: {{host: 127.0.0.1, port: {told_port}, path: /prestop}}\n",
        pod_yaml("hooked", "module:http-hello", "Always", "")
    );
    up.kubectl_in(&["apply", "-f", "-"], &hooked)?
        .expect_ok("apply hooked")?;
    up.wait_field(60, &["pod", "hooked"], "{.status.phase}", |p| {
        p == "Running"
    })?;
    let t = Instant::now();
    loop {
        let logs = up.kubectl(&["logs", "hooked"])?.stdout;
        if logs.contains("GET /poststart") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no postStart call: {logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Deleting it calls the preStop hook first.
    let server = std::thread::spawn(move || -> anyhow::Result<String> {
        let (mut conn, _) = told.accept()?;
        let mut buf = [0u8; 1024];
        let n = std::io::Read::read(&mut conn, &mut buf)?;
        std::io::Write::write_all(&mut conn, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    up.kubectl(&["delete", "pod", "hooked", "--timeout", "30s"])?
        .expect_ok("delete hooked")?;
    let request = server
        .join()
        .map_err(|_| anyhow::anyhow!("the hook server panicked"))??;
    assert!(request.starts_with("GET /prestop HTTP/1.1"), "{request}");

    // A postStart hook that cannot reach anything: the container is killed, and says why.
    let dead = free_tcp_port();
    let failing = format!(
        "{}    ports:\n    - containerPort: {port}\n    lifecycle:\n      postStart:\n        tcpSocket: {{port: {dead}}}\n",
        pod_yaml("bad-hook", "module:http-hello", "Always", "")
    );
    up.kubectl_in(&["apply", "-f", "-"], &failing)?
        .expect_ok("apply bad-hook")?;
    let last = up.wait_field(
        40,
        &["pod", "bad-hook"],
        "{.status.containerStatuses[0].lastState.terminated.message}",
        |m| !m.is_empty(),
    )?;
    assert!(last.starts_with("PostStartHook failed:"), "{last}");
    up.wait_described(15, &["pod", "bad-hook"], &["FailedPostStartHook"])?;
    Ok(())
}
