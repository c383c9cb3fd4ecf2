//! CertificateSigningRequests, on the leader: an approved request for the
//! `kubernetes.io/kube-apiserver-client` signer is signed by the cluster CA (the subject it
//! asks for, client authentication, `expirationSeconds` or a year at most) and its
//! certificate written to its status, as kube-controller-manager's signer does; the API
//! then takes the certificate's CN as the user and each O as a group. A request it cannot
//! sign gets a `Failed` condition saying why. Old requests go as the CSR cleaner removes
//! them: an hour after being issued, denied or failed, a day when left pending.

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
/// How long requests are kept, as kube-controller-manager's CSR cleaner keeps them: an hour
/// after they were issued, denied or failed, a day when nobody decided.
const DECIDED_KEPT: i64 = 3600;
const PENDING_KEPT: i64 = 86_400;

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
                let name = csr["metadata"]["name"].as_str().unwrap_or("");
                let path =
                    format!("/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}");
                if expired(&csr, jiff::Timestamp::now().as_second()) {
                    write(api, "DELETE", &path, "application/json", &json!({})).await;
                } else if let Some(status) = decide(api, &csr) {
                    let body = json!({"status": status});
                    write(
                        api,
                        "PATCH",
                        &format!("{path}/status"),
                        "application/merge-patch+json",
                        &body,
                    )
                    .await;
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

/// One write as kube-controller-manager; a refusal other than NotFound is logged.
async fn write(api: &Arc<Api>, method: &str, path: &str, ct: &str, body: &Value) {
    let user = system_user("system:kube-controller-manager");
    let (code, v) = crate::api::call_as(api, &user, method, path, ct, body).await;
    if !(200..300).contains(&code) && code != 404 {
        tracing::warn!(%method, %path, code, message = %v["message"], "CSR write refused");
    }
}

fn condition(c: &Value, t: &str) -> bool {
    c["status"]["conditions"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x["type"] == t && x["status"] != "False"))
}

/// Whether `csr` has been kept long enough at Unix second `now`: issued, denied or failed
/// more than an hour ago (by its condition's last update), or pending with no condition for
/// more than a day.
fn expired(csr: &Value, now: i64) -> bool {
    let secs = |v: &Value| {
        v.as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_second())
    };
    let conditions = csr["status"]["conditions"].as_array();
    let decided_at = |t: &str| {
        conditions
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t && c["status"] != "False")
            .map(|c| secs(&c["lastUpdateTime"]).or(secs(&c["lastTransitionTime"])))
    };
    let old = |at: Option<i64>, kept: i64| at.is_some_and(|at| now - at > kept);
    let issued = csr["status"]["certificate"]
        .as_str()
        .is_some_and(|c| !c.is_empty());
    if conditions.is_none_or(|c| c.is_empty()) {
        return old(secs(&csr["metadata"]["creationTimestamp"]), PENDING_KEPT);
    }
    ["Denied", "Failed"]
        .iter()
        .any(|t| decided_at(t).is_some_and(|at| old(at, DECIDED_KEPT)))
        || (issued && decided_at("Approved").is_some_and(|at| old(at, DECIDED_KEPT)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(created: &str, conditions: Value, cert: &str) -> Value {
        json!({"metadata": {"name": "x", "creationTimestamp": created},
            "status": {"conditions": conditions, "certificate": cert}})
    }

    #[test]
    fn requests_are_kept_as_the_csr_cleaner_keeps_them() {
        let now = "2026-12-07T12:00:00Z"
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_second())
            .unwrap_or_default();
        let cond = |t: &str, at: &str| json!([{"type": t, "status": "True", "lastUpdateTime": at}]);
        let (early, late) = ("2026-12-07T10:30:00Z", "2026-12-07T11:30:00Z");
        // Pending: a day from creation.
        assert!(!expired(&csr(early, Value::Null, ""), now));
        assert!(expired(&csr("2026-12-06T11:00:00Z", json!([]), ""), now));
        // Issued, denied, failed: an hour from the decision.
        assert!(expired(
            &csr(early, cond("Approved", early), "Y2VydA=="),
            now
        ));
        assert!(!expired(
            &csr(early, cond("Approved", late), "Y2VydA=="),
            now
        ));
        assert!(expired(&csr(early, cond("Denied", early), ""), now));
        assert!(expired(&csr(early, cond("Failed", early), ""), now));
        assert!(!expired(&csr(early, cond("Failed", late), ""), now));
        // Approved for another signer and never issued: kept.
        assert!(!expired(&csr(early, cond("Approved", early), ""), now));
    }
}
