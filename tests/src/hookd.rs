//! A small admission webhook server for the tests, served over HTTPS in the test process (a
//! `url` webhook) or from a pod (`outpost-hookd`, a `service` webhook):
//! - `/validate` refuses an object labelled `hook/deny` and the deletion of one labelled
//!   `hook/keep`, and an exec of `rm`;
//! - `/mutate` labels a created or updated object `hook/mutated: "yes"`, with a warning;
//! - `/garbled` answers with something that is not an AdmissionReview.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

/// A CA and a serving certificate from it for `names` (DNS names or IPs): (CA PEM, cert PEM,
/// key PEM).
pub fn certs(names: &[&str]) -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "hookd CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        leaf.subject_alt_names.push(match n.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*n).try_into()?),
        });
    }
    leaf.distinguished_name.push(DnType::CommonName, "hookd");
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// The answer to one review sent to `path`.
pub fn answer(path: &str, review: &Value) -> Value {
    let req = &review["request"];
    let uid = req["uid"].clone();
    let labels = |o: &Value| o["metadata"]["labels"].clone();
    let mut resp = json!({"uid": uid, "allowed": true});
    match path {
        "/validate" => {
            if !labels(&req["object"])["hook/deny"].is_null() {
                resp = json!({"uid": uid, "allowed": false,
                    "status": {"code": 403, "reason": "Forbidden",
                               "message": "label hook/deny is set"}});
            } else if req["operation"] == "DELETE"
                && !labels(&req["oldObject"])["hook/keep"].is_null()
            {
                resp = json!({"uid": uid, "allowed": false,
                    "status": {"message": "this object is kept"}});
            } else if req["operation"] == "CONNECT" && req["object"]["command"][0] == "rm" {
                resp = json!({"uid": uid, "allowed": false,
                    "status": {"message": "exec of rm is not allowed"}});
            }
        }
        "/mutate" if req["operation"] == "CREATE" || req["operation"] == "UPDATE" => {
            let ops = if labels(&req["object"]).is_object() {
                json!([{"op": "add", "path": "/metadata/labels/hook~1mutated", "value": "yes"}])
            } else {
                json!([{"op": "add", "path": "/metadata/labels", "value": {"hook/mutated": "yes"}}])
            };
            let patch = base64::engine::general_purpose::STANDARD.encode(ops.to_string());
            resp = json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch,
                          "warnings": ["labelled by hookd"]});
        }
        "/garbled" => return json!({"kind": "Nothing"}),
        _ => {}
    }
    json!({"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": resp})
}

/// Serve HTTPS on `listener` with `cert` and `key` (PEM) until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, cert: &str, key: &str) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("the key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await?.to_bytes();
                    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let out = answer(&path, &review).to_string();
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(out)))
                        .map_err(|e| anyhow::anyhow!(e))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A webhook server on its own thread, for as long as this lives.
pub struct Hookd {
    pub addr: SocketAddr,
    /// The CA its certificate comes from, base64 as a `caBundle` takes it.
    pub ca_bundle: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Hookd {
    /// Serve on `ip`, port chosen by the kernel, with a certificate for `ip`.
    pub fn start(ip: &str) -> anyhow::Result<Hookd> {
        let (ca, cert, key) = certs(&[ip])?;
        let std = std::net::TcpListener::bind((ip, 0))?;
        std.set_nonblocking(true)?;
        let addr = std.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std) else {
                    return;
                };
                tokio::select! {
                    r = serve(listener, &cert, &key) => {
                        if let Err(e) = r {
                            eprintln!("hookd: {e:#}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        });
        Ok(Hookd {
            addr,
            ca_bundle: base64::engine::general_purpose::STANDARD.encode(ca),
            stop: Some(stop),
        })
    }
}

impl Drop for Hookd {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
