//! An HTTP hello as a `wasi:http/proxy` component. The node instantiates it per request and
//! serves it on the container's port. `GET /healthz` answers `ok` (for probes); any other path
//! answers a greeting naming the path and the `GREETING` environment variable, and logs one
//! line to stdout. `GET /fetch/HOST/PATH` fetches `http://HOST/PATH` with an outgoing request
//! and answers what came back (a Service's name works as HOST on an Outpost node).

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(req: IncomingRequest, out: ResponseOutparam) {
        let path = req.path_with_query().unwrap_or_else(|| "/".into());
        let (status, text) = if path == "/healthz" {
            (200, "ok\n".to_string())
        } else if let Some(rest) = path.strip_prefix("/fetch/") {
            let (host, rest) = rest.split_once('/').unwrap_or((rest, ""));
            match fetch(host, &format!("/{rest}")) {
                Ok((code, body)) => (code, body),
                Err(e) => (502, format!("fetching http://{host}/{rest}: {e}\n")),
            }
        } else if !matches!(req.method(), Method::Get | Method::Head) {
            (405, "only GET\n".to_string())
        } else {
            let who = std::env::var("GREETING").unwrap_or_else(|_| "Outpost".into());
            println!("GET {path}");
            (200, format!("hello from {who} at {path}\n"))
        };
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("a valid header");
        let resp = OutgoingResponse::new(headers);
        resp.set_status_code(status).expect("a valid status");
        let body = resp.body().expect("the body, once");
        ResponseOutparam::set(out, Ok(resp));
        let mut w = body.write().expect("the body stream, once");
        // A client that went away is not the guest's error.
        let _ = w
            .write_all(text.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut w));
        drop(w);
        let _ = OutgoingBody::finish(body, None);
    }
}

/// GET `http://host/path` through the host's outgoing handler: the status and the body.
fn fetch(host: &str, path: &str) -> Result<(u16, String), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{OutgoingRequest, Scheme};
    use wasip2::io::streams::StreamError;
    let req = OutgoingRequest::new(Fields::new());
    req.set_scheme(Some(&Scheme::Http)).map_err(|()| "scheme")?;
    req.set_authority(Some(host)).map_err(|()| "authority")?;
    req.set_path_with_query(Some(path)).map_err(|()| "path")?;
    let fut = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    fut.subscribe().block();
    let resp = fut
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken")?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp.consume().map_err(|()| "body")?;
    let stream = body.stream().map_err(|()| "stream")?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}
