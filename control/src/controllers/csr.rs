//! CertificateSigningRequests, on the leader: an approved request for the
//! `kubernetes.io/kube-apiserver-client` signer is signed by the cluster CA (the subject it
//! asks for, client authentication, `expirationSeconds` or a year at most) and its
//! certificate written to its status, as kube-controller-manager's signer does; the API
//! then takes the certificate's CN as the user and each O as a group. A request it cannot
//! sign gets a `Failed` condition saying why.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::system_user;
use crate::api::Api;
use crate::store::Consistency;

const PREFIX: &str = "/registry/certificates.k8s.io/certificatesigningrequests/";
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// The longest a signed certificate is valid.
const MAX_TTL: u64 = 365 * 86_400;
const RESYNC: Duration = Duration::from_secs(30);

/// Sign approved requests until the task is aborted.
pub async fn run(api: Arc<Api>) {
    super::again("CSR signer", || follow(&api)).await
}

async fn follow(api: &Arc<Api>) -> Result<(), String> {
    loop {
        let page = api
            .store
            .range(PREFIX, None, 0, Consistency::Serializable)
            .await
            .map_err(|e| e.to_string())?;
        if api.store.leads() {
            for kv in &page.kvs {
                let Ok(csr) = serde_json::from_slice::<Value>(&kv.value) else {
                    continue;
                };
                if let Some(status) = decide(api, &csr) {
                    let name = csr["metadata"]["name"].as_str().unwrap_or("");
                    let path = format!(
                        "/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}/status"
                    );
                    let user = system_user("system:kube-controller-manager");
                    let (code, v) = crate::api::call_as(
                        api,
                        &user,
                        "PATCH",
                        &path,
                        "application/merge-patch+json",
                        &json!({"status": status}),
                    )
                    .await;
                    if !(200..300).contains(&code) {
                        tracing::warn!(csr = name, code, message = %v["message"], "CSR status not written");
                    }
                }
            }
        }
        let mut w = api
            .store
            .watch(PREFIX, page.revision)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(None) = tokio::time::timeout(RESYNC, w.next()).await {
            return Err("the CSR watch ended".into());
        }
    }
}

fn condition(c: &Value, t: &str) -> bool {
    c["status"]["conditions"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x["type"] == t && x["status"] != "False"))
}

/// The status to write for `csr`, if it is this signer's to act on now: its certificate,
/// or a Failed condition with the reason.
fn decide(api: &Api, csr: &Value) -> Option<Value> {
    let spec = &csr["spec"];
    if spec["signerName"] != CLIENT_SIGNER
        || !condition(csr, "Approved")
        || condition(csr, "Denied")
        || condition(csr, "Failed")
        || csr["status"]["certificate"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    {
        return None;
    }
    let mut conditions = csr["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = |why: String, mut conditions: Vec<Value>| {
        conditions.push(json!({"type": "Failed", "status": "True", "reason": "SignerValidationFailure",
            "message": why, "lastUpdateTime": crate::api::now(), "lastTransitionTime": crate::api::now()}));
        Some(json!({"conditions": conditions}))
    };
    let usages: Vec<&str> = spec["usages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !usages.contains(&"client auth")
        || usages
            .iter()
            .any(|u| !matches!(*u, "client auth" | "digital signature" | "key encipherment"))
    {
        return failed(
            format!("invalid usages for signer {CLIENT_SIGNER}: {usages:?}; \"client auth\" is required, and only \"digital signature\" and \"key encipherment\" may join it"),
            conditions,
        );
    }
    let pem = base64::engine::general_purpose::STANDARD
        .decode(spec["request"].as_str().unwrap_or(""))
        .ok()
        .and_then(|p| String::from_utf8(p).ok())?;
    let ttl = spec["expirationSeconds"]
        .as_u64()
        .unwrap_or(MAX_TTL)
        .clamp(600, MAX_TTL);
    let dir = api.pki_dir.as_ref()?;
    match crate::pki::sign_client(dir, &pem, Duration::from_secs(ttl)) {
        Ok(cert) => {
            conditions.retain(|c| c["type"] != "Failed");
            Some(json!({"conditions": conditions,
                "certificate": base64::engine::general_purpose::STANDARD.encode(cert)}))
        }
        Err(e) => failed(e.to_string(), conditions),
    }
}
