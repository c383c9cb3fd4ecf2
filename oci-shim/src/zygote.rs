//! The resident helper that forks one `oci-run` helper per container, so a container start
//! does not pay for executing and loading the agent's binary (a few hundred megabytes with
//! debug info, tens of thousands of relocations) and tearing it down again.
//!
//! ```text
//!  agent ── [Zygote::fork: args + stdin, stdout, stderr fds] ──▶ oci-zygote (one thread)
//!        ◀──────────────────── pid or error ─────────────────────┘  │ fork
//!                                                                   ▼
//!                                     oci-run helper: fds 0, 1, 2 are the agent's
//! ```
//!
//! The zygote is the agent's binary started as `oci-zygote` with a SEQPACKET socket as its
//! stdin, one request per message: the helper's arguments as JSON and, as `SCM_RIGHTS`, the
//! three descriptors it gets as stdin, stdout and stderr. It starts no thread, so its forks
//! may run libcontainer, which clones the process in turn. Its children are reaped by the
//! kernel (SIGCHLD ignored); the agent learns that a helper ended when the helper's end of
//! its stdin socket closes. The end of the zygote's own socket (the agent is gone) ends it.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::errno::Errno;
use nix::sys::socket::{
    recv, recvmsg, send, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// The largest request: a helper's arguments are a few paths.
const MAX_REQUEST: usize = 64 * 1024;

/// The agent's handle on a running zygote.
#[derive(Debug)]
pub struct Zygote {
    sock: OwnedFd,
    child: Child,
}

impl Zygote {
    /// Start `exe oci-zygote`.
    pub fn spawn(exe: &Path) -> std::io::Result<Zygote> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // A zygote that stops answering must not hold every later container start.
        let limit = nix::sys::time::TimeVal::new(REPLY_WAIT.as_secs() as i64, 0);
        setsockopt(&ours, sockopt::ReceiveTimeout, &limit)?;
        setsockopt(&ours, sockopt::SendTimeout, &limit)?;
        let child = Command::new(exe)
            .arg("oci-zygote")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Zygote { sock: ours, child })
    }

    /// Whether the zygote process is still there.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fork a helper that runs with `args` and has `stdio` as its descriptors 0, 1 and 2;
    /// its pid. [`Refused::NotSent`] means no helper can have been forked, so the request
    /// may go to another zygote; after [`Refused::Unknown`] one may have been.
    pub fn fork(&mut self, args: &[String], stdio: [BorrowedFd<'_>; 3]) -> Result<i32, Refused> {
        let body = serde_json::to_vec(args).map_err(|e| Refused::NotSent(e.into()))?;
        let fds = stdio.map(|f| f.as_raw_fd());
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&body)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| Refused::NotSent(e.into()))?;
        let mut reply = [0u8; 512];
        let n = loop {
            match recv(self.sock.as_raw_fd(), &mut reply, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                r => break r.map_err(|e| Refused::Unknown(e.into()))?,
            }
        };
        if n == 0 {
            return Err(Refused::Unknown(std::io::Error::other(
                "the container zygote is gone",
            )));
        }
        let reply = String::from_utf8_lossy(&reply[..n]);
        reply.parse().map_err(|_| {
            Refused::Unknown(std::io::Error::other(format!(
                "the container zygote: {reply}"
            )))
        })
    }
}

/// Why [`Zygote::fork`] gave no pid.
#[derive(Debug)]
pub enum Refused {
    /// The request never reached the zygote.
    NotSent(std::io::Error),
    /// It did, and no pid came back: a helper may or may not run.
    Unknown(std::io::Error),
}

impl Refused {
    pub fn into_io(self) -> std::io::Error {
        match self {
            Refused::NotSent(e) | Refused::Unknown(e) => e,
        }
    }
}

/// How long the agent waits for the zygote to take a request or answer one.
const REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The zygote's life: serve requests on descriptor 0 until the agent closes it. What the
/// process exits with.
#[allow(unsafe_code)]
pub fn serve() -> i32 {
    use nix::sys::signal::{signal, SigHandler, Signal};
    const SOCK: RawFd = 0;
    // SAFETY: a disposition, not a handler, set in a process with one thread.
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.is_err() {
        return 1;
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 3]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, truncated, fds) =
            match recvmsg::<()>(SOCK, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    for c in m.cmsgs().into_iter().flatten() {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel has just installed these descriptors in this
                            // process for this message; nothing else owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    let truncated = m
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    (m.bytes, truncated, fds)
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return 1,
            };
        if n == 0 && fds.is_empty() {
            return 0;
        }
        let args: Vec<String> = match serde_json::from_slice(&buf[..n]) {
            Ok(a) if !truncated && fds.len() == 3 => a,
            _ => {
                let _ = send(SOCK, b"a garbled request", MsgFlags::MSG_NOSIGNAL);
                continue;
            }
        };
        if args.first().map(String::as_str) != Some("oci-run") {
            let _ = send(SOCK, b"only oci-run is forked", MsgFlags::MSG_NOSIGNAL);
            continue;
        }
        // SAFETY: this process has one thread (the binary dispatches to the zygote before
        // anything starts one, and the zygote starts none), so the child may run any code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                // SAFETY: as above, one thread; back to the default so the helper can wait
                // for its own children.
                let _ = unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) };
                let _ = nix::sys::prctl::set_name(c"oci-run");
                if let Ok(f) = std::io::stderr().as_fd().try_clone_to_owned() {
                    let _ = super::run::AGENT_STDERR.set(f);
                }
                for (i, fd) in fds.iter().enumerate() {
                    // The request's descriptors are all above 2: 0 to 2 were taken when
                    // they came in.
                    if nix::unistd::dup2(fd.as_raw_fd(), i as RawFd).is_err() {
                        std::process::exit(1);
                    }
                }
                drop(fds);
                std::process::exit(super::run::main(&args));
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let _ = send(SOCK, child.to_string().as_bytes(), MsgFlags::MSG_NOSIGNAL);
            }
            Err(e) => {
                let _ = send(
                    SOCK,
                    format!("fork: {e}").as_bytes(),
                    MsgFlags::MSG_NOSIGNAL,
                );
            }
        }
    }
}
