//! Running containers. Two halves, one on each side of a process boundary:
//!
//! - [`helper`] is the whole life of one container in a process of its own (an `oci-run`
//!   helper forked by the agent's [zygote](crate::zygote), single-threaded when
//!   libcontainer clones): mount the root file system (overlayfs over the image, or a copy),
//!   create and start the container with libcontainer (its stdout and stderr are the
//!   helper's), wait for init, count OOM kills in its memory cgroup, write the outcome to
//!   `BUNDLE/exit.json` and close its stdio (the agent now knows), then delete the
//!   container and unmount. A line on the helper's stdin (a socket) signals the container;
//!   the end of stdin (the agent is gone) kills it. [`exec`] runs a command inside a
//!   running container.
//! - [`Containers`] is the agent's side: it writes the bundle, has the zygote fork the
//!   helper and reads the outcome, all without blocking a runtime thread.

#[cfg(feature = "containers")]
use std::io::BufRead as _;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::zygote::{Refused, Zygote};
use crate::Error;

/// How a container run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Its exit code, 128 + N for a death by signal N.
    pub exit_code: i32,
    /// The kernel's OOM killer killed a process of it.
    pub oom_killed: bool,
    /// The container could not be created or started: why.
    pub error: Option<String>,
}

fn arg(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}"))
}

/// Called first in a binary's `main`: when the process was started as an `oci-run` or
/// `oci-exec` helper or as the zygote that forks `oci-run` helpers, run it and exit. It must
/// come before any thread starts, since libcontainer clones the process and the zygote
/// forks it.
pub fn dispatch() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("oci-run" | "oci-exec") => std::process::exit(main(&args)),
        Some("oci-zygote") => std::process::exit(crate::zygote::serve()),
        _ => {}
    }
}

/// The entry point of `oci-run` and `oci-exec`, before any thread or runtime starts; what the
/// process exits with.
pub fn main(args: &[String]) -> i32 {
    catch_sigpipe();
    match args.first().map(String::as_str) {
        Some("oci-run") => {
            let parsed = (|| {
                Ok::<_, String>((
                    PathBuf::from(arg(args, "--root")?),
                    arg(args, "--id")?,
                    PathBuf::from(arg(args, "--bundle")?),
                    PathBuf::from(arg(args, "--layers")?),
                    PathBuf::from(arg(args, "--lower")?),
                ))
            })();
            let (root, id, bundle, layers, lower) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("oci-run: {e}");
                    return 2;
                }
            };
            // Held until the outcome is written: the next run of this container waits for
            // it, so this run's cleanup never touches the next one's bundle.
            let lock = std::fs::File::create(bundle.join(LOCK)).and_then(|f| f.lock().map(|()| f));
            if let Err(e) = &lock {
                eprintln!("oci-run: locking the bundle: {e}");
                return 1;
            }
            let outcome = helper(&root, &id, &bundle, &layers, &lower);
            // A container that ran to its end was reported by the helper; one that never
            // started is reported here.
            if !ended() {
                if let Err(e) = report(&bundle, &outcome) {
                    eprintln!("oci-run: writing the outcome: {e}");
                    return 1;
                }
            }
            drop(lock);
            0
        }
        Some("oci-exec") => {
            let (root, id) = match (arg(args, "--root"), arg(args, "--id")) {
                (Ok(r), Ok(i)) => (PathBuf::from(r), i),
                _ => {
                    eprintln!("oci-exec: missing --root or --id");
                    return 2;
                }
            };
            let tty = args.iter().take_while(|a| *a != "--").any(|a| a == "--tty");
            let cmd: Vec<String> = args
                .iter()
                .skip_while(|a| *a != "--")
                .skip(1)
                .cloned()
                .collect();
            match exec(&root, &id, cmd, tty) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("{e}");
                    126
                }
            }
        }
        _ => 2,
    }
}

/// Set (under the lock, before the init is reaped) once the container's init has exited:
/// the signal thread sends signals only while holding it unset, so no signal can reach a
/// pid the kernel has handed to another process.
static ENDED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

fn ended() -> bool {
    *ENDED.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(feature = "containers")]
fn set_ended() {
    *ENDED.lock().unwrap_or_else(|e| e.into_inner()) = true;
}

/// The agent's stderr, kept by a helper the zygote forked: where the helper's own messages
/// go once its stderr is no longer the container's.
pub(crate) static AGENT_STDERR: std::sync::OnceLock<std::os::fd::OwnedFd> =
    std::sync::OnceLock::new();

/// Tell the agent how the container ended: the outcome in `BUNDLE/exit.json`, then the end
/// of the helper's stdin socket and of its stdout and stderr, so the agent's wait and log
/// pumps end now rather than after the cleanup that follows (the bundle stays locked until
/// that is done).
fn report(bundle: &Path, outcome: &Outcome) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let json = serde_json::to_vec(outcome).unwrap_or_default();
    std::fs::write(bundle.join("exit.json"), &json)?;
    // The agent takes the outcome from the socket (sparing it a read of the file). Not a
    // socket when the helper was started with a pipe: the agent then waits for the process
    // to end and reads the file.
    let _ = nix::sys::socket::send(0, &json, nix::sys::socket::MsgFlags::MSG_NOSIGNAL);
    let _ = nix::sys::socket::shutdown(0, nix::sys::socket::Shutdown::Both);
    let quiet = std::fs::File::open("/dev/null")?;
    let err = AGENT_STDERR
        .get()
        .map_or(quiet.as_raw_fd(), |f| f.as_raw_fd());
    nix::unistd::dup2(quiet.as_raw_fd(), 1)?;
    nix::unistd::dup2(err, 2)?;
    Ok(())
}

/// The memory cgroup's OOM-kill count of `cgroup` (v1 `memory.oom_control`, v2
/// `memory.events`).
#[cfg(feature = "containers")]
fn oom_kills(cgroup: &str) -> u64 {
    let rel = cgroup.trim_start_matches('/');
    let base = Path::new("/sys/fs/cgroup");
    [
        base.join("memory").join(rel).join("memory.oom_control"),
        base.join(rel).join("memory.events"),
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .flat_map(|s| {
        s.lines()
            .filter_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse().ok())
            })
            .collect::<Vec<u64>>()
    })
    .max()
    .unwrap_or(0)
}

/// Mount the container's root file system at `BUNDLE/rootfs`: an overlay of the image
/// `lower` with its writable layer in `LAYERS/upper` (and overlayfs's `LAYERS/work`), or,
/// where the kernel refuses an overlay, a private copy of the image in `LAYERS/rootfs`
/// bound there. The bundle may be in memory; what the container writes goes to `layers`,
/// on the node's disk.
#[cfg(feature = "containers")]
fn mount_rootfs(bundle: &Path, layers: &Path, lower: &Path) -> Result<(), String> {
    let (rootfs, upper, work) = (
        bundle.join("rootfs"),
        layers.join("upper"),
        layers.join("work"),
    );
    if !layers.exists() {
        take_spare(layers);
    }
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    // The container's `/` shows the upper directory's mode and owner: a fresh one's are
    // set, not left to the umask, so that a recycled one (see `retire`) matches them.
    let m = std::fs::symlink_metadata(&upper).map_err(|e| format!("{}: {e}", upper.display()))?;
    if !is_fresh(&upper, &m) {
        std::fs::set_permissions(
            &upper,
            std::os::unix::fs::PermissionsExt::from_mode(FRESH_MODE),
        )
        .map_err(|e| format!("{}: {e}", upper.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let overlay = nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    );
    if overlay.is_ok() {
        return Ok(());
    }
    // No overlayfs (or an upper dir it refuses): a private copy.
    let copy = layers.join("rootfs");
    let _ = std::fs::remove_dir_all(&copy);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(lower)
        .arg(&copy)
        .status()
        .map_err(|e| format!("copying the image: {e}"))?;
    if !status.success() {
        return Err(format!("copying the image into {} failed", copy.display()));
    }
    nix::mount::mount(
        Some(&copy),
        &rootfs,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} at {}: {e}", copy.display(), rootfs.display()))
}

/// Where a container's ended layer directories wait for the next container, beside the
/// containers' own (`DIR/containers/.spare/*`; no container id can be `.spare`, as every id
/// has a `_`, and the benchmark's have none of a dot). The agent keeps pod directories the
/// same way (edge-node's `spare.rs`) with its free list in memory; these are retired and
/// taken by helpers, each a process of its own, so the directory itself is the list.
#[cfg(feature = "containers")]
const SPARES: &str = ".spare";

/// How many spare layer directories are kept.
#[cfg(feature = "containers")]
const SPARE_CAP: usize = 32;

/// The mode of a fresh upper directory, the container's `/`.
#[cfg(feature = "containers")]
const FRESH_MODE: u32 = 0o755;

/// Whether upper directory `dir` (with metadata `m`) is as a fresh one: mode, owner, and no
/// mark of overlayfs (which it leaves on directories it copied into).
#[cfg(feature = "containers")]
fn is_fresh(dir: &Path, m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    m.is_dir()
        && m.mode() & 0o7777 == FRESH_MODE
        && m.uid() == 0
        && m.gid() == 0
        && !has_xattrs(dir)
}

/// Whether `path` has an extended attribute of overlayfs's (or its list cannot be read).
#[cfg(feature = "containers")]
fn has_xattrs(path: &Path) -> bool {
    match xattr::list(path) {
        Ok(mut names) => names.any(|n| {
            let n = n.as_encoded_bytes();
            n.starts_with(b"trusted.overlay.") || n.starts_with(b"user.overlay.")
        }),
        Err(e) => e.raw_os_error() != Some(nix::libc::ENOTSUP),
    }
}

/// Give `layers` (a container's layer directories, absent) the directories of an ended
/// container, if a spare is left: a rename, where making them would allocate inodes, which
/// a file system without a journal (ext4 so made, as on many boards) does slowly once many
/// were freed in the last minutes: it skips every recently freed one (1.3 ms a container
/// here after a few hundred).
#[cfg(feature = "containers")]
fn take_spare(layers: &Path) {
    let Some(spares) = layers.parent().map(|p| p.join(SPARES)) else {
        return;
    };
    let Ok(dir) = std::fs::read_dir(&spares) else {
        return;
    };
    for e in dir.flatten() {
        // Another helper may take the same one first.
        if std::fs::rename(e.path(), layers).is_ok() {
            return;
        }
    }
}

/// Done with `layers` after its container ended and its root was unmounted: what the
/// container wrote goes, and the directories are kept as a spare for the next container
/// (see [`take_spare`]) while fewer than [`SPARE_CAP`] are; an upper directory the
/// container changed (its `/`'s mode or owner, marks of overlayfs) goes too.
#[cfg(feature = "containers")]
fn retire(layers: &Path) {
    let upper = layers.join("upper");
    let _ = std::fs::remove_dir_all(layers.join("rootfs"));
    // The overlay's identity, which overlayfs writes on the upper directory at its first
    // mount: the next container's overlay is a new one and gets its own.
    let _ = xattr::remove(&upper, "trusted.overlay.uuid");
    let kept = match std::fs::symlink_metadata(&upper) {
        Ok(m) if is_fresh(&upper, &m) => empty(&upper).is_ok(),
        _ => false,
    };
    if !kept {
        let _ = std::fs::remove_dir_all(&upper);
    }
    let Some(spares) = layers.parent().map(|p| p.join(SPARES)) else {
        return;
    };
    let room = std::fs::read_dir(&spares).map_or(true, |d| d.count() < SPARE_CAP);
    if room && std::fs::create_dir_all(&spares).is_ok() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{}-{nanos}", std::process::id());
        if std::fs::rename(layers, spares.join(name)).is_ok() {
            return;
        }
    }
    let _ = std::fs::remove_dir_all(layers);
}

/// Remove what directory `dir` holds, keeping it.
#[cfg(feature = "containers")]
fn empty(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Move this process (single-threaded) into a mount namespace of its own, a slave of the one
/// it was in: mounts made there later still arrive, its own go nowhere else.
pub fn own_mount_namespace() -> nix::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
}

/// Mount a tmpfs (mode 0700, no devices, setuid or executables) at directory `at`.
pub fn tmpfs(at: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
}

/// SIGPIPE caught by a handler that does nothing, in a helper before libcontainer clones
/// it: the helper (and its libcontainer processes) get an error from a write to a closed
/// pipe, as with SIGPIPE ignored, but the handler is reset by `execve`, so the container's
/// processes start with SIGPIPE at its default, as under runc. (Rust ignores SIGPIPE in
/// every binary, and an ignored signal stays ignored across `execve`.)
#[allow(unsafe_code)]
fn catch_sigpipe() {
    extern "C" fn nothing(_: nix::libc::c_int) {}
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the handler does nothing, so it is async-signal-safe; set while the helper
    // has one thread.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::Handler(nothing)) };
}

/// One container's whole life; see the module's doc.
#[cfg(feature = "containers")]
pub fn helper(root: &Path, id: &str, bundle: &Path, layers: &Path, lower: &Path) -> Outcome {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;
    let fail = |e: String| Outcome {
        exit_code: 128,
        error: Some(e),
        ..Outcome::default()
    };
    let spec: Value = match std::fs::read(bundle.join("config.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return fail(format!("config.json: {e}")),
    };
    let cgroup = spec["linux"]["cgroupsPath"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if let Err(e) = std::fs::create_dir_all(root) {
        return fail(format!("{}: {e}", root.display()));
    }
    // A container of this id left by a helper that died is in the way.
    if root.join(id).exists() {
        if let Ok(mut old) = libcontainer::container::Container::load(root.join(id)) {
            let _ = old.delete(true);
        }
        let _ = std::fs::remove_dir_all(root.join(id));
    }
    // The root file system is mounted in a mount namespace of the helper's own (receiving
    // the host's mounts, sending none back): a running pod adds no line to the host's
    // mount table, which libcontainer reads some 26 times per container it creates; the
    // mount ends with the helper.
    if let Err(e) = own_mount_namespace() {
        return fail(format!("a mount namespace for the container's root: {e}"));
    }
    let unmount = || {
        let _ = nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(bundle.join("rootfs"));
        retire(layers);
    };
    if let Err(e) = mount_rootfs(bundle, layers, lower) {
        unmount();
        return fail(e);
    }
    let stdio = || -> std::io::Result<_> {
        let input = bundle.join(STDIN);
        Ok((
            // On a terminal (the container's spec has `tty`), stdin is the terminal too.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?)
            } else if input.exists() {
                // Opened for reading only, and blocking as a program expects its stdin.
                std::fs::File::open(input)?
            } else {
                std::fs::File::open("/dev/null")?
            },
            std::io::stdout().as_fd().try_clone_to_owned()?,
            std::io::stderr().as_fd().try_clone_to_owned()?,
        ))
    };
    let built = stdio().map_err(|e| e.to_string()).and_then(|(i, o, e)| {
        ContainerBuilder::new(id.to_string(), SyscallType::Linux)
            .with_root_path(root)
            .map(|b| b.with_stdin(i).with_stdout(o).with_stderr(e))
            .and_then(|b| {
                b.as_init(bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
            })
            .map_err(|e| e.to_string())
    });
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            unmount();
            return fail(e);
        }
    };
    let pid = container.pid();
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        unmount();
        return fail(e.to_string());
    }
    let Some(pid) = pid else {
        let _ = container.delete(true);
        unmount();
        return fail("the container has no init process".into());
    };
    // Commands may run in it from now on (see `Containers::exec`).
    let _ = std::fs::write(bundle.join(STARTED), pid.to_string());
    // Signals from the agent: `TERM N` sends signal N, `KILL` kills, `INT` interrupts the
    // init's process group (^C typed at the container's terminal: the init leads a session
    // and group of its own, which its terminal does not control); no more input means the
    // agent is gone, and the container goes with it.
    std::thread::spawn(move || {
        use nix::sys::signal::{kill, Signal};
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let (to, sig) = match line.split_once(' ') {
                Some(("TERM", n)) => (
                    pid,
                    n.trim()
                        .parse::<i32>()
                        .ok()
                        .and_then(|n| Signal::try_from(n).ok()),
                ),
                _ if line.trim() == "KILL" => (pid, Some(Signal::SIGKILL)),
                _ if line.trim() == "INT" => (
                    nix::unistd::Pid::from_raw(-pid.as_raw()),
                    Some(Signal::SIGINT),
                ),
                _ => (pid, None),
            };
            let ended = ENDED.lock().unwrap_or_else(|e| e.into_inner());
            if *ended {
                return;
            }
            if let Some(s) = sig {
                let _ = kill(to, s);
            }
        }
        let ended = ENDED.lock().unwrap_or_else(|e| e.into_inner());
        if !*ended {
            let _ = kill(pid, Signal::SIGKILL);
        }
    });
    use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
    // Seen exited but not yet reaped: the pid stays the init's until `ENDED` is set.
    let exit_code = loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break 128 + e as i32,
        }
    };
    set_ended();
    let _ = waitpid(pid, None);
    let _ = std::fs::remove_file(bundle.join(STARTED));
    let outcome = Outcome {
        exit_code,
        oom_killed: !cgroup.is_empty() && oom_kills(&cgroup) > 0,
        error: None,
    };
    if let Err(e) = report(bundle, &outcome) {
        eprintln!("oci-run {id}: writing the outcome: {e}");
    }
    let _ = container.refresh_status();
    if let Err(e) = container.delete(true) {
        eprintln!("oci-run {id}: deleting the container: {e}");
    }
    unmount();
    outcome
}

/// Run `cmd` inside running container `id`, with this process's stdio; its exit code.
#[cfg(feature = "containers")]
pub fn exec(root: &Path, id: &str, cmd: Vec<String>, tty: bool) -> Result<i32, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;
    use nix::sys::wait::{waitpid, WaitStatus};
    if cmd.is_empty() {
        return Err("no command to run".into());
    }
    let io = |e: std::io::Error| e.to_string();
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(root)
        .map_err(|e| e.to_string())?
        .with_stdin(std::io::stdin().as_fd().try_clone_to_owned().map_err(io)?)
        .with_stdout(std::io::stdout().as_fd().try_clone_to_owned().map_err(io)?)
        .with_stderr(std::io::stderr().as_fd().try_clone_to_owned().map_err(io)?)
        .as_tenant()
        // On a terminal (this helper's stdio), programs want to know what kind, as under
        // runc's `exec -t`.
        .with_env(if tty {
            [("TERM".to_string(), "xterm".to_string())].into()
        } else {
            Default::default()
        })
        .with_container_args(cmd)
        .with_detach(false)
        .build()
        .map_err(|e| e.to_string())?;
    // The command is not this process's child in the kernel's eyes once libcontainer has
    // placed it: a SIGTERM to this helper (an ended `kubectl exec`, a probe out of time) is
    // passed on as SIGKILL, so the command does not outlive its caller. A SIGINT (^C typed
    // at its terminal) goes to the command's process group, as a terminal's line discipline
    // would send it were the terminal the command's controlling one: libcontainer makes the
    // command a session and group leader of its own, so the group is its pid, and a shell
    // without job control runs its commands in it.
    {
        use nix::sys::signal::{kill, SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
        if set.thread_block().is_ok() {
            std::thread::spawn(move || loop {
                match set.wait() {
                    Ok(Signal::SIGINT) => {
                        let group = nix::unistd::Pid::from_raw(-pid.as_raw());
                        let _ = kill(group, Signal::SIGINT);
                    }
                    Ok(_) => {
                        let _ = kill(pid, Signal::SIGKILL);
                        return;
                    }
                    Err(_) => return,
                }
            });
        }
    }
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting for the command: {e}")),
        }
    }
}

/// A command running in a container (through `oci-exec`); dropped or stopped before it
/// ends, the command is killed.
pub struct Exec(pub tokio::process::Child);

impl Exec {
    /// End the command: the helper passes this on as SIGKILL.
    pub fn stop(&self) {
        self.stopper()();
    }

    /// What [`Exec::stop`]s the command, for use while it is being waited for; only to be
    /// called before that wait has returned (the pid may be another process's after).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        self.signaller(nix::sys::signal::Signal::SIGTERM)
    }

    /// What interrupts the command (^C at its terminal): SIGINT to its process group. The
    /// same caution as [`Exec::stopper`]'s holds.
    pub fn interrupter(&self) -> impl Fn() + Send + Sync + 'static {
        self.signaller(nix::sys::signal::Signal::SIGINT)
    }

    fn signaller(&self, sig: nix::sys::signal::Signal) -> impl Fn() + Send + Sync + 'static {
        let pid = self.0.id().and_then(|p| i32::try_from(p).ok());
        move || {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ready bundle `b` for a run with runtime spec `config`: a helper of an earlier run (its
/// agent gone) may still be cleaning up, and is waited for; that run's marks go.
fn prepare(b: &Path, config: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(b)?;
    let lock = std::fs::File::create(b.join(LOCK))?;
    let deadline = std::time::Instant::now() + START_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::other(
                    "an earlier run of this container is still ending",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    drop(lock);
    let _ = std::fs::remove_file(b.join("exit.json"));
    let _ = std::fs::remove_file(b.join(STARTED));
    let _ = std::fs::remove_file(b.join(STDIN));
    std::fs::write(b.join("config.json"), config)
}

/// The FIFO in a bundle that is its container's stdin, where the pod's spec asks for one
/// (`stdin: true`, what `kubectl attach` and `kubectl run -i` write to); without it the
/// container's stdin is `/dev/null`.
const STDIN: &str = "stdin";

/// Make the bundle's [`STDIN`] FIFO and open it for the agent: read and write, so opening
/// never waits for a reader and the helper's open for reading never waits for a writer. The
/// container reads the end of its input once the agent closes this, the only writer.
fn stdin_fifo(b: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = b.join(STDIN);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&p)?;
    Ok(f.into())
}

/// The file in a bundle its helper holds locked while it runs.
const LOCK: &str = ".lock";

/// The file in a bundle that says its container has started.
const STARTED: &str = "started";

/// How long [`Containers::exec`] waits for a container that is still being created.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether seccomp profiles are enforced: the agent was built with libseccomp.
pub fn seccomp() -> bool {
    cfg!(feature = "seccomp")
}

/// What a build without libcontainer says instead of running a container.
const NO_CONTAINERS: &str = "this agent was built without OCI containers (Wasm only)";

#[cfg(not(feature = "containers"))]
pub fn helper(_root: &Path, _id: &str, _bundle: &Path, _layers: &Path, _lower: &Path) -> Outcome {
    Outcome {
        exit_code: 128,
        error: Some(NO_CONTAINERS.into()),
        ..Outcome::default()
    }
}

#[cfg(not(feature = "containers"))]
pub fn exec(_root: &Path, _id: &str, _cmd: Vec<String>, _tty: bool) -> Result<i32, String> {
    Err(NO_CONTAINERS.into())
}

/// Whether cgroup `path` exists in the pids or memory hierarchy (cgroup v1) or the unified
/// one (v2): a few stats of files the kernel keeps in memory, cheap enough for async code.
pub fn cgroup_exists(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    let base = Path::new("/sys/fs/cgroup");
    [base.join("pids"), base.join("memory"), base.to_path_buf()]
        .iter()
        .any(|b| b.join(rel).is_dir())
}

/// Remove cgroup `path` (`/outpost/POD`, what holds a pod's containers' cgroups) from every
/// hierarchy under `/sys/fs/cgroup`, waiting up to `wait` for helpers still deleting their
/// containers' cgroups inside it. libcontainer removes only a container's own cgroup.
pub fn remove_cgroup(path: &str, wait: std::time::Duration) -> std::io::Result<()> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") {
        return Err(std::io::Error::other(format!("not a cgroup path: {path}")));
    }
    let base = Path::new("/sys/fs/cgroup");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(rel))
        .collect();
    dirs.push(base.join(rel));
    let deadline = std::time::Instant::now() + wait;
    loop {
        dirs.retain(|d| match std::fs::remove_dir(d) {
            Ok(()) => false,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound && e.raw_os_error() != Some(20),
        });
        if dirs.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "{} still in use",
                dirs[0].display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Remove the empty cgroups under `parent` (pods, and their containers whose helper did not
/// get to delete them) in every hierarchy under `/sys/fs/cgroup`, children first; those
/// in use stay (the kernel refuses to remove them).
pub fn sweep_cgroups(parent: &str) {
    let rel = parent.trim_matches('/');
    if rel.is_empty() {
        return;
    }
    let base = Path::new("/sys/fs/cgroup");
    let Ok(hierarchies) = std::fs::read_dir(base) else {
        return;
    };
    let parents = hierarchies
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(rel))
        .chain([base.join(rel)]);
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    for p in parents {
        for pod in dirs(&p) {
            for container in dirs(&pod) {
                let _ = std::fs::remove_dir(container);
            }
            let _ = std::fs::remove_dir(pod);
        }
    }
}

/// Why this machine cannot run OCI containers, if it cannot.
pub fn unavailable() -> Option<String> {
    if !cfg!(feature = "containers") {
        return Some(NO_CONTAINERS.into());
    }
    if !is_root() {
        return Some("the node agent does not run as root".into());
    }
    let cg = Path::new("/sys/fs/cgroup");
    if !cg.join("memory").is_dir() && !cg.join("cgroup.controllers").is_file() {
        return Some("no cgroup hierarchy is mounted at /sys/fs/cgroup".into());
    }
    None
}

/// The agent's handle on containers: bundles under `RUN/containers` and libcontainer state
/// under `RUN/state` (a few small files each, written and removed at every start: the agent
/// keeps `RUN` in memory), each container's writable layer under `DIR/containers` (on
/// disk), helpers forked by a zygote of `exe` (started on first use, and again if it dies).
#[derive(Debug, Clone)]
pub struct Containers {
    dir: PathBuf,
    run: PathBuf,
    exe: PathBuf,
    zygote: std::sync::Arc<std::sync::Mutex<Option<Zygote>>>,
}

/// A started helper: its stdin is a socket whose far end closes when the helper ends, and
/// on which the agent writes signals.
pub struct Running {
    signals: tokio::net::UnixStream,
    pub stdout: Option<tokio::net::unix::pipe::Receiver>,
    pub stderr: Option<tokio::net::unix::pipe::Receiver>,
    /// The container's stdin, when started with one; dropping it ends the container's input.
    pub stdin: Option<tokio::net::unix::pipe::Sender>,
    bundle: PathBuf,
    /// What the helper has written on the socket: the outcome, at the end.
    said: Vec<u8>,
}

impl Containers {
    pub fn new(dir: &Path, run: &Path, exe: &Path) -> Containers {
        Containers {
            dir: dir.to_path_buf(),
            run: run.to_path_buf(),
            exe: exe.to_path_buf(),
            zygote: Default::default(),
        }
    }

    fn state(&self) -> PathBuf {
        self.run.join("state")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.run.join("containers").join(id)
    }

    /// The container id of a pod's container: what libcontainer accepts.
    pub fn id(pod_uid: &str, container: &str) -> String {
        format!("{pod_uid}_{container}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_+.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Write `spec` as the bundle of container `id` and start its helper over `lower`; with
    /// `stdin`, the container reads [`Running::stdin`]; given a `terminal` (the process's
    /// side of a [`crate::tty::Terminal`]), that is its stdin, stdout and stderr instead.
    pub async fn start(
        &self,
        id: &str,
        spec: &Value,
        lower: &Path,
        stdin: bool,
        terminal: Option<std::os::fd::OwnedFd>,
    ) -> Result<Running, Error> {
        let stdin = stdin && terminal.is_none();
        let bundle = self.bundle(id);
        let utf8 = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Create(format!("{} is not UTF-8", p.display())))
        };
        let args = vec![
            "oci-run".to_string(),
            "--root".into(),
            utf8(&self.state())?,
            "--id".into(),
            id.into(),
            "--bundle".into(),
            utf8(&bundle)?,
            "--layers".into(),
            utf8(&self.dir.join("containers").join(id))?,
            "--lower".into(),
            utf8(lower)?,
        ];
        let io = |e: std::io::Error| Error::Create(format!("starting the helper: {e}"));
        let (signals, their_signals) = std::os::unix::net::UnixStream::pair().map_err(io)?;
        let (output, their_stdout, their_stderr) = match terminal {
            Some(t) => (None, t.try_clone().map_err(io)?, t),
            None => {
                let (stdout, their_stdout) = std::io::pipe().map_err(io)?;
                let (stderr, their_stderr) = std::io::pipe().map_err(io)?;
                (
                    Some((stdout, stderr)),
                    their_stdout.into(),
                    their_stderr.into(),
                )
            }
        };
        let (zygote, exe) = (self.zygote.clone(), self.exe.clone());
        let (b, config) = (bundle.clone(), serde_json::to_vec(spec).unwrap_or_default());
        // The bundle and the fork in one trip to the blocking pool: each trip is a thread
        // wake-up on the way to a container.
        let input = tokio::task::spawn_blocking(move || {
            prepare(&b, &config).map_err(|e| Error::io(b.display(), e))?;
            let input = if stdin {
                Some(stdin_fifo(&b).map_err(|e| Error::io(b.join(STDIN).display(), e))?)
            } else {
                None
            };
            let starting = |e: std::io::Error| {
                Error::Create(format!("starting the helper ({}): {e}", exe.display()))
            };
            let stdio = [
                their_signals.as_fd(),
                their_stdout.as_fd(),
                their_stderr.as_fd(),
            ];
            let mut slot = zygote.lock().unwrap_or_else(|e| e.into_inner());
            // A request that never reached the zygote goes to a new one, once; one that
            // may have started a helper does not (two helpers would run the container), and
            // the helper, if any, ends with the container when `signals` is dropped.
            let mut retry = true;
            loop {
                if !slot.as_mut().is_some_and(Zygote::alive) {
                    *slot = Some(Zygote::spawn(&exe).map_err(starting)?);
                }
                let Some(z) = slot.as_mut() else { continue };
                let failed = match z.fork(&args, stdio) {
                    Ok(_) => return Ok(input),
                    Err(e) => e,
                };
                // A zygote that failed (dead, or silent past its time) is not asked again.
                *slot = None;
                match failed {
                    Refused::NotSent(_) if retry => retry = false,
                    e => return Err(starting(e.into_io())),
                }
            }
        })
        .await
        .map_err(|e| Error::Create(e.to_string()))??;
        signals.set_nonblocking(true).map_err(io)?;
        let pipe = |r: std::io::PipeReader| {
            tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(r))
        };
        let (stdout, stderr) = match output {
            Some((o, e)) => (Some(pipe(o).map_err(io)?), Some(pipe(e).map_err(io)?)),
            None => (None, None),
        };
        Ok(Running {
            signals: tokio::net::UnixStream::from_std(signals).map_err(io)?,
            stdout,
            stderr,
            stdin: input
                .map(tokio::net::unix::pipe::Sender::from_owned_fd)
                .transpose()
                .map_err(io)?,
            bundle,
            said: Vec::new(),
        })
    }

    /// Wait until container `id` has started (true), or has ended or not started within
    /// [`START_WAIT`] (false).
    pub async fn started(&self, id: &str) -> bool {
        let bundle = self.bundle(id);
        let deadline = tokio::time::Instant::now() + START_WAIT;
        while !bundle.join(STARTED).exists() {
            if bundle.join("exit.json").exists() || tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Forget how container `id`'s last run went, before it starts again: from now until
    /// the new run has started, commands wait for it rather than fail.
    pub fn reset(&self, id: &str) {
        let bundle = self.bundle(id);
        let _ = std::fs::remove_file(bundle.join("exit.json"));
        let _ = std::fs::remove_file(bundle.join(STARTED));
    }

    /// A command in running container `id`, with piped stdio or, given one, on `terminal`
    /// (the process's side of a [`crate::tty::Terminal`]); it ends with the exit code. A
    /// container still being created is waited for, up to [`START_WAIT`].
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        terminal: Option<std::os::fd::OwnedFd>,
    ) -> Result<Exec, Error> {
        if !self.started(id).await {
            return Err(Error::Create(format!("container {id} is not running")));
        }
        let starting =
            |e: std::io::Error| Error::Create(format!("starting {}: {e}", self.exe.display()));
        let mut c = tokio::process::Command::new(&self.exe);
        c.arg("oci-exec")
            .arg("--root")
            .arg(self.state())
            .arg("--id")
            .arg(id)
            .kill_on_drop(false);
        match terminal {
            Some(t) => {
                c.arg("--tty")
                    .stdin(Stdio::from(t.try_clone().map_err(starting)?))
                    .stdout(Stdio::from(t.try_clone().map_err(starting)?))
                    .stderr(Stdio::from(t));
            }
            None => {
                c.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        c.arg("--").args(cmd).spawn().map_err(starting).map(Exec)
    }
}

impl Running {
    /// Interrupt what runs in the foreground of the container's terminal: SIGINT to its
    /// init's process group.
    pub async fn interrupt(&mut self) {
        use tokio::io::AsyncWriteExt as _;
        let _ = self.signals.write_all(b"INT\n").await;
    }

    /// Send signal `sig` to the container's init (`kill` sends SIGKILL).
    pub async fn signal(&mut self, sig: i32, kill: bool) {
        use tokio::io::AsyncWriteExt as _;
        let line = if kill {
            "KILL\n".to_string()
        } else {
            format!("TERM {sig}\n")
        };
        let _ = self.signals.write_all(line.as_bytes()).await;
    }

    /// Wait until the helper has cleaned up after the container (it holds the bundle's lock
    /// until then), after [`Running::wait`].
    pub async fn cleaned(&self) -> std::io::Result<()> {
        let lock = self.bundle.join(LOCK);
        tokio::task::spawn_blocking(move || std::fs::File::open(lock)?.lock())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Wait until the helper says how the container ended (or ends without saying), then
    /// read the outcome.
    pub async fn wait(&mut self) -> Outcome {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = self.signals.read(&mut buf).await {
            if self.said.len() < 64 * 1024 {
                self.said.extend_from_slice(&buf[..n]);
            }
        }
        if let Ok(out) = serde_json::from_slice(&self.said) {
            return out;
        }
        let path = self.bundle.join("exit.json");
        let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
        match read {
            Ok(Ok(b)) => serde_json::from_slice(&b).unwrap_or_else(|e| Outcome {
                exit_code: 128,
                error: Some(format!("a garbled outcome: {e}")),
                ..Outcome::default()
            }),
            _ => Outcome {
                exit_code: 128,
                error: Some("the container's helper died before saying how it ended".into()),
                ..Outcome::default()
            },
        }
    }
}

/// The number of a signal named as an image's `StopSignal` (`SIGQUIT`, `QUIT` or `3`);
/// SIGTERM when it names none.
pub fn signal_number(name: &str) -> i32 {
    use std::str::FromStr as _;
    let n = name.trim().to_ascii_uppercase();
    if let Ok(n) = n.parse::<i32>() {
        return n;
    }
    let full = if n.starts_with("SIG") {
        n
    } else {
        format!("SIG{n}")
    };
    nix::sys::signal::Signal::from_str(&full).map_or(15, |s| s as i32)
}

#[cfg(all(test, feature = "containers"))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn spares(containers: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(containers.join(SPARES))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn layers(containers: &Path, id: &str) -> std::io::Result<PathBuf> {
        let l = containers.join(id);
        for d in ["upper/d", "work/work"] {
            std::fs::create_dir_all(l.join(d))?;
        }
        std::fs::set_permissions(l.join("upper"), std::fs::Permissions::from_mode(FRESH_MODE))?;
        std::fs::write(l.join("upper/d/f"), "written")?;
        std::fs::write(l.join("upper/seen"), "written")?;
        Ok(l)
    }

    #[test]
    #[ignore = "needs root: a kept upper directory is root's"]
    fn ended_layers_are_emptied_and_taken_by_the_next_container() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = dir.path().join("containers");
        let a = layers(&c, "a_main")?;
        retire(&a);
        assert!(!a.exists());
        let kept = spares(&c);
        assert_eq!(kept.len(), 1, "{kept:?}");
        let upper = kept[0].join("upper");
        assert!(upper.is_dir() && kept[0].join("work").is_dir());
        assert_eq!(std::fs::read_dir(&upper)?.count(), 0, "upper emptied");

        let b = c.join("b_main");
        take_spare(&b);
        assert!(b.join("upper").is_dir() && spares(&c).is_empty());
        // Nothing left to take: the container makes its own.
        let d = c.join("d_main");
        take_spare(&d);
        assert!(!d.exists());

        // A container that changed its `/` leaves no upper directory to the next one.
        std::fs::set_permissions(b.join("upper"), std::fs::Permissions::from_mode(0o700))?;
        retire(&b);
        let kept = spares(&c);
        assert_eq!(kept.len(), 1);
        assert!(!kept[0].join("upper").exists() && kept[0].join("work").is_dir());
        let e = layers(&c, "e_main")?;
        xattr::set(e.join("upper"), "trusted.overlay.impure", b"y")?;
        retire(&e);
        assert!(spares(&c).iter().all(|s| !s.join("upper").exists()));
        // The mark of every mounted overlay's upper directory goes; the directory stays.
        for s in spares(&c) {
            std::fs::remove_dir_all(s)?;
        }
        let f = layers(&c, "f_main")?;
        xattr::set(f.join("upper"), "trusted.overlay.uuid", &[7; 16])?;
        retire(&f);
        let kept = spares(&c);
        assert!(kept.len() == 1 && kept[0].join("upper").is_dir());
        assert_eq!(xattr::list(kept[0].join("upper"))?.count(), 0);
        std::fs::remove_dir_all(&kept[0])?;

        // At most SPARE_CAP are kept; the rest are removed.
        for i in 0..SPARE_CAP + 3 {
            let l = layers(&c, &format!("{i}_main"))?;
            retire(&l);
            assert!(!l.exists());
        }
        assert_eq!(spares(&c).len(), SPARE_CAP);
        Ok(())
    }
}
