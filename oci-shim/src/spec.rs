//! The OCI runtime spec (`config.json`) a pod's container runs under, derived from the pod,
//! the container and the image config as the kubelet and containerd derive it:
//!
//! - argv: the container's `command` (else the image Entrypoint) followed by its `args`
//!   (else, when it has no `command`, the image Cmd); env: the image's, then the pod's;
//!   workingDir, else the image's; the user from `securityContext` (container over pod),
//!   else the image's `User`, names looked up in the image's `/etc/passwd` and `/etc/group`;
//! - volumes as bind mounts, plus the node's `/etc/hosts`, `/etc/hostname` and
//!   `/etc/resolv.conf` for the pod, read-only;
//! - limits as cgroups: memory, cpu quota (and shares from the request), pids;
//! - hardened defaults: no new privileges, containerd's default capabilities (adjusted by
//!   `capabilities.add/drop`), a seccomp profile refusing the syscalls that reach past a
//!   container, masked and read-only kernel paths, a read-only root file system when asked.
//!   `privileged: true` lifts these.
//!
//! Pure: it reads only the image's user and group files.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::store::ImageConfig;
use crate::Error;

/// containerd's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, for privileged containers.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Syscalls the default profile refuses (EPERM): they reach the kernel's global state or
/// other namespaces, and no ordinary workload needs them.
pub const REFUSED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

/// What the node resolved for one container: the pod's env (config maps, secrets and the
/// downward API already looked up), its volumes and the node files it gets.
pub struct Launch<'a> {
    pub pod: &'a Value,
    pub container: &'a Value,
    pub env: Vec<(String, String)>,
    /// (host path, container path, writable).
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// Read-only files bound over the container's (`/etc/hosts` and the like).
    pub files: Vec<(PathBuf, String)>,
    /// The container's cgroup, an absolute path under the cgroup hierarchies.
    pub cgroup: String,
    pub hostname: String,
    /// The pod's network namespace (`/run/netns/…`); the node's network when `None`.
    pub netns: Option<PathBuf>,
}

/// The strings of a JSON array (none if it is not one).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `$(VAR)` in a command, an argument or an env value, as the kubelet expands it: the last
/// `VAR` in `env`, `$$` for a `$`, and a reference to nothing left as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(close) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=close];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &after[close + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The argv the container runs.
pub fn argv(container: &Value, image: &ImageConfig, env: &[(String, String)]) -> Vec<String> {
    let command = strings(&container["command"]);
    let args = strings(&container["args"]);
    let mut out = if command.is_empty() {
        image.entrypoint.clone()
    } else {
        command.iter().map(|c| expand(c, env)).collect()
    };
    if !args.is_empty() {
        out.extend(args.iter().map(|a| expand(a, env)));
    } else if command.is_empty() {
        out.extend(image.cmd.iter().cloned());
    }
    out
}

/// A user name or number in the image's `file` (`/etc/passwd` or `/etc/group`): the id and,
/// for passwd, the primary group.
fn lookup(rootfs: &Path, file: &str, name: &str) -> Option<(u32, Option<u32>)> {
    if let Ok(n) = name.parse::<u32>() {
        let gid = std::fs::read_to_string(rootfs.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 3 && f[2] == name)
                        .then(|| f[3].parse().ok())
                        .flatten()
                })
            });
        return Some((n, gid));
    }
    let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[0] == name).then(|| {
            f[2].parse()
                .ok()
                .map(|id| (id, f.get(3).and_then(|g| g.parse().ok())))
        })?
    })
}

/// The container's (uid, gid).
fn user(l: &Launch<'_>, image: &ImageConfig, rootfs: &Path) -> Result<(u32, u32), Error> {
    let sc = |k: &str| {
        l.container["securityContext"][k]
            .as_u64()
            .or(l.pod["spec"]["securityContext"][k].as_u64())
            .and_then(|n| u32::try_from(n).ok())
    };
    let (name, group) = match image.user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image.user.as_str(), None),
    };
    let (mut uid, mut gid) = (0, 0);
    if !name.is_empty() {
        let (u, g) = lookup(rootfs, "etc/passwd", name).ok_or_else(|| {
            Error::Config(format!(
                "the image's user {name:?} is not in its /etc/passwd"
            ))
        })?;
        uid = u;
        gid = g.unwrap_or(0);
    }
    if let Some(g) = group.filter(|g| !g.is_empty()) {
        gid = lookup(rootfs, "etc/group", g)
            .ok_or_else(|| {
                Error::Config(format!("the image's group {g:?} is not in its /etc/group"))
            })?
            .0;
    }
    if let Some(u) = sc("runAsUser") {
        uid = u;
        // A numeric user the image knows keeps its group, as with `docker run -u`.
        if sc("runAsGroup").is_none() {
            gid = lookup(rootfs, "etc/passwd", &u.to_string())
                .and_then(|(_, g)| g)
                .unwrap_or(if image.user.is_empty() { 0 } else { gid });
        }
    }
    if let Some(g) = sc("runAsGroup") {
        gid = g;
    }
    let non_root = l.container["securityContext"]["runAsNonRoot"]
        .as_bool()
        .or(l.pod["spec"]["securityContext"]["runAsNonRoot"].as_bool());
    if non_root == Some(true) && uid == 0 {
        return Err(Error::Config(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    Ok((uid, gid))
}

fn seccomp_arches() -> Vec<&'static str> {
    match std::env::consts::ARCH {
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "arm" => vec!["SCMP_ARCH_ARM"],
        _ => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    }
}

/// The runtime spec as JSON, checked against oci-spec's types.
pub fn runtime_spec(l: &Launch<'_>, image: &ImageConfig, rootfs: &Path) -> Result<Value, Error> {
    let c = l.container;
    let sc = &c["securityContext"];
    let privileged = sc["privileged"] == true;
    // Env: the image's, then the pod's over it.
    let mut env: Vec<(String, String)> = image
        .env
        .iter()
        .filter_map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for (k, v) in &l.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    if !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".into(), l.hostname.clone()));
    }
    let args = argv(c, image, &env);
    if args.is_empty() {
        return Err(Error::Config(
            "no command specified: the container has no command and the image no Entrypoint or Cmd"
                .into(),
        ));
    }
    let (uid, gid) = user(l, image, rootfs)?;
    let groups: Vec<u64> = l.pod["spec"]["securityContext"]["supplementalGroups"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let cwd = c["workingDir"]
        .as_str()
        .filter(|w| !w.is_empty())
        .unwrap_or(if image.working_dir.is_empty() {
            "/"
        } else {
            &image.working_dir
        });
    if !cwd.starts_with('/') {
        return Err(Error::Config(format!(
            "workingDir {cwd:?} is not an absolute path"
        )));
    }
    let caps: Vec<String> = if privileged {
        ALL_CAPS.iter().map(|s| s.to_string()).collect()
    } else {
        let norm = |v: &Value| -> Vec<String> {
            strings(v)
                .iter()
                .map(|s| {
                    let s = s.to_ascii_uppercase();
                    if s.starts_with("CAP_") {
                        s
                    } else {
                        format!("CAP_{s}")
                    }
                })
                .collect()
        };
        let (add, drop) = (
            norm(&sc["capabilities"]["add"]),
            norm(&sc["capabilities"]["drop"]),
        );
        for a in &add {
            if a != "CAP_ALL" && !ALL_CAPS.contains(&a.as_str()) {
                return Err(Error::Config(format!(
                    "unknown capability {a:?} in capabilities.add"
                )));
            }
        }
        let mut caps: Vec<String> = if add.iter().any(|a| a == "CAP_ALL") {
            ALL_CAPS.iter().map(|s| s.to_string()).collect()
        } else {
            DEFAULT_CAPS
                .iter()
                .map(|s| s.to_string())
                .chain(add)
                .collect()
        };
        if drop.iter().any(|d| d == "CAP_ALL") {
            caps.clear();
        }
        caps.retain(|c| !drop.contains(c));
        caps.sort();
        caps.dedup();
        caps
    };
    // Kubernetes' default allows escalation; hardened, we refuse it unless asked.
    let no_new_privs = !privileged && sc["allowPrivilegeEscalation"] != true;
    let mut mounts: Vec<Value> = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    for (host, path, _) in l.files.iter().map(|(h, p)| (h, p, false)) {
        mounts.push(json!({"destination": path, "type": "bind", "source": host,
                           "options": ["rbind", "ro", "nosuid", "nodev"]}));
    }
    for (host, path, writable) in &l.mounts {
        if !path.starts_with('/') {
            return Err(Error::Config(format!(
                "mountPath {path:?} is not an absolute path"
            )));
        }
        mounts.push(json!({"destination": path, "type": "bind", "source": host,
                           "options": ["rbind", if *writable { "rw" } else { "ro" }]}));
    }
    let limits = &c["resources"]["limits"];
    let requests = &c["resources"]["requests"];
    let mut resources = json!({"pids": {"limit": 4096}});
    let quantity =
        |v: &Value, f: fn(&str) -> Option<u64>, what: &str| -> Result<Option<u64>, Error> {
            match v.as_str() {
                Some(q) => f(q)
                    .map(Some)
                    .ok_or_else(|| Error::Config(format!("bad {what} {q:?}"))),
                None => Ok(None),
            }
        };
    if let Some(m) = quantity(
        &limits["memory"],
        outpost_api::quantity::bytes,
        "memory limit",
    )? {
        resources["memory"] = json!({"limit": m});
    }
    let mut cpu = json!({});
    if let Some(mc) = quantity(
        &limits["cpu"],
        outpost_api::quantity::millicores,
        "cpu limit",
    )? {
        cpu["quota"] = json!((mc * 100).max(1000));
        cpu["period"] = json!(100_000);
    }
    let req = quantity(
        &requests["cpu"],
        outpost_api::quantity::millicores,
        "cpu request",
    )?
    .or(quantity(
        &limits["cpu"],
        outpost_api::quantity::millicores,
        "cpu limit",
    )?);
    if let Some(mc) = req {
        cpu["shares"] = json!((mc * 1024 / 1000).max(2));
    }
    if cpu.as_object().is_some_and(|o| !o.is_empty()) {
        resources["cpu"] = cpu;
    }
    let mut ns: Vec<Value> = ["pid", "ipc", "uts", "mount"]
        .iter()
        .map(|t| json!({"type": t}))
        .collect();
    if let Some(p) = &l.netns {
        ns.push(json!({"type": "network", "path": p}));
    }
    let mut linux = json!({
        "cgroupsPath": l.cgroup,
        "namespaces": ns,
        "resources": resources,
    });
    if !privileged {
        linux["maskedPaths"] = json!(oci_spec::runtime::get_default_maskedpaths());
        linux["readonlyPaths"] = json!(oci_spec::runtime::get_default_readonly_paths());
        linux["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": seccomp_arches(),
            "syscalls": [{"names": REFUSED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        });
    }
    let caps_json = json!(caps);
    // Open files as containerd allows, but never above what this process may hold: raising a
    // hard limit fails inside libcontainer's intermediate process.
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1_048_576, |(_, hard)| hard.min(1_048_576));
    let spec = json!({
        "ociVersion": "1.0.2",
        "hostname": l.hostname,
        "root": {"path": "rootfs", "readonly": sc["readOnlyRootFilesystem"] == true},
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups},
            "args": args,
            "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": cwd,
            "noNewPrivileges": no_new_privs,
            "capabilities": {"bounding": caps_json, "effective": caps_json,
                             "permitted": caps_json},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        },
        "mounts": mounts,
        "linux": linux,
    });
    // The types libcontainer reads: a spec they refuse is a config error here, not a
    // failure inside the container's init.
    serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
        .map_err(|e| Error::Config(format!("runtime spec: {e}")))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch<'a>(pod: &'a Value, c: &'a Value) -> Launch<'a> {
        Launch {
            pod,
            container: c,
            env: vec![("GREETING".into(), "hi".into())],
            mounts: vec![("/var/lib/x".into(), "/data".into(), true)],
            files: vec![("/var/lib/hosts".into(), "/etc/hosts".into())],
            cgroup: "/outpost/uid/c".into(),
            hostname: "web-0".into(),
            netns: Some("/run/netns/outpost-uid".into()),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
            working_dir: "/app".into(),
            ..ImageConfig::default()
        }
    }

    #[test]
    fn command_args_and_env_merge_like_the_kubelet() {
        let env = vec![("NAME".to_string(), "x".to_string())];
        let img = image();
        let c = |v: Value| argv(&v, &img, &env);
        assert_eq!(c(json!({})), ["/entry", "serve"]);
        assert_eq!(c(json!({"args": ["a"]})), ["/entry", "a"]);
        assert_eq!(c(json!({"command": ["sh"]})), ["sh"]);
        assert_eq!(
            c(json!({"command": ["sh"], "args": ["-c", "echo $(NAME) $$(NAME) $(NOPE)"]})),
            ["sh", "-c", "echo x $(NAME) $(NOPE)"]
        );
        let pod = json!({"spec": {}});
        let ct = json!({"name": "c", "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}});
        let s = runtime_spec(&launch(&pod, &ct), &img, Path::new("/nonexistent")).unwrap();
        assert_eq!(
            s["process"]["env"],
            json!(["PATH=/bin", "GREETING=hi", "HOSTNAME=web-0"])
        );
        assert_eq!(s["process"]["cwd"], "/app");
        assert_eq!(s["process"]["noNewPrivileges"], true);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["resources"]["cpu"]["shares"], 512);
        assert_eq!(s["linux"]["cgroupsPath"], "/outpost/uid/c");
        assert!(s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "network", "path": "/run/netns/outpost-uid"})));
        assert!(s["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("unshare")));
        let m = s["mounts"].as_array().unwrap();
        assert!(m
            .iter()
            .any(|m| m["destination"] == "/data" && m["options"][1] == "rw"));
        assert!(m
            .iter()
            .any(|m| m["destination"] == "/etc/hosts" && m["options"][1] == "ro"));
        assert_eq!(s["root"]["readonly"], false);
    }

    #[test]
    fn security_context() {
        let dir = std::env::temp_dir().join(format!("outpost-spec-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let pod = json!({"spec": {"securityContext": {"supplementalGroups": [7]}}});
        let mut img = image();
        img.user = "www".into();
        let ct = json!({"name": "c", "securityContext": {
            "readOnlyRootFilesystem": true, "capabilities": {"add": ["NET_ADMIN"], "drop": ["CHOWN"]}}});
        let s = runtime_spec(&launch(&pod, &ct), &img, &dir).unwrap();
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 33, "gid": 34, "additionalGids": [7]})
        );
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_NET_ADMIN")) && !caps.contains(&json!("CAP_CHOWN")));
        assert_eq!(s["root"]["readonly"], true);
        img.user = "www:staff".into();
        let s = runtime_spec(&launch(&pod, &ct), &img, &dir).unwrap();
        assert_eq!(s["process"]["user"]["gid"], 50);
        let ct = json!({"name": "c", "securityContext": {"runAsUser": 1000, "runAsGroup": 1001}});
        let s = runtime_spec(&launch(&pod, &ct), &img, &dir).unwrap();
        assert_eq!(
            (
                s["process"]["user"]["uid"].clone(),
                s["process"]["user"]["gid"].clone()
            ),
            (json!(1000), json!(1001))
        );
        img.user = "nobody".into();
        assert!(matches!(
            runtime_spec(&launch(&pod, &ct), &img, &dir),
            Err(Error::Config(_))
        ));
        img.user = String::new();
        let ct = json!({"name": "c", "securityContext": {"runAsNonRoot": true}});
        assert!(matches!(
            runtime_spec(&launch(&pod, &ct), &img, &dir),
            Err(Error::Config(_))
        ));
        let ct = json!({"name": "c", "securityContext": {"privileged": true}});
        let s = runtime_spec(&launch(&pod, &ct), &img, &dir).unwrap();
        assert!(s["linux"]["seccomp"].is_null());
        assert_eq!(s["process"]["noNewPrivileges"], false);
        let ct = json!({"name": "c", "command": [], "resources": {"limits": {"memory": "lots"}}});
        assert!(matches!(
            runtime_spec(&launch(&pod, &ct), &img, &dir),
            Err(Error::Config(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
