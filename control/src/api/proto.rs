//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), which kubectl
//! 1.32+ sends from its typed clients (`create namespace`, `auth can-i`, …).
//!
//! A body is the magic `k8s\0` and a `runtime.Unknown` envelope whose `raw` field is the
//! object's message. Messages are decoded field by field with a table generated from the
//! k8s-pb crate's definitions (`proto_table.json`, made by `scripts/gen-proto-table.py`) and
//! turned into the object's JSON form. Go's protobuf encoder writes zero values of non-pointer
//! fields, so zero values are dropped as Go's `omitempty` would.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::{json, Map, Value};

use super::ApiError;

const MAGIC: &[u8] = b"k8s\0";
const MAX_DEPTH: usize = 64;

/// (tag, JSON name, kind, message type, label) per message.
type Field = (u32, String, String, Option<String>, String);

struct Table {
    messages: HashMap<String, HashMap<u32, Field>>,
    /// Lower-cased name → name, for names whose acronyms prost re-cased (PodDNSConfig).
    folded: HashMap<String, String>,
}

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let raw: HashMap<String, Vec<Field>> =
            serde_json::from_str(include_str!("proto_table.json")).unwrap_or_default();
        let folded = raw.keys().map(|k| (k.to_lowercase(), k.clone())).collect();
        let messages = raw
            .into_iter()
            .map(|(k, fs)| (k, fs.into_iter().map(|f| (f.0, f)).collect()))
            .collect();
        Table { messages, folded }
    })
}

fn lookup(name: &str) -> Option<&'static HashMap<u32, Field>> {
    let t = table();
    t.messages.get(name).or_else(|| {
        t.folded
            .get(&name.to_lowercase())
            .and_then(|n| t.messages.get(n))
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.buf.get(self.pos..end).ok_or("truncated field")?;
        self.pos = end;
        Ok(s)
    }

    fn next(&mut self) -> Result<Option<(u32, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).map_err(|_| "tag too large")?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| "fixed64")?,
            )),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| "fixed32")?,
            )),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((tag, wire)))
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u32, Wire<'_>)>, String> {
    let mut r = Reader { buf, pos: 0 };
    let mut out = Vec::new();
    while let Some(f) = r.next()? {
        out.push(f);
    }
    Ok(out)
}

fn scalar(kind: &str, w: &Wire<'_>) -> Result<Value, String> {
    Ok(match (kind, w) {
        ("string", Wire::Bytes(b)) => {
            json!(std::str::from_utf8(b).map_err(|_| "a string field is not UTF-8")?)
        }
        ("bytes", Wire::Bytes(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ("bool", Wire::Varint(v)) => json!(*v != 0),
        ("int32", Wire::Varint(v)) => json!(*v as i64 as i32),
        ("int64", Wire::Varint(v)) => json!(*v as i64),
        ("uint32" | "uint64", Wire::Varint(v)) => json!(*v),
        ("double", Wire::Fixed64(v)) => json!(f64::from_bits(*v)),
        ("float", Wire::Fixed32(v)) => json!(f32::from_bits(*v)),
        (k, _) => return Err(format!("field of type {k} has the wrong wire type")),
    })
}

fn time(buf: &[u8], micro: bool) -> Result<Value, String> {
    let (mut secs, mut nanos) = (0i64, 0i32);
    for (tag, w) in fields(buf)? {
        match (tag, w) {
            (1, Wire::Varint(v)) => secs = v as i64,
            (2, Wire::Varint(v)) => nanos = v as i64 as i32,
            _ => {}
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(Value::Null);
    }
    let ts = jiff::Timestamp::new(secs, nanos).map_err(|e| e.to_string())?;
    let fmt = if micro {
        "%Y-%m-%dT%H:%M:%S%.6fZ"
    } else {
        "%Y-%m-%dT%H:%M:%SZ"
    };
    Ok(json!(ts.strftime(fmt).to_string()))
}

fn message(name: &str, buf: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("message nested too deeply".into());
    }
    match name {
        "io.k8s.apimachinery.pkg.apis.meta.v1.Time" => return time(buf, false),
        "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime" => return time(buf, true),
        "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
            for (tag, w) in fields(buf)? {
                if let (1, Wire::Bytes(b)) = (tag, w) {
                    return Ok(json!(String::from_utf8_lossy(b)));
                }
            }
            return Ok(Value::Null);
        }
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
            let (mut ty, mut i, mut s) = (0u64, 0i64, String::new());
            for (tag, w) in fields(buf)? {
                match (tag, w) {
                    (1, Wire::Varint(v)) => ty = v,
                    (2, Wire::Varint(v)) => i = v as i64 as i32 as i64,
                    (3, Wire::Bytes(b)) => s = String::from_utf8_lossy(b).into_owned(),
                    _ => {}
                }
            }
            return Ok(if ty == 1 { json!(s) } else { json!(i) });
        }
        "io.k8s.apimachinery.pkg.runtime.RawExtension"
        | "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            for (tag, w) in fields(buf)? {
                if let (1, Wire::Bytes(b)) = (tag, w) {
                    return serde_json::from_slice(b).map_err(|e| e.to_string());
                }
            }
            return Ok(Value::Null);
        }
        "io.k8s.apimachinery.pkg.apis.meta.v1.Duration" => {
            for (tag, w) in fields(buf)? {
                if let (1, Wire::Varint(ns)) = (tag, w) {
                    return Ok(json!(format!("{}s", ns as i64 as f64 / 1e9)));
                }
            }
            return Ok(Value::Null);
        }
        _ => {}
    }
    let spec = lookup(name).ok_or_else(|| format!("unknown message {name}"))?;
    let mut out = Map::new();
    for (tag, w) in fields(buf)? {
        let Some((_, json_name, kind, reference, label)) = spec.get(&tag) else {
            continue;
        };
        let decode_one = |w: &Wire<'_>| -> Result<Value, String> {
            match (kind.as_str(), w) {
                ("message", Wire::Bytes(b)) => {
                    message(reference.as_deref().unwrap_or(""), b, depth + 1)
                }
                ("message", _) => Err("a message field has the wrong wire type".into()),
                _ => scalar(kind, w),
            }
        };
        match (kind.as_str(), label.as_str()) {
            ("map", value_kind) => {
                let Wire::Bytes(entry) = w else {
                    return Err("a map entry has the wrong wire type".into());
                };
                let (mut k, mut v) = (String::new(), Value::Null);
                for (t, ew) in fields(entry)? {
                    match t {
                        1 => {
                            if let Wire::Bytes(b) = ew {
                                k = String::from_utf8_lossy(b).into_owned();
                            }
                        }
                        2 => {
                            v = match (value_kind, &ew) {
                                ("message", Wire::Bytes(b)) => {
                                    message(reference.as_deref().unwrap_or(""), b, depth + 1)?
                                }
                                _ => scalar(value_kind, &ew)?,
                            }
                        }
                        _ => {}
                    }
                }
                if v.is_null() && value_kind == "string" {
                    v = json!("");
                }
                let m = out.entry(json_name.clone()).or_insert_with(|| json!({}));
                if let Value::Object(m) = m {
                    m.insert(k, v);
                }
            }
            (_, "repeated") => {
                let items = match (&w, kind.as_str()) {
                    // Packed scalars.
                    (Wire::Bytes(b), k) if !matches!(k, "string" | "bytes" | "message") => {
                        let mut r = Reader { buf: b, pos: 0 };
                        let mut v = Vec::new();
                        while r.pos < b.len() {
                            let wv = match k {
                                "double" => Wire::Fixed64(u64::from_le_bytes(
                                    r.take(8)?.try_into().map_err(|_| "fixed64")?,
                                )),
                                "float" => Wire::Fixed32(u32::from_le_bytes(
                                    r.take(4)?.try_into().map_err(|_| "fixed32")?,
                                )),
                                _ => Wire::Varint(r.varint()?),
                            };
                            v.push(scalar(k, &wv)?);
                        }
                        v
                    }
                    _ => vec![decode_one(&w)?],
                };
                let list = out.entry(json_name.clone()).or_insert_with(|| json!([]));
                if let Value::Array(a) = list {
                    a.extend(items);
                }
            }
            _ if inline(name, json_name) => {
                if let Value::Object(m) = decode_one(&w)? {
                    out.extend(m);
                }
            }
            _ => {
                out.insert(json_name.clone(), decode_one(&w)?);
            }
        }
    }
    Ok(Value::Object(out))
}

/// Whether field `field` of message `name` is a Go struct embedded in its parent
/// (`json:",inline"`): its fields are the parent's in JSON, though protobuf nests them.
fn inline(name: &str, field: &str) -> bool {
    field == "localObjectReference"
        || matches!(
            (name.rsplit('.').next().unwrap_or(""), field),
            ("Volume", "volumeSource")
                | ("PersistentVolumeSpec", "persistentVolumeSource")
                | ("Probe", "handler")
                | ("EphemeralContainer", "ephemeralContainerCommon")
                | ("IngressRule", "ingressRuleValue")
                | ("NamedRuleWithOperations", "ruleWithOperations")
                | ("RuleWithOperations", "rule")
                | (_, "deviceConfiguration")
        )
}

/// Drop what Go's `omitempty` would not have written. `replicas: 0` is kept: it is a pointer
/// in Go, written only when set.
fn omit_empty(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.values_mut().for_each(omit_empty);
            m.retain(|k, x| match x {
                Value::Null => false,
                Value::String(s) => !s.is_empty(),
                Value::Bool(b) => *b,
                Value::Number(n) => k == "replicas" || n.as_f64() != Some(0.0),
                Value::Object(o) => !o.is_empty() || k == "securityContext",
                Value::Array(a) => !a.is_empty(),
            });
        }
        Value::Array(a) => a.iter_mut().for_each(omit_empty),
        _ => {}
    }
}

/// The message name for `apiVersion`/`kind`.
fn message_name(api_version: &str, kind: &str) -> Option<String> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    // The served type's own name, unless the body is of an older version (autoscaling/v1
    // beside the served v2), whose message differs.
    let served = super::resources::by_kind(group, kind).is_some_and(|r| r.version == version);
    if let Some(n) = super::resources::schema_name(group, kind).filter(|_| served) {
        return Some(n);
    }
    let suffix = format!(".{version}.{kind}").to_lowercase();
    let mut names: Vec<&String> = table()
        .messages
        .keys()
        .filter(|k| k.to_lowercase().ends_with(&suffix))
        .collect();
    names.sort();
    names.first().map(|s| s.to_string())
}

fn decode_envelope(bytes: &[u8]) -> Result<Value, String> {
    let body = bytes
        .strip_prefix(MAGIC)
        .ok_or("the body does not start with the Kubernetes protobuf magic number")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (tag, w) in fields(body)? {
        match (tag, w) {
            (1, Wire::Bytes(tm)) => {
                for (t, x) in fields(tm)? {
                    match (t, x) {
                        (1, Wire::Bytes(b)) => api_version = String::from_utf8_lossy(b).into(),
                        (2, Wire::Bytes(b)) => kind = String::from_utf8_lossy(b).into(),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    if kind.is_empty() {
        return Err("the envelope names no kind".into());
    }
    let name = message_name(&api_version, &kind)
        .ok_or_else(|| format!("no protobuf message is known for {api_version} {kind}"))?;
    let mut v = message(&name, raw, 0)?;
    omit_empty(&mut v);
    if let Value::Object(m) = &mut v {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(v)
}

/// Append a varint (protobuf wire encoding).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Append a length-delimited field `tag`.
pub fn put_bytes(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(tag) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Decode a protobuf body into the JSON form of its object.
pub fn decode(bytes: &[u8]) -> Result<Value, ApiError> {
    decode_envelope(bytes)
        .map_err(|e| ApiError::BadRequest(format!("couldn't decode the protobuf body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(out: &mut Vec<u8>, t: u32, wire: u8) {
        varint(out, u64::from(t) << 3 | u64::from(wire));
    }
    use super::put_bytes as bytes;
    use super::put_varint as varint;
    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = Vec::new();
        bytes(&mut tm, 1, api_version.as_bytes());
        bytes(&mut tm, 2, kind.as_bytes());
        let mut out = MAGIC.to_vec();
        bytes(&mut out, 1, &tm);
        bytes(&mut out, 2, raw);
        out
    }

    #[test]
    fn namespace_and_configmap() {
        // Namespace{metadata{name:"team", creationTimestamp:{}}, spec{}, status{}} as gogo writes it.
        let mut meta = Vec::new();
        bytes(&mut meta, 1, b"team");
        bytes(&mut meta, 8, b"");
        let mut raw = Vec::new();
        bytes(&mut raw, 1, &meta);
        bytes(&mut raw, 2, b"");
        bytes(&mut raw, 3, b"");
        let v = decode(&envelope("v1", "Namespace", &raw)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
        );

        let mut entry = Vec::new();
        bytes(&mut entry, 1, b"k");
        bytes(&mut entry, 2, b"v");
        let mut raw = Vec::new();
        bytes(&mut raw, 1, &meta);
        bytes(&mut raw, 2, &entry);
        let v = decode(&envelope("v1", "ConfigMap", &raw)).unwrap();
        assert_eq!(v["data"], json!({"k": "v"}));
    }

    #[test]
    fn deployment_with_quantities_and_intorstring() {
        let mut q = Vec::new();
        bytes(&mut q, 1, b"250m");
        let mut limit = Vec::new();
        bytes(&mut limit, 1, b"cpu");
        bytes(&mut limit, 2, &q);
        let mut res = Vec::new();
        bytes(&mut res, 1, &limit);
        let mut port = Vec::new();
        tag(&mut port, 3, 0);
        varint(&mut port, 8080);
        let mut c = Vec::new();
        bytes(&mut c, 1, b"web");
        bytes(&mut c, 2, b"nginx");
        bytes(&mut c, 8, &res);
        bytes(&mut c, 6, &port);
        let mut pod = Vec::new();
        bytes(&mut pod, 2, &c);
        let mut tpl = Vec::new();
        bytes(&mut tpl, 2, &pod);
        let mut surge = Vec::new();
        tag(&mut surge, 1, 0);
        varint(&mut surge, 1);
        bytes(&mut surge, 3, b"25%");
        let mut ru = Vec::new();
        bytes(&mut ru, 2, &surge);
        let mut strategy = Vec::new();
        bytes(&mut strategy, 2, &ru);
        let mut spec = Vec::new();
        tag(&mut spec, 1, 0);
        varint(&mut spec, 0);
        bytes(&mut spec, 3, &tpl);
        bytes(&mut spec, 4, &strategy);
        let mut raw = Vec::new();
        bytes(&mut raw, 2, &spec);
        let v = decode(&envelope("apps/v1", "Deployment", &raw)).unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"]["cpu"], "250m");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(v["spec"]["replicas"], 0);
        assert_eq!(v["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    }

    #[test]
    fn embedded_structs_are_inlined() {
        // What kubectl 1.32 sent for `kubectl create ingress simple --rule=foo.com/bar=svc1:8080`.
        let body: &[u8] = b"k8s\x00\x0a\x1f\x0a\x14networking.k8s.io/v1\x12\x07Ingress\x12\x4d\x0a\x16\x0a\x06simple\x12\x00\x1a\x00\x22\x00\x2a\x00\x32\x00\x38\x00\x42\x00\x12\x2f\x1a\x2d\x0a\x07foo.com\x12\x22\x0a\x20\x0a\x1e\x0a\x04/bar\x12\x0f\x22\x0d\x0a\x04svc1\x12\x05\x0a\x00\x10\x90\x3f\x1a\x05Exact\x1a\x02\x0a\x00\x1a\x00\x22\x00";
        let v = decode(body).unwrap();
        assert_eq!(
            v["spec"]["rules"],
            json!([{"host": "foo.com", "http": {"paths": [{"path": "/bar", "pathType": "Exact",
                "backend": {"service": {"name": "svc1", "port": {"number": 8080}}}}]}}])
        );
        // A volume's source and a key selector's name sit beside their siblings.
        let mut cm = Vec::new();
        bytes(&mut cm, 1, b"cfg");
        let mut lor = Vec::new();
        bytes(&mut lor, 1, &cm);
        assert_eq!(
            pod_volumes(b"data", 19, &lor),
            json!([{"name": "data", "configMap": {"name": "cfg"}}])
        );
    }

    /// The volumes of a pod whose one volume `name` has source field `tag` set to `source`.
    fn pod_volumes(name: &[u8], tag: u32, source: &[u8]) -> Value {
        let mut src = Vec::new();
        bytes(&mut src, tag, source);
        let mut vol = Vec::new();
        bytes(&mut vol, 1, name);
        bytes(&mut vol, 2, &src);
        let mut spec = Vec::new();
        bytes(&mut spec, 1, &vol);
        let mut raw = Vec::new();
        bytes(&mut raw, 2, &spec);
        decode(&envelope("v1", "Pod", &raw)).unwrap()["spec"]["volumes"].take()
    }

    #[test]
    fn fields_named_by_rust_keywords_are_kept() {
        // `type`, which prost spells `r#type`: `kubectl create service nodeport` and
        // `kubectl create secret tls` send it.
        let mut spec = Vec::new();
        bytes(&mut spec, 4, b"NodePort");
        let mut raw = Vec::new();
        bytes(&mut raw, 2, &spec);
        let v = decode(&envelope("v1", "Service", &raw)).unwrap();
        assert_eq!(v["spec"]["type"], "NodePort");
        let mut raw = Vec::new();
        bytes(&mut raw, 3, b"kubernetes.io/tls");
        let v = decode(&envelope("v1", "Secret", &raw)).unwrap();
        assert_eq!(v["type"], "kubernetes.io/tls");
    }

    #[test]
    fn acronyms_are_spelled_as_the_api_spells_them() {
        // A downwardAPI volume (in VolumeSource, which has no schema of its own).
        let mut file = Vec::new();
        bytes(&mut file, 1, b"labels");
        let mut dapi = Vec::new();
        bytes(&mut dapi, 1, &file);
        assert_eq!(
            pod_volumes(b"meta", 16, &dapi),
            json!([{"name": "meta", "downwardAPI": {"items": [{"path": "labels"}]}}])
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"nope").is_err());
        assert!(decode(b"k8s\0\x0a\xff\xff\xff\xff\x0f").is_err());
        let mut raw = Vec::new();
        bytes(&mut raw, 1, &[0x0a, 0x05, b'a']);
        assert!(decode(&envelope("v1", "Namespace", &raw)).is_err());
        assert!(decode(&envelope("v1", "NoSuchKind", &[])).is_err());
    }
}
