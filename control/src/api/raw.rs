//! Stored objects as bytes: putting the resourceVersion into a stored object without decoding
//! it. Stored JSON leaves `metadata.resourceVersion` out (it is the key's revision), so
//! serving an object means adding it back; a watch without selectors does only that for each
//! event and each watcher, and decoding the whole object to a `Value` and encoding it again
//! for one field was a tenth of the control plane's CPU in a burst of pod starts.

/// `raw`, a stored JSON object, with `"resourceVersion":"rv"` first in its `metadata`.
/// `None` when `raw` is not an object whose `metadata` is an object without a
/// resourceVersion, or is malformed; the caller then decodes it.
pub fn with_rv(raw: &[u8], rv: u64) -> Option<Vec<u8>> {
    let at = metadata_body(raw)?;
    let rest = &raw[at..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let rv = rv.to_string();
    let mut out = Vec::with_capacity(raw.len() + rv.len() + 22);
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(rv.as_bytes());
    out.push(b'"');
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// The offset just after the `{` of the top-level `metadata` object, checking on the way
/// that the whole of `raw` is one well-formed object and that `metadata` has no
/// resourceVersion.
fn metadata_body(raw: &[u8]) -> Option<usize> {
    let mut s = Scan { b: raw, i: 0 };
    let mut found = None;
    s.members(|s, key| {
        if key == b"metadata" && found.is_none() {
            s.ws();
            if s.peek()? != b'{' {
                return None;
            }
            let body = s.i + 1;
            let mut has_rv = false;
            s.members(|s, k| {
                has_rv |= k == b"resourceVersion";
                s.value()
            })?;
            if has_rv {
                return None;
            }
            found = Some(body);
            Some(())
        } else {
            s.value()
        }
    })?;
    s.ws();
    if s.i != raw.len() {
        return None;
    }
    found
}

/// Whether stored object `new` differs from `old` only in its `status` and its
/// `metadata.managedFields`, byte for byte elsewhere: what a status write changes. `false`
/// when either is not a well-formed object (the caller then treats it as any change).
pub fn status_only(old: &[u8], new: &[u8]) -> bool {
    /// A member: its depth (metadata's members at 1), key and value's bytes.
    type Member<'a> = (u8, &'a [u8], &'a [u8]);
    /// Each member but those two.
    fn rest(raw: &[u8]) -> Option<Vec<Member<'_>>> {
        let mut s = Scan { b: raw, i: 0 };
        let mut out = Vec::with_capacity(24);
        s.members(|s, key| {
            s.ws();
            let start = s.i;
            if key == b"metadata" && s.peek()? == b'{' {
                out.push((0, key, &[][..]));
                return s.members(|s, k| {
                    s.ws();
                    let start = s.i;
                    s.value()?;
                    if k != b"managedFields" {
                        out.push((1, k, &s.b[start..s.i]));
                    }
                    Some(())
                });
            }
            s.value()?;
            if key != b"status" {
                out.push((0, key, &s.b[start..s.i]));
            }
            Some(())
        })?;
        s.ws();
        (s.i == raw.len()).then_some(out)
    }
    matches!((rest(old), rest(new)), (Some(a), Some(b)) if a == b)
}

/// A cursor over JSON bytes that skips values without building them.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string's raw contents, escapes left as they are. Most of an object's bytes are in
    /// its strings: they are searched for their end, not stepped through.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            self.i += memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
            if self.b[self.i] == b'\\' {
                self.i += 2;
                continue;
            }
            self.i += 1;
            return Some(&self.b[start..self.i - 1]);
        }
    }

    /// An object's members, each key handed to `f` with the cursor before its value, which
    /// `f` must consume.
    fn members(&mut self, mut f: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            f(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Skips one value: brackets are balanced and strings skipped whole; scalars run to the
    /// next delimiter.
    fn value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            b',' | b'}' | b']' | b':' => None,
            _ => {
                while self
                    .peek()
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn check(stored: &Value, rv: u64) {
        let raw = serde_json::to_vec(stored).expect("encode");
        let out = with_rv(&raw, rv).expect("spliced");
        let got: Value = serde_json::from_slice(&out).expect("still JSON");
        let mut want = stored.clone();
        want["metadata"]["resourceVersion"] = json!(rv.to_string());
        assert_eq!(got, want);
    }

    #[test]
    fn the_resource_version_goes_into_metadata_and_nothing_else_changes() {
        check(
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "labels": {"a": "b"}, "annotations": {"x": "{\"metadata\":{}}"}},
                "spec": {"containers": [{"name": "c", "args": ["}", "]", "\\\"", "metadata"]}]},
                "status": {"phase": "Running", "n": 1.5e3, "ok": true, "none": null}}),
            42,
        );
        check(&json!({"metadata": {}}), 7);
        // A `metadata` deeper down is not the object's.
        check(
            &json!({"spec": {"metadata": {"name": "t"}}, "metadata": {"name": "o"}}),
            9,
        );
    }

    #[test]
    fn a_status_write_is_told_from_other_changes() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [{"manager": "x"}]},
            "spec": {"nodeName": "n", "containers": [{"name": "c"}]},
            "status": {"phase": "Pending"}});
        let raw = |v: &Value| serde_json::to_vec(v).expect("encode");
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = pod.clone();
            f(&mut v);
            raw(&v)
        };
        let status = with(&|v| {
            v["status"] = json!({"phase": "Running"});
            v["metadata"]["managedFields"] = json!([{"manager": "x"}, {"manager": "kubelet"}]);
        });
        assert!(status_only(&raw(&pod), &status));
        assert!(status_only(&raw(&pod), &raw(&pod)));
        for other in [
            with(&|v| v["metadata"]["labels"]["a"] = json!("c")),
            with(&|v| v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z")),
            with(&|v| v["spec"]["nodeName"] = json!("m")),
            with(&|v| v["spec"]["containers"][0]["image"] = json!("i")),
            with(&|v| {
                v.as_object_mut().map(|m| m.remove("status"));
                v["extra"] = json!(1);
            }),
        ] {
            assert!(!status_only(&raw(&pod), &other));
        }
        assert!(!status_only(b"{\"metadata\":{}", b"{\"metadata\":{}}"));
    }

    #[test]
    fn spaced_json_is_read_too() {
        let raw = br#" { "kind" : "X" , "metadata" : { } , "n" : [ 1 , { "a" : "b" } ] } "#;
        let out = with_rv(raw, 3).expect("spliced");
        let got: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(
            got,
            json!({"kind": "X", "metadata": {"resourceVersion": "3"}, "n": [1, {"a": "b"}]})
        );
    }

    #[test]
    fn anything_else_is_left_to_the_decoder() {
        for raw in [
            &br#"{"metadata":{"resourceVersion":"1"}}"#[..],
            br#"{"metadata":"x"}"#,
            br#"{"kind":"X"}"#,
            br#"[{"metadata":{}}]"#,
            br#"{"metadata":{}"#,
            br#"{"metadata":{}} trailing"#,
            br#"{"metadata":{"a":"unterminated}}"#,
            br#"{"metadata":{},"a":"x\"#,
            br#"{"metadata":{},"a":"x\""#,
            br#"{"metadata":{},}"#,
            br#"{"a":]}"#,
            b"",
        ] {
            assert_eq!(with_rv(raw, 1), None, "{}", String::from_utf8_lossy(raw));
        }
    }
}
