//! ServiceAccount tokens: the `serviceaccounts/token` subresource (`kubectl create token`)
//! issues JWTs signed ES256 with the cluster CA's key, and the API accepts them as bearer
//! tokens for as long as they have not expired and the ServiceAccount (and the object the
//! token is bound to, if any) still exists with the same uid.
//!
//! Every member that serves the API holds the cluster CA, so any member can issue and check
//! a token without another key to distribute.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{json, Value};

use super::auth::User;
use super::error::{ApiError, Cause};
use super::Api;
use crate::store::Consistency;

/// The issuer and default audience, as kubeadm sets `--service-account-issuer`.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_TTL: i64 = 3600;
const MIN_TTL: i64 = 600;
pub const MAX_TTL: i64 = 1 << 32;
/// How long an admission-injected token is valid (see [`issue`]).
const EXTENDED_TTL: i64 = 365 * 24 * 3600;

/// Signs and checks tokens with one key pair.
pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
}

impl Signer {
    /// The signer of the cluster CA in `dir` (`ca.key`, P-256).
    pub fn from_pki(dir: &Path) -> Result<Signer, String> {
        let path = dir.join("ca.key");
        let pem = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let pair =
            rcgen::KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        Signer::from_pkcs8(&pair.serialize_der()).map_err(|e| {
            format!(
                "{}: not a P-256 key for signing tokens: {e}",
                path.display()
            )
        })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| e.to_string())?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = B64.encode(digest.as_ref());
        Ok(Signer { key, kid })
    }

    /// The public key as a JSON Web Key Set, as `/openid/v1/jwks` serves it.
    pub fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04, then x and y.
        let point = self.key.public_key().as_ref();
        let (x, y) = point
            .get(1..)
            .unwrap_or_default()
            .split_at(point.len().saturating_sub(1) / 2);
        json!({"keys": [{"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256",
            "alg": "ES256", "x": B64.encode(x), "y": B64.encode(y)}]})
    }

    /// A signed JWT carrying `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let header = json!({"alg": "ES256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
    }

    /// The claims of `token` if this key signed it; nothing about their meaning is checked.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        if header["alg"] != "ES256" {
            return None;
        }
        let sig = B64.decode(s).ok()?;
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public.verify(format!("{h}.{c}").as_bytes(), &sig).ok()?;
        serde_json::from_slice(&B64.decode(c).ok()?).ok()
    }
}

/// Whether `token` looks like a JWT (three base64url parts), so that it is checked as one.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// The user a ServiceAccount token stands for, if it is valid now: signed by us, for one of
/// our audiences, not expired, and its ServiceAccount and bound object still there.
pub async fn authenticate(api: &Api, token: &str) -> Option<User> {
    authenticate_for(api, token, &[ISSUER])
        .await
        .map(|(u, _)| u)
}

/// [`authenticate`] for a token meant for any of `audiences` (a TokenReview's), with those
/// of them it was meant for.
pub async fn authenticate_for(
    api: &Api,
    token: &str,
    audiences: &[&str],
) -> Option<(User, Vec<String>)> {
    let claims = api.signer.as_ref()?.verify(token)?;
    let now = jiff::Timestamp::now().as_second();
    let exp = claims["exp"].as_i64()?;
    // Clocks of members may differ a little.
    let skew = 60;
    if claims["iss"] != ISSUER
        || exp + skew < now
        || claims["nbf"].as_i64().is_some_and(|nbf| nbf > now + skew)
    {
        return None;
    }
    let meant: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let both: Vec<String> = meant
        .into_iter()
        .filter(|a| audiences.contains(&a.as_str()))
        .collect();
    if both.is_empty() {
        return None;
    }
    let k = &claims["kubernetes.io"];
    let ns = k["namespace"].as_str()?;
    let sa = &k["serviceaccount"];
    let (name, uid) = (sa["name"].as_str()?, sa["uid"].as_str()?);
    // There with the same uid, and not being deleted for more than a minute (as
    // kube-apiserver checks a bound object).
    let exists = |plural: &str, name: &str, uid: &str| {
        let key = format!("/registry/core/{plural}/{ns}/{name}");
        let uid = uid.to_string();
        async move {
            match api.store.get(&key, Consistency::Serializable).await {
                Ok(Some(kv)) => serde_json::from_slice::<Value>(&kv.value).is_ok_and(|o| {
                    let going = o["metadata"]["deletionTimestamp"]
                        .as_str()
                        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                        .is_some_and(|t| t.as_second() + 60 < now);
                    o["metadata"]["uid"] == uid.as_str() && !going
                }),
                _ => false,
            }
        }
    };
    if !exists("serviceaccounts", name, uid).await {
        return None;
    }
    for (field, plural) in [("pod", "pods"), ("secret", "secrets")] {
        if let Some(b) = k.get(field) {
            if !exists(plural, b["name"].as_str()?, b["uid"].as_str()?).await {
                return None;
            }
        }
    }
    let user = User {
        name: format!("system:serviceaccount:{ns}:{name}"),
        uid: uid.to_string(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ],
    };
    Some((user, both))
}

fn invalid(name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::Invalid {
        group: "authentication.k8s.io".into(),
        kind: "TokenRequest".into(),
        name: name.into(),
        causes,
    }
}

/// The OpenID provider configuration of the service account issuer, as
/// `/.well-known/openid-configuration` serves it, its key set at `host` (the address the
/// client reached the API at), so that a relying party outside the cluster (Vault's JWT
/// auth, a cloud's workload identity) can check the cluster's tokens.
pub fn discovery(host: &str) -> Value {
    json!({"issuer": ISSUER, "jwks_uri": format!("https://{host}/openid/v1/jwks"),
        "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"]})
}

/// Answer a TokenRequest for the ServiceAccount `sa` (as stored): the request with its
/// `status.token` and `status.expirationTimestamp`.
pub async fn issue(api: &Arc<Api>, sa: &Value, req: &Value) -> Result<Value, ApiError> {
    let signer = api
        .signer
        .as_ref()
        .ok_or_else(|| ApiError::Internal("this member holds no key to sign tokens".into()))?;
    let m = &sa["metadata"];
    let (ns, name) = (
        m["namespace"].as_str().unwrap_or("default"),
        m["name"].as_str().unwrap_or(""),
    );
    let spec = &req["spec"];
    let ttl = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_TTL,
        v => v.as_i64().unwrap_or(-1),
    };
    if ttl < MIN_TTL {
        return Err(invalid(
            name,
            vec![Cause::new(
                "FieldValueInvalid",
                "spec.expirationSeconds",
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    if ttl > MAX_TTL {
        return Err(invalid(
            name,
            vec![Cause::new(
                "FieldValueTooLong",
                "spec.expirationSeconds",
                "may not specify a duration larger than 2^32 seconds",
            )],
        ));
    }
    let audiences: Vec<Value> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => vec![json!(ISSUER)],
    };
    let now = jiff::Timestamp::now().as_second();
    let mut k = json!({"namespace": ns,
        "serviceaccount": {"name": name, "uid": m["uid"]}});
    let bound = &spec["boundObjectRef"];
    if !bound.is_null() {
        let kind = bound["kind"].as_str().unwrap_or("");
        let plural = match kind {
            "Pod" => "pods",
            "Secret" => "secrets",
            _ => {
                return Err(invalid(
                    name,
                    vec![Cause::new(
                        "FieldValueNotSupported",
                        "spec.boundObjectRef.kind",
                        format!(
                            "Unsupported value: \"{kind}\": supported values: \"Pod\", \"Secret\""
                        ),
                    )],
                ))
            }
        };
        let bname = bound["name"].as_str().unwrap_or("");
        let key = format!("/registry/core/{plural}/{ns}/{bname}");
        let obj: Value = match api.store.get(&key, Consistency::Linearizable).await? {
            Some(kv) => super::pick::only(&kv.value, &["metadata.uid"])
                .map_err(|e| ApiError::Internal(format!("stored {plural} unreadable: {e}")))?,
            None => return Err(ApiError::not_found(plural, bname)),
        };
        let uid = obj["metadata"]["uid"].clone();
        if bound["uid"].as_str().is_some_and(|u| uid != u) {
            return Err(ApiError::Conflict {
                kind: plural.into(),
                name: bname.into(),
                message: format!(
                    "the UID in the bound object reference ({}) does not match the UID in record. The object might have been deleted and then recreated",
                    bound["uid"].as_str().unwrap_or("")
                ),
                causes: vec![],
            });
        }
        k[kind.to_lowercase()] = json!({"name": bname, "uid": uid});
    }
    // A token the ServiceAccount admission's volume asked for stays valid for a year (with
    // the hour past which kube-apiserver would warn), so that a client that never rereads
    // its token file goes on working; the kubelet still replaces it hourly.
    let exp = if ttl == super::admit::ADMISSION_TOKEN_TTL && bound["kind"] == "Pod" {
        k["warnafter"] = json!(now + ttl);
        now + EXTENDED_TTL
    } else {
        now + ttl
    };
    let claims = json!({
        "aud": audiences, "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{name}"),
        "iat": now, "nbf": now, "exp": exp,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": k,
    });
    let token = signer.sign(&claims).map_err(ApiError::Internal)?;
    let expires = super::rfc3339(now + ttl);
    Ok(json!({
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": super::now()},
        "spec": {"audiences": audiences, "expirationSeconds": ttl, "boundObjectRef": bound},
        "status": {"token": token, "expirationTimestamp": expires},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let pair = rcgen::KeyPair::generate().unwrap();
        Signer::from_pkcs8(&pair.serialize_der()).unwrap()
    }

    #[test]
    fn the_published_key_checks_the_tokens() {
        let a = signer();
        let t = a.sign(&json!({"sub": "x"})).unwrap();
        let set = a.jwks();
        let k = &set["keys"][0];
        assert_eq!(
            (&k["kty"], &k["crv"], &k["alg"]),
            (&json!("EC"), &json!("P-256"), &json!("ES256"))
        );
        let header: Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["kid"], k["kid"]);
        // What a relying party does: the point from x and y, the signature over the first two parts.
        let mut point = vec![4u8];
        for c in ["x", "y"] {
            point.extend(B64.decode(k[c].as_str().unwrap()).unwrap());
        }
        let (input, sig) = t.rsplit_once('.').unwrap();
        let key = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point);
        assert!(key
            .verify(input.as_bytes(), &B64.decode(sig).unwrap())
            .is_ok());
        let d = discovery("10.0.0.1:6443");
        assert_eq!(d["issuer"], ISSUER);
        assert_eq!(d["jwks_uri"], "https://10.0.0.1:6443/openid/v1/jwks");
    }

    #[test]
    fn tokens_verify_only_under_their_own_key_and_unaltered() {
        let (a, b) = (signer(), signer());
        let claims = json!({"sub": "system:serviceaccount:default:bot", "exp": 1});
        let t = a.sign(&claims).unwrap();
        assert!(looks_like_jwt(&t));
        assert_eq!(a.verify(&t), Some(claims));
        assert_eq!(b.verify(&t), None);
        // Another payload under the same signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(
                json!({"sub": "system:serviceaccount:kube-system:admin", "exp": 1}).to_string()
            ),
            parts[2]
        );
        assert_eq!(a.verify(&forged), None);
        // An unsigned token ("alg": "none") is never accepted.
        let none = format!(
            "{}.{}.",
            B64.encode(json!({"alg": "none"}).to_string()),
            parts[1]
        );
        assert_eq!(a.verify(&none), None);
        assert_eq!(a.verify("a.b"), None);
        assert_eq!(a.verify("not a token"), None);
    }
}
