//! Serving `wasi:http/incoming-handler` components. A container whose component exports the
//! handler listens on its port (HTTP/1.1 with keep-alive) and each request gets a fresh
//! instance from one pre-instantiated component, as `wasmtime serve` does: requests share no
//! guest state, one that traps or runs out of memory answers 500 and harms no other, and the
//! container keeps serving. Each instance has the container's args, env, directories,
//! output files and limits. Stopped, it drains: no new connections, the requests in flight
//! finish within the grace period.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use wasmtime::component::Component;
use wasmtime::Engine;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::{io, store, wasi_builder, Command, Error, Exit, Guest2, Limits, Runtime, Stop};

type Response = hyper::Response<HyperOutgoingBody>;

/// One served container.
struct Server {
    engine: Engine,
    pre: ProxyPre<Guest2>,
    cmd: Command,
    /// Requests whose guest may still be writing the body after the response head went out.
    /// Dropped with the server, which aborts them.
    requests: Mutex<JoinSet<()>>,
}

/// Listen on the container's address and answer requests until `stop`; then stop accepting,
/// let the connections finish what they are serving for up to `cmd.grace`, and end: `Code(0)`
/// when everything finished in time, `Stopped` when the rest was cut off.
pub(crate) async fn serve(
    rt: &Runtime,
    component: &Component,
    cmd: &Command,
    stop: &Stop,
) -> Result<Exit, Error> {
    let unsupported = |e: wasmtime::Error| Error::Unsupported(format!("{e:#}"));
    let pre = rt
        .components
        .instantiate_pre(component)
        .map_err(unsupported)?;
    let pre = ProxyPre::new(pre).map_err(unsupported)?;
    let addr = cmd.listen.unwrap_or(crate::DEFAULT_LISTEN);
    let listener = match cmd.bind.clone() {
        Some(bind) => tokio::task::spawn_blocking(move || bind(addr))
            .await
            .map_err(std::io::Error::other)
            .and_then(|l| l)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }),
        None => TcpListener::bind(addr).await,
    }
    .map_err(io(format!("listening on {addr}")))?;
    let server = Arc::new(Server {
        engine: rt.engine.clone(),
        pre,
        cmd: cmd.clone(),
        requests: Mutex::new(JoinSet::new()),
    });
    let mut conns = JoinSet::new();
    let (quit, quitting) = watch::channel(false);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.wait() => break,
        };
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors or a reset before accept: not the end of the server.
                server.log(&format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let server = server.clone();
        let mut quitting = quitting.clone();
        conns.spawn(async move {
            // Requests this connection is serving now.
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let serving = busy.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (server, busy) = (server.clone(), serving.clone());
                async move {
                    busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let resp = server.handle(req).await;
                    busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(sock), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = quitting.changed() => {
                    // An idle connection closes now: hyper's graceful shutdown would wait
                    // for a first request on it until its header timeout (30 s).
                    if busy.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                        return;
                    }
                    // Finish the request in hand, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    quit.send_replace(true);
    let requests = server
        .requests
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    let drain = async {
        while conns.join_next().await.is_some() {}
        let mut requests = requests;
        while requests.join_next().await.is_some() {}
    };
    // Whatever is left when the time is up is dropped, which aborts it.
    Ok(
        match tokio::time::timeout(stop.grace().unwrap_or(cmd.grace), drain).await {
            Ok(()) => Exit::Code(0),
            Err(_) => Exit::Stopped,
        },
    )
}

impl Server {
    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> Response {
        match self.call(req).await {
            Ok(r) => r,
            Err(e) => {
                self.log(&format!("request failed: {e}"));
                let body = Full::new(Bytes::from(format!("{e}\n")))
                    .map_err(|n: Infallible| match n {})
                    .boxed_unsync();
                let mut r = hyper::Response::new(body);
                *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        }
    }

    async fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Result<Response, String> {
        let mut b = wasi_builder(&self.cmd).map_err(|e| e.to_string())?;
        let limits = Limits::of(&self.cmd);
        let mut store = store(
            &self.engine,
            Guest2::new(&mut b, limits, self.cmd.resolve.clone()),
            &self.cmd,
        );
        let (tx, rx) = oneshot::channel();
        let mut http = store.data_mut().http();
        let (req, out) = http
            .new_incoming_request(Scheme::Http, req)
            .and_then(|req| Ok((req, http.new_response_outparam(tx)?)))
            .map_err(|e| format!("{e:#}"))?;
        let pre = self.pre.clone();
        let (done_tx, done_rx) = oneshot::channel();
        let run = async move {
            let r = match pre.instantiate_async(&mut store).await {
                Ok(proxy) => {
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, req, out)
                        .await
                }
                Err(e) => Err(e),
            };
            let r = r.map_err(|e| match store.data().limits {
                Limits {
                    memory: Some(max),
                    hit: true,
                    ..
                } => format!("memory limit of {max} bytes reached"),
                _ => format!("{e:#}"),
            });
            let _ = done_tx.send(r);
        };
        if let Ok(mut tasks) = self.requests.lock() {
            while tasks.try_join_next().is_some() {}
            tasks.spawn(super::metered(run, self.cmd.usage.clone()));
        }
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(format!("the component answered with an error: {code:?}")),
            // The guest dropped the outparam: its end says why.
            Err(_) => match done_rx.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err("the component returned without a response".into()),
                Err(_) => Err("the request was cancelled".into()),
            },
        }
    }

    /// A line in the container's log, as a failing request would leave in `wasmtime serve`'s.
    fn log(&self, line: &str) {
        if let Some(log) = &self.cmd.log {
            log.note(line);
        }
    }
}
