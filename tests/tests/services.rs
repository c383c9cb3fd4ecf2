//! Services end to end through netd: `outpost up` in a network namespace of the test's own,
//! its node running netd on a real TUN device, driven by the real kubectl. A Wasm Deployment
//! behind a Service answers through its ClusterIP and its DNS name, OCI replicas share the
//! load, a pod resolves a service by its short name, a NodePort answers on the node, a
//! LoadBalancer answers at its ingress, a pod's hostPort leads to it, and a service with no
//! endpoints is refused at once.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use outpost_tests::{busybox_layer, example, http_get_at, private_netns, retry, Registry, Up};
use serde_json::json;

fn deployment(name: &str, replicas: u32, pod_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n{pod_spec}"
    )
}

fn service(name: &str, ty: &str, port: u16, target: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {ty}\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    port: {port}\n    targetPort: {target}\n"
    )
}

/// The body of a `200 OK` to `GET path` at `addr`, asked until one comes within `secs`.
fn ok_within(secs: u64, what: &str, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    retry(secs, what, || {
        let (code, body) = http_get_at(addr, path)?;
        anyhow::ensure!(code == 200, "status {code}: {body}");
        Ok(body)
    })
}

fn busybox(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("/bin/busybox")
        .args(args)
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
#[ignore = "needs root and /dev/net/tun: netd makes a TUN device and routes"]
fn services_answer_through_cluster_ips_dns_names_and_node_ports() -> anyhow::Result<()> {
    private_netns()?;
    let reg = Registry::start()?;
    let image = reg.push_image(
        "test/busybox",
        "1",
        &[busybox_layer()?],
        json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
    )?;
    let dir = tempfile::tempdir()?;
    let up = Up::start_with_services(dir.path())?;
    let module = up
        .outpost(&[
            "module",
            "push",
            example("http-hello")?.to_str().unwrap_or_default(),
        ])?
        .expect_ok("outpost module push")?
        .stdout
        .trim()
        .to_string();

    // A Deployment of the wasi:http example behind a Service.
    let wasm = format!(
        "      runtimeClassName: wasm\n      containers:\n      - name: web\n        image: {module}\n        env:\n        - name: GREETING\n          value: netd\n        ports:\n        - name: http\n          containerPort: 18080\n        readinessProbe:\n          httpGet:\n            path: /healthz\n            port: http\n          periodSeconds: 1\n"
    );
    let manifest = format!(
        "{}---\n{}",
        deployment("hello", 1, &wasm),
        service("hello", "ClusterIP", 80, "http")
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply the Wasm deployment and its service")?;
    up.kubectl(&["rollout", "status", "deployment/hello", "--timeout=90s"])?
        .expect_ok("rollout")?;
    let ip = up
        .kubectl(&[
            "get",
            "service",
            "hello",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?
        .expect_ok("cluster ip")?
        .stdout;
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    let body = ok_within(30, "GET through the ClusterIP", addr, "/through/netd")?;
    assert!(body.contains("hello from netd at /through/netd"), "{body}");

    // Its DNS name resolves to the ClusterIP through cluster DNS.
    let ns = busybox(&["nslookup", "hello.default.svc.cluster.local", "10.96.0.10"])?;
    assert!(ns.contains(&format!("Address: {ip}")), "{ns}");
    let nx = busybox(&["nslookup", "nobody.default.svc.cluster.local", "10.96.0.10"])?;
    assert!(nx.contains("NXDOMAIN"), "{nx}");

    // Made a LoadBalancer, it gets a node port, and the node serves it on its own port at
    // the node's address, which is its ingress (as K3s's ServiceLB serves one). Made a
    // ClusterIP again, the ingress, the node port and the listener go.
    up.kubectl(&[
        "patch",
        "service",
        "hello",
        "-p",
        r#"{"spec":{"type":"LoadBalancer"}}"#,
    ])?
    .expect_ok("make it a LoadBalancer")?;
    let ingress = retry(30, "the balancer's ingress", || {
        let out = up
            .kubectl(&[
                "get",
                "service",
                "hello",
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ])?
            .stdout;
        anyhow::ensure!(!out.trim().is_empty(), "no ingress yet");
        Ok(out.trim().to_string())
    })?;
    let node_ip = up
        .kubectl(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
        ])?
        .expect_ok("the node's address")?
        .stdout;
    assert_eq!(ingress, node_ip.trim());
    let shown = up
        .kubectl(&["get", "service", "hello"])?
        .expect_ok("get the balancer")?
        .stdout;
    assert!(
        shown.contains("LoadBalancer") && shown.contains(&ingress) && shown.contains("80:3"),
        "{shown}"
    );
    let lb: SocketAddr = format!("{ingress}:80").parse()?;
    let body = ok_within(30, "GET through the load balancer", lb, "/through/lb")?;
    assert!(body.contains("hello from netd at /through/lb"), "{body}");
    up.kubectl(&[
        "patch",
        "service",
        "hello",
        "-p",
        r#"{"spec":{"type":"ClusterIP"}}"#,
    ])?
    .expect_ok("make it a ClusterIP again")?;
    retry(30, "the balancer gone", || {
        let svc = up
            .kubectl(&["get", "service", "hello", "-o", "json"])?
            .expect_ok("get the service")?
            .stdout;
        let svc: serde_json::Value = serde_json::from_str(&svc)?;
        anyhow::ensure!(
            svc["status"]["loadBalancer"]["ingress"].is_null(),
            "ingress still {}",
            svc["status"]
        );
        anyhow::ensure!(svc["spec"]["ports"][0]["nodePort"].is_null(), "{svc}");
        anyhow::ensure!(
            TcpStream::connect(lb).is_err(),
            "the node still listens on {lb}"
        );
        Ok(())
    })?;

    // A pod's hostPort leads to it from the node's addresses while it runs.
    let hosted = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hosted\nspec:\n  runtimeClassName: wasm\n  containers:\n  - name: web\n    image: {module}\n    env:\n    - name: GREETING\n      value: a host port\n    ports:\n    - containerPort: 18080\n      hostPort: 18081\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &hosted)?
        .expect_ok("apply a pod with a hostPort")?;
    up.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/hosted",
        "--timeout=60s",
    ])?
    .expect_ok("the pod with a hostPort ready")?;
    let hp = SocketAddr::from(([127, 0, 0, 1], 18081));
    let body = ok_within(30, "GET through the host port", hp, "/via/host-port")?;
    assert!(
        body.contains("hello from a host port at /via/host-port"),
        "{body}"
    );
    up.kubectl(&["delete", "pod", "hosted"])?
        .expect_ok("delete the pod with a hostPort")?;
    retry(30, "the host port closed", || {
        anyhow::ensure!(
            TcpStream::connect(hp).is_err(),
            "the node still listens on {hp}"
        );
        Ok(())
    })?;

    // Three OCI replicas with their own addresses share the load, and a pod reaches the
    // Wasm service by its short name (cluster DNS as its resolver, search domains).
    let oci = format!(
        "      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: {image}\n        command: [\"sh\", \"-c\", \"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www\"]\n        ports:\n        - name: http\n          containerPort: 8080\n        readinessProbe:\n          tcpSocket:\n            port: 8080\n          periodSeconds: 1\n"
    );
    let manifest = format!(
        "{}---\n{}",
        deployment("spread", 3, &oci),
        service("spread", "NodePort", 80, "http")
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply the OCI deployment")?;
    up.kubectl(&["rollout", "status", "deployment/spread", "--timeout=90s"])?
        .expect_ok("rollout")?;
    let sip = up
        .kubectl(&[
            "get",
            "service",
            "spread",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?
        .stdout;
    let saddr: SocketAddr = format!("{sip}:80").parse()?;
    let mut seen = std::collections::HashSet::new();
    retry(
        30,
        "all three replicas answer through the ClusterIP",
        || {
            let (code, body) = http_get_at(saddr, "/")?;
            anyhow::ensure!(code == 200, "status {code}: {body}");
            seen.insert(body.lines().last().unwrap_or_default().to_string());
            anyhow::ensure!(
                seen.len() == 3,
                "seen {seen:?}; {}",
                up.kubectl(&["get", "endpointslices", "-o", "yaml"])?.stdout
            );
            Ok(())
        },
    )?;
    let node_port = up
        .kubectl(&[
            "get",
            "service",
            "spread",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])?
        .stdout
        .parse::<u16>()?;
    let node = SocketAddr::from(([127, 0, 0, 1], node_port));
    ok_within(30, "GET through the node port", node, "/")?;

    // The API as a pod reaches it: the `kubernetes` Service's cluster IP, checked against the
    // CA in the pod's token volume, the pod's token as its credential.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let pod = up
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "app=spread",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?
        .expect_ok("a spread pod")?
        .stdout;
    let read = |f: &str| -> anyhow::Result<String> {
        Ok(up
            .kubectl(&["exec", &pod, "--", "cat", &format!("{sa}/{f}")])?
            .expect_ok("read the token volume")?
            .stdout)
    };
    let ca = dir.path().join("pod-ca.crt");
    std::fs::write(&ca, read("ca.crt")?)?;
    let token = read("token")?;
    let in_cluster = std::process::Command::new(outpost_tests::kubectl_bin(None)?)
        .args(["--kubeconfig", "/dev/null", "--server", "https://10.96.0.1"])
        .arg(format!("--certificate-authority={}", ca.display()))
        .arg(format!("--token={token}"))
        .args(["get", "pods"])
        .output()?;
    let said = String::from_utf8_lossy(&in_cluster.stderr);
    assert!(
        said.contains("\"system:serviceaccount:default:default\" cannot list"),
        "{said}"
    );

    let client = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sh\", \"-c\", \"cat /etc/resolv.conf; env; wget -q -O - http://hello/by/name\"]\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &client)?
        .expect_ok("apply client")?;
    let ended = up.wait_field(
        60,
        &["pod", "client"],
        "{.status.containerStatuses[0].state.terminated.exitCode}",
        |s| !s.is_empty(),
    )?;
    let logs = up.kubectl(&["logs", "client"])?.stdout;
    assert_eq!(ended, "0", "{logs}");
    assert!(logs.contains("nameserver 10.96.0.10"), "{logs}");
    assert!(logs.contains("search default.svc.cluster.local"), "{logs}");
    assert!(logs.contains("hello from netd at /by/name"), "{logs}");
    // kubelet's Service variables, for in-cluster clients and Docker-link style discovery.
    let api_ip = up
        .kubectl(&[
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?
        .stdout;
    for line in [
        format!("KUBERNETES_SERVICE_HOST={api_ip}"),
        format!("HELLO_SERVICE_HOST={ip}"),
        "HELLO_SERVICE_PORT_HTTP=80".to_string(),
        format!("SPREAD_PORT=tcp://{sip}:80"),
        format!("SPREAD_PORT_80_TCP_ADDR={sip}"),
    ] {
        assert!(logs.lines().any(|l| l == line), "{line} missing: {logs}");
    }

    // A Wasm pod's outgoing wasi:http request reaches a Service by its short name.
    let (code, body) = retry(30, "a Wasm pod fetching http://spread/", || {
        let r = http_get_at(addr, "/fetch/spread/")?;
        anyhow::ensure!(r.0 == 200, "status {}: {}", r.0, r.1);
        Ok(r)
    })?;
    assert_eq!(code, 200);
    assert!(body.contains("spread-"), "{body}");

    // Scaled to nothing, the service refuses at once rather than hanging.
    up.kubectl(&["scale", "deployment/hello", "--replicas=0"])?
        .expect_ok("scale to 0")?;
    retry(30, "refused once no endpoint is left", || {
        let t = Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(_) => anyhow::bail!("still accepted"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(1),
                    "slow: {:?}",
                    t.elapsed()
                );
                Ok(())
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    })?;

    // netd counted it all.
    let (code, metrics) = http_get_at(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics")?;
    assert_eq!(code, 200);
    assert!(
        metrics
            .contains("outpost_netd_connections_total{service=\"default/spread\",port=\"80/tcp\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_netd_errors_total{service=\"default/hello\",port=\"80/tcp\"}"),
        "{metrics}"
    );
    Ok(())
}

/// A backend outside the cluster (a thread of this test) answering every request with `text`.
fn outside_backend(text: &'static str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            // The whole request head first: closing on unread bytes would reset.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
        }
    });
    Ok(port)
}

#[test]
#[ignore = "needs root and /dev/net/tun: netd makes a TUN device and routes"]
fn cluster_ips_keep_working_offline_and_across_an_agent_restart() -> anyhow::Result<()> {
    private_netns()?;
    let dir = tempfile::tempdir()?;
    let mut up = Up::start_with(dir.path(), &["--no-node"])?;
    let token = up.token()?;
    let mut edge = outpost_tests::Node::new(&dir.path().join("edge"));
    let args = [
        "--server",
        &up.gateway(),
        "--name",
        "edge",
        "--service-proxy",
        "on",
    ];
    edge.start(&[&args[..], &["--token", &token]].concat())?;
    up.node_ready(&edge, "edge", 30)?;
    // A Service without a selector and the EndpointSlice of a backend outside the cluster.
    let port = outside_backend("from outside\n")?;
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ext\nspec:\n  ports:\n  - name: http\n    port: 80\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext-1\n  labels:\n    kubernetes.io/service-name: ext\naddressType: IPv4\nports:\n- name: http\n  port: {port}\n  protocol: TCP\nendpoints:\n- addresses: [\"127.0.0.1\"]\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply ext")?;
    let ip = up
        .kubectl(&["get", "service", "ext", "-o", "jsonpath={.spec.clusterIP}"])?
        .stdout;
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    let get = || -> anyhow::Result<String> {
        let (code, body) = http_get_at(addr, "/")?;
        anyhow::ensure!(code == 200, "status {code}");
        Ok(body)
    };
    let body = retry(30, "GET through the ClusterIP", get)?;
    assert!(body.contains("from outside"), "{body}");

    // UDP: a NodePort Service of an echo server outside the cluster, by node port and by
    // ClusterIP.
    let echo = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let echo_port = echo.local_addr()?.port();
    std::thread::spawn(move || {
        let mut b = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut b) {
            let _ = echo.send_to(&[b"echo:", &b[..n]].concat(), from);
        }
    });
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: udp\nspec:\n  type: NodePort\n  ports:\n  - name: u\n    port: 53\n    protocol: UDP\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: udp-1\n  labels:\n    kubernetes.io/service-name: udp\naddressType: IPv4\nports:\n- name: u\n  port: {echo_port}\n  protocol: UDP\nendpoints:\n- addresses: [\"127.0.0.1\"]\n"
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply udp")?;
    let node_port = up
        .kubectl(&[
            "get",
            "service",
            "udp",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])?
        .stdout;
    let udp_ip = up
        .kubectl(&["get", "service", "udp", "-o", "jsonpath={.spec.clusterIP}"])?
        .stdout;
    let client = std::net::UdpSocket::bind("0.0.0.0:0")?;
    client.set_read_timeout(Some(Duration::from_millis(300)))?;
    for to in [format!("127.0.0.1:{node_port}"), format!("{udp_ip}:53")] {
        let got = retry(30, &format!("a UDP echo through {to}"), || {
            client.send_to(b"hi", &to)?;
            let mut b = [0u8; 64];
            let (n, _) = client.recv_from(&mut b)?;
            Ok(b[..n].to_vec())
        })?;
        assert_eq!(got, b"echo:hi", "{to}");
    }

    // The control plane goes away: the node's netd keeps serving.
    up.kill();
    assert!(get()?.contains("from outside"));
    // The agent restarts with no control plane: its table comes back from its cache.
    edge.kill();
    edge.start(&args)?;
    let body = retry(
        30,
        "GET through the ClusterIP after the restart, offline",
        get,
    )
    .map_err(|e| anyhow::anyhow!("{e}\nnode log: {}", edge.logs()))?;
    assert!(body.contains("from outside"), "{body}");
    let ns = busybox(&["nslookup", "ext.default.svc.cluster.local", "10.96.0.10"])?;
    assert!(ns.contains(&format!("Address: {ip}")), "{ns}");
    Ok(())
}

/// A named network namespace for a second node, joined to the test's by a veth
/// (10.250.0.1 here, 10.250.0.2 there); removed with the test.
struct Peer(String);

impl Peer {
    fn new() -> anyhow::Result<Peer> {
        let ns = format!("outpost-peer-{}", std::process::id());
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &ns])
            .output();
        run(&["ip", "netns", "add", &ns])?;
        let peer = Peer(ns.clone());
        run(&[
            "ip", "link", "add", "opa0", "type", "veth", "peer", "name", "opb0", "netns", &ns,
        ])?;
        run(&["ip", "addr", "add", "10.250.0.1/24", "dev", "opa0"])?;
        run(&["ip", "link", "set", "opa0", "up"])?;
        run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            "10.250.0.2/24",
            "dev",
            "opb0",
        ])?;
        run(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", "opb0", "up",
        ])?;
        Ok(peer)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun: netd, network namespaces and a veth"]
fn services_reach_pods_on_other_nodes_through_their_addresses() -> anyhow::Result<()> {
    private_netns()?;
    let peer = Peer::new()?;
    let reg = Registry::start_at("10.250.0.1")?;
    let image = reg.push_image(
        "test/busybox",
        "1",
        &[busybox_layer()?],
        json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
    )?;
    let dir = tempfile::tempdir()?;
    let up = Up::start_at(dir.path(), "10.250.0.1", &[])?;
    // A second node in the other namespace, with a pod network of its own.
    let token = up.token()?;
    let mut b = outpost_tests::Node::new(&dir.path().join("b"));
    b.netns = Some(peer.0.clone());
    b.start(&[
        "--server",
        &up.gateway(),
        "--token",
        &token,
        "--name",
        "b",
        "--pod-cidr",
        "10.89.0.0/24",
        "--insecure-registry",
        &reg.addr,
        "--service-proxy",
        "on",
    ])?;
    up.node_ready(&b, "b", 30)?;
    // An OCI web server pinned to node b, and its Service.
    let pod = format!(
        "      nodeSelector:\n        kubernetes.io/hostname: b\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: {image}\n        command: [\"sh\", \"-c\", \"mkdir -p /www && echo on-b > /www/index.html && exec httpd -f -p 8080 -h /www\"]\n        ports:\n        - name: http\n          containerPort: 8080\n"
    );
    let manifest = format!(
        "{}---\n{}",
        deployment("far", 1, &pod),
        service("far", "ClusterIP", 80, "http")
    );
    up.kubectl_in(&["apply", "-f", "-"], &manifest)?
        .expect_ok("apply")?;
    up.wait_field(
        60,
        &["pods", "-l", "app=far"],
        "{.items[0].status.conditions[?(@.type==\"Ready\")].status}",
        |s| s == "True",
    )
    .map_err(|e| {
        let d = up
            .kubectl(&["describe", "pods", "-l", "app=far"])
            .map(|r| r.stdout);
        anyhow::anyhow!("{e}\n{d:?}\nnode log: {}", b.logs())
    })?;
    let pod_ip = up
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "app=far",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])?
        .stdout;
    assert!(pod_ip.starts_with("10.89.0."), "{pod_ip}");
    // From this node (its netd, through the route to b's pod network via b's address).
    let ip = up
        .kubectl(&["get", "service", "far", "-o", "jsonpath={.spec.clusterIP}"])?
        .stdout;
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    let body = retry(30, "GET through the ClusterIP to a pod on node b", || {
        let (code, body) = http_get_at(addr, "/")?;
        anyhow::ensure!(code == 200, "status {code}");
        Ok(body)
    })
    .map_err(|e| {
        let routes = std::process::Command::new("ip").arg("route").output();
        anyhow::anyhow!("{e}\nroutes: {routes:?}\nup: {}", up.logs())
    })?;
    assert!(body.contains("on-b"), "{body}");
    Ok(())
}
