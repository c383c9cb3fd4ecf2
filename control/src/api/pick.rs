//! Decoding part of a stored object. Watches with selectors, the controllers and the
//! scheduler read a few fields of every pod that changes; building the whole object (its
//! managed fields, its status details) as a `Value` only to drop most of it was a fifth of
//! the control plane's time in a burst of pods. Here the parts not wanted are skipped by the
//! parser without being built.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// `raw` (one JSON object) with only `paths` (dotted, as `spec.nodeName`) decoded: what
/// lies elsewhere is absent from the result. A path through an array stops there.
pub fn only(raw: &[u8], paths: &[&str]) -> serde_json::Result<Value> {
    decode(raw, paths, true)
}

/// `raw` (one JSON object) decoded but for `paths` (dotted, as `metadata.managedFields`).
pub fn without(raw: &[u8], paths: &[&str]) -> serde_json::Result<Value> {
    decode(raw, paths, false)
}

fn decode(raw: &[u8], paths: &[&str], keep: bool) -> serde_json::Result<Value> {
    let split: Vec<Vec<&str>> = paths.iter().map(|p| p.split('.').collect()).collect();
    let paths: Vec<&[&str]> = split.iter().map(Vec::as_slice).collect();
    let mut de = serde_json::Deserializer::from_slice(raw);
    let v = Pick {
        paths: &paths,
        keep,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// One level of the walk: the rest of each path below this object.
#[derive(Clone, Copy)]
struct Pick<'a> {
    paths: &'a [&'a [&'a str]],
    /// Whether `paths` are what is kept (else what is dropped).
    keep: bool,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A key, borrowed from the input unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut below: Vec<&[&str]> = Vec::new();
        while let Some(Key(k)) = m.next_key()? {
            below.clear();
            let mut whole = false;
            for p in self.paths.iter().filter(|p| p.first() == Some(&&*k)) {
                whole |= p.len() == 1;
                below.push(&p[1..]);
            }
            let v = match (self.keep, below.is_empty(), whole) {
                // Kept: named whole, or with parts named below.
                (true, false, true) | (false, true, _) => m.next_value::<Value>()?,
                (true, false, false) | (false, false, false) => m.next_value_seed(Pick {
                    paths: &below,
                    keep: self.keep,
                })?,
                (true, true, _) | (false, false, true) => {
                    m.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            out.insert(k.into_owned(), v);
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        if self.keep {
            while s.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Value::Null);
        }
        let mut out = Vec::new();
        while let Some(v) = s.next_element::<Value>()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_or_drops_the_paths_named() {
        let pod = json!({"kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}],
                         "annotations": {"k\"ey": "v"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready"}]}});
        let raw = serde_json::to_vec(&pod).unwrap();
        let got = only(
            &raw,
            &["metadata.labels", "metadata.name", "spec.nodeName", "kind"],
        );
        assert_eq!(
            got.unwrap(),
            json!({"kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                   "spec": {"nodeName": "n1"}})
        );
        // Through an array, or to what is not there: nothing.
        let got = only(&raw, &["spec.containers.name", "status.podIP"]).unwrap();
        assert_eq!(got, json!({"spec": {"containers": null}, "status": {}}));
        let mut want = pod.clone();
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        want.as_object_mut().unwrap().remove("status");
        assert_eq!(
            without(&raw, &["metadata.managedFields", "status"]).unwrap(),
            want
        );
        assert_eq!(without(&raw, &[]).unwrap(), pod);
        assert!(only(b"{\"a\": 1} x", &["a"]).is_err());
        assert!(only(b"{\"a\": ", &["b"]).is_err());
    }
}
