//! `kubectl exec` on this node: a [`Down::Exec`](outpost_api::link::Down::Exec) stream runs a
//! command in a running OCI container through the `oci-exec` helper, input and output as
//! [`ExecFrame`]s, and ends with the command's exit code.
//!
//! `kubectl attach` ([`Down::Attach`](outpost_api::link::Down::Attach)) joins a running
//! container instead, Wasm or OCI: its output from now on (its log's tap) and, for an OCI
//! container whose spec has `stdin`, input to it, until the run ends.

use std::sync::Arc;

use outpost_api::link::{read_frame, write_frame, ExecFrame, ExecRequest, Head, MAX_FRAME};
use outpost_oci_shim::run::Containers;
use outpost_oci_shim::tty::Terminal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{reply, Agent, Input};
use crate::pod::State;

/// Output read from the command at a time.
const CHUNK: usize = 32 << 10;

/// A pod's containers as its worker keeps them.
type PodContainers = Arc<std::sync::Mutex<Vec<crate::pod::Container>>>;

impl Agent {
    /// The uid and containers of the request's pod, or `None` once the client was told it
    /// is not on this node.
    async fn pod_here(
        &self,
        req: &ExecRequest,
        send: &mut quinn::SendStream,
    ) -> Option<(String, PodContainers)> {
        let (ns, name) = (&req.namespace, &req.pod);
        let found = self.pods.lock().ok().and_then(|p| {
            p.iter()
                .find(|(_, r)| &r.ns == ns && &r.name == name)
                .map(|(uid, r)| (uid.clone(), r.containers.clone()))
        });
        if found.is_none() {
            let msg = format!("pod \"{ns}/{name}\" is not on this node");
            let _ = reply(send, 404, &msg).await;
        }
        found
    }

    pub(super) async fn exec(
        &self,
        req: &ExecRequest,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let name = &req.pod;
        let Some((uid, containers)) = self.pod_here(req, &mut send).await else {
            return;
        };
        let state = containers.lock().ok().and_then(|cs| {
            cs.iter()
                .find(|c| c.name == req.container)
                .map(|c| (c.id.clone(), matches!(c.state, State::Running { .. })))
        });
        let refusal = match (&state, &self.oci) {
            (None, _) => Some(format!(
                "container {} is not valid for pod {name}",
                req.container
            )),
            (Some((id, _)), _) if id.starts_with("wasm://") => Some(format!(
                "container {} of pod {name} runs on the Wasm runtime: a Wasm guest has no shell or other process to exec into",
                req.container
            )),
            (Some((_, false)), _) => Some(format!(
                "container {} of pod {name} is not running",
                req.container
            )),
            (_, Err(why)) => Some(format!("this node cannot run OCI containers: {why}")),
            _ => None,
        };
        if let Some(msg) = refusal {
            let _ = reply(&mut send, 400, &msg).await;
            return;
        }
        let Ok(oci) = &self.oci else { return };
        let id = Containers::id(&uid, &req.container);
        // With a terminal the command's stdin, stdout and stderr are all its other side.
        let (term, slave) = if req.tty {
            match Terminal::open() {
                Ok((t, s)) => (Some(Arc::new(t)), Some(s)),
                Err(e) => {
                    let _ = reply(&mut send, 500, &format!("a terminal: {e}")).await;
                    return;
                }
            }
        } else {
            (None, None)
        };
        let mut exec = match oci.containers.exec(&id, &req.command, slave).await {
            Ok(c) => c,
            Err(e) => {
                let _ = reply(&mut send, 500, &e.to_string()).await;
                return;
            }
        };
        let head = Head {
            status: 200,
            content_type: None,
        };
        if write_frame(&mut send, &head, MAX_FRAME).await.is_err() {
            return;
        }
        let stop = exec.stopper();
        let interrupt = exec.interrupter();
        let child = &mut exec.0;
        let (tx, mut rx) = mpsc::channel::<ExecFrame>(16);
        let mut readers = Vec::new();
        if let Some(t) = &term {
            readers.push(tokio::spawn(pump_terminal(t.clone(), tx.clone())));
        }
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(out, tx.clone(), ExecFrame::Stdout)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(err, tx.clone(), ExecFrame::Stderr)));
        }
        drop(tx);
        let mut stdin = child.stdin.take().filter(|_| req.stdin);
        let typing = term.clone().filter(|_| req.stdin);
        // Input until the client ends it; it may also never send any. The stream's end means
        // the client is gone (the control plane ends it only then).
        let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
        let input = tokio::spawn(async move {
            let _gone = gone_tx;
            loop {
                match read_frame::<_, ExecFrame>(&mut recv, MAX_FRAME).await {
                    Ok(ExecFrame::Stdin(b)) => {
                        if let Some(w) = stdin.as_mut() {
                            if w.write_all(&b).await.is_err() {
                                stdin = None;
                            }
                        } else if let Some(t) = &typing {
                            // No terminal here is the command's controlling one: its
                            // interrupt is sent as the line discipline would send it.
                            if t.interrupts(&b) {
                                interrupt();
                            }
                            let _ = t.write_all(&b).await;
                        }
                    }
                    Ok(ExecFrame::StdinEnd) => stdin = None,
                    Ok(ExecFrame::Resize { width, height }) => {
                        if let Some(t) = &typing {
                            let _ = t.resize(width, height);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let mut broken = false;
        let mut status = None;
        let mut linger = None;
        loop {
            let f = tokio::select! {
                f = rx.recv() => f,
                _ = &mut gone, if !broken => {
                    // The client went away while the command was quiet: it goes too.
                    broken = true;
                    if status.is_none() {
                        stop();
                    }
                    continue;
                }
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    // A process the command left in the background may hold the terminal
                    // open: its output after the command's end is not waited for.
                    if term.is_some() {
                        linger = Some(tokio::time::Instant::now() + LINGER);
                    }
                    continue;
                }
                () = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)),
                    if linger.is_some() => break,
            };
            let Some(f) = f else { break };
            if !broken && write_frame(&mut send, &f, MAX_FRAME).await.is_err() {
                // The client is gone: the command goes too.
                broken = true;
                if status.is_none() {
                    stop();
                }
            }
        }
        for r in readers {
            if term.is_some() {
                r.abort();
            }
            let _ = r.await;
        }
        input.abort();
        let status = match status {
            Some(s) => s,
            None => exec.0.wait().await,
        };
        let exit = match status {
            Ok(s) => ExecFrame::Exit {
                code: s.code().unwrap_or(128),
                error: None,
            },
            Err(e) => ExecFrame::Exit {
                code: 128,
                error: Some(e.to_string()),
            },
        };
        if !broken && write_frame(&mut send, &exit, MAX_FRAME).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// How long an attach waits for a starting container's run.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a command's terminal output is still read after the command has ended.
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// What a command writes on its terminal, as stdout frames, until it is closed.
async fn pump_terminal(t: Arc<Terminal>, tx: mpsc::Sender<ExecFrame>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match t.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(ExecFrame::Stdout(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Agent {
    pub(super) async fn attach(
        &self,
        req: &ExecRequest,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let name = &req.pod;
        let Some((uid, containers)) = self.pod_here(req, &mut send).await else {
            return;
        };
        let id = Containers::id(&uid, &req.container);
        // The pod shows Running a moment before its container's run is joinable (kubectl
        // run -i attaches as soon as it sees Running): a starting container is waited for.
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let (live, mut tap) = loop {
            let live = self.live.lock().ok().and_then(|l| l.get(&id).cloned());
            if let Some((live, tap)) = live.and_then(|l| l.log.tap().map(|t| (l, t))) {
                break (live, tap);
            }
            let state = containers.lock().ok().and_then(|cs| {
                cs.iter()
                    .find(|c| c.name == req.container)
                    .map(|c| c.state.clone())
            });
            let starting = matches!(state, Some(State::Running { .. } | State::Waiting { .. }));
            if !starting || tokio::time::Instant::now() > deadline {
                let msg = if state.is_some() {
                    format!("container {} of pod {name} is not running", req.container)
                } else {
                    format!("container {} is not valid for pod {name}", req.container)
                };
                let _ = reply(&mut send, 400, &msg).await;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let head = Head {
            status: 200,
            content_type: None,
        };
        if write_frame(&mut send, &head, MAX_FRAME).await.is_err() {
            return;
        }
        let stdin = live.stdin.clone().filter(|_| req.stdin);
        let once = live.once;
        let interrupt = live.interrupt.clone();
        let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
        let input = tokio::spawn(async move {
            let _gone = gone_tx;
            // With `stdinOnce` the container's input ends with this client's: its end of
            // input, or its going away. A terminal's input ends as typed: with ^D.
            let close = || async {
                match (&stdin, once) {
                    (Some(Input::Pipe(w)), true) => *w.lock().await = None,
                    (Some(Input::Terminal(t)), true) => {
                        let _ = t.write_all(b"\x04").await;
                    }
                    _ => {}
                }
            };
            loop {
                match read_frame::<_, ExecFrame>(&mut recv, MAX_FRAME).await {
                    Ok(ExecFrame::Stdin(b)) => match &stdin {
                        Some(Input::Pipe(w)) => {
                            let mut w = w.lock().await;
                            if let Some(p) = w.as_mut() {
                                if p.write_all(&b).await.is_err() {
                                    *w = None;
                                }
                            }
                        }
                        Some(Input::Terminal(t)) => {
                            // As for exec: ^C reaches the container's foreground.
                            if t.interrupts(&b) {
                                if let Some(i) = &interrupt {
                                    let _ = i.send(());
                                }
                            }
                            let _ = t.write_all(&b).await;
                        }
                        None => {}
                    },
                    Ok(ExecFrame::Resize { width, height }) => {
                        if let Some(Input::Terminal(t)) = &stdin {
                            let _ = t.resize(width, height);
                        }
                    }
                    Ok(ExecFrame::StdinEnd) => close().await,
                    Ok(_) => {}
                    Err(_) => {
                        close().await;
                        return;
                    }
                }
            }
        });
        let ended = loop {
            let chunk = tokio::select! {
                c = tap.recv() => c,
                _ = &mut gone => break false,
            };
            let f = match chunk {
                Ok((false, b)) => ExecFrame::Stdout(b.to_vec()),
                // A terminal has one output stream.
                Ok((true, b)) if req.tty => ExecFrame::Stdout(b.to_vec()),
                Ok((true, b)) => ExecFrame::Stderr(b.to_vec()),
                // Output a slow client missed is in the log.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break true,
            };
            if write_frame(&mut send, &f, MAX_FRAME).await.is_err() {
                break false;
            }
        };
        input.abort();
        // The run has ended: the session ends as the kubelet ends it, with success.
        let exit = ExecFrame::Exit {
            code: 0,
            error: None,
        };
        if ended && write_frame(&mut send, &exit, MAX_FRAME).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// Everything `r` writes, as frames made by `frame`, until it ends.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    tx: mpsc::Sender<ExecFrame>,
    frame: fn(Vec<u8>) -> ExecFrame,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(frame(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}
