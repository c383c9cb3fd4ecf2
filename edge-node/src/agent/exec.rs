//! `kubectl exec` on this node: a [`Down::Exec`](outpost_api::link::Down::Exec) stream runs a
//! command in a running OCI container through the `oci-exec` helper, input and output as
//! [`ExecFrame`]s, and ends with the command's exit code.

use outpost_api::link::{read_frame, write_frame, ExecFrame, ExecRequest, Head, MAX_FRAME};
use outpost_oci_shim::run::Containers;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{reply, Agent};
use crate::pod::State;

/// Output read from the command at a time.
const CHUNK: usize = 32 << 10;

impl Agent {
    pub(super) async fn exec(
        &self,
        req: &ExecRequest,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let (ns, name) = (&req.namespace, &req.pod);
        let found = self.pods.lock().ok().and_then(|p| {
            p.iter()
                .find(|(_, r)| &r.ns == ns && &r.name == name)
                .map(|(uid, r)| (uid.clone(), r.containers.clone()))
        });
        let Some((uid, containers)) = found else {
            let msg = format!("pod \"{ns}/{name}\" is not on this node");
            let _ = reply(&mut send, 404, &msg).await;
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
        let mut exec = match oci.containers.exec(&id, &req.command).await {
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
        let child = &mut exec.0;
        let (tx, mut rx) = mpsc::channel::<ExecFrame>(16);
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(out, tx.clone(), ExecFrame::Stdout)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(err, tx.clone(), ExecFrame::Stderr)));
        }
        drop(tx);
        let mut stdin = child.stdin.take().filter(|_| req.stdin);
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
                        }
                    }
                    Ok(ExecFrame::StdinEnd) => stdin = None,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let mut broken = false;
        loop {
            let f = tokio::select! {
                f = rx.recv() => f,
                _ = &mut gone, if !broken => {
                    // The client went away while the command was quiet: it goes too.
                    broken = true;
                    exec.stop();
                    continue;
                }
            };
            let Some(f) = f else { break };
            if !broken && write_frame(&mut send, &f, MAX_FRAME).await.is_err() {
                // The client is gone: the command goes too.
                broken = true;
                exec.stop();
            }
        }
        let child = &mut exec.0;
        for r in readers {
            let _ = r.await;
        }
        input.abort();
        let exit = match child.wait().await {
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
