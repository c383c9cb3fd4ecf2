#!/usr/bin/env python3
"""Generate control/src/api/proto_table.json: for every Kubernetes protobuf message, its
fields (tag, JSON name, wire type, message type), so the API server can turn protobuf request
bodies into JSON without generated code.

Inputs: the k8s-pb crate's prost sources (field tags and types) and the API server's own
OpenAPI documents (JSON field names), fetched with kubectl from a running Outpost:

  scripts/gen-proto-table.py ~/.cargo/registry/src/*/k8s-pb-0.9.0/src > control/src/api/proto_table.json
"""
import json, os, re, subprocess, sys

src = sys.argv[1]
names = {}  # schema name -> {normalized: json name}
root = json.loads(subprocess.check_output(["kubectl", "get", "--raw", "/openapi/v3"]))
for p in root["paths"]:
    doc = json.loads(subprocess.check_output(["kubectl", "get", "--raw", "/openapi/v3/" + p]))
    for n, s in doc.get("components", {}).get("schemas", {}).items():
        names[n.lower()] = {k.replace("_", "").lower(): k for k in s.get("properties", {})}
# The property names of each package (`io.k8s.api.core.v1`), for messages the server has no
# schema of (VolumeSource is inlined into Volume): `downward_api` is downwardAPI there, not
# downwardApi.
package = {}
for n, props in names.items():
    p = package.setdefault(n.rsplit(".", 1)[0], {})
    for low, k in props.items():
        if low not in p or (p[low][:1].isupper() and k[:1].islower()):
            p[low] = k

def camel(snake):
    parts = snake.split("_")
    return parts[0] + "".join(x[:1].upper() + x[1:] for x in parts[1:])

def resolve(module, ty):
    ty = ty.strip()
    ty = re.sub(r"\s+", "", ty)
    m = re.search(r"(?:Option<|Vec<|BTreeMap<[^,]+,)((?:super::)*(?:[a-z_0-9]+::)*[A-Z][A-Za-z0-9]*)", ty)
    if not m:
        return None
    path = m.group(1).split("::")
    mod = list(module)
    while path and path[0] == "super":
        mod.pop(); path.pop(0)
    return "io.k8s." + ".".join(mod + path)

table = {}
for dirpath, _, files in os.walk(src):
    if "mod.rs" not in files:
        continue
    module = os.path.relpath(dirpath, src).split(os.sep)
    if module == ["."]:
        continue
    text = open(os.path.join(dirpath, "mod.rs")).read()
    for sm in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
        name = "io.k8s." + ".".join(module + [sm.group(1)])
        fields = []
        body = sm.group(2)
        for chunk in body.split("#[prost(")[1:]:
            # `r#type`, `r#continue`: prost writes Rust keywords as raw identifiers.
            fm = re.match(r"([^\]]*)\)\]\s*pub (?:r#)?(\w+):\s*(.*)", chunk, re.S)
            if not fm or "tag" not in fm.group(1):
                continue
            attrs, field, ty = fm.group(1), fm.group(2), fm.group(3)
            ty = re.sub(r"///[^\n]*", "", ty)
            tag = int(re.search(r'tag = "(\d+)"', attrs).group(1))
            kind = attrs.split(",")[0].strip()
            label = "repeated" if "repeated" in attrs else "optional"
            ref = None
            mm = re.match(r'(?:btree_map|map) = "(\w+), (\w+)"', attrs)
            if mm:
                kind = "map"
                label = mm.group(2)
                if label == "message":
                    ref = resolve(module, ty)
            elif kind == "message":
                ref = resolve(module, ty)
            elif kind.startswith("bytes"):
                kind = "bytes"
            known = names.get(name.lower(), {})
            low = field.replace("_", "").lower()
            same = package.get(name.lower().rsplit(".", 1)[0], {})
            jname = known.get(low) or same.get(low) or camel(field)
            fields.append([tag, jname, kind, ref, label])
        table[name] = fields
json.dump(table, sys.stdout, separators=(",", ":"), sort_keys=True)
