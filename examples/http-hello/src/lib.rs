//! An HTTP hello as a `wasi:http/proxy` component. The node instantiates it per request and
//! serves it on the container's port. `GET /healthz` answers `ok` (for probes); any other path
//! answers a greeting naming the path and the `GREETING` environment variable, and logs one
//! line to stdout.

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
